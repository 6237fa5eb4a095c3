"""The learning-rate schedule against hand-computed tables. Its unit is the training step (train.steps,
optim.warmup_steps): the inner epochs of one step share that step's rate, so a decay ends at train.steps."""

import math

import pytest
import torch

from imagerl.config import load_config
from imagerl.recipes.grpo import lr_lambda


def _rates(overrides, optimizer_steps):
    cfg = load_config("demo", overrides)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    out = []
    for _ in range(optimizer_steps):
        out.append(sched.get_last_lr()[0] / cfg.optim.lr)
        opt.step()
        sched.step()
    return out


def test_cosine_over_training_steps_with_two_inner_epochs():
    # 4 training steps x 2 epochs, 1 warm-up step: step 0 warms up (1/1), steps 1..3 follow
    # 0.5 * (1 + cos(pi * (s - 1) / 3)); each value twice (both epochs of a step)
    got = _rates(["train.steps=4", "algorithm.inner_epochs=2", "optim.warmup_steps=1", "optim.schedule=cosine"], 8)
    per_step = [1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]
    assert got == pytest.approx([v for v in per_step for _ in range(2)])
    assert got[-1] > 0  # the last step still learns


@pytest.mark.parametrize("epochs", [1, 3])
def test_linear_with_warmup_and_floor(epochs):
    # 5 steps, warm-up 2 (1/2, 2/2), then linear from 1 to the floor 0.1: s=2 -> 1, s=3 -> 0.7, s=4 -> 0.4
    got = _rates(["train.steps=5", f"algorithm.inner_epochs={epochs}", "optim.warmup_steps=2", "optim.schedule=linear",
                  "optim.min_lr_ratio=0.1"], 5 * epochs)
    assert got == pytest.approx([v for v in (0.5, 1.0, 1.0, 0.7, 0.4) for _ in range(epochs)])

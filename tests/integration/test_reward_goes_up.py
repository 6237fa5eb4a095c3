"""A short GRPO run must raise the reward it optimises (tiny real architectures, CPU)."""

import json

import pytest

from imagerl.config import load_config
from imagerl.recipes.grpo import GRPOTrainer


def run(tmp_path, overrides):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "logging.progress_bar=false", "logging.sample_every=0",
                             "checkpoint.every=0", "checkpoint.save_final=false", "run.threads=1", *overrides])
    GRPOTrainer(cfg).train()
    return [json.loads(l)["reward/mean"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_janus_brightness_goes_up(tmp_path):
    r = run(tmp_path, ["model.tiny_size=test", "train.steps=16", "data.prompts_per_step=2", "rollout.group_size=8",
                       "rewards.0.type=brightness", "optim.lr=3e-3", "algorithm.micro_batch_size=16"])
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert last > first + 0.05, r


@pytest.mark.slow
def test_demo_recipe_learns(tmp_path):
    """The README's promise: the built-in demo gains >= 0.25 mean reward (last 10 vs first 10 steps)."""
    r = run(tmp_path, [])
    assert sum(r[-10:]) / 10 >= sum(r[:10]) / 10 + 0.25, r

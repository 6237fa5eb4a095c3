"""Scoring overlaps generation: each decoded rollout micro-batch is scored on the background loop while the
next is generated, with numbers identical to scoring after the rollout."""

import json
import math
import threading

import torch


from imagerl.config import load_config
from imagerl.recipes.grpo import GRPOTrainer
from imagerl.rewards.base import Reward
from imagerl.types import RewardOutput

CALLS: list[tuple[int, str]] = []
LEFT_ROWS: list[int] = []
GIDS: list[int] = []


class RecordingBrightness(Reward):
    """A real (pixel) reward that records which thread scored how many samples."""

    def score(self, inp):
        CALLS.append((len(inp), threading.current_thread().name))
        GIDS.extend(inp.group_ids.tolist())
        img = inp.images.float()
        # (in fp64: a float32 sum's last bits depend on how the vectorised loop meets the data's memory alignment, which
        # differs between an image inside a batch of 16 and one inside a micro-batch of 8)
        return RewardOutput(scores=img.double().mean((1, 2, 3)).float())


class AbstainOnLeft(Reward):
    """Mean brightness, abstaining on prompts that say left (a whole group: one prompt per group)."""

    def score(self, inp):
        left = torch.tensor(["left" in p for p in inp.prompts])
        LEFT_ROWS.append(int(left.sum()))
        return RewardOutput(scores=torch.where(left, math.nan, inp.images.float().mean((1, 2, 3))))


def run(tmp_path, name, overlap, *extra):
    CALLS.clear()
    GIDS.clear()
    LEFT_ROWS.clear()
    cfg = load_config(None, [
        "model.tiny_size=test", "train.steps=2", "data.prompts_per_step=4", "rollout.group_size=4",
        "rollout.micro_batch_size=8", f"scoring.overlap={str(overlap).lower()}", f"run.output_dir={tmp_path / name}",
        "logging.progress_bar=false", "logging.sample_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
        "rewards.0.type=test_overlap:RecordingBrightness", "data.datasets.0.path=builtin:color_shapes", *extra
    ])
    GRPOTrainer(cfg).train()
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows], list(CALLS), list(GIDS)


def test_overlap_scores_micro_batches_with_identical_numbers(tmp_path):
    seq, seq_calls, seq_gids = run(tmp_path, "seq", overlap=False)
    ovl, ovl_calls, ovl_gids = run(tmp_path, "ovl", overlap=True)
    assert seq == ovl
    assert seq_gids == ovl_gids == [g for s in range(2) for g in range(4 * s, 4 * s + 4) for _ in range(4)]  # global ids
    # sequential: one call of 16 samples per step; overlapped: two micro-batches of 8 (two whole groups each)
    assert [n for n, _ in seq_calls] == [16, 16]
    assert [n for n, _ in ovl_calls] == [8, 8, 8, 8]
    assert all(t != "MainThread" for _, t in ovl_calls)


def test_composites_that_impute_with_the_batch_mean_score_as_without_overlap(tmp_path):
    # weighted_sum (skip) counts a child that abstained on a whole group as the child's batch mean: scored per
    # micro-batch, that mean would be the micro-batch's (a different reward for the same images), so the chunks'
    # details are combined again over the whole batch after collection
    spec = ["rewards.0.type=weighted_sum", "rewards.0.name=total",
            "rewards.0.args.children=[{type: test_overlap:RecordingBrightness}, {type: test_overlap:AbstainOnLeft, weight: 3}]",
            "train.steps=3"]
    seq, _, _ = run(tmp_path, "seq", False, *spec)
    seq_left = sum(LEFT_ROWS)
    ovl, calls, _ = run(tmp_path, "ovl", True, *spec)
    assert len(calls) == 6 and seq == ovl  # (3 steps x 2 micro-batches)
    assert 0 < sum(LEFT_ROWS) == seq_left < 3 * 16  # (some groups abstained on the child, not all)


def test_flow_rollouts_hand_over_decoded_micro_batches_too(tmp_path):
    # a flow policy's images are ready only after its last step; it decodes per micro-batch and hands each over
    flow = ["model.family=sd3", "rollout.num_steps=3", "rollout.cfg_scale=1.0", "data.datasets.0.path=builtin:colors"]
    seq, seq_calls, _ = run(tmp_path, "seq", False, *flow)
    ovl, ovl_calls, _ = run(tmp_path, "ovl", True, *flow)
    assert seq == ovl
    assert [n for n, _ in seq_calls] == [16, 16] and [n for n, _ in ovl_calls] == [8, 8, 8, 8]
    assert all(t != "MainThread" for _, t in ovl_calls)

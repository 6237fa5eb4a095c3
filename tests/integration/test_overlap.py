"""Scoring overlaps generation: each decoded rollout micro-batch is scored on the background loop while the
next is generated, with numbers identical to scoring after the rollout."""

import json
import threading


from imagerl.config import load_config
from imagerl.recipes.grpo import GRPOTrainer
from imagerl.rewards.base import Reward
from imagerl.types import RewardOutput

CALLS: list[tuple[int, str]] = []


class RecordingBrightness(Reward):
    """A real (pixel) reward that records which thread scored how many samples."""

    def score(self, inp):
        CALLS.append((len(inp), threading.current_thread().name))
        img = inp.images.float()
        return RewardOutput(scores=img.mean((1, 2, 3)))


def run(tmp_path, name, overlap):
    CALLS.clear()
    cfg = load_config(None, [
        "model.tiny_size=test", "train.steps=2", "data.prompts_per_step=4", "rollout.group_size=4",
        "rollout.micro_batch_size=8", f"scoring.overlap={str(overlap).lower()}", f"run.output_dir={tmp_path / name}",
        "logging.progress_bar=false", "logging.sample_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
        "rewards.0.type=test_overlap:RecordingBrightness",
    ])
    GRPOTrainer(cfg).train()
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows], list(CALLS)


def test_overlap_scores_micro_batches_with_identical_numbers(tmp_path):
    seq, seq_calls = run(tmp_path, "seq", overlap=False)
    ovl, ovl_calls = run(tmp_path, "ovl", overlap=True)
    assert seq == ovl
    # sequential: one call of 16 samples per step; overlapped: two micro-batches of 8 (two whole groups each)
    assert [n for n, _ in seq_calls] == [16, 16]
    assert [n for n, _ in ovl_calls] == [8, 8, 8, 8]
    assert all(t != "MainThread" for _, t in ovl_calls)

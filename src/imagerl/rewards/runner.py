"""Scoring off the training thread, so slow (remote) rewards overlap generation.

One persistent asyncio event loop runs in a daemon thread for the whole run: async HTTP clients of remote
judges are bound to the loop they were created in, so every scoring call of the run goes through this one
loop. `submit` returns a `concurrent.futures.Future` at once; the trainer submits each rollout micro-batch
(whole groups only: group-relative rewards such as pairwise judges need every member of a group) as soon as
the policy has decoded it, and collects the futures after the rollout. Scores do not depend on timing, and the
few that depend on other groups' samples (a composite imputing an abstaining child with the batch mean) are
recomputed over the whole batch after collection (`RewardSet.rescore`), so an overlapped run produces the same
numbers as a sequential one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import torch

from ..dist import combine_detail
from ..types import RewardInput
from .base import RewardSet, ScoreTable


class ScoringRunner:
    def __init__(self, rewards: RewardSet):
        self.rewards = rewards
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="imagerl-scoring", daemon=True)
        self._thread.start()

    def submit(self, inp: RewardInput, per_sample_weights: list[dict[str, float]] | None = None) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self.rewards.score_async(inp, per_sample_weights), self.loop)

    def score(self, inp: RewardInput, per_sample_weights: list[dict[str, float]] | None = None) -> ScoreTable:
        return self.submit(inp, per_sample_weights).result()

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


def concat_tables(tables: list[ScoreTable]) -> ScoreTable:
    """Row-wise concatenation of the tables of consecutive micro-batches."""
    if len(tables) == 1:
        return tables[0]
    details: dict[str, Any] = {}
    for t in tables:
        for k, v in t.details.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                details[k] = combine_detail(k, details.get(k), v)  # counters add up; durations (*_s): the longest
            elif isinstance(v, list):
                details.setdefault(k, []).extend(v)
            elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == t.scores.shape[0]:
                prev = details.get(k)  # per-sample values: concatenated like the scores
                details[k] = v if not isinstance(prev, torch.Tensor) else torch.cat([prev, v.to(prev.device)])
            else:
                details[k] = v
    return ScoreTable(
        names=tables[0].names,
        scores=torch.cat([t.scores for t in tables], 0),
        weights=torch.cat([t.weights for t in tables], 0),
        details=details,
        group_ids=None if any(t.group_ids is None for t in tables) else torch.cat([t.group_ids for t in tables], 0),
    )


class ChunkScorer:
    """Receives `(lo, hi, images)` callbacks from a policy's rollout and submits whole groups for scoring."""

    def __init__(self, runner: ScoringRunner, prompts: list[str], metadata: list[dict], group_size: int,
                 per_sample_weights: list[dict[str, float]], source_images: list[Any] | None = None,
                 group_id_offset: int = 0):
        self.runner = runner
        self.group_id_offset = group_id_offset  # (the rollout's group ids: offset + prompt index, as rewards see them
        # without overlap)
        self.prompts, self.metadata = prompts, metadata
        self.source_images = source_images
        self.G = group_size
        self.weights = per_sample_weights
        self.n = len(prompts) * group_size  # prompts are per group here
        self.images: list[torch.Tensor | None] = [None] * self.n
        self.submitted = 0
        self.futures: list[tuple[int, int, concurrent.futures.Future]] = []

    def __call__(self, lo: int, hi: int, images: torch.Tensor) -> None:
        for i in range(lo, hi):
            self.images[i] = images[i - lo].detach().float().cpu()
        ready = self.submitted
        while ready < self.n and self.images[ready] is not None:
            ready += 1
        end = (ready // self.G) * self.G  # whole groups only
        if end > self.submitted:
            self._submit(self.submitted, end)
            self.submitted = end

    def _submit(self, lo: int, hi: int) -> None:
        rows = range(lo, hi)
        inp = RewardInput(
            images=torch.stack([self.images[i] for i in rows]),  # type: ignore[misc]
            prompts=[self.prompts[i // self.G] for i in rows],
            metadata=[self.metadata[i // self.G] for i in rows],
            group_ids=torch.tensor([self.group_id_offset + i // self.G for i in rows]),
            source_images=[self.source_images[i // self.G] for i in rows] if self.source_images else None,
        )
        self.futures.append((lo, hi, self.runner.submit(inp, self.weights[lo:hi])))

    def covers_all(self) -> bool:
        return self.submitted == self.n

    def collect(self) -> ScoreTable:
        table = concat_tables([f.result() for _, _, f in sorted(self.futures, key=lambda x: x[0])])
        return self.runner.rewards.rescore(table) if len(self.futures) > 1 else table

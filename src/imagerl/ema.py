"""An exponential moving average of the trained weights (`optim.ema_decay`), used for evaluation, `imagerl
sample` and `imagerl export`.

Flow-GRPO and DiffusionNFT evaluate an EMA of the trained weights rather than the raw ones: RL updates are
noisy, and the average is the better model to look at and to ship. Every `optim.ema_every` optimizer steps:

    ema <- d * ema + (1 - d) * w,     d = min(optim.ema_decay, (1 + k) / (10 + k))

where k counts the EMA updates before this one: the decay warms up as (1 + k) / (10 + k), the non-power warm-up of
diffusers' `EMAModel`, so the first averages are not dominated by the initial weights. Flow-GRPO's training scripts
use 0.9 every 8 steps. The average is kept in fp32 whatever the weights' dtype.

Everything is elementwise on this rank's tensors: under FSDP2 each rank averages its own shards, and the
checkpoint stores them through torch.distributed.checkpoint like the optimizer state (`ema/`), so a run resumes
with the same average under any strategy and process count.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def ema_decay(decay: float, k: int) -> float:
    """The decay of EMA update number k (0-based): warms up from 0.1 towards `decay`."""
    return min(decay, (1 + k) / (10 + k))


class WeightEMA:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float, every: int, start: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"optim.ema_decay={decay} must be in (0, 1) (0 turns the EMA off)")
        if every < 1:
            raise ValueError(f"optim.ema_every={every} must be >= 1")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay, self.every = decay, every
        self.start = start  # optimizer steps taken before the average began (a run that switched the EMA on later)
        with torch.no_grad():
            self.shadow = [p.detach().float().clone() for p in self.params]  # starts at the initial weights

    def update(self, optimizer_steps: int) -> None:
        """Call after each optimizer step with the number of steps taken so far (1, 2, ...); averages every
        `every`-th. Resume-safe: it depends on the step count only, which the LR schedule's state restores."""
        n = optimizer_steps - self.start  # steps since the average began: its warm-up counts from there
        if n <= 0 or n % self.every:
            return
        d = ema_decay(self.decay, n // self.every - 1)
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                s.lerp_(p.detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: fp32 average} (FSDP2: this rank's shards, as DTensors); load by copying into these."""
        return dict(zip(self.names, self.shadow))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights inside the model (copied into the parameters in place, so sharded and wrapped
        modules keep their structure), and the trained ones restored bit for bit afterwards."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

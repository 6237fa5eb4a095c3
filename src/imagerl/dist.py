"""The few collective helpers. Everything distributed lives here so the loop reads as single-process.

Launch with ``torchrun --nproc_per_node K -m imagerl.cli train ...`` (or the `imagerl` script under torchrun):
torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and we initialise torch.distributed ourselves (gloo on CPU, nccl on
GPU). We do not route through accelerate's launcher: on CPU it silently runs one process or drops the FSDP
plugin (see ECOSYSTEM.md section 4).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"  # where collective buffers must live: cuda for nccl, cpu for gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(backend: str = "auto", device: torch.device | None = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(local)
        tdist.init_process_group(backend=backend)
    comm = f"cuda:{local}" if tdist.get_backend() == "nccl" else "cpu"
    return DistInfo(rank=rank, world=world, local_rank=local, comm_device=comm)


def all_gather_cat(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0 (rank order)."""
    if not info.enabled:
        return x
    src = x.contiguous().to(info.comm_device)
    parts = [torch.empty_like(src) for _ in range(info.world)]
    tdist.all_gather(parts, src)
    return torch.cat(parts, 0).to(x.device)


def _all_reduce(x: torch.Tensor, info: DistInfo, op) -> torch.Tensor:
    """`op` over ranks of a copy of x, moved through the backend's device; x itself is untouched."""
    if info.enabled:
        y = x.detach().clone().to(info.comm_device)
        tdist.all_reduce(y, op=op)
        x = y.to(x.device)
    return x


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _all_reduce(x, info, tdist.ReduceOp.SUM)


def all_reduce_max(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _all_reduce(x, info, tdist.ReduceOp.MAX)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


def sum_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum gradients over ranks. Our per-unit loss weights are already global (see losses.unit_weights),
    so the sum over ranks equals the single-process gradient exactly (no division by world size)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(info.comm_device)
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off: off + n].view_as(g))
        off += n


def shutdown(info: DistInfo) -> None:
    if info.enabled and tdist.is_initialized():
        tdist.destroy_process_group()

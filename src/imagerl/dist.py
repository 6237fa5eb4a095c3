"""The few collective helpers. Everything distributed lives here so the loop reads as single-process.

Launch with ``torchrun --nproc_per_node K -m imagerl.cli train ...`` (or the `imagerl` script under torchrun):
torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and we initialise torch.distributed ourselves (gloo on CPU, nccl on
GPU). We do not route through accelerate's launcher: on CPU it silently runs one process or drops the FSDP
plugin (see ECOSYSTEM.md section 4).
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


def sum_counters(counters: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Add up named counters over the ranks; a name missing on some ranks counts 0 there (the key sets may differ,
    e.g. a failure counter only a rank that saw failures reports). Durations (names ending in `_s`, e.g. a remote
    reward's latency_s) take the maximum instead, the slowest rank's: a sum would grow with the process count."""
    out: dict[str, float] = {}
    for p in gather_objects(dict(counters), info):
        for k, v in (p or {}).items():
            out[k] = combine_detail(k, out.get(k), v)
    return out


def combine_detail(key: str, a: float | None, b: float) -> float:
    """Two parts' value of a numeric detail: a count adds up, a duration (`*_s`) is the longer one."""
    if a is None:
        return b
    return max(a, b) if key.endswith("_s") else a + b


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj` in rank order (picklable objects; on every rank)."""
    if not info.enabled:
        return [obj]
    parts: list[Any] = [None] * info.world
    tdist.all_gather_object(parts, obj)
    return parts


def barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


@contextmanager
def staging_dir(ckpt_root: Path, step: int, name: str, info: DistInfo) -> Iterator[Path]:
    """Collective: rank 0 (re)creates the staging directory of checkpoint piece `name` (a leftover of a run
    killed at this very point is cleared), every rank writes its own part inside the block, and when the block
    exits every rank has finished writing. The checkpoint writer (rank 0) then moves the directory in
    (`save_checkpoint(move_in={name: path})`), so per-rank pieces join the one atomic rename and no rank
    gathers the others' state. The name contains ".tmp-", so `checkpoint.prune` removes a killed write's."""
    path = ckpt_root / f"step_{step:06d}.tmp-{name}"
    if info.is_main:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    barrier(info)
    yield path
    barrier(info)


OPTIM_KEY = "optimizer_dcp"  # optimizer.pt: {OPTIM_KEY: process count}; the state itself is in OPTIM_DIR
OPTIM_DIR = "optimizer"  # checkpoint subdirectory in torch.distributed.checkpoint (DCP) format


@contextmanager
def _quiet_single_process_dcp() -> Iterator[None]:
    """DCP warns on every single-process save/load, even when asked for one (`no_dist=True`). And it wraps whatever
    its steps raise in its own CheckpointException, Ctrl-C and SIGTERM (imagerl's KeyboardInterrupt) included: those
    are raised as themselves, so that a stop during a checkpoint read or write is a stop (exit 130/143 with the
    "terminated" line), not a checkpoint reported damaged (with advice to delete a good one) or a traceback."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            yield
        except BaseException as e:
            for wrapped in (getattr(e, "failures", None) or {}).values() if type(e).__name__ == "CheckpointException" else ():
                inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
                if isinstance(inner, (KeyboardInterrupt, SystemExit)):
                    raise inner from None
            raise


def stage_dcp(state: dict[str, Any], ckpt_root: Path, step: int, name: str, info: DistInfo) -> dict[str, Path]:
    """Collective: every rank writes its own part of `state` (tensors, FSDP2 DTensor shards, nested dicts) with
    torch.distributed.checkpoint into a staging directory -> `move_in` for `checkpoint.save_checkpoint`, where
    it becomes `name/`. Nothing is gathered; tensors every rank holds in full are written once. DCP records
    where each shard sits in the full tensor, so `load_dcp` reads it back under any strategy and process count."""
    import torch.distributed.checkpoint as dcp

    with staging_dir(ckpt_root, step, name, info) as staging:
        with _quiet_single_process_dcp():
            dcp.save(state, checkpoint_id=staging, no_dist=not info.enabled)  # (its file writer fsyncs every file)
    return {name: staging}


def dcp_complete(path: Path) -> bool:
    """Whether `path` holds a whole DCP save (its metadata file is written last, by the coordinator)."""
    return (path / ".metadata").is_file()


def load_dcp(state: dict[str, Any], path: Path, info: DistInfo) -> None:
    """Fill the tensors of `state` in place from a directory `stage_dcp` wrote (collective when distributed):
    each rank reads the pieces of its own shards, or whole tensors."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process_dcp():
        dcp.load(state, checkpoint_id=path, no_dist=not info.enabled)


def stage_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt_root: Path, step: int,
                          info: DistInfo) -> dict[str, Path]:
    """The optimizer state, keyed by parameter name, through `stage_dcp`. Under FSDP2 each rank writes its own
    shards, so a full fine-tune's AdamW moments (twice the weights, in fp32) never sit in one process."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return stage_dcp(get_optimizer_state_dict(module, optimizer), ckpt_root, step, OPTIM_DIR, info)


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, info: DistInfo) -> None:
    """Load what `stage_optimizer_state` wrote, whatever strategy (but DeepSpeed) and process count wrote it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # the structure to fill: torch creates AdamW's state with a zero-lr step first (parameters unchanged)
    state = get_optimizer_state_dict(module, optimizer)
    load_dcp(state, ckpt / OPTIM_DIR, info)
    set_optimizer_state_dict(module, optimizer, state)


def zero_missing_grads(params: list[torch.nn.Parameter]) -> None:
    """A parameter without a gradient (no backward reached it) gets a zero one."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def sum_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum gradients over ranks. Our per-unit loss weights are already global (see losses.unit_weights),
    so the sum over ranks equals the single-process gradient exactly (no division by world size)."""
    if not info.enabled:
        return
    # A rank may have run no backward at all (every row of its slice abstained, so the loop skipped its chunks):
    # it still joins the all-reduce with zeros, or its next collective would pair with this one (a size mismatch
    # under gloo, a hang or garbage under NCCL) and it would miss the other ranks' gradients.
    zero_missing_grads(params)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(info.comm_device)
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off: off + n].view_as(g))
        off += n


def shutdown(info: DistInfo, synced: bool = False) -> None:
    """Leave the process group. `synced`: every rank got here without an error, so they leave together (a
    barrier first): a rank that tears down its gloo pairs while the other still holds them can abort at exit
    ("terminate called without an active exception", seen once on a loaded 2-core machine). After an error
    no barrier: the other ranks may never arrive, and torchrun ends them when this one exits."""
    if info.enabled and tdist.is_initialized():
        if synced:
            tdist.barrier()
        tdist.destroy_process_group()

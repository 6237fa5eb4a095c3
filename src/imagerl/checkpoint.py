"""Atomic, resumable checkpoints.

A checkpoint is a directory ``checkpoints/step_000050`` holding
    trainable.safetensors   the trained weights (LoRA adapters or full-FT parameters), whole
    optimizer/              the AdamW state in torch.distributed.checkpoint format, written by every rank
                            (FSDP2: its own shards), loadable under any strategy but DeepSpeed, any process count
    zero/rank_NNNNN.pt      instead of optimizer/ under dist.strategy=deepspeed: each rank's ZeRO partition
    ema/                    optim.ema_decay > 0: the fp32 average of the trained weights (DCP, like optimizer/)
    optimizer.pt            LR-scheduler and RNG states, and which of the two optimizer layouts the checkpoint has
    state.json              step, sampler position, config
It is written into ``step_000050.tmp-<pid>`` first, every file fsync'ed, then renamed in one `os.replace`: a
kill at any moment leaves either the previous complete checkpoint or the new complete one, never half of one.
`latest_checkpoint` only considers complete directories (a `COMPLETE` marker written last, before the rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(saved: dict[str, Any] | list[dict[str, Any]], rank: int = 0, world: int = 1) -> None:
    """Restore the global RNG states: `saved` is one `rng_state()` per rank of the run that wrote it (an older
    checkpoint: rank 0's only). A rank gets its own entry when the process count is unchanged, else rank 0's; CUDA
    states only for the devices this process sees (a resume may see fewer than the saving run did)."""
    states = saved if isinstance(saved, list) else [saved]
    state = states[rank] if len(states) == world else states[0]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 2,
    move_in: dict[str, Path] | None = None,
    rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint `step` atomically. `move_in` {name: directory}: directories written beforehand (e.g. by
    every rank: DeepSpeed's optimizer partitions) that become `name/` inside the checkpoint before it is marked
    complete, so they are part of the same atomic rename."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"step_{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    with open(tmp / "trainable.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    with open(tmp / "optimizer.pt", "wb") as f:
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng or [rng_state()]}, f)
        f.flush()
        os.fsync(f.fileno())
    _write_bytes(tmp / "state.json", json.dumps({"step": step, **state}, indent=1, default=str).encode())
    for name, src in (move_in or {}).items():
        os.replace(src, tmp / name)
    _write_bytes(tmp / MARKER, b"ok\n")
    _fsync_dir(tmp)
    if final.exists():  # same step written again (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    prune(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete checkpoints `step_NNNNNN` in step order. Only that exact name counts: a user's copy such as
    step_000004.bak or step_000002_keep is neither resumed from nor pruned by keep_last."""
    if not ckpt_root.exists():
        return []
    out = [p for p in ckpt_root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name) and (p / MARKER).exists()]
    return sorted(out, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    cks = list_checkpoints(ckpt_root)
    return cks[-1] if cks else None


def prune(ckpt_root: Path, keep_last: int) -> None:
    if keep_last > 0:
        # renamed first (one atomic step) and then deleted with the leftovers: a kill in the middle of deleting a
        # checkpoint in place could remove its marker first (it is then invisible, to resume and to this cleanup
        # alike, and stays forever) or last (a complete-looking checkpoint with half its files)
        for p in list_checkpoints(ckpt_root)[:-keep_last]:
            with contextlib.suppress(OSError):
                os.replace(p, p.with_name(p.name + ".tmp-prune"))
    for p in ckpt_root.iterdir():  # leftovers of killed writes (and of partition staging, see `move_in`)
        if ".tmp-" in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


class CheckpointError(ValueError):
    """A checkpoint that is complete (it has its marker) but cannot be read back."""


@contextlib.contextmanager
def reading(part: Path, ckpt: Path) -> Iterator[None]:
    """Whatever reading `part` of checkpoint `ckpt` raises (missing, truncated, garbled; DCP's CheckpointException is
    a BaseException) becomes a CheckpointError naming the file and the way out. Checkpoints are written atomically,
    so this is damage after the fact (disk, a copy, a hand edit)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001
        lines = [x for x in str(e).splitlines() if x.strip()] or [""]
        why = lines[-1].strip()[:300]  # (DCP's message is the ranks' tracebacks: their last line is the error)
        raise CheckpointError(f"{part} cannot be read ({type(e).__name__}: {why}); the checkpoint is damaged: "
                              f"remove {ckpt} to resume from the checkpoint before it") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    readers = {
        "trainable.safetensors": lambda f: load_file(str(f)),
        "optimizer.pt": lambda f: torch.load(f, map_location="cpu", weights_only=False),
        "state.json": lambda f: json.loads(f.read_text()),
    }
    parts: dict[str, Any] = {}
    for name, read in readers.items():
        with reading(path / name, path):
            parts[name] = read(path / name)
            if name == "state.json":  # (valid JSON of another shape failed later as a KeyError / AttributeError)
                st = parts[name]
                if not (isinstance(st, dict) and isinstance(st.get("step"), int) and isinstance(st.get("sampler"), dict)):
                    raise ValueError("not a checkpoint state (a JSON object with an integer 'step' and a 'sampler' object)")
            elif name == "optimizer.pt" and not isinstance(parts[name], dict):
                raise ValueError("not a checkpoint's optimizer file (a dict)")
    return {"trainable": parts["trainable.safetensors"], **parts["optimizer.pt"], "state": parts["state.json"]}


# --------------------------------------------------------------------------------------------------
# One writer per run directory
# --------------------------------------------------------------------------------------------------

LOCK_FILE = ".imagerl.lock"
_HELD: dict[str, list[Any]] = {}  # resolved run dir -> [open lock file, holders in this process]


class RunDirInUse(RuntimeError):
    pass


def lock_run_dir(out: Path) -> str:
    """Claim `out` for this process: a second `imagerl train` on the same run.output_dir would interleave its
    checkpoints and truncate the first one's metrics.jsonl. An advisory `flock` on `out/.imagerl.lock`: the
    kernel drops it when the process ends, however it ends (kill -9 included), so a crashed run never leaves
    a stale lock behind. Re-entrant within one process (several trainers on one directory, one after the other,
    as tests and notebooks do); returns the key for `unlock_run_dir`. Where `fcntl` does not exist (Windows), no
    lock is taken."""
    key = str(out.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return ""
    f = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise RunDirInUse(
            f"run.output_dir={out} is in use by another imagerl run ({who}): wait for it or stop it, or give "
            "another run.output_dir"
        ) from None
    except OSError as e:  # a filesystem without flock (some network mounts: ENOLCK): train unguarded, and say so
        f.close()
        warnings.warn(f"run.output_dir={out}: cannot lock it ({e.strerror or e}); a second run started on this "
                      "directory would not be refused", stacklevel=2)
        return ""
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD[key] = [f, 1]
    return key


def run_dir_lock_holders(key: str) -> int:
    """How many trainers of this process hold the lock `key` (0 once released)."""
    return _HELD[key][1] if key in _HELD else 0


def unlock_run_dir(key: str) -> None:
    if key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
        _HELD.pop(key)[0].close()  # (closing the file releases the flock)


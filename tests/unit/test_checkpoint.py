"""Checkpoints are atomic (a killed write never leaves a loadable half) and prune to keep_last."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from imagerl.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _save(root, step, keep=2):
    return save_checkpoint(root, step, {"w": torch.full((3,), float(step))}, {"s": step}, {"last_epoch": step},
                           {"sampler": {"draws": step}}, keep_last=keep)


def test_roundtrip_and_keep_last(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck["state"]["step"] == 3 and ck["state"]["sampler"] == {"draws": 3}
    assert torch.equal(ck["trainable"]["w"], torch.full((3,), 3.0))
    assert ck["optimizer"] == {"s": 3} and ck["scheduler"] == {"last_epoch": 3}
    assert len(ck["rng"]) == 1 and {"python", "numpy", "torch"} <= set(ck["rng"][0])
    # a user's copies of a checkpoint are neither resumed from nor pruned by keep_last
    import shutil

    shutil.copytree(tmp_path / "step_000003", tmp_path / "step_000003.bak")
    shutil.copytree(tmp_path / "step_000002", tmp_path / "step_000002_keep")
    _save(tmp_path, 4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert (tmp_path / "step_000003.bak").is_dir() and (tmp_path / "step_000002_keep").is_dir()


def test_pruning_is_atomic_per_checkpoint(tmp_path, monkeypatch):
    # a kill while an old checkpoint is deleted: it must not stay behind forever (marker gone first: invisible to
    # resume and cleanup) nor look complete with files missing (marker last). Pruning renames it away in one step.
    import shutil

    from imagerl import checkpoint as ck

    for s in (1, 2):
        _save(tmp_path, s)
    real = shutil.rmtree

    def killed(path, *a, **kw):  # the process dies on its first deletion, after removing the marker only
        (Path(path) / "COMPLETE").unlink(missing_ok=True)
        raise SystemExit("killed")

    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        _save(tmp_path, 3)
    monkeypatch.setattr(ck.shutil, "rmtree", real)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    _save(tmp_path, 4)  # the next save's cleanup removes what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_stop_inside_a_dcp_read_or_write_is_a_stop_not_damage(tmp_path, monkeypatch, stop):
    # DCP wraps whatever its steps raise, Ctrl-C / SIGTERM included, in its CheckpointException: a stop during a resume
    # was reported as a damaged checkpoint (with advice to delete a good one), and during a save as a traceback
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from imagerl import dist
    from imagerl.checkpoint import reading

    info = dist.DistInfo()
    state = {"m": torch.ones(3)}
    staged = dist.stage_dcp(state, tmp_path, 1, "opt", info)["opt"]

    def interrupted(*a, **kw):
        raise stop()

    with monkeypatch.context() as m:
        m.setattr(FileSystemWriter, "write_data", interrupted)
        with pytest.raises(stop):
            dist.stage_dcp(state, tmp_path, 2, "opt", info)
    with monkeypatch.context() as m:
        m.setattr(FileSystemReader, "read_data", interrupted)
        with pytest.raises(stop), reading(staged, tmp_path):
            dist.load_dcp({"m": torch.zeros(3)}, staged, info)
    got = {"m": torch.zeros(3)}
    dist.load_dcp(got, staged, info)  # (and unpatched, the same call reads it)
    assert torch.equal(got["m"], torch.ones(3))


def test_each_rank_gets_its_own_rng_state_back():
    from imagerl.checkpoint import rng_state, set_rng_state

    states = []
    for seed in (1, 2):  # what two ranks' global RNGs were at the save
        torch.manual_seed(seed)
        states.append(rng_state())
    for rank, seed in ((0, 1), (1, 2)):
        torch.manual_seed(seed)
        want = torch.rand(3)
        torch.manual_seed(99)
        set_rng_state(states, rank, world=2)
        assert torch.equal(torch.rand(3), want)
    torch.manual_seed(1)
    want = torch.rand(3)
    set_rng_state(states, 1, world=3)  # another process count: rank 0's states
    assert torch.equal(torch.rand(3), want)


def test_killed_write_is_ignored(tmp_path):
    _save(tmp_path, 1)
    # A writer killed mid-checkpoint: SIGKILL after the tmp directory holds the weights but before the rename.
    code = textwrap.dedent(f"""
        import os, signal, torch, imagerl.checkpoint as c
        real = c._write_bytes
        def die(path, data):
            if path.name == "state.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        c._write_bytes = die
        c.save_checkpoint(__import__('pathlib').Path({str(tmp_path)!r}), 2, {{"w": torch.zeros(3)}}, {{}}, {{}}, {{}})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -9
    assert any(".tmp-" in p for p in os.listdir(tmp_path))  # the half-written directory exists ...
    assert latest_checkpoint(tmp_path).name == "step_000001"  # ... but is never taken as a checkpoint
    _save(tmp_path, 3)
    assert not any(".tmp-" in p for p in os.listdir(tmp_path))  # and is cleaned up by the next save


def test_moved_in_directory_is_part_of_the_atomic_checkpoint(tmp_path):
    # DeepSpeed: every rank writes its optimizer partition into a staging directory named like a killed write
    # (so a leftover is pruned), and rank 0 moves it into the checkpoint before marking it complete.
    staging = tmp_path / "step_000002.tmp-zero"
    staging.mkdir()
    for r in range(2):
        torch.save({"rank": r}, staging / f"rank_{r:05d}.pt")
    ck = save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {"zero_partitions": 2}, {}, {}, move_in={"zero": staging})
    assert not staging.exists() and latest_checkpoint(tmp_path) == ck
    assert sorted(os.listdir(ck / "zero")) == ["rank_00000.pt", "rank_00001.pt"]
    assert torch.load(ck / "zero" / "rank_00001.pt") == {"rank": 1}
    leftover = tmp_path / "step_000004.tmp-zero"  # a run killed while ranks were writing partitions
    leftover.mkdir()
    _save(tmp_path, 3)
    assert not leftover.exists()


def test_one_writer_per_run_dir(tmp_path):
    """A second process training into the same run.output_dir is refused (it would interleave checkpoints and
    truncate the first run's metrics.jsonl) and told who holds it; the lock goes with its process (killed too),
    and one process may open the directory again (trainers one after another)."""
    import signal

    from imagerl.checkpoint import RunDirInUse, lock_run_dir, unlock_run_dir
    from imagerl.config import load_config
    from imagerl.recipes.grpo import GRPOTrainer, TrainingError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from imagerl.checkpoint import lock_run_dir; "
         f"lock_run_dir(Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=rf"run.output_dir={tmp_path} is in use by another imagerl run \(pid {holder.pid} on "):
            lock_run_dir(tmp_path)
        cfg = load_config(None, ["model.tiny_size=test", f"run.output_dir={tmp_path}"])
        with pytest.raises(TrainingError, match="is in use by another imagerl run"):
            GRPOTrainer(cfg)
        assert not (tmp_path / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    a = lock_run_dir(tmp_path)  # the kernel dropped the dead process's lock
    b = lock_run_dir(tmp_path)  # re-entrant in one process
    unlock_run_dir(b)
    unlock_run_dir(a)


def test_filesystem_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    from imagerl.checkpoint import lock_run_dir

    def fake_nfs_without_locks(*a):  # (a fake: a filesystem without locks cannot be had here)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", fake_nfs_without_locks)
    with pytest.warns(UserWarning, match=r"cannot lock it \(No locks available\); a second run"):
        assert lock_run_dir(tmp_path) == ""

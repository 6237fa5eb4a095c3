"""A run killed with SIGKILL (no clean shutdown) and started again with the same command reproduces the
numbers of an uninterrupted run: atomic checkpoints + per-step seeding + metrics.jsonl truncation."""

import json
import os
import signal
import subprocess
import sys
import time

ARGS = ["model.tiny_size=test", "train.steps=8", "checkpoint.every=2", "data.prompts_per_step=2",
        "rollout.group_size=4", "logging.progress_bar=false", "logging.sample_every=0", "run.threads=1"]


def metrics(path):
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def train(out, wait=True):
    cmd = [sys.executable, "-m", "imagerl.cli", "train", *ARGS, f"run.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return None
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    train(tmp_path / "a")
    proc = train(tmp_path / "b", wait=False)
    marker = tmp_path / "b" / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, "training exited before the first checkpoint"
        assert time.time() < deadline, "no checkpoint within the time limit"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    done = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if l.strip().endswith("}")]
    assert max(done) < 8, "the run finished before it was killed: nothing was tested"
    train(tmp_path / "b")  # the same command again resumes from the last complete checkpoint
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")

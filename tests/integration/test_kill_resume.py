"""A run killed with SIGKILL (no clean shutdown) or stopped with Ctrl-C, and started again with the same command,
reproduces the numbers of an uninterrupted run: atomic checkpoints + per-step seeding + metrics.jsonl truncation."""

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
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def interrupt_after_first_checkpoint(out, sig):
    proc = train(out, wait=False)
    marker = out / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, "training exited before the first checkpoint"
        assert time.time() < deadline, "no checkpoint within the time limit"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    done = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip().endswith("}")]
    assert max(done) < 8, "the run finished before it was stopped: nothing was tested"
    return proc.returncode, err


def test_sigkill_or_ctrl_c_then_rerun_equals_uninterrupted(tmp_path):
    train(tmp_path / "a")
    rc, _ = interrupt_after_first_checkpoint(tmp_path / "b", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    train(tmp_path / "b")  # the same command again resumes from the last complete checkpoint
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")
    # Ctrl-C: exit status 130 and one line saying what is kept, no traceback; then the same resume
    rc, err = interrupt_after_first_checkpoint(tmp_path / "c", signal.SIGINT)
    assert rc == 130 and "Traceback" not in err, err[-2000:]
    assert f"imagerl: interrupted; the last checkpoint is {tmp_path / 'c'}/checkpoints/step_0000" in err
    assert "run the same command to resume from it" in err
    train(tmp_path / "c")
    assert metrics(tmp_path / "c") == metrics(tmp_path / "a")
    # SIGTERM (kill, timeout, Slurm, Kubernetes) is stopped like Ctrl-C: the backends flush, the curve is drawn
    rc, err = interrupt_after_first_checkpoint(tmp_path / "d", signal.SIGTERM)
    assert rc == 143 and "Traceback" not in err, err[-2000:]
    assert "imagerl: terminated (SIGTERM); the last checkpoint is" in err and (tmp_path / "d" / "reward_curve.png").is_file()

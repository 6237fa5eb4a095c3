"""RunLogger: metrics.jsonl (content, NaN, resume), sample grids, reward curve, console, backends."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from imagerl.config import Config, ConfigError
from imagerl.logging import (
    BackendNotInstalledError,
    RunLogger,
    format_duration,
    grid_layout,
    make_sample_grid,
    plot_reward_curve,
    read_metrics,
    reward_names,
    summarize,
    tile_scale,
)


def make_cfg(**logging_kw) -> Config:
    cfg = Config()
    cfg.run.name = "test-run"
    for k, v in logging_kw.items():
        setattr(cfg.logging, k, v)
    return cfg


def fake_metrics(step: int) -> dict[str, float]:
    return {"reward/mean": 0.1 * step, "reward/std": 0.05, "reward/ocr/mean": 0.2 * step, "loss": 1.0 / step,
            "kl": 1e-3 * step, "time/step": 0.5}


def run_steps(logger: RunLogger, steps: range) -> None:
    for s in steps:
        logger.log_step(s, fake_metrics(s))


# --------------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------------


def test_metrics_jsonl_one_flushed_line_per_step(tmp_path):
    lg = RunLogger(make_cfg(), tmp_path, total_steps=3, stream=io.StringIO())
    lg.log_step(1, {"reward/mean": 0.25, "loss": torch.tensor(0.5), "n": 3})
    # flushed while the logger is still open (a crash after this line keeps it)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs == [{"step": 1, "reward/mean": 0.25, "loss": 0.5, "n": 3}]
    lg.log_step(2, {"reward/mean": 0.5, "step": 999})  # the explicit step wins over a "step" metric
    out = lg.finish()
    assert out["metrics"] == tmp_path / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(out["metrics"])] == [1, 2]
    with pytest.raises(RuntimeError, match="after finish"):
        lg.log_step(3, {})


def test_nan_and_inf_written_as_null_and_read_back_as_nan(tmp_path):
    lg = RunLogger(make_cfg(), tmp_path, total_steps=1, stream=io.StringIO())
    lg.log_step(1, {"reward/mean": float("nan"), "kl": float("inf"), "loss": -float("inf"), "lr": 1e-5})
    lg.finish()
    line = (tmp_path / "metrics.jsonl").read_text().strip()

    def reject(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    rec = json.loads(line, parse_constant=reject)  # strict JSON: no NaN/Infinity tokens
    assert rec == {"step": 1, "reward/mean": None, "kl": None, "loss": None, "lr": 1e-5}
    back = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert math.isnan(back["reward/mean"]) and math.isnan(back["kl"]) and back["lr"] == 1e-5


def test_resume_truncates_to_start_step_and_matches_uninterrupted(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    lg = RunLogger(make_cfg(), full, total_steps=6, stream=io.StringIO())
    run_steps(lg, range(1, 7))
    lg.finish()

    # A run that crashed after step 5 with its last checkpoint at step 3, and a torn line at the end.
    lg = RunLogger(make_cfg(), resumed, total_steps=6, stream=io.StringIO())
    run_steps(lg, range(1, 6))
    lg.finish()
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')
    lg = RunLogger(make_cfg(), resumed, total_steps=6, start_step=3, stream=io.StringIO())
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3]
    run_steps(lg, range(4, 7))
    out = lg.finish()
    assert (resumed / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert out["reward_curve"].exists()


def test_backends_close_when_the_metrics_file_cannot_be_opened(tmp_path, monkeypatch):
    from imagerl.logging import _TensorBoard

    closed = []
    monkeypatch.setattr(_TensorBoard, "_close", lambda self: closed.append(self.writer.close()))
    (tmp_path / "metrics.jsonl").mkdir()  # (a directory where the file should be)
    with pytest.raises(IsADirectoryError):
        RunLogger(make_cfg(tensorboard=True), tmp_path, total_steps=3, stream=io.StringIO())
    assert closed == [None]


def test_resume_removes_the_sample_grids_of_steps_after_the_checkpoint(tmp_path):
    # a run killed at step 5 drew grids at 2 and 4 (sample_every 2); resumed from step 3 with sample_every 3 it
    # draws 6 only: the grid of step 4 belongs to the lost steps and must not stay beside the new ones
    (tmp_path / "samples").mkdir()
    for s in (2, 4):
        (tmp_path / "samples" / f"step_{s:06d}.png").write_bytes(b"x")
    (tmp_path / "samples" / "step_final_best.png").write_bytes(b"x")  # (not a grid of ours: left alone)
    lg = RunLogger(make_cfg(), tmp_path, total_steps=6, start_step=3, stream=io.StringIO())
    lg.sync()  # (fsyncs metrics.jsonl before a checkpoint; must work on the open file)
    lg.finish()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000002.png", "step_final_best.png"]


def test_fresh_run_in_used_directory_starts_a_new_file(tmp_path):
    lg = RunLogger(make_cfg(), tmp_path, total_steps=3, stream=io.StringIO())
    run_steps(lg, range(1, 4))
    lg.finish()
    lg = RunLogger(make_cfg(), tmp_path, total_steps=3, start_step=0, stream=io.StringIO())
    lg.log_step(1, {"reward/mean": 9.0})
    lg.finish()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/mean": 9.0}]


def test_read_metrics_names_a_corrupt_middle_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(p)


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def test_summarize_compact_line():
    line = summarize({"step": 12, "reward/mean": 0.5321, "reward/std": 0.12, "reward/ocr/mean": 0.41,
                      "reward/clip/mean": 0.62, "reward/abstain": 0.125, "loss": float("nan"), "kl": 4e-4,
                      "clip_frac": 0.031, "time/step": 1.5, "ratio/max": 3.0}, total_steps=100)
    assert line.startswith("step 12/100 | reward 0.5321±0.12 (ocr 0.41, clip 0.62)")
    assert "abstain 12%" in line and "loss n/a" in line and "kl 4.00e-04" in line
    assert "clip 3.1%" in line and "s/step" not in line  # (the logger adds the wall-clock speed)
    assert "ratio" not in line  # unknown keys stay in metrics.jsonl only
    assert summarize({}) == ""
    assert reward_names(["reward/mean", "reward/std", "reward/abstain", "reward/ocr/mean", "reward/ocr/std",
                         "reward/clip"]) == ["ocr", "clip"]
    assert [format_duration(s) for s in (5, 133, 3720, None)] == ["5s", "2m13s", "1h02m", "?"]


def test_grid_layout_and_tile_scale():
    assert grid_layout(n_groups=4, group_size=8, max_images=16) == (2, 8)
    assert grid_layout(n_groups=8, group_size=4, max_images=16) == (4, 4)
    assert grid_layout(n_groups=2, group_size=4, max_images=16) == (2, 4)
    assert grid_layout(n_groups=3, group_size=16, max_images=4) == (1, 4)
    assert tile_scale(16, 16, 96, 512) == (96, 96)  # x6, nearest neighbour
    assert tile_scale(10, 20, 96, 512) == (100, 200)  # integer factor 10 on the short side
    assert tile_scale(128, 128, 96, 512) == (128, 128)
    assert tile_scale(1024, 512, 96, 512) == (512, 256)  # big samples are shrunk


# --------------------------------------------------------------------------------------------------
# Sample grid
# --------------------------------------------------------------------------------------------------

PAD, FRAME = 6, 2  # the grid's spacing constants


def solid_images(n: int, h: int, w: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """n images, each one distinct solid colour (so a tile can be found in the grid by colour)."""
    colors = [(10 + 20 * i, 255 - 20 * i, (70 * i) % 256) for i in range(n)]
    imgs = torch.stack([torch.tensor(c, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, h, w) for c in colors])
    return imgs, colors


def find_box(grid: Image.Image, color: tuple[int, int, int]) -> tuple[int, int, int, int] | None:
    mask = Image.eval(grid.convert("RGB"), lambda v: v)  # copy
    px = mask.load()
    xs, ys = [], []
    for y in range(grid.height):
        for x in range(grid.width):
            if px[x, y] == color:
                xs.append(x)
                ys.append(y)
    if not xs:
        return None
    return min(xs), min(ys), max(xs) + 1, max(ys) + 1


@pytest.mark.parametrize("n,g,hw,max_images,rows,cols,tile", [
    (8, 4, 16, 16, 2, 4, 96),   # 2 prompts x 4 samples, 16 px upscaled x6
    (16, 8, 8, 4, 1, 4, 96),    # a group cut to 4 columns, 8 px upscaled x12
    (6, 2, 40, 16, 3, 2, 120),  # 40 px -> x3
])
def test_sample_grid_size_and_tiles(tmp_path, n, g, hw, max_images, rows, cols, tile):
    imgs, colors = solid_images(n, hw, hw)
    rewards = torch.arange(n, dtype=torch.float32) / n  # within each group, the last sample is best
    gids = torch.arange(n) // g
    prompts = [f"prompt number {int(i)}" for i in gids]
    lg = RunLogger(make_cfg(samples_per_grid=max_images), tmp_path, total_steps=10, stream=io.StringIO())
    path = lg.log_samples(7, imgs, prompts, rewards, gids)
    lg.finish()
    assert path == tmp_path / "samples" / "step_000007.png" and path.exists()
    grid = Image.open(path)
    tiles_w = PAD + cols * (tile + 2 * FRAME + PAD)
    assert grid.width == tiles_w or (cols == 2 and tiles_w < grid.width < tiles_w + 100)  # (2 tiles: the title's width)
    assert rows * (tile + 2 * FRAME) < grid.height < rows * (tile + 2 * FRAME + 80) + 40

    # Row 0 holds group 0, best first; a cut group shows its best and its worst sample.
    members = list(range(g))[::-1]  # best-first
    if cols < g:
        members = [members[round(j * (g - 1) / (cols - 1))] for j in range(cols)]
    boxes = [find_box(grid, colors[i]) for i in members]
    assert all(b is not None for b in boxes)
    for b in boxes:
        assert (b[2] - b[0], b[3] - b[1]) == (tile, tile)  # whole tile, nearest-neighbour (no blur)
    assert [b[0] for b in boxes] == sorted(b[0] for b in boxes)  # left to right = best to worst
    shown_rows = {int(gids[i]) for i in range(n) if find_box(grid, colors[i]) is not None}
    assert shown_rows == set(range(rows))


def test_sample_grid_marks_advantage_sign_and_abstain():
    imgs, colors = solid_images(4, 8, 8)
    rewards = torch.tensor([0.9, 0.1, float("nan"), 0.5])
    grid = make_sample_grid(imgs, ["p"] * 4, rewards, None, max_images=16, min_tile=32)
    px = grid.convert("RGB").load()

    def frame_color(i):
        x0, y0, _, _ = find_box(grid, colors[i])
        return px[x0 - 1, y0 - 1]

    assert frame_color(0) == (46, 160, 67)  # above the group mean (0.5): green
    assert frame_color(1) == (207, 34, 46)  # below: red
    assert frame_color(2) == (175, 175, 175)  # abstained (NaN): grey, shown last
    assert find_box(grid, colors[2])[0] > find_box(grid, colors[1])[0]


def test_sample_grid_accepts_one_prompt_per_group_and_rejects_bad_input():
    imgs, _ = solid_images(4, 8, 8)
    gids = torch.tensor([0, 0, 1, 1])
    assert make_sample_grid(imgs, ["a", "b"], torch.zeros(4), gids).width > 0
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        make_sample_grid(imgs[:, :2], ["a"] * 4, torch.zeros(4))
    with pytest.raises(ValueError, match="one reward per image"):
        make_sample_grid(imgs, ["a"] * 4, torch.zeros(3))
    with pytest.raises(ValueError, match="prompts"):
        make_sample_grid(imgs, ["a"] * 3, torch.zeros(4), gids)


# --------------------------------------------------------------------------------------------------
# Reward curve
# --------------------------------------------------------------------------------------------------


def test_reward_curve_from_metrics_file(tmp_path):
    p = tmp_path / "metrics.jsonl"
    with open(p, "w") as f:
        for s in range(1, 41):
            rec = {"step": s, "reward/mean": None if s == 7 else 0.02 * s, "reward/std": 0.1,
                   "reward/ocr/mean": 0.01 * s, "reward/clip/mean": 0.5, "loss": 0.1, "kl": 1e-3}
            f.write(json.dumps(rec) + "\n")
    out = plot_reward_curve(read_metrics(p), tmp_path / "curve.png", title="t")
    im = Image.open(out)
    assert im.format == "PNG" and im.size == (990, 715)  # 9 x 6.5 in at 110 dpi: two panels
    assert len(set(im.convert("RGB").getdata())) > 50  # something was drawn
    # No loss/kl: a single, shorter panel; no rewards at all still gives a picture.
    assert Image.open(plot_reward_curve([{"step": 1, "reward/mean": 0.3}], tmp_path / "a.png")).size == (990, 462)
    assert Image.open(plot_reward_curve([], tmp_path / "b.png")).size == (990, 462)


def test_reward_curve_content():
    """What the figure shows: the moving average over a tenth of the run (the NaN step skipped), one legend entry
    per line drawn, the individual rewards in colours other than the loss's and kl's, a title with the last moving
    average, kl on its own axis, integer steps."""
    from matplotlib.colors import to_hex

    from imagerl.logging import reward_curve_figure

    recs = [{"step": s, "reward/mean": float("nan") if s == 7 else 0.02 * s, "reward/std": 0.1,
             "reward/ocr/mean": 0.01 * s, "reward/clip/mean": 0.5, "reward/hps/mean": 0.3, "loss": 0.1, "kl": 1e-3}
            for s in range(1, 41)]
    fig = reward_curve_figure(recs, title="t")
    ax, ax2 = fig.axes[0], fig.axes[1]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["reward/mean", "±std within batch", "reward/mean (moving avg, 4 steps)", "reward/ocr/mean (moving avg)",
                      "reward/clip/mean (moving avg)", "reward/hps/mean (moving avg)"]
    ma = next(ln for ln in ax.get_lines() if ln.get_label().startswith("reward/mean (moving"))
    y = list(ma.get_ydata())
    assert y[7] == pytest.approx(0.02 * (4 + 5 + 6 + 8) / 4)  # step 8: the last 4 finite steps (7 is NaN)
    assert y[-1] == pytest.approx(0.02 * (37 + 38 + 39 + 40) / 4)
    assert ax.get_title() == f"t: 40 steps, reward/mean {0.02 * 38.5:.4g} (last, moving avg)"
    loss_kl = {to_hex(ln.get_color()) for a in fig.axes[1:] for ln in a.get_lines()}
    rewards = {to_hex(ln.get_color()) for ln in ax.get_lines() if "/mean (moving avg)" in ln.get_label()
               and not ln.get_label().startswith("reward/mean")}
    assert len(rewards) == 3 and not rewards & loss_kl
    assert len(fig.axes) == 3 and fig.axes[2].get_ylabel() == "kl" and ax2.get_ylabel() == "loss"  # (twin axis)
    assert all(float(t).is_integer() for t in ax.get_xticks())


# --------------------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------------------


def test_plain_lines_every_log_every_when_not_a_tty(tmp_path):
    buf = io.StringIO()
    lg = RunLogger(make_cfg(log_every=2), tmp_path, total_steps=5, stream=buf)
    run_steps(lg, range(1, 6))
    lg.print("hello [rank0]")
    lg.finish()
    lines = buf.getvalue().splitlines()
    assert [l.split(" |")[0] for l in lines[:3]] == ["step 2/5", "step 4/5", "step 5/5"]  # + always the last
    assert "reward 0.4±0.05" in lines[1] and "eta" in lines[1] and lines[1].count("s/step") == 1
    assert "0.50 s/step" not in lines[1]  # the wall clock between steps, not the metrics' time/step (0.5 here)
    assert lines[3] == "hello [rank0]"  # markup is not interpreted
    assert "\x1b[" not in buf.getvalue()  # no control characters in a log file


def test_console_off_prints_no_step_lines(tmp_path):
    buf = io.StringIO()
    lg = RunLogger(make_cfg(console=False), tmp_path, total_steps=2, stream=buf)
    run_steps(lg, range(1, 3))
    lg.finish()
    assert buf.getvalue() == ""


def test_progress_bar_on_a_terminal(tmp_path):
    buf = io.StringIO()
    lg = RunLogger(make_cfg(), tmp_path, total_steps=4, start_step=1, stream=buf, tty=True)
    run_steps(lg, range(2, 5))
    lg.finish()
    text = buf.getvalue()
    assert "4/4" in text and "test-run" in text and "eta" in text and "s/step" in text
    assert "reward 0.4" in text and "step 2/4 |" not in text  # the bar replaces the plain lines


# --------------------------------------------------------------------------------------------------
# Distributed and backends
# --------------------------------------------------------------------------------------------------


def test_non_main_rank_is_a_null_logger(tmp_path):
    out = tmp_path / "run"
    buf = io.StringIO()
    lg = RunLogger(make_cfg(tensorboard=True), out, total_steps=3, is_main=False, stream=buf)
    lg.log_step(1, {"reward/mean": 1.0})
    assert lg.log_samples(1, torch.rand(2, 3, 4, 4), ["a", "a"], torch.zeros(2)) is None
    lg.print("x")
    assert lg.finish() == {}
    assert not out.exists() and buf.getvalue() == ""


def test_tensorboard_writes_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lg = RunLogger(make_cfg(tensorboard=True), tmp_path, total_steps=3, stream=io.StringIO())
    for s in range(1, 4):
        lg.log_step(s, {"reward/mean": 0.1 * s, "kl": float("nan")})
    lg.log_samples(3, torch.rand(4, 3, 8, 8), ["a", "a", "b", "b"], torch.rand(4))
    lg.finish()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("reward/mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert "kl" not in acc.Tags()["scalars"]  # NaN is not sent (it is null in metrics.jsonl)
    assert acc.Tags()["images"] == ["samples"]


def test_tensorboard_resume_replaces_the_redone_steps(tmp_path):
    # killed after step 5 with a checkpoint at 3: the resumed run redoes 4 and 5, which must replace (purge) the
    # first run's 4 and 5 in TensorBoard, not stand beside them
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lg = RunLogger(make_cfg(tensorboard=True), tmp_path, total_steps=6, stream=io.StringIO())
    for s in range(1, 6):
        lg.log_step(s, {"reward/mean": 0.1 * s})
    lg.finish()
    lg = RunLogger(make_cfg(tensorboard=True), tmp_path, total_steps=6, start_step=3, stream=io.StringIO())
    for s in range(4, 7):
        lg.log_step(s, {"reward/mean": 1.0 + s})
    lg.finish()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    got = [(e.step, round(e.value, 6)) for e in acc.Scalars("reward/mean")]
    assert got == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 5.0), (5, 6.0), (6, 7.0)]


def test_failing_backend_warns_once_and_training_goes_on(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    lg = RunLogger(make_cfg(tensorboard=True), tmp_path, total_steps=3, stream=io.StringIO())
    tb = lg._backends[0]

    def fake_disk_full(*a, **k):  # (a fake: a full disk under tb/ cannot be had here)
        raise OSError("disk full")

    tb.writer.add_scalar = fake_disk_full
    with caplog.at_level("WARNING", logger="imagerl"):
        run_steps(lg, range(1, 4))
        out = lg.finish()
    warnings = [r for r in caplog.records if "tensorboard log failed" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
    assert tb.failures == 3
    assert len(read_metrics(out["metrics"])) == 3  # the required file is complete


@pytest.mark.parametrize("key,package", [("wandb", "wandb"), ("swanlab", "swanlab")])
def test_missing_optional_backend_fails_at_construction_with_the_fix(tmp_path, key, package, monkeypatch):
    # (a None entry in sys.modules makes `import package` fail as if it were not installed, so this runs
    # next to the installed-backend test below)
    monkeypatch.setitem(sys.modules, package, None)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(BackendNotInstalledError) as ei:
        RunLogger(make_cfg(**{key: True}), tmp_path, total_steps=3, stream=io.StringIO())
    msg = str(ei.value)
    assert f"logging.{key}=true" in msg and f"pip install {package}" in msg and "imagerl[logging]" in msg
    assert isinstance(ei.value, ConfigError) and isinstance(ei.value, ImportError)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'  # a previous run's file is untouched


def _leveldb_log_records(path) -> list[bytes]:
    """The records of a LevelDB-log-format file (W&B's .wandb and SwanLab's .swanlab offline files both are one: a
    7-byte file header, then 32 KiB blocks of chunks, each a 7-byte header crc32 / length / type and its bytes;
    type 1 is a whole record, 2/3/4 its first/middle/last part; github.com/google/leveldb doc/log_format.md)."""
    import struct

    data, pos, out, part = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # (a block's last bytes too short for a header are padding)
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            out.append(part)
            part = b""
    return out


def backend_scalars(run_dir, package: str) -> dict[int, dict[str, float]]:
    """{step: {key: value}} as the backend stored it offline (what `wandb sync` / `swanlab sync` would upload),
    read with the backend's own protobuf messages (the versions pinned in requirements-logging.txt)."""
    out: dict[int, dict[str, float]] = {}
    if package == "wandb":
        from wandb.proto.wandb_internal_pb2 import Record

        for f in sorted(run_dir.glob("wandb/*/*.wandb")):
            for raw in _leveldb_log_records(f):
                r = Record()
                r.ParseFromString(raw)
                if r.WhichOneof("record_type") == "history":
                    # (a key is `key`, or `nested_key` in files wandb-core writes; an image's fields are nested under it)
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
                             if i.key or len(i.nested_key) == 1 or i.nested_key[-1] == "_type"}
                    out.setdefault(int(items.pop("_step")), {}).update(
                        {k: v for k, v in items.items() if not k.startswith("_") and not k.endswith("/_type")})
                    out[int(r.history.step.num)].update({k[:-6]: v for k, v in items.items() if k.endswith("/_type")})
    else:
        from swanlab.proto.swanlab.record.v1.record_pb2 import Record

        for f in sorted(run_dir.glob("swanlab/*/*.swanlab")):
            for raw in _leveldb_log_records(f):
                r = Record()
                r.ParseFromString(raw)
                if r.WhichOneof("record_type") == "scalar":
                    out.setdefault(int(r.scalar.step), {})[r.scalar.key] = r.scalar.value.number
                elif r.WhichOneof("record_type") == "media":
                    out.setdefault(int(r.media.step), {})[r.media.key] = "image"

    return out


@pytest.mark.parametrize("key,package", [("wandb", "wandb"), ("swanlab", "swanlab")])
def test_installed_optional_backend_logs_offline(tmp_path, key, package, monkeypatch):
    pytest.importorskip(package)
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = RunLogger(make_cfg(**{key: True}), tmp_path, total_steps=2, stream=io.StringIO())
    run_steps(lg, range(1, 3))
    lg.log_samples(2, torch.rand(2, 3, 8, 8), ["a", "a"], torch.rand(2))
    lg.finish()
    assert lg._backends[0].failures == 0
    assert (tmp_path / package).is_dir() and any((tmp_path / package).rglob("*.png"))
    # a resumed run continues the same run / experiment (its id is kept in the run directory)
    run_id = (tmp_path / f"{key}_run_id.txt").read_text()
    lg = RunLogger(make_cfg(**{key: True}), tmp_path, total_steps=3, start_step=2, stream=io.StringIO())
    run_steps(lg, range(3, 4))
    lg.finish()
    assert lg._backends[0].failures == 0 and (tmp_path / f"{key}_run_id.txt").read_text() == run_id
    # the values themselves reached the backend's offline store, at their steps, both runs' of them
    stored = backend_scalars(tmp_path, package)
    assert sorted(stored) == [1, 2, 3]
    assert stored[2].pop("samples") in ("image", "image-file")  # the sample grid, at its step
    for s in (1, 2, 3):
        assert stored[s] == pytest.approx(fake_metrics(s), rel=1e-6), s


@pytest.mark.parametrize("key,package,mode", [("wandb", "wandb", "online"), ("swanlab", "swanlab", "cloud")])
def test_online_backend_without_a_login_is_one_clear_error(tmp_path, key, package, mode, monkeypatch):
    pytest.importorskip(package)
    for var in ("WANDB_API_KEY", "SWANLAB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no saved login)
    monkeypatch.setenv("WANDB_SILENT", "true")
    from imagerl.logging import BackendStartError

    with pytest.raises(BackendStartError, match=rf"^logging.{key}=true with logging.{key}_mode={mode}: .* could not start "
                                                 rf"\(.*\); log in .* or set logging.{key}_mode=offline$"):
        RunLogger(make_cfg(**{key: True, f"{key}_mode": mode}), tmp_path / "run", total_steps=2, stream=io.StringIO())


@pytest.mark.parametrize("key,package,mode", [("wandb", "wandb", "online"), ("swanlab", "swanlab", "cloud")])
def test_check_backends_refuses_an_online_backend_without_a_login(tmp_path, key, package, mode):
    """The trainer's pre-load check (imagerl.logging.check_backends): without a login and without a terminal, an
    online backend is one error naming the fix; with the service's API key in the environment it passes (the
    key is not verified over the network: that is left to the backend's start), and offline needs none."""
    pytest.importorskip(package)
    # In a fresh interpreter: wandb.login keeps the key for the rest of the process, and wandb.teardown(), which
    # dropped it, waited forever on a wandb-core service that an earlier test's offline run had started (a hang
    # of the whole suite, seen once).
    script = textwrap.dedent(f"""
        import sys
        from imagerl.config import Config
        from imagerl.logging import BackendStartError, check_backends

        def cfg(**kw):
            c = Config()
            for k, v in kw.items():
                setattr(c.logging, k, v)
            return c

        try:
            check_backends(cfg({key}=True, {key}_mode="{mode}"))
            print("NO ERROR")
        except BackendStartError as e:
            print("ERROR", e)
        check_backends(cfg({key}=True))  # offline
        print("OFFLINE OK")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "SWANLAB_API_KEY")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")  # (no saved login)

    def run(extra: dict[str, str]) -> str:
        p = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)  # (no terminal to prompt on)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    out = run({})
    assert re.search(rf"^ERROR logging.{key}=true with logging.{key}_mode={mode}: .*log in .* or set "
                     rf"logging.{key}_mode=offline$", out, re.M), out
    assert "OFFLINE OK" in out
    assert run({f"{key.upper()}_API_KEY": "x" * 40}).startswith("NO ERROR")


def test_narrow_grid_widens_to_show_its_title():
    imgs, _ = solid_images(2, 8, 8)
    title = "eval of step_000001 (deterministic sampling), a title longer than two tiles"
    grid = make_sample_grid(imgs, ["p", "p"], torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), max_images=2, title=title)
    tiles_only = PAD + 2 * (96 + 2 * FRAME + PAD)
    assert grid.width > tiles_only
    # the title's ink ends inside the canvas with a margin (it is not cut at the right edge)
    px = grid.convert("RGB").load()
    ink = [x for x in range(grid.width) for y in range(4, 20) if px[x, y] != px[0, 0]]
    assert ink and max(ink) < grid.width - 2


def test_progress_bar_keeps_bar_and_step_count_at_80_columns(tmp_path):
    # a long run name and live stats used to squeeze the bar, k/N and the elapsed time out of one table row
    from rich.console import Console

    buf = io.StringIO()
    cfg = make_cfg()
    cfg.run.name = "janus_pro_7b_lr1e-6_kl004_run2"
    lg = RunLogger(cfg, tmp_path, total_steps=100, stream=buf, tty=True)
    lg.console = Console(file=buf, force_terminal=True, width=80)
    lg._stop_progress()
    lg._start_progress()
    lg.log_step(2, {"reward/mean": 0.5321, "reward/std": 0.1234, "loss": 0.0123, "kl": 4e-4})
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=True, color_system="standard").print(*lg._progress.get_renderables())
    lg.finish()
    import re

    first, second = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue()).splitlines()[:2]
    assert "2/100" in first and "━" in first and "0:00:0" in first and "eta" in first
    assert second.strip().startswith("reward 0.5321±0.1234") and "kl 4.00e-04" in second


def test_captions_draw_accented_and_cyrillic_letters():
    # Pillow's bundled font has basic Latin only: every other letter was the same 'missing glyph' box
    from imagerl.logging import _font

    font = _font(12)
    masks = {ch: bytes(font.getmask(ch)) for ch in "éïЖЩ"}
    assert len(set(masks.values())) == 4

"""Run logging that a person enjoys: a live progress bar, sample grids, a reward curve, and the files
that stay behind in ``output_dir``.

One `RunLogger` per run. Every rank constructs it; only the main rank (``is_main=True``) does
anything, the others get a null logger (nanochat's pattern), so the training loop never branches on
the rank.

What it writes (the required outputs; their errors raise):

- ``metrics.jsonl``: one JSON object per `log_step` call, ``{"step": k, **metrics}``, flushed after
  every line. JSON has no NaN or infinity, so non-finite values are written as ``null`` (and
  `read_metrics` reads ``null`` back as NaN). On resume (``start_step > 0``) lines with
  ``step > start_step`` are dropped first, so a resumed run's file equals an uninterrupted run's file.
- ``samples/step_XXXXXX.png``: a grid per `log_samples` call, one row per prompt (group), samples of
  the group side by side sorted best-first, tiny images upscaled with nearest-neighbour.
- ``reward_curve.png``: written by `finish` from ``metrics.jsonl`` (so it covers pre-resume steps).

Optional mirrors (their errors warn once and never stop training): TensorBoard (``output_dir/tb``),
Weights & Biases (``output_dir/wandb``, offline by default) and SwanLab (``output_dir/swanlab``,
offline by default). They are imported only when enabled; an enabled backend that is not installed
fails at construction with the pip command to install it.

Console: on a terminal a rich progress bar shows step, ETA, s/step and live reward/loss/kl; when
stdout is not a terminal (CI, ``| tee``, a job log) a compact one-line `summarize` is printed every
``logging.log_every`` steps instead, so a log file still shows progress without control characters.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging as _stdlogging  # this module is imagerl.logging; the stdlib one is only used for warnings
import math
import os
import re
import sys
import tempfile
import textwrap
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from .config import ConfigError
from .imageio import to_u8

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from .config import Config

log = _stdlogging.getLogger("imagerl")

METRICS_FILE = "metrics.jsonl"
REWARD_CURVE_FILE = "reward_curve.png"
SAMPLES_DIR = "samples"


class BackendNotInstalledError(ConfigError, ImportError):
    """An enabled logging backend (logging.tensorboard / wandb / swanlab) is not installed."""


def _stable_run_id(id_file: Path, start_step: int, length: int) -> str:
    """The run's id for a logging service, kept in `id_file` in output_dir, so that a resumed run (start_step > 0)
    continues the same W&B run / SwanLab experiment; a fresh run gets a new one."""
    run_id = id_file.read_text().strip() if id_file.exists() and start_step > 0 else uuid.uuid4().hex[:length]
    id_file.write_text(run_id + "\n")
    return run_id


class BackendStartError(ConfigError):
    """An enabled logging backend is installed but would not start (online mode without a login, say)."""


def _start(what: str, fix: str, init: Any, **kw: Any) -> Any:
    """`init(**kw)`, with any failure (W&B's UsageError without an API key, SwanLab's no-TTY login) as one line
    naming the imagerl key and the fix."""
    try:
        return init(**kw)
    except Exception as e:  # noqa: BLE001  (each library has its own exception types)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise BackendStartError(f"{what} could not start ({type(e).__name__}: {first}); {fix}") from None


def _backend_what(cfg: "Config", key: str, label: str) -> str:
    """How a backend's start errors begin: 'logging.wandb=true with logging.wandb_mode=online: W&B'."""
    return f"logging.{key}=true with logging.{key}_mode={getattr(cfg.logging, key + '_mode')}: {label}"


_WANDB_FIX = "log in (`wandb login`, or export WANDB_API_KEY=...) or set logging.wandb_mode=offline"
_SWANLAB_FIX = "log in (`swanlab login`, or export SWANLAB_API_KEY=...) or set logging.swanlab_mode=offline"


def _swanlab_has_key() -> bool | None:
    """Whether SwanLab finds an API key (its env variable or a saved login); None when this SwanLab version
    keeps that elsewhere (then the backend's own start decides)."""
    if os.environ.get("SWANLAB_API_KEY"):
        return True
    try:
        from swanlab.sdk.cmd.login import create_settings  # (not public API: pinned in requirements-logging.txt)

        return create_settings().api_key is not None
    except Exception:  # noqa: BLE001
        return None


def check_backends(cfg: "Config") -> None:
    """The logging backends' start-time failures, checked before the model loads (minutes for a real checkpoint):
    every enabled backend is installed, and an online W&B or SwanLab has a login. An interactive W&B user gets
    W&B's own login prompt here; without a terminal it is one error naming the fix. The backends still start
    (and may still fail, e.g. an unreachable server) in RunLogger, once the resume step is known."""
    lc = cfg.logging
    if lc.tensorboard:
        _require("tensorboard", "logging.tensorboard", "tensorboard")
    if lc.wandb:
        wandb = _require("wandb", "logging.wandb", "wandb")
        if lc.wandb_mode == "online":
            what = _backend_what(cfg, "wandb", "W&B")
            import inspect

            if "prompt" not in inspect.signature(wandb.login).parameters:
                return  # (a W&B before 0.31 may prompt where it cannot; its own start, after the load, decides)
            interactive = sys.stdin.isatty() and sys.stdout.isatty()
            if not _start(what, _WANDB_FIX, wandb.login, verify=False, prompt=interactive):
                raise BackendStartError(f"{what} has no login (no WANDB_API_KEY, no saved `wandb login`); {_WANDB_FIX}")
    if lc.swanlab:
        _require("swanlab", "logging.swanlab", "swanlab")
        if lc.swanlab_mode in ("online", "cloud") and _swanlab_has_key() is False:
            raise BackendStartError(f"{_backend_what(cfg, 'swanlab', 'SwanLab')} has no login (no SWANLAB_API_KEY, "
                                    f"no saved `swanlab login`); {_SWANLAB_FIX}")


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def _to_number(v: Any) -> Any:
    """A JSON-ready scalar: tensors/numpy scalars become Python numbers, NaN and +-inf become None."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"metric value must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    elif hasattr(v, "item") and callable(v.item) and not isinstance(v, (str, bytes)):  # numpy scalar
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    """Compact number: 4 significant decimals in the everyday range, scientific outside it."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if not _is_num(v):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if isinstance(v, int):
        return str(v)
    if 1e-3 <= a < 1e4:
        return f"{v:.4f}".rstrip("0").rstrip(".") if a < 1 else f"{v:.4g}"
    return f"{v:.2e}"


def format_duration(seconds: float | None) -> str:
    """``45s``, ``2m13s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


_REWARD_NAME_RE = re.compile(r"^reward/(?P<name>[^/]+)(?:/mean)?$")
_REWARD_RESERVED = {"mean", "std", "abstain", "min", "max"}


def reward_names(keys: Any) -> list[str]:
    """Names of the individual rewards among metric keys (``reward/<name>/mean`` or ``reward/<name>``)."""
    names: list[str] = []
    for k in keys:
        m = _REWARD_NAME_RE.match(str(k))
        if m and m.group("name") not in _REWARD_RESERVED and m.group("name") not in names:
            names.append(m.group("name"))
    return names


def _reward_key(metrics: dict[str, Any], name: str) -> str:
    return f"reward/{name}/mean" if f"reward/{name}/mean" in metrics else f"reward/{name}"


def summarize(metrics: dict[str, Any], total_steps: int | None = None, max_rewards: int = 4) -> str:
    """One compact line for a step's metrics, e.g.
    ``step 12/100 | reward 0.532±0.12 (ocr 0.41, clip 0.62) | loss 0.0123 | kl 4.00e-04 | 1.52 s/step``.

    Unknown keys are left out (they are all in metrics.jsonl); missing keys are skipped, NaN/None show
    as ``n/a``.
    """
    parts: list[str] = []
    if "step" in metrics:
        parts.append(f"step {metrics['step']}" + (f"/{total_steps}" if total_steps else ""))
    if "reward/mean" in metrics:
        r = f"reward {_fmt(metrics['reward/mean'])}"
        std = metrics.get("reward/std")
        if _is_num(std) and math.isfinite(std):
            r += f"±{_fmt(std)}"
        names = reward_names(metrics)
        if len(names) > 1:
            shown = ", ".join(f"{n} {_fmt(metrics[_reward_key(metrics, n)])}" for n in names[:max_rewards])
            r += f" ({shown}{', …' if len(names) > max_rewards else ''})"
        parts.append(r)
    ab = metrics.get("reward/abstain")
    if _is_num(ab) and ab > 0:
        parts.append(f"abstain {100 * ab:.0f}%")
    for key, label in (("loss", "loss"), ("kl", "kl"), ("clip_frac", "clip"), ("grad_norm", "gnorm"), ("lr", "lr")):
        if key in metrics:
            v = metrics[key]
            if key == "clip_frac" and _is_num(v) and math.isfinite(v):
                parts.append(f"{label} {100 * v:.1f}%")
            elif key == "lr" and _is_num(v):
                parts.append(f"{label} {v:.1e}")
            else:
                parts.append(f"{label} {_fmt(v)}")
    return " | ".join(parts)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, ``null`` read back as NaN.

    A torn last line (the process died mid-write) is skipped; a bad line elsewhere raises with its
    line number, because it means the file was edited or two runs wrote into one directory.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                log.warning("%s: skipping the torn last line %d (%s)", path, i + 1, e)
                continue
            raise ValueError(
                f"{path}:{i + 1}: not a JSON object per line ({e}). Delete the line, or use a fresh run.output_dir"
            ) from e
        out.append({k: (float("nan") if v is None else v) for k, v in rec.items()})
    return out


def _truncate_metrics(path: Path, start_step: int) -> int:
    """Keep records with step <= start_step (atomic rewrite). Returns how many lines were dropped."""
    if not path.exists():
        return 0
    kept: list[str] = []
    dropped = 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = rec["step"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:  # torn by a crash: belongs to an unfinished step
                dropped += 1
                continue
            raise ValueError(f"{path}:{i + 1}: cannot read this line to resume ({line[:80]!r}); fix or delete it")
        if step is not None and step <= start_step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text(path, "".join(l + "\n" for l in kept))
    return dropped


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Sample grid
# --------------------------------------------------------------------------------------------------

_PAD = 6  # pixels between tiles and around the grid
_BG = (250, 250, 248)
_INK = (30, 30, 30)
_MUTED = (130, 130, 130)
_ABOVE = (46, 160, 67)  # reward above the group mean: positive advantage
_BELOW = (207, 34, 46)  # below: negative advantage
_LEVEL = (175, 175, 175)  # equal to the mean, or abstained


_CJK = re.compile("[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")
_CJK_FAMILIES = ["Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
                 "WenQuanYi Micro Hei", "Droid Sans Fallback", "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB"]


@functools.lru_cache(maxsize=16)
def _font(size: int, cjk: bool = False) -> Any:
    """Captions' font: matplotlib's bundled DejaVu Sans (Latin with accents, Greek, Cyrillic; Pillow's bundled font
    has basic Latin only, so 'café' lost its accent and Cyrillic became boxes); with Chinese/Japanese/Korean text, an
    installed CJK font where one exists (none is bundled anywhere we depend on)."""
    from PIL import ImageFont

    paths = []
    try:
        import matplotlib
        from matplotlib import font_manager

        if cjk:
            try:
                paths.append(font_manager.findfont(font_manager.FontProperties(family=_CJK_FAMILIES),
                                                   fallback_to_default=False))
            except ValueError:
                pass
        paths.append(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"))
    except ImportError:
        pass
    for path in paths:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)  # FreeType build of the bundled font (Pillow >= 10.1)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _text_w(draw: Any, text: str, font: Any) -> float:
    return draw.textlength(text, font=font)


def _line_h(font: Any) -> int:
    box = font.getbbox("Ag")
    return int(box[3] - min(box[1], 0)) + 2


def _fit_lines(draw: Any, text: str, font: Any, width: float, max_lines: int) -> list[str]:
    """Wrap `text` to `width` pixels in at most `max_lines` lines, ending with an ellipsis if cut."""
    text = " ".join(text.split())
    if not text:
        return [""]
    # Start from a character estimate, then shrink until every line fits in pixels.
    avg = max(_text_w(draw, "abcdefghijklmnopqrstuvwxyz", font) / 26, 1.0)
    chars = max(int(width / avg), 4)
    while True:
        lines = textwrap.wrap(text, width=chars, break_long_words=True) or [""]
        if all(_text_w(draw, ln, font) <= width for ln in lines) or chars <= 4:
            break
        chars -= 1
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_w(draw, last + "…", font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "…"
    return lines


def _group_order(group_ids: list[int]) -> list[list[int]]:
    """Sample indices per group, groups in first-appearance order."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def _pick_columns(idx_sorted: list[int], cols: int) -> list[int]:
    """`cols` samples spread evenly over a best-first list, so a cut group still shows best and worst."""
    n = len(idx_sorted)
    if n <= cols:
        return idx_sorted
    if cols == 1:
        return idx_sorted[:1]
    return [idx_sorted[round(j * (n - 1) / (cols - 1))] for j in range(cols)]


def grid_layout(n_groups: int, group_size: int, max_images: int) -> tuple[int, int]:
    """(rows, cols) of a sample grid: whole groups side by side, at most `max_images` tiles."""
    max_images = max(1, max_images)
    cols = max(1, min(group_size, max_images))
    rows = max(1, min(n_groups, max_images // cols))
    return rows, cols


def tile_scale(h: int, w: int, min_px: int, max_px: int) -> tuple[int, int]:
    """Tile size: integer nearest-neighbour upscale until the short side is >= min_px (pixels stay
    crisp), or a downscale so the long side is <= max_px (keeps PNGs of 1024 px samples small)."""
    if max(h, w) > max_px:
        s = max_px / max(h, w)
        return max(1, round(h * s)), max(1, round(w * s))
    k = max(1, math.ceil(min_px / max(1, min(h, w))))
    while k > 1 and max(h, w) * k > max_px:
        k -= 1
    return h * k, w * k


def make_sample_grid(
    images: torch.Tensor,
    prompts: list[str],
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    max_images: int = 16,
    min_tile: int = 96,
    max_tile: int = 512,
    title: str = "",
) -> "PILImage.Image":
    """A PIL grid of samples: one row per group with its prompt above, tiles best-first with the reward
    under each (``n/a`` for an abstaining NaN) and a thin frame coloured by the sign of the advantage
    (green above the group mean, red below, grey for equal or abstained)."""
    from PIL import Image, ImageDraw

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"log_samples: images must be [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    n = images.shape[0]
    rewards_N = rewards.detach().reshape(-1).float().cpu()
    if rewards_N.numel() != n:
        raise ValueError(f"log_samples: rewards has {rewards_N.numel()} values for {n} images; give one reward per image")
    if group_ids is None:
        # Samples of one prompt form a group (Rollout order keeps them together, but do not rely on it).
        first: dict[str, int] = {}
        gids = [first.setdefault(p, len(first)) for p in prompts]
        if len(prompts) != n:
            raise ValueError(f"log_samples: {len(prompts)} prompts for {n} images; give one prompt per image")
    else:
        gids = [int(g) for g in group_ids.detach().reshape(-1).cpu().tolist()]
        if len(gids) != n:
            raise ValueError(f"log_samples: group_ids has {len(gids)} values for {n} images")
    groups = _group_order(gids)
    if len(prompts) == n:
        group_prompt = [prompts[g[0]] for g in groups]
    elif len(prompts) == len(groups):
        group_prompt = list(prompts)
    else:
        raise ValueError(
            f"log_samples: {len(prompts)} prompts for {n} images in {len(groups)} groups; "
            "give one prompt per image (Rollout.prompts) or one per group"
        )

    g_max = max(len(g) for g in groups)
    rows, cols = grid_layout(len(groups), g_max, max_images)
    h, w = int(images.shape[2]), int(images.shape[3])
    th, tw = tile_scale(h, w, min_tile, max_tile)

    imgs = images[:n]
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    imgs_u8 = to_u8(imgs)  # [N, H, W, 3] (to_u8 detaches, casts, clamps and moves to the CPU)

    cjk = any(_CJK.search(t) for t in [title or "", *group_prompt[:rows]])
    font = _font(max(10, min(14, tw // 8)), cjk)
    title_font = _font(14, cjk)
    lh = _line_h(font)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    frame = 2
    cell_w = tw + 2 * frame
    width = _PAD + cols * (cell_w + _PAD)
    if title:  # a narrow grid (small groups) widens to show its whole title
        width = max(width, int(math.ceil(_text_w(scratch, title, title_font))) + 2 * _PAD)
    prompt_lines = [_fit_lines(scratch, p, font, width - 2 * _PAD, 2) for p in group_prompt[:rows]]
    title_h = (_line_h(title_font) + _PAD) if title else 0
    row_h = [len(pl) * lh + 2 + th + 2 * frame + lh + _PAD for pl in prompt_lines]
    height = _PAD + title_h + sum(row_h)

    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    y = _PAD
    if title:
        draw.text((_PAD, y), title, fill=_INK, font=title_font)
        y += title_h
    for r in range(rows):
        members = groups[r]
        vals = rewards_N[members]
        finite = vals[torch.isfinite(vals)]
        mean = float(finite.mean()) if finite.numel() else float("nan")
        # Best first; abstaining (NaN) samples last.
        order = sorted(members, key=lambda i: (not math.isfinite(float(rewards_N[i])), -float(rewards_N[i]) if math.isfinite(float(rewards_N[i])) else 0.0))
        shown = _pick_columns(order, cols)
        for ln in prompt_lines[r]:
            draw.text((_PAD, y), ln, fill=_INK, font=font)
            y += lh
        y += 2
        for c, i in enumerate(shown):
            x = _PAD + c * (cell_w + _PAD)
            rv = float(rewards_N[i])
            if not math.isfinite(rv) or abs(rv - mean) < 1e-12:
                color = _LEVEL
            else:
                color = _ABOVE if rv > mean else _BELOW
            draw.rectangle([x, y, x + cell_w - 1, y + th + 2 * frame - 1], fill=color)
            tile = Image.fromarray(imgs_u8[i])
            tile = tile.resize((tw, th), Image.Resampling.NEAREST if th >= h else Image.Resampling.LANCZOS)
            canvas.paste(tile, (x + frame, y + frame))
            cap = (f"r={rv:.3f}" if abs(rv) < 1000 else f"r={rv:.2e}") if math.isfinite(rv) else "n/a"
            cw = _text_w(draw, cap, font)
            draw.text((x + (cell_w - cw) / 2, y + th + 2 * frame + 1), cap, fill=_INK if math.isfinite(rv) else _MUTED, font=font)
        y += th + 2 * frame + lh + _PAD
    return canvas


# --------------------------------------------------------------------------------------------------
# Reward curve
# --------------------------------------------------------------------------------------------------


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` finite values (NaN steps are skipped, not zero)."""
    out: list[float] = []
    buf: deque[float] = deque(maxlen=window)
    for v in values:
        if math.isfinite(v):
            buf.append(v)
        out.append(sum(buf) / len(buf) if buf else float("nan"))
    return out


def plot_reward_curve(records: list[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """reward/mean per step (raw and moving average, ±std band), one line per individual reward, and
    loss / kl in a second panel when present. Written with matplotlib's Agg backend (no display)."""
    path = Path(path)
    fig = reward_curve_figure(records, title)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def reward_curve_figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """The matplotlib Figure `plot_reward_curve` saves."""
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no display needed
    # (and nothing changes for a user who has pyplot open in a notebook).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for rec in records:
            if key in rec and "step" in rec and _is_num(rec[key]):
                xs.append(float(rec["step"]))
                ys.append(float(rec[key]))
        return xs, ys

    keys: list[str] = []
    for rec in records:
        keys.extend(k for k in rec if k not in keys)
    has_lower = any(k in keys for k in ("loss", "kl"))
    fig = Figure(figsize=(9, 6.5 if has_lower else 4.2), dpi=110, layout="constrained")
    if has_lower:
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    else:
        ax, ax2 = fig.subplots(1, 1), None
    FigureCanvasAgg(fig)

    xs, ys = series("reward/mean")
    if xs:
        window = max(1, min(50, len(xs) // 10))
        ma = _moving_average(ys, window)
        # (raw line unlabelled when there is no moving average: one legend entry per line actually drawn)
        ax.plot(xs, ys, color="C0", alpha=0.3, linewidth=1, label="reward/mean" if window > 1 else None)
        sx, sd = series("reward/std")
        if len(sx) == len(xs) and sx == xs:
            lo = [m - s for m, s in zip(ys, sd)]
            hi = [m + s for m, s in zip(ys, sd)]
            ax.fill_between(xs, lo, hi, color="C0", alpha=0.08, linewidth=0, label="±std within batch")
        ax.plot(xs, ma, color="C0", linewidth=2.2, label=f"reward/mean (moving avg, {window} steps)" if window > 1 else "reward/mean")
    # each reward its own colour from C1 on, skipping C3 and C4 (loss and kl below)
    palette = [f"C{c}" for c in (1, 2, 5, 6, 7, 8, 9)]
    for j, name in enumerate(reward_names(keys)):
        key = f"reward/{name}/mean" if f"reward/{name}/mean" in keys else f"reward/{name}"
        rx, ry = series(key)
        if rx:  # (a reward that abstained on every step has no value, so no line and no legend entry)
            w = max(1, min(50, len(rx) // 10))
            ax.plot(rx, _moving_average(ry, w), color=palette[j % len(palette)], linewidth=1.3, alpha=0.9,
                    label=f"{key} (moving avg)" if w > 1 else key)
    if not xs and not reward_names(keys):
        ax.text(0.5, 0.5, "no reward logged yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_ylabel("reward")
    ax.grid(True, alpha=0.25)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers (no 1.25 on a short run)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, frameon=False)
    if xs:
        last = next((v for v in reversed(ma) if math.isfinite(v)), float("nan"))
        title = f"{title or 'reward'}: {len(xs)} steps, reward/mean {_fmt(last)} (last, moving avg)"
    ax.set_title(title or "reward", fontsize=11)

    if ax2 is not None:
        lines = []
        lx, ly = series("loss")
        if lx:
            lines += ax2.plot(lx, ly, color="C3", linewidth=1.2, label="loss")
            ax2.set_ylabel("loss")
        kx, ky = series("kl")
        if kx:
            # KL is often orders of magnitude below the loss: give it its own axis.
            ax_kl = ax2.twinx() if lx else ax2
            lines += ax_kl.plot(kx, ky, color="C4", linewidth=1.2, label="kl")
            ax_kl.set_ylabel("kl")
        ax2.grid(True, alpha=0.25)
        ax2.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8, frameon=False)
        ax2.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    return fig


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


def _require(module: str, key: str, pip_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendNotInstalledError(
            f"{key}=true but the '{pip_name}' package is not installed. Install it with "
            f"`pip install {pip_name}` (or all logging backends: `pip install 'imagerl[logging]'`), "
            f"or set {key}=false."
        ) from e


class _Backend:
    """One optional mirror. Failures after construction warn once and never reach the training loop."""

    name = "backend"

    def __init__(self) -> None:
        self.failures = 0

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a mirror must not kill training
            self.failures += 1
            if self.failures == 1:
                log.warning("imagerl logging: %s %s failed (%s: %s); training continues, further %s errors are counted silently",
                            self.name, what, type(e).__name__, e, self.name)

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        self._guard("log", self._scalars, step, metrics)

    def image(self, step: int, key: str, img: "PILImage.Image", caption: str) -> None:
        self._guard("image", self._image, step, key, img, caption)

    def close(self) -> None:
        self._guard("close", self._close)

    def _scalars(self, step: int, metrics: dict[str, float]) -> None: ...
    def _image(self, step: int, key: str, img: "PILImage.Image", caption: str) -> None: ...
    def _close(self) -> None: ...


class _TensorBoard(_Backend):
    name = "tensorboard"

    def __init__(self, logdir: Path, start_step: int) -> None:
        super().__init__()
        _require("tensorboard", "logging.tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a crashed run wrote after the checkpoint we resume from.
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=start_step + 1 if start_step > 0 else None)

    def _scalars(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)

    def _image(self, step: int, key: str, img: "PILImage.Image", caption: str) -> None:
        import numpy as np

        self.writer.add_image(key, np.asarray(img), global_step=step, dataformats="HWC")

    def _close(self) -> None:
        self.writer.close()


class _WandB(_Backend):
    name = "wandb"

    def __init__(self, cfg: "Config", output_dir: Path, run_name: str, start_step: int) -> None:
        super().__init__()
        self.wandb = _require("wandb", "logging.wandb", "wandb")
        from .config import to_dict

        run_id = _stable_run_id(output_dir / "wandb_run_id.txt", start_step, 12)
        self.run = _start(
            _backend_what(cfg, "wandb", "W&B"),
            _WANDB_FIX, self.wandb.init,
            project=cfg.logging.wandb_project,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(output_dir),
            mode=cfg.logging.wandb_mode,
            config=to_dict(cfg),
        )

    def _scalars(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def _image(self, step: int, key: str, img: "PILImage.Image", caption: str) -> None:
        self.run.log({key: self.wandb.Image(img, caption=caption)}, step=step)

    def _close(self) -> None:
        self.run.finish()


class _SwanLab(_Backend):
    name = "swanlab"

    def __init__(self, cfg: "Config", output_dir: Path, run_name: str, start_step: int) -> None:
        super().__init__()
        self.swanlab = _require("swanlab", "logging.swanlab", "swanlab")
        from .config import to_dict

        logdir = output_dir / "swanlab"
        logdir.mkdir(parents=True, exist_ok=True)
        run_id = _stable_run_id(output_dir / "swanlab_run_id.txt", start_step, 21)
        self.run = _start(
            _backend_what(cfg, "swanlab", "SwanLab"),
            _SWANLAB_FIX, self.swanlab.init,
            id=run_id,
            resume="allow",
            project=cfg.logging.swanlab_project,
            experiment_name=run_name,
            logdir=str(logdir),
            mode=cfg.logging.swanlab_mode,
            config=to_dict(cfg),
        )

    def _scalars(self, step: int, metrics: dict[str, float]) -> None:
        self.swanlab.log(metrics, step=step)

    def _image(self, step: int, key: str, img: "PILImage.Image", caption: str) -> None:
        self.swanlab.log({key: self.swanlab.Image(img, caption=caption)}, step=step)

    def _close(self) -> None:
        self.swanlab.finish()


# --------------------------------------------------------------------------------------------------
# RunLogger
# --------------------------------------------------------------------------------------------------


class RunLogger:
    """Files, console and optional mirrors of one training run. See the module docstring.

    Steps are 1-based counts of finished updates: ``log_step(k, ...)`` after the k-th update, and a
    checkpoint taken after step k resumes with ``start_step=k``.

    Optional keyword arguments (defaults suit training): ``stream`` (console output, default stdout),
    ``tty`` (force the progress bar on/off instead of asking the stream), ``min_tile`` / ``max_tile``
    (sample tile size bounds in pixels).
    """

    def __init__(
        self,
        cfg: "Config",
        output_dir: Path,
        total_steps: int,
        start_step: int = 0,
        is_main: bool = True,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        min_tile: int = 96,
        max_tile: int = 512,
    ) -> None:
        self.enabled = bool(is_main)
        self._finished = False
        self._progress: Any = None
        self._backends: list[_Backend] = []
        if not self.enabled:
            return
        self.cfg = cfg
        lc = cfg.logging
        self.output_dir = Path(output_dir)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.run_name = cfg.run.name or self.output_dir.resolve().name
        self.min_tile, self.max_tile = min_tile, max_tile
        self.metrics_path = self.output_dir / METRICS_FILE
        self.samples_dir = self.output_dir / SAMPLES_DIR
        self.curve_path = self.output_dir / REWARD_CURVE_FILE
        self.output_dir.mkdir(parents=True, exist_ok=True)

        # (a failure anywhere below, a backend that cannot start or an unwritable metrics.jsonl, closes the backends
        # opened so far)
        try:
            # Backends first: a missing package must fail before we touch any file of a previous run.
            if lc.tensorboard:
                self._backends.append(_TensorBoard(self.output_dir / "tb", self.start_step))
            if lc.wandb:
                self._backends.append(_WandB(cfg, self.output_dir, self.run_name, self.start_step))
            if lc.swanlab:
                self._backends.append(_SwanLab(cfg, self.output_dir, self.run_name, self.start_step))
            if self.start_step > 0:
                dropped = _truncate_metrics(self.metrics_path, self.start_step)
                if dropped:
                    log.info("%s: dropped %d records after step %d (resuming)", self.metrics_path, dropped, self.start_step)
            elif self.metrics_path.exists():
                # A fresh run in a used directory: the old records would mix two runs in one curve.
                atomic_write_text(self.metrics_path, "")
            # likewise the grids of steps after the one we start from (a killed run drew them after its last checkpoint;
            # with another logging.sample_every the resumed run would not redraw them)
            for p in self.samples_dir.glob("step_*.png") if self.samples_dir.is_dir() else ():
                with contextlib.suppress(ValueError, OSError):
                    if int(p.stem[len("step_"):]) > self.start_step:
                        p.unlink()
            self._metrics_f = open(self.metrics_path, "a", encoding="utf-8")
        except BaseException:
            for b in self._backends:
                b.close()
            raise

        from rich.console import Console

        self._stream = stream if stream is not None else sys.stdout
        is_tty = tty if tty is not None else bool(getattr(self._stream, "isatty", lambda: False)())
        self.console = Console(file=self._stream, force_terminal=is_tty,
                               soft_wrap=not is_tty, highlight=is_tty)
        self._console_on = bool(lc.console)
        self._log_every = max(1, int(lc.log_every))
        self._durations: deque[float] = deque(maxlen=20)
        self._last_t = time.perf_counter()
        self._last_step = self.start_step
        if self._console_on and lc.progress_bar and is_tty:
            self._start_progress()
        atexit.register(self._stop_progress)

    # ----------------------------------------------------------------------------------------------

    def _start_progress(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Column
        from rich.text import Text

        class TwoLines(Progress):
            """The bar, step k/N, elapsed, ETA and speed on one line, the live stats on the next: in one table row
            rich squeezes the first columns away when the stats are long (at 80 columns, bar and k/N vanished)."""

            def get_renderables(self):
                yield self.make_tasks_table(self.tasks)
                for t in self.tasks:
                    if t.fields.get("stats"):
                        yield Text("  " + t.fields["stats"], no_wrap=True, overflow="ellipsis")

        self._progress = TwoLines(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}", table_column=Column(max_width=24, no_wrap=True, overflow="ellipsis")),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta [cyan]{task.fields[eta]}"),
            TextColumn("{task.fields[speed]}"),
            console=self.console,
            transient=False,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(
            self.run_name, total=self.total_steps, completed=self.start_step, eta="?", speed="", stats=""
        )
        self._progress.start()

    def _stop_progress(self) -> None:
        if self._progress is not None:
            try:
                self._progress.stop()
            finally:
                self._progress = None

    def _eta(self, step: int) -> float | None:
        if not self._durations:
            return None
        return (sum(self._durations) / len(self._durations)) * max(0, self.total_steps - step)

    # ----------------------------------------------------------------------------------------------

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl and update the console and mirrors."""
        if not self.enabled:
            return
        if self._finished:
            raise RuntimeError("RunLogger.log_step called after finish(); create a new RunLogger to keep logging")
        step = int(step)
        rec: dict[str, Any] = {"step": step}
        for k, v in metrics.items():
            if k == "step":
                continue
            rec[str(k)] = _to_number(v)
        # allow_nan=False: a non-finite value that slipped through would write invalid JSON.
        self._metrics_f.write(json.dumps(rec, allow_nan=False) + "\n")
        self._metrics_f.flush()

        # ETA and speed from the wall clock between steps: time/step covers rollout, scoring and update only, and
        # would leave out evaluation, checkpoints and sample grids (half the real time with eval every step)
        now = time.perf_counter()
        if step > self._last_step:
            self._durations.append((now - self._last_t) / (step - self._last_step))
        self._last_t, self._last_step = now, step

        scalars = {k: float(v) for k, v in rec.items() if k != "step" and _is_num(v)}
        for b in self._backends:
            b.scalars(step, scalars)

        if not self._console_on:
            return
        eta = self._eta(step)
        recent = list(self._durations)[-5:]  # a short window: live, but not jumpy
        speed = f"{sum(recent) / len(recent):.2f} s/step" if recent else ""
        if self._progress is not None:
            stats = summarize({k: rec[k] for k in ("reward/mean", "reward/std", "loss", "kl") if k in rec})
            self._progress.update(self._task, completed=min(step, self.total_steps), eta=format_duration(eta),
                                  speed=speed, stats=stats.replace(" | ", " · "))
        elif step % self._log_every == 0 or step == self.total_steps:
            line = summarize(rec, self.total_steps)
            if speed:
                line += f" | {speed}"
            line += f" | eta {format_duration(eta)}"
            self.console.print(line, markup=False)

    def log_samples(
        self,
        step: int,
        images: torch.Tensor,
        prompts: list[str],
        rewards: torch.Tensor,
        group_ids: torch.Tensor | None = None,
        batch_mean: float | None = None,
    ) -> Path | None:
        """Write ``samples/step_{step:06d}.png`` (see `make_sample_grid`) and mirror it; returns the path.
        `batch_mean`: the step's reward mean for the title (under several processes the images are one rank's
        share); by default the mean of `rewards`."""
        if not self.enabled:
            return None
        rew = rewards.detach().reshape(-1).float().cpu()
        fin = rew[torch.isfinite(rew)]
        title = f"{self.run_name} · step {step}"
        if batch_mean is not None and math.isfinite(batch_mean):
            title += f" · reward mean {_fmt(float(batch_mean))}"
        elif fin.numel():
            title += f" · reward mean {_fmt(float(fin.mean()))}"
        if fin.numel() < rew.numel():
            title += f" · {rew.numel() - fin.numel()} abstained"
        grid = make_sample_grid(images, prompts, rewards, group_ids, max_images=self.cfg.logging.samples_per_grid,
                                min_tile=self.min_tile, max_tile=self.max_tile, title=title)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        path = self.samples_dir / f"step_{int(step):06d}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        grid.save(tmp)
        os.replace(tmp, path)
        for b in self._backends:
            b.image(int(step), "samples", grid, title)
        return path

    def sync(self) -> None:
        """Make metrics.jsonl durable (fsync) up to the last logged step: called before a checkpoint is written, so
        that after a power loss the checkpoint never holds steps whose records were lost (a resume keeps the records
        up to its step and appends from there)."""
        if self.enabled and not self._finished:
            os.fsync(self._metrics_f.fileno())

    def print(self, msg: str) -> None:
        """Print a message above the progress bar (or as a plain line when there is none)."""
        if not self.enabled:
            return
        self.console.print(msg, markup=False)

    def finish(self, curve: bool = True) -> dict[str, Path]:
        """Stop the bar, close mirrors, draw reward_curve.png (`curve=False`: a start that failed after the logger
        opened closes its files and backends without drawing). Safe to call twice."""
        if not self.enabled:
            return {}
        out = {"metrics": self.metrics_path, "reward_curve": self.curve_path, "samples": self.samples_dir}
        if self._finished:
            return out
        self._finished = True
        self._stop_progress()
        atexit.unregister(self._stop_progress)
        self._metrics_f.close()
        for b in self._backends:
            b.close()
            if b.failures:
                log.warning("imagerl logging: %s failed %d time(s) during the run", b.name, b.failures)
        if curve:
            plot_reward_curve(read_metrics(self.metrics_path), self.curve_path, title=self.run_name)
        return out

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

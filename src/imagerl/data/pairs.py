"""Prompt+image pairs for the auxiliary SFT loss (and source images for editing data).

Files: .jsonl / .csv / .parquet rows with a prompt field and an image field holding a path (relative paths
are resolved against the data file's folder). Built-in ``builtin:color_shapes`` draws the described picture
procedurally ("a red square on the left" -> a red square in the left half), so the SFT path can be tested
and demonstrated offline.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..imageio import load_pil
from ..tiny import COLORS, POSITIONS, SHAPES
from .prompts import DataError, builtin_dataset, data_path, load_rows


def draw_shape(color: str, shape: str, position: str, size: int = 64) -> torch.Tensor:
    """[3, size, size] in [0, 1]: a grey canvas with the named shape in the named region."""
    from ..rewards.rule import COLOR_RGB

    img = torch.full((3, size, size), 0.5)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cx = {"left": size * 0.25, "right": size * 0.75}.get(position, size * 0.5)
    cy = {"top": size * 0.25, "bottom": size * 0.75}.get(position, size * 0.5)
    r = size * 0.2
    dx, dy = (xx - cx).abs(), (yy - cy).abs()
    if shape == "circle":
        m = (dx**2 + dy**2) <= r**2
    elif shape == "triangle":
        m = (dy <= r) & (dx <= (yy - (cy - r)) * 0.5)
    elif shape == "star":
        m = ((dx <= r * 0.3) & (dy <= r)) | ((dy <= r * 0.3) & (dx <= r))
    else:
        m = (dx <= r) & (dy <= r)
    rgb = torch.tensor(COLOR_RGB.get(color, (1.0, 1.0, 1.0))).view(3, 1)
    img[:, m] = rgb.expand(3, int(m.sum()))
    return img


def load_image(path: Path, size: int, field: str) -> torch.Tensor:
    from PIL import Image

    im = load_pil(path, field).resize((size, size), Image.BICUBIC)
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return t.permute(2, 0, 1).float() / 255.0


@lru_cache(maxsize=8)
def _rows(path: str, prompt_field: str, image_field: str, limit: int = 0) -> tuple[tuple[str, Any], ...]:
    """The dataset's (prompt, image source) pairs, its first `limit` rows (0 = all), as data.datasets[].limit."""
    if path.startswith("builtin:"):
        rows = builtin_dataset(path.split(":", 1)[1], "data.sft_datasets[].path")[: limit or None]
        return tuple((r["prompt"], ("draw", r["color"], r["shape"], r["position"])) for r in rows)
    rows = load_rows(path, prompt_field, "data.sft_datasets[].path")[: limit or None]
    base = Path(path).expanduser().parent  # (relative image paths are relative to the data file, ~ expanded)
    out = []
    for i, r in enumerate(rows):
        if image_field not in r:
            raise DataError(f"data.sft_datasets: {path} row {i} has no '{image_field}' field; set image_field: <name>")
        if r[image_field] is None or not str(r[image_field]).strip():
            raise DataError(f"data.sft_datasets: {path} row {i} has an empty '{image_field}'; give each row an image path")
        out.append((r["prompt"], ("file", str(data_path(r[image_field], base)))))
    return tuple(out)


def check_sft_datasets(specs: list[Any]) -> None:
    """Read every SFT file once (cached for sft_batch): a missing file, column or image file fails at start, not at
    the first SFT step. (Images are decoded when drawn; an empty list with sft_weight > 0 is a config error.)"""
    for k, s in enumerate(specs):
        for _, src in _rows(s.path, s.prompt_field, s.image_field, s.limit):
            if src[0] == "file" and not Path(src[1]).is_file():
                raise DataError(f"data.sft_datasets[{k}]: image file '{src[1]}' does not exist (listed in {s.path})")


def sft_batch(specs: list[Any], n: int, gen: torch.Generator, size: int = 64,
              keep: range | None = None) -> dict[str, Any]:
    """Draw `n` prompt+image pairs (mixture by dataset weight) -> {"prompts": [k], "images": [k,3,size,size]} of the
    draws whose index is in `keep` (default: all n). All n are drawn whatever `keep` is, so that processes that
    keep different slices of the same stream share one batch; only the kept images are read."""
    if not specs:
        raise DataError("algorithm.sft_weight > 0 but data.sft_datasets is empty")
    w = torch.tensor([s.weight for s in specs], dtype=torch.float64)
    keep = range(n) if keep is None else keep
    prompts, images = [], []
    for i in range(n):
        d = int(torch.multinomial(w / w.sum(), 1, generator=gen)) if len(specs) > 1 else 0
        rows = _rows(specs[d].path, specs[d].prompt_field, specs[d].image_field, specs[d].limit)
        prompt, src = rows[int(torch.randint(len(rows), (1,), generator=gen))]
        if i not in keep:
            continue
        if src[0] == "draw":
            img = draw_shape(src[1], src[2], src[3], size)
        else:
            img = load_image(Path(src[1]), size, f"data.sft_datasets[{d}]")
        prompts.append(prompt)
        images.append(img)
    return {"prompts": prompts, "images": torch.stack(images)}


__all__ = ["check_sft_datasets", "draw_shape", "sft_batch", "load_image", "COLORS", "SHAPES", "POSITIONS"]

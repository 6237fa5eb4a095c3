"""Rule rewards scored from pixels: cheap, deterministic, and learnable by tiny models on a CPU.

- ``color_position``: "a red square on the left" -> how much of the named region has the named colour,
  and how little of it leaks elsewhere. Colour and position come from metadata (builtin datasets) or are
  parsed from the prompt; a prompt naming no known colour abstains (NaN).
- ``brightness``: mean luminance (or 1 - it with ``target: dark``).
- ``jpeg_compressibility``: smaller JPEG files score higher (the DDPO compressibility task), mapped to [0, 1]
  (the bytes of a flat image of the same size, headers and tables, not counted).
"""

from __future__ import annotations

import functools
import io
import math
import re

import torch

from ..imageio import to_u8
from ..tiny import POSITIONS
from ..types import RewardInput, RewardOutput
from .base import Reward, building_field

COLOR_RGB = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "orange": (1.0, 0.5, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}


def region_mask(position: str, h: int, w: int) -> torch.Tensor:
    """[H, W] bool mask of a named image region (left/right/top/bottom halves, centre quarter, whole)."""
    m = torch.zeros(h, w, dtype=torch.bool)
    if position == "left":
        m[:, : w // 2] = True
    elif position == "right":
        m[:, w - w // 2:] = True
    elif position == "top":
        m[: h // 2, :] = True
    elif position == "bottom":
        m[h - h // 2:, :] = True
    elif position == "center":
        m[h // 4: h - h // 4, w // 4: w - w // 4] = True
    else:
        m[:] = True
    return m


def _arg(reward: Reward, arg: str) -> str:
    """The config path of one of a reward's args (rewards[0].args.quality when built from the config)."""
    return f"{building_field() or f'reward {reward.name!r}'}.args.{arg}"


def color_match(img_3HW: torch.Tensor, rgb: tuple[float, float, float], tolerance: float) -> torch.Tensor:
    """[H, W] soft match in [0, 1]: 1 at the exact colour, falling linearly to 0 at `tolerance` RGB distance."""
    target = torch.tensor(rgb, dtype=img_3HW.dtype, device=img_3HW.device).view(3, 1, 1)
    dist = (img_3HW - target).pow(2).sum(0).sqrt() / math.sqrt(3.0)
    return (1.0 - dist / tolerance).clamp(0.0, 1.0)


class ColorPositionReward(Reward):
    """score = inside_weight * match(region) + (1 - inside_weight) * (1 - match(rest)).

    With no position named the whole image is the region and only the match term counts. A position (from the
    metadata) that is not one of left/right/top/bottom/center makes the sample abstain: the reward cannot check
    what was asked, and the whole image as the region would hand out 1 - inside_weight for nothing."""

    def __init__(self, name: str = "", tolerance: float = 0.6, inside_weight: float = 0.75):
        super().__init__(name)
        if not 0 < tolerance <= 1:
            raise ValueError(f"{_arg(self, 'tolerance')}={tolerance} must be in (0, 1] (color_position)")
        # outside [0, 1] one of the two terms gets a negative weight and scores leave [0, 1] (2 gave -0.5)
        if not 0 <= inside_weight <= 1:
            raise ValueError(f"{_arg(self, 'inside_weight')}={inside_weight} must be in [0, 1] (color_position): "
                             f"the weight of the region's match against 1 - the match outside it")
        self.tolerance = tolerance
        self.inside_weight = inside_weight

    @staticmethod
    def parse(prompt: str, meta: dict) -> tuple[str | None, str | None]:
        # (a blank value, e.g. an empty CSV cell, is a missing one; "Red" in a CSV is the prompt's "red")
        color = str(meta.get("color") or "").strip().lower() or None
        position = str(meta.get("position") or "").strip().lower() or None
        words = re.findall(r"[a-z]+", prompt.lower())
        if color is None:
            color = next((w for w in words if w in COLOR_RGB), None)
        if position is None:
            position = next((w for w in words if w in POSITIONS), None)
        return color, position

    def score(self, inp: RewardInput) -> RewardOutput:
        imgs = inp.images.float()
        _, _, H, W = imgs.shape
        scores = torch.full((len(inp),), math.nan)
        for i, (prompt, meta) in enumerate(zip(inp.prompts, inp.metadata)):
            color, position = self.parse(prompt, meta or {})
            if color not in COLOR_RGB or (position is not None and position not in POSITIONS):
                continue  # abstain: nothing we can check
            match = color_match(imgs[i], COLOR_RGB[color], self.tolerance)
            if position is None:
                scores[i] = match.mean()
                continue
            m = region_mask(position, H, W)
            inside = match[m].mean()
            outside = match[~m].mean() if (~m).any() else torch.tensor(0.0)
            scores[i] = self.inside_weight * inside + (1 - self.inside_weight) * (1 - outside)
        return RewardOutput(scores=scores)


class BrightnessReward(Reward):
    def __init__(self, name: str = "", target: str = "bright"):
        super().__init__(name)
        if target not in ("bright", "dark"):
            raise ValueError(f"{_arg(self, 'target')}='{target}' must be 'bright' or 'dark' (brightness)")
        self.target = target

    def score(self, inp: RewardInput) -> RewardOutput:
        img = inp.images.float()
        lum = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).mean((1, 2))
        return RewardOutput(scores=lum if self.target == "bright" else 1 - lum)


@functools.lru_cache(maxsize=64)
def jpeg_floor_bytes(h: int, w: int, quality: int) -> int:
    """Bytes of a flat grey h x w JPEG at `quality`: the headers, tables and least data any image of that size
    costs (about 600 bytes: nothing at 512 px, most of the file at 16 px)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (128, 128, 128)).save(buf, format="JPEG", quality=quality)
    return buf.tell()


class JpegCompressibilityReward(Reward):
    """1 - (JPEG bytes per pixel beyond a flat image's) / max_bpp, clamped to [0, 1] (DDPO's compressibility
    reward, rescaled). The flat image's bytes (headers and tables) are subtracted so that the score means the
    same at any size: counted in, they alone exceeded max_bpp on a tiny model's 16 px images (score 0 always)."""

    def __init__(self, name: str = "", quality: int = 95, max_bpp: float = 3.0):
        super().__init__(name)
        # checked here, not at the first score: PIL's JPEG quality scale is 1..95 (above 95 it turns off parts of
        # the compression, which is what this reward measures), and max_bpp divides
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"{_arg(self, 'quality')}={quality!r} must be an int in 1..95 (JPEG quality; default 95)")
        if not (max_bpp > 0 and math.isfinite(max_bpp)):
            raise ValueError(f"{_arg(self, 'max_bpp')}={max_bpp} must be a finite number > 0 (the JPEG bytes per "
                             f"pixel that score 0; default 3.0)")
        self.quality = quality
        self.max_bpp = max_bpp

    def score(self, inp: RewardInput) -> RewardOutput:
        from PIL import Image

        arr = to_u8(inp.images)
        out = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=self.quality)
            h, w = a.shape[0], a.shape[1]
            bpp = max(0, buf.tell() - jpeg_floor_bytes(h, w, self.quality)) / (h * w)  # bytes per pixel
            out.append(max(0.0, min(1.0, 1.0 - bpp / self.max_bpp)))
        return RewardOutput(scores=torch.tensor(out))

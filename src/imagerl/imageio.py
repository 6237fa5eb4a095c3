"""Float image tensors (the Rollout contract: [3, H, W] in [0, 1]) to 8-bit pixels, one rounding rule for
every consumer (sample files, grids, PNG/JPEG for rewards and judges); decoded files to RGB, one rule for every
reader (data files, the reward server, judges)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_u8(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] float in [0, 1] -> uint8 numpy [..., H, W, 3] (clamped, rounded to nearest)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.movedim(-3, -1).contiguous().cpu().numpy()


def to_rgb(img: Any) -> Any:
    """Any decoded PIL image -> 8-bit RGB as it is displayed: EXIF orientation applied, transparency composited
    onto white (as transformers' image processors do; a plain convert("RGB") shows transparent pixels as black),
    16-bit greyscale scaled to 8 bits (convert("RGB") clips it: almost everything turns white)."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        white.alpha_composite(img.convert("RGBA"))
        return white.convert("RGB")
    return img.convert("RGB")


def load_pil(path: Any, field: str) -> Any:
    """An image file -> PIL RGB as displayed (`to_rgb`); a missing or unreadable file is a DataError naming `field`."""
    from PIL import Image, UnidentifiedImageError

    from .data.prompts import DataError

    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise DataError(f"{field}: image file '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{field}: image '{path}' is corrupt or not an image ({e}); remove the row or fix the file") from None
    return to_rgb(im)


def to_pil(img_3HW: torch.Tensor):
    """[3, H, W] float in [0, 1] -> PIL RGB image."""
    from PIL import Image

    return Image.fromarray(to_u8(img_3HW))

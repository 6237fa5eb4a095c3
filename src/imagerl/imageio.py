"""Float image tensors (the Rollout contract: [3, H, W] in [0, 1]) to 8-bit pixels, one rounding rule for
every consumer (sample files, grids, PNG/JPEG for rewards and judges)."""

from __future__ import annotations

import numpy as np
import torch


def to_u8(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] float in [0, 1] -> uint8 numpy [..., H, W, 3] (clamped, rounded to nearest)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.movedim(-3, -1).contiguous().cpu().numpy()


def to_pil(img_3HW: torch.Tensor):
    """[3, H, W] float in [0, 1] -> PIL RGB image."""
    from PIL import Image

    return Image.fromarray(to_u8(img_3HW))

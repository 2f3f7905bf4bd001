"""Image pyramid helpers shared by training and sampling, so both resize the same way.

Downsampling is area averaging (anti-aliased); upsampling is
bilinear (align_corners=False), which keeps a 2x area-downsample of an upsampled image close to the original.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["downsample", "upsample", "image_pyramid"]


def downsample(x: Tensor, factor: int) -> Tensor:
    """Area-downsample the last two axes by an integer factor; any leading axes, e.g. (B, S, C, H, W)."""
    if factor == 1:
        return x
    lead = x.shape[:-2]
    out = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), factor)
    return out.reshape(*lead, *out.shape[-2:])


def upsample(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of (B, C, h, w) to (B, C, size, size)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def image_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """``levels`` resolutions of x (..., H, W), coarse to fine: level l is area-downsampled by
    2**(levels-1-l)."""
    return [downsample(x, 2 ** (levels - 1 - level)) for level in range(levels)]

"""Where the sources have signal: their foreground on the model grid, and a synthesized volume kept inside it.

A network can write faint values where every source is empty: a model fine-tuned on raw heads learned the noise
of their air and painted it around every brain. A viewer shows that as a haze, and a volume scaled by its own
foreground percentile (``phmdiff eval``'s MRI scale) counts it as tissue and scores the whole brain too bright.
On TCGA-DU-7294 :func:`confine` gave such a model back 2.9 dB (T1 -> T2), while the default model, without a
haze, scored the same (benchmarks/README.md, "The output confined to the sources"). Nothing is known about the
target where no source has signal, so the output is background there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from phmdiff_cli.data.grid import MODEL_BACKGROUND
from phmdiff_cli.data.normalize import CT_WINDOW_HU, foreground_mask
from phmdiff_cli.modalities import is_ct

__all__ = ["SUPPORT_MARGIN", "confine", "source_foreground"]

#: Voxels (model grid, 1 mm in-plane) the sources' foreground is dilated by before the output is cut to it: a
#: partial-volume rim the thresholded foreground leaves out.
SUPPORT_MARGIN = 2


def source_foreground(sources: Sequence[np.ndarray], modalities: Sequence[str]) -> np.ndarray:
    """Boolean foreground of the union of the prepared sources, each ``(Z, H, W)`` in the model range [-1, 1]
    (as :func:`~phmdiff_cli.data.preprocess.prepare_volume` gives it, before any rank normalisation)."""
    mask = np.zeros(sources[0].shape, dtype=bool)
    for array, modality in zip(sources, modalities, strict=True):
        unit = (np.asarray(array, dtype=np.float32) + 1.0) * 0.5
        low, high = CT_WINDOW_HU
        mask |= foreground_mask(unit * (high - low) + low if is_ct(modality) else unit, modality)
    return mask


def confine(mean: np.ndarray, std: np.ndarray | None, foreground: np.ndarray, margin: int = SUPPORT_MARGIN
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """A sampled volume set to background outside ``foreground`` dilated by ``margin`` voxels (6-connected steps),
    its enclosed holes filled (a fluid-filled cavity can be near 0 in every source and bright in the target).

    Args:
        mean: ``(Z, H, W)`` float32 in the model range, background -1 (MRI 0, CT -1024 HU).
        std: its per-voxel standard deviation over draws, or None; 0 outside.
        foreground: ``(Z, H, W)`` bool (:func:`source_foreground`).

    Returns:
        ``(mean, std)``, float32.
    """
    support = ndimage.binary_fill_holes(ndimage.binary_dilation(foreground, iterations=margin) if margin > 0
                                        else foreground)
    mean = np.where(support, mean, np.float32(MODEL_BACKGROUND)).astype(np.float32)
    return mean, None if std is None else np.where(support, std, np.float32(0.0)).astype(np.float32)

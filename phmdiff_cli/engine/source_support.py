"""Where the sources have signal: their foreground on the model grid, and a synthesized volume kept inside it.

A network can write faint values where every source is empty: a model fine-tuned on raw heads learned the noise
of their air and painted it around every brain. A viewer shows that as a haze, and a volume scaled by its own
foreground percentile (``phmdiff eval``'s MRI scale) counts it as tissue and scores the whole brain too bright.
On TCGA-DU-7294 :func:`confine` gave such a model back 2.9 dB (T1 -> T2), while the default model, without a
haze, scored the same (benchmarks/README.md, "The output confined to the sources"). Nothing is known about the
target where no source has signal, so the output is background there. In a head with skull the air holds noise
above the foreground threshold (a 0.41 mm T1 series: its whole field of view), so there the support is the head
itself (:func:`head_foreground`), as the training heads of ``weights/brain_small.py heads`` were cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from phmdiff_cli.data.grid import MODEL_BACKGROUND
from phmdiff_cli.data.normalize import CT_WINDOW_HU, foreground_mask
from phmdiff_cli.modalities import is_ct

__all__ = ["SUPPORT_MARGIN", "HEAD_CLOSING", "confine", "head_foreground", "source_foreground"]

#: Voxels (model grid, 1 mm in-plane) the sources' foreground is dilated by before the output is cut to it: a
#: partial-volume rim the thresholded foreground leaves out.
SUPPORT_MARGIN = 2
#: In-plane closing (voxels) of a head's Otsu foreground before its outline is taken (:func:`head_foreground`): it
#: bridges the dark skull between scalp and brain, and keeps all but 1-2 % of the two raw clinical T1s' interior
#: (their foreground 10 voxels in from the outside) inside the outline, against 9 % unclosed (the skull base).
HEAD_CLOSING = 6


def source_foreground(sources: Sequence[np.ndarray], modalities: Sequence[str], *, head: bool = False) -> np.ndarray:
    """Boolean foreground of the union of the prepared sources, each ``(Z, H, W)`` in the model range [-1, 1]
    (as :func:`~phmdiff_cli.data.preprocess.prepare_volume` gives it, before any rank normalisation); with
    ``head`` (the sources show a head with skull) only its part in the :func:`head_foreground`."""
    mask = np.zeros(sources[0].shape, dtype=bool)
    for array, modality in zip(sources, modalities, strict=True):
        unit = (np.asarray(array, dtype=np.float32) + 1.0) * 0.5
        low, high = CT_WINDOW_HU
        mask |= foreground_mask(unit * (high - low) + low if is_ct(modality) else unit, modality)
    return mask & head_foreground(sources, closing=HEAD_CLOSING) if head else mask


def head_foreground(images: Sequence[np.ndarray], closing: int = 0) -> np.ndarray:
    """The head in images of one grid, each ``(Z, H, W)``: the largest connected component of the union of their
    Otsu foregrounds (SimpleITK's, which separates a head from its noisy air), enclosed holes (ventricles dark on
    T1) filled. Boolean ``(Z, H, W)``.

    Args:
        images: the images, any intensity scale.
        closing: in-plane closing (voxels) of the Otsu foreground before the component is chosen, and holes then
            filled slice by slice: the head's outline, for synthesis. A T1's dark skull and CSF fall below Otsu's
            threshold and can part the scalp from the brain (in a slab of a few slices the brain is then the
            largest component), and a slab encloses none of its ventricles in 3-D. 0: the training heads' cut.
    """
    union = None
    for array in images:
        found = sitk.OtsuThreshold(sitk.GetImageFromArray(np.asarray(array, dtype=np.float32)), 0, 1)
        union = found if union is None else union | found
    if closing == 0:
        largest = sitk.RelabelComponent(sitk.ConnectedComponent(union)) == 1
        return sitk.GetArrayFromImage(sitk.BinaryFillhole(largest)).astype(bool)
    closed = ndimage.binary_closing(sitk.GetArrayFromImage(union).astype(bool), np.ones((1, 3, 3), bool),
                                    iterations=closing)
    labels, _ = ndimage.label(closed)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return np.stack([ndimage.binary_fill_holes(s) for s in largest])


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

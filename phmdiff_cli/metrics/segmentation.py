"""Overlap and surface-distance metrics of label maps (Dice, Hausdorff distance), per label, with MONAI.

Label maps are integer arrays ``(z, y, x)``; 0 is background. Spacing is given in the program's ``(x, y, z)``
order (mm) and reversed here for the ``(z, y, x)`` arrays.

Empty structures follow the BraTS convention: a label absent from both maps scores Dice 1 and distance 0; a
label present in only one scores Dice 0 and distance ``+inf``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["label_values", "dice", "hausdorff_distance", "hd95"]


def _labels(array: np.ndarray) -> np.ndarray:
    values = np.asarray(array)
    if not np.issubdtype(values.dtype, np.integer):
        rounded = np.rint(values)
        if not np.array_equal(rounded, values):
            raise ValueError("not a label map: it holds non-integer values")
        values = rounded
    return values.astype(np.int64, copy=False)


def label_values(pred: np.ndarray, ref: np.ndarray) -> list[int]:
    """The non-zero labels present in either map, sorted."""
    found = np.union1d(np.unique(_labels(pred)), np.unique(_labels(ref)))
    return [int(v) for v in found if v != 0]


def _binary(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    return pred == label, ref == label


def dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice coefficient ``2 |P & R| / (|P| + |R|)`` per label (MONAI ``compute_dice``).

    Args:
        pred, ref: label maps ``(z, y, x)``.
        labels: labels to score; default :func:`label_values`.

    Returns:
        label -> Dice in [0, 1].
    """
    import torch
    from monai.metrics import compute_dice

    pred, ref = _labels(pred), _labels(ref)
    out: dict[int, float] = {}
    for label in label_values(pred, ref) if labels is None else labels:
        p, r = _binary(pred, ref, label)
        # ignore_empty=False: an absent label predicted absent scores 1 (BraTS), not NaN.
        value = compute_dice(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(r)[None, None],
            include_background=True,
            ignore_empty=False,
        )
        out[int(label)] = float(value.item())
    return out


def hausdorff_distance(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing: Sequence[float],
    labels: Sequence[int] | None = None,
    percentile: float | None = 95.0,
) -> dict[int, float]:
    """Symmetric (percentile) Hausdorff distance in mm between the label surfaces, per label (MONAI
    ``compute_hausdorff_distance``: the larger of the two directed percentiles of the Euclidean distances from
    one surface's voxels to the other surface).

    Args:
        pred, ref: label maps ``(z, y, x)``.
        spacing: voxel size in mm, ``(x, y, z)``.
        labels: labels to score; default :func:`label_values`.
        percentile: 95 for HD95; None for the maximum (classic Hausdorff distance).

    Returns:
        label -> distance in mm.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred, ref = _labels(pred), _labels(ref)
    zyx_spacing = [float(s) for s in reversed(tuple(spacing))]
    out: dict[int, float] = {}
    for label in label_values(pred, ref) if labels is None else labels:
        p, r = _binary(pred, ref, label)
        if not p.any() or not r.any():
            out[int(label)] = 0.0 if p.any() == r.any() else math.inf
            continue
        with warnings.catch_warnings():
            # MONAI 1.5+ calls its own deprecated argument internally; nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            value = compute_hausdorff_distance(
                torch.from_numpy(p)[None, None],
                torch.from_numpy(r)[None, None],
                include_background=True,
                percentile=percentile,
                spacing=zyx_spacing,
            )
        out[int(label)] = float(value.item())
    return out


def hd95(
    pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float], labels: Sequence[int] | None = None
) -> dict[int, float]:
    """95th-percentile Hausdorff distance (mm) per label: :func:`hausdorff_distance`, ``percentile=95``."""
    return hausdorff_distance(pred, ref, spacing=spacing, labels=labels, percentile=95.0)

"""Intensity normalisation to the model range [-1, 1], with exact inverses.

MRI has no absolute unit and its scale differs between scanners and sites (the BraTS T1 99.5th percentile ranges
from 522 to 1455 across our four subjects), so each volume is divided by a robust foreground percentile. CT is in
Hounsfield units, so a fixed window (SynthRAD 2023: [-1024, 3000] HU) is mapped linearly instead.

A model may also see its MRI *sources* by rank (:func:`normalize_source`, ``ModelConfig.source_norm``): each
foreground voxel becomes its quantile in the volume's own foreground. That makes the input the same for any
monotone change of scanner intensities, which dividing by a percentile does not. ``benchmarks/source_norm.py``:
a small CNN learns the held-out subject's T1 -> T2 mapping to a brain correlation of 0.77 from ranks against
0.62 from percentile-scaled T1 (T1 -> FLAIR: 0.81 against 0.84).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from phmdiff_cli.modalities import is_ct

__all__ = ["CT_WINDOW_HU", "SOURCE_NORMS", "IntensityParams", "foreground_mask", "fit_intensity",
           "to_model_range", "from_model_range", "unit_scale", "normalize_source"]

#: SynthRAD 2023 CT window, Hounsfield units.
CT_WINDOW_HU: tuple[float, float] = (-1024.0, 3000.0)
#: MRI: the foreground percentile mapped to 1.0 (then to +1 in the model range).
MRI_PERCENTILE = 99.5
#: How a model sees its sources (``ModelConfig.source_norm``): as prepared, or MRI by foreground rank.
SOURCE_NORMS = ("percentile", "rank")
#: Quantiles of the foreground that define the rank mapping (piecewise linear between them).
RANK_QUANTILES = 1025


@dataclass(frozen=True)
class IntensityParams:
    """How one volume was mapped to the model range; ``lo`` maps to -1 and ``hi`` to +1.

    Attributes:
        modality: canonical modality name.
        lo: value mapped to -1 (MRI: 0; CT: window low, HU).
        hi: value mapped to +1 (MRI: the foreground percentile; CT: window high, HU).
    """

    modality: str
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def foreground_mask(array: np.ndarray, modality: str) -> np.ndarray:
    """Boolean foreground: CT voxels above -500 HU (body), MRI voxels above 1% of the 99th percentile of the
    non-zero voxels (skull-stripped or background-suppressed MRI has near-zero air)."""
    if is_ct(modality):
        return array > -500.0
    positive = array[array > 0]
    if positive.size == 0:
        return np.zeros(array.shape, dtype=bool)
    return array > 0.01 * float(np.percentile(positive, 99.0))


def fit_intensity(array: np.ndarray, modality: str, mask: np.ndarray | None = None) -> IntensityParams:
    """Fit the mapping of one volume (any shape) to the model range.

    Args:
        array: voxel values in the file's units (CT: HU).
        modality: canonical modality name.
        mask: optional boolean foreground of the same shape; default :func:`foreground_mask`.
    """
    if is_ct(modality):
        return IntensityParams(modality, *CT_WINDOW_HU)
    fg = foreground_mask(array, modality) if mask is None else mask
    values = array[fg] if fg.any() else array.ravel()
    hi = float(np.percentile(values, MRI_PERCENTILE))
    return IntensityParams(modality, 0.0, hi if hi > 0 else 1.0)


def unit_scale(array: np.ndarray, params: IntensityParams) -> np.ndarray:
    """Map to [0, 1] (``lo`` -> 0, ``hi`` -> 1, clipped), float32: the scale metrics use with data range 1."""
    out = (np.asarray(array, dtype=np.float32) - params.lo) / (params.hi - params.lo)
    return np.clip(out, 0.0, 1.0, out=out)


def to_model_range(array: np.ndarray, params: IntensityParams) -> np.ndarray:
    """Map to the model range [-1, 1] (clipped), float32."""
    return unit_scale(array, params) * 2.0 - 1.0


def from_model_range(array: np.ndarray, params: IntensityParams) -> np.ndarray:
    """Inverse of :func:`to_model_range` for values inside the window, float32 (CT: HU)."""
    return (np.asarray(array, dtype=np.float32) + 1.0) * 0.5 * (params.hi - params.lo) + params.lo


def normalize_source(array: np.ndarray, modality: str, method: str) -> np.ndarray:
    """A source volume as the model sees it: ``array`` (model range, any shape) unchanged for
    ``"percentile"`` or CT (Hounsfield units are absolute); for ``"rank"``, each MRI value replaced by its
    quantile in the volume's own foreground, mapped to [-1, 1] (background and values below the foreground
    stay -1), float32.

    The quantile function is sampled at :data:`RANK_QUANTILES` points and interpolated linearly; tied
    quantiles (integer-valued images) map to the middle of their rank range.
    """
    if method not in SOURCE_NORMS:
        raise ValueError(f"unknown source normalisation {method!r}: use one of {SOURCE_NORMS}")
    if method == "percentile" or is_ct(modality):
        return array
    unit = (np.asarray(array, dtype=np.float32) + 1.0) * 0.5
    fg = foreground_mask(unit, modality)
    values = unit[fg] if fg.any() else unit.ravel()
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, RANK_QUANTILES))
    ranks = np.linspace(-1.0, 1.0, RANK_QUANTILES)
    # np.interp needs increasing abscissae: one point per distinct quantile, at the middle of its ranks.
    distinct, first, counts = np.unique(quantiles, return_index=True, return_counts=True)
    middle = 0.5 * (ranks[first] + ranks[first + counts - 1])
    out = np.interp(unit, distinct, middle, left=-1.0).astype(np.float32)
    out[~fg] = -1.0
    return out

"""Intensity normalisation to the model range [-1, 1], with exact inverses.

MRI has no absolute unit and its scale differs between scanners and sites (the BraTS T1 99.5th percentile ranges
from 522 to 1455 across our four subjects), so each volume is divided by a robust foreground percentile. CT is in
Hounsfield units, so a fixed window (SynthRAD 2023: [-1024, 3000] HU) is mapped linearly instead.

A model may also see its MRI *sources* by rank (:func:`normalize_source`, ``ModelConfig.source_norm``): each
foreground voxel becomes its quantile in the volume's own foreground. That makes the input the same for any
monotone change of scanner intensities, which dividing by a percentile does not. ``benchmarks/source_norm.py``:
a small CNN learns the held-out subject's T1 -> T2 mapping to a brain correlation of 0.77 from ranks against
0.62 from percentile-scaled T1 (T1 -> FLAIR: 0.81 against 0.84).

Empty space is MRI value 0, except in volumes whose background is a constant fill below 0 (z-scored
intensities, as in the BraTS 2013 DeepMedic release: background -3.6 where the brain has mean 0 and std 1):
there the fill is the zero (:func:`background_level`), so background stays background in the model range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from phmdiff_cli.modalities import is_ct

__all__ = ["CT_WINDOW_HU", "SOURCE_NORMS", "IntensityParams", "background_level", "foreground_mask", "fit_intensity",
           "to_model_range", "from_model_range", "unit_scale", "normalize_source"]

#: SynthRAD 2023 CT window, Hounsfield units.
CT_WINDOW_HU: tuple[float, float] = (-1024.0, 3000.0)
#: MRI: the foreground percentile mapped to 1.0 (then to +1 in the model range).
MRI_PERCENTILE = 99.5
#: How a model sees its sources (``ModelConfig.source_norm``): as prepared, or MRI by foreground rank.
SOURCE_NORMS = ("percentile", "rank", "foreground-rank")
#: Where the darkest foreground voxel's rank lands: ``rank`` puts it at -1, the background's value, so dark
#: foreground (CSF on T1, the brightest tissue on T2) looks like background; ``foreground-rank`` leaves a gap.
RANK_FLOOR = {"rank": -1.0, "foreground-rank": -0.5}
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


def _faces(array: np.ndarray) -> np.ndarray:
    """The voxels on the outer faces of an array of any dimension, flattened."""
    return np.concatenate(
        [np.take(array, index, axis=axis).ravel() for axis in range(array.ndim) for index in (0, -1)]
    )


def background_level(array: np.ndarray, modality: str) -> float:
    """The value of empty space: CT the window's low end (HU); MRI 0, or the value of a constant fill below 0
    that covers at least half of the volume's outer faces (a z-scored volume's background)."""
    if is_ct(modality):
        return CT_WINDOW_HU[0]
    faces = _faces(np.asarray(array))
    fill = float(np.median(faces)) if faces.size else 0.0
    if not fill < 0:
        return 0.0
    tolerance = 1e-3 * max(1.0, float(np.ptp(faces)))
    return fill if np.mean(np.abs(faces - fill) <= tolerance) >= 0.5 else 0.0


def foreground_mask(array: np.ndarray, modality: str) -> np.ndarray:
    """Boolean foreground: CT voxels above -500 HU (body), MRI voxels above the background level
    (:func:`background_level`) by more than 1% of the 99th percentile of the voxels above it (skull-stripped
    or background-suppressed MRI has near-empty air)."""
    if is_ct(modality):
        return array > -500.0
    level = background_level(array, modality)
    above = array[array > level] - level
    if above.size == 0:
        return np.zeros(array.shape, dtype=bool)
    return array > level + 0.01 * float(np.percentile(above, 99.0))


def fit_intensity(array: np.ndarray, modality: str, mask: np.ndarray | None = None) -> IntensityParams:
    """Fit the mapping of one volume (any shape) to the model range.

    MRI: ``lo`` is the background level (:func:`background_level`: 0 unless a z-scored fill), ``hi`` the
    foreground's 99.5th percentile.

    Args:
        array: voxel values in the file's units (CT: HU).
        modality: canonical modality name.
        mask: optional boolean foreground of the same shape; default :func:`foreground_mask`.
    """
    if is_ct(modality):
        return IntensityParams(modality, *CT_WINDOW_HU)
    lo = background_level(array, modality)
    fg = foreground_mask(array, modality) if mask is None else mask
    values = array[fg] if fg.any() else array.ravel()
    hi = float(np.percentile(values, MRI_PERCENTILE))
    return IntensityParams(modality, lo, hi if hi > lo else lo + 1.0)


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
    ``"percentile"`` or CT (Hounsfield units are absolute); for ``"rank"`` and ``"foreground-rank"``, each MRI
    value replaced by its quantile in the volume's own foreground, mapped to [:data:`RANK_FLOOR`, 1]
    (background and values below the foreground are -1), float32.

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
    ranks = np.linspace(RANK_FLOOR[method], 1.0, RANK_QUANTILES)
    # np.interp needs increasing abscissae: one point per distinct quantile, at the middle of its ranks.
    distinct, first, counts = np.unique(quantiles, return_index=True, return_counts=True)
    middle = 0.5 * (ranks[first] + ranks[first + counts - 1])
    out = np.interp(unit, distinct, middle, left=-1.0).astype(np.float32)
    out[~fg] = -1.0
    return out

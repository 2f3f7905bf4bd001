"""Contrast calibration of a synthesized MRI volume: its foreground's median-to-99.5th-percentile ratio set to
the training targets' by one power law.

A network trained by regression predicts each voxel's conditional mean. Where a bright structure is uncertain (a
T2's CSF, a FLAIR's lesion) it is predicted dimmer, so the prediction's bright tail shrinks while its bulk does
not, and a volume scaled by its own 99.5th percentile (``phmdiff eval``'s MRI scale, and how a viewer windows
it) shows every tissue too bright. On the validation subjects of ``weights/brain_data.json`` the regression's
ratio was above the real target's in every case (benchmarks/README.md).

The calibration measures the ratio r = median / 99.5th percentile of the prediction's foreground (the sources'
foreground, not the prediction's own, whose faint haze outside the head would count) and maps every voxel
x >= 0 to ``p * (x / p) ** gamma`` with p the 99.5th percentile and ``gamma = log(r_ref) / log(r)``: a power
law moves the median exactly to ``r_ref * p`` and keeps p, the order of all voxels (monotone), the background
at 0 and every value non-negative. ``r_ref`` is the mean ratio over the training subjects' real target images
(the model card's ``contrast``, :func:`reference_ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from phmdiff_cli.data.normalize import MRI_PERCENTILE, background_level, foreground_mask

__all__ = ["GAMMA_LIMITS", "calibrate", "calibrate_model_range", "median_ratio", "reference_ratio"]

#: The power law's exponent is kept in this range: a prediction far outside it is not a contrast mismatch.
GAMMA_LIMITS = (0.25, 4.0)


def median_ratio(values: np.ndarray) -> float:
    """Median over the :data:`~phmdiff_cli.data.normalize.MRI_PERCENTILE` th percentile of foreground
    ``values`` (any shape, >= 0); NaN when empty or the percentile is 0."""
    if values.size == 0:
        return math.nan
    top = float(np.percentile(values, MRI_PERCENTILE))
    return float(np.median(values)) / top if top > 0 else math.nan


def reference_ratio(volumes: Iterable[np.ndarray], modality: str) -> float:
    """Mean :func:`median_ratio` of real ``modality`` volumes (file units, each any shape) over their
    foreground (:func:`~phmdiff_cli.data.normalize.foreground_mask`), measured above the background level (a
    z-scored volume's fill, as ``phmdiff eval`` puts it at 0): the model card's ``contrast`` entry."""
    ratios = [median_ratio(v[foreground_mask(v, modality)] - background_level(v, modality)) for v in volumes]
    ratios = [r for r in ratios if math.isfinite(r)]
    if not ratios:
        raise ValueError(f"no {modality} volume with a foreground to measure the contrast of")
    return float(np.mean(ratios))


def calibrate(unit: np.ndarray, foreground: np.ndarray, reference: float) -> tuple[np.ndarray, float]:
    """Map ``unit`` (``(Z, H, W)``, background 0, any positive scale) so that its foreground's median-to-99.5th-
    percentile ratio is ``reference``.

    Returns:
        ``(calibrated, gamma)``: float32 of ``unit``'s shape, negative values set to 0; gamma 1 (``unit``
        unchanged but clipped) when the foreground is empty or its ratio is not in (0, 1).
    """
    x = np.clip(np.asarray(unit, dtype=np.float32), 0.0, None)
    values = x[foreground]
    if values.size == 0:
        return x, 1.0
    top, median = (float(v) for v in np.percentile(values, [MRI_PERCENTILE, 50.0]))
    ratio = median / top if top > 0 else math.nan
    if not 0.0 < ratio < 1.0:
        return x, 1.0
    gamma = float(np.clip(math.log(reference) / math.log(ratio), *GAMMA_LIMITS))
    return (top * (x / top) ** gamma).astype(np.float32), gamma


def calibrate_model_range(mean: np.ndarray, std: np.ndarray | None, foreground: np.ndarray, reference: float
                          ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """:func:`calibrate` on a sampled volume in the model range.

    Args:
        mean: ``(Z, H, W)`` float32 in [-1, 1], background -1. std: its per-voxel standard deviation over draws
            (model-range units) or None.
        foreground: ``(Z, H, W)`` bool (:func:`~phmdiff_cli.engine.source_support.source_foreground`).
        reference: the target's training ratio (the card's ``contrast``).

    Returns:
        ``(mean, std, gamma)``: the calibrated mean in the model range; std times the power law's local slope
        ``gamma * y / x`` (first order); the exponent.
    """
    unit = (mean + 1.0) * 0.5
    calibrated, gamma = calibrate(unit, foreground, reference)
    if std is not None:
        std = (std * gamma * calibrated / np.maximum(unit, 1e-6)).astype(np.float32)
    return calibrated * 2.0 - 1.0, std, gamma

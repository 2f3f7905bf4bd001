"""The evaluation conventions: which metrics, on which intensity scale, inside which mask.

Conventions (every one explicit, reported with the results):

==============  ==========================================================================================
``--norm``      scale used for PSNR / SSIM / MS-SSIM (data range) and for MAE / MSE / NMSE
==============  ==========================================================================================
``window``      CT default (SynthRAD 2023): HU clipped to [-1024, 3000] and shifted to [0, 4024], data
                range 4024; MAE/MSE/NMSE on the unclipped HU, as SynthRAD's ``ImageMetrics.mae``.
``percentile``  MRI default: each volume divided by its own foreground 99.5th percentile
                (:func:`~phmdiff_cli.data.normalize.fit_intensity`) and clipped to [0, 1]; data range 1.
``minmax``      each volume mapped from its own [min, max] to [0, 1]; data range 1.
``none``        raw values; data range ``--data-range`` or the reference's max - min.
==============  ==========================================================================================

Masks: a file (non-zero voxels), ``auto`` (:func:`auto_mask` of the reference) or none. Inside a mask, MAE,
MSE, NMSE and PSNR use the mask voxels only; SSIM and MS-SSIM average their maps over the mask after setting
the outside to the background (:mod:`phmdiff_cli.metrics.image`). Sharpness is the mean in-plane (per ``z``
slice, as ``ssim2d``) Sobel gradient magnitude of the prediction over the reference's, both on the PSNR/SSIM
scale, averaged over the mask eroded by 3 voxels in ``y`` and ``x`` (whole image without a mask); NaN (null in
JSON) when nothing of the mask survives the erosion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phmdiff_cli.data.normalize import IntensityParams, fit_intensity, foreground_mask, unit_scale
from phmdiff_cli.errors import InputError
from phmdiff_cli.metrics import image, segmentation
from phmdiff_cli.modalities import is_ct

__all__ = [
    "IMAGE_METRICS",
    "LABEL_METRICS",
    "METRICS",
    "NORMS",
    "DEFAULT_METRICS",
    "SHARPNESS_ERODE",
    "EvalSettings",
    "parse_metrics",
    "resolve_norm",
    "auto_mask",
    "Scaled",
    "scale_pair",
    "image_scores",
    "label_scores",
    "summarize",
]

#: Image metrics: name -> description (units on the chosen scale).
IMAGE_METRICS: dict[str, str] = {
    "psnr": "peak signal-to-noise ratio, dB (3-D, MSE over the mask)",
    "ssim": "structural similarity, 3-D",
    "ssim2d": "structural similarity per z slice, mean over slices",
    "ms-ssim": "multi-scale SSIM, 3-D",
    "ms-ssim2d": "multi-scale SSIM per z slice, mean over slices",
    "mae": "mean absolute error (CT: HU)",
    "mse": "mean squared error (CT: HU^2)",
    "nmse": "normalised MSE, sum((pred-ref)^2) / sum(ref^2)",
    "sharpness": "mean in-plane Sobel gradient magnitude, pred / ref, mask eroded by 3 voxels (1 = as sharp)",
}
#: In-plane erosion (voxels) of the mask for ``sharpness``: keeps the mask/background edge out of the means.
SHARPNESS_ERODE = 3
#: Label-map metrics, reported per label as ``dice_<label>``, ``hd95_<label>``.
LABEL_METRICS: dict[str, str] = {
    "dice": "Dice overlap per label",
    "hd95": "95th-percentile symmetric Hausdorff distance per label, mm",
}
METRICS: dict[str, str] = {**IMAGE_METRICS, **LABEL_METRICS}
NORMS = ("auto", "window", "percentile", "minmax", "none")
DEFAULT_METRICS = ("psnr", "ssim", "mae")


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate.

    Attributes:
        metrics: metric names, all image metrics or all label metrics.
        norm: one of :data:`NORMS`.
        data_range: override of the data range for PSNR/SSIM (on the ``norm`` scale).
        window: SSIM window, ``"uniform"`` (7) or ``"gaussian"`` (11, sigma 1.5).
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    norm: str = "auto"
    data_range: float | None = None
    window: str = "uniform"

    @property
    def labels(self) -> bool:
        """True when the inputs are label maps (Dice/HD95)."""
        return all(m in LABEL_METRICS for m in self.metrics)


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"psnr, SSIM,mae"`` -> ``("psnr", "ssim", "mae")``, validated.

    Raises:
        InputError: an unknown metric (the message lists the known ones), none given, or image and label
            metrics mixed.
    """
    names = tuple(dict.fromkeys(n.strip().lower().replace("_", "-") for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        problem = f"unknown metric(s) {', '.join(unknown)}" if unknown else "no metric given"
        raise InputError(problem, hint=f"--metrics takes a comma-separated list of: {', '.join(METRICS)}")
    kinds = {n in LABEL_METRICS for n in names}
    if len(kinds) > 1:
        raise InputError(
            "image metrics and label-map metrics (dice, hd95) cannot be mixed",
            hint="evaluate label maps and images in two runs",
        )
    return names


def resolve_norm(norm: str, modality: str | None) -> str:
    """The normalisation actually used: ``auto`` is ``window`` for CT and ``percentile`` otherwise."""
    if norm not in NORMS:
        raise InputError(f"unknown normalisation {norm!r}", hint=f"--norm takes one of {', '.join(NORMS)}")
    if norm != "auto":
        return norm
    return "window" if is_ct(modality) else "percentile"


def auto_mask(ref: np.ndarray, modality: str | None) -> np.ndarray:
    """The reference's foreground (:func:`~phmdiff_cli.data.normalize.foreground_mask`: CT above -500 HU, MRI
    above 1% of the 99th percentile), with holes filled slice by slice along ``z`` (lungs, sinuses, dark CSF)
    and only its largest 3-D connected component kept (drops the CT table and MRI background speckle).

    Args:
        ref: reference volume ``(z, y, x)`` in file units.
        modality: canonical modality (``ct`` selects the HU threshold).

    Returns:
        boolean ``(z, y, x)``.
    """
    fg = foreground_mask(np.asarray(ref), modality or "mr")
    fg = np.stack([ndimage.binary_fill_holes(s) for s in fg]) if fg.any() else fg
    labels, count = ndimage.label(fg)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
    return fg


@dataclass(frozen=True)
class Scaled:
    """A prediction/reference pair on the scales the metrics use.

    Attributes:
        pred, ref: float arrays ``(z, y, x)`` for PSNR/SSIM/MS-SSIM, in ``[background, background +
            data_range]`` for the bounded norms.
        pred_error, ref_error: arrays for MAE/MSE/NMSE (CT window: unclipped HU).
        data_range: PSNR/SSIM data range.
        background: lower end of the range (given to voxels outside the mask for SSIM).
        norm: the normalisation used.
    """

    pred: np.ndarray
    ref: np.ndarray
    pred_error: np.ndarray
    ref_error: np.ndarray
    data_range: float
    background: float
    norm: str


def _minmax(array: np.ndarray, modality: str | None) -> IntensityParams:
    lo, hi = float(array.min()), float(array.max())
    return IntensityParams(modality or "mr", lo, hi if hi > lo else lo + 1.0)


def scale_pair(
    pred: np.ndarray, ref: np.ndarray, *, modality: str | None, norm: str, data_range: float | None = None
) -> Scaled:
    """Put a pair on the metric scales of :data:`NORMS` (``norm`` already resolved, not ``auto``).

    Args:
        pred, ref: volumes ``(z, y, x)`` in file units (CT: HU).
        modality: canonical modality of the reference.
        norm: ``window``, ``percentile``, ``minmax`` or ``none``.
        data_range: override of the default data range.
    """
    if norm == "none":
        p, r = pred.astype(np.float64), ref.astype(np.float64)
        default = float(r.max() - r.min()) or 1.0
        return Scaled(p, r, p, r, data_range or default, float(r.min()), norm)
    if norm == "window":
        # fit_intensity of CT is the fixed SynthRAD window, whatever the voxels. Clipped and shifted to start
        # at 0 as SynthRAD does: SSIM's luminance term is not shift-invariant.
        window = fit_intensity(ref, "ct")
        lo, hi = window.lo, window.hi
        p, r = (np.clip(a.astype(np.float64), lo, hi) - lo for a in (pred, ref))
        return Scaled(p, r, pred.astype(np.float64), ref.astype(np.float64), data_range or hi - lo, 0.0, norm)
    if norm == "percentile":
        mod = modality or "mr"
        p, r = unit_scale(pred, fit_intensity(pred, mod)), unit_scale(ref, fit_intensity(ref, mod))
    elif norm == "minmax":
        p, r = unit_scale(pred, _minmax(pred, modality)), unit_scale(ref, _minmax(ref, modality))
    else:
        raise InputError(f"unknown normalisation {norm!r}", hint=f"--norm takes one of {', '.join(NORMS)}")
    return Scaled(p, r, p, r, data_range or 1.0, 0.0, norm)


def image_scores(scaled: Scaled, mask: np.ndarray | None, settings: EvalSettings) -> dict[str, float]:
    """The image metrics of ``settings`` for one scaled pair, inside ``mask`` (boolean ``(z, y, x)``) if
    given.

    Raises:
        InputError: the mask is empty or too thin, or the volume too small for the SSIM window.
    """
    s, out = scaled, {}
    ssim_args = {
        "data_range": s.data_range,
        "mask": mask,
        "window": settings.window,
        "background": s.background,
    }
    compute = {
        "psnr": lambda: image.psnr(s.pred, s.ref, data_range=s.data_range, mask=mask),
        "ssim": lambda: image.ssim(s.pred, s.ref, spatial_dims=3, **ssim_args),
        "ssim2d": lambda: image.ssim(s.pred, s.ref, spatial_dims=2, **ssim_args),
        "ms-ssim": lambda: image.ms_ssim(s.pred, s.ref, spatial_dims=3, **ssim_args),
        "ms-ssim2d": lambda: image.ms_ssim(s.pred, s.ref, spatial_dims=2, **ssim_args),
        "mae": lambda: image.mae(s.pred_error, s.ref_error, mask),
        "mse": lambda: image.mse(s.pred_error, s.ref_error, mask),
        "nmse": lambda: image.nmse(s.pred_error, s.ref_error, mask),
        "sharpness": lambda: image.sharpness(s.pred, s.ref, mask, erode=SHARPNESS_ERODE),
    }
    for name in settings.metrics:
        try:
            out[name] = compute[name]()
        except ValueError as error:
            raise InputError(f"cannot compute {name}: {error}") from None
    return out


def label_scores(
    pred: np.ndarray, ref: np.ndarray, *, spacing: tuple[float, float, float], metrics: tuple[str, ...]
) -> dict[str, float]:
    """Dice / HD95 per label of two label maps ``(z, y, x)`` (spacing ``(x, y, z)`` mm), keyed
    ``dice_<label>`` and ``hd95_<label>`` for every non-zero label present in either map."""
    try:
        labels = segmentation.label_values(pred, ref)
        per_metric = {
            "dice": lambda: segmentation.dice(pred, ref, labels),
            "hd95": lambda: segmentation.hd95(pred, ref, spacing=spacing, labels=labels),
        }
        return {f"{name}_{label}": value for name in metrics for label, value in per_metric[name]().items()}
    except ValueError as error:
        raise InputError(f"cannot compute {', '.join(metrics)}: {error}") from None


def summarize(rows: list[dict[str, float]]) -> dict[str, dict[str, float | int]]:
    """Mean, population standard deviation (numpy's ``ddof=0``), median and count of each column over cases
    (columns missing from a case are skipped for it; ``inf`` propagates to the mean and std)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out: dict[str, dict[str, float | int]] = {}
    for column in columns:
        values = np.array([row[column] for row in rows if column in row], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            out[column] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values)) if np.all(np.isfinite(values)) else math.nan,
                "median": float(np.median(values)),
                "n": int(values.size),
            }
    return out

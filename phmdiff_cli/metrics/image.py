"""Image-similarity metrics of a prediction against a reference, optionally inside a mask.

All functions take ``pred`` and ``ref`` as arrays of the same shape - volumes ``(z, y, x)`` in the program's
convention - already on the scale to be compared (see :mod:`phmdiff_cli.metrics.evaluate` for the
normalisation conventions), and an optional boolean ``mask`` of that shape. Values are computed in float64
(MS-SSIM: float32, as MONAI does).

SSIM inside a mask follows the SynthRAD 2023 evaluation (``SynthRAD2023/metrics``,
``functions/image_metrics.py``, ``ImageMetrics.ssim``): voxels outside the mask are set to the ``background``
(the lower end of the intensity range) in both images, the SSIM map is computed over the whole image, the
border strip of half a window is dropped (scikit-image's ``crop(ssim_map, pad)``), and the map is averaged
over the mask voxels that remain. Without a mask the value is exactly scikit-image's
``structural_similarity``.

Windows (``window=``): ``"uniform"`` is scikit-image's default (7 voxels a side, sample covariance), used by
SynthRAD 2023; ``"gaussian"`` is Wang et al. 2004 (11 taps, sigma 1.5, population covariance), the setting of
MONAI's ``SSIMMetric``, torchmetrics and pytorch-msssim.

Sharpness (:func:`sharpness`) is not a similarity but a ratio: the mean in-plane Sobel gradient magnitude of
the prediction over the reference's, inside the mask eroded by a few voxels in-plane (1.0: as sharp as the
reference; below 1: blurrier, as an over-smoothed synthesis; above 1: sharper or noisier).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity
from skimage.util import crop

__all__ = ["WINDOWS", "MS_SSIM_WEIGHTS", "mae", "mse", "nmse", "psnr", "ssim", "ms_ssim", "sharpness"]

Window = Literal["uniform", "gaussian"]

#: SSIM windows: scikit-image keyword arguments, and the side (voxels) of the window.
WINDOWS: dict[str, tuple[dict[str, Any], int]] = {
    "uniform": ({"win_size": 7, "gaussian_weights": False, "use_sample_covariance": True}, 7),
    # skimage truncates its Gaussian at 3.5 sigma: radius int(3.5 * 1.5 + 0.5) = 5, the 11 taps of Wang 2004.
    "gaussian": ({"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}, 11),
}
#: MS-SSIM scale weights (Wang, Simoncelli and Bovik 2003), finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _checked(
    pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """float64 images and a boolean mask; ValueError on a shape mismatch or an empty mask."""
    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    if mask is None:
        return pred, ref, None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != ref.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {ref.shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    return pred, ref, mask


def _pair(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The voxels to compare (masked, flattened), as float64."""
    pred, ref, mask = _checked(pred, ref, mask)
    return (pred.ravel(), ref.ravel()) if mask is None else (pred[mask], ref[mask])


def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error over the (masked) voxels, in the units of the inputs (CT: HU)."""
    p, r = _pair(pred, ref, mask)
    return float(np.mean(np.abs(p - r)))


def mse(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error over the (masked) voxels, in squared units of the inputs."""
    p, r = _pair(pred, ref, mask)
    return float(np.mean((p - r) ** 2))


def nmse(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised MSE ``sum((pred - ref)^2) / sum(ref^2)`` over the (masked) voxels (the fastMRI definition;
    the square of scikit-image's ``normalized_root_mse(ref, pred, normalization='euclidean')``)."""
    p, r = _pair(pred, ref, mask)
    energy = float(np.sum(r**2))
    return float(np.sum((p - r) ** 2)) / energy if energy > 0 else math.inf


def psnr(pred: np.ndarray, ref: np.ndarray, *, data_range: float, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB over the (masked) voxels.

    As SynthRAD 2023 (``ImageMetrics.psnr``): the MSE is taken over the mask voxels only, with a fixed data
    range rather than the range of the image. Identical inputs give ``+inf``.
    """
    error = mse(pred, ref, mask)
    return math.inf if error == 0 else 10.0 * math.log10(data_range**2 / error)


def _box(mask: np.ndarray, margins: tuple[int, ...], min_sizes: tuple[int, ...]) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margins`` and to ``min_sizes`` at least (per axis), in bounds."""
    box = []
    for axis, (margin, min_size) in enumerate(zip(margins, min_sizes, strict=True)):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        n = mask.shape[axis]
        lo, hi = max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, n)
        grow = max(min_size - (hi - lo), 0)
        lo = max(lo - grow, 0)
        hi = min(max(hi, lo + min_size), n)
        box.append(slice(lo, hi))
    return tuple(box)


def _ssim_one(
    pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None, data_range: float, window: str
) -> float:
    """SSIM of one image pair (2-D or 3-D, float64), masked as in SynthRAD 2023; NaN when no mask voxel lies
    inside the border strip."""
    kwargs, size = WINDOWS[window]
    pad = (size - 1) // 2
    if mask is None:
        return float(structural_similarity(ref, pred, data_range=data_range, **kwargs))
    if not mask.any():
        return math.nan
    # SSIM map values depend only on a window around each voxel, so cropping to the mask's bounding box grown
    # by the window radius gives the same values inside the mask, in a fraction of the time.
    box = _box(mask, (pad,) * mask.ndim, (size,) * mask.ndim)
    _, ssim_map = structural_similarity(ref[box], pred[box], data_range=data_range, full=True, **kwargs)
    inside = crop(mask[box], pad)
    return float(crop(ssim_map, pad)[inside].mean(dtype=np.float64)) if inside.any() else math.nan


def _masked_inputs(
    pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None, background: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """float64 copies with the voxels outside ``mask`` set to ``background`` (SynthRAD 2023)."""
    pred, ref, mask = _checked(pred, ref, mask)
    if mask is None:
        return pred, ref, None
    return np.where(mask, pred, background), np.where(mask, ref, background), mask


def ssim(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
    window: Window = "uniform",
    spatial_dims: int = 3,
    background: float = 0.0,
) -> float:
    """Structural similarity, 3-D over the volume or the mean of 2-D values over slices.

    Args:
        pred, ref: volumes ``(z, y, x)`` on the scale to compare.
        data_range: intensity range (``L`` in the SSIM constants ``(K L)^2``).
        mask: boolean ``(z, y, x)``; the SSIM map is averaged over these voxels (see the module docstring).
        window: ``"uniform"`` (7, SynthRAD 2023 / scikit-image default) or ``"gaussian"`` (11, sigma 1.5).
        spatial_dims: 3 for one 3-D SSIM; 2 for per-slice 2-D SSIM along axis 0 (``z``), averaged over the
            slices (with a mask: over the slices with mask voxels away from the slice border).
        background: value given to voxels outside the mask in both images: the lower end of the range.

    Raises:
        ValueError: shapes differ, the mask is empty or lies entirely in the border strip, or the image is
            smaller than the window.
    """
    pred, ref, mask = _masked_inputs(pred, ref, mask, background)
    if spatial_dims == 3:
        value = _ssim_one(pred, ref, mask, data_range, window)
    elif spatial_dims == 2:
        slices = range(ref.shape[0]) if mask is None else np.flatnonzero(mask.any(axis=(1, 2)))
        values = [
            _ssim_one(pred[z], ref[z], None if mask is None else mask[z], data_range, window) for z in slices
        ]
        finite = [v for v in values if not math.isnan(v)]
        value = float(np.mean(finite)) if finite else math.nan
    else:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if math.isnan(value):
        raise ValueError("no mask voxel lies away from the image border (half an SSIM window)")
    return value


def _pad_for_scales(
    pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, min_size: int, spatial_dims: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge-pad the images (zero-pad the mask) so every spatial axis has ``min_size`` voxels, as SynthRAD
    2025's MS-SSIM does; padded voxels are outside the mask, so they never count."""
    first = pred.ndim - spatial_dims
    widths = [(0, 0)] * first + [
        ((min_size - n) // 2, min_size - n - (min_size - n) // 2) if n < min_size else (0, 0)
        for n in pred.shape[first:]
    ]
    return np.pad(pred, widths, mode="edge"), np.pad(ref, widths, mode="edge"), np.pad(mask, widths)


def ms_ssim(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
    window: Window = "uniform",
    spatial_dims: int = 3,
    background: float = 0.0,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> float:
    """Multi-scale SSIM (Wang et al. 2003) with MONAI's ``compute_ssim_and_cs`` at each scale.

    Without a mask, on images of at least ``window side * 2^(scales-1)`` voxels a side, this is exactly
    MONAI's ``MultiScaleSSIMMetric`` (population covariance, 2x2(x2) average pooling between scales, negative
    terms clamped to 0). Smaller images are edge-padded to that size (SynthRAD 2025). With a mask, voxels
    outside it are set to ``background`` and each scale's contrast-structure term (SSIM at the coarsest scale)
    is averaged over the mask, itself average-pooled and kept where at least half covered (SynthRAD 2025's
    masked MS-SSIM).

    Args:
        pred, ref: volumes ``(z, y, x)``.
        data_range: intensity range.
        mask: boolean ``(z, y, x)`` or None.
        window: ``"uniform"`` (7, SynthRAD 2025) or ``"gaussian"`` (11 taps, sigma 1.5, MONAI's default; 3-D
            convolutions with 11^3 taps are slow on a CPU: about a minute for a 240x240x155 volume).
        spatial_dims: 3, or 2 for per-slice MS-SSIM along axis 0 averaged over slices (with a mask: over the
            slices whose mask survives at every scale).
        background: value outside the mask (lower end of the range).
        weights: per-scale exponents, finest first.

    Raises:
        ValueError: as :func:`ssim`, or a mask that vanishes at a coarse scale (too small or thin).
    """
    import torch
    import torch.nn.functional as F
    from monai.metrics.regression import compute_ssim_and_cs

    pred, ref, mask = _masked_inputs(pred, ref, mask, background)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    size = WINDOWS[window][1]
    keep = np.ones(ref.shape, dtype=bool) if mask is None else mask
    pred, ref, keep = _pad_for_scales(pred, ref, keep, size * 2 ** (len(weights) - 1), spatial_dims)

    # (batch, channel, *spatial): one 3-D image, or the z slices as a batch of 2-D images.
    def tensor(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return t[None, None] if spatial_dims == 3 else t[:, None]

    x, y, m = tensor(pred), tensor(ref), tensor(keep.astype(np.float32))
    pool = F.avg_pool3d if spatial_dims == 3 else F.avg_pool2d
    pad = (size - 1) // 2
    inner = (slice(None), slice(None)) + (slice(pad, -pad),) * spatial_dims
    terms = []
    valid = torch.ones(x.shape[0], dtype=torch.bool)
    for level in range(len(weights)):
        ssim_map, cs_map = compute_ssim_and_cs(
            y_pred=x,
            y=y,
            spatial_dims=spatial_dims,
            kernel_size=[size] * spatial_dims,
            kernel_sigma=[1.5] * spatial_dims,
            data_range=data_range,
            kernel_type=window,
        )
        # The maps cover the voxels half a window or more from the border ("valid" convolution).
        inside = (m[inner] >= 0.5).flatten(1)
        term = (ssim_map if level == len(weights) - 1 else cs_map).flatten(1)
        count = inside.sum(dim=1)
        terms.append(torch.relu((term * inside).sum(dim=1) / count.clamp(min=1)).double())
        valid &= count > 0
        x, y, m = pool(x, kernel_size=2), pool(y, kernel_size=2), pool(m, kernel_size=2)
    exponents = torch.tensor(weights, dtype=torch.float64)[:, None]
    values = torch.prod(torch.stack(terms) ** exponents, dim=0)
    if not bool(valid.any()):
        raise ValueError("the mask vanishes at a coarse MS-SSIM scale")
    return float(values[valid].mean())


def _inplane_gradient(image: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude ``sqrt(gx^2 + gy^2)`` over the last two axes, float64, same shape.

    Each axis is ``scipy.ndimage.sobel``'s: derivative ``[-1, 0, 1]`` along it, smoothing ``[1, 2, 1]`` along
    the other in-plane axis, ``reflect`` at the image border; unlike ``ndimage.sobel`` of a volume, nothing is
    smoothed across slices (axis 0 of a volume), so each slice gives what ``ndimage.sobel`` of it alone gives.
    """
    y, x = image.ndim - 2, image.ndim - 1
    gy = ndimage.correlate1d(ndimage.correlate1d(image, [-1.0, 0.0, 1.0], axis=y), [1.0, 2.0, 1.0], axis=x)
    gx = ndimage.correlate1d(ndimage.correlate1d(image, [-1.0, 0.0, 1.0], axis=x), [1.0, 2.0, 1.0], axis=y)
    return np.hypot(gx, gy)


def _erode_inplane(mask: np.ndarray, voxels: int) -> np.ndarray:
    """``mask`` eroded by ``voxels`` in the plane of the last two axes, slice by slice: a voxel is kept when
    the ``(2 voxels + 1)^2`` square around it in its slice lies in the mask and in the image (a 3x3 box,
    ``(1, 3, 3)`` for a volume, iterated ``voxels`` times; outside the image counts as outside the mask)."""
    if voxels == 0:  # binary_erosion's iterations=0 means "until nothing changes"
        return mask
    structure = np.ones((1,) * (mask.ndim - 2) + (3, 3), dtype=bool)
    return ndimage.binary_erosion(mask, structure=structure, iterations=voxels, border_value=0)


def sharpness(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, *, erode: int = 3) -> float:
    """Mean in-plane Sobel gradient magnitude of ``pred`` over that of ``ref`` (1.0: as sharp as ``ref``).

    The gradient magnitude ``sqrt(gx^2 + gy^2)`` is computed on the whole image (``scipy.ndimage.sobel`` along
    ``y`` and ``x`` only, see :func:`_inplane_gradient`), then averaged over the mask eroded by ``erode``
    voxels in ``y`` and ``x`` (a voxel counts when the ``(2 erode + 1)^2`` in-plane square around it is in the
    mask), so the edge between the mask and the background, and any voxel outside the mask, never enter
    either mean. The ratio is of means, in the inputs' units per voxel (no spacing): compare images on the
    same grid and on the same scale (``phmdiff eval``: the PSNR/SSIM scale).

    Args:
        pred, ref: images of the same shape, volumes ``(z, y, x)`` (gradient within each ``z`` slice, the
            slices of ``ssim(spatial_dims=2)``) or single slices ``(y, x)``.
        mask: boolean, same shape; None for the whole image (no erosion, ``reflect`` at the border).
        erode: in-plane erosion of the mask, voxels (0: the mask as given).

    Returns:
        ``mean |grad pred| / mean |grad ref|`` over the eroded mask; NaN when the eroded mask is empty (the
        mask is thinner than ``2 erode + 1`` voxels everywhere) or the reference has no gradient there.

    Raises:
        ValueError: shapes differ, the images are not 2-D or 3-D, the mask is empty, or ``erode`` < 0.
    """
    pred, ref, mask = _checked(pred, ref, mask)
    if ref.ndim not in (2, 3):
        raise ValueError(f"sharpness needs 2-D (y, x) or 3-D (z, y, x) images, got shape {ref.shape}")
    if erode < 0:
        raise ValueError(f"erode must be 0 or more voxels, got {erode}")
    region = None if mask is None else _erode_inplane(mask, erode)
    if region is not None and not region.any():
        return math.nan
    grad_pred, grad_ref = _inplane_gradient(pred), _inplane_gradient(ref)
    if region is not None:
        grad_pred, grad_ref = grad_pred[region], grad_ref[region]
    denominator = float(np.mean(grad_ref))
    return float(np.mean(grad_pred)) / denominator if denominator > 0 else math.nan

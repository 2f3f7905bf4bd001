"""The model's in-plane grid, and resampling onto it with an exact recorded inverse.

The model sees axial slices of a canonical volume (:func:`phmdiff_cli.io.to_canonical`: array ``(z, y, x)``, x
to the patient's Left, y Posterior) on a square grid of ``size`` pixels at ``spacing_mm``. Slices along z are
kept as they are: the slice thickness of the input is the model's business only through its 2.5D context.

Resampling keeps the field of view: the in-plane axis of ``n`` voxels at spacing ``s`` becomes ``round(n * s /
spacing_mm)`` model pixels whose outer edges coincide with the input's, then a centred crop or pad to ``size``
(pad with the background). At the model spacing this is an integer crop/pad and the inverse is exact.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from phmdiff_cli.io.volume import Volume

__all__ = [
    "MODEL_BACKGROUND",
    "ModelGrid",
    "GridTransform",
    "GridCropWarning",
    "to_model_grid",
    "from_model_grid",
]

#: Air / empty space in the model range [-1, 1] (MRI 0 and CT -1024 HU both map to -1).
MODEL_BACKGROUND = -1.0

Interpolator = Literal["linear", "nearest"]
_SITK_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


class GridCropWarning(UserWarning):
    """The model grid cuts off foreground (the message says how many mm)."""


@dataclass(frozen=True)
class ModelGrid:
    """Square in-plane model grid.

    Attributes:
        size: pixels per side (H = W).
        spacing_mm: pixel size in mm.
    """

    size: int
    spacing_mm: float

    def __post_init__(self) -> None:
        if self.size < 1 or not self.spacing_mm > 0:
            raise ValueError(f"invalid model grid: size {self.size}, spacing {self.spacing_mm} mm")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class GridTransform:
    """How a canonical volume was put on the model grid; enough to invert it exactly.

    Attributes:
        shape: canonical volume shape ``(z, y, x)``.
        spacing: canonical in-plane spacing in mm ``(x, y)``.
        grid: the model grid.
        offset: ``(x, y)`` index of model pixel 0 among the model pixels of the full field of view (negative:
            padded).
        background: value used for padding (and for regions outside the model grid on the way back).
        lost_mm: ``(x, y)`` extent of foreground cut off by the crop, mm (0 when nothing was lost).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float]
    grid: ModelGrid
    offset: tuple[int, int]
    background: float
    lost_mm: tuple[float, float] = (0.0, 0.0)

    @property
    def same_spacing(self) -> bool:
        """Both in-plane spacings equal the model spacing: resampling is an integer crop/pad (exact)."""
        return all(math.isclose(s, self.grid.spacing_mm, rel_tol=1e-6) for s in self.spacing)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridTransform:
        return cls(
            shape=tuple(data["shape"]),  # type: ignore[arg-type]
            spacing=tuple(data["spacing"]),  # type: ignore[arg-type]
            grid=ModelGrid(**data["grid"]),
            offset=tuple(data["offset"]),  # type: ignore[arg-type]
            background=float(data["background"]),
            lost_mm=tuple(data.get("lost_mm", (0.0, 0.0))),  # type: ignore[arg-type]
        )

    def origin_mm(self, axis: int) -> float:
        """In-plane position (mm) of model pixel 0's centre, with input voxel 0's centre at 0 mm."""
        s_in, s_out = self.spacing[axis], self.grid.spacing_mm
        return (self.offset[axis] + 0.5) * s_out - 0.5 * s_in


def _sigma(factor: float) -> float:
    """Gaussian anti-aliasing sigma (input pixels) before downsampling by ``factor``: scikit-image's rule."""
    return max(0.0, (factor - 1.0) / 2.0)


def _resample(
    array: np.ndarray,
    src_spacing: tuple[float, float],
    src_origin: tuple[float, float],
    dst_spacing: tuple[float, float],
    dst_origin: tuple[float, float],
    dst_size: tuple[int, int],
    interpolator: Interpolator,
    background: float,
) -> np.ndarray:
    """Resample each axial slice of ``array`` (z, y, x) in-plane; z positions coincide, so z is untouched.

    Spacings, origins and sizes are ``(x, y)``; origins in mm of pixel 0's centre in a shared in-plane frame.
    """
    if interpolator == "linear":
        sigma = [0.0] + [_sigma(dst_spacing[a] / src_spacing[a]) for a in (1, 0)]
        if any(sigma):
            array = ndimage.gaussian_filter(array.astype(np.float32, copy=False), sigma, mode="nearest")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((*src_spacing, 1.0))
    image.SetOrigin((*src_origin, 0.0))
    depth = array.shape[0]
    out = sitk.Resample(
        image,
        (*dst_size, depth),
        sitk.Transform(),
        _SITK_INTERPOLATORS[interpolator],
        (*dst_origin, 0.0),
        (*dst_spacing, 1.0),
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        float(background),
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def _crop_pad(
    array: np.ndarray, offset: tuple[int, int], size: tuple[int, int], background: float
) -> np.ndarray:
    """``out[:, j, i] = array[:, j + offset_y, i + offset_x]`` (background outside), for (z, y, x) arrays;
    ``offset`` and ``size`` are ``(x, y)``."""
    out = np.full((array.shape[0], size[1], size[0]), background, dtype=np.float32)
    src, dst = [], []
    for axis, n_in in ((0, array.shape[2]), (1, array.shape[1])):
        lo = max(0, offset[axis])
        hi = min(n_in, offset[axis] + size[axis])
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - offset[axis], max(lo, hi) - offset[axis]))
    out[:, dst[1], dst[0]] = array[:, src[1], src[0]]
    return out


def _lost_mm(foreground: np.ndarray, transform: GridTransform) -> tuple[float, float]:
    """Foreground extent (mm) outside the model grid along x and y (largest of the two sides)."""
    lost = []
    for axis, reduce_axes in ((0, (0, 1)), (1, (0, 2))):
        present = np.flatnonzero(foreground.any(axis=reduce_axes))
        if present.size == 0:
            lost.append(0.0)
            continue
        s_in, s_out = transform.spacing[axis], transform.grid.spacing_mm
        keep_lo = transform.origin_mm(axis) - 0.5 * s_out
        keep_hi = keep_lo + transform.grid.size * s_out
        fg_lo, fg_hi = (present[0] - 0.5) * s_in, (present[-1] + 0.5) * s_in
        lost.append(round(float(max(0.0, keep_lo - fg_lo, fg_hi - keep_hi)), 3))
    return lost[0], lost[1]


def to_model_grid(
    volume: Volume,
    grid: ModelGrid,
    *,
    interpolator: Interpolator = "linear",
    background: float = MODEL_BACKGROUND,
    warn_crop: bool = True,
) -> tuple[np.ndarray, GridTransform]:
    """Put a canonical volume's axial slices on the model grid.

    Args:
        volume: a canonical :class:`phmdiff_cli.io.Volume` (array ``(z, y, x)``; values already in the model
            range for images).
        grid: the model grid.
        interpolator: ``"linear"`` for images (Gaussian anti-aliasing when downsampling), ``"nearest"`` for
            labels and masks.
        background: padding value: :data:`MODEL_BACKGROUND` (-1) for images in the model range, 0 for labels.
            Voxels above it count as foreground for the crop warning.
        warn_crop: warn when foreground is cut off (off for a second array of an image already checked).

    Returns:
        ``(slices, transform)``: float32 ``(z, size, size)`` (axis order z, y, x), and the transform for
        :func:`from_model_grid`.

    Warns:
        GridCropWarning: foreground is cut off by the crop to ``grid.size`` (the message gives the mm lost).
    """
    array = np.asarray(volume.array)
    depth, ny, nx = array.shape
    spacing = (float(volume.spacing[0]), float(volume.spacing[1]))
    full = [round(n * s / grid.spacing_mm) for n, s in zip((nx, ny), spacing, strict=True)]
    offset = ((full[0] - grid.size) // 2, (full[1] - grid.size) // 2)
    transform = GridTransform((depth, ny, nx), spacing, grid, offset, float(background))
    transform = replace(transform, lost_mm=_lost_mm(array > background, transform))
    if warn_crop and max(transform.lost_mm) > 0.5 * grid.spacing_mm:
        where = f"{volume.meta['path']}: " if volume.meta.get("path") else ""
        warnings.warn(
            f"{where}the {grid.size}-pixel model grid at {grid.spacing_mm:g} mm cuts off "
            f"{transform.lost_mm[0]:g} mm (left-right) and {transform.lost_mm[1]:g} mm (front-back) of "
            "foreground",
            GridCropWarning,
            stacklevel=2,
        )
    size = (grid.size, grid.size)
    if transform.same_spacing:
        return _crop_pad(array, offset, size, background), transform
    origin = (transform.origin_mm(0), transform.origin_mm(1))
    out = _resample(
        array, spacing, (0.0, 0.0), (grid.spacing_mm,) * 2, origin, size, interpolator, background
    )
    return out, transform


def from_model_grid(
    slices: np.ndarray, transform: GridTransform, *, interpolator: Interpolator = "linear"
) -> np.ndarray:
    """Put model-grid slices back on the canonical volume's grid: the inverse of :func:`to_model_grid`.

    Args:
        slices: ``(z, size, size)`` model-grid slices (e.g. the synthesized image in the model range).
        transform: from :func:`to_model_grid`.
        interpolator: ``"linear"`` for images, ``"nearest"`` for labels.

    Returns:
        float32 ``(z, y, x)`` of ``transform.shape``; regions the crop removed are ``transform.background``.
        Exact (bit for bit) at the model spacing.
    """
    depth, ny, nx = transform.shape
    size = transform.grid.size
    if slices.shape != (depth, size, size):
        raise ValueError(f"slices shape {slices.shape} does not match the grid ({depth}, {size}, {size})")
    if transform.same_spacing:
        back = (-transform.offset[0], -transform.offset[1])
        return _crop_pad(np.asarray(slices, dtype=np.float32), back, (nx, ny), transform.background)
    origin = (transform.origin_mm(0), transform.origin_mm(1))
    spacing = (transform.grid.spacing_mm,) * 2
    return _resample(
        np.asarray(slices),
        spacing,
        origin,
        transform.spacing,
        (0.0, 0.0),
        (nx, ny),
        interpolator,
        transform.background,
    )

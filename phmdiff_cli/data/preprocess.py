"""From image files to model-grid slices and back: one code path for training and synthesis.

Forward (:func:`prepare_volume`): ``to_canonical`` (exact axis permutation/flip) -> intensity fit and map to
the model range [-1, 1] -> in-plane resampling onto the model grid. Inverse (:func:`restore_volume`): model
grid -> canonical grid -> file units -> the original voxel axes. A subject's images must share one grid
(:func:`load_subject`), or be resampled onto the reference (target) image's grid on request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from phmdiff_cli.data.grid import MODEL_BACKGROUND, GridTransform, ModelGrid, from_model_grid, to_model_grid
from phmdiff_cli.data.layouts import MASK_KEY, Subject
from phmdiff_cli.data.normalize import (
    IntensityParams,
    fit_intensity,
    foreground_mask,
    from_model_range,
    to_model_range,
)
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import Volume, canonical_grid, from_canonical, read_volume, to_canonical
from phmdiff_cli.modalities import is_ct

__all__ = ["Prepared", "prepare_volume", "restore_volume", "resample_onto", "thin_slices", "thicken_onto",
           "load_subject", "shows_skull", "HEAD_AREA_CM2"]


#: A stack of slices longer than this (mm) is no anatomy: its header's voxel size is wrong.
MAX_STACK_MM = 2000.0
#: The largest axial foreground cross-section (cm2) above which a volume shows a head with skull, not a
#: skull-stripped brain (measured on ../shared/data: brains <= 201 cm2, heads with skull 231-432 cm2).
HEAD_AREA_CM2 = 215.0


@dataclass(frozen=True)
class Prepared:
    """One volume on the model grid.

    Attributes:
        array: float32 ``(z, size, size)`` in the model range (axial slices of the canonical volume).
        params: the intensity mapping (inverse: :func:`~phmdiff_cli.data.normalize.from_model_range`).
        transform: the grid mapping (inverse: :func:`~phmdiff_cli.data.grid.from_model_grid`).
        foreground: float32 ``(z,)``: fraction of each model-grid slice that is foreground (the mask's, if
            given, else :func:`~phmdiff_cli.data.normalize.foreground_mask`'s), for slice sampling weights.
    """

    array: np.ndarray
    params: IntensityParams
    transform: GridTransform
    foreground: np.ndarray


def shows_skull(foreground: np.ndarray, grid: ModelGrid) -> bool:
    """Whether a prepared volume shows a head with skull (what a ``skull_condition`` model is told): its largest
    axial foreground cross-section exceeds :data:`HEAD_AREA_CM2`, which tells a head from a brain even in a slab.

    Args:
        foreground: :attr:`Prepared.foreground` ``(z,)`` on ``grid`` (a given brain mask's: a brain).
        grid: the model grid.
    """
    slice_cm2 = (grid.size * grid.spacing_mm) ** 2 / 100.0
    return bool(foreground.size) and float(foreground.max()) * slice_cm2 > HEAD_AREA_CM2


def prepare_volume(
    volume: Volume, grid: ModelGrid, *, modality: str | None = None, mask: Volume | None = None
) -> Prepared:
    """Map an image (as read, any orientation) onto the model grid in the model range.

    Args:
        volume: the image in file units (CT: HU).
        grid: the model grid.
        modality: canonical modality; default ``volume.modality``.
        mask: optional body/brain mask on the same grid as ``volume``: intensities are fitted inside it, it
            defines the foreground, and MRI voxels outside it become background.

    Raises:
        InputError: the modality is unknown, or the mask is on another grid.
    """
    modality = modality or volume.modality
    if modality is None:
        raise InputError(
            "cannot tell the image's modality",
            path=volume.meta.get("path"),
            hint="name the file by modality (e.g. ID-t1n.nii.gz) or pass the modality",
        )
    if mask is not None and not mask.same_grid(volume, tol=1e-3):
        raise InputError(
            "the mask is not on the image's grid",
            path=mask.meta.get("path"),
            hint=f"resample it onto {volume.meta.get('path', 'the image')}",
        )
    canonical = to_canonical(volume)
    raw = canonical.array.astype(np.float32, copy=False)
    fg = to_canonical(mask).array > 0 if mask is not None else foreground_mask(raw, modality)
    params = fit_intensity(raw, modality, fg if mask is not None else None)
    if mask is not None and not is_ct(modality):  # a brain mask: what lies outside it is background
        raw = np.where(fg, raw, np.float32(params.lo))
    slices, transform = to_model_grid(
        canonical.with_array(to_model_range(raw, params)), grid, background=MODEL_BACKGROUND
    )
    fg_grid, _ = to_model_grid(
        canonical.with_array(fg.astype(np.float32)),
        grid,
        interpolator="nearest",
        background=0.0,
        warn_crop=False,
    )
    return Prepared(slices, params, transform, fg_grid.mean(axis=(1, 2), dtype=np.float32))


def restore_volume(
    slices: np.ndarray, params: IntensityParams, transform: GridTransform, reference: Volume
) -> Volume:
    """Inverse of :func:`prepare_volume`: model-grid slices in the model range -> ``reference``'s exact grid.

    Args:
        slices: ``(z, size, size)`` in the model range (e.g. a synthesized target).
        params: intensity mapping to invert (for a synthesized MRI: the one chosen for the output scale).
        transform: the grid transform of a volume prepared from ``reference``.
        reference: the image as read (its grid, axes and metadata are the output's).

    Returns:
        float32 values in file units (CT: HU) on ``reference``'s grid; modality ``params.modality``.
    """
    canonical = from_model_range(from_model_grid(slices, transform), params)
    # The canonical grid only: reorienting the reference's voxels too would copy a whole volume for nothing.
    grid_volume = Volume(canonical, *canonical_grid(reference), modality=params.modality, meta=dict(reference.meta))
    return from_canonical(grid_volume, reference)


def resample_onto(volume: Volume, reference: Volume, *, nearest: bool) -> Volume:
    """``volume`` resampled onto ``reference``'s grid (linear, or nearest for masks); outside: its minimum."""
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(image, reference.to_sitk(), sitk.Transform(), interpolator, float(volume.array.min()))
    meta = {**volume.meta, "resampled_onto": reference.meta.get("path")}
    return Volume.from_sitk(out, modality=volume.modality, meta=meta)


def thin_slices(volume: Volume, step_mm: float, *, nearest: bool = False) -> Volume:
    """``volume`` on its canonical grid with axial slices ``step_mm`` apart, from its first slice to its last or
    less than ``step_mm`` past it (linear, or nearest for masks): thick slices made thin, so that the 2.5-D
    context of a slice holds its physical neighbours. The in-plane grid is unchanged.

    Raises:
        InputError: the slices span more than :data:`MAX_STACK_MM` (a wrong voxel size in the header, which would
            otherwise be thinned into thousands of slices).
    """
    canonical = to_canonical(volume)
    sx, sy, sz = canonical.spacing
    span = (canonical.shape[0] - 1) * sz
    if span > MAX_STACK_MM:
        raise InputError(f"{canonical.shape[0]} slices {sz:.4g} mm apart span {span:.4g} mm: no anatomy is that long",
                         path=volume.meta.get("path"), hint="check the voxel size in the header")
    # Up to the last slice or just past it (never short of it: a thick slice beyond the thin ones would be
    # sampled outside them, as background).
    count = max(1, math.ceil(span / step_mm - 1e-6) + 1)
    reference = Volume(np.zeros((count, *canonical.shape[1:]), dtype=np.uint8), np.array([sx, sy, step_mm]),
                       canonical.origin, canonical.direction, meta=dict(volume.meta))
    thin = resample_onto(canonical, reference, nearest=nearest)
    return reference.with_array(thin.array, modality=volume.modality)


def thicken_onto(volume: Volume, reference: Volume) -> Volume:
    """Inverse of :func:`thin_slices`: a thin-slice ``volume`` back onto ``reference``'s exact grid (its meta
    kept). A thick slice integrates its thickness, so each thin slice is first averaged with the thin slices within
    the thick slice's step (a box along the slices), then sampled at the thick slices' centres (linear)."""
    from scipy import ndimage  # only needed here; keeps `phmdiff --help` fast

    width = max(1, round(float(canonical_grid(reference).spacing[2]) / float(volume.spacing[2])))
    box = ndimage.uniform_filter1d(volume.array.astype(np.float32), width, axis=0, mode="nearest")
    back = resample_onto(volume.with_array(box), reference, nearest=False)
    return reference.with_array(back.array.astype(np.float32), modality=volume.modality)


def load_subject(
    subject: Subject, modalities: Sequence[str], *, reference: str, resample: bool = False
) -> dict[str, Volume]:
    """Read a subject's images (and its mask under :data:`~phmdiff_cli.data.layouts.MASK_KEY`) and check they
    share one grid.

    Args:
        subject: the subject.
        modalities: the modalities to read (all in ``subject.images``).
        reference: the modality whose grid the others must match (the target of the pair).
        resample: resample images (linear) and the mask (nearest) that are on another grid onto the
            reference's, instead of refusing.

    Raises:
        InputError: grids differ and ``resample`` is false (naming both files), or a file cannot be read.
    """
    paths = {m: subject.images[m] for m in modalities}
    if subject.mask is not None:
        paths[MASK_KEY] = subject.mask
    volumes = {key: read_volume(path) for key, path in paths.items()}
    for key, volume in volumes.items():
        volume.modality = None if key == MASK_KEY else key
    ref = volumes[reference]
    for key, volume in volumes.items():
        if volume.same_grid(ref, tol=1e-3):
            continue
        if not resample:
            raise InputError(
                f"not on the grid of {paths[reference].name} (size {volume.size} vs {ref.size}, spacing "
                f"{_fmt(volume.spacing)} vs {_fmt(ref.spacing)} mm, origin {_fmt(volume.origin)} vs "
                f"{_fmt(ref.origin)} mm)",
                path=paths[key],
                hint=f"register the images, or let phmdiff resample them onto the {reference} grid "
                "(--resample)",
            )
        volumes[key] = resample_onto(volume, ref, nearest=key == MASK_KEY)
    return volumes


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

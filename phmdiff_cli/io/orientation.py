"""Canonical orientation: permute and flip voxel axes (never resample) so that the grid is as close to LPS as
it can be, and the exact inverse.

In the canonical volume voxel axis x runs towards the patient's Left, y Posterior and z Superior (as closely
as an oblique grid allows), so ``array[k]`` is an axial slice, ``array[k, j]`` a row from right to left.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from nibabel.orientations import apply_orientation, io_orientation

from phmdiff_cli.io.volume import Grid, Volume

__all__ = ["ORIENTATION_CONVENTION", "orientation_code", "canonical_grid", "to_canonical", "from_canonical"]

#: How :func:`orientation_code` letters read (printed by ``phmdiff info``).
ORIENTATION_CONVENTION = (
    "letters name where the x, y, z voxel axes point (L/R, P/A, S/I), as SimpleITK and nibabel's "
    "aff2axcodes; an identity direction in LPS space is 'LPS'"
)


def orientation_code(direction: tuple[float, ...] | np.ndarray) -> str:
    """Three letters naming where the x, y and z voxel axes point, nearest axis for oblique grids
    (``'LPS'`` for the identity direction; the same letters as nibabel's ``aff2axcodes`` and SimpleITK)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        [float(v) for v in np.ravel(direction)]
    )


def _ornt(volume: Volume) -> np.ndarray:
    """nibabel orientation ``(3, 2)``: row ``i`` = (LPS axis closest to voxel axis ``i``, +1 or -1)."""
    return io_orientation(volume.index_to_physical())


def _reoriented_grid(volume: Volume, ornt: np.ndarray) -> tuple[tuple[int, ...], Grid]:
    """Array shape ``(z, y, x)`` and grid after applying ``ornt`` (voxel axis i -> axis ``ornt[i, 0]``,
    flipped if ``ornt[i, 1]`` is -1)."""
    direction = volume.direction_matrix
    size = np.asarray(volume.size)
    new_direction = np.zeros((3, 3))
    new_spacing = np.zeros(3)
    new_size = np.zeros(3, dtype=int)
    origin = np.asarray(volume.origin, dtype=np.float64)
    for axis, (target, flip) in enumerate(ornt.astype(int)):
        new_direction[:, target] = direction[:, axis] * flip
        new_spacing[target] = volume.spacing[axis]
        new_size[target] = size[axis]
        if flip < 0:
            # The last voxel of a flipped axis becomes the first one.
            origin = origin + direction[:, axis] * volume.spacing[axis] * (size[axis] - 1)
    shape = tuple(int(n) for n in new_size[::-1])
    return shape, Grid.of(new_spacing, origin, new_direction)


def _apply(array_zyx: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation given in (x, y, z) axis terms to a ``(z, y, x)`` array; contiguous copy."""
    return np.ascontiguousarray(apply_orientation(array_zyx.transpose(2, 1, 0), ornt).transpose(2, 1, 0))


def canonical_grid(volume: Volume) -> Grid:
    """The grid :func:`to_canonical` would give ``volume``, without touching its voxels."""
    return _reoriented_grid(volume, _ornt(volume))[1]


def to_canonical(volume: Volume) -> Volume:
    """The same image with axes permuted/flipped so that its direction is closest to identity (LPS).

    Exact: no interpolation; physical position of every voxel unchanged. ``meta`` is kept (it describes the
    source) and :func:`from_canonical` needs the original volume as reference.
    """
    ornt = _ornt(volume)
    return Volume(_apply(volume.array, ornt), *canonical_grid(volume), modality=volume.modality,
                  meta=dict(volume.meta))


def from_canonical(volume: Volume, reference: Volume) -> Volume:
    """Put a canonical-orientation volume (e.g. a synthesized image) back onto ``reference``'s voxel axes.

    Args:
        volume: on the grid of ``to_canonical(reference)``.
        reference: the original volume; its grid and meta are used for the result.

    Returns:
        ``reference.with_array(...)`` with ``volume``'s voxels and modality; exact inverse of
        :func:`to_canonical`.

    Raises:
        ValueError: ``volume`` is not on the canonical grid of ``reference``.
    """
    ornt = _ornt(reference)
    shape, grid = _reoriented_grid(reference, ornt)
    if volume.shape != shape or not volume.same_grid(Volume(volume.array, *grid), tol=1e-4):
        raise ValueError("volume is not on the canonical grid of the reference")
    inverse = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt.astype(int)):
        inverse[target] = (axis, flip)
    return reference.with_array(_apply(volume.array, inverse), modality=volume.modality)

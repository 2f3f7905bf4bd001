"""Geometry of a DICOM slice stack: consistency checks, classification (regular, tilted, uneven, missing or
duplicate slices) and resampling of irregular stacks onto a regular grid.

All positions are LPS mm, from ImagePositionPatient / ImageOrientationPatient; the slices of one series are
parallel planes, sorted here along their normal ``row x column``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from phmdiff_cli.errors import InputError
from phmdiff_cli.io.volume import Grid

__all__ = [
    "SliceStack",
    "slice_stack",
    "frame_stack",
    "classify_steps",
    "regular_grid",
    "resample_stack",
    "resample_note",
]

#: Relative tolerance on slice steps (1 %) and absolute tolerance on in-plane shifts (mm).
_STEP_RTOL = 0.01
_SHIFT_TOL_MM = 0.01
#: A resampled stack gets at most this many times the source slice count.
_MAX_UPSAMPLING = 4


@dataclass
class SliceStack:
    """Slice geometry of a series, sorted along the slice normal ``n`` (LPS mm)."""

    files: list[str]
    positions: np.ndarray  # (N, 3) ImagePositionPatient
    row: np.ndarray  # direction of increasing column index (x)
    col: np.ndarray  # direction of increasing row index (y)
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (x, y) mm
    shape: tuple[int, int]  # (rows, columns)
    thickness: float = 1.0  # mm: the slice step of a single slice (SpacingBetweenSlices or SliceThickness)
    #: For the frames of one multi-frame file (``files`` then repeats its name): each slice's frame index.
    frames: np.ndarray | None = None

    @property
    def depths(self) -> np.ndarray:
        """Position of each slice along the normal, mm, increasing."""
        return self.positions @ self.normal


def _float_tag(header: pydicom.Dataset, keyword: str, count: int, path: str | None = None) -> np.ndarray:
    """``count`` finite floats of ``keyword``; errors name ``path`` (default the header's file)."""
    path = path or header.filename
    value = header.get(keyword)
    if value is None:
        raise InputError(f"no {keyword} in this slice (damaged file, or not an image slice)", path=path)
    try:
        array = np.asarray([float(v) for v in (value if count > 1 else [value])], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"malformed {keyword} {value!r}", path=path) from None
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise InputError(f"malformed {keyword} {value!r}", path=path)
    return array


def slice_stack(headers: list[pydicom.Dataset], folder: Path) -> SliceStack:
    """Check that the slices of a series share orientation, matrix and pixel spacing; sort them along the
    normal. An enhanced multi-frame file is read frame by frame (:func:`frame_stack`).

    Raises:
        InputError: several multi-frame files, missing or inconsistent geometry tags. A single slice is a
            one-slice stack, as thick as its SpacingBetweenSlices or SliceThickness (else 1 mm).
    """
    if any(int(h.get("NumberOfFrames") or 1) > 1 for h in headers):
        if len(headers) > 1:
            raise InputError(f"a series of {len(headers)} files of which some are multi-frame", path=folder,
                             hint="give one multi-frame file, or convert the series to NIfTI (dcm2niix)")
        return frame_stack(headers[0])
    shape = (int(headers[0].get("Rows") or 0), int(headers[0].get("Columns") or 0))
    for h in headers[1:]:
        if (int(h.get("Rows") or 0), int(h.get("Columns") or 0)) != shape:
            raise InputError("slices of this series have different matrix sizes", path=h.filename)
    return _sorted_stack(
        [str(h.filename) for h in headers],
        [_float_tag(h, "ImageOrientationPatient", 6) for h in headers],
        [_float_tag(h, "PixelSpacing", 2) for h in headers],
        np.stack([_float_tag(h, "ImagePositionPatient", 3) for h in headers]),
        shape, _thickness(headers[0]), what="slices of this series",
    )


def frame_stack(header: pydicom.Dataset) -> SliceStack:
    """The frames of an enhanced (multi-frame) MR or CT image as a stack, from its functional groups: each
    frame's PlanePosition, and PlaneOrientation and PixelMeasures per frame or shared.

    Raises:
        InputError: a multi-frame object without per-frame geometry (RT dose, ultrasound, secondary capture),
            or frames that disagree on orientation or pixel spacing (several stacks in one file).
    """
    path, frames = str(header.filename), int(header.NumberOfFrames)
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        raise InputError(
            f"a {frames}-frame DICOM object without per-frame plane positions "
            f"({header.get('Modality') or 'unknown'} modality; not an enhanced MR or CT image)",
            path=path, hint="give an MR or CT image series",
        )

    def group(index: int, sequence: str, keyword: str) -> pydicom.Dataset:
        for item in (per_frame[index], *(header.get("SharedFunctionalGroupsSequence") or [])[:1]):
            found = item.get(sequence)
            if found and keyword in found[0]:
                return found[0]
        raise InputError(f"frame {index + 1} has no {keyword} ({sequence})", path=path)

    indices = range(frames)
    pixel_measures = group(0, "PixelMeasuresSequence", "PixelSpacing")
    return _sorted_stack(
        [path] * frames,
        [_float_tag(group(i, "PlaneOrientationSequence", "ImageOrientationPatient"), "ImageOrientationPatient",
                    6, path) for i in indices],
        [_float_tag(group(i, "PixelMeasuresSequence", "PixelSpacing"), "PixelSpacing", 2, path) for i in indices],
        np.stack([_float_tag(group(i, "PlanePositionSequence", "ImagePositionPatient"), "ImagePositionPatient",
                             3, path) for i in indices]),
        (int(header.get("Rows") or 0), int(header.get("Columns") or 0)),
        _thickness(pixel_measures), what="frames of this file", frames=True,
    )


def _sorted_stack(files: list[str], orientations: list[np.ndarray], spacings: list[np.ndarray],
                  positions: np.ndarray, shape: tuple[int, int], thickness: float, *, what: str,
                  frames: bool = False) -> SliceStack:
    """A stack of N slices (or frames of one file) checked to share orientation and pixel spacing, sorted
    along the normal; ``positions`` (N, 3) LPS mm."""
    orientation, spacing = orientations[0], spacings[0]
    for i in range(1, len(files)):
        if not np.allclose(orientations[i], orientation, atol=1e-4):
            raise InputError(f"{what} have different orientations (e.g. a localizer, or several stacks)",
                             path=files[i], hint="remove the odd slices or pick another series")
        if not np.allclose(spacings[i], spacing, rtol=1e-4):
            raise InputError(f"{what} have different pixel spacings", path=files[i])
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(f"invalid ImageOrientationPatient {orientation.tolist()}", path=files[0])
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    order = np.argsort(positions @ normal, kind="stable")
    return SliceStack(
        files=[files[i] for i in order],
        positions=positions[order],
        row=row,
        col=col,
        normal=normal,
        pixel_spacing=(float(spacing[1]), float(spacing[0])),
        shape=shape,
        thickness=thickness,
        frames=order if frames else None,
    )


def _thickness(header: pydicom.Dataset) -> float:
    """SpacingBetweenSlices, else SliceThickness, else 1 mm: the step given to a single slice."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(header.get(keyword) or 0)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    return 1.0


def classify_steps(stack: SliceStack, folder: Path) -> tuple[bool, bool]:
    """Classify the stack as (evenly spaced, tilted).

    Raises:
        InputError: duplicate positions, or gaps that are whole multiples of the step (missing slices).
    """
    if len(stack.files) == 1:
        return True, False
    steps = np.diff(stack.depths)
    tol = 1e-3 * min(stack.pixel_spacing)
    duplicates = int(np.count_nonzero(steps < tol))
    if duplicates:
        raise InputError(
            f"{duplicates + 1} or more slices share a position (duplicates, or several echoes/time points)",
            path=folder,
            hint="keep one slice per position, or split the series into one folder per volume",
        )
    median = float(np.median(steps))
    ratios = steps / median
    even = bool(np.all(np.abs(ratios - 1) <= _STEP_RTOL))
    if not even and np.all(np.abs(ratios - np.round(ratios)) <= 5 * _STEP_RTOL):
        gaps = [(float(stack.depths[i]), float(stack.depths[i + 1])) for i in np.flatnonzero(ratios > 1.5)]
        missing = int(np.round(ratios).sum() - len(ratios))
        where = ", ".join(f"{a:.2f}..{b:.2f}" for a, b in gaps[:3])
        raise InputError(
            f"{missing} slice(s) missing: gaps at {where} mm along the normal (slice step {median:.3g} mm)",
            path=folder,
            hint="copy the complete series",
        )
    offsets = stack.positions - stack.positions[0] - np.outer(stack.depths - stack.depths[0], stack.normal)
    shift = float(np.linalg.norm(offsets, axis=1).max())
    field = min(stack.shape[0] * stack.pixel_spacing[1], stack.shape[1] * stack.pixel_spacing[0])  # mm
    if shift > field:
        # A real gantry tilt shifts the last slice by a fraction of the field of view; more than all of it
        # means positions that do not describe one volume (and a resampling grid too large to allocate).
        raise InputError(
            f"the slices are shifted in-plane by up to {shift:.0f} mm, more than the field of view "
            f"({field:.0f} mm): not one tilted volume",
            path=folder,
        )
    tilted = shift > _SHIFT_TOL_MM
    return even, tilted


def _direction(stack: SliceStack) -> np.ndarray:
    return np.column_stack([stack.row, stack.col, stack.normal])


def regular_grid(stack: SliceStack) -> Grid:
    """The grid of an evenly spaced, straight stack: slice step = mean step, origin = first slice."""
    step = float(np.diff(stack.depths).mean()) if len(stack.files) > 1 else stack.thickness
    return Grid.of(np.array([*stack.pixel_spacing, step]), stack.positions[0], _direction(stack))


def resample_stack(stack: SliceStack, array: np.ndarray) -> tuple[np.ndarray, Grid]:
    """Resample a tilted or unevenly spaced stack onto a regular grid with axes (row, column, normal).

    Args:
        stack: the sorted slice geometry.
        array: voxels ``(slice, row, column)`` in stack order.

    Returns:
        float32 voxels ``(z, y, x)`` and their grid. The slice step is the smallest source step (at most
        :data:`_MAX_UPSAMPLING` times the source slice count).

    Each target plane lies between two source slices (all slices are parallel planes); the two are shifted
    in-plane by their exact offsets and blended linearly by distance. The in-plane grid grows to cover every
    shifted slice; voxels outside all slices get the series' minimum value.
    """
    from scipy import ndimage  # only needed here; keeps `phmdiff --help` fast

    depths = stack.depths
    sx, sy = stack.pixel_spacing
    offsets = stack.positions - stack.positions[0] - np.outer(depths - depths[0], stack.normal)
    shift_x, shift_y = offsets @ stack.row / sx, offsets @ stack.col / sy  # in pixels, per slice
    x0, y0 = math.floor(shift_x.min() + 1e-6), math.floor(shift_y.min() + 1e-6)
    rows = stack.shape[0] + math.ceil(shift_y.max() - 1e-6) - y0
    cols = stack.shape[1] + math.ceil(shift_x.max() - 1e-6) - x0
    fill = float(array.min())
    shifted = np.stack(
        [
            ndimage.affine_transform(
                array[s].astype(np.float32),
                np.ones(2),
                offset=(y0 - shift_y[s], x0 - shift_x[s]),
                output_shape=(rows, cols),
                order=1,
                mode="constant",
                cval=fill,
            )
            for s in range(len(depths))
        ]
    )
    span = float(depths[-1] - depths[0])
    count = min(round(span / float(np.diff(depths).min())) + 1, _MAX_UPSAMPLING * len(depths))
    step = span / (count - 1)
    where = np.interp(depths[0] + step * np.arange(count), depths, np.arange(len(depths), dtype=np.float64))
    lower = np.minimum(np.floor(where).astype(int), len(depths) - 2)
    out = np.empty((count, rows, cols), dtype=np.float32)
    for k, (s, w) in enumerate(zip(lower, (where - lower).astype(np.float32), strict=True)):
        # Plane by plane: whole-volume temporaries would be several times the output's size.
        np.multiply(shifted[s], 1 - w, out=out[k])
        out[k] += w * shifted[s + 1]
    origin = stack.positions[0] + stack.row * sx * x0 + stack.col * sy * y0
    return out, Grid.of(np.array([sx, sy, step]), origin, _direction(stack))


def resample_note(stack: SliceStack, even: bool, tilted: bool, step: float) -> str:
    """One sentence saying why and how the stack was resampled (for warnings)."""
    reasons = []
    if tilted:
        travel = stack.positions[-1] - stack.positions[0]
        angle = math.degrees(math.acos(min(1.0, abs(travel @ stack.normal) / np.linalg.norm(travel))))
        reasons.append(f"gantry tilt of {angle:.1f} degrees")
    if not even:
        steps = np.diff(stack.depths)
        reasons.append(f"uneven slice spacing ({steps.min():.2f} to {steps.max():.2f} mm)")
    return (
        f"{' and '.join(reasons)}: resampled onto a regular grid perpendicular to the slices "
        f"({step:.3g} mm step, linear interpolation)"
    )

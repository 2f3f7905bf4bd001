"""NIfTI-1/2 through nibabel, converted exactly between nibabel's RAS affine and :class:`Volume`'s LPS grid.

nibabel (not SimpleITK) because it keeps the header: SimpleITK rewrites qform and sform, and drops descrip,
intent and the xform codes. The affine chosen is nibabel's (sform when its code is set, else qform), as in
FSL, nibabel and most NIfTI tools.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy

from phmdiff_cli.errors import InputError
from phmdiff_cli.io.volume import Grid, Volume

__all__ = [
    "NIFTI_SUFFIXES",
    "is_nifti_path",
    "ras_affine",
    "grid_from_ras_affine",
    "read_nifti",
    "write_nifti",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")

log = logging.getLogger(__name__)

#: LPS <-> RAS: negate the first two physical axes (its own inverse).
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


def is_nifti_path(path: str | Path) -> bool:
    """True for ``*.nii`` and ``*.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def ras_affine(volume: Volume) -> np.ndarray:
    """The 4x4 NIfTI affine (voxel ``(i, j, k)`` = ``(x, y, z)`` index -> RAS mm) of a volume's grid."""
    affine = np.eye(4)
    affine[:3, :3] = _LPS_RAS @ volume.direction_matrix * np.asarray(volume.spacing)
    affine[:3, 3] = _LPS_RAS @ np.asarray(volume.origin)
    return affine


def grid_from_ras_affine(affine: np.ndarray) -> Grid:
    """Spacing ``(x, y, z)`` mm, LPS origin and row-major LPS direction of a 4x4 RAS affine.

    Raises:
        ValueError: the affine is singular or sheared (its columns are not orthogonal), which a direction
            matrix cannot represent.
    """
    lps = _LPS_RAS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing == 0) or not np.all(np.isfinite(lps)):
        raise ValueError("the affine is singular")
    direction = lps / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        raise ValueError("the affine is sheared (its axes are not orthogonal)")
    origin = _LPS_RAS @ np.asarray(affine, dtype=np.float64)[:3, 3]
    return Grid.of(spacing, origin, direction)


def _load(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,  # e.g. "vox offset 0 too low", "data code 0 not recognized"
        OSError,
        EOFError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
        OverflowError,
    ) as error:
        raise InputError(f"not a readable NIfTI file ({_reason(error)})", path=path) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"not a NIfTI image but {type(image).__name__}", path=path)
    return image


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]


def _voxels(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The voxels as ``(z, y, x)``: stored dtype (native byte order), or float32 when the header scales them
    (as SimpleITK does)."""
    shape = image.shape
    if any(n < 1 for n in shape):
        raise InputError(f"invalid dimensions {tuple(shape)} in the header", path=path)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        what = f"{len(shape)}-D image of shape {tuple(image.shape)}"
        hint = "split it into 3-D volumes (e.g. fslsplit) and pass one" if len(shape) > 3 else None
        raise InputError(f"a {what}, a 3-D volume is needed", path=path, hint=hint)
    if int(np.prod(shape, dtype=np.int64)) * image.get_data_dtype().itemsize > 2**34:
        raise InputError(f"implausible image size {tuple(image.shape)}", path=path)
    proxy = cast(ArrayProxy, image.dataobj)
    slope, inter = proxy.slope, proxy.inter
    try:
        raw = np.asanyarray(proxy.get_unscaled()).reshape(shape)
    except (OSError, EOFError, zlib.error, ValueError, OverflowError, MemoryError,
            nib.spatialimages.HeaderDataError) as error:
        raise InputError(f"cannot read the voxel data ({_reason(error)})", path=path) from None
    if slope == 1 and inter == 0:
        data = raw.astype(raw.dtype.newbyteorder("="), copy=False)  # native byte order for numpy/torch
    else:
        data = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def read_nifti(path: str | Path) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file into a :class:`Volume` (array ``(z, y, x)``, LPS grid).

    A 4-D image whose trailing dimensions are 1 is squeezed to 3-D. The header is kept in
    ``meta['nifti_header']`` so that :func:`write_nifti` reproduces it on the same grid.

    Raises:
        InputError: unreadable or truncated file, not 3-D, sheared affine.
    """
    path = Path(path)
    image = _load(path)
    data = _voxels(image, path)
    try:
        grid = grid_from_ras_affine(image.affine)
    except ValueError as error:
        raise InputError(f"unusable orientation: {error}", path=path) from None
    header = image.header.copy()
    warnings = []
    if not header.get_sform(coded=True)[1] and not header.get_qform(coded=True)[1]:
        warnings.append(
            "no qform or sform in the header: position and orientation are unknown "
            "(voxel sizes only, as nibabel and SimpleITK assume)"
        )
        log.warning("%s: %s", path, warnings[-1])
    meta = {"path": str(path), "format": "nifti", "nifti_header": header, "warnings": warnings}
    return Volume(data, *grid, meta=meta)


def _header_for(volume: Volume, affine: np.ndarray) -> nib.Nifti1Header:
    """The source header when it describes this grid (qform/sform and their codes kept), else a fresh one
    with both xforms set to the grid (code 1, scanner)."""
    source = volume.meta.get("nifti_header")
    if isinstance(source, nib.Nifti1Header) and tuple(source.get_data_shape()[:3]) == volume.size:
        sform, qform = source.get_sform(coded=True), source.get_qform(coded=True)
        chosen = sform[0] if sform[1] else qform[0] if qform[1] else None
        if chosen is not None and np.allclose(chosen, affine, rtol=0, atol=1e-5):
            header = source.copy()
            header.set_data_shape(volume.size)
            # Geometry is what is kept; the display window and intent described the source's values.
            header["cal_min"], header["cal_max"] = 0.0, 0.0
            header.set_intent("none")
            return header
    header = nib.Nifti1Header()
    header.set_data_shape(volume.size)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return header


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write a volume to ``path`` (``.nii`` or ``.nii.gz``) on its exact grid, unscaled, in the array's dtype.

    Not atomic by itself: callers write to a temporary path (:func:`phmdiff_cli.io.atomic.atomic_path`).
    """
    affine = ras_affine(volume)
    header = _header_for(volume, affine)
    dtype = volume.array.dtype
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    elif dtype.kind == "f" and dtype.itemsize < 4:
        dtype = np.dtype(np.float32)  # NIfTI-1 has no float16
    header.set_data_dtype(dtype)
    # No scaling: the values written are the array's values (the source's scl_slope/inter described its data).
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    image = nib.Nifti1Image(volume.array.astype(dtype, copy=False).transpose(2, 1, 0), None, header=header)
    image.update_header()
    nib.save(image, path)
    return Path(path)

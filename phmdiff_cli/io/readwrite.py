"""Read and write NIfTI (nibabel), MHA/NRRD (SimpleITK) and DICOM series folders (GDCM and pydicom).

Every failure a user can cause is an :class:`~phmdiff_cli.errors.InputError` naming the file; every write goes
to a temporary path renamed at the end, so no half-written output is ever left behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from phmdiff_cli.errors import InputError
from phmdiff_cli.io.atomic import atomic_path
from phmdiff_cli.io.dicom_read import is_dicom_file, read_dicom
from phmdiff_cli.io.dicom_write import write_dicom_series
from phmdiff_cli.io.nifti import is_nifti_path, read_nifti, write_nifti
from phmdiff_cli.io.volume import Volume
from phmdiff_cli.modalities import modality_from_filename

__all__ = ["ITK_SUFFIXES", "FORMATS", "read_volume", "write_volume", "output_format"]

#: Formats read through SimpleITK; written only as single files (.mha, .nrrd): the two-file .mhd/.nhdr would
#: name a temporary data file in their header after the atomic rename.
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_ITK_WRITE_SUFFIXES = (".mha", ".nrrd")
#: Output formats accepted by :func:`write_volume` (``format=``).
FORMATS = ("nifti", "itk", "dicom")
_IMAGE_HINT = "give a NIfTI (.nii, .nii.gz), MHA/NRRD file or a DICOM series folder"


def read_volume(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read a 3-D image: ``.nii``/``.nii.gz``, ``.mha``/``.mhd``/``.nrrd``, or a DICOM folder (or one of its
    files).

    Args:
        path: the image file, or a folder holding one DICOM series.
        series_uid: SeriesInstanceUID to pick when the folder holds several series.

    Returns:
        The volume (array ``(z, y, x)``, LPS grid), ``modality`` from the DICOM Modality tag or the file name,
        ``meta['path']`` and ``meta['format']`` set.

    Raises:
        InputError: missing, unreadable or malformed input, not 3-D, NaN/Inf voxels, ambiguous DICOM folder.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    if path.is_dir() or is_dicom_file(path):
        volume = read_dicom(path, series_uid=series_uid)
    elif series_uid is not None:
        raise InputError("--series-uid applies to DICOM folders only", path=path)
    elif is_nifti_path(path):
        volume = read_nifti(path)
    elif path.name.lower().endswith(ITK_SUFFIXES):
        volume = _read_itk(path)
    else:
        raise InputError(
            "not a supported image (unknown suffix and no DICOM header)", path=path, hint=_IMAGE_HINT
        )
    _check_values(volume, path)
    if volume.modality is None:
        volume.modality = modality_from_filename(path)
    return volume


def _read_itk(path: Path) -> Volume:
    if path.stat().st_size == 0:
        raise InputError("empty file", path=path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        # ITK's text names its own source files and a stale errno; the user needs only this.
        raise InputError(
            f"not a readable {path.suffix} image (damaged, truncated or not that format)", path=path
        ) from None
    while image.GetDimension() > 3 and image.GetSize()[-1] == 1:
        image = image[(slice(None),) * (image.GetDimension() - 1) + (0,)]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"a {image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()} component(s) per "
            "voxel, a 3-D scalar volume is needed",
            path=path,
        )
    return Volume.from_sitk(image, meta={"path": str(path), "format": "itk"})


def _check_values(volume: Volume, path: Path) -> None:
    """Reject empty grids and non-finite voxels: they would poison normalisation and the model silently."""
    kind = volume.array.dtype.kind
    if kind not in "biuf":
        raise InputError(f"unsupported voxel type {volume.array.dtype} (need real scalar values)", path=path)
    if volume.array.size == 0:
        raise InputError(f"empty image of shape {volume.shape}", path=path)
    if min(volume.spacing) <= 0 or not np.all(np.isfinite(volume.spacing + volume.origin + volume.direction)):
        raise InputError(f"invalid voxel spacing {volume.spacing} or origin {volume.origin}", path=path)
    if np.issubdtype(volume.array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        if bad:
            raise InputError(
                f"{bad} voxel(s) are NaN or infinite",
                path=path,
                hint="replace them (e.g. with 0) before using this image",
            )


def output_format(path: str | Path, format: str | None = None) -> str:
    """The format :func:`write_volume` uses for ``path``, by suffix: ``.nii``/``.nii.gz`` -> ``'nifti'``,
    ``.mha``/``.nrrd`` -> ``'itk'``; a DICOM series (``'dicom'``) goes into a folder: a path without a suffix, an
    existing folder, or any name with ``format='dicom'``. ``format``, if given, must agree with an image suffix.

    Raises:
        InputError: unknown ``format`` or one the name contradicts, a two-file ``.mhd``/``.nhdr`` output, or
            another suffix (``out.txt``), naming the accepted ones.
    """
    if format is not None and format not in FORMATS:
        raise InputError(f"unknown output format {format!r}", hint=f"use one of {', '.join(FORMATS)}")
    name = str(path).lower()
    if name.endswith((".mhd", ".nhdr")):
        raise InputError("cannot write a two-file .mhd/.nhdr image", path=path, hint="write .mha or .nrrd")
    by_suffix = "nifti" if is_nifti_path(path) else "itk" if name.endswith(_ITK_WRITE_SUFFIXES) else "dicom"
    if by_suffix == "dicom" and format is None and Path(path).suffix and not Path(path).is_dir():
        raise InputError(
            f"unknown output suffix {Path(path).suffix!r}",
            path=path,
            hint="write .nii, .nii.gz, .mha or .nrrd, or a DICOM series into a folder (a name without a suffix, "
            "or --format dicom)",
        )
    if format is not None and format != by_suffix:
        raise InputError(
            f"--format {format} does not match the output name",
            path=path,
            hint="name NIfTI outputs .nii/.nii.gz, ITK outputs .mha/.nrrd, DICOM outputs a folder",
        )
    return by_suffix


def write_volume(volume: Volume, path: str | Path, *, force: bool = False, format: str | None = None) -> Path:
    """Write ``volume`` atomically (temporary file or folder, then rename) on its exact grid.

    Args:
        volume: the image; ``volume.modality`` decides the DICOM Modality (``'ct'`` -> CT, else MR).
        path: output file, or folder for a DICOM series.
        force: replace an existing output.
        format: ``'nifti'``, ``'itk'`` or ``'dicom'``; default by ``path`` (see :func:`output_format`).

    Returns:
        The written path.

    Raises:
        InputError: the output exists (without ``force``), its folder is missing or not writable, or the
            volume cannot be stored in that format.
    """
    fmt = output_format(path, format)
    with atomic_path(path, force=force, directory=fmt == "dicom") as tmp:
        if fmt == "nifti":
            write_nifti(volume, tmp)
        elif fmt == "itk":
            sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=True)
        else:
            write_dicom_series(volume, tmp)
    return Path(path)

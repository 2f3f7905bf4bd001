"""Read one DICOM series from a folder, checking its geometry before trusting it.

Slices are found and grouped with pydicom (headers only), their geometry is checked from
ImagePositionPatient / ImageOrientationPatient, and the pixels are decoded by SimpleITK/GDCM (JPEG 2000
included) in the order of position along the slice normal. A straight, evenly spaced stack is returned as
read. A stack with gantry tilt (slices shifted in-plane from one to the next) or uneven spacing is resampled
onto a regular grid perpendicular to the slices, and a warning says so; missing slices and duplicate positions
are errors. SimpleITK alone would stack such series as if regular (it only prints a warning), which misplaces
every slice.

An enhanced (multi-frame) image is one file: its frames are placed by their functional groups
(:func:`~phmdiff_cli.io.dicom_stack.frame_stack`), decoded by pydicom and rescaled frame by frame.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import BytesLengthException, InvalidDicomError

from phmdiff_cli.errors import InputError
from phmdiff_cli.io.dicom_stack import (
    SliceStack,
    classify_steps,
    regular_grid,
    resample_note,
    resample_stack,
    slice_stack,
)
from phmdiff_cli.io.volume import Volume
from phmdiff_cli.modalities import modality_from_filename

__all__ = ["PATIENT_STUDY_TAGS", "SOURCE_TAGS", "SeriesInfo", "is_dicom_file", "list_series", "read_dicom"]

log = logging.getLogger(__name__)

#: Patient, study and frame-of-reference tags a derived series copies from its source.
PATIENT_STUDY_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientPosition",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "BodyPartExamined",
)  # fmt: skip
#: Source tags kept in ``Volume.meta['dicom']``.
SOURCE_TAGS = (*PATIENT_STUDY_TAGS, "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
               "Laterality")
#: What pydicom raises, when an element is read or its value converted, for bytes that are not what they claim
#: (pydicom parses lazily, so these surface wherever a tag is first touched).
MALFORMED = (ValueError, TypeError, KeyError, IndexError, OSError, EOFError, NotImplementedError, struct.error,
             BytesLengthException)


@dataclass
class SeriesInfo:
    """One series found in a folder: SeriesInstanceUID, description, Modality, and its headers (no pixels)."""

    uid: str
    description: str
    modality: str
    headers: list[pydicom.Dataset]

    @property
    def n_files(self) -> int:
        return len(self.headers)

    def summary(self) -> str:
        uid = self.uid or "(no SeriesInstanceUID)"
        description = self.description or "no description"
        return f"{uid} ({self.modality or '?'}, {description!r}, {self.n_files} files)"


def is_dicom_file(path: str | Path) -> bool:
    """True when ``path`` is a file with the DICOM preamble magic (``DICM`` at byte 128)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file (no pixels), or None for files that are not DICOM (READMEs, licences)."""
    if not is_dicom_file(path):
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for _ in header.iterall():  # parse every element now: pydicom defers it to the first access
            pass
        header.filename = str(path)
        return header
    except (InvalidDicomError, *MALFORMED) as error:
        raise InputError(
            f"damaged DICOM file ({type(error).__name__}: {str(error)[:120]})", path=path
        ) from None


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series in ``folder`` (its files, not sub-folders), in order of SeriesNumber then UID. A damaged
    DICOM file is skipped with a warning naming it, so one bad file does not hide its neighbours (a slice missing
    from a series is then reported as such).

    Raises:
        InputError: the folder cannot be listed.
    """
    folder = Path(folder)
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as error:
        raise InputError(f"cannot list the folder ({error.strerror})", path=folder) from None
    groups: dict[str, list[pydicom.Dataset]] = {}
    for file in files:
        try:
            header = _header(file)
        except InputError as error:
            log.warning("%s: skipped: %s", file, error.problem)
            continue
        if header is not None:
            groups.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(header)
    series = [
        SeriesInfo(uid, str(hs[0].get("SeriesDescription", "")), str(hs[0].get("Modality", "")), hs)
        for uid, hs in groups.items()
    ]
    return sorted(series, key=lambda s: (_series_number(s.headers[0]), s.uid))


def _series_number(header: pydicom.Dataset) -> int:
    try:
        return int(header.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        return 0


def _choose(folder: Path, series: list[SeriesInfo], series_uid: str | None) -> SeriesInfo:
    if not series:
        entries = list(folder.iterdir())
        what = "empty folder" if not entries else "no DICOM files in this folder"
        hint = "give a NIfTI file or a folder holding one DICOM series"
        if any(entry.is_dir() for entry in entries):
            hint = "sub-folders are not searched: pass the folder that holds the series' files"
        raise InputError(what, path=folder, hint=hint)
    listing = "; ".join(s.summary() for s in series)
    if series_uid is not None:
        for candidate in series:
            if candidate.uid == series_uid:
                return candidate
        raise InputError(f"no series {series_uid} here; found: {listing}", path=folder)
    if len(series) > 1:
        raise InputError(
            f"{len(series)} DICOM series in this folder: {listing}",
            path=folder,
            hint="pick one with --series-uid UID, or pass one file of the series",
        )
    return series[0]


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK prints its own non-uniform-sampling warning on stderr; ours is more precise, so mute it."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _undecodable(files: list[str]) -> str | None:
    """The first file GDCM cannot decode on its own (to name it in the error), if any."""
    for file in files:
        try:
            with _quiet_itk():
                sitk.ReadImage(file)
        except RuntimeError:
            return file
    return None


def _pixels(stack: SliceStack, folder: Path) -> np.ndarray:
    """Rescaled voxels ``(slice, row, column)`` in stack order, decoded by GDCM (the frames of a multi-frame
    file by :func:`_frame_pixels`)."""
    if stack.frames is not None:
        return _frame_pixels(stack)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(stack.files)
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError:
        raise InputError(
            "cannot decode the pixel data (damaged or truncated file?)",
            path=_undecodable(stack.files) or folder,
        ) from None
    array = sitk.GetArrayFromImage(image)
    if array.shape != (len(stack.files), *stack.shape):
        raise InputError(
            f"decoded pixel data has shape {array.shape}, expected {(len(stack.files), *stack.shape)}",
            path=folder,
        )
    return array


def _frame_pixels(stack: SliceStack) -> np.ndarray:
    """The frames of a multi-frame file ``(frame, row, column)`` in stack order, each rescaled by its own
    PixelValueTransformation (per frame, else shared, else the top-level RescaleSlope / RescaleIntercept)."""
    path = stack.files[0]
    try:
        header = pydicom.dcmread(path)
        array = header.pixel_array.reshape(-1, *stack.shape)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError) as error:
        raise InputError(f"cannot decode the multi-frame pixel data ({str(error)[:120]})", path=path,
                         hint="convert it to NIfTI first (dcm2niix)") from None
    if len(array) != len(stack.frames):
        raise InputError(f"pixel data holds {len(array)} frames, the header {len(stack.frames)}", path=path)
    shared = (header.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    scaled = np.empty(array.shape, dtype=np.float32)
    for index, frame in enumerate(header.PerFrameFunctionalGroupsSequence):
        found = frame.get("PixelValueTransformationSequence") or shared.get("PixelValueTransformationSequence")
        transform = found[0] if found else header
        try:
            slope = float(transform.get("RescaleSlope") or 1.0)
            intercept = float(transform.get("RescaleIntercept") or 0.0)
        except MALFORMED as error:
            raise InputError(f"malformed rescale of frame {index + 1} ({str(error)[:120]})", path=path) from None
        scaled[index] = array[index] * slope + intercept
    return scaled[stack.frames]


def _modality(series: SeriesInfo) -> str | None:
    tag = series.modality.upper()
    if tag == "CT":
        return "ct"
    if tag == "MR":
        return modality_from_filename(series.description) or "mr"
    return None


def read_dicom(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read one DICOM series: ``path`` is its folder, or one of its files (then that file's series is read).

    Returns:
        A volume with array ``(z, y, x)`` = (slice, row, column) sorted along the slice normal, spacing
        ``(column step, row step, slice step)`` mm, LPS origin and direction ``[row, column, normal]``;
        ``meta['dicom']`` holds the source tags in :data:`SOURCE_TAGS`, ``meta['warnings']`` any resampling.

    Raises:
        InputError: no or several series (listed), damaged files, inconsistent slices, duplicate positions,
            missing slices, undecodable pixels.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and series_uid is None:
        header = _header(path)
        series_uid = str(header.get("SeriesInstanceUID", "")) if header is not None else None
    series = _choose(folder, list_series(folder), series_uid)
    # Series-level problems name what the user gave: the folder, or the file that stands for its series.
    try:
        stack = slice_stack(series.headers, path)
    except MALFORMED as error:  # a tag whose value cannot be what it names, or cannot be parsed at all
        raise InputError(f"malformed DICOM header ({error})", path=path) from None
    even, tilted = classify_steps(stack, path)
    array = _pixels(stack, path)
    warnings = []
    if even and not tilted:
        grid = regular_grid(stack)
    else:
        array, grid = resample_stack(stack, array)
        warnings.append(resample_note(stack, even, tilted, grid.spacing[2]))
        log.warning("%s: %s", folder, warnings[-1])
    first = series.headers[0]
    tags = {key: str(first.get(key)) for key in SOURCE_TAGS if first.get(key) not in (None, "")}
    meta = {
        "path": str(folder),
        "format": "dicom",
        "dicom": tags,
        "series_uid": series.uid,
        "series_description": series.description,
        "dicom_modality": series.modality,
        "number_of_slices": len(stack.files),
        "warnings": warnings,
    }
    return Volume(array, *grid, modality=_modality(series), meta=meta)

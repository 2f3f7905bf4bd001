"""Write a volume as a new *derived* DICOM series (uncompressed, one file per slice), with pydicom.

The series is new (SeriesInstanceUID, SOPInstanceUIDs, ImageType DERIVED\\SECONDARY\\AXIAL for CT, OTHER for MR);
patient, study and frame of reference come from the source series when the volume was read from DICOM, else they
are new and marked synthetic. Each slice ``array[k]`` gets its own ImagePositionPatient; CT is stored as int16
Hounsfield units, MR as uint16/int16, with RescaleSlope/RescaleIntercept when the values are not integers that fit.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from phmdiff_cli import __version__
from phmdiff_cli.errors import InputError
from phmdiff_cli.io.dicom_read import PATIENT_STUDY_TAGS
from phmdiff_cli.io.volume import Volume

__all__ = ["dicom_modality", "encode_pixels", "write_dicom_series"]

_SYNTHETIC_PATIENT = {"PatientName": "SYNTHETIC^PHMDIFF", "PatientID": "PHMDIFF-SYNTHETIC"}


def dicom_modality(modality: str | None) -> str:
    """DICOM Modality for a canonical modality: ``'CT'`` for ct, else ``'MR'``."""
    return "CT" if modality == "ct" else "MR"


def encode_pixels(array: np.ndarray, ct: bool) -> tuple[np.ndarray, float, float]:
    """Stored integers and (slope, intercept) with ``value = stored * slope + intercept``.

    CT: int16 Hounsfield units rounded to 1 HU (slope 1, intercept 0) when they fit. Integer-valued data that
    fits uint16 (or int16) is stored as is; anything else is scaled linearly onto the full uint16 range.
    """
    values = array
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.round(array)
        integral = ct or np.array_equal(rounded, array)
        values = rounded if integral else array
    else:
        integral = True
    lo, hi = float(values.min()), float(values.max())
    if integral and lo >= -32768 and hi <= 32767:
        return values.astype(np.int16), 1.0, 0.0
    if integral and lo >= 0 and hi <= 65535:
        return values.astype(np.uint16), 1.0, 0.0
    slope = (hi - lo) / 65535.0 or 1.0
    return np.round((values.astype(np.float64) - lo) / slope).astype(np.uint16), slope, lo


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _right_handed(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(array, origin, direction) with the slice axis flipped if needed so that it runs along the normal
    row x column, the order in which DICOM readers stack the slices: the series then reads back unchanged."""
    direction = volume.direction_matrix
    array, origin = volume.array, np.asarray(volume.origin)
    if np.linalg.det(direction) < 0:
        origin = origin + direction[:, 2] * volume.spacing[2] * (array.shape[0] - 1)
        direction = direction.copy()
        direction[:, 2] *= -1
        array = array[::-1]
    return array, origin, direction


def _base(volume: Volume, modality: str, now: dt.datetime) -> pydicom.Dataset:
    """Tags shared by all slices: patient/study (copied or synthetic), new series, equipment, pixel module."""
    source = volume.meta.get("dicom") if volume.meta.get("format") == "dicom" else None
    ds = pydicom.Dataset()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    if source:
        for key in PATIENT_STUDY_TAGS:
            if key in source:
                setattr(ds, key, source[key])
    else:
        ds.PatientName, ds.PatientID = _SYNTHETIC_PATIENT["PatientName"], _SYNTHETIC_PATIENT["PatientID"]
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
        ds.StudyDate, ds.StudyTime, ds.StudyID = date, time, "1"
        ds.StudyDescription = "SYNTHETIC study made by phmdiff from a non-DICOM image"
    for key, default in (
        ("PatientName", ""),
        ("PatientID", ""),
        ("PatientBirthDate", ""),
        ("PatientSex", ""),
        ("ReferringPhysicianName", ""),
        ("AccessionNumber", ""),
        ("StudyID", ""),
        ("StudyDate", date),
        ("StudyTime", time),
        ("PositionReferenceIndicator", ""),
        ("PatientPosition", ""),  # Type 2C for CT and MR: unknown for a non-DICOM source
        ("StudyInstanceUID", generate_uid()),
        ("FrameOfReferenceUID", generate_uid()),
    ):
        if key not in ds:
            setattr(ds, key, default)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(source.get("SeriesNumber") or 0) + 1000 if source else 1000
    ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = date, time, date, time
    name = volume.modality or modality.lower()
    ds.SeriesDescription = f"phmdiff synthetic {name}"[:64]
    # Value 3 is required in the CT and MR Image modules: the axial kind of CT image, "OTHER" for MR.
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
    # Type 2C: the source's when it has one; else present and empty (unknown), as the General Series module asks.
    ds.Laterality = source.get("Laterality", "") if source else ""
    origin = (
        f" from series {source['SeriesInstanceUID']}" if source and source.get("SeriesInstanceUID") else ""
    )
    ds.DerivationDescription = f"synthesized by phmdiff {__version__}{origin}; not an acquired image"[:1024]
    ds.BurnedInAnnotation = "NO"
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "phmdiff", "phmdiff", __version__
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = volume.array.shape[1], volume.array.shape[2]
    ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[0])]
    ds.SliceThickness = _ds(volume.spacing[2])
    ds.SpacingBetweenSlices = _ds(volume.spacing[2])
    if modality == "MR":
        # Type 2 attributes of the MR Image module: present, empty (no acquisition took place).
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", ""
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = "", "", "", ""
    else:
        ds.KVP, ds.AcquisitionNumber = "", ""
    return ds


def write_dicom_series(volume: Volume, folder: str | Path) -> Path:
    """Write ``volume`` into the existing empty ``folder`` as ``IM00001.dcm`` ... (one file per ``array[k]``).

    The DICOM Modality is CT when ``volume.modality == 'ct'``, else MR. Not atomic by itself: callers pass a
    temporary folder (:func:`phmdiff_cli.io.atomic.atomic_path` with ``directory=True``).

    Raises:
        InputError: the direction is not orthonormal (DICOM cannot represent it).
    """
    folder = Path(folder)
    array, origin, direction = _right_handed(volume)
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        raise InputError("cannot write a DICOM series of a grid with non-orthogonal axes", path=folder)
    modality = dicom_modality(volume.modality)
    stored, slope, intercept = encode_pixels(array, ct=modality == "CT")
    base = _base(volume, modality, dt.datetime.now())
    base.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    base.BitsAllocated = base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    base.RescaleIntercept, base.RescaleSlope = _ds(intercept), _ds(slope)
    base.RescaleType = "HU" if modality == "CT" else "US"
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"IM{k + 1:05d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update(base)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.InstanceNumber = k + 1
        position = origin + direction[:, 2] * volume.spacing[2] * k
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(position @ direction[:, 2])
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return folder

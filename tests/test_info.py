"""`phmdiff info`: what it prints equals what SimpleITK (and pydicom) report for the same file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_helpers import sitk_series
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.io.dicom_read import is_dicom_file

runner = CliRunner()

#: The orientations (LPS, RAS, LAS, oblique, rotated) and dtypes (int16, int32, uint8, float32, float64).
NIFTI = [
    "brats/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz",
    "brats/BraTS-MET-00110-000/BraTS-MET-00110-000-t1c.nii.gz",
    "brats/BrainLesion-case-01/BrainLesion-case-01-t1n.nii.gz",
    "ct/totalsegmentator_example_ct_3mm.nii.gz",
    "ct/niivue_CT_pitch.nii.gz",
    "single_subject_t1_pd/chris_PD.nii.gz",
    "templates_mni152_2mm/spm12_canonical_avg152T2.nii",
]
DICOM = ["dicom/ct_siemens_body_jpeg2000_totalsegmentator", "dicom/mr_siemens_t1_mprage_vs-seg-001"]
TILT = "dicom/ct_ge_head_gantry_tilt_dcm_qa_ct"


def _info_json(path: Path) -> dict:
    result = runner.invoke(app, ["info", "--json", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _sitk_read(path: Path) -> sitk.Image:
    return sitk_series(path) if path.is_dir() else sitk.ReadImage(str(path))


@pytest.mark.parametrize("name", NIFTI + DICOM)
def test_json_matches_simpleitk(data_dir: Path, name: str) -> None:
    info = _info_json(data_dir / name)
    image = _sitk_read(data_dir / name)
    array = sitk.GetArrayFromImage(image)
    assert info["size"] == list(image.GetSize()) and info["array_shape"] == list(array.shape)
    np.testing.assert_allclose(info["spacing"], image.GetSpacing(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(info["origin"], image.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(info["direction"], image.GetDirection(), rtol=0, atol=1e-5)
    orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    assert info["orientation"] == orient and "LPS" in info["orientation_convention"]
    assert info["dtype"] == str(array.dtype)
    stats = info["intensity"]
    assert stats["min"] == float(array.min()) and stats["max"] == float(array.max())
    assert stats["mean"] == pytest.approx(float(array.mean(dtype=np.float64)), rel=1e-9)
    for p in (1, 50, 99):
        assert stats[f"p{p}"] == pytest.approx(float(np.percentile(array, p)), rel=1e-9)
    if name in DICOM:
        _check_dicom_fields(info, data_dir / name)
        assert info["warnings"] == []


def _check_dicom_fields(info: dict, folder: Path) -> None:
    files = [p for p in folder.iterdir() if is_dicom_file(p)]
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert info["format"] == "dicom"
    assert info["dicom"] == {
        "series_uid": str(header.SeriesInstanceUID),
        "series_description": str(header.get("SeriesDescription", "")),
        "modality": header.Modality,
        "number_of_slices": len(files),
    }
    assert info["modality"] == ("ct" if header.Modality == "CT" else "t1n")  # t1n from 't1_mpr_tra_gk_v4'


def test_table_for_humans(data_dir: Path) -> None:
    path = data_dir / "dicom/mr_siemens_t1_mprage_vs-seg-001"
    result = runner.invoke(app, ["info", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in (
        "512 x 512 x 120",
        "LPS",
        "uint16",
        "t1_mpr_tra_gk_v4",
        "(0.4102, 0.4102, 1.5)",
        "t1n",
        "MR / 120",
    ):
        assert text in result.stdout, text
    assert result.stderr.strip() == ""


@pytest.mark.slow
def test_tilted_series_in_a_real_process(data_dir: Path) -> None:
    """The installed entry point: JSON alone on stdout, the resampling warning on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "phmdiff_cli", "info", "--json", str(data_dir / TILT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    _check_dicom_fields(info, data_dir / TILT)
    assert "gantry tilt of 18.5 degrees" in info["warnings"][0]
    assert "gantry tilt of 18.5 degrees" in result.stderr and "Traceback" not in result.stderr
    # A regular grid perpendicular to the slices: orthonormal direction, 18.5 degrees oblique about x.
    direction = np.reshape(info["direction"], (3, 3))
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    assert np.degrees(np.arccos(direction[2, 2])) == pytest.approx(18.5, abs=0.05)

"""NIfTI: exact round trips on every NIfTI in ../shared/data, header kept, agreement with SimpleITK."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import data_root

from phmdiff_cli.io import read_volume, write_volume
from phmdiff_cli.io.nifti import ras_affine

_ROOT = data_root()
NIFTI = sorted(str(p.relative_to(_ROOT)) for p in _ROOT.rglob("*.nii*")) if _ROOT else []
#: SimpleITK takes this file's qform (code 4, a flipped, shifted grid); the NIfTI standard, nibabel and
#: FSL take its sform (code 4, the MNI grid), and so do we.
QFORM_SFORM_CONFLICT = "templates_mni152_2mm/clinicaltbx_flair.nii"


def _assert_same_volume(a, b) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=1e-5)
    assert a.array.dtype == b.array.dtype
    assert np.array_equal(a.array, b.array)


@pytest.mark.parametrize("name", NIFTI)
def test_round_trip_keeps_grid_voxels_and_header(data_dir: Path, tmp_path: Path, name: str) -> None:
    source = read_volume(data_dir / name)
    out = write_volume(source, tmp_path / "out.nii")
    back = read_volume(out)
    _assert_same_volume(source, back)
    before, after = nib.load(data_dir / name).header, nib.load(out).header
    for form in ("get_qform", "get_sform"):
        (a, code_a), (b, code_b) = getattr(before, form)(coded=True), getattr(after, form)(coded=True)
        assert int(code_a) == int(code_b), form
        if code_a:
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NIFTI)
def test_reader_agrees_with_simpleitk(data_dir: Path, name: str) -> None:
    ours = read_volume(data_dir / name)
    theirs = sitk.ReadImage(str(data_dir / name))
    theirs_array = sitk.GetArrayFromImage(theirs)
    assert ours.array.dtype == theirs_array.dtype and np.array_equal(ours.array, theirs_array)
    np.testing.assert_allclose(ours.spacing, theirs.GetSpacing(), rtol=0, atol=1e-5)
    if name == QFORM_SFORM_CONFLICT:
        np.testing.assert_allclose(ras_affine(ours), nib.load(data_dir / name).header.get_sform(), atol=1e-6)
        assert not np.allclose(ours.origin, theirs.GetOrigin(), atol=1)
        return
    np.testing.assert_allclose(ours.origin, theirs.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.direction, theirs.GetDirection(), rtol=0, atol=1e-5)


def test_gzip_round_trip(data_dir: Path, tmp_path: Path) -> None:
    source = read_volume(data_dir / "ct/totalsegmentator_example_mr_sm_3mm.nii.gz")
    back = read_volume(write_volume(source, tmp_path / "out.nii.gz"))
    _assert_same_volume(source, back)
    with open(tmp_path / "out.nii.gz", "rb") as handle:
        assert handle.read(2) == b"\x1f\x8b"


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8, np.float32, np.float64])
def test_datatypes_are_written_as_given(data_dir: Path, tmp_path: Path, dtype: type) -> None:
    source = read_volume(data_dir / "ct/totalsegmentator_example_mr_sm_3mm.nii.gz")
    cast = source.with_array(np.clip(source.array, 0, 255).astype(dtype))
    back = read_volume(write_volume(cast, tmp_path / "out.nii"))
    _assert_same_volume(cast, back)


def test_new_grid_gets_new_header(data_dir: Path, tmp_path: Path) -> None:
    """A volume moved off its source grid must not keep the source's stale qform/sform."""
    source = read_volume(data_dir / "single_subject_t1_pd/chris_PD.nii.gz")
    moved = source.with_array(source.array)
    moved.origin = (source.origin[0] + 10.0, *source.origin[1:])
    out = write_volume(moved, tmp_path / "moved.nii")
    header = nib.load(out).header
    assert int(header.get_sform(coded=True)[1]) == 1 and int(header.get_qform(coded=True)[1]) == 1
    np.testing.assert_allclose(header.get_sform(), ras_affine(moved), atol=1e-4)
    np.testing.assert_allclose(header.get_qform(), ras_affine(moved), atol=1e-4)
    back = read_volume(out)
    assert back.same_grid(moved, tol=1e-4)


def test_singleton_fourth_dimension_is_squeezed(data_dir: Path, tmp_path: Path) -> None:
    image = nib.load(data_dir / "ct/totalsegmentator_example_mr_sm_3mm.nii.gz")
    data = np.asanyarray(image.dataobj)[..., None]
    nib.save(nib.Nifti1Image(data, image.affine, image.header), tmp_path / "4d.nii")
    volume = read_volume(tmp_path / "4d.nii")
    np.testing.assert_array_equal(volume.array, data[..., 0].transpose(2, 1, 0))


def test_mha_and_nrrd_round_trip(data_dir: Path, tmp_path: Path) -> None:
    source = read_volume(data_dir / "single_subject_t1_pd/chris_PD.nii.gz")
    for name in ("out.mha", "out.nrrd"):
        back = read_volume(write_volume(source, tmp_path / name))
        assert back.meta["format"] == "itk"
        assert back.same_grid(source)
        np.testing.assert_array_equal(back.array, source.array)

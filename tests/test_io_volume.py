"""Volume type and canonical orientation: exact, no resampling, every voxel stays where it is in space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from io_helpers import cached_volume

from phmdiff_cli.io import Volume, from_canonical, orientation_code, read_volume, to_canonical

#: One file per orientation present in the data: LPS, RAS, LAS (left-handed), oblique, rotated, DICOM oblique.
ORIENTED = {
    "brats/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz": "LPS",
    "brats/BraTS-MET-00110-000/BraTS-MET-00110-000-t1n.nii.gz": "RAS",
    "templates_mni152_2mm/spm12_canonical_avg152T1.nii": "LAS",
    "single_subject_t1_pd/chris_PD.nii.gz": "RAS",
    "ct/niivue_CT_pitch.nii.gz": "RAS",
    "dicom/ct_ge_head_gantry_tilt_dcm_qa_ct": "LPS",
}


def test_sitk_conversion_keeps_everything(data_dir: Path) -> None:
    volume = read_volume(data_dir / "single_subject_t1_pd/chris_PD.nii.gz")
    image = volume.to_sitk()
    assert image.GetSize() == volume.size == volume.shape[::-1]
    back = Volume.from_sitk(image, modality="pd")
    assert back.same_grid(volume, tol=0) and back.modality == "pd"
    np.testing.assert_array_equal(back.array, volume.array)
    # Volume.index_to_physical agrees with SimpleITK's own index -> point mapping.
    index = (7, 100, 33)
    np.testing.assert_allclose(
        volume.index_to_physical() @ (*index, 1), (*image.TransformIndexToPhysicalPoint(index), 1)
    )


def test_with_array_and_same_grid(data_dir: Path) -> None:
    volume = read_volume(data_dir / "ct/totalsegmentator_example_mr_sm_3mm.nii.gz")
    other = volume.with_array(volume.array.astype(np.float32) * 2, modality="t2w")
    assert other.same_grid(volume) and other.modality == "t2w" and other.meta == volume.meta
    assert other.meta is not volume.meta
    with pytest.raises(ValueError):
        volume.with_array(volume.array[1:])
    shifted = volume.with_array(volume.array)
    shifted.origin = (volume.origin[0] + 1e-3, *volume.origin[1:])
    assert not shifted.same_grid(volume) and shifted.same_grid(volume, tol=1e-2)


@pytest.mark.parametrize("name", sorted(ORIENTED))
def test_canonical_is_exact_and_invertible(data_dir: Path, name: str) -> None:
    volume = cached_volume(data_dir / name)
    assert orientation_code(volume.direction) == ORIENTED[name]
    canonical = to_canonical(volume)
    assert orientation_code(canonical.direction) == "LPS"
    # Each voxel axis is closest to the matching LPS axis and points the same way.
    matrix = canonical.direction_matrix
    assert np.all(np.argmax(np.abs(matrix), axis=0) == [0, 1, 2]) and np.all(np.diag(matrix) > 0)
    # Same voxels at the same physical points: map random canonical voxels back to source voxel indices.
    rng = np.random.default_rng(0)
    index = rng.integers(0, canonical.size, size=(50, 3))
    points = canonical.index_to_physical() @ np.c_[index, np.ones(50)].T
    source_index = np.linalg.solve(volume.index_to_physical(), points)[:3].T
    rounded = np.round(source_index).astype(int)
    np.testing.assert_allclose(source_index, rounded, atol=1e-6)
    np.testing.assert_array_equal(
        canonical.array[index[:, 2], index[:, 1], index[:, 0]],
        volume.array[rounded[:, 2], rounded[:, 1], rounded[:, 0]],
    )
    # SimpleITK's DICOMOrient to LPS gives the same array for non-oblique grids.
    if np.allclose(
        np.abs(volume.direction_matrix), np.eye(3)[:, np.argmax(np.abs(volume.direction_matrix), 0)]
    ):
        oriented = sitk.DICOMOrient(volume.to_sitk(), "LPS")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(oriented), canonical.array)
        np.testing.assert_allclose(oriented.GetOrigin(), canonical.origin, atol=1e-6)
    back = from_canonical(canonical.with_array(canonical.array, modality="t2w"), volume)
    assert back.same_grid(volume, tol=0) and back.modality == "t2w"
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.flags.c_contiguous and canonical.array.flags.c_contiguous


def test_from_canonical_rejects_other_grid(data_dir: Path) -> None:
    volume = read_volume(data_dir / "brats/BraTS-MET-00110-000/BraTS-MET-00110-000-t1n.nii.gz")
    with pytest.raises(ValueError, match="canonical grid"):
        from_canonical(volume, volume)  # RAS: its canonical grid is flipped

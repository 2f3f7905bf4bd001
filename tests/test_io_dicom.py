"""DICOM: the three real series (gantry tilt included), series selection, derived-series round trips."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_helpers import cached_volume, max_difference, sitk_series, tool

from phmdiff_cli.errors import InputError
from phmdiff_cli.io import Volume, read_volume, to_canonical, write_volume
from phmdiff_cli.io.dicom_read import is_dicom_file, list_series

CT_J2K = "dicom/ct_siemens_body_jpeg2000_totalsegmentator"
MR = "dicom/mr_siemens_t1_mprage_vs-seg-001"
TILT = "dicom/ct_ge_head_gantry_tilt_dcm_qa_ct"


def _pydicom_series(folder: Path) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Slices sorted along their normal, and their voxels in rescaled units."""
    slices = [pydicom.dcmread(p) for p in folder.iterdir() if is_dicom_file(p)]
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
    slices.sort(key=lambda s: np.asarray(s.ImagePositionPatient, float) @ normal)
    values = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices])
    return slices, values


@pytest.mark.parametrize("name", [CT_J2K, MR])
def test_regular_series_match_simpleitk(data_dir: Path, name: str) -> None:
    volume = cached_volume(data_dir / name)
    image = sitk_series(data_dir / name)
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(volume.direction, image.GetDirection(), atol=1e-6)
    assert volume.meta["warnings"] == [] and volume.modality in ("ct", "t1n")


def _slice_image(header: pydicom.Dataset, pixels: np.ndarray, normal: np.ndarray) -> sitk.Image:
    """One source slice as a 3-D SimpleITK image placed by its own position and orientation."""
    image = sitk.GetImageFromArray(pixels[None].astype(np.float32))
    row, col = np.reshape(np.asarray(header.ImageOrientationPatient, float), (2, 3))
    image.SetDirection(np.column_stack([row, col, normal]).ravel().tolist())
    image.SetOrigin([float(v) for v in header.ImagePositionPatient])
    image.SetSpacing([float(header.PixelSpacing[1]), float(header.PixelSpacing[0]), 1.0])
    return image


@pytest.mark.slow
def test_gantry_tilt_is_resampled_not_misstacked(data_dir: Path) -> None:
    """Check resampled planes against an independent computation: SimpleITK resamples the two source
    slices that bracket the plane, each placed by its own ImagePositionPatient, blended by distance."""
    volume = cached_volume(data_dir / TILT)
    assert "gantry tilt of 18.5 degrees" in volume.meta["warnings"][0]
    assert "uneven slice spacing" in volume.meta["warnings"][0]
    slices, values = _pydicom_series(data_dir / TILT)
    assert volume.meta["number_of_slices"] == len(slices) == 28
    row, col = np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3))
    normal = np.cross(row, col)
    np.testing.assert_allclose(volume.direction_matrix, np.column_stack([row, col, normal]), atol=1e-6)
    depths = np.array([np.asarray(s.ImagePositionPatient, float) @ normal for s in slices])
    fill = float(values.min())
    for k in (0, 17, 60, volume.shape[0] - 1):
        plane = Volume(
            volume.array[k : k + 1],
            volume.spacing,
            np.asarray(volume.origin) + normal * volume.spacing[2] * k,
            volume.direction,
        )
        depth = plane.origin @ normal
        lower = min(int(np.searchsorted(depths, depth, side="right")) - 1, len(depths) - 2)
        weight = (depth - depths[lower]) / (depths[lower + 1] - depths[lower])
        expected = np.zeros(plane.shape, np.float64)
        for s, w in ((lower, 1 - weight), (lower + 1, weight)):
            target = plane.to_sitk()
            target.SetOrigin(tuple(np.asarray(plane.origin) - normal * (depth - depths[s])))
            moved = sitk.Resample(
                _slice_image(slices[s], values[s], normal),
                target,
                sitk.Transform(),
                sitk.sitkLinear,
                fill,
                sitk.sitkFloat32,
            )
            expected += w * sitk.GetArrayFromImage(moved)
        actual = volume.array[k : k + 1]
        assert np.mean(actual > fill + 100) > 0.2  # a real slice of head, not only the fill value
        # Identical but at the one-pixel border of the source field of view (ITK extrapolates half a pixel).
        assert np.mean(np.isclose(actual, expected, rtol=0, atol=0.05)) > 0.9999
    # SimpleITK alone stacks the slices as a regular block: the voxels are misplaced by many millimetres.
    stacked = sitk_series(data_dir / TILT)
    assert stacked.GetSize()[2] == 28 and abs(stacked.GetSpacing()[2] - volume.spacing[2]) > 1


def _link_series(target: Path, *folders: Path, skip: int | None = None) -> Path:
    """A folder of symbolic links to the slices of ``folders`` (minus the ``skip``-th of the first)."""
    target.mkdir()
    for number, folder in enumerate(folders):
        for i, file in enumerate(sorted(folder.iterdir())):
            if not (number == 0 and i == skip):
                (target / f"{number}_{file.name}").symlink_to(file)
    return target


def test_several_series_are_listed_and_selectable(data_dir: Path, tmp_path: Path) -> None:
    mixed = _link_series(tmp_path / "mixed", data_dir / MR, data_dir / CT_J2K)
    series = list_series(mixed)
    assert sorted((s.modality, s.n_files) for s in series) == [("CT", 20), ("MR", 120)]
    with pytest.raises(InputError) as caught:
        read_volume(mixed)
    for s in series:
        assert s.uid in caught.value.problem and f"{s.n_files} files" in caught.value.problem
    assert "--series-uid" in caught.value.hint
    mr_uid = next(s.uid for s in series if s.modality == "MR")
    assert np.array_equal(read_volume(mixed, series_uid=mr_uid).array, cached_volume(data_dir / MR).array)
    # A file of a series selects that series (here the CT, whose SeriesInstanceUID is empty in this data set).
    one_file = next(p for p in sorted(mixed.iterdir()) if p.name.startswith("1_"))
    ct = read_volume(one_file)
    assert ct.meta["dicom_modality"] == "CT" and np.array_equal(
        ct.array, cached_volume(data_dir / CT_J2K).array
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", [CT_J2K, MR, TILT])
def test_dicom_round_trip_as_derived_series(data_dir: Path, tmp_path: Path, name: str) -> None:
    source = cached_volume(data_dir / name)
    out = write_volume(source, tmp_path / "derived")
    # Read back by SimpleITK/GDCM ...
    image = sitk_series(out)
    np.testing.assert_allclose(image.GetSpacing(), source.spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), source.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), source.direction, atol=1e-5)
    assert max_difference(sitk.GetArrayFromImage(image), source.array) <= 1
    # ... by pydicom, slice by slice ...
    slices, values = _pydicom_series(out)
    assert max_difference(values, source.array) <= 1
    for k, ds in enumerate(slices):
        expected = np.asarray(source.origin) + source.direction_matrix[:, 2] * source.spacing[2] * k
        np.testing.assert_allclose(np.asarray(ds.ImagePositionPatient, float), expected, atol=1e-4)
    # ... and by our reader.
    back = read_volume(out)
    assert back.same_grid(source, tol=1e-4) and back.modality == source.modality
    # A new derived series in the source's study, for the source's patient.
    src = pydicom.dcmread(
        next(p for p in sorted((data_dir / name).iterdir()) if is_dicom_file(p)), stop_before_pixels=True
    )
    first = slices[0]
    assert first.SeriesInstanceUID != src.SeriesInstanceUID and first.SeriesInstanceUID
    assert len({s.SOPInstanceUID for s in slices}) == len(slices)
    third = "AXIAL" if src.Modality == "CT" else "OTHER"  # value 3 is required by the CT and MR Image modules
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", third] and first.Modality == src.Modality
    assert sorted(int(s.InstanceNumber) for s in slices) == list(range(1, len(slices) + 1))
    for key in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "FrameOfReferenceUID"):
        if src.get(key):
            assert str(first.get(key)) == str(src.get(key)), key
    if src.Modality == "CT":
        assert first.PixelRepresentation == 1 and first.BitsAllocated == 16 and first.RescaleType == "HU"
    assert float(first.SliceThickness) == pytest.approx(source.spacing[2])
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([source.spacing[1], source.spacing[0]])


def test_nifti_as_dicom_is_marked_synthetic(data_dir: Path, tmp_path: Path) -> None:
    """A left-handed (LAS) float template written as MR: slices re-ordered along the normal, values scaled."""
    source = read_volume(data_dir / "templates_mni152_2mm/spm12_canonical_avg152T1.nii")
    assert source.array.dtype == np.float32 and np.linalg.det(source.direction_matrix) < 0
    out = write_volume(source, tmp_path / "t1_dicom", format="dicom")
    slices, values = _pydicom_series(out)
    first = slices[0]
    assert first.PatientName == "SYNTHETIC^PHMDIFF" and "SYNTHETIC" in first.StudyDescription
    assert first.Modality == "MR" and first.SOPClassUID == pydicom.uid.MRImageStorage
    slope = float(first.RescaleSlope)
    assert slope != 1.0
    back = read_volume(out)
    a, b = to_canonical(source), to_canonical(back)
    assert a.same_grid(b, tol=1e-4)
    np.testing.assert_allclose(b.array, a.array, atol=slope / 2 + 1e-6)


def test_ct_from_nifti_is_int16_hounsfield(data_dir: Path, tmp_path: Path) -> None:
    source = read_volume(data_dir / "ct/totalsegmentator_example_ct_3mm.nii.gz")
    assert source.modality == "ct" and source.array.dtype == np.int32
    out = write_volume(source, tmp_path / "ct_dicom")
    slices, values = _pydicom_series(out)
    assert slices[0].Modality == "CT" and slices[0].pixel_array.dtype == np.int16
    assert float(slices[0].RescaleSlope) == 1 and float(slices[0].RescaleIntercept) == 0
    assert values.min() == source.array.min() and values.max() == source.array.max()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_a_single_slice_is_a_one_slice_volume(tmp_path: Path, name: str) -> None:
    """pydicom's own single-slice files: position and in-plane geometry from the tags (checked against
    SimpleITK's reading of the file), the slice as thick as its SliceThickness."""
    source = Path(pydicom.__file__).parent / "data" / "test_files" / name
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / name).write_bytes(source.read_bytes())
    volume = read_volume(folder)
    header = pydicom.dcmread(source)
    assert volume.size == (int(header.Columns), int(header.Rows), 1)
    reference = sitk.ReadImage(str(source))
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.spacing[:2], reference.GetSpacing()[:2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(volume.direction).ravel(), reference.GetDirection(), atol=1e-6)
    assert volume.spacing[2] == pytest.approx(float(header.SliceThickness))
    np.testing.assert_array_equal(volume.array[0], sitk.GetArrayFromImage(reference)[0])
    assert read_volume(folder / name).same_grid(volume, tol=1e-6)  # the file itself stands for its series


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "modality"),
    [(MR, None), (CT_J2K, None), ("ct/totalsegmentator_example_ct_3mm.nii.gz", "ct"),
     ("brats/TCGA-DU-7294/TCGA-DU-7294-t2w.nii.gz", "t2w")],
)
def test_derived_series_pass_dciodvfy_and_dcm2niix_reads_them_back(
    data_dir: Path, tmp_path: Path, name: str, modality: str | None
) -> None:
    """The reference DICOM validator (dicom3tools' dciodvfy) finds no Error in a derived MR or CT series, from a
    DICOM or a NIfTI source; dcm2niix, a converter nobody here wrote, puts it back on the source's grid."""
    dciodvfy, dcm2niix = tool("dciodvfy"), tool("dcm2niix")
    source = read_volume(data_dir / name)
    source.modality = modality or source.modality
    out = write_volume(source, tmp_path / "derived", format="dicom")
    report = subprocess.run([dciodvfy, str(sorted(out.iterdir())[0])], capture_output=True, text=True)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
    converted = tmp_path / "nifti"
    converted.mkdir()
    subprocess.run([dcm2niix, "-z", "y", "-f", "back", "-o", str(converted), str(out)], check=True,
                   capture_output=True)
    # dcm2niix orders the voxels its own way (rows flipped): compare in one canonical voxel order
    back, expected = to_canonical(read_volume(converted / "back.nii.gz")), to_canonical(source)
    assert back.same_grid(expected, tol=1e-3), (back.origin, expected.origin)
    assert max_difference(back.array, expected.array) <= 1  # rounding to stored integers


def test_an_unreadable_file_beside_a_series_is_skipped_with_a_warning(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DICOM file pydicom cannot read (here made to fail) does not hide the series beside it: the series reads
    whole, and the warning names the file."""
    folder = tmp_path / "series"
    folder.mkdir()
    originals = sorted(p for p in (data_dir / MR).iterdir() if is_dicom_file(p))
    for path in originals:
        (folder / path.name).symlink_to(path)
    (folder / "zz-unreadable.dcm").write_bytes(originals[0].read_bytes())
    dcmread = pydicom.dcmread

    def failing(path: object, *args: object, **kwargs: object) -> pydicom.Dataset:
        if str(path).endswith("zz-unreadable.dcm"):
            raise pydicom.errors.InvalidDicomError("File is missing DICOM File Meta Information header")
        return dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", failing)
    with caplog.at_level("WARNING"):
        volume = read_volume(folder)
    assert volume.same_grid(cached_volume(data_dir / MR), tol=1e-6)
    assert any("zz-unreadable.dcm: skipped: damaged DICOM file" in r.getMessage() for r in caplog.records)

"""Enhanced (multi-frame) DICOM, as current Siemens XA and Philips scanners export it: one file whose frames
carry their own plane positions, orientations, pixel spacing and rescale (functional groups). The files are
made here from real classic series (the 4-slice series the repository ships, and the full T1 series of
../shared/data), with their frames shuffled, and must read onto the classic series' exact grid and values; dcm2niix
(a converter nobody here wrote) must agree on the geometry."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from io_helpers import max_difference, read_outcome, tool
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.io import read_volume, to_canonical
from phmdiff_cli.io.dicom_read import PATIENT_STUDY_TAGS, is_dicom_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SERIES = REPO / "tests" / "data" / "mr_t1_4slices"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
runner = CliRunner()


def _item(**tags: object) -> Dataset:
    item = Dataset()
    for keyword, value in tags.items():
        setattr(item, keyword, value)
    return item


def enhanced_from_series(
    series: Path, out: Path, *, seed: int, rescale: list[tuple[float, float]] | None = None
) -> Path:
    """Write the classic series ``series`` as one Enhanced MR Image file, frames in a seeded random order.
    ``rescale`` gives each frame (in the shuffled order) its own PixelValueTransformation (slope, intercept);
    without it one shared identity transformation."""
    slices = [pydicom.dcmread(p) for p in sorted(series.iterdir()) if is_dicom_file(p)]
    order = np.random.default_rng(seed).permutation(len(slices))
    first = slices[0]
    meta = FileMetaDataset()
    # UIDs from the seed: the same file, byte for byte, on every run (the header fuzz mutates fixed offsets)
    meta.MediaStorageSOPClassUID = ENHANCED_MR
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"sop-{seed}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword in PATIENT_STUDY_TAGS:
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"series-{seed}"])
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", 901, str(first.get("SeriesDescription", "t1"))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = first.Rows, first.Columns, len(slices)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, first.BitsStored, first.HighBit
    ds.PixelRepresentation = first.PixelRepresentation
    shared = _item(
        PixelMeasuresSequence=[_item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=first.ImageOrientationPatient)],
    )
    if rescale is None:
        shared.PixelValueTransformationSequence = [_item(RescaleSlope=1, RescaleIntercept=0, RescaleType="US")]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for number, index in enumerate(order):
        frame = _item(
            PlanePositionSequence=[_item(ImagePositionPatient=slices[index].ImagePositionPatient)],
            FrameContentSequence=[_item(InStackPositionNumber=int(index) + 1)],
        )
        if rescale is not None:
            slope, intercept = rescale[number]
            frame.PixelValueTransformationSequence = [
                _item(RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US")
            ]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack([slices[i].pixel_array for i in order]).astype(slices[0].pixel_array.dtype).tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_enhanced_file_reads_onto_the_classic_series_grid(tmp_path: Path) -> None:
    classic = read_volume(SHIPPED_SERIES)
    enhanced = read_volume(enhanced_from_series(SHIPPED_SERIES, tmp_path / "mf" / "enhanced.dcm", seed=1))
    assert enhanced.same_grid(classic, tol=1e-6)
    np.testing.assert_array_equal(enhanced.array, classic.array)
    assert enhanced.meta["number_of_slices"] == 4 and enhanced.modality == classic.modality


def test_each_frame_has_its_own_rescale(tmp_path: Path) -> None:
    rescale = [(2.0, -5.0), (1.0, 0.0), (0.5, 10.0), (3.0, 1.5)]
    path = enhanced_from_series(SHIPPED_SERIES, tmp_path / "enhanced.dcm", seed=2, rescale=rescale)
    classic, enhanced = read_volume(SHIPPED_SERIES), read_volume(path)
    order = np.random.default_rng(2).permutation(4)  # frame f holds classic slice order[f] (files sorted = z)
    for frame, z in enumerate(order):
        slope, intercept = rescale[frame]
        np.testing.assert_allclose(enhanced.array[z], classic.array[z] * slope + intercept, rtol=1e-6)


def test_info_and_synthesize_take_an_enhanced_file(tmp_path: Path) -> None:
    path = enhanced_from_series(SHIPPED_SERIES, tmp_path / "in" / "enhanced.dcm", seed=3)
    info = runner.invoke(app, ["info", str(path)])
    assert info.exit_code == 0 and "512" in info.stdout
    out = tmp_path / "t2.nii.gz"
    made = runner.invoke(
        app, ["synthesize", "--src", str(path), "--src-modality", "t1n", "--target", "t2w", "-o", str(out), "-q"]
    )
    assert made.exit_code == 0, made.output
    assert read_volume(out).same_grid(read_volume(SHIPPED_SERIES), tol=1e-5)


def test_multi_frame_without_plane_positions_is_a_clear_error(tmp_path: Path) -> None:
    rtdose = Path(pydicom.__file__).parent / "data" / "test_files" / "rtdose.dcm"
    folder = tmp_path / "dose"
    folder.mkdir()
    shutil.copy(rtdose, folder / "rtdose.dcm")
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == 2
    assert "15-frame DICOM object without per-frame plane positions" in result.output
    assert "Traceback" not in result.output


def test_dcm2niix_agrees_on_the_enhanced_geometry(data_dir: Path, tmp_path: Path) -> None:
    dcm2niix = tool("dcm2niix")
    path = enhanced_from_series(
        data_dir / "dicom" / "mr_siemens_t1_mprage_vs-seg-001", tmp_path / "mf" / "e.dcm", seed=4
    )
    subprocess.run(
        [dcm2niix, "-z", "y", "-f", "converted", "-o", str(tmp_path), str(path.parent)], check=True, capture_output=True
    )
    # dcm2niix orders the voxels its own way: compare in one canonical voxel order
    ours, theirs = to_canonical(read_volume(path)), to_canonical(read_volume(tmp_path / "converted.nii.gz"))
    assert ours.same_grid(theirs, tol=1e-3), (ours.origin, theirs.origin)
    assert max_difference(ours.array, theirs.array) == 0


def test_mutated_enhanced_headers_never_end_in_an_internal_error(tmp_path: Path) -> None:
    """Seeded mutants of the functional groups (1 to 6 bytes of the header before the pixel data)."""
    data = enhanced_from_series(SHIPPED_SERIES, tmp_path / "original" / "e.dcm", seed=5).read_bytes()
    header_bytes = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    rng = np.random.default_rng(2028)
    outcomes = {"read": 0, "refused": 0}
    for n in range(80):
        mutant = bytearray(data)
        for offset in rng.choice(header_bytes, size=int(rng.integers(1, 7)), replace=False):
            mutant[offset] = int(rng.integers(0, 256))
        folder = tmp_path / f"mutant-{n}"
        folder.mkdir()
        (folder / "e.dcm").write_bytes(bytes(mutant))
        outcomes[read_outcome(folder)] += 1
    assert outcomes["read"] > 0 and outcomes["refused"] > 0, outcomes


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("unknown-vr", "damaged DICOM file (NotImplementedError: Unknown Value Representation"),
        ("rescale", "malformed rescale of frame"),
        ("far-frame", "shifted in-plane by up to"),
    ],
)
def test_header_damage_the_fuzz_found_is_refused_in_one_line(tmp_path: Path, damage: str, message: str) -> None:
    """Three kinds of damage that once ended in a traceback: a VR no standard names (pydicom parses lazily and
    raised it at the first access), a rescale slope that is not a number, and a frame 20 m off the others
    (a resampling grid too large to allocate)."""
    rescale = [(7.25, 0.0), (1.0, 0.0), (1.0, 0.0), (1.0, 0.0)]
    path = enhanced_from_series(SHIPPED_SERIES, tmp_path / "in" / "e.dcm", seed=6, rescale=rescale)
    data = path.read_bytes()
    if damage == "unknown-vr":
        rows = b"\x28\x00\x10\x00US"  # (0028,0010) Rows, explicit VR
        assert data.count(rows) == 1
        data = data.replace(rows, b"\x28\x00\x10\x00EQ")
    elif damage == "rescale":
        assert data.count(b"7.25") == 1
        data = data.replace(b"7.25", b"7;25")
    else:
        header = pydicom.dcmread(path)
        position = header.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
        position.ImagePositionPatient = [float(v) + 20000.0 * float(r) for v, r in
                                         zip(position.ImagePositionPatient, header.SharedFunctionalGroupsSequence[0]
                                             .PlaneOrientationSequence[0].ImageOrientationPatient[:3], strict=True)]
        header.save_as(path)
        data = path.read_bytes()
    path.write_bytes(data)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 2, result.output
    named = (str(path), str(path.parent))  # the file, or the folder that stands for its series
    line = " ".join(result.output.split())
    assert message in line and any(f"Error: {name}: " in line for name in named), result.output
    assert "Traceback" not in result.output

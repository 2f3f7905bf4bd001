"""Bad-input corpus, made at test time from the real files: every case is one `Error: <path>: ...` line,
exit code 2, no traceback, and nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import typer
from io_helpers import read_outcome
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.cli.common import cli_command
from phmdiff_cli.io import read_volume, write_volume
from phmdiff_cli.io.dicom_read import is_dicom_file

runner = CliRunner()

SMALL_NII_GZ = "ct/totalsegmentator_example_mr_sm_3mm.nii.gz"  # 117x91x20 int16, 270 kB
SMALL_NII = "templates_mni152_2mm/spm12_canonical_avg152T1.nii"  # 91x109x91, uncompressed
CT_SERIES = "dicom/ct_siemens_body_jpeg2000_totalsegmentator"  # 20 slices
MR_SERIES = "dicom/mr_siemens_t1_mprage_vs-seg-001"
#: Real single-file DICOM edge cases shipped inside the pydicom wheel (see ../shared/data/README.md).
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _slices(data_dir: Path, series: str = CT_SERIES) -> list[Path]:
    return sorted(p for p in (data_dir / series).iterdir() if is_dicom_file(p))


def _linked(folder: Path, files: list[Path]) -> Path:
    folder.mkdir()
    for i, file in enumerate(files):
        (folder / f"{i:03d}_{file.name}").symlink_to(file)
    return folder


def _with_header(tmp: Path, data_dir: Path, edit: Callable[[nib.Nifti1Header], None]) -> Path:
    """A copy of the small .nii whose header was edited in place (voxel bytes untouched)."""
    raw = (data_dir / SMALL_NII).read_bytes()
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw))
    edit(header)
    out = tmp / "edited.nii"
    out.write_bytes(header.binaryblock + raw[len(header.binaryblock) :])
    return out


def _nifti(
    tmp: Path, data_dir: Path, change: Callable[[np.ndarray], np.ndarray], name: str = "bad.nii"
) -> Path:
    image = nib.load(data_dir / SMALL_NII_GZ)
    data = change(np.asanyarray(image.dataobj).astype(np.float32))
    nib.save(nib.Nifti1Image(data, image.affine), tmp / name)
    return tmp / name


def _set_nan(a: np.ndarray) -> np.ndarray:
    a[10, 10, 5] = np.nan
    return a


def _set_inf(a: np.ndarray) -> np.ndarray:
    a[3, 4, 5] = -np.inf
    return a


def _edited_slice(tmp: Path, data_dir: Path, edit: Callable[[pydicom.Dataset], None]) -> Path:
    """The CT series with its 5th slice rewritten after ``edit``."""
    files = _slices(data_dir)
    folder = _linked(tmp / "series", files[:4] + files[5:])
    ds = pydicom.dcmread(files[4])
    edit(ds)
    ds.save_as(folder / "edited.dcm")
    return folder


def _truncated(tmp: Path, source: Path, keep: float, name: str) -> Path:
    data = source.read_bytes()
    (tmp / name).write_bytes(data[: int(len(data) * keep)])
    return tmp / name


def _damaged_slice(tmp: Path, data_dir: Path, keep: int) -> Path:
    """Ten MR slices, the first cut after ``keep`` bytes (DICM magic kept). Uncompressed: GDCM takes
    seconds to give up on a truncated JPEG 2000 slice."""
    files = _slices(data_dir, MR_SERIES)[:10]
    folder = _linked(tmp / "series", files[1:])
    (folder / "damaged.dcm").write_bytes(files[0].read_bytes()[:keep])
    return folder


def _sheared(h: nib.Nifti1Header) -> None:
    affine = h.get_best_affine()
    affine[0, 1] = 1.5
    h.set_sform(affine, code=2)
    h.set_qform(None, code=0)


#: name -> builder(tmp_path, data_dir) returning the CLI arguments after `info` (the bad path first).
CASES: dict[str, Callable[[Path, Path], list[str]]] = {
    "nonexistent": lambda t, d: [str(t / "missing.nii.gz")],
    "zero_length_nii_gz": lambda t, d: [str(_truncated(t, d / SMALL_NII_GZ, 0, "empty.nii.gz"))],
    "zero_length_nii": lambda t, d: [str(_truncated(t, d / SMALL_NII, 0, "empty.nii"))],
    "truncated_nii_gz": lambda t, d: [str(_truncated(t, d / SMALL_NII_GZ, 0.5, "cut.nii.gz"))],
    "truncated_nii": lambda t, d: [str(_truncated(t, d / SMALL_NII, 0.3, "cut.nii"))],
    "header_only_nii": lambda t, d: [
        str(_truncated(t, d / SMALL_NII, 352 / (d / SMALL_NII).stat().st_size, "header.nii"))
    ],
    "wrong_magic": lambda t, d: [str(_with_header(t, d, lambda h: h.__setitem__("magic", b"XYZ")))],
    "absurd_dims": lambda t, d: [
        str(_with_header(t, d, lambda h: h.__setitem__("dim", [3, 30000, 30000, 30000, 1, 1, 1, 1])))
    ],
    "negative_dim": lambda t, d: [
        str(_with_header(t, d, lambda h: h.__setitem__("dim", [3, -91, 109, 91, 1, 1, 1, 1])))
    ],
    "complex_voxels": lambda t, d: [str(_nifti(t, d, lambda a: a.astype(np.complex64)))],
    "sheared_affine": lambda t, d: [str(_with_header(t, d, _sheared))],
    "nan_voxels": lambda t, d: [str(_nifti(t, d, _set_nan))],
    "inf_voxels": lambda t, d: [str(_nifti(t, d, _set_inf))],
    "four_d": lambda t, d: [str(_nifti(t, d, lambda a: np.stack([a, a], axis=-1)))],
    "two_d": lambda t, d: [str(_nifti(t, d, lambda a: a[:, :, 0]))],
    "text_named_nii_gz": lambda t, d: [str(_copy(d / "README.md", t / "notes.nii.gz"))],
    "text_file": lambda t, d: [str(_copy(d / "README.md", t / "notes.txt"))],
    "text_named_dcm": lambda t, d: [str(_copy(d / "README.md", t / "slice.dcm"))],
    "garbage_mha": lambda t, d: [str(_random_bytes(t / "noise.mha"))],
    "truncated_mha": lambda t, d: [str(_truncated_mha(t, d))],
    "directory_named_like_a_file": lambda t, d: [str(_mkdir(t / "t1.nii.gz"))],
    "empty_folder": lambda t, d: [str(_mkdir(t / "empty"))],
    "folder_without_dicom": lambda t, d: [
        str(_copy(d / "README.md", _mkdir(t / "docs") / "README.md").parent)
    ],
    "dicom_missing_slice": lambda t, d: [str(_linked(t / "series", _slices(d)[:7] + _slices(d)[8:]))],
    "dicom_duplicate_position": lambda t, d: [str(_linked(t / "series", _slices(d) + _slices(d)[3:4]))],
    "dicom_mixed_series": lambda t, d: [str(_linked(t / "series", _slices(d) + _slices(d, MR_SERIES)))],
    "dicom_unknown_series_uid": lambda t, d: [
        str(_linked(t / "series", _slices(d, MR_SERIES)[:3])),
        "--series-uid",
        "1.2.3.4",
    ],
    "dicom_damaged_header": lambda t, d: [str(_damaged_slice(t, d, 400))],
    "dicom_truncated_pixels": lambda t, d: [str(_damaged_slice(t, d, 300_000))],
    "dicom_other_orientation": lambda t, d: [
        str(_edited_slice(t, d, lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1])))
    ],
    "dicom_no_position": lambda t, d: [
        str(_edited_slice(t, d, lambda ds: delattr(ds, "ImagePositionPatient")))
    ],
    "dicom_other_matrix": lambda t, d: [
        str(_edited_slice(t, d, lambda ds: setattr(ds, "PixelSpacing", [2, 2])))
    ],
    "multiframe_rgb_dicom": lambda t, d: [
        str(_copy(PYDICOM_FILES / "SC_rgb_rle_2frame.dcm", _mkdir(t / "sc") / "a.dcm"))
    ],
    "series_uid_on_nifti": lambda t, d: [str(_copy(d / SMALL_NII, t / "t1.nii")), "--series-uid", "1.2.3"],
    # pydicom's own: NumberOfFrames "1A" (an IS value that is not a number)
    "dicom_bad_value_representation": lambda t, d: [
        str(_copy(PYDICOM_FILES / "badVR.dcm", _mkdir(t / "bad") / "badVR.dcm").parent)
    ],
}


def _copy(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _truncated_mha(tmp: Path, data_dir: Path) -> Path:
    sitk.WriteImage(read_volume(data_dir / SMALL_NII_GZ).to_sitk(), str(tmp / "full.mha"))
    path = _truncated(tmp, tmp / "full.mha", 0.5, "cut.mha")
    (tmp / "full.mha").unlink()
    return path


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _assert_one_error_line(result, path: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"Error: {path}"), errors[0]
    assert result.stdout == ""


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error(tmp_path: Path, data_dir: Path, case: str) -> None:
    args = CASES[case](tmp_path, data_dir)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["info", *args], env={"COLUMNS": "80"})
    _assert_one_error_line(result, args[0])
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path: Path, data_dir: Path) -> None:
    path = _copy(data_dir / SMALL_NII_GZ, tmp_path / "locked.nii.gz")
    path.chmod(0)
    _assert_one_error_line(runner.invoke(app, ["info", str(path)]), str(path))


@pytest.mark.slow
def test_bad_input_in_a_real_process(tmp_path: Path, data_dir: Path) -> None:
    args = CASES["truncated_nii_gz"](tmp_path, data_dir)
    result = subprocess.run(
        [sys.executable, "-m", "phmdiff_cli", "info", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.startswith(f"Error: {args[0]}: ")
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1


# Outputs: no shipped command writes yet, so a two-line command runs read_volume + write_volume through
# the same error handling (cli_command) as every phmdiff command.
convert = typer.Typer()


@convert.command()
@cli_command
def _convert(
    source: Path,
    target: Path,
    force: bool = typer.Option(False, "--force"),
    format: str | None = typer.Option(None, "--format"),
) -> None:
    write_volume(read_volume(source), target, force=force, format=format)


def _existing(tmp: Path, name: str) -> Path:
    (tmp / name).write_bytes(b"precious")
    return tmp / name


OUTPUT_CASES: dict[str, Callable[[Path], tuple[list[str], str]]] = {
    "output_exists": lambda t: ([str(_existing(t, "out.nii.gz"))], str(t / "out.nii.gz")),
    "output_dicom_folder_exists": lambda t: ([str(_mkdir(t / "dicom_out"))], str(t / "dicom_out")),
    "output_folder_missing": lambda t: ([str(t / "no" / "such" / "out.nii")], str(t / "no" / "such")),
    "output_parent_is_a_file": lambda t: ([str(_existing(t, "file.txt") / "out.nii")], str(t / "file.txt")),
    "output_folder_not_writable": lambda t: (["/proc/phmdiff_out.nii"], "/proc"),
    "unknown_format": lambda t: ([str(t / "out.img"), "--format", "analyze"], ""),
    "format_contradicts_name": lambda t: (
        [str(t / "out.nii.gz"), "--format", "dicom"],
        str(t / "out.nii.gz"),
    ),
    "two_file_mhd": lambda t: ([str(t / "out.mhd")], str(t / "out.mhd")),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_bad_output_is_one_clear_error(tmp_path: Path, data_dir: Path, case: str) -> None:
    args, named = OUTPUT_CASES[case](tmp_path)
    before = _snapshot(tmp_path)
    result = runner.invoke(convert, [str(data_dir / SMALL_NII_GZ), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {named}"), result.stderr
    assert "Traceback" not in result.output
    assert _snapshot(tmp_path) == before
    if case == "output_exists":
        assert (tmp_path / "out.nii.gz").read_bytes() == b"precious"


def test_failed_write_leaves_nothing(tmp_path: Path, data_dir: Path) -> None:
    """A write that fails half-way (a grid DICOM cannot hold) leaves neither output nor temporary folder."""
    volume = read_volume(data_dir / SMALL_NII_GZ)
    volume.direction = (1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    result = runner.invoke(convert, [str(data_dir / SMALL_NII_GZ), str(tmp_path / "x")])  # the sane one works
    assert result.exit_code == 0 and (tmp_path / "x").is_dir()
    with pytest.raises(Exception, match="non-orthogonal"):
        write_volume(volume, tmp_path / "sheared")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_pydicom_test_corpus_never_ends_in_an_internal_error(tmp_path: Path) -> None:
    """pydicom's own odd files (bad VRs, RT dose, big-endian, compressed, multi-frame, ...), each given as a file
    among its neighbours (its series read from their folder) and alone in a folder: read or refused with a
    one-line error, never an internal error."""
    files = sorted(PYDICOM_FILES.glob("*.dcm"))
    assert len(files) > 50
    outcomes = {"read": 0, "refused": 0}
    for source in files:
        alone = _mkdir(tmp_path / source.stem)
        for given in (source, _copy(source, alone / source.name).parent):
            outcomes[read_outcome(given)] += 1
    assert outcomes["read"] >= 4 and outcomes["refused"] > 0, outcomes

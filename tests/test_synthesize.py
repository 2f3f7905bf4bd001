"""`phmdiff synthesize` end to end on real volumes: output geometry, header, formats, units, determinism."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from io_helpers import sitk_series
from scipy import ndimage
from synthesize_helpers import T1N, T2W, correlation, crop_z, identity_sample, records, run, write_tiny_model

from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.normalize import fit_intensity, foreground_mask, normalize_source
from phmdiff_cli.data.preprocess import prepare_volume
from phmdiff_cli.engine import synthesizer
from phmdiff_cli.engine.source_support import SUPPORT_MARGIN
from phmdiff_cli.errors import EXIT_BAD_INPUT
from phmdiff_cli.io import read_volume
from phmdiff_cli.io.dicom_read import is_dicom_file

MR_SERIES = "dicom/mr_siemens_t1_mprage_vs-seg-001"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Percentile sources: the identity stand-in then reproduces the input's values, which the geometry checks use.
    return write_tiny_model(tmp_path_factory.mktemp("synthesize") / "model", source_norm="percentile")


@pytest.fixture(scope="module")
def small_t1n(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 slices of a BraTS T1 (through the tumour), with its grid."""
    return crop_z(data_dir / T1N, tmp_path_factory.mktemp("crop") / "case-t1n.nii.gz", 70, 78)


def _same_nifti_grid(output: Path, source: Path) -> None:
    """Shape, affine, sform/qform (with codes) and header fields of ``output`` equal ``source``'s."""
    out, src = nib.load(output), nib.load(source)
    assert out.shape == src.shape
    for getter in ("get_sform", "get_qform"):
        (a, code_a), (b, code_b) = (
            getattr(out.header, getter)(coded=True),
            getattr(src.header, getter)(coded=True),
        )
        assert code_a == code_b and np.allclose(a, b, atol=1e-6)
    for key in ("xyzt_units", "descrip", "qform_code", "sform_code"):
        assert np.array_equal(out.header[key], src.header[key]), key
    assert np.array_equal(out.header["pixdim"][:4], src.header["pixdim"][:4])  # 4-7 are unused in 3-D
    assert read_volume(output).same_grid(read_volume(source), tol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "target"),
    [
        (T1N, "t2"),  # LPS, int16
        ("brats/BraTS-MET-00110-000/BraTS-MET-00110-000-t1n.nii.gz", "t2w"),  # RAS
        ("single_subject_t1_pd/chris_PD.nii.gz", "t1"),  # oblique affine, 2.4 mm slices
    ],
)
def test_output_on_the_exact_input_grid_with_its_header(
    data_dir: Path, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, name: str, target: str
) -> None:
    # With the identity stand-in the output must reproduce the input: any flip, shift or axis swap on the way
    # through canonical orientation and the model grid would break the correlation.
    monkeypatch.setattr(synthesizer, "sample", identity_sample)
    source, out = data_dir / name, tmp_path / "out.nii.gz"
    result = run("--src", source, "--target", target, "-o", out, "--model", model, "--json")
    assert result.exit_code == 0, result.output
    _same_nifti_grid(out, source)
    src = read_volume(source).array.astype(np.float32)
    syn = read_volume(out).array
    hi = fit_intensity(src, read_volume(source).modality).hi
    assert syn.dtype == np.float32 and syn.min() >= 0 and syn.max() <= hi * 1.0001  # the source's scale
    reference = np.clip(src, 0, hi)
    assert correlation(syn, reference) > 0.97

    def error(ref: np.ndarray) -> float:
        return float(np.abs(syn - ref).mean())

    # A brain is nearly symmetric left-right, so a flip costs "only" 1.6x (oblique PD) to 2.3x the error.
    assert error(reference) < 0.7 * min(error(np.flip(reference, axis)) for axis in range(3))
    assert records(result)[0]["seconds"]["total"] > 0


def test_dicom_output_reads_back_on_the_input_grid(small_t1n: Path, tmp_path: Path, model: Path) -> None:
    out = tmp_path / "t2w_dicom"
    result = run("--src", small_t1n, "--target", "t2w", "-o", out, "--model", model, "--steps", "1")
    assert result.exit_code == 0, result.output
    image, source = sitk_series(out), read_volume(small_t1n)
    assert image.GetSize() == source.size
    np.testing.assert_allclose(image.GetSpacing(), source.spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), source.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), source.direction, atol=1e-5)
    first = pydicom.dcmread(next(p for p in sorted(out.iterdir()) if is_dicom_file(p)))
    assert first.Modality == "MR" and "DERIVED" in first.ImageType
    # An empty existing folder is filled rather than refused.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        run("--src", small_t1n, "--target", "t2w", "-o", empty, "--model", model, "--steps", "1").exit_code
        == 0
    )
    assert len([p for p in empty.iterdir() if is_dicom_file(p)]) == source.shape[0]


@pytest.fixture(scope="module")
def mr_series(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 consecutive slices of the real Siemens MPRAGE series (links to its files): a fast real series."""
    files = [p for p in (data_dir / MR_SERIES).iterdir() if is_dicom_file(p)]
    position = {p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files}
    folder = tmp_path_factory.mktemp("series") / "t1_mprage"
    folder.mkdir()
    for path in sorted(files, key=position.__getitem__)[48:72]:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.mark.slow
def test_dicom_series_input_to_nifti_and_to_a_derived_series(
    mr_series: Path, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synthesizer, "sample", identity_sample)
    nifti, dicom = tmp_path / "t2w.nii", tmp_path / "t2w"
    result = run("--src", mr_series, "--target", "t2w", "-o", nifti, "--model", model, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert records(result)[0]["sources"][0]["modality"] == "t1n"  # from the series description
    source, syn = read_volume(mr_series), read_volume(nifti)
    assert source.shape == (24, 512, 512) and syn.same_grid(source, tol=1e-4)
    assert correlation(syn.array, np.clip(source.array, 0, None)) > 0.9
    result = run("--src", mr_series, "--target", "t2w", "-o", dicom, "--format", "dicom", "--model", model)
    assert result.exit_code == 0, result.output
    image = sitk_series(dicom)
    assert image.GetSize() == source.size
    np.testing.assert_allclose(image.GetSpacing(), source.spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), source.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), source.direction, atol=1e-5)
    derived = pydicom.dcmread(next(p for p in sorted(dicom.iterdir()) if is_dicom_file(p)))
    original = pydicom.dcmread(next(mr_series.iterdir()))
    assert derived.StudyInstanceUID == original.StudyInstanceUID and derived.PatientID == original.PatientID
    assert derived.SeriesInstanceUID != original.SeriesInstanceUID and "DERIVED" in derived.ImageType


def test_ct_target_is_int16_hounsfield_units(data_dir: Path, tmp_path: Path, model: Path) -> None:
    source = data_dir / "ct/totalsegmentator_example_mr_sm_3mm.nii.gz"  # body MR, modality "mr" from the name
    out = tmp_path / "sct.nii.gz"
    assert run("--src", source, "--target", "ct", "-o", out, "--model", model, "--steps", "1").exit_code == 0
    ct = read_volume(out)
    assert ct.array.dtype == np.int16 and ct.same_grid(read_volume(source), tol=1e-6)
    assert -1024 <= ct.array.min() and ct.array.max() <= 3000 and len(np.unique(ct.array)) > 100


@pytest.mark.slow
def test_fixed_seed_is_deterministic_and_batching_does_not_change_the_output(
    small_t1n: Path, tmp_path: Path, model: Path
) -> None:
    def synth(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / f"{name}.nii.gz"
        result = run("--src", small_t1n, "--target", "t2w", "-o", out, "--model", model, "--steps", "1",
                     *extra)
        assert result.exit_code == 0, result.output
        return read_volume(out).array

    first, again, other = synth("a", "--seed", "7"), synth("b", "--seed", "7"), synth("c", "--seed", "8")
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 0.01 * first.max()
    # The noise is shared by every slice, so slices sampled 3 at a time (and the edge slices, whose 2.5D
    # context repeats the border) come out as in one batch.
    np.testing.assert_allclose(synth("d", "--seed", "7", "--batch-size", "3"), first, atol=1e-3 * first.max())


def test_samples_write_a_standard_deviation_map(small_t1n: Path, tmp_path: Path, model: Path) -> None:
    out, std = tmp_path / "mean.nii.gz", tmp_path / "std.nii.gz"
    result = run("--src", small_t1n, "--target", "t2w", "-o", out, "--model", model, "--steps", "1",
                 "--samples", "2", "--uncertainty", std, "--json")
    assert result.exit_code == 0, result.output
    assert records(result)[0]["uncertainty"] == str(std)
    mean, spread = read_volume(out), read_volume(std)
    assert spread.same_grid(mean, tol=1e-6) and spread.array.dtype == np.float32
    assert spread.array.min() >= 0 and spread.array.max() > 0


def test_no_output_where_no_source_has_signal(small_t1n: Path, tmp_path: Path, model: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A network that paints a haze over the whole field of view (as one tuned on raw heads' noisy air did) still
    writes background more than ``SUPPORT_MARGIN`` model voxels (+ one for the linear restore) from the source's
    foreground, and keeps its output inside."""

    def hazy(model, source, *args, **kwargs):
        mean, std = identity_sample(model, source, *args, **kwargs)
        return mean.clamp(min=-0.8), std  # background -1 raised to -0.8: a tenth of the output's scale

    monkeypatch.setattr(synthesizer, "sample", hazy)
    out = tmp_path / "t2w.nii.gz"
    assert run("--src", small_t1n, "--target", "t2w", "-o", out, "--model", model).exit_code == 0
    source, output = read_volume(small_t1n), read_volume(out).array
    foreground = foreground_mask(source.array.astype(np.float32), "t1n")
    # distances in mm on the source grid (array axes z, y, x); the tiny model's voxels are 3.75 mm
    distance = ndimage.distance_transform_edt(~foreground, sampling=source.spacing[::-1])
    far, near = distance > (SUPPORT_MARGIN + 1) * 3.75 * np.sqrt(3), (distance > 0) & (distance < 3.75)
    assert far.sum() > 0.3 * far.size and np.all(output[far] == 0.0)
    assert np.median(output[near]) > 0.05 * output.max()  # the haze is kept next to the head, where it may be


def test_source_detail_sharpens_a_blurred_output_on_request(small_t1n: Path, tmp_path: Path, model: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A network whose output is the source blurred (a regression's mean) gets the source's edges back with
    --source-detail: the output follows the source more closely; the tiny model's default leaves it off, and
    --json says which ran."""

    def blurry(model, source, *args, **kwargs):
        mean, std = identity_sample(model, source, *args, **kwargs)
        kernel = torch.ones(1, 1, 3, 3, dtype=mean.dtype) / 9.0
        return torch.nn.functional.conv2d(mean, kernel, padding=1), std

    monkeypatch.setattr(synthesizer, "sample", blurry)
    source = read_volume(small_t1n).array
    missing = {}  # 1 - correlation with the source: what the blur took away
    for flag in ("--source-detail", "--no-source-detail", None):
        out = tmp_path / f"{flag}.nii.gz"
        result = run("--src", small_t1n, "--target", "t2w", "-o", out, "--model", model, "--json",
                     *([flag] if flag else []))
        assert result.exit_code == 0, result.output
        record = records(result)[0]
        assert record["source_detail"] is ("source_detail" in record["seconds"]) is (flag == "--source-detail")
        missing[flag] = 1.0 - correlation(read_volume(out).array, source)
    # measured 0.0095 against 0.0175 (the tiny model's 3.75 mm grid, restored onto the 1 mm source)
    assert missing["--source-detail"] < 0.7 * missing["--no-source-detail"]
    assert missing[None] == missing["--no-source-detail"]


def test_mirror_makes_the_synthesis_mirror_symmetric(small_t1n: Path, tmp_path: Path, model: Path) -> None:
    """With --mirror the T1 mirrored left-right synthesizes the mirrored T2 (each slice averaged with the
    synthesis of its mirror image, unrolled: this card's ``mirror_shift`` is 0); the network alone is not
    symmetric, and --json says which ran."""
    image = nib.load(small_t1n)
    assert nib.aff2axcodes(image.affine)[0] in "LR"  # voxel axis 0 runs left-right
    mirrored = tmp_path / "mirrored-t1n.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1], image.affine, image.header), mirrored)
    asymmetry = {}
    for flag in ("--mirror", "--no-mirror"):
        outputs = []
        for source in (small_t1n, mirrored):
            out = tmp_path / f"{flag}-{source.name}"
            result = run("--src", source, "--target", "t2w", "-o", out, "--model", model, "--json", flag)
            assert result.exit_code == 0, result.output
            assert records(result)[0]["mirror"] is (flag == "--mirror")
            outputs.append(np.asarray(nib.load(out).dataobj, dtype=np.float32))
        asymmetry[flag] = np.abs(outputs[0] - outputs[1][::-1]).max() / outputs[0].max()
    assert asymmetry["--mirror"] < 1e-4 and asymmetry["--no-mirror"] > 1e-2, asymmetry


def test_sources_on_other_grids_are_resampled_onto_the_first(
    data_dir: Path, tmp_path: Path, model: Path, small_t1n: Path
) -> None:
    # A T2 of the same subject with other slices: not on the T1's grid. Given first, the T2 sets the grid.
    t2w = crop_z(data_dir / T2W, tmp_path / "case-t2w.nii.gz", 65, 85)
    out = tmp_path / "t2f.nii.gz"
    result = run("--src", t2w, "--src", small_t1n, "--target", "flair", "-o", out, "--model", model,
                 "--steps", "1", "--json")
    assert result.exit_code == 0, result.output
    record = records(result)[0]
    assert record["pair"] == "t1n+t2w:t2f" and "resampled" in record["notes"][0]
    assert read_volume(out).same_grid(read_volume(t2w), tol=1e-6)


def test_sources_matching_no_pair_list_the_models_pairs(data_dir: Path, tmp_path: Path, model: Path,
                                                        small_t1n: Path) -> None:
    t2w = crop_z(data_dir / T2W, tmp_path / "case-t2w.nii.gz", 70, 78)
    out = tmp_path / "out.nii.gz"
    result = run("--src", small_t1n, "--src", t2w, "--target", "t1c", "-o", out, "--model", model)
    assert result.exit_code == 2 and not out.exists()
    message = " ".join(result.output.split())
    assert "not trained for t1n+t2w:t1c" in message and "t1n:t2w, t1n+t2w:t2f, pd:t1n, mr:ct" in message


def test_progress_messages_and_quiet(small_t1n: Path, tmp_path: Path, model: Path) -> None:
    loud = run("--src", small_t1n, "--target", "t2w", "-o", tmp_path / "a.nii.gz", "--model", model,
               "--steps", "1", "--batch-size", "2")  # the estimate comes after a first batch, not the last
    assert "Estimated time" in loud.stderr and "Wrote" in loud.stderr and loud.stdout == ""
    quiet = run("--src", small_t1n, "--target", "t2w", "-o", tmp_path / "b.nii.gz", "--model", model,
                "--steps", "1", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    assert sitk.ReadImage(str(tmp_path / "b.nii.gz")).GetSize() == read_volume(small_t1n).size


def test_series_uid_picks_one_series_of_a_mixed_folder(
    mr_series: Path, data_dir: Path, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synthesizer, "sample", identity_sample)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in mr_series.iterdir():
        (mixed / path.name).symlink_to(path.resolve())
    ct_files = sorted(p for p in (data_dir / "dicom/ct_siemens_body_jpeg2000_totalsegmentator").iterdir()
                      if is_dicom_file(p))[:3]
    for n, path in enumerate(ct_files):
        (mixed / f"ct{n}.dcm").symlink_to(path)
    out = tmp_path / "t2w.nii"
    refused = run("--src", mixed, "--src-modality", "t1n", "--target", "t2w", "-o", out, "--model", model)
    assert refused.exit_code == EXIT_BAD_INPUT and "--series-uid" in refused.stderr and not out.exists()
    uid = str(pydicom.dcmread(next(mr_series.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    picked = run("--src", mixed, "--series-uid", uid, "--target", "t2w", "-o", out, "--model", model, "-q")
    assert picked.exit_code == 0, picked.output
    assert read_volume(out).same_grid(read_volume(mr_series), tol=1e-4)


def test_a_rank_model_samples_from_the_ranks_of_its_sources(
    small_t1n: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model trained on rank-normalised sources gets the source's ranks at synthesis, computed over the
    whole volume on the model grid as training computes them (``normalize_source``), not its raw scale."""
    ranked_model = write_tiny_model(tmp_path / "rank-model")
    seen: list[np.ndarray] = []

    def spy(model, source, *args, **kwargs):
        seen.append(source[:, 0, model.config.context].numpy().copy())
        return identity_sample(model, source, *args, **kwargs)

    monkeypatch.setattr(synthesizer, "sample", spy)
    result = run("--src", small_t1n, "--target", "t2w", "-o", tmp_path / "t2w.nii.gz", "--model", ranked_model)
    assert result.exit_code == 0, result.output
    prepared = prepare_volume(read_volume(small_t1n), ModelGrid(64, 3.75)).array
    np.testing.assert_allclose(np.concatenate(seen), normalize_source(prepared, "t1n", "rank"), atol=1e-6)
    assert np.abs(np.concatenate(seen) - prepared).max() > 0.1

"""Scans as hospitals export them: skull on, thick slices. The shipped model's card says what it was trained on
(``input_domain``); every input outside it gets a warning saying what and why, the shipped brains none.
``--brain-mask`` (NIfTI or DICOM sources, a mask on any grid) and thick slices made thin for synthesis, with the
output back on the source's exact grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.normalize import foreground_mask
from phmdiff_cli.data.preprocess import prepare_volume, resample_onto, shows_skull, thicken_onto, thin_slices
from phmdiff_cli.engine.hub import DEFAULT_MODEL, HEADS_MODEL
from phmdiff_cli.engine.input_domain import HEAD_ML, check, measure
from phmdiff_cli.io import Volume, canonical_grid, read_volume

REPO = Path(__file__).resolve().parents[1]
DOMAIN = json.loads((REPO / "weights" / DEFAULT_MODEL / "config.json").read_text())["input_domain"]
EXAMPLE = REPO / "examples" / "TCGA-DU-7294-t1n.nii.gz"
SERIES = REPO / "tests" / "data" / "mr_t1_4slices"
SKULL = "probably not skull-stripped"
runner = CliRunner()


def _warnings(path: Path, modality: str = "t1n") -> list[str]:
    return check(measure(read_volume(path), modality), DOMAIN, modality, path.name)


def _slab(source: Path, out: Path, start: int, stop: int) -> Path:
    """Slices start..stop of a real image, on its own grid (SimpleITK keeps origin and direction)."""
    sitk.WriteImage(sitk.ReadImage(str(source))[:, :, start:stop], str(out))
    return out


def _synthesize(*args: str) -> dict:
    result = runner.invoke(app, ["synthesize", *args, "--json", "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["cases"][0]


@pytest.mark.parametrize(("subject", "modality"), [
    ("brats/TCGA-DU-7294/TCGA-DU-7294-t1n.nii.gz", "t1n"), ("ms_mni/OMS-MNI-p19/OMS-MNI-p19-t2w.nii.gz", "t2w"),
    ("brats2013_t1c_flair/BraTS2013-pat0001/BraTS2013-pat0001-t1c.nii.gz", "t1c"),
    ("brats2013_t1c_flair/BraTS2013-pat0002/BraTS2013-pat0002-t2f.nii.gz", "t2f"),
])  # fmt: skip
def test_brains_like_the_training_ones_raise_no_warning(data_dir: Path, subject: str, modality: str) -> None:
    assert _warnings(data_dir / subject, modality) == []


@pytest.mark.parametrize("scan", ["clinical_raw/OMS-raw-p01-study1/T1W.nii.gz",
                                  "clinical_raw/OMS-raw-p04-study1/T2W.nii.gz",
                                  "clinical_raw/OMS-raw-p04-study1/FLAIR.nii.gz"])
def test_raw_clinical_heads_are_warned_about_skull_and_slices(data_dir: Path, scan: str) -> None:
    found = _warnings(data_dir / scan)
    assert len(found) == 2 and SKULL in found[0] and "skull-strip it first" in found[0]
    assert "mm apart; the model saw slices at most 1 mm apart" in found[1]


def test_a_dicom_head_series_is_warned_and_a_brain_mask_silences_it(tmp_path: Path) -> None:
    volume = read_volume(SERIES)
    assert SKULL in " ".join(check(measure(volume, "t1n"), DOMAIN, "t1n", "series"))
    mask = _disk_mask(volume, radius_mm=60.0)
    assert check(measure(volume, "t1n", mask), DOMAIN, "t1n", "series") == []


def test_a_model_trained_on_heads_calls_a_larger_input_a_larger_field_of_view(data_dir: Path) -> None:
    """A domain measured on heads with skull (its largest image above HEAD_ML, as the raw head of
    ``weights/brain_small.py heads`` gives): a raw head like it passes the size check, a wider section does not,
    and neither is told to be skull-stripped."""
    heads = {**DOMAIN, "foreground_ml": [1015.0, 2807.0], "max_area_cm2": [128.0, 249.0]}
    assert heads["foreground_ml"][1] > HEAD_ML
    raw = data_dir / "clinical_raw" / "OMS-raw-p04-study1" / "T1W.nii.gz"
    assert [w for w in check(measure(read_volume(raw), "t1n"), heads, "t1n", "t1") if "field of view" in w] == []
    found = check(measure(read_volume(SERIES), "t1n"), heads, "t1n", "series")
    assert "a larger field of view than the model was trained on" in found[0] and "crop it to the head" in found[0]
    assert not any(SKULL in w for w in found)


def test_a_head_with_skull_is_told_from_a_brain_on_the_model_grid(data_dir: Path) -> None:
    """What a ``skull_condition`` model is told: a raw head (a 0.5 mm T1 of 3 mm slices) and a 4-slice DICOM head
    show a skull, the example brain does not, nor a head inside a brain-sized mask."""
    grid = ModelGrid(240, 1.0)
    def skull(volume: Volume, mask: Volume | None = None) -> bool:
        return shows_skull(prepare_volume(volume, grid, modality="t1n", mask=mask).foreground, grid)

    assert not skull(read_volume(EXAMPLE))
    raw = read_volume(data_dir / "clinical_raw" / "OMS-raw-p01-study1" / "T1W.nii.gz")
    series = read_volume(SERIES)
    assert skull(raw) and skull(series)
    assert not skull(series, _disk_mask(series, radius_mm=60.0))


def _disk_mask(volume: Volume, radius_mm: float) -> Volume:
    """A cylinder around the centre of each slice, on ``volume``'s grid."""
    rows, cols = np.indices(volume.shape[1:])
    sx, sy, _ = volume.spacing
    inside = ((rows - volume.shape[1] / 2) * sy) ** 2 + ((cols - volume.shape[2] / 2) * sx) ** 2 < radius_mm**2
    return volume.with_array(np.broadcast_to(inside, volume.shape).astype(np.uint8))


def test_brain_mask_on_another_grid_with_a_dicom_source(tmp_path: Path) -> None:
    """The mask, written at half the resolution, is resampled nearest-neighbour onto the series; the output is 0
    outside it, on the series' exact grid."""
    source = read_volume(SERIES)
    coarse = sitk.Shrink(_disk_mask(source, radius_mm=50.0).to_sitk(), [2, 2, 1])
    mask_path = tmp_path / "mask.nii.gz"
    sitk.WriteImage(coarse, str(mask_path))
    out = tmp_path / "t2.nii.gz"
    case = _synthesize("--src", str(SERIES), "--src-modality", "t1", "--target", "t2", "--brain-mask",
                       str(mask_path), "-o", str(out))
    assert case["warnings"] == [] and case["brain_mask"] == str(mask_path)
    synthetic = read_volume(out)
    assert synthetic.same_grid(source, tol=1e-4)  # NIfTI stores the DICOM geometry in float32
    inside = resample_onto(read_volume(mask_path), source, nearest=True).array > 0
    assert np.all(synthetic.array[~inside] == 0) and synthetic.array[inside].max() > 0


def test_brain_mask_of_a_z_scored_nifti_and_in_list_mode(data_dir: Path, tmp_path: Path) -> None:
    """BraTS 2013 (z-scored, with its own brain mask): a --list case whose mask path is a pattern."""
    subject = data_dir / "brats2013_t1c_flair" / "BraTS2013-pat0001"
    source = _slab(subject / "BraTS2013-pat0001-t1c.nii.gz", tmp_path / "p1.nii.gz", 70, 76)
    _slab(subject / "BraTS2013-pat0001-brainmask.nii.gz", tmp_path / "p1-mask.nii.gz", 70, 76)
    listing = tmp_path / "cases.txt"
    listing.write_text(f"{source}\n")
    case = _synthesize("--list", str(listing), "--src-modality", "t1c", "--target", "flair", "--brain-mask",
                       "{parent}/{stem}-mask.nii.gz", "-o", str(tmp_path / "{stem}-t2f.nii.gz"))
    assert case["warnings"] == [] and case["brain_mask"].endswith("p1-mask.nii.gz")
    synthetic, mask = read_volume(tmp_path / "p1-t2f.nii.gz"), read_volume(tmp_path / "p1-mask.nii.gz").array > 0
    assert synthetic.same_grid(read_volume(source), tol=0)
    assert np.all(synthetic.array[~mask] == 0) and np.mean(synthetic.array[mask] > 0) > 0.95


def test_an_empty_brain_mask_is_a_clear_error(tmp_path: Path) -> None:
    source = read_volume(SERIES)
    mask_path = tmp_path / "empty.nii.gz"
    sitk.WriteImage(source.with_array(np.zeros(source.shape, np.uint8)).to_sitk(), str(mask_path))
    result = runner.invoke(app, ["synthesize", "--src", str(SERIES), "--src-modality", "t1", "--target", "t2",
                                 "--brain-mask", str(mask_path), "-o", str(tmp_path / "out.nii.gz")])
    assert result.exit_code == 2 and "empty.nii.gz" in result.output and "no voxel inside" in result.output
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_thick_slice_head_is_synthesized_thin_and_put_back_on_its_grid(data_dir: Path, tmp_path: Path) -> None:
    """Six 3 mm slices of a raw clinical T1 (skull on) given to the brain model: both warnings in --json, 16 thin
    slices synthesized, the output on the source's exact grid; the contrast calibration skipped, with a note."""
    source = _slab(data_dir / "clinical_raw" / "OMS-raw-p04-study1" / "T1W.nii.gz", tmp_path / "t1.nii.gz", 20, 26)
    out = tmp_path / "t2.nii.gz"
    case = _synthesize("--src", str(source), "--src-modality", "t1", "--target", "t2", "-o", str(out),
                       "--model", DEFAULT_MODEL)
    assert len(case["warnings"]) == 2 and SKULL in case["warnings"][0] and "3 mm apart" in case["warnings"][1]
    assert case["slices"] == 16 and any("resampled to 1 mm" in note for note in case["notes"])
    synthetic = read_volume(out)
    assert synthetic.same_grid(read_volume(source), tol=0) and synthetic.array.max() > 0
    # the contrast reference holds for brains like the training ones: skipped here, unless asked for
    assert case["contrast_gamma"] is None and any("contrast calibration skipped" in n for n in case["notes"])
    forced = _synthesize("--src", str(source), "--src-modality", "t1", "--target", "t2", "-o", str(out), "--force",
                         "--contrast", "--model", DEFAULT_MODEL)
    assert forced["contrast_gamma"] is not None and not any("contrast" in n for n in forced["notes"])


def _real_t2_on(t1: Path, subject: Path) -> np.ndarray:
    """The subject's real T2W on the grid of ``t1`` (a part of its T1W), moved by the two rigid transforms that
    come with it (each maps FLAIR points to its image's points)."""
    to_t2 = sitk.CompositeTransform([sitk.ReadTransform(str(subject / "T1W_to_FLAIR.txt")).GetInverse(),
                                     sitk.ReadTransform(str(subject / "T2W_to_FLAIR.txt"))])
    to_t2.FlattenTransform()
    grid = sitk.ReadImage(str(t1))
    moved = sitk.Resample(sitk.ReadImage(str(subject / "T2W.nii.gz")), grid, to_t2, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(moved).astype(np.float32)


def test_without_model_a_head_goes_to_the_heads_model(data_dir: Path, tmp_path: Path) -> None:
    """Without --model, a raw head with skull (six 3 mm slices of a T1 no shipped model trained on) is synthesized
    by HEADS_MODEL, with a note and no skull warning, and its T2 follows the real one over the whole head far more
    closely than the brain model's (which paints a ring where the skull is); a brain, or the head with
    --brain-mask, stays with DEFAULT_MODEL."""
    subject = data_dir / "clinical_raw" / "OMS-raw-p04-study1"
    source = _slab(subject / "T1W.nii.gz", tmp_path / "t1.nii.gz", 20, 26)
    args = ("--src", str(source), "--src-modality", "t1", "--target", "t2")
    routed = _synthesize(*args, "-o", str(tmp_path / "heads.nii.gz"))
    pinned = _synthesize(*args, "-o", str(tmp_path / "brain.nii.gz"), "--model", DEFAULT_MODEL)
    assert Path(routed["model"]).name == HEADS_MODEL and routed["heads_model"] == routed["model"]
    assert "shows a head with skull" in routed["notes"][0] and not any(SKULL in w for w in routed["warnings"])
    assert Path(pinned["model"]).name == DEFAULT_MODEL and pinned["heads_model"] is None
    assert any(SKULL in w for w in pinned["warnings"])
    real = _real_t2_on(source, subject)
    head = foreground_mask(sitk.GetArrayFromImage(sitk.ReadImage(str(source))), "t1n") & (real > 0)
    def follows(name: str) -> float:
        return float(np.corrcoef(read_volume(tmp_path / name).array[head], real[head])[0, 1])

    assert follows("heads.nii.gz") > follows("brain.nii.gz") + 0.2, (follows("heads.nii.gz"), follows("brain.nii.gz"))

    mask = tmp_path / "mask.nii.gz"
    sitk.WriteImage(_disk_mask(read_volume(source), radius_mm=60.0).to_sitk(), str(mask))
    masked = _synthesize(*args, "-o", str(tmp_path / "masked.nii.gz"), "--brain-mask", str(mask))
    brain = _synthesize("--src", str(_slab(EXAMPLE, tmp_path / "brain-t1n.nii.gz", 70, 74)), "--target", "t2",
                        "-o", str(tmp_path / "brain-t2.nii.gz"))
    for case in (masked, brain):
        assert Path(case["model"]).name == DEFAULT_MODEL and not any("head with skull" in n for n in case["notes"])


def test_a_head_series_with_noisy_air_is_kept_inside_the_head(tmp_path: Path) -> None:
    """A real 0.41 mm T1 series (skull on) whose air's noise lies above the foreground threshold: without --model
    it goes to the heads model, and the synthetic T2 is background in the air, not a haze over the field of view."""
    out = tmp_path / "t2.nii.gz"
    case = _synthesize("--src", str(SERIES), "--src-modality", "t1", "--target", "t2", "-o", str(out))
    source, synthetic = read_volume(SERIES), read_volume(out)
    noisy = foreground_mask(source.array.astype(np.float32), "t1n")
    assert Path(case["model"]).name == HEADS_MODEL and synthetic.same_grid(source, tol=1e-4)
    corners = np.zeros(source.shape[1:], bool)
    corners[:40, :40] = corners[:40, -40:] = corners[-40:, :40] = corners[-40:, -40:] = True
    assert noisy[:, corners].mean() > 0.3 and np.all(synthetic.array[:, corners] == 0)
    y, x = np.indices(source.shape[1:])
    centre = (y - source.shape[1] / 2) ** 2 + (x - source.shape[2] / 2) ** 2 < 100**2  # 41 mm around the centre
    assert (synthetic.array[:, centre] > 0).mean() > 0.99


def test_thin_then_thicken_returns_the_thick_grid_and_values(data_dir: Path) -> None:
    """A real T1 averaged into 3 mm slices (each the mean of three 1 mm slices: what a thick slice measures), made
    thin and thick again: the exact thick grid, values within a few percent."""
    fine = read_volume(data_dir / "brats" / "TCGA-DU-7294" / "TCGA-DU-7294-t1n.nii.gz")
    image = sitk.BinShrink(fine.to_sitk(), [1, 1, 3])  # mean of 1x1x3 blocks, centred on the block's centre
    thick = Volume.from_sitk(sitk.Cast(image, sitk.sitkFloat32), modality="t1n")
    thin = thin_slices(thick, 1.0)
    assert thin.shape[0] == (thick.shape[0] - 1) * 3 + 1 and canonical_grid(thin).spacing[2] == pytest.approx(1.0)
    back = thicken_onto(thin, thick)
    assert back.same_grid(thick, tol=0)
    error = np.abs(back.array - thick.array)[thick.array > 0]
    assert float(np.mean(error)) < 0.03 * float(np.percentile(thick.array, 99))


@pytest.mark.parametrize("step", [1.5, 2.5, 3.3])
def test_thin_slices_reach_the_last_thick_slice(step: float) -> None:
    """Four slices ``step`` mm apart (spans of 4.5, 7.5 and 9.9 mm, not whole millimetres): the thin stack reaches
    the last slice, so thickening back gives every slice its values (a stack that stopped short of it returned the
    last slice as background)."""
    rows = np.arange(4, dtype=np.float32)[:, None, None] + 1.0
    thick = Volume(np.broadcast_to(rows, (4, 8, 8)).copy(), (1.0, 1.0, step), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()),
                   modality="t1n")
    thin = thin_slices(thick, 1.0)
    assert (thin.shape[0] - 1) * 1.0 >= 3 * step > (thin.shape[0] - 2) * 1.0
    back = thicken_onto(thin, thick).array
    assert np.all(back > 0.5) and np.allclose(back[:, 4, 4], rows[:, 0, 0], atol=0.5)


def test_a_stack_longer_than_any_anatomy_is_refused_before_thinning(tmp_path: Path) -> None:
    """A header whose slice step is 1500 mm would be thinned into ~4500 slices: refused, naming the file."""
    source = tmp_path / "long.nii.gz"
    image = sitk.ReadImage(str(EXAMPLE))[:, :, 70:74]
    image.SetSpacing((1.0, 1.0, 1500.0))
    sitk.WriteImage(image, str(source))
    result = runner.invoke(app, ["synthesize", "--src", str(source), "--src-modality", "t1", "--target", "t2", "-o",
                                 str(tmp_path / "out.nii.gz")])
    assert result.exit_code == 2 and "long.nii.gz" in result.output and "no anatomy is that long" in result.output
    assert not (tmp_path / "out.nii.gz").exists()

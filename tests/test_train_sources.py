"""Training on several dataset folders at once (real subjects of three sources: BraTS 2023 on the SRI24 grid,
MS patients in MNI space on another grid, BraTS 2013 with z-scored T1c/FLAIR only and brain masks), and
validation on several subjects: the per-folder split, subjects serving only the pairs they have, z-scored
intensities and masks, mixed grids, per-subject metrics, and the errors for folders that cannot be used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.data.grid import ModelGrid, from_model_grid
from phmdiff_cli.data.layouts import discover
from phmdiff_cli.data.normalize import background_level, fit_intensity, foreground_mask, to_model_range
from phmdiff_cli.data.preprocess import prepare_volume
from phmdiff_cli.engine.pretrained import load_pretrained
from phmdiff_cli.engine.settings import TrainSettings
from phmdiff_cli.engine.train_data import load_data
from phmdiff_cli.io import read_volume, to_canonical

runner = CliRunner()

#: (folder of ../shared/data, subjects, file keys) linked into the test datasets.
SOURCES = {
    "brats": (("BraTS-GLI-00001-000", "TCGA-DU-7294"), ("t1n", "t1c", "t2w", "t2f")),
    "ms_mni": (("OMS-MNI-p07", "OMS-MNI-p19"), ("t1n", "t1c", "t2w", "t2f")),
    "brats2013_t1c_flair": (("BraTS2013-pat0001", "BraTS2013-pat0002"), ("t1c", "t2f", "brainmask")),
}
PAIRS = "t1n:t2w,t1c:t2f"
PAT = "BraTS2013-pat0001"


@pytest.fixture(scope="module")
def folders(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The three datasets, two subjects each (symlinks to the real files)."""
    root = tmp_path_factory.mktemp("sources")
    for folder, (subjects, keys) in SOURCES.items():
        for sid in subjects:
            (root / folder / sid).mkdir(parents=True)
            for key in keys:
                name = f"{sid}-{key}.nii.gz"
                (root / folder / sid / name).symlink_to(data_dir / folder / sid / name)
    return [root / folder for folder in SOURCES]


def _train(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["train", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_brain_masks_are_found_by_their_brats2013_name(folders: list[Path]) -> None:
    subject = discover(folders[2]).subject(PAT)
    assert subject.mask is not None and subject.mask.name == f"{PAT}-brainmask.nii.gz"
    assert set(subject.images) == {"t1c", "t2f"}


def test_default_split_holds_out_a_subject_of_every_folder(folders: list[Path]) -> None:
    data = load_data(TrainSettings(data=[str(f) for f in folders], pairs=PAIRS))
    assert len(data.val_ids) == 3 and len(data.train_ids) == 3
    assert {data.dataset.folder_of(sid) for sid in data.val_ids} == set(folders)
    assert data.split_rule.endswith("per folder")
    # subjects lacking T1 and T2 serve the pair they have, without --skip-incomplete
    assert {s.id for s in data.dataset.subjects} == {sid for subjects, _ in SOURCES.values() for sid in subjects}
    assert data.summary.to_dict()["folders"] == [str(f) for f in folders]


def test_z_scored_volume_keeps_its_background(data_dir: Path) -> None:
    """BraTS 2013 (DeepMedic release) is z-scored inside the brain: the background is a constant -3.6, the
    brain has negative values. That fill is the zero: background -1 in the model range, the brain above it."""
    folder = data_dir / "brats2013_t1c_flair" / PAT
    flair, mask = read_volume(folder / f"{PAT}-t2f.nii.gz"), read_volume(folder / f"{PAT}-brainmask.nii.gz")
    brain = mask.array > 0
    fill = float(flair.array[~brain].min())
    assert fill < -3 and (flair.array[brain] < 0).mean() > 0.3  # really z-scored
    assert background_level(flair.array, "t2f") == pytest.approx(fill)
    params = fit_intensity(flair.array, "t2f")
    assert params.lo == pytest.approx(fill) and params.hi > 3
    # without the mask file, the foreground found is the brain mask
    found = foreground_mask(flair.array, "t2f")
    dice = 2 * (found & brain).sum() / (found.sum() + brain.sum())
    assert dice > 0.95
    prepared = prepare_volume(flair, ModelGrid(240, 1.0), modality="t2f", mask=mask)
    brain_grid = to_canonical(mask).array > 0  # the BraTS grid is the model grid (240 px at 1 mm)
    assert np.all(prepared.array[~brain_grid] == -1.0)
    assert (prepared.array[brain_grid] > -0.99).mean() > 0.99


def test_unsigned_volumes_keep_zero_as_background(data_dir: Path) -> None:
    """MNI subjects have small negative values at the brain edge (interpolation): the background is still 0."""
    t1 = read_volume(data_dir / "ms_mni" / "OMS-MNI-p19" / "OMS-MNI-p19-t1n.nii.gz")
    assert t1.array.min() < 0
    assert background_level(t1.array, "t1n") == 0.0 and fit_intensity(t1.array, "t1n").lo == 0.0


def test_an_mni_grid_goes_onto_the_model_grid_unstretched(data_dir: Path) -> None:
    """182 x 218 at 1 mm is centre-padded to 240 x 240 at 1 mm, and back exactly: no stretching."""
    t2 = read_volume(data_dir / "ms_mni" / "OMS-MNI-p19" / "OMS-MNI-p19-t2w.nii.gz")
    prepared = prepare_volume(t2, ModelGrid(240, 1.0), modality="t2w")
    assert prepared.array.shape == (182, 240, 240) and prepared.transform.same_spacing
    canonical = to_canonical(t2).array.astype(np.float32)
    expected = to_model_range(canonical, prepared.params)
    assert np.array_equal(from_model_grid(prepared.array, prepared.transform), expected)


@pytest.mark.slow
def test_one_run_trains_on_three_sources_and_validates_per_subject(folders: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [a for f in folders for a in ("--data", f)]
    code, output = _train(*args, "--pairs", PAIRS, "--out", run, "--size", "tiny", "--batch-size", "4",
                          "--val-slices", "2", "--max-steps", "2", "--val-every", "2", "-q")
    assert code == 0, output
    card = load_pretrained(run / "last").card
    val_ids = card["training"]["subjects"]["val"]
    assert len(val_ids) == 3
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    subjects = record["val"]["subjects"]
    assert set(subjects) == set(val_ids)
    for sid, scores in subjects.items():
        pairs = {"t1c:t2f"} if sid.startswith("BraTS2013") else {"t1n:t2w", "t1c:t2f"}
        assert set(scores) == pairs | {"mean"}
        for pair in pairs:
            assert 0 < scores[pair]["psnr"] < 60 and -1 <= scores[pair]["ssim"] <= 1
            assert scores[pair]["sharpness"] > 0
    # the pair means average the subjects having the pair
    mean_t2f = np.mean([s["t1c:t2f"]["psnr"] for s in subjects.values()])
    assert record["val"]["pairs"]["t1c:t2f"]["psnr"] == pytest.approx(mean_t2f)
    assert card["metrics"]["val_subjects"].keys() == subjects.keys()
    # validated with the sampler and steps the card ships (no --val-steps given)
    sampling = card["model"]["sampling"]
    assert record["sampler"] == {"name": sampling["sampler"], "steps": sampling["steps"]}
    assert card["training"]["data"]["folders"] == [str(f) for f in folders]


def test_a_folder_serving_no_pair_is_named(folders: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, output = _train("--data", folders[0], "--data", folders[2], "--pairs", "t1n:t2w", "--out", run)
    assert code == 2
    assert "brats2013_t1c_flair" in output and "no subject of this folder has all the images of a pair" in output
    assert not run.exists()


def test_a_folder_given_twice_or_a_subject_in_two_folders_is_refused(folders: list[Path], tmp_path: Path) -> None:
    again = folders[0].parent / ".." / folders[0].parent.name / "brats"
    code, output = _train("--data", folders[0], "--data", again, "--pairs", PAIRS, "--out", tmp_path / "run")
    assert code == 2 and "given twice" in output
    other = tmp_path / "other" / "TCGA-DU-7294"
    other.mkdir(parents=True)
    for key in ("t1n", "t2w"):
        name = f"TCGA-DU-7294-{key}.nii.gz"
        (other / name).symlink_to((folders[0] / "TCGA-DU-7294" / name).resolve())
    code, output = _train("--data", folders[0], "--data", other.parent, "--pairs", PAIRS, "--out", tmp_path / "r2")
    assert code == 2 and "subject TCGA-DU-7294 is also in" in output
    assert not (tmp_path / "run").exists() and not (tmp_path / "r2").exists()

"""`phmdiff segment-augment` end to end on real BraTS volumes (8 axial slices each) with a tiny random model:
the augmented dataset, its manifest and dataset.json, labels and real images bit-exact, the input untouched,
and the evaluation (both arms, the --drop three-way comparison) reported honestly. The random model makes
garbage images: these tests check plumbing and bookkeeping, not that synthesis helps."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from synthesize_helpers import crop_z, write_tiny_model
from typer.testing import CliRunner, Result

from phmdiff_cli.cli.app import app
from phmdiff_cli.data.layouts import discover
from phmdiff_cli.data.slices import parse_pairs
from phmdiff_cli.engine import augment
from phmdiff_cli.engine.augment import plan_jobs
from phmdiff_cli.engine.segbench import SegSettings, train_segmenter
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import Volume, read_volume, write_volume

SUBJECTS = ("BraTS-GLI-00001-000", "BraTS-MET-00110-000", "BrainLesion-case-01", "TCGA-DU-7294")
MODALITIES = ("t1n", "t1c", "t2w", "t2f")
#: Removed from the fixture so that completion has work: GLI lacks t2w, MET lacks t2f.
REMOVED = {"BraTS-GLI-00001-000": "t2w", "BraTS-MET-00110-000": "t2f"}
Z0, Z1 = 108, 116  # through TCGA-DU-7294's tumour (labels 1 and 2)
#: One Euler step per pyramid level.
FAST_SYNTHESIS = ("--steps", "1", "--sampler", "euler", "--device", "cpu", "--precision", "fp32")
#: A 64-pixel segmentation grid (240 mm), a UNet of 4 to 32 channels, 2 epochs.
FAST_SEGMENTER = ("--seg-epochs", "2", "--seg-size", "64", "--seg-spacing", "3.75", "--seg-width", "4")

runner = CliRunner()


def run(*args: str | Path) -> Result:
    return runner.invoke(app, ["segment-augment", *map(str, args)])


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links followed), by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread while these tests run: on 2 shared cores, two threads per tiny convolution spend
    most of their time waiting for each other (measured up to 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random PHMDiff making t1n -> t2w and t1n+t2w -> t2f (and pairs this dataset cannot use)."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def dataset(brats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four BraTS subjects, 8 slices each, in the BraTS 2023 layout with a label map each: TCGA's
    tumour labels (0, 1, 2), and for the others a brain mask derived from the T1 (t1n > 0: label 1). Two
    subjects lack a modality (:data:`REMOVED`)."""
    root = tmp_path_factory.mktemp("brats") / "brats"
    for subject in SUBJECTS:
        folder = root / subject
        folder.mkdir(parents=True)
        for modality in MODALITIES:
            if REMOVED.get(subject) != modality:
                name = f"{subject}-{modality}.nii.gz"
                crop_z(brats_dir / subject / name, folder / name, Z0, Z1)
        seg = folder / f"{subject}-seg.nii.gz"
        if (brats_dir / subject / seg.name).is_file():
            crop_z(brats_dir / subject / seg.name, seg, Z0, Z1)
        else:
            t1n = read_volume(folder / f"{subject}-t1n.nii.gz")
            mask = (t1n.array > 0).astype(np.uint8)
            write_volume(Volume(mask, t1n.spacing, t1n.origin, t1n.direction), seg)
    return root


@pytest.fixture(scope="module")
def augmented(dataset: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full run: completion, one variant, the evaluation with --drop t2 (an alias of t2w), the table on
    stdout and the JSON in --report; the input's hashes before and after."""
    work = tmp_path_factory.mktemp("augmented")
    out, report = work / "brats_aug", work / "report.json"
    before = tree_hashes(dataset)
    result = run("--data", dataset, "--model", model, "--out", out, "--variants", "1", "--evaluate",
                 "--drop", "t2", "--report", report, *FAST_SYNTHESIS, *FAST_SEGMENTER)
    assert result.exit_code == 0, result.output
    return {"out": out, "stdout": result.stdout, "report": json.loads(report.read_text()), "before": before,
            "after": tree_hashes(dataset)}


@pytest.mark.slow
def test_input_dataset_is_unchanged(augmented: dict[str, Any]) -> None:
    assert augmented["after"] == augmented["before"]


@pytest.mark.slow
def test_labels_and_real_images_are_bit_exact_copies(dataset: Path, augmented: dict[str, Any]) -> None:
    out = augmented["out"]
    copied = tree_hashes(out)
    for path, digest in tree_hashes(dataset).items():  # every input file, under the same name
        assert copied[path] == digest, path
        assert not (out / path).is_symlink()  # --link copy is the default
    assert any(path.endswith("-seg.nii.gz") for path in tree_hashes(dataset))


@pytest.mark.slow
def test_missing_modalities_are_completed_and_marked(dataset: Path, augmented: dict[str, Any]) -> None:
    found = discover(augmented["out"])
    assert found.layout == "brats2023"
    assert [s.id for s in found.subjects] == sorted(SUBJECTS)
    for subject in found.subjects:
        # Real images are exactly the input's; the completion appears only among the synthetic ones.
        assert set(subject.images) == set(discover(dataset).subject(subject.id).images)
        missing = REMOVED.get(subject.id)
        if missing:
            names = [p.name for p in subject.synthetic[missing]]
            assert names == [f"{subject.id}-{missing}_syn.nii.gz", f"{subject.id}-{missing}_syn1.nii.gz"]
        label = read_volume(subject.label)
        for paths in subject.synthetic.values():
            for path in paths:
                image = read_volume(path)
                assert image.same_grid(label, tol=1e-6)  # paired with the label voxel for voxel
                assert np.isfinite(image.array).all() and image.array.std() > 0


@pytest.mark.slow
def test_manifest_says_what_is_real_and_what_is_synthetic(model: Path, augmented: dict[str, Any]) -> None:
    out = augmented["out"]
    with (out / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = set(tree_hashes(out)) - {"manifest.csv", "dataset.json"}
    assert sorted(r["path"] for r in rows) == sorted(files)  # one row per file
    sha = json.loads((model / "config.json").read_text())["sha256"]
    real = {r["path"] for r in rows if r["synthetic"] == "0"}
    for row in rows:
        synthetic = row["synthetic"] == "1"
        assert ("_syn" in row["path"]) == synthetic
        if synthetic:
            assert row["model_sha256"] == sha and int(row["seed"]) == int(row["variant"])  # --seed 0
            assert row["reason"] in ("missing", "drop", "variant")
            assert set(row["sources"].split(";")) <= real and row["pair"].endswith(f":{row['modality']}")
        else:
            assert row["reason"] == "real" and row["model_sha256"] == "" and Path(row["origin"]).is_file()
    gli = {(r["modality"], r["reason"]) for r in rows
           if r["subject"] == "BraTS-GLI-00001-000" and r["synthetic"] == "1"}
    assert gli == {("t2w", "missing"), ("t2w", "variant")}  # no t2f: its pair needs the missing t2w
    # The manifest is itself a dataset manifest that phmdiff (train, eval) reads.
    listed = discover(out / "manifest.csv")
    assert listed.subject("BraTS-MET-00110-000").synthetic["t2f"][0].name.endswith("t2f_syn.nii.gz")


@pytest.mark.slow
def test_dataset_json_lists_complete_nnunet_cases(augmented: dict[str, Any]) -> None:
    out = augmented["out"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    assert meta["numTraining"] == len(meta["dataset"]) and meta["file_ending"] == ".nii.gz"
    for case, entry in meta["dataset"].items():
        assert len(entry["images"]) == 4 and all((out / p).is_file() for p in entry["images"])
        subject = case.split("_syn")[0]
        assert entry["label"] == f"{subject}/{subject}-seg.nii.gz"  # every case keeps the real label
        assert entry.get("synthetic", False) == ("_syn" in case)
    gli = meta["dataset"]["BraTS-GLI-00001-000"]["images"]
    assert gli[2] == "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2w_syn.nii.gz"  # completed with variant 0
    assert "BraTS-GLI-00001-000_syn1" in meta["phmdiff"]["synthetic_cases"]


@pytest.mark.slow
def test_evaluation_compares_both_arms_and_the_drop_scenario(augmented: dict[str, Any]) -> None:
    evaluation = augmented["report"]["evaluation"]
    assert evaluation["labels"] == [1, 2] and evaluation["convention"] is None  # two labels: scored per label
    assert evaluation["structures"] == ["1", "2"]
    assert evaluation["inputs"] == ["real", "synthesized t2w", "zero-filled t2w", "hist-matched t2w"]
    (fold,) = evaluation["folds"]
    (test,) = fold["test"]
    assert test in ("BrainLesion-case-01", "TCGA-DU-7294")  # only subjects with every modality real
    assert set(fold["train"]) == set(SUBJECTS) - {test}
    real, synthetic = fold["training"]["real"], fold["training"]["real+synthetic"]
    assert real["steps"] == synthetic["steps"] == evaluation["segmenter"]["steps_budget"][0] > 0  # same budget
    assert real["zero_filled_channels"] == 2 and real["synthetic_images"] == 0  # GLI t2w, MET t2f
    assert synthetic["zero_filled_channels"] == 0 and synthetic["synthetic_images"] > 0
    assert synthetic["samples"] > real["samples"] == 3
    for arm in ("real", "real+synthetic"):
        for name in evaluation["inputs"]:
            result = evaluation["results"][arm][name]
            for label in ("1", "2"):
                dice = result["cases"][test][label]["dice"]
                assert 0.0 <= dice <= 1.0
                assert result["mean"][label]["dice"] == pytest.approx(dice)  # the mean of one test subject
                assert result["mean"][label]["dice_std"] is None  # one fold
    assert any("1 held-out subject" in note for note in evaluation["notes"])
    assert augmented["report"]["torch_version"] and augmented["report"]["model_sha256"]


@pytest.mark.slow
def test_table_shows_every_arm_and_input(augmented: dict[str, Any]) -> None:
    headers = ("trained on", "test input", "Dice 2", "HD95 1 (mm)", "mean Dice")
    for text in (*headers, "real+synthetic", "synthesized t2w", "zero-filled t2w", "hist-matched t2w"):
        assert text in augmented["stdout"]


@pytest.mark.slow
def test_nnunet_layout_with_symlinks_and_json(dataset: Path, model: Path, tmp_path: Path) -> None:
    # nnU-Net input: channels from dataset.json; a synthetic channel is marked on the case (case0_syn_0002).
    nnunet = tmp_path / "nnunet"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    for n, subject in enumerate(SUBJECTS[:2]):
        for channel, modality in enumerate(MODALITIES):
            src = dataset / subject / f"{subject}-{modality}.nii.gz"
            if src.is_file():
                (nnunet / "imagesTr" / f"case{n}_{channel:04d}.nii.gz").symlink_to(src)
        (nnunet / "labelsTr" / f"case{n}.nii.gz").symlink_to(dataset / subject / f"{subject}-seg.nii.gz")
    meta = {"channel_names": dict(enumerate(MODALITIES)), "labels": {"background": 0, "brain": 1},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (nnunet / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "aug"
    result = run("--data", nnunet, "--model", model, "--out", out, "--link", "symlink", "--json",
                 *FAST_SYNTHESIS)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["files"] == {"real": 8, "synthetic": 2} and "evaluation" not in document
    found = discover(out)
    assert found.layout == "nnunet" and found.channels == {m: i for i, m in enumerate(MODALITIES)}
    assert found.subject("case0").synthetic["t2w"][0].name == "case0_syn_0002.nii.gz"  # GLI's t2w
    assert found.subject("case1").synthetic["t2f"][0].name == "case1_syn_0003.nii.gz"  # MET's t2f
    real = out / "imagesTr" / "case0_0000.nii.gz"
    source = dataset / SUBJECTS[0] / f"{SUBJECTS[0]}-t1n.nii.gz"
    assert real.is_symlink() and real.resolve() == source.resolve()
    written = json.loads((out / "dataset.json").read_text())
    assert written["labels"] == {"background": 0, "brain": 1}  # the input's own keys are kept
    assert written["dataset"]["case0"]["images"][2] == "imagesTr/case0_syn_0002.nii.gz"


def test_refuses_to_overwrite_or_to_write_into_the_input(dataset: Path, model: Path, tmp_path: Path) -> None:
    before = tree_hashes(dataset)
    out = tmp_path / "exists"
    out.mkdir()
    result = run("--data", dataset, "--model", model, "--out", out)
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output
    result = run("--data", dataset, "--model", model, "--out", dataset / "aug", "--force")
    assert result.exit_code == 2 and "overlaps the input dataset" in result.output
    result = run("--data", dataset, "--model", model, "--out", tmp_path / "new", "--drop", "t2w")
    assert result.exit_code == 2 and "--evaluate" in result.output
    assert not (tmp_path / "new").exists() and tree_hashes(dataset) == before


def test_failure_leaves_no_partial_output(dataset: Path, model: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(augment, "write_volume", full_disk)  # the first synthetic image fails to write
    result = run("--data", dataset, "--model", model, "--out", tmp_path / "aug", *FAST_SYNTHESIS)
    assert result.exit_code == 1 and "No space left" in result.output
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


def test_plan_uses_the_richest_pair_and_names_what_it_cannot_complete(dataset: Path) -> None:
    found = discover(dataset)
    pairs = parse_pairs("t1n:t2f,t1n+t2w:t2f,t1c:t2w")
    jobs, notes = plan_jobs(found, pairs, variants=1, seed=5)
    met = [j for j in jobs if j.subject == "BraTS-MET-00110-000" and j.pair.target == "t2f"]
    # MET lacks t2f: variant 0 completes it, variant 1 adds a version, both from t1n + t2w (the richer pair).
    assert [(j.variant, j.seed, j.reason, str(j.pair)) for j in met] == [
        (0, 5, "missing", "t1n+t2w:t2f"), (1, 6, "variant", "t1n+t2w:t2f")]
    gli = [j for j in jobs if j.subject == "BraTS-GLI-00001-000" and j.pair.target == "t2f"]
    assert [str(j.pair) for j in gli] == ["t1n:t2f"]  # no real t2w: the single-source pair, variant 1 only
    assert notes == []
    jobs, notes = plan_jobs(found, parse_pairs("pd:t2w"))
    assert jobs == []
    assert notes == ["BraTS-GLI-00001-000: lacks t2w and the model cannot make it from t1c+t1n+t2f"]
    with pytest.raises(InputError, match="cannot synthesize ct"):
        plan_jobs(found, pairs, targets=["ct"])


def test_segmenter_training_is_seeded_and_independent_of_the_global_rng() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 16, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    settings = SegSettings(batch_size=4, size=16, width=2, seed=3)
    device = torch.device("cpu")
    first, stats = train_segmenter(x, y, 2, 3, settings, device, None)
    torch.manual_seed(123)  # must not matter
    second, _ = train_segmenter(x, y, 2, 3, settings, device, None)
    other, _ = train_segmenter(x, y, 2, 3, SegSettings(batch_size=4, size=16, width=2, seed=4), device, None)
    assert stats["steps"] == 3 and not stats["stopped_by_time"]
    weights = [list(net.state_dict().values()) for net in (first, second, other)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(weights[0], weights[2], strict=True))

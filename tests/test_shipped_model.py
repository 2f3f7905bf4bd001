"""The shipped default model (``brain-sharp``) and the one for heads (``brain-heads``): their cards and files,
`phmdiff models list`, and `phmdiff synthesize` with the default on a held-out subject (tests/test_contrast.py
scores its whole volume against a histogram bar)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthesize_helpers import crop_z, run
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.data.normalize import foreground_mask
from phmdiff_cli.engine.checkpoint import load_model
from phmdiff_cli.engine.hub import CARD_FILE, DEFAULT_MODEL, HEADS_MODEL, SHIPPED_WEIGHTS, WEIGHTS_FILE
from phmdiff_cli.engine.input_domain import HEAD_ML
from phmdiff_cli.engine.pretrained import load_pretrained
from phmdiff_cli.io import read_volume

SHIPPED = SHIPPED_WEIGHTS / DEFAULT_MODEL
VAL = "TCGA-DU-7294"
#: The validation subjects of weights/brain_data.json, never trained on.
VALIDATION = ["BraTS2013-pat0001", "BraTS2013-pat0002", "OMS-MNI-p19", VAL]
PAIRS = [["t1n", "t2w"], ["t1n", "t2f"], ["t2w", "t2f"], ["t1c", "t2w"], ["t1c", "t2f"], ["t2f", "t2w"],
         [["t1n", "t1c", "t2f"], "t2w"], [["t1n", "t1c", "t2w"], "t2f"], [["t1n", "t2w", "t2f"], "t1c"],
         [["t1c", "t2w", "t2f"], "t1n"]]
#: The slices scored: 12 axial slices through the middle of the brain (all of them hold tumour-free cortex,
#: ventricles and white matter), enough for a stable mean and ~1 min of sampling at the default steps.
BLOCK = (70, 82)


def test_card_files_and_held_out_subject() -> None:
    state, card = load_model(SHIPPED)  # checks the sha256 of the weights against the card
    assert (SHIPPED / WEIGHTS_FILE).stat().st_size < 30 * 2**20
    assert card["pairs"] == PAIRS
    subjects = card["training"]["subjects"]
    assert sorted(subjects["val"]) == VALIDATION and not set(VALIDATION) & set(subjects["train"])
    assert set(card["training"]["licences"]) == {*subjects["train"], *VALIDATION}
    assert set(card["metrics"]["val"]) >= {"t1n:t2w", "mean"}
    assert set(card["metrics"]["val_subjects"]) == set(VALIDATION)
    assert card["input_domain"]["images"] >= len(subjects["train"]) and card["input_domain"]["slice_mm"] == [1, 1]
    assert sum(t.numel() for t in state.values()) == sum(
        p.numel() for p in load_pretrained(SHIPPED).model.parameters())
    assert json.loads((SHIPPED / CARD_FILE).read_text())["sha256"] == card["sha256"]


def test_heads_model_card_and_files() -> None:
    """HEADS_MODEL, which synthesize gives heads with skull: brain-sharp's pairs, told whether it gets a head,
    trained on the brains and a raw head, the other raw head held out; its input domain reaches head size."""
    state, card = load_model(SHIPPED_WEIGHTS / HEADS_MODEL)  # checks the weights' sha256
    assert (SHIPPED_WEIGHTS / HEADS_MODEL / WEIGHTS_FILE).stat().st_size < 30 * 2**20
    assert card["pairs"] == PAIRS and card["model"]["skull_condition"] and "skull_embed.weight" in state
    subjects = card["training"]["subjects"]
    assert "OMS-raw-p01" in subjects["train"] and sorted(subjects["val"]) == sorted([*VALIDATION, "OMS-raw-p04"])
    assert set(card["training"]["licences"]) == {*subjects["train"], *subjects["val"]}
    assert card["input_domain"]["foreground_ml"][1] > HEAD_ML > card["input_domain"]["foreground_ml"][0]
    # fine-tuned from the shipped brain model, these very weights
    assert card["training"]["init"]["sha256"] == json.loads((SHIPPED / CARD_FILE).read_text())["sha256"]


def test_models_list_shows_the_shipped_model() -> None:
    result = CliRunner().invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows[DEFAULT_MODEL]["pairs"] == PAIRS
    table = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if line.strip().startswith(DEFAULT_MODEL))
    assert "240x240 @ 1 mm" in row and f" {len(PAIRS)} " in row and len(row) <= 80
    card = CliRunner().invoke(app, ["models", "info", DEFAULT_MODEL], env={"COLUMNS": "80"}).stdout
    assert "Limitations" in card and "BraTS 2023 challenge terms" in card and "CC BY-NC-SA" in card


@pytest.mark.slow
def test_synthesizes_the_held_out_subjects_t2_on_its_grid(brats_dir: Path, tmp_path: Path) -> None:
    """`phmdiff synthesize` with the default model and settings on a block of the held-out subject's T1: a finite
    T2 on the input grid whose brain is where the real T2's is."""
    subject = brats_dir / VAL
    t1_path = crop_z(subject / f"{VAL}-t1n.nii.gz", tmp_path / f"{VAL}-t1n.nii.gz", *BLOCK)
    result = run("--src", t1_path, "--target", "t2w", "-o", tmp_path / "t2w.nii.gz", "--quiet")
    assert result.exit_code == 0, result.output
    synthetic, t1 = read_volume(tmp_path / "t2w.nii.gz"), read_volume(t1_path)
    assert synthetic.shape == t1.shape and synthetic.grid == t1.grid
    assert np.isfinite(synthetic.array).all()
    real = read_volume(subject / f"{VAL}-t2w.nii.gz").array[slice(*BLOCK)]
    ours, theirs = foreground_mask(synthetic.array, "t2w"), foreground_mask(real, "t2w")
    dice = 2 * (ours & theirs).sum() / (ours.sum() + theirs.sum())
    assert dice > 0.9, dice

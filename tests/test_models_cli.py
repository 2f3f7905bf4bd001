"""``phmdiff models list`` and ``phmdiff models info``: output, JSON, exit codes and messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from model_store_helpers import CARD, write_model
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.engine import hub

runner = CliRunner()


@pytest.fixture
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty shipped weights/ folder and a $PHMDIFF_WEIGHTS folder; returns the latter."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(hub, "SHIPPED_WEIGHTS", shipped)
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setenv("PHMDIFF_WEIGHTS", str(mine))
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: room for every cell on one line
    return mine


def test_list_without_models_is_friendly(weights: Path) -> None:
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "No models installed yet" in result.stderr and result.stdout == ""
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_list_shows_each_model(weights: Path) -> None:
    net = write_model(weights / "brain-tiny")
    (weights / "broken").mkdir()
    (weights / "broken" / "model.safetensors").write_bytes(b"junk")
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    good, broken = json.loads(result.stdout)
    assert good["name"] == "brain-tiny" and good["pairs"] == CARD["pairs"]
    assert good["params"] == sum(t.numel() for t in net.state_dict().values())
    weights_file = weights / "brain-tiny" / "model.safetensors"
    assert good["sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert good["metrics"] == CARD["metrics"]
    assert broken["name"] == "broken" and "config.json: model file missing" in broken["error"]

    table = runner.invoke(app, ["models", "list"], env={"COLUMNS": "80"})
    assert table.exit_code == 0
    assert all(len(line) <= 80 for line in table.stdout.splitlines())
    row = next(line for line in table.stdout.splitlines() if line.strip().startswith("brain-tiny"))
    for cell in (" 2 ", "64x64 @ 3.75 mm", f"{good['params']} / "):  # name whole, pairs, grid, parameters
        assert cell in row, row


def test_info_prints_the_card(weights: Path) -> None:
    write_model(weights / "brain-tiny")
    result = runner.invoke(app, ["models", "info", "brain-tiny", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["path"] == str(weights / "brain-tiny")
    assert info["card"]["training"] == CARD["training"] and info["card"]["sha256"] == info["sha256"]
    text = runner.invoke(app, ["models", "info", str(weights / "brain-tiny")])
    assert text.exit_code == 0
    for line in ("Pairs t1n->t2w, t1n->t2f", "Grid 64x64 @ 3.75 mm", "Training data BraTS 2023 (4 subjects)",
                 "--json prints the whole card"):
        assert line in text.stdout, text.stdout


def test_info_names_the_finishing_steps_each_shipped_card_turns_on() -> None:
    """brain-sharp's card mirrors, adds the sources' detail and calibrates the contrast; brain-small's does none."""
    shipped = Path(__file__).resolve().parents[1] / "weights"
    lines = {}
    for name in ("brain-sharp", "brain-small"):
        text = runner.invoke(app, ["models", "info", str(shipped / name)], env={"COLUMNS": "250"})
        assert text.exit_code == 0, text.output
        lines[name] = next(r for r in text.stdout.splitlines() if r.startswith("Grid"))
    for step in ("left-right mirror", "the sources' detail added", "contrast calibrated"):
        assert step in lines["brain-sharp"], lines["brain-sharp"]
    for word in ("mirror", "detail", "contrast"):
        assert word not in lines["brain-small"], lines["brain-small"]


def test_info_is_a_card_for_people(weights: Path) -> None:
    """Per-subject validation, the data's licences, intended use and limitations, readable at 80 columns."""
    scores = {"psnr": 19.41, "ssim": 0.669, "sharpness": 0.72}
    card = {
        "training": {"data": {"root": "../shared/data/brats", "folders": ["brats", "ms_mni"]},
                     "subjects": {"train": ["A", "B"], "val": ["TCGA-DU-7294", "OMS-MNI-p19"]},
                     "licences": {"A": "CC BY 4.0"}, "steps": 12, "elapsed_s": 600.0, "device": "cpu"},
        "metrics": {"val": {"t1n:t2w": scores, "mean": scores}, "val_step": 12,
                    "val_subjects": {"TCGA-DU-7294": {"t1n:t2w": scores, "mean": scores},
                                     "OMS-MNI-p19": {"t1n:t2w": scores, "mean": scores}}},
        "intended_use": "research on brain MRI synthesis",
        "limitations": "skull-stripped 1 mm brains only",
    }
    write_model(weights / "brain-tiny", **card)
    text = runner.invoke(app, ["models", "info", "brain-tiny"], env={"COLUMNS": "80"}).stdout
    for line in ("Training data brats, ms_mni: 2 subjects; validation TCGA-DU-7294, OMS-MNI-p19",
                 "A: CC BY 4.0", "Training 12 steps, 10 min", "PSNR dB/SSIM/sharpness at step 12",
                 "Intended use research on brain MRI synthesis", "Limitations skull-stripped 1 mm brains only"):
        assert line in text, text
    row = next(r for r in text.splitlines() if r.strip().startswith("t1n:t2w"))
    assert row.count("19.4/0.67/0.72") == 3  # two subjects and the mean


def test_info_unknown_model_exits_2_with_the_available_names(weights: Path) -> None:
    write_model(weights / "brain-tiny")
    result = runner.invoke(app, ["models", "info", "brain-huge"])
    assert result.exit_code == 2
    assert "Error: model 'brain-huge' not found" in result.stderr
    assert "available: brain-tiny" in result.stderr and "Traceback" not in result.output

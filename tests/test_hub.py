"""``--model`` resolution: paths, run folders, shipped names, ``$PHMDIFF_WEIGHTS``, and ``hf://`` offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_store_helpers import COMMIT, hf_snapshot, write_model

from phmdiff_cli.engine import hub
from phmdiff_cli.engine.checkpoint import load_model
from phmdiff_cli.engine.hub import DEFAULT_MODEL, available_models, resolve_model
from phmdiff_cli.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty stand-in for the repository's weights/ folder, and no $PHMDIFF_WEIGHTS."""
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "README.md").write_text("not a model")
    monkeypatch.setattr(hub, "SHIPPED_WEIGHTS", folder)
    monkeypatch.delenv("PHMDIFF_WEIGHTS", raising=False)
    return folder


def test_shipped_weights_is_the_repository_folder() -> None:
    assert hub.SHIPPED_WEIGHTS == REPO / "weights"


def test_local_folder_file_and_run_folder(tmp_path: Path) -> None:
    write_model(tmp_path / "model")
    assert resolve_model(str(tmp_path / "model")) == tmp_path / "model"
    file = tmp_path / "model" / "model.safetensors"
    assert resolve_model(str(file)) == file
    write_model(tmp_path / "run" / "last")
    assert resolve_model(str(tmp_path / "run")) == tmp_path / "run" / "last"
    write_model(tmp_path / "run" / "best")
    assert resolve_model(str(tmp_path / "run")) == tmp_path / "run" / "best"
    with pytest.raises(InputError, match="no model.safetensors in this folder"):
        resolve_model(str(tmp_path))


def test_default_model_not_shipped_yet(shipped: Path) -> None:
    with pytest.raises(InputError, match="shipped default model is missing") as error:
        resolve_model(DEFAULT_MODEL)
    assert "phmdiff train" in (error.value.hint or "")


def test_named_models_and_env_priority(shipped: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(shipped / DEFAULT_MODEL, seed=0)
    write_model(shipped / "pelvis", seed=0)
    extra = tmp_path / "mine"
    write_model(extra / "pelvis", seed=1)
    assert available_models() == {DEFAULT_MODEL: shipped / DEFAULT_MODEL, "pelvis": shipped / "pelvis"}
    monkeypatch.setenv("PHMDIFF_WEIGHTS", f"{tmp_path / 'missing'}:{extra}")
    assert available_models() == {"pelvis": extra / "pelvis", DEFAULT_MODEL: shipped / DEFAULT_MODEL}
    assert resolve_model(DEFAULT_MODEL) == shipped / DEFAULT_MODEL
    with pytest.raises(InputError, match="'brain-large' not found") as error:
        resolve_model("brain-large")
    assert f"available: pelvis, {DEFAULT_MODEL}" in (error.value.hint or "")


@pytest.mark.parametrize("spec", ["hf://org/brain", "hf://org/brain@v1", f"hf://org/brain@{COMMIT}"])
def test_hub_model_from_the_offline_cache(tmp_path: Path, hf_cache: Path, spec: str) -> None:
    net = write_model(tmp_path / "local")
    snapshot = hf_snapshot(hf_cache, tmp_path / "local")
    folder = resolve_model(spec)
    assert folder.resolve() == snapshot.resolve()
    state, card = load_model(folder)
    assert torch.equal(state["embed.weight"], net.embed.weight)
    assert card["pairs"] == [["t1n", "t2w"], ["t1n", "t2f"]]


def test_hub_model_in_a_subfolder_with_local_files_only(tmp_path: Path, hf_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "local")
    snapshot = hf_snapshot(hf_cache, tmp_path / "local", repo="org/zoo", sub="brain/small")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("hf://org/zoo/brain/small", local_files_only=True).resolve() == snapshot.resolve()


def test_hub_model_missing_offline_is_a_clear_error(hf_cache: Path) -> None:
    with pytest.raises(InputError, match="not in the local Hugging Face cache and offline") as error:
        resolve_model("hf://org/absent@v2")
    assert "HF_HUB_OFFLINE" in str(error.value) and "network" in (error.value.hint or "")


def test_hub_repo_without_a_model_and_bad_specs(tmp_path: Path, hf_cache: Path) -> None:
    write_model(tmp_path / "local")
    snapshot = hf_snapshot(hf_cache, tmp_path / "local")
    (snapshot / "config.json").unlink()
    with pytest.raises(InputError, match="has no model.safetensors"):
        resolve_model("hf://org/brain")
    with pytest.raises(InputError, match="bad Hugging Face model"):
        resolve_model("hf://just-a-name")

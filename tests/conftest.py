"""Shared fixtures: where the real data lives (../shared/data beside the clone, or $PHMDIFF_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub.constants
import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The real-data folder; tests fail loudly (not skip) when it is missing, since CI always has it."""
    root = Path(os.environ.get("PHMDIFF_DATA", REPO.parent / "shared" / "data"))
    if not (root / "README.md").is_file():
        raise RuntimeError(f"real test data not found at {root}: set PHMDIFF_DATA to the shared/data folder")
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` (see its README.md for what each file is)."""
    return data_root()


@pytest.fixture(scope="session")
def brats_dir(data_dir: Path) -> Path:
    """Four BraTS-layout subjects, 240x240x155 at 1 mm, voxel-aligned contrasts t1n/t1c/t2w/t2f."""
    return data_dir / "brats"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in tmp_path, $HF_HUB_OFFLINE set after huggingface_hub was imported (so
    only phmdiff can honour it), and any attempt to reach the Hub failing the test."""
    cache = tmp_path / "hf"
    cache.mkdir()

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for method in ("repo_info", "list_repo_tree"):
        monkeypatch.setattr(huggingface_hub.HfApi, method, no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache

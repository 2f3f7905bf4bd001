"""Shared fixtures: where the real data lives (../shared/data beside the clone, or $PHMDIFF_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub.constants
import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_path() -> Path:
    return Path(os.environ.get("PHMDIFF_DATA", REPO.parent / "shared" / "data"))


def data_root() -> Path | None:
    """The real-data folder, or None where this machine has none (the tests that need it then skip). Under CI
    (``$CI`` set), which always has it, a missing folder is an error: CI must not pass by skipping."""
    root = _data_path()
    if (root / "README.md").is_file():
        return root
    if os.environ.get("CI"):
        raise RuntimeError(f"real test data not found at {root}: CI needs it (set PHMDIFF_DATA)")
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` (see its README.md for what each file is); skips the test where it is missing."""
    root = data_root()
    if root is None:
        pytest.skip(f"needs the real images of ../shared/data, not found at {_data_path()} (set PHMDIFF_DATA)")
    return root


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

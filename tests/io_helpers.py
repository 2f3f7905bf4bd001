"""Helpers shared by the I/O tests: cached reads of the real volumes (the DICOM series take a second each)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from phmdiff_cli.errors import InputError
from phmdiff_cli.io import Volume, read_volume

__all__ = ["cached_volume", "max_difference", "sitk_series", "read_outcome", "tool"]


@functools.lru_cache(maxsize=8)
def _read(path: str) -> Volume:
    return read_volume(path)


def cached_volume(path: str | Path) -> Volume:
    """``read_volume(path)``, read once per test session. Shared: never modify it (use ``with_array``)."""
    return _read(str(path))


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute voxel difference (np.testing.assert_allclose is slow on 30 M voxels)."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


def sitk_series(folder: Path) -> sitk.Image:
    """The series in ``folder`` as SimpleITK/GDCM read it on their own."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def read_outcome(path: Path) -> str:
    """``"read"`` or ``"refused"`` (a one-line :class:`InputError`) for an input as ``phmdiff`` reads it; any other
    exception is an internal error and fails the calling test."""
    import pytest

    try:
        read_volume(path)
        return "read"
    except InputError:
        return "refused"
    except Exception as error:  # noqa: BLE001 - the point of the callers
        pytest.fail(f"{path}: {type(error).__name__}: {error}")


def tool(name: str) -> str:
    """The path of a command-line tool; under CI (which installs it) a missing tool fails the test, elsewhere
    it skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs dicom3tools and dcm2niix)")
        pytest.skip(f"{name} is not installed (apt-get install dicom3tools dcm2niix)")
    return path

"""The training heads of weights/brain_small.py (``heads``): real raw scans moved onto one 1 mm grid, aligned,
the air set to 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from phmdiff_cli.data.normalize import foreground_mask

RECIPE = Path(__file__).resolve().parents[1] / "weights" / "brain_small.py"


def load_recipe():  # noqa: ANN201 - a module loaded from its file (weights/ is not a package)
    spec = importlib.util.spec_from_file_location("brain_small_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_heads_are_1mm_on_the_flair_field_of_view_and_aligned(data_dir: Path, tmp_path: Path) -> None:
    out = load_recipe().prepare_heads(data_dir, tmp_path / "heads")
    assert sorted(p.name for p in out.iterdir()) == ["OMS-raw-p01", "OMS-raw-p04"]
    flair = sitk.ReadImage(str(data_dir / "clinical_raw" / "OMS-raw-p01-study1" / "FLAIR.nii.gz"))
    images = {m: sitk.ReadImage(str(out / "OMS-raw-p01" / f"OMS-raw-p01-{m}.nii.gz")) for m in ("t1n", "t2w", "t2f")}
    for image in images.values():
        assert image.GetSpacing() == (1.0, 1.0, 1.0)
        assert np.allclose(image.GetOrigin(), flair.GetOrigin())
        assert np.allclose(image.GetDirection(), flair.GetDirection())
        field = np.array(image.GetSize()) * np.array(image.GetSpacing())
        assert np.allclose(field, np.array(flair.GetSize()) * np.array(flair.GetSpacing()), atol=1.0)
    # Three acquisitions of one head on one grid: their heads overlap (an unapplied or inverted transform
    # would still overlap here, the transforms being near-identity; the overlap catches a wrong grid or axis).
    heads = {m: foreground_mask(sitk.GetArrayFromImage(i), m) for m, i in images.items()}
    assert dice(heads["t1n"], heads["t2f"]) > 0.9 and dice(heads["t2w"], heads["t2f"]) > 0.9
    # The air is 0 (its faint noise, as a target, taught a model to paint a haze): no voxel more than 3 voxels
    # from the foreground is anything else (the raw scans have 60 000 - 170 000 such voxels per image here).
    for modality, image in images.items():
        array = sitk.GetArrayFromImage(image)
        distance = ndimage.distance_transform_edt(~foreground_mask(array, modality))
        assert not np.any((array != 0) & (distance > 3)), modality

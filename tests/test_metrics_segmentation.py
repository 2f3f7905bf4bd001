"""Dice and Hausdorff distances on a real tumour label map, against independent numpy/scipy computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from phmdiff_cli.io import read_volume
from phmdiff_cli.metrics import dice, hausdorff_distance, hd95, label_values

#: Anisotropic on purpose, (x, y, z) mm: a swapped axis order changes every distance.
SPACING = (0.8, 1.0, 2.5)


@pytest.fixture(scope="module")
def seg(brats_dir: Path) -> np.ndarray:
    """TCGA-DU-7294 tumour labels (1, 2), cropped to the tumour plus a 12-voxel margin, (z, y, x)."""
    labels = read_volume(brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-seg.nii.gz").array
    box = tuple(
        slice(max(s.start - 12, 0), s.stop + 12)
        for s in ndimage.find_objects((labels > 0).astype(np.uint8))[0]
    )
    return labels[box]


@pytest.fixture(scope="module")
def shifted(seg: np.ndarray) -> np.ndarray:
    """The labels moved 2 slices along z and 3 voxels along x (inside the margin: nothing wraps)."""
    return np.roll(seg, (2, 3), axis=(0, 2))


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Distances (mm) from the surface voxels of ``a`` to the surface of ``b``."""
    edge_a, edge_b = a & ~ndimage.binary_erosion(a), b & ~ndimage.binary_erosion(b)
    return ndimage.distance_transform_edt(~edge_b, sampling=spacing_zyx)[edge_a]


def test_dice_matches_the_definition(seg: np.ndarray, shifted: np.ndarray) -> None:
    scores = dice(shifted, seg)
    assert label_values(shifted, seg) == [1, 2] == sorted(scores)
    for label, value in scores.items():
        p, r = shifted == label, seg == label
        assert value == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), abs=1e-6)
        assert 0.2 < value < 0.95
    assert dice(seg, seg) == {1: 1.0, 2: 1.0}


def test_hausdorff_distances_match_scipy_surfaces(seg: np.ndarray, shifted: np.ndarray) -> None:
    spacing_zyx = tuple(reversed(SPACING))
    ninety_five, maximum = (
        hd95(shifted, seg, spacing=SPACING),
        hausdorff_distance(shifted, seg, spacing=SPACING, percentile=None),
    )
    for label in (1, 2):
        forward = _surface_distances(shifted == label, seg == label, spacing_zyx)
        backward = _surface_distances(seg == label, shifted == label, spacing_zyx)
        assert ninety_five[label] == pytest.approx(
            max(np.percentile(forward, 95), np.percentile(backward, 95)), abs=1e-4
        )
        assert maximum[label] == pytest.approx(max(forward.max(), backward.max()), abs=1e-4)
        # A translation by t moves no surface point further than |t| = |(3 * 0.8, 2 * 2.5)| mm.
        assert 0 < ninety_five[label] <= maximum[label] <= math.hypot(3 * 0.8, 2 * 2.5) + 1e-6
    assert hd95(shifted, seg, spacing=tuple(reversed(SPACING))) != ninety_five
    assert hd95(seg, seg, spacing=SPACING) == {1: 0.0, 2: 0.0}


def test_empty_structures_follow_brats(seg: np.ndarray) -> None:
    empty = np.zeros_like(seg)
    assert dice(empty, seg, labels=[1, 4]) == {1: 0.0, 4: 1.0}
    assert hd95(empty, seg, spacing=SPACING, labels=[1, 4]) == {1: math.inf, 4: 0.0}


def test_label_maps_must_be_integral(seg: np.ndarray) -> None:
    assert dice(seg.astype(np.float32), seg) == {1: 1.0, 2: 1.0}
    with pytest.raises(ValueError, match="label map"):
        dice(seg + 0.5, seg)

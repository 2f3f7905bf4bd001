"""Where the sources have signal (phmdiff_cli.engine.source_support) on a real brain: the union of the prepared
sources' foregrounds, and a hazy output cut to it dilated by exactly ``SUPPORT_MARGIN`` voxels, holes kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.normalize import foreground_mask
from phmdiff_cli.data.preprocess import prepare_volume
from phmdiff_cli.engine.source_support import SUPPORT_MARGIN, confine, head_foreground, source_foreground
from phmdiff_cli.io import read_volume

VAL = "TCGA-DU-7294"


@pytest.fixture(scope="module")
def prepared(data_dir: Path) -> dict[str, np.ndarray]:
    """The subject's T1 and FLAIR on the default model grid (240 px at 1 mm), model range, 40 slices."""
    folder = data_dir / "brats" / VAL
    return {m: prepare_volume(read_volume(folder / f"{VAL}-{m}.nii.gz"), ModelGrid(240, 1.0)).array[60:100]
            for m in ("t1n", "t2f")}


def test_the_foreground_is_the_union_of_the_sources(prepared: dict[str, np.ndarray]) -> None:
    each = {m: foreground_mask((a + 1.0) * 0.5, m) for m, a in prepared.items()}
    both = source_foreground(list(prepared.values()), list(prepared))
    assert np.array_equal(both, each["t1n"] | each["t2f"])
    assert 0.1 < both.mean() < 0.5  # a brain in a 240 mm field of view, not the whole grid nor nothing


def test_a_haze_is_cut_at_the_margin_and_the_brain_kept(prepared: dict[str, np.ndarray]) -> None:
    t1 = prepared["t1n"].copy()
    z, y, x = np.indices(t1.shape)
    centre = np.array(t1.shape) // 2
    cavity = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < 10**2  # 4 mL, empty in the T1
    assert source_foreground([t1], ["t1n"])[cavity].mean() > 0.95  # the centre of the brain
    t1[cavity] = -1.0
    foreground = source_foreground([t1], ["t1n"])
    hazy = np.where(foreground, -t1, np.float32(-0.9))  # an inverted T1 painted over a faint haze everywhere
    std = np.full_like(t1, 0.05)
    mean, spread = confine(hazy, std, foreground)
    # taxicab distance in voxels: binary dilation by the 6-connected cross steps one voxel along one axis
    distance = ndimage.distance_transform_cdt(~foreground, metric="taxicab")
    inside = ndimage.binary_fill_holes(distance <= SUPPORT_MARGIN)  # enclosed holes of the sources are kept
    assert (distance[cavity] > SUPPORT_MARGIN).any() and inside[cavity].all()
    assert (distance > SUPPORT_MARGIN).any() and (distance == SUPPORT_MARGIN).any()
    np.testing.assert_array_equal(mean[inside], hazy[inside])
    assert np.all(mean[~inside] == -1.0) and np.all(spread[~inside] == 0.0) and np.all(spread[inside] == 0.05)
    assert mean.dtype == np.float32 and confine(hazy, None, foreground)[1] is None


def test_a_heads_support_is_the_head_not_its_noisy_air() -> None:
    """A real T1 series with skull (4 slices, 0.41 mm, noisy air): above the foreground threshold lies most of its
    field of view; the head's support keeps the head (its centre, ventricles included) and drops the air."""
    series = Path(__file__).resolve().parent / "data" / "mr_t1_4slices"
    t1 = prepare_volume(read_volume(series), ModelGrid(240, 1.0), modality="t1n").array
    threshold, head = source_foreground([t1], ["t1n"]), source_foreground([t1], ["t1n"], head=True)
    assert not (head & ~threshold).any() and (head_foreground([t1]) & threshold & ~head).sum() == 0
    y, x = np.indices(t1.shape[1:])
    centre = (y - 120) ** 2 + (x - 120) ** 2 < 50**2
    assert head[:, centre].all() and not head[:, :20, :20].any() and (threshold & ~head).mean() > 0.25

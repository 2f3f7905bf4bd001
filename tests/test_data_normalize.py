"""Source normalisation by rank (``ModelConfig.source_norm = "rank"``) on real BraTS volumes: invariant to a
scanner's monotone intensity changes, uniform over the foreground, and the same in training and synthesis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.layouts import discover
from phmdiff_cli.data.normalize import fit_intensity, foreground_mask, normalize_source, to_model_range
from phmdiff_cli.data.preprocess import prepare_volume
from phmdiff_cli.data.slices import SliceDataset, parse_pairs
from phmdiff_cli.io import read_volume

SUBJECT = "TCGA-DU-7294"


@pytest.fixture(scope="module")
def t1n(brats_dir: Path) -> np.ndarray:
    """The held-out subject's T1, float32 file units, negative interpolation values clipped at 0."""
    array = read_volume(brats_dir / SUBJECT / f"{SUBJECT}-t1n.nii.gz").array.astype(np.float32)
    return np.clip(array, 0.0, None)


def _model_range(array: np.ndarray) -> np.ndarray:
    return to_model_range(array, fit_intensity(array, "t1n"))


def test_rank_is_the_same_for_another_scanners_monotone_intensities(t1n: np.ndarray) -> None:
    """A brighter scanner with a different contrast curve (x -> 3 x^1.5): dividing by the 99.5th percentile
    leaves the tissue values apart, their ranks agree to about 1 % (the foreground threshold, 1 % of the
    99th percentile, keeps a few different voxels, which shifts every rank a little)."""
    other = 3.0 * t1n**1.5
    a, b = _model_range(t1n), _model_range(other)
    inside = foreground_mask(t1n, "t1n") & foreground_mask(other, "t1n")
    assert np.abs(a - b)[inside].mean() > 0.1
    ra, rb = normalize_source(a, "t1n", "rank"), normalize_source(b, "t1n", "rank")
    assert np.abs(ra - rb)[inside].max() < 0.02


def test_rank_is_uniform_over_the_foreground_and_keeps_the_background(t1n: np.ndarray) -> None:
    prepared = _model_range(t1n)
    ranked = normalize_source(prepared, "t1n", "rank")
    fg = foreground_mask((prepared + 1) / 2, "t1n")
    assert ranked.dtype == np.float32 and ranked.shape == prepared.shape
    assert np.all(ranked[~fg] == -1.0) and ranked.min() >= -1.0 and ranked.max() <= 1.0
    deciles = np.quantile(ranked[fg], np.linspace(0.1, 0.9, 9))
    np.testing.assert_allclose(deciles, np.linspace(-0.8, 0.8, 9), atol=0.01)
    # Monotone: a brighter voxel never gets a lower rank.
    order = np.argsort(prepared[fg])
    assert np.all(np.diff(ranked[fg][order]) >= 0)


def test_foreground_rank_keeps_the_darkest_foreground_apart_from_the_background(t1n: np.ndarray) -> None:
    prepared = _model_range(t1n)
    fg = foreground_mask((prepared + 1) / 2, "t1n")
    plain, apart = normalize_source(prepared, "t1n", "rank"), normalize_source(prepared, "t1n", "foreground-rank")
    assert np.all(apart[~fg] == -1.0)
    assert apart[fg].min() >= -0.5 - 1e-6 and (plain[fg] < -0.9).mean() > 0.04  # 5 % of "rank" sits by -1
    # the same order, affinely squeezed: [-1, 1] -> [-0.5, 1]
    np.testing.assert_allclose(apart[fg], -0.5 + (plain[fg] + 1.0) * 0.75, atol=1e-5)


def test_percentile_and_ct_sources_pass_unchanged(t1n: np.ndarray) -> None:
    prepared = _model_range(t1n)
    assert normalize_source(prepared, "t1n", "percentile") is prepared
    assert normalize_source(prepared, "ct", "rank") is prepared
    with pytest.raises(ValueError, match="unknown source normalisation"):
        normalize_source(prepared, "t1n", "zscore")


def test_training_and_synthesis_give_the_model_the_same_ranked_source(brats_dir: Path, tmp_path: Path) -> None:
    """The dataset's source slice (from the float16 cache) and the synthesizer's (from the prepared file)
    agree to float16 precision: the model sees in synthesis what it was trained on."""
    grid = ModelGrid(240, 1.0)
    subject = discover(brats_dir).subject(SUBJECT)
    dataset = SliceDataset([subject], parse_pairs("t1n:t2w"), grid, tmp_path, source_norm="rank")
    z = 77
    trained = dataset[(0, z, 0)]["source"][0, 1].numpy()
    prepared = prepare_volume(read_volume(subject.images["t1n"]), grid).array
    synthesized = normalize_source(prepared, "t1n", "rank")[z]
    assert np.abs(trained - synthesized).max() < 0.01
    assert not np.allclose(trained, prepared[z], atol=0.05)

"""The downstream benchmark's bookkeeping on the real labelled data: BraTS label conventions and tumour regions,
cross-validation folds that test every subject once, brain masks carried from the dataset to the segmenter's
inputs, and the histogram-matched substitute of a dropped modality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phmdiff_cli.data.grid import MODEL_BACKGROUND, ModelGrid
from phmdiff_cli.data.layouts import LABEL_KEY, MASK_KEY, discover
from phmdiff_cli.engine.augment import Entry
from phmdiff_cli.engine.segbench import (
    SegCase,
    SegSettings,
    _Loader,
    cases_from_entries,
    fold_splits,
    hist_matched,
)
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import read_volume
from phmdiff_cli.metrics.regions import detect_convention, region_map

BRATS2013 = "brats2013_t1c_flair"


def _values(paths: list[Path]) -> set[int]:
    return {int(v) for p in paths for v in np.unique(np.rint(read_volume(p).array).astype(np.int64))}


def test_the_label_conventions_of_the_real_datasets(data_dir: Path) -> None:
    brats2013 = sorted((data_dir / BRATS2013).glob("*/*-seg.nii.gz"))
    assert detect_convention(_values(brats2013)) == "brats2013"
    assert detect_convention(_values(sorted((data_dir / "ms_mni").glob("*/*-seg.nii.gz")))) is None  # MS lesions
    assert detect_convention({0, 1, 2, 4}) == "brats2017" and detect_convention({0, 1, 2, 3}) == "brats2023"
    labels = np.rint(read_volume(brats2013[0]).array).astype(np.int64)
    whole, core, enhancing = (region_map(labels, "brats2013", r) for r in
                              ("whole tumour", "tumour core", "enhancing tumour"))
    assert np.array_equal(whole, labels > 0) and np.array_equal(enhancing, labels == 4)
    assert np.all(core <= whole) and np.all(enhancing <= core) and core.sum() == np.isin(labels, (1, 3, 4)).sum()


def _cases(data_dir: Path) -> list[SegCase]:
    dataset = discover(data_dir / BRATS2013)
    return [SegCase(s.id, s.label, dict(s.images), {"t2f": {0: s.images["t2f"]}}, s.mask)  # type: ignore[arg-type]
            for s in dataset.subjects]


def test_three_folds_test_each_of_six_subjects_once(data_dir: Path) -> None:
    cases = _cases(data_dir)
    folds = fold_splits(cases, ["t1c", "t2f"], ["t2f"], SegSettings(folds=3, seed=0))
    tested = [c.subject for _, test in folds for c in test]
    assert sorted(tested) == sorted(c.subject for c in cases) and [len(t) for _, t in folds] == [2, 2, 2]
    for train, test in folds:
        assert {c.subject for c in train} == {c.subject for c in cases} - {c.subject for c in test}
    again = fold_splits(cases, ["t1c", "t2f"], ["t2f"], SegSettings(folds=3, seed=0))
    assert [[c.subject for c in t] for _, t in again] == [[c.subject for c in t] for _, t in folds]
    with pytest.raises(InputError, match="--folds 7 needs at least 7 subjects"):
        fold_splits(cases, ["t1c", "t2f"], ["t2f"], SegSettings(folds=7))


def test_brain_masks_reach_the_segmenter_inputs(data_dir: Path) -> None:
    """Entries of an augmented BraTS 2013 folder keep each subject's mask; the z-scored T1c is background (-1)
    outside it on the segmentation grid."""
    subject = discover(data_dir / BRATS2013).subjects[0]
    root = data_dir / BRATS2013
    entries = [Entry(subject.id, key, path.relative_to(root)) for key, path in
               (("t1c", subject.images["t1c"]), ("t2f", subject.images["t2f"]), (LABEL_KEY, subject.label),
                (MASK_KEY, subject.mask))]
    (case,) = cases_from_entries(root, entries)
    assert case.mask == subject.mask and set(case.real) == {"t1c", "t2f"}
    loader = _Loader(ModelGrid(128, 2.0), [0, 1, 2, 3, 4], [])
    image = loader.image(case.real["t1c"], "t1c", case)
    assert image.shape == loader.label(case).slices.shape
    inside = image > MODEL_BACKGROUND + 1e-3
    assert 0.1 < inside.mean() < 0.5  # the brain, not the z-scored fill around it


def test_hist_matched_maps_onto_the_reference_quantiles(data_dir: Path) -> None:
    (case, *others) = _cases(data_dir)
    loader = _Loader(ModelGrid(128, 2.0), [0, 1, 2, 3, 4], [])
    quantiles = loader.quantiles(others[:2], "t2f")
    assert np.all(np.diff(quantiles) >= 0) and quantiles[0] > MODEL_BACKGROUND
    t1c = loader.image(case.real["t1c"], "t1c", case)
    matched = hist_matched(t1c, quantiles)
    fg = t1c > MODEL_BACKGROUND + 1e-3
    assert np.array_equal(matched[~fg], t1c[~fg])
    assert matched[fg].min() >= quantiles[0] and matched[fg].max() <= quantiles[-1]
    np.testing.assert_allclose(np.median(matched[fg]), np.median(quantiles), atol=0.02)
    order = np.argsort(t1c[fg], kind="stable")
    assert np.all(np.diff(matched[fg][order]) >= 0)  # monotone: the T1c's order is kept

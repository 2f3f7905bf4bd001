"""Training slices on real BraTS subjects: cache, samples, 2.5D context, sampling, augmentation, split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import phmdiff_cli.data.preprocess as preprocess
from phmdiff_cli.data.cache import cache_subject
from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.layouts import Subject, discover
from phmdiff_cli.data.slices import (
    Augment,
    Pair,
    SliceDataset,
    context_indices,
    parse_pairs,
    source_stack,
    split_subjects,
)
from phmdiff_cli.errors import InputError
from phmdiff_cli.modalities import ABSENT_ID, modality_id

GRID = ModelGrid(240, 1.0)  # the data spacing: preprocessing is a copy, fast
PAIRS = "t1n:t2w,t1+t2:flair"
SUBJECTS = ("BraTS-GLI-00001-000", "TCGA-DU-7294")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slice-cache")


@pytest.fixture(scope="session")
def subjects(brats_dir: Path) -> list[Subject]:
    return [discover(brats_dir).subject(sid) for sid in SUBJECTS]


@pytest.fixture(scope="session")
def dataset(subjects: list[Subject], cache_dir: Path) -> SliceDataset:
    """Two subjects x (t1n, t2w, t2f), preprocessed once for the whole session."""
    return SliceDataset(subjects, parse_pairs(PAIRS), GRID, cache_dir)


def test_parse_pairs() -> None:
    assert parse_pairs("t1:t2, T1n+t2w:FLAIR") == (Pair(("t1n",), "t2w"), Pair(("t1n", "t2w"), "t2f"))
    assert str(parse_pairs("mr:sct")[0]) == "mr:ct"
    for bad, message in [
        ("t1n", "malformed"),
        ("t1n:t2w:t2f", "malformed"),
        ("t1n:t9", "unknown modality"),
        ("t1n+t2w:t2w", "repeats"),
        ("t1n:t2w,t1:t2", "given twice"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_pairs(bad)


def test_context_indices_replicate_the_border() -> None:
    assert context_indices(0, 10, 2).tolist() == [0, 0, 0, 1, 2]
    assert context_indices(9, 10, 1).tolist() == [8, 9, 9]
    assert context_indices(4, 10, 0).tolist() == [4]


def test_samples_shapes_dtypes_and_content(dataset: SliceDataset) -> None:
    assert [(dataset.subjects[s].id, str(p)) for s, p in dataset.items] == [
        (sid, pair) for sid in SUBJECTS for pair in ("t1n:t2w", "t1n+t2w:t2f")
    ]
    assert len(dataset) == 4 * 155 and dataset.slots == 2
    z = 77
    sample = dataset[(0, z, 0)]  # t1n -> t2w: one source, second slot empty
    assert sample["source"].shape == (2, 3, 240, 240) and sample["source"].dtype == torch.float32
    assert sample["target"].shape == (1, 240, 240) and sample["target"].dtype == torch.float32
    assert (
        sample["src_mod"].tolist() == [modality_id("t1n"), ABSENT_ID]
        and sample["src_mod"].dtype == torch.long
    )
    assert sample["tgt_mod"].shape == () and int(sample["tgt_mod"]) == modality_id("t2w")
    t1n, t2w = dataset.array(0, "t1n"), dataset.array(0, "t2w")
    np.testing.assert_array_equal(sample["source"][0].numpy(), t1n[z - 1 : z + 2].astype(np.float32))
    np.testing.assert_array_equal(sample["target"][0].numpy(), t2w[z].astype(np.float32))
    assert torch.all(sample["source"][1] == 0)
    both = dataset[(1, z, 0)]  # t1n + t2w -> t2f
    assert both["src_mod"].tolist() == [modality_id("t1n"), modality_id("t2w")]
    np.testing.assert_array_equal(both["source"][1, 1].numpy(), t2w[z].astype(np.float32))
    assert -1.0 <= float(sample["target"].min()) and float(sample["target"].max()) <= 1.0


def test_border_slices_repeat_the_edge(dataset: SliceDataset) -> None:
    t1n = torch.from_numpy(dataset.array(0, "t1n").astype(np.float32))
    first, last = dataset[(0, 0, 0)]["source"][0], dataset[(0, 154, 0)]["source"][0]
    assert torch.equal(first, t1n[[0, 0, 1]]) and torch.equal(last, t1n[[153, 154, 154]])
    ramp = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None], (5, 4, 4))  # slice z holds z
    stack, _ = source_stack([ramp], ["t1n"], k=2, slots=1, z=[0, 4])
    assert stack[:, 0, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [2, 3, 4, 4, 4]]


def test_source_stack_for_a_whole_volume(dataset: SliceDataset) -> None:
    volumes = [dataset.array(1, "t1n"), dataset.array(1, "t2w")]
    stack, src_mod = source_stack(volumes, ["t1n", "t2w"], k=1, slots=3)
    assert stack.shape == (155, 3, 3, 240, 240) and stack.dtype == np.float32
    assert src_mod.tolist() == [modality_id("t1n"), modality_id("t2w"), ABSENT_ID]
    z = 100  # the same input the training sample of that slice gets
    sample = dataset[(3, z, 0)]
    np.testing.assert_array_equal(stack[z, :2], sample["source"].numpy())


def test_cache_is_reused_without_reading_images(
    subjects: list[Subject], cache_dir: Path, dataset: SliceDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached subject was read again")

    monkeypatch.setattr(preprocess, "read_volume", no_reading)
    again = SliceDataset(subjects, parse_pairs(PAIRS), GRID, cache_dir)
    assert [s.folder for s in again.subjects] == [s.folder for s in dataset.subjects]
    np.testing.assert_array_equal(again[(2, 60, 0)]["target"], dataset[(2, 60, 0)]["target"])
    assert isinstance(again.array(0, "t2f"), np.memmap) and again.array(0, "t2f").dtype == np.float16
    with pytest.raises(AssertionError, match="read again"):  # another grid is another cache entry
        SliceDataset(subjects, parse_pairs(PAIRS), ModelGrid(96, 2.5), cache_dir)


def test_changed_file_is_preprocessed_again(brats_dir: Path, tmp_path: Path) -> None:
    sid = SUBJECTS[1]
    (tmp_path / "data" / sid).mkdir(parents=True)
    shutil.copy(brats_dir / sid / f"{sid}-t1n.nii.gz", tmp_path / "data" / sid)
    subject = discover(tmp_path / "data").subjects[0]
    grid = ModelGrid(64, 4.0)
    first = cache_subject(subject, ["t1n"], grid, tmp_path / "cache", reference="t1n")
    assert cache_subject(subject, ["t1n"], grid, tmp_path / "cache", reference="t1n").folder == first.folder
    stat = subject.images["t1n"].stat()
    os.utime(subject.images["t1n"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = cache_subject(subject, ["t1n"], grid, tmp_path / "cache", reference="t1n")
    assert second.folder != first.folder and second.folder.is_dir()


def test_sampling_favours_foreground(dataset: SliceDataset) -> None:
    keys = [key for key, _ in zip(dataset.sampler(seed=3), range(4000), strict=False)]
    fg = [dataset.subjects[s].foreground[p.target] for s, p in dataset.items]
    drawn = np.array([fg[i][z] for i, z, _ in keys])
    every = np.concatenate(fg)
    assert drawn.mean() > 1.3 * every.mean()
    weights = [dataset.slice_weights(i) for i in range(len(fg))]
    expected = np.mean([np.sum(f * w) / np.sum(w) for f, w in zip(fg, weights, strict=True)])
    assert abs(drawn.mean() - expected) < 0.01  # the sampler follows the weights
    assert (drawn == 0).mean() < 0.2 * (every == 0).mean()  # empty slices are rare, not banned
    assert 0 < (drawn == 0).sum()
    counts = np.bincount([i for i, _, _ in keys], minlength=len(dataset.items))
    assert counts.min() > 0.8 * len(keys) / len(dataset.items)  # items drawn uniformly


def test_sampler_is_deterministic_shardable_and_resumable(dataset: SliceDataset) -> None:
    def take(sampler: torch.utils.data.Sampler, n: int) -> list[tuple[int, int, int]]:
        return [key for key, _ in zip(sampler, range(n), strict=False)]

    stream = take(dataset.sampler(seed=7), 5000)  # crosses a chunk boundary (4096)
    assert stream == take(dataset.sampler(seed=7), 5000) != take(dataset.sampler(seed=8), 5000)
    rank0 = take(dataset.sampler(seed=7, rank=0, world_size=2), 2500)
    rank1 = take(dataset.sampler(seed=7, rank=1, world_size=2), 2500)
    assert rank0 == stream[0::2] and rank1 == stream[1::2]
    assert take(dataset.sampler(seed=7, rank=1, world_size=2, start=2040), 20) == stream[4081:4121:2]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, sampler=dataset.sampler(seed=7), num_workers=1
    )
    batch = next(iter(loader))
    assert batch["source"].shape == (4, 2, 3, 240, 240) and batch["tgt_mod"].shape == (4,)
    assert torch.equal(batch["target"][2], dataset[stream[2]]["target"])


def test_augmentation_keeps_pairs_aligned(
    subjects: list[Subject], cache_dir: Path, dataset: SliceDataset
) -> None:
    flip = SliceDataset(subjects, parse_pairs(PAIRS), GRID, cache_dir, augment=Augment(1.0, 0.0, 0.0))
    jitter = SliceDataset(subjects, parse_pairs(PAIRS), GRID, cache_dir, augment=Augment(0.5, 0.3, 0.1))
    key = (1, 80, 12345)
    plain, flipped = dataset[key], flip[key]
    assert torch.equal(flipped["source"], plain["source"].flip(-1))
    assert torch.equal(flipped["target"], plain["target"].flip(-1))
    a, b = jitter[key], jitter[key]
    assert torch.equal(a["source"], b["source"])  # the key's seed fixes the augmentation
    flipped_lr = torch.equal(a["target"], plain["target"].flip(-1))
    assert flipped_lr or torch.equal(a["target"], plain["target"])  # target values are never jittered
    reference = plain["source"].flip(-1) if flipped_lr else plain["source"]
    assert torch.equal(a["source"] > -1, reference > -1)  # same anatomy where it was, background stays -1
    assert not torch.allclose(a["source"], reference, atol=1e-3)  # but intensities changed
    assert float(a["source"].min()) >= -1 and float(a["source"].max()) <= 1
    seen = {torch.equal(jitter[(1, 80, s)]["target"], plain["target"]) for s in range(20)}
    assert seen == {True, False}  # both flipped and unflipped drawn


def test_pose_augmentation_moves_sources_and_target_together(dataset: SliceDataset) -> None:
    """Rotation and zoom are one affine for every source channel and the target: given the real target slice
    as its own source, both come out identical; the unused source slot stays zero and background stays -1."""
    plain = dataset[(0, 80, 0)]  # item 0: t1n:t2w, one source in two slots
    target = plain["target"].numpy()
    source = np.zeros_like(plain["source"].numpy())
    source[0] = target
    pose = Augment(flip_lr=0.0, gamma=0.0, scale=0.0, rotate=20.0, zoom=0.2)
    areas = []
    for seed in range(6):
        moved_source, moved_target = pose(source.copy(), target.copy(), 1, np.random.default_rng(seed))
        assert moved_source.shape == source.shape and moved_target.shape == target.shape
        assert np.allclose(moved_source[0], moved_target, atol=1e-6)
        assert not moved_source[1].any()
        assert not np.allclose(moved_target, target, atol=0.1)
        assert moved_target.min() >= -1 - 1e-6 and moved_target.max() <= 1 + 1e-6
        assert np.all(moved_target[:, :5, :5] == -1)  # a corner outside the head stays background
        again = pose(source.copy(), target.copy(), 1, np.random.default_rng(seed))[1]
        assert np.array_equal(again, moved_target)  # the seed fixes the pose
        areas.append(float((moved_target > -0.9).sum()) / float((target > -0.9).sum()))
    # rotation keeps the head's area; zoom scales it by at most 1.2 ** 2 either way
    assert all(1 / 1.2**2 - 0.03 < a < 1.2**2 + 0.03 for a in areas) and np.ptp(areas) > 0.05
    off = Augment(flip_lr=0.0, gamma=0.0, scale=0.0)
    assert np.array_equal(off(source.copy(), target.copy(), 1, np.random.default_rng(0))[1], target)


def test_shift_augmentation_moves_the_slice_within_its_bound(dataset: SliceDataset) -> None:
    """A shift alone moves the head's centre of mass by at most ``translate`` pixels along each axis (and by
    several pixels over a few draws), keeps its area, and moves the sources and the target together."""
    target = dataset[(0, 80, 0)]["target"].numpy()
    source = np.zeros((2, *target.shape), dtype=np.float32)
    source[0] = target
    shift = Augment(flip_lr=0.0, gamma=0.0, scale=0.0, translate=12.0)
    head = target[0] > -0.9
    centre = np.argwhere(head).mean(axis=0)
    moves = []
    for seed in range(6):
        moved_source, moved_target = shift(source.copy(), target.copy(), 1, np.random.default_rng(seed))
        assert np.allclose(moved_source[0], moved_target, atol=1e-6)
        moved = moved_target[0] > -0.9
        assert abs(float(moved.sum()) / float(head.sum()) - 1.0) < 0.02
        moves.append(np.argwhere(moved).mean(axis=0) - centre)
    moves = np.abs(np.array(moves))
    assert moves.max() <= 12.5 and moves.max() > 4.0


def test_missing_modalities(subjects: list[Subject], cache_dir: Path) -> None:
    with pytest.raises(InputError, match="no subject has all the images of pair t1n:ct"):
        SliceDataset(subjects, parse_pairs("t1n:ct"), GRID, cache_dir)
    partial = Subject("partial", {"t1n": subjects[0].images["t1n"]})
    ds = SliceDataset([*subjects, partial], parse_pairs(PAIRS), GRID, cache_dir)
    assert ds.skipped == ("partial",) and len(ds.items) == 4


@pytest.fixture
def synthrad(data_dir: Path, tmp_path: Path) -> Path:
    """SynthRAD layout; MR and CT on different grids (different people)."""
    folder = tmp_path / "pelvis" / "1PA001"
    folder.mkdir(parents=True)
    (folder / "mr.nii.gz").symlink_to(data_dir / "ct" / "totalsegmentator_example_mr_sm_3mm.nii.gz")
    (folder / "ct.nii.gz").symlink_to(data_dir / "ct" / "totalsegmentator_example_ct_3mm.nii.gz")
    return tmp_path / "pelvis"


def test_grid_mismatch_refused_or_resampled(synthrad: Path, tmp_path: Path) -> None:
    (subject,) = discover(synthrad).subjects
    pairs = parse_pairs("mr:ct")
    with pytest.raises(InputError) as info:
        SliceDataset([subject], pairs, ModelGrid(96, 4.0), tmp_path / "cache")
    assert str(subject.images["mr"]) in info.value.message and "ct.nii.gz" in info.value.message
    assert "--resample" in (info.value.hint or "")
    resampled = SliceDataset([subject], pairs, ModelGrid(96, 4.0), tmp_path / "cache", resample=True)
    ct_depth = sitk.ReadImage(str(subject.images["ct"])).GetSize()[2]  # RAS: z stays the slice axis
    assert resampled.array(0, "mr").shape == resampled.array(0, "ct").shape == (ct_depth, 96, 96)
    assert resampled.subjects[0].params["ct"].lo == -1024.0


def test_matching_grids_accepted(synthrad: Path, tmp_path: Path) -> None:
    folder = synthrad / "1PA001"
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"))
    mr = sitk.Resample(sitk.Cast(sitk.ReadImage(str(folder / "mr.nii.gz")), sitk.sitkFloat32), ct)
    (folder / "mr.nii.gz").unlink()
    sitk.WriteImage(mr, str(folder / "mr.nii.gz"))
    sitk.WriteImage(sitk.Cast(ct > -500, sitk.sitkUInt8), str(folder / "mask.nii.gz"))  # body mask
    (subject,) = discover(synthrad).subjects
    ds = SliceDataset([subject], parse_pairs("mr:ct"), ModelGrid(96, 4.0), tmp_path / "cache")
    assert ds[(0, 10, 0)]["source"].shape == (1, 3, 96, 96)
    foreground = ds.subjects[0].foreground
    assert foreground["mr"].max() > 0.1  # the body mask, not the (other person's) MR, defines the foreground
    np.testing.assert_array_equal(foreground["mr"], foreground["ct"])


def test_split_subjects() -> None:
    ids = [f"P{i:03d}" for i in range(20)]
    train, val = split_subjects(ids, val_fraction=0.2, seed=1)
    assert len(val) == 4 and sorted(train + val) == ids and not set(train) & set(val)
    assert split_subjects(list(reversed(ids)), val_fraction=0.2, seed=1) == (train, val)
    assert split_subjects(ids, val_fraction=0.2, seed=2)[1] != val
    assert split_subjects(["a", "b", "c", "d"], val_fraction=0.1)[1] != []
    assert split_subjects(["a"], val_fraction=0.5) == (["a"], [])
    with pytest.raises(InputError):
        split_subjects(ids, val_fraction=1.0)

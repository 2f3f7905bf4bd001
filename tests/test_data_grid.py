"""Model grid resampling and its inverse on real BraTS volumes (240 x 240 x 155 at 1 mm)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from phmdiff_cli.data.grid import GridCropWarning, GridTransform, ModelGrid, from_model_grid, to_model_grid
from phmdiff_cli.data.normalize import fit_intensity, to_model_range
from phmdiff_cli.data.preprocess import prepare_volume, restore_volume
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import Volume, read_volume, to_canonical

SUBJECT = "BraTS-MET-00110-000"  # stored RAS: exercises the canonical reorientation


@pytest.fixture(scope="module")
def t1n(brats_dir: Path) -> Volume:
    """Canonical T1 in the model range."""
    volume = to_canonical(read_volume(brats_dir / SUBJECT / f"{SUBJECT}-t1n.nii.gz"))
    return volume.with_array(to_model_range(volume.array, fit_intensity(volume.array, "t1n")))


@pytest.fixture(scope="module")
def seg(brats_dir: Path) -> Volume:
    return to_canonical(read_volume(brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-seg.nii.gz"))


def test_same_spacing_round_trip_is_exact(t1n: Volume) -> None:
    slices, transform = to_model_grid(t1n, ModelGrid(256, 1.0))
    assert slices.shape == (155, 256, 256) and slices.dtype == np.float32
    assert transform.offset == (-8, -8) and transform.lost_mm == (0.0, 0.0)
    assert np.all(slices[:, :8] == -1.0) and np.all(slices[:, :, -8:] == -1.0)  # padded with background
    np.testing.assert_array_equal(from_model_grid(slices, transform), t1n.array)


def test_crop_warns_with_lost_mm_and_inverse_keeps_the_rest(t1n: Volume) -> None:
    with pytest.warns(
        GridCropWarning, match=rf"{SUBJECT}-t1n.nii.gz: .* cuts off \d+ mm \(left-right\) and \d+ mm"
    ):
        slices, transform = to_model_grid(t1n, ModelGrid(160, 1.0))
    for axis, other in ((0, (0, 1)), (1, (0, 2))):  # x, y
        fg = np.flatnonzero((t1n.array > -1).any(axis=other))  # columns / rows holding brain
        kept = range(transform.offset[axis], transform.offset[axis] + 160)
        assert transform.lost_mm[axis] == max(0, kept.start - fg[0], fg[-1] + 1 - kept.stop)
    assert max(transform.lost_mm) > 0
    back = from_model_grid(slices, transform)
    inside = (slice(None), slice(40, 200), slice(40, 200))
    np.testing.assert_array_equal(back[inside], t1n.array[inside])
    assert np.all(back[:, :, :40] == -1.0)


def test_no_warning_when_foreground_fits(t1n: Volume) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", GridCropWarning)
        to_model_grid(t1n, ModelGrid(128, 2.0))


@pytest.mark.parametrize(
    ("grid", "max_mean_error"), [(ModelGrid(128, 2.0), 0.06), (ModelGrid(300, 0.8), 0.025)]
)
def test_other_spacing_round_trip_is_close(t1n: Volume, grid: ModelGrid, max_mean_error: float) -> None:
    slices, transform = to_model_grid(t1n, grid)
    assert slices.shape == (155, grid.size, grid.size)
    back = from_model_grid(slices, transform)
    assert back.shape == t1n.shape
    brain = t1n.array > -1
    error = np.abs(back - t1n.array)[brain]
    assert error.mean() < max_mean_error  # model range is [-1, 1]
    assert np.corrcoef(back[brain], t1n.array[brain])[0, 1] > 0.97


def test_downsampling_is_anti_aliased(brats_dir: Path) -> None:
    """At 4 mm the grid approaches the 4x4 block mean, unlike plain linear sampling (which aliases)."""
    volume = to_canonical(read_volume(brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-t2w.nii.gz"))
    array = volume.array.astype(np.float32)
    slices, transform = to_model_grid(volume.with_array(array), ModelGrid(60, 4.0), background=0.0)
    assert transform.offset == (0, 0)
    block = array.reshape(155, 60, 4, 60, 4).mean(axis=(2, 4))
    # linear interpolation without smoothing at the block centres = mean of the 2x2 central voxels
    central = sum(array[:, a::4][:, :, b::4] for a in (1, 2) for b in (1, 2)) / 4
    assert np.abs(slices - block).mean() < 0.7 * np.abs(central - block).mean()


def test_labels_stay_labels(seg: Volume) -> None:
    slices, transform = to_model_grid(
        seg.with_array(seg.array.astype(np.float32)),
        ModelGrid(160, 1.5),
        interpolator="nearest",
        background=0.0,
    )
    assert set(np.unique(slices)) == set(np.unique(seg.array))
    back = from_model_grid(slices, transform, interpolator="nearest")
    assert set(np.unique(back)) <= set(np.unique(seg.array))
    same, transform = to_model_grid(
        seg.with_array(seg.array.astype(np.float32)),
        ModelGrid(240, 1.0),
        interpolator="nearest",
        background=0.0,
    )
    np.testing.assert_array_equal(from_model_grid(same, transform, interpolator="nearest"), seg.array)


def test_anisotropic_in_plane_spacing(t1n: Volume) -> None:
    volume = Volume(t1n.array[:, :, ::2], (2.0, 1.0, 1.0), t1n.origin, t1n.direction)
    slices, transform = to_model_grid(volume, ModelGrid(240, 1.0))
    assert transform.spacing == (2.0, 1.0) and transform.offset == (0, 0)
    back = from_model_grid(slices, transform)
    assert back.shape == volume.shape
    brain = volume.array > -1
    assert np.abs(back - volume.array)[brain].mean() < 0.03


def test_transform_json_round_trip_and_shape_check(t1n: Volume) -> None:
    _, transform = to_model_grid(t1n, ModelGrid(128, 2.0))
    again = GridTransform.from_dict(json.loads(json.dumps(transform.to_dict())))
    assert again == transform
    with pytest.raises(ValueError, match="does not match the grid"):
        from_model_grid(np.zeros((155, 64, 64), np.float32), transform)


def test_prepare_volume_refuses_a_mask_on_another_grid(brats_dir: Path, data_dir: Path) -> None:
    image = read_volume(brats_dir / SUBJECT / f"{SUBJECT}-t1n.nii.gz")
    mask = read_volume(data_dir / "ct" / "totalsegmentator_example_ct_3mm.nii.gz")
    with pytest.raises(
        InputError, match="totalsegmentator_example_ct_3mm.nii.gz: the mask is not on the image"
    ):
        prepare_volume(image, ModelGrid(128, 2.0), mask=mask)


def test_prepare_and_restore_volume_on_the_original_grid(brats_dir: Path) -> None:
    """File -> model grid -> file on a RAS-stored volume: the exact input grid and values back (at 1 mm)."""
    original = read_volume(brats_dir / SUBJECT / f"{SUBJECT}-t2w.nii.gz")
    prepared = prepare_volume(original, ModelGrid(256, 1.0))
    assert prepared.array.shape == (155, 256, 256) and prepared.foreground.shape == (155,)
    assert 0 < prepared.foreground.max() < 1 and prepared.foreground[0] == 0
    restored = restore_volume(prepared.array, prepared.params, prepared.transform, original)
    assert restored.same_grid(original) and restored.modality == "t2w"
    expected = np.clip(original.array.astype(np.float32), prepared.params.lo, prepared.params.hi)
    np.testing.assert_allclose(restored.array, expected, rtol=0, atol=1e-5 * prepared.params.hi)

"""Image metrics against independent references (scikit-image, MONAI, SynthRAD 2023's code) on real data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from scipy import ndimage
from skimage.metrics import (
    mean_squared_error,
    normalized_root_mse,
    peak_signal_noise_ratio,
    structural_similarity,
)
from skimage.util import crop

from phmdiff_cli.data.normalize import fit_intensity, unit_scale
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import read_volume
from phmdiff_cli.metrics import mae, ms_ssim, mse, nmse, psnr, sharpness, ssim
from phmdiff_cli.metrics.evaluate import EvalSettings, auto_mask, image_scores, parse_metrics, scale_pair

# A central block of the brain: big enough for 7- and 11-voxel windows, small enough to be quick.
BLOCK = (slice(60, 84), slice(50, 190), slice(50, 190))
GAUSSIAN = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}


def _unit(path: Path) -> np.ndarray:
    """A real MRI volume scaled by its own foreground 99.5th percentile to [0, 1], float64 (z, y, x)."""
    array = read_volume(path).array
    return unit_scale(array, fit_intensity(array, "t2w")).astype(np.float64)


@pytest.fixture(scope="module")
def t2(brats_dir: Path) -> np.ndarray:
    return _unit(brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-t2w.nii.gz")


@pytest.fixture(scope="module")
def flair(brats_dir: Path) -> np.ndarray:
    """Another contrast of the same subject, voxel-aligned: a structurally related, imperfect "prediction"."""
    return _unit(brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-t2f.nii.gz")


def _synthrad_ssim(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    background: float,
    kwargs: dict,
    pad: int,
    data_range: float,
) -> float:
    """SynthRAD 2023 ``ImageMetrics.ssim``, whole volume: outside -> background, full map, crop, mask mean."""
    _, smap = structural_similarity(
        np.where(mask, ref, background),
        np.where(mask, pred, background),
        data_range=data_range,
        full=True,
        **kwargs,
    )
    return float(crop(smap, pad)[crop(mask, pad)].mean(dtype=np.float64))


def test_psnr_and_errors_match_scikit_image(t2: np.ndarray, flair: np.ndarray) -> None:
    pred, ref = flair[BLOCK], t2[BLOCK]
    mask = ref > 0.05
    assert psnr(pred, ref, data_range=1.0) == pytest.approx(
        peak_signal_noise_ratio(ref, pred, data_range=1.0), abs=1e-4
    )
    assert psnr(pred, ref, data_range=1.0, mask=mask) == pytest.approx(
        peak_signal_noise_ratio(ref[mask], pred[mask], data_range=1.0), abs=1e-4
    )
    assert mse(pred, ref, mask) == pytest.approx(mean_squared_error(ref[mask], pred[mask]), rel=1e-9)
    assert nmse(pred, ref) == pytest.approx(
        normalized_root_mse(ref, pred, normalization="euclidean") ** 2, rel=1e-9
    )
    assert mae(pred, ref, mask) == pytest.approx(float(np.abs(pred - ref)[mask].mean()), rel=1e-9)
    assert 5 < psnr(pred, ref, data_range=1.0) < 40  # two real contrasts: related, far from identical


@pytest.mark.parametrize(("window", "kwargs", "pad"), [("uniform", {}, 3), ("gaussian", GAUSSIAN, 5)])
def test_ssim_matches_scikit_image_2d_and_3d(
    t2: np.ndarray, flair: np.ndarray, window: str, kwargs: dict, pad: int
) -> None:
    pred, ref = flair[BLOCK], t2[BLOCK]
    expected_3d = structural_similarity(ref, pred, data_range=1.0, **kwargs)
    assert ssim(pred, ref, data_range=1.0, window=window) == pytest.approx(expected_3d, abs=1e-4)
    expected_2d = np.mean(
        [structural_similarity(r, p, data_range=1.0, **kwargs) for p, r in zip(pred, ref, strict=True)]
    )
    assert ssim(pred, ref, data_range=1.0, window=window, spatial_dims=2) == pytest.approx(
        expected_2d, abs=1e-4
    )
    assert 0.0 < expected_3d < 0.95


@pytest.mark.parametrize(("window", "kwargs", "pad"), [("uniform", {}, 3), ("gaussian", GAUSSIAN, 5)])
def test_masked_ssim_is_synthrad_on_the_whole_volume(
    t2: np.ndarray, flair: np.ndarray, window: str, kwargs: dict, pad: int
) -> None:
    """The bounding-box shortcut gives exactly SynthRAD's whole-volume masked SSIM (on half a brain)."""
    mask = (t2 > 0.05) & (np.arange(t2.shape[2]) < 120)[None, None, :]
    sub = slice(50, 90)
    pred, ref, m = flair[sub], t2[sub], mask[sub]
    expected = _synthrad_ssim(pred, ref, m, 0.0, kwargs, pad, 1.0)
    assert ssim(pred, ref, data_range=1.0, mask=m, window=window) == pytest.approx(expected, abs=1e-10)
    per_slice = [
        _synthrad_ssim(p, r, s, 0.0, kwargs, pad, 1.0)
        for p, r, s in zip(pred, ref, m, strict=True)
        if crop(s, pad).any()
    ]
    assert ssim(pred, ref, data_range=1.0, mask=m, window=window, spatial_dims=2) == pytest.approx(
        np.mean(per_slice), abs=1e-10
    )


def test_gaussian_ssim_agrees_with_monai(t2: np.ndarray, flair: np.ndarray) -> None:
    """An independent implementation (torch convolutions): MONAI's SSIM map, valid region, masked mean."""
    pred, ref = flair[BLOCK], t2[BLOCK]
    mask = ref > 0.05
    ssim_map, _ = compute_ssim_and_cs(
        torch.from_numpy(pred)[None, None],
        torch.from_numpy(ref)[None, None],
        3,
        [11] * 3,
        [1.5] * 3,
        data_range=1.0,
    )
    assert ssim(pred, ref, data_range=1.0, window="gaussian") == pytest.approx(
        float(ssim_map.mean()), abs=1e-4
    )
    masked_map, _ = compute_ssim_and_cs(
        torch.from_numpy(np.where(mask, pred, 0))[None, None],
        torch.from_numpy(np.where(mask, ref, 0))[None, None],
        3,
        [11] * 3,
        [1.5] * 3,
        data_range=1.0,
    )
    expected = float(masked_map[0, 0][torch.from_numpy(crop(mask, 5))].double().mean())
    assert ssim(pred, ref, data_range=1.0, mask=mask, window="gaussian") == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("window", "size"), [("uniform", 7), ("gaussian", 11)])
def test_ms_ssim_matches_monai(t2: np.ndarray, flair: np.ndarray, window: str, size: int) -> None:
    """Per-slice MS-SSIM on whole 240x240 slices (no padding needed) equals MONAI's MultiScaleSSIMMetric."""
    pred, ref = flair[70:73], t2[70:73]
    metric = MultiScaleSSIMMetric(spatial_dims=2, kernel_type=window, kernel_size=size, reduction="none")
    expected = float(
        metric(torch.from_numpy(pred)[:, None].float(), torch.from_numpy(ref)[:, None].float()).mean()
    )
    assert ms_ssim(pred, ref, data_range=1.0, window=window, spatial_dims=2) == pytest.approx(
        expected, abs=1e-5
    )
    full = np.ones(ref.shape, dtype=bool)
    assert ms_ssim(pred, ref, data_range=1.0, window=window, spatial_dims=2, mask=full) == pytest.approx(
        expected, abs=1e-5
    )
    assert 0.3 < expected < 0.99


def test_ms_ssim_3d_matches_monai(t2: np.ndarray, flair: np.ndarray) -> None:
    """The 3-D path, with two scales so that the block needs no padding (MONAI refuses small images)."""
    pred, ref = flair[BLOCK], t2[BLOCK]
    weights = (0.4, 0.6)
    metric = MultiScaleSSIMMetric(spatial_dims=3, kernel_type="uniform", kernel_size=7, weights=weights)
    expected = float(
        metric(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(ref)[None, None].float())
    )
    assert ms_ssim(pred, ref, data_range=1.0, weights=weights) == pytest.approx(expected, abs=1e-5)


def test_ms_ssim_pads_small_images_and_masks(t2: np.ndarray) -> None:
    """140x140 slices are edge-padded to 11 * 16 = 176 for five Gaussian scales; the padding never counts."""
    ref = t2[70:74, 50:190, 50:190]
    pred = ref + np.random.default_rng(3).normal(0.0, 0.05, ref.shape)
    mask = ref > 0.05
    args = {"data_range": 1.0, "window": "gaussian", "spatial_dims": 2}
    assert ms_ssim(ref, ref, mask=mask, **args) == pytest.approx(1.0, abs=1e-6)
    masked, whole = ms_ssim(pred, ref, mask=mask, **args), ms_ssim(pred, ref, **args)
    assert 0.5 < masked < 1.0 and 0.5 < whole < 1.0
    assert ms_ssim(pred / 2 + ref / 2, ref, mask=mask, **args) > masked  # less noise, more similar
    tiny = np.zeros(ref.shape, dtype=bool)
    tiny[1, 70, 70] = True
    with pytest.raises(ValueError, match="vanishes"):
        ms_ssim(pred, ref, mask=tiny, **args)


def test_analytic_cases(t2: np.ndarray) -> None:
    ref = t2[BLOCK]
    assert psnr(ref, ref, data_range=1.0) == math.inf
    assert ssim(ref, ref, data_range=1.0) == pytest.approx(1.0, abs=1e-12)
    assert ssim(ref, ref, data_range=1.0, spatial_dims=2, window="gaussian") == pytest.approx(1.0, abs=1e-12)
    # A constant offset c: MSE = c^2 exactly, so PSNR = 20 log10(range / c).
    assert psnr(ref + 0.05, ref, data_range=1.0) == pytest.approx(20 * math.log10(1.0 / 0.05), abs=1e-9)
    assert psnr(ref * 4024 - 7.0, ref * 4024, data_range=4024.0) == pytest.approx(
        20 * math.log10(4024 / 7.0), abs=1e-9
    )
    # Gaussian noise of sigma s: MSE -> s^2 over ~470k voxels (relative spread of the MSE ~0.2%).
    noise = np.random.default_rng(7).normal(0.0, 0.02, ref.shape)
    assert psnr(ref + noise, ref, data_range=1.0) == pytest.approx(20 * math.log10(1.0 / 0.02), abs=0.03)
    assert mae(ref + noise, ref) == pytest.approx(0.02 * math.sqrt(2 / math.pi), rel=0.01)
    assert ssim(ref + noise, ref, data_range=1.0) < ssim(ref + noise / 4, ref, data_range=1.0) < 1.0


def test_shape_and_mask_errors(t2: np.ndarray) -> None:
    ref = t2[BLOCK]
    with pytest.raises(ValueError, match="shape"):
        psnr(ref[:-1], ref, data_range=1.0)
    with pytest.raises(ValueError, match="empty"):
        mae(ref, ref, np.zeros(ref.shape, dtype=bool))
    border = np.zeros(ref.shape, dtype=bool)
    border[0] = True  # only the first slice: inside SSIM's dropped border strip
    with pytest.raises(ValueError, match="border"):
        ssim(ref, ref, data_range=1.0, mask=border)


##################################################################################
#                     Sharpness: in-plane Sobel gradient ratio                   #
##################################################################################


@pytest.fixture(scope="module")
def brain(t2: np.ndarray) -> np.ndarray:
    """The T2's automatic foreground mask (``phmdiff eval --mask auto``), boolean (z, y, x)."""
    return auto_mask(t2, "t2w")


def test_sharpness_falls_with_blur_and_rises_with_sharpening(t2: np.ndarray, brain: np.ndarray) -> None:
    ref, mask = t2[BLOCK], brain[BLOCK]
    assert 0.5 < mask.mean() < 0.95  # the block holds brain edge and background: the erosion matters
    assert sharpness(ref.copy(), ref, mask) == pytest.approx(1.0, abs=1e-6)
    assert sharpness(ref.copy(), ref) == pytest.approx(1.0, abs=1e-6)
    blurred = [sharpness(ndimage.gaussian_filter(ref, (0, s, s)), ref, mask) for s in (0.5, 1.0, 2.0)]
    assert blurred[0] > blurred[1] > blurred[2] and blurred[0] < 1.0
    assert blurred[2] < 0.7  # sigma 2 voxels halves the edges of real anatomy (measured ~0.51)
    unsharp = ref + 1.0 * (ref - ndimage.gaussian_filter(ref, (0, 1.0, 1.0)))
    assert sharpness(unsharp, ref, mask) > 1.2
    noisy = ref + np.random.default_rng(3).normal(0.0, 0.02, ref.shape)
    assert 1.0 < sharpness(noisy, ref, mask) < sharpness(ref + 2 * (noisy - ref), ref, mask)
    # Not symmetric: the blurred image as reference makes the original look sharper.
    assert sharpness(ref, ndimage.gaussian_filter(ref, (0, 1.0, 1.0)), mask) == pytest.approx(1 / blurred[1])


def test_sharpness_is_per_slice_sobel_over_the_eroded_mask(
    t2: np.ndarray, flair: np.ndarray, brain: np.ndarray
) -> None:
    """Against an independent computation: scipy's 2-D Sobel of each z slice alone, and a one-step erosion of
    each slice by the 7x7 square (= the 3x3 box applied three times)."""
    pred, ref, mask = flair[BLOCK], t2[BLOCK], brain[BLOCK]

    def magnitude(image: np.ndarray) -> np.ndarray:
        return np.hypot(ndimage.sobel(image, axis=0), ndimage.sobel(image, axis=1))

    sums, count = np.zeros(2), 0
    for z in range(ref.shape[0]):
        keep = ndimage.binary_erosion(mask[z], structure=np.ones((7, 7), dtype=bool))
        sums += [magnitude(pred[z])[keep].sum(), magnitude(ref[z])[keep].sum()]
        count += int(keep.sum())
    assert count > 0.4 * mask.size
    expected = sums[0] / sums[1]
    assert sharpness(pred, ref, mask) == pytest.approx(expected, rel=1e-9)
    assert abs(expected - 1.0) > 0.05  # another contrast: a test that can tell
    z = 12
    keep = ndimage.binary_erosion(mask[z], structure=np.ones((7, 7), dtype=bool))
    assert sharpness(pred[z], ref[z], mask[z]) == pytest.approx(
        magnitude(pred[z])[keep].mean() / magnitude(ref[z])[keep].mean(), rel=1e-9
    )
    # In-plane only: other slices replaced by noise leave a one-slice mask's value at exactly 1 (a 3-D Sobel
    # smooths across z and would see the noise).
    scrambled = np.random.default_rng(5).uniform(0.0, 1.0, ref.shape)
    scrambled[z] = ref[z]
    one_slice = np.zeros_like(mask)
    one_slice[z] = mask[z]
    assert sharpness(scrambled, ref, one_slice) == pytest.approx(1.0, abs=1e-12)


def test_sharpness_mask_erosion_and_nan(t2: np.ndarray, brain: np.ndarray) -> None:
    ref, mask = t2[BLOCK], brain[BLOCK]
    # Outside the mask nothing counts once the mask is eroded by 1 voxel or more (the Sobel stencil is 3x3);
    # without erosion the edge against a bright background does.
    bright_outside = np.where(mask, ref, 1.0)
    for erode in (1, 3):
        assert sharpness(bright_outside, ref, mask, erode=erode) == pytest.approx(1.0, abs=1e-12)
    assert sharpness(bright_outside, ref, mask, erode=0) > 1.05
    assert sharpness(bright_outside, ref) > 1.05  # no mask: the whole image
    # The erosion is by the 3x3 box, three times: a 7x7 square keeps its centre, a 6-wide strip or a
    # diamond of radius 3 (which a cross-shaped erosion would keep) vanishes: NaN, not a number.
    square = np.zeros_like(mask)
    square[5, 60:67, 60:67] = True
    assert math.isfinite(sharpness(ref * 0.5, ref, square))
    assert sharpness(ref * 0.5, ref, square) == pytest.approx(0.5, rel=1e-12)
    strip = np.zeros_like(mask)
    strip[:, 60:66, :] = True
    assert math.isnan(sharpness(ref, ref, strip))
    yy, xx = np.mgrid[: ref.shape[1], : ref.shape[2]]
    diamond = np.zeros_like(mask)
    diamond[5] = np.abs(yy - 63) + np.abs(xx - 63) <= 3
    assert math.isnan(sharpness(ref, ref, diamond))
    assert math.isnan(sharpness(ref, np.full_like(ref, 0.3), mask))  # a flat reference has no gradient
    with pytest.raises(ValueError, match="shape"):
        sharpness(ref[:-1], ref)
    with pytest.raises(ValueError, match="empty"):
        sharpness(ref, ref, np.zeros_like(mask))
    with pytest.raises(ValueError, match="erode"):
        sharpness(ref, ref, mask, erode=-1)
    with pytest.raises(ValueError, match="2-D"):
        sharpness(ref[0, 0], ref[0, 0])


def test_sharpness_in_image_scores_uses_the_eval_scale(t2: np.ndarray, brain: np.ndarray) -> None:
    """``phmdiff eval``'s path: the pair on the PSNR/SSIM scale, the mask as given. Each volume is scaled by
    its own percentile, so a dimmed prediction scores as the undimmed one; on raw values (``none``) the
    dimming would count."""
    ref, mask = t2[BLOCK] * 900.0, brain[BLOCK]
    blurred = ndimage.gaussian_filter(ref, (0, 1.0, 1.0))
    settings = EvalSettings(("psnr", "sharpness"))

    def score(pred: np.ndarray, norm: str) -> float:
        scaled = scale_pair(pred, ref, modality="t2w", norm=norm)
        value = image_scores(scaled, mask, settings)["sharpness"]
        assert value == pytest.approx(sharpness(scaled.pred, scaled.ref, mask), rel=1e-12)
        return value

    assert 0.6 < score(blurred, "percentile") < 0.9
    assert score(0.6 * blurred, "percentile") == pytest.approx(score(blurred, "percentile"), rel=1e-6)
    assert score(0.6 * blurred, "none") == pytest.approx(0.6 * score(blurred, "none"), rel=1e-9)
    assert score(ref.copy(), "percentile") == pytest.approx(1.0, abs=1e-6)


##################################################################################
#                     CT: the SynthRAD 2023 conventions                          #
##################################################################################


@pytest.fixture(scope="module")
def ct(data_dir: Path) -> np.ndarray:
    return read_volume(data_dir / "ct" / "totalsegmentator_example_ct_3mm.nii.gz").array


def test_auto_mask_is_the_filled_body(ct: np.ndarray) -> None:
    mask = auto_mask(ct, "ct")
    body = ct > -500
    assert (mask & ~body).sum() > 10_000  # lungs and bowel gas (< -500 HU) inside the body are filled in
    assert (body & ~mask).sum() < 0.05 * body.sum()  # only small outside parts (table, speckle) are dropped
    assert ct[mask].mean() > ct[body].mean() - 300


def test_synthrad_ct_conventions_on_a_perturbed_ct(ct: np.ndarray) -> None:
    """+50 HU inside the body: MAE 50 HU, PSNR ~ 20 log10(4024 / 50), SSIM as SynthRAD's code computes it."""
    mask = auto_mask(ct, "ct")
    pred = np.where(mask, ct + 50, ct)
    scaled = scale_pair(pred, ct, modality="ct", norm="window")
    scores = image_scores(scaled, mask, EvalSettings(("psnr", "ssim", "mae", "mse")))
    assert scores["mae"] == pytest.approx(50.0, abs=1e-9)
    assert scores["mse"] == pytest.approx(2500.0, abs=1e-6)
    # SynthRAD ImageMetrics.psnr(use_population_range=True): clip to [-1024, 3000], mask, data range 4024.
    clip_ref, clip_pred = np.clip(ct, -1024, 3000).astype(float), np.clip(pred, -1024, 3000).astype(float)
    expected_psnr = peak_signal_noise_ratio(clip_ref[mask], clip_pred[mask], data_range=4024)
    assert scores["psnr"] == pytest.approx(expected_psnr, abs=1e-4)
    assert scores["psnr"] == pytest.approx(20 * math.log10(4024 / 50), abs=0.05)
    # SynthRAD ImageMetrics.ssim: clip, outside the mask -> -1024, shift by +1024, uniform 7^3, masked mean.
    expected_ssim = _synthrad_ssim(clip_pred + 1024, clip_ref + 1024, mask, 0.0, {}, 3, 4024.0)
    assert scores["ssim"] == pytest.approx(expected_ssim, abs=1e-4)
    assert 0.95 < scores["ssim"] < 1.0


def test_ct_mae_is_unclipped_hu(ct: np.ndarray) -> None:
    """SynthRAD's MAE uses the HU as they are: a +500 HU error above the 3000 HU window still counts fully."""
    pred = np.where(ct > 1500, ct + 500, ct)
    scaled = scale_pair(pred, ct, modality="ct", norm="window")
    scores = image_scores(scaled, None, EvalSettings(("mae", "psnr")))
    assert scores["mae"] == pytest.approx(500.0 * (ct > 1500).mean(), rel=1e-9)
    clipped_error = np.abs(np.clip(pred, -1024, 3000) - np.clip(ct, -1024, 3000)).mean()
    assert clipped_error < scores["mae"]


def test_parse_metrics() -> None:
    assert parse_metrics("PSNR, ssim,ms_ssim,psnr") == ("psnr", "ssim", "ms-ssim")
    assert parse_metrics("Sharpness,psnr") == ("sharpness", "psnr")
    with pytest.raises(InputError, match="unknown metric.*foo") as error:
        parse_metrics("psnr,foo")
    assert "ssim2d" in (error.value.hint or "") and "sharpness" in (error.value.hint or "")
    with pytest.raises(InputError, match="mixed"):
        parse_metrics("psnr,dice")

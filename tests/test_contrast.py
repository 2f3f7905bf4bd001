"""Contrast calibration (phmdiff_cli.engine.contrast) on real brains: a power law applied to a real T2 is undone
exactly, order and background are kept, z-scored volumes are measured above their fill, and the shipped model's
default output is calibrated only where its card says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthesize_helpers import run

from phmdiff_cli.data.normalize import foreground_mask
from phmdiff_cli.engine.contrast import GAMMA_LIMITS, calibrate, calibrate_model_range, median_ratio, reference_ratio
from phmdiff_cli.engine.hub import DEFAULT_MODEL, SHIPPED_WEIGHTS
from phmdiff_cli.io import read_volume
from phmdiff_cli.metrics.evaluate import EvalSettings, auto_mask, image_scores, scale_pair

VAL = "TCGA-DU-7294"


@pytest.fixture(scope="module")
def t2(data_dir: Path) -> np.ndarray:
    real = read_volume(data_dir / "brats" / VAL / f"{VAL}-t2w.nii.gz").array.astype(np.float32)
    return np.clip(real, 0.0, None)  # a few interpolated voxels below 0: calibrate clips them too


def test_a_power_law_on_a_real_t2_is_undone(t2: np.ndarray) -> None:
    brain = foreground_mask(t2, "t2w")
    top = float(np.percentile(t2[brain], 99.5))
    flattened = top * (t2 / top) ** 0.5  # bulk too bright for its 99.5th percentile, as a regression's output
    assert median_ratio(flattened[brain]) > median_ratio(t2[brain]) + 0.1
    restored, gamma = calibrate(flattened, brain, median_ratio(t2[brain]))
    assert gamma == pytest.approx(2.0, rel=1e-3)
    np.testing.assert_allclose(restored, t2, rtol=1e-3, atol=1e-3 * top)


def test_calibration_keeps_order_background_and_top(t2: np.ndarray) -> None:
    brain = foreground_mask(t2, "t2w")
    out, gamma = calibrate(t2, brain, 0.2)
    assert 1.0 < gamma < GAMMA_LIMITS[1]
    assert median_ratio(out[brain]) == pytest.approx(0.2, abs=1e-3)
    assert np.percentile(out[brain], 99.5) == pytest.approx(np.percentile(t2[brain], 99.5), rel=1e-4)
    assert (out[t2 == 0] == 0).all() and (out >= 0).all()
    order = np.argsort(t2[brain], kind="stable")
    assert (np.diff(out[brain][order]) >= 0).all()
    assert calibrate(t2, np.zeros_like(brain), 0.2)[1] == 1.0  # nothing to measure: unchanged
    assert calibrate(t2, brain, 1e-9)[1] == GAMMA_LIMITS[1]  # far outside: the exponent is capped


def test_model_range_and_std_follow_the_power_law(t2: np.ndarray) -> None:
    brain = foreground_mask(t2, "t2w")
    unit = t2 / t2.max()
    mean, std, gamma = calibrate_model_range(unit * 2 - 1, np.full_like(unit, 0.01), brain, 0.2)
    expected, _ = calibrate(unit, brain, 0.2)
    np.testing.assert_allclose((mean + 1) / 2, expected, atol=1e-6)
    inside = brain & (unit > 0.05)  # the first-order std: 0.01 times the slope gamma * y / x
    np.testing.assert_allclose(std[inside], 0.01 * gamma * expected[inside] / unit[inside], rtol=1e-4)


def test_a_z_scored_flair_is_measured_above_its_fill(data_dir: Path) -> None:
    case = data_dir / "brats2013_t1c_flair" / "BraTS2013-pat0003"
    flair = read_volume(next(case.glob("*-t2f.nii.gz"))).array.astype(np.float32)
    fill = float(np.median(flair[0]))
    assert fill < 0  # z-scored: the background is a constant below 0
    ratio = reference_ratio([flair], "t2f")
    assert ratio == pytest.approx(reference_ratio([flair - fill], "t2f"), abs=1e-6)
    assert 0.2 < ratio < 0.8


@pytest.mark.slow
def test_the_default_model_calibrates_and_beats_the_oracle_histogram(data_dir: Path, tmp_path: Path) -> None:
    """The default model's whole-volume T2 of the held-out subject against the real T2 (``phmdiff eval``'s
    scores): with its card's contrast calibration (on by default) above the inverted T1 mapped onto the real T2's
    own histogram (a bar a user cannot reach: it needs the answer's histogram) on PSNR and SSIM, and above its
    output uncalibrated on PSNR."""
    subject = data_dir / "brats" / VAL
    card = json.loads((SHIPPED_WEIGHTS / DEFAULT_MODEL / "config.json").read_text())
    assert card["model"]["sampling"]["contrast"] and set(card["contrast"]) >= {"t2w", "t2f"}
    real = read_volume(subject / f"{VAL}-t2w.nii.gz").array.astype(np.float32)
    mask = auto_mask(real, "t2w")

    def scores(pred: np.ndarray) -> dict[str, float]:
        scaled = scale_pair(pred, real, modality="t2w", norm="percentile")
        return image_scores(scaled, mask, EvalSettings(metrics=("psnr", "ssim")))

    outputs = {}
    for flag in ("--contrast", "--no-contrast"):
        out = tmp_path / f"{flag}.nii.gz"
        result = run("--src", subject / f"{VAL}-t1n.nii.gz", "--target", "t2w", "-o", out, flag, "--json")
        assert result.exit_code == 0, result.output
        gamma = json.loads(result.stdout)["cases"][0]["contrast_gamma"]
        assert (gamma is not None and gamma > 1.0) if flag == "--contrast" else gamma is None
        outputs[flag] = scores(read_volume(out).array.astype(np.float32))
    t1 = read_volume(subject / f"{VAL}-t1n.nii.gz").array.astype(np.float32)
    brain = foreground_mask(t1, "t1n")
    oracle = np.zeros_like(real)
    ranks = np.argsort(np.argsort(-t1[brain])) / (brain.sum() - 1)
    values = np.sort(real[foreground_mask(real, "t2w")])
    oracle[brain] = np.interp(ranks, np.linspace(0.0, 1.0, values.size), values)
    bar = scores(oracle)
    assert outputs["--contrast"]["psnr"] > bar["psnr"] + 1.0, (outputs, bar)
    assert outputs["--contrast"]["ssim"] > bar["ssim"], (outputs, bar)
    assert outputs["--contrast"]["psnr"] > outputs["--no-contrast"]["psnr"] + 0.5, outputs

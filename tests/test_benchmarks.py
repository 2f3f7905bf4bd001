"""The benchmark scripts' own bookkeeping: what `benchmarks/quality.py` samples and reports for a trained model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from phmdiff_cli.engine.hub import DEFAULT_MODEL, SHIPPED_WEIGHTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402  (a script folder, not a package)


class _Volume:
    """A stand-in for a validation SliceDataset: one T1 -> T2 item, a subject of ``depth`` empty slices."""

    def __init__(self, depth: int) -> None:
        self.items = [(0, quality.Pair(("t1n",), "t2w"))]
        self.subjects = [argparse.Namespace(depth=depth)]
        self.source_norm = "rank"  # the protocol's, as the models here were trained

    def array(self, subject: int, modality: str) -> np.ndarray:
        return np.full((self.subjects[subject].depth, 8, 8), -1.0, dtype=np.float32)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        return {"source": torch.zeros(3, 3, 8, 8), "src_mod": torch.zeros(3), "tgt_mod": torch.zeros(())}


def test_quality_samples_with_the_sampler_steps_and_reports_the_total_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[object, ...]] = []

    def fake_sample(model: object, source: torch.Tensor, *args: object, steps: list[int], **kw: object) -> tuple:
        calls.append((steps, kw.get("mirror"), kw.get("mirror_shift")))
        return (torch.zeros(source.shape[0], 1, *source.shape[-2:]),)

    monkeypatch.setattr(quality, "sample", fake_sample)
    args = argparse.Namespace(steps=None, seed=0, eval_batch=4, dtype=None, val_subjects=["TCGA-DU-7294"],
                              contrast="model", source_detail="model", mirror="model", mirror_shift=None)
    fine_tuned = SHIPPED_WEIGHTS / "brain-small"  # trained with --init: its card counts both runs
    method = quality.phmdiff_method("shipped", fine_tuned, args, None)
    volume = method.predict(_Volume(depth=10), 0)  # type: ignore[arg-type]
    assert volume.shape == (10, 8, 8)
    card = quality.load_pretrained(fine_tuned)
    training = card.card["training"]
    # batches of 4, 4, 2; the card's schedule, unmirrored as its card says
    assert calls == [(list(card.config.sampling.steps), False, card.config.sampling.mirror_shift)] * 3
    assert method.evals == sum(card.config.sampling.steps)  # Euler: one evaluation per step
    mirrored = quality.phmdiff_method("shipped", fine_tuned, argparse.Namespace(**{**vars(args), "mirror": "on",
                                                                                   "mirror_shift": 5}), None)
    mirrored.predict(_Volume(depth=2), 0)  # type: ignore[arg-type]
    assert calls[-1][1:] == (True, 5) and mirrored.evals == 2 * method.evals
    assert mirrored.settings["mirror_shift"] == 5 and method.settings["mirror_shift"] is None
    assert method.steps == training["steps"] + training["init"]["steps"]  # the fine-tune and its initial model
    assert method.budget_min == round((training["elapsed_s"] + training["init"]["elapsed_s"]) / 60, 1)
    assert method.pairs == quality.EVAL_PAIRS  # the shipped model serves both evaluated pairs


class _Subject(_Volume):
    """A validation subject with a T1 whose foreground is a gradient of 0.1-1 (model range) over 8x8 slices."""

    def __init__(self, depth: int) -> None:
        super().__init__(depth)
        self.t1 = np.broadcast_to(np.linspace(-0.8, 1.0, 64, dtype=np.float32).reshape(8, 8), (depth, 8, 8))

    def array(self, subject: int, modality: str) -> np.ndarray:
        return self.t1


def test_quality_calibrates_the_default_models_contrast_as_synthesize_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model's card turns the contrast calibration on: quality.py's volumes then have the card's
    median-to-99.5th-percentile ratio inside the sources' foreground; ``--contrast off`` leaves them as sampled."""

    def fake_sample(model: object, source: torch.Tensor, *args: object, **kw: object) -> tuple:
        return (torch.linspace(-0.9, 1.0, 64).reshape(1, 1, 8, 8).expand(source.shape[0], 1, 8, 8),)

    monkeypatch.setattr(quality, "sample", fake_sample)
    card = quality.load_pretrained(SHIPPED_WEIGHTS / DEFAULT_MODEL).card
    volumes = {}
    for mode in ("model", "off"):
        args = argparse.Namespace(steps=None, seed=0, eval_batch=4, dtype=None, val_subjects=["TCGA-DU-7294"],
                                  contrast=mode, source_detail="model", mirror="model", mirror_shift=None)
        method = quality.phmdiff_method("shipped", SHIPPED_WEIGHTS / DEFAULT_MODEL, args, None)
        assert method.settings.get("contrast", False) == (mode == "model")
        assert method.settings["source_detail"] is card["model"]["sampling"]["source_detail"] is True
        assert method.settings["mirror"] is card["model"]["sampling"]["mirror"] is True
        volumes[mode] = (method.predict(_Subject(depth=6), 0) + 1) / 2  # type: ignore[arg-type]
    raw, calibrated = volumes["off"].ravel(), volumes["model"].ravel()
    ratio = np.median(calibrated) / np.percentile(calibrated, 99.5)
    assert ratio == pytest.approx(card["contrast"]["t2w"], abs=1e-3)
    assert abs(np.median(raw) / np.percentile(raw, 99.5) - ratio) > 0.1


def test_quality_trains_phmdiff_runs_on_the_evaluated_pairs_like_the_baselines(tmp_path: Path) -> None:
    """Every PHMDiff run gets the protocol's data and validation subjects but only the evaluated pairs (the
    baselines' pairs: an equal budget spent on the same task), plus its own model overrides; the config is one
    ``phmdiff train`` accepts."""
    from phmdiff_cli.engine.settings import build_model_config, load_settings

    args = argparse.Namespace(work=tmp_path, cache_dir=tmp_path / "cache", minutes=30.0, batch={},
                              lr=quality.DEFAULT_LR, warmup=20, seed=0, precision="bf16")
    command = quality.train_command("anchor-l1-ssim", args)
    assert command[command.index("--precision") + 1] == "bf16"  # every run trains in the precision asked for
    config = tmp_path / "anchor-l1-ssim.json"
    assert command[command.index("--config") + 1] == str(config)
    settings = load_settings(config, {})
    protocol = json.loads(quality.PROTOCOL.read_text())
    assert settings.pairs == quality.EVAL_PAIRS and settings.val_subjects == protocol["val_subjects"]
    model = build_model_config(settings, sources=1)
    assert (model.diffusion.anchor_l1, model.diffusion.anchor_ssim) == (1.0, 1.0)
    quality.train_command("phmdiff", args)
    assert build_model_config(load_settings(tmp_path / "phmdiff.json", {}), sources=1).diffusion.anchor_l1 == 0
    # the runs on top of lr-5e-4: their learning rate, levels and own-cascade training reach the trainer
    command = quality.train_command("two-level-own-coarse", args)
    assert command[command.index("--lr") + 1] == "0.0005"
    assert command[command.index("--levels") + 1] == "2"
    settings = load_settings(tmp_path / "two-level-own-coarse.json", {})
    assert build_model_config(settings, sources=1).diffusion.own_coarse == 1.0
    quality.train_command("own-start", args)
    own_start = build_model_config(load_settings(tmp_path / "own-start.json", {}), sources=1).diffusion
    assert (own_start.p_sigma_max, own_start.own_start, own_start.second_sigma) == (1.0, 0.5, 0.5)
    # brain-sharp's design with the sources' darkest foreground apart from the background
    command = quality.train_command("regression-foreground-rank", args)
    assert command[command.index("--source-norm") + 1] == "foreground-rank"
    assert command[command.index("--levels") + 1] == "1" and command[command.index("--lr") + 1] == "0.0005"
    assert load_settings(tmp_path / "regression-foreground-rank.json", {}).model["diffusion"]["p_sigma_max"] == 1.0
    # the unmasked design's runs: no token masked, each with its own change on top
    for name in ("regression-no-masking", "regression-no-masking-conv-head", "regression-no-masking-deep-head"):
        command = quality.train_command(name, args)
        assert command[command.index("--mask-ratio") + 1] == "0" and command[command.index("--lr") + 1] == "0.0005"
    one_level = {"levels": 1}  # as their --levels flag says
    deep = build_model_config(load_settings(tmp_path / "regression-no-masking-deep-head.json", one_level), sources=1)
    conv = build_model_config(load_settings(tmp_path / "regression-no-masking-conv-head.json", one_level), sources=1)
    assert (deep.refine_depth, conv.refine_depth, deep.diffusion.p_sigma_max) == (4, 0, 1.0)

def test_cascade_error_columns_measure_against_the_right_references() -> None:
    """Each level against the target at its own resolution; ``truth up`` is the real coarse target upsampled,
    so a constant target gives it exactly 0 while an untrained model's samples are off."""
    import cascade_error

    from phmdiff_cli.config import model_config
    from phmdiff_cli.models import PHMDiff

    target = torch.full((1, 1, 240, 240), 0.5)
    assert cascade_error.foreground_rmse(target + 0.1, target) == pytest.approx(0.1, abs=1e-5)
    torch.manual_seed(0)
    cfg = model_config("tiny")
    batch = {"source": torch.rand(2, cfg.max_sources, 3, 64, 64) * 2 - 1,
             "src_mod": torch.tensor([[1, 0, 0], [1, 0, 0]]), "tgt_mod": torch.tensor([3, 3]),
             "target": torch.full((2, 1, 64, 64), 0.5)}
    row = cascade_error.cascade_errors(PHMDiff(cfg).eval(), batch, seed=0)
    assert list(row) == ["l0", "l1", "l2", "coarser up", "oracle fine", "truth up"]
    assert row["truth up"] == pytest.approx(0, abs=1e-6)
    assert all(row[k] > 0.05 for k in ("l0", "l1", "l2", "oracle fine"))


def test_hist_matched_baseline_maps_the_source_onto_the_real_target_histogram(
    brats_dir: Path, tmp_path: Path
) -> None:
    import baselines  # noqa: E402  (a script folder, not a package)

    from phmdiff_cli.data.grid import ModelGrid
    from phmdiff_cli.data.layouts import discover
    from phmdiff_cli.data.slices import SliceDataset, parse_pairs

    subject = discover(brats_dir).subject("TCGA-DU-7294")
    pairs = parse_pairs("t1n:t2w,t1c:t2f,t2w:t1n,t1n+t2w:t1c")
    dataset = SliceDataset([subject], pairs, ModelGrid(240, 1.0), tmp_path)  # BraTS: exact
    for item, (_, pair) in enumerate(dataset.items):
        pred = baselines.hist_matched(dataset, item)
        real = dataset.array(0, pair.target).astype("float32")
        inside = pred > -1
        assert inside.mean() > 0.1
        # the foreground values are the real target's, quantile for quantile
        quantiles = np.linspace(0.05, 0.95, 7)
        ref = real[baselines._foreground(real, pair.target)]
        assert np.allclose(np.quantile(pred[inside], quantiles), np.quantile(ref, quantiles), atol=0.03)
        # T1 <-> T2 is inverted (CSF bright in one, dark in the other), so each output correlates positively
        # with the real target inside the brain
        both = inside & (real > -1)
        assert np.corrcoef(pred[both], real[both])[0, 1] > 0.3, pair
    # of T1 and T2, the T1 is the source of a T1c: the same voxels' ranks as the T1's, not the T2's
    t1, t2 = (dataset.array(0, m).astype("float32") for m in ("t1n", "t2w"))
    both = (t1 > -1) & (t2 > -1)
    t1c_from_two = baselines.hist_matched(dataset, 3)[both]
    assert np.corrcoef(t1c_from_two, t1[both])[0, 1] > np.corrcoef(t1c_from_two, -t2[both])[0, 1]
    # the UNets' input: the source stack in its pair's group of channels (item 1 is t1c:t2f), the other zero
    sample = dataset[(1, 70, 0)]
    stacked = baselines.stack({k: v[None] for k, v in sample.items()}, pairs)
    assert stacked.shape == (1, len(pairs) * 3, 240, 240)
    assert not stacked[0, :3].any() and not stacked[0, 6:].any()
    assert torch.equal(stacked[0, 3:6], sample["source"][0])


def test_best_source_picks_the_most_rank_correlated_source_and_its_sign() -> None:
    import baselines

    rng = np.random.default_rng(0)
    real = rng.normal(size=(4, 8, 8)).astype("float32")
    mask = np.ones(real.shape, dtype=bool)
    weak = real + rng.normal(scale=2.0, size=real.shape)
    sources = {"weak": weak, "inverse": np.exp(-real) + 0.1 * rng.normal(size=real.shape)}
    assert baselines.best_source(sources, real, mask) == ("inverse", -1.0)
    assert baselines.best_source({"weak": weak}, real, mask) == ("weak", 1.0)
    matched = baselines.match_quantiles(-sources["inverse"].ravel(), real)
    assert np.array_equal(np.sort(matched), np.sort(real, axis=None))  # the reference's histogram exactly
    assert np.corrcoef(matched, real.ravel())[0, 1] > 0.9


def test_clinical_inputs_scores_and_histogram_baseline_on_a_real_block() -> None:
    import clinical_inputs

    from phmdiff_cli.io import read_volume

    t1 = read_volume(Path(__file__).resolve().parents[1] / "examples" / "TCGA-DU-7294-t1n.nii.gz")
    block = t1.array[60:76, 60:180, 50:190].astype(np.float32)
    mask = block > 0
    # the quantile map puts exactly the reference's values inside the mask, in the (inverted) source's order
    reference = np.sqrt(block)
    matched = clinical_inputs.hist_matched(block, reference, mask, invert=True)
    np.testing.assert_allclose(np.sort(matched[mask]), np.sort(reference[mask]), rtol=1e-6)
    assert np.corrcoef(matched[mask], block[mask])[0, 1] < -0.9 and np.all(matched[~mask] == 0)
    same = clinical_inputs.scores(block, block, mask)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr"] == float("inf")
    assert clinical_inputs.scores(block * 2.0, block, mask)["ssim"] == pytest.approx(1.0)  # each on its own scale


def test_clinical_brain_mask_is_the_same_in_every_run() -> None:
    """The registered template mask of a raw head is drawn from seeded samples: two runs give the same voxels (an
    unseeded draw moved the baseline of the clinical-inputs table between runs), a brain-sized volume."""
    import clinical_inputs
    import SimpleITK as sitk

    t1 = sitk.ReadImage(str(clinical_inputs.DATA / "clinical_raw" / "OMS-raw-p04-study1" / "T1W.nii.gz"))
    first, second = (sitk.GetArrayFromImage(clinical_inputs.brain_mask(t1)) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert 1000 < first.sum() * np.prod(t1.GetSpacing()) / 1000 < 1700  # mL


def test_quality_scores_other_pairs_only_without_training(tmp_path: Path) -> None:
    """``--pairs`` replaces the evaluated pairs for methods that need no training on them: a shipped model or the
    histogram baseline; a trained method would be trained on the default pairs, so it is refused."""
    common = ["--pairs", "t1c:t2w", "--work", str(tmp_path)]
    assert quality.parse_args([*common, "--only", "hist-matched"]).only == ["hist-matched"]
    assert quality.parse_args([*common, "--only", "", "--shipped", "weights/brain-sharp"]).only == []
    for refused in (["--only", "hist-matched,regression-unet"], ["--only", ""]):
        with pytest.raises(SystemExit):
            quality.parse_args([*common, *refused])


def test_quality_scores_only_the_subjects_asked_for(brats_dir: Path, tmp_path: Path) -> None:
    """``--subjects`` limits the scored validation subjects (a model trained on the others is scored on the rest)
    and refuses a subject that is not one of the protocol's."""
    import baselines  # noqa: E402  (a script folder, not a package)

    from phmdiff_cli.data.grid import ModelGrid
    from phmdiff_cli.data.layouts import discover
    from phmdiff_cli.data.slices import SliceDataset, parse_pairs

    assert quality.parse_args(["--only", "hist-matched", "--subjects", "TCGA-DU-7294"]).val_subjects == [
        "TCGA-DU-7294"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--only", "hist-matched", "--subjects", "BraTS-GLI-00001-000"])  # a training subject
    found = discover(brats_dir)
    pairs = parse_pairs("t1n:t2w")
    subjects = [found.subject(s) for s in ("BraTS-MET-00110-000", "TCGA-DU-7294")]
    dataset = SliceDataset(subjects, pairs, ModelGrid(240, 1.0), tmp_path)
    method = quality.Method("hist-matched", baselines.hist_matched, "t1n:t2w", None, None, 0, 0)
    slices = quality.Slices(dataset, dataset, pairs, {})
    assert {pair: set(rows) for pair, rows in quality.score(method, slices, ["TCGA-DU-7294"]).items()} == {
        str(pairs[0]): {"TCGA-DU-7294", "mean"}}


def test_quality_gives_each_model_its_sources_normalised_as_it_was_trained(brats_dir: Path, tmp_path: Path) -> None:
    """The validation slices are built once, with ranks from -1 (the protocol's); a model trained on
    foreground ranks gets the same slices with its own, the darkest foreground at -0.5 apart from the background."""
    from phmdiff_cli.data.grid import ModelGrid
    from phmdiff_cli.data.layouts import discover
    from phmdiff_cli.data.slices import SliceDataset, parse_pairs

    dataset = SliceDataset([discover(brats_dir).subject("TCGA-DU-7294")], parse_pairs("t1n:t2w"), ModelGrid(240, 1.0),
                           tmp_path, source_norm="rank")
    seen: list[np.ndarray] = []

    def predict_volume(view: SliceDataset, item: int) -> np.ndarray:
        seen.append(view.source_array(0, "t1n").astype(np.float32))
        return seen[-1]

    quality.seeing(predict_volume, "foreground-rank")(dataset, 0)
    quality.seeing(predict_volume, "rank")(dataset, 0)
    ranks, foreground = dataset.source_array(0, "t1n").astype(np.float32), seen[0] > -1
    assert dataset.source_norm == "rank" and ranks[foreground].min() < -0.99
    assert np.isclose(seen[0][foreground].min(), -0.5, atol=0.01) and np.all(ranks[~foreground] == -1)
    np.testing.assert_array_equal(seen[1], ranks)
    assert quality.seen_as(dataset, "rank") is dataset  # cascade_error.py's view: a copy only where it differs


def test_ventricle_dark_fraction_tells_t2_contrast_from_t1_contrast(brats_dir: Path) -> None:
    """On a real subject the real T2 renders none of its CSF dark, the T1 (whose CSF is dark) nearly all of it, and
    the histogram-inverted T1 little."""
    import ventricle_patches  # noqa: E402  (a script folder, not a package)

    folder = brats_dir / "TCGA-DU-7294"
    t1 = ventricle_patches.volume(folder / "TCGA-DU-7294-t1n.nii.gz")
    t2 = ventricle_patches.volume(folder / "TCGA-DU-7294-t2w.nii.gz")
    assert ventricle_patches.dark_fraction(t1, t2, t2) == (0.0, pytest.approx(42929, rel=0.01))
    assert ventricle_patches.dark_fraction(t1, t2, t1)[0] > 0.95
    assert ventricle_patches.dark_fraction(t1, t2, np.where(t1 > 0, t1.max() - t1, 0))[0] < 0.05


def test_error_regions_split_the_mask_and_share_the_error(brats_dir: Path) -> None:
    """The three regions partition the real T2's mask; an error spread evenly over the mask is shared by voxel
    count and shows as each region's bias; an error only at the edge is all the edge's."""
    import error_regions  # noqa: E402  (a script folder, not a package)

    from phmdiff_cli.io import read_volume
    from phmdiff_cli.metrics.evaluate import auto_mask, scale_pair

    real_file = read_volume(brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-t2w.nii.gz").array.astype(np.float64)
    mask = auto_mask(real_file, "t2w")
    real = np.where(mask, scale_pair(real_file, real_file, modality="t2w", norm="percentile").ref, 0.0)
    parts, depth = error_regions.regions(real, mask)
    assert sum(p.astype(int) for p in parts.values()).max() == 1 and np.array_equal(np.any(list(parts.values()), 0),
                                                                                     mask)
    assert depth[parts["edge"]].max() <= error_regions.EDGE_VOXELS < depth[parts["rest"]].min()
    even = error_regions.region_scores(np.where(mask, real + 0.1, 0.0), real, parts, mask)
    for found in even.values():
        assert found["squared_error"] == pytest.approx(found["voxels"], abs=1e-3) and found["bias"] == 0.1
    edge_only = error_regions.region_scores(np.where(parts["edge"], real + 0.1, real), real, parts, mask)
    assert edge_only["edge"]["squared_error"] == 1.0 and edge_only["rest"]["squared_error"] == 0.0
    assert edge_only["rest"]["ssim"] > edge_only["edge"]["ssim"]  # the rest's windows near the edge see it too


def test_finished_regression_unet_scores_the_same_network_mirrored_and_finished(
    brats_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``regression-unet-finished`` scores the network ``regression-unet`` trained (not a second one), each
    slice averaged with its left-right mirror (so a mirrored slice gives the mirrored output) and finished as
    ``phmdiff synthesize`` finishes: background where the source has no signal."""
    import baselines  # noqa: E402  (a script folder, not a package)
    from monai.networks.nets import BasicUNet
    from scipy.ndimage import binary_dilation

    from phmdiff_cli.data.grid import ModelGrid
    from phmdiff_cli.data.layouts import discover
    from phmdiff_cli.data.slices import SliceDataset, parse_pairs
    from phmdiff_cli.engine.source_support import SUPPORT_MARGIN

    pairs = parse_pairs("t1n:t2w")
    dataset = SliceDataset([discover(brats_dir).subject("TCGA-DU-7294")], pairs, ModelGrid(240, 1.0), tmp_path)
    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=(4, 4, 4, 4, 4, 4)).eval()
    monkeypatch.setattr(quality, "TRAINED", {"regression-unet": baselines.Trained(net, 7, 1.0)})
    args = argparse.Namespace(batch={}, lr=quality.DEFAULT_LR, eval_batch=40, dtype=None, minutes=30.0)
    slices = quality.Slices(dataset, dataset, pairs, {"t2w": 0.28})
    raw, finished = (quality.train_baseline(n, slices, args) for n in ("regression-unet", "regression-unet-finished"))
    assert raw.steps == finished.steps == 7 and (raw.evals, finished.evals) == (1, 2)

    sample = {k: v[None] for k, v in dataset[(0, 70, 0)].items()}
    mirrored = {**sample, "source": sample["source"].flip(-1)}
    predict = baselines.regression_predict(net, pairs, mirror=True)
    with torch.no_grad():
        torch.testing.assert_close(predict(mirrored), predict(sample).flip(-1))
        assert not torch.allclose(baselines.regression_predict(net, pairs)(mirrored).flip(-1),
                                  baselines.regression_predict(net, pairs)(sample))
    volume, source = finished.predict(dataset, 0), dataset.array(0, "t1n").astype(np.float32)
    # outside the source's foreground and the margin phmdiff synthesize keeps around it (but for a few voxels of
    # enclosed holes, which it fills): background, where the bare network paints it
    outside = ~binary_dilation(quality.source_foreground([source], ("t1n",)), iterations=SUPPORT_MARGIN)
    assert volume.shape == source.shape and outside.mean() > 0.5
    assert np.mean(volume[outside] == -1) > 0.999 and np.mean(raw.predict(dataset, 0)[outside] == -1) < 0.5

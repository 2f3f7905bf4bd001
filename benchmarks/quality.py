"""Quality at an equal CPU training budget: PHMDiff, its ablations and baselines, per validation subject.

The protocol (``weights/brain_data.json``): train on ``../shared/data``'s brats/, ms_mni/ and
brats2013_t1c_flair/ (three sources, three grids; subjects lacking a modality serve the pairs they have),
validate on four subjects from three sources (TCGA-DU-7294, OMS-MNI-p19, BraTS2013-pat0001 and -pat0002),
never trained on. Every trained method gets the same wall-clock minutes B on this CPU (``--precision auto``)
from the same preprocessed, augmented 2.5D slices (``phmdiff train``'s cache and :class:`SliceDataset`).

Each method synthesizes the *whole* volume of every validation subject for each evaluated pair it can
(t1n -> t2w on the subjects with a T1 and T2, t1c -> t2f on all four) on the model grid, scored with
``phmdiff eval``'s defaults: each volume / its foreground 99.5th percentile, the reference's automatic
foreground mask, PSNR (dB), 3-D SSIM (7-voxel window) and sharpness (mean in-plane Sobel gradient magnitude,
prediction over reference, 1 = as sharp). The table gives every subject and the mean over subjects.

Methods (``--only`` picks some):

- ``phmdiff``: PHMDiff ``small`` trained by ``phmdiff train`` on the evaluated pairs (as the baselines),
  budget B; ablations, each with one part removed: ``no-pyramid`` (one 240 px level, 16 px patches),
  ``no-masking`` (mask ratio 0), ``no-cgr`` (the three CGR weights 0), ``no-rank`` (percentile-scaled sources
  instead of their ranks),
  ``no-sigma-max`` (log-normal training noise only), ``no-unet-head`` (the three-convolution refinement head
  instead of the UNet head), ``coarse-noise-0.1`` (finer levels trained on coarse conditions noised by at most
  0.1 instead of 0.5), ``plain-dit`` (no masking and no pyramid); candidates, each with one change:
  ``foreground-rank`` (sources' darkest foreground at rank -0.5, apart from the background's -1),
  ``refine-sigma-1`` (the finer levels sample from the coarser sample noised to sigma 1, SDEdit, and train on
  noise levels up to 1), ``anchor-l1-ssim`` (L1 and 1 - SSIM of the decisive sigma_max prediction beside its
  EDM loss, weights 1 and 1), ``lr-5e-4`` (AdamW at the regression UNet's 5e-4 instead of 2e-4); on top of
  ``lr-5e-4``: ``own-coarse`` (the finer levels trained on the model's own cascade, as sampling gives it,
  instead of the noise-augmented real coarse target), ``two-level-own-coarse`` (the same with two levels, 120
  and 240 px); a diagnostic: ``no-pyramid-regression`` (one level trained only at sigma_max: the denoiser as a
  pure regressor, LR 5e-4; score it with ``--steps 1``) and ``regression-l1-ssim`` (the same with the L1 and
  1 - SSIM terms of ``anchor-l1-ssim``); ``own-start`` (one level: half the samples that regression at sigma_max,
  half noised around the model's own first evaluation to sigma <= 0.5, where the sampler's second evaluation
  sits, ``second_sigma`` 0.5); ``regression-foreground-rank`` (``no-pyramid-regression``, brain-sharp's design, with
  the sources' darkest foreground at rank -0.5: measured against ``no-pyramid-regression``);
  ``regression-wide-head`` (``no-pyramid-regression`` with the full-resolution UNet head 32 channels wide instead
  of 16: more capacity where the 16-pixel tokens carry no detail; measured against ``no-pyramid-regression``);
  ``regression-no-masking`` (that design with no tokens masked), and on top of it ``regression-no-masking-l1``
  (an L1 term on the prediction beside the EDM loss, weight 1: the regression UNet's loss) and two ablations,
  ``regression-no-masking-conv-head`` (the three-convolution refinement head instead of the UNet head) and
  ``regression-no-masking-percentile`` (percentile-scaled sources instead of their ranks);
  ``regression-no-masking-deep-head`` (the UNet head going down 4 times instead of 2, widths 16 to 256 like the
  regression UNet's: its receptive field, at little cost, since the added stages work at 30 and 15 px).
- baselines: ``regression-unet`` (MONAI BasicUNet, L1, one forward pass) and ``monai-ddim`` (MONAI
  DiffusionModelUNet, DDPM training, DDIM sampling), both on the evaluated pairs for B, told the pair by
  the group of input channels the source fills; ``regression-unet-finished``: the same trained UNet (trained
  once when both are asked for) finished as ``phmdiff synthesize`` finishes brain-sharp's output: each slice
  averaged with its left-right mirror, the sources' detail added, the contrast calibrated to the training
  targets' ratios; ``hist-matched`` (no training, any ``--pairs``): the source
  inside its foreground, inverted where it is rank-anticorrelated with the real target (T1 -> T2), mapped by
  quantiles onto the *real* target's foreground histogram of the same subject; of several sources the most
  rank-correlated one (oracle choices a user cannot make: a strong bar).
- ``--shipped PATH`` adds an already-trained model, with its own budget.

PHMDiff models sample with their config's default steps (``--steps`` overrides) from ``last/``; as ``phmdiff
synthesize`` does, the output is background where no source has signal and an MRI volume's contrast is calibrated
where their config says so (``--contrast`` overrides), after the sources' detail where their config adds it
(``--source-detail`` overrides), each slice averaged with its left-right mirror where their config says so
(``--mirror`` overrides; the mirrored view rolled by ``--mirror-shift`` pixels, the model's by default).
Networks run
under ``--precision auto``'s autocast, as ``phmdiff synthesize`` does. Single seed, one run each.

    pip install -e ".[bench]"     # monai-ddim's MONAI DiffusionModelUNet imports einops
    python benchmarks/quality.py --only hist-matched,regression-unet --minutes 30 --shipped weights/brain-small
    python benchmarks/quality.py --only phmdiff --minutes 30 --update     # one more row, the others kept
    python benchmarks/quality.py --only hist-matched --pairs t1c:t2w,t2f:t2w --out hist.json   # other pairs' bar
    python benchmarks/quality.py --only '' --shipped weights/brain-sharp --pairs t1n:t2f,t2w:t2f --contrast off
    python benchmarks/quality.py --only '' --shipped runs/brain-sharp-all/last --subjects TCGA-DU-7294  # the unseen one
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import baselines
import numpy as np
import torch
from baselines import Batch, Predict
from engine_speed import ROOT, machine

from phmdiff_cli.cli.common import parse_steps
from phmdiff_cli.data.slices import Pair, SliceDataset, parse_pairs
from phmdiff_cli.diffusion import sample
from phmdiff_cli.engine.contrast import calibrate_model_range
from phmdiff_cli.engine.device import autocast, resolve_precision
from phmdiff_cli.engine.pretrained import load_pretrained
from phmdiff_cli.engine.settings import load_settings
from phmdiff_cli.engine.source_detail import add_source_detail
from phmdiff_cli.engine.source_support import confine, source_foreground
from phmdiff_cli.engine.train_data import load_data, slice_dataset, training_contrast
from phmdiff_cli.engine.trainer import run_model_config
from phmdiff_cli.engine.validation import item_scores

#: The data, training pairs and validation subjects of the brain models (``phmdiff train --config``).
PROTOCOL = ROOT / "weights" / "brain_data.json"
#: The pairs scored: T1 -> T2 where a subject has both, T1c -> FLAIR on every validation subject.
EVAL_PAIRS = "t1n:t2w,t1c:t2f"
#: ``phmdiff eval`` defaults, and sharpness.
METRICS = {"psnr": "psnr", "ssim": "ssim", "sharpness": "sharpness"}
#: PHMDiff runs of ``phmdiff train`` on the evaluated pairs (EVAL_PAIRS): extra flags.
RUNS: dict[str, list[str]] = {
    "phmdiff": [],
    "no-pyramid": ["--levels", "1"],
    "no-masking": ["--mask-ratio", "0"],
    "no-cgr": ["--cgr-pixel", "0", "--cgr-structure", "0", "--cgr-feature", "0"],
    "no-rank": ["--source-norm", "percentile"],
    "no-sigma-max": ["--config", "{work}/no-sigma-max.json"],
    "no-unet-head": ["--config", "{work}/no-unet-head.json"],
    "coarse-noise-0.1": ["--config", "{work}/coarse-noise-0.1.json"],
    "plain-dit": ["--levels", "1", "--mask-ratio", "0"],
    "foreground-rank": ["--source-norm", "foreground-rank"],
    "refine-sigma-1": ["--config", "{work}/refine-sigma-1.json"],
    "anchor-l1-ssim": ["--config", "{work}/anchor-l1-ssim.json"],
    "lr-5e-4": [],
    "own-coarse": ["--config", "{work}/own-coarse.json"],
    "two-level-own-coarse": ["--levels", "2", "--config", "{work}/two-level-own-coarse.json"],
    "no-pyramid-regression": ["--levels", "1", "--config", "{work}/no-pyramid-regression.json"],
    "regression-l1-ssim": ["--levels", "1", "--config", "{work}/regression-l1-ssim.json"],
    "own-start": ["--levels", "1", "--config", "{work}/own-start.json"],
    "regression-foreground-rank": ["--levels", "1", "--source-norm", "foreground-rank",
                                   "--config", "{work}/regression-foreground-rank.json"],
    "regression-wide-head": ["--levels", "1", "--config", "{work}/regression-wide-head.json"],
    "regression-no-masking": ["--levels", "1", "--mask-ratio", "0", "--config", "{work}/regression-no-masking.json"],
    "regression-no-masking-l1": ["--levels", "1", "--mask-ratio", "0",
                                 "--config", "{work}/regression-no-masking-l1.json"],
    "regression-no-masking-conv-head": ["--levels", "1", "--mask-ratio", "0",
                                        "--config", "{work}/regression-no-masking-conv-head.json"],
    "regression-no-masking-percentile": ["--levels", "1", "--mask-ratio", "0", "--source-norm", "percentile",
                                         "--config", "{work}/regression-no-masking-percentile.json"],
    "regression-no-masking-deep-head": ["--levels", "1", "--mask-ratio", "0",
                                        "--config", "{work}/regression-no-masking-deep-head.json"],
}
#: The model-config overrides (``phmdiff train --config``) that the ``{work}/NAME.json`` flags above name; the
#: protocol's data and validation subjects, and the evaluated pairs, are added to each.
CONFIGS: dict[str, dict[str, Any]] = {
    "no-sigma-max": {"model": {"diffusion": {"p_sigma_max": 0.0}}},
    "no-unet-head": {"model": {"refine_depth": 0, "refine_channels": 32}},
    "coarse-noise-0.1": {"model": {"diffusion": {"coarse_noise": 0.1}}},
    "refine-sigma-1": {"model": {"diffusion": {"refine_sigma": 1.0}}},
    "anchor-l1-ssim": {"model": {"diffusion": {"anchor_l1": 1.0, "anchor_ssim": 1.0}}},
    "own-coarse": {"model": {"diffusion": {"own_coarse": 1.0}}},
    "two-level-own-coarse": {"model": {"diffusion": {"own_coarse": 1.0}}},
    "no-pyramid-regression": {"model": {"diffusion": {"p_sigma_max": 1.0}}},
    "regression-l1-ssim": {"model": {"diffusion": {"p_sigma_max": 1.0, "anchor_l1": 1.0, "anchor_ssim": 1.0}}},
    "own-start": {"model": {"diffusion": {"p_sigma_max": 1.0, "own_start": 0.5, "second_sigma": 0.5}}},
    "regression-foreground-rank": {"model": {"diffusion": {"p_sigma_max": 1.0}}},
    "regression-wide-head": {"model": {"refine_channels": 32, "diffusion": {"p_sigma_max": 1.0}}},
    "regression-no-masking": {"model": {"diffusion": {"p_sigma_max": 1.0}}},
    "regression-no-masking-l1": {"model": {"diffusion": {"p_sigma_max": 1.0, "anchor_l1": 1.0}}},
    "regression-no-masking-conv-head": {"model": {"refine_depth": 0, "refine_channels": 32,
                                                  "diffusion": {"p_sigma_max": 1.0}}},
    "regression-no-masking-percentile": {"model": {"diffusion": {"p_sigma_max": 1.0}}},
    "regression-no-masking-deep-head": {"model": {"refine_depth": 4, "diffusion": {"p_sigma_max": 1.0}}},
}
#: Candidates are changes to the engine measured against ``phmdiff`` (issue "sharp synthesis").
CANDIDATES = ("foreground-rank", "refine-sigma-1", "anchor-l1-ssim", "lr-5e-4", "own-coarse", "two-level-own-coarse",
              "own-start", "regression-foreground-rank", "regression-wide-head", "regression-no-masking-l1",
              "regression-no-masking-deep-head")
ROLES = {"phmdiff": "proposed",
         **{name: "ablation" for name in RUNS if name not in ("phmdiff", "plain-dit", *CANDIDATES)},
         **dict.fromkeys(CANDIDATES, "candidate"), "plain-dit": "baseline", "monai-ddim": "baseline",
         "regression-unet": "baseline", "regression-unet-finished": "baseline", "hist-matched": "baseline"}
#: The PHMDiff runs at the regression UNet's learning rate: ``lr-5e-4`` and the runs measured on top of it.
AT_5E_4 = ("lr-5e-4", "own-coarse", "two-level-own-coarse", "no-pyramid-regression", "regression-l1-ssim",
           "own-start", "regression-foreground-rank", "regression-wide-head", "regression-no-masking",
           "regression-no-masking-l1", "regression-no-masking-conv-head", "regression-no-masking-percentile",
           "regression-no-masking-deep-head")
#: AdamW learning rate per trained method unless ``--lr`` says otherwise (other PHMDiff runs: the trainer's 2e-4).
DEFAULT_LR = {**dict.fromkeys(RUNS, 2e-4), **dict.fromkeys(AT_5E_4, 5e-4), "monai-ddim": 2e-4, "regression-unet": 5e-4}
DEFAULT_BATCH = 8  # the trainer's default, for every trained method unless ``--batch`` says otherwise
#: The baseline networks trained in this run, by name (two rows may score one network).
TRAINED: dict[str, baselines.Trained] = {}

#: A method's whole-volume synthesis: (validation slices, item) -> float32 ``(z, H, W)`` model-range volume.
PredictVolume = Callable[[SliceDataset, int], np.ndarray]


@dataclass
class Method:
    """A method ready to score, and how it was trained (None: not trained)."""

    name: str
    predict: PredictVolume
    pairs: str
    budget_min: float | None
    steps: int | None
    params: int
    evals: int  # network evaluations per slice at inference
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Slices:
    """The evaluated pairs' slices: training subjects (augmented like ``phmdiff train``) and validation
    subjects (whole volumes)."""

    train: SliceDataset
    val: SliceDataset
    pairs: tuple[Pair, ...]
    contrast: dict[str, float]  # the training targets' ratios, a trained PHMDiff card's ``contrast``


def load_slices(cache: Path) -> Slices:
    """The datasets ``phmdiff train --config weights/brain_data.json --pairs EVAL_PAIRS`` builds."""
    settings = load_settings(PROTOCOL, {"pairs": EVAL_PAIRS, "cache_dir": str(cache)})
    settings.data = [str((ROOT / folder).resolve()) for folder in settings.data_folders]
    found = load_data(settings)
    common: dict[str, Any] = {"settings": settings, "config": run_model_config(settings, found), "cache": cache,
                              "progress": False, "console": None}
    train = slice_dataset(found, found.train_ids, augment=True, **common)
    val = slice_dataset(found, found.val_ids, augment=False, **common)
    return Slices(train, val, found.pairs, training_contrast(found))


def batches(dataset: SliceDataset, size: int, seed: int) -> Any:
    """The trainer's stream: foreground-weighted seeded draws, batched, no worker processes (CPU)."""
    return iter(torch.utils.data.DataLoader(dataset, batch_size=size, sampler=dataset.sampler(seed=seed)))


def by_slices(predict: Predict, batch_size: int, dtype: torch.dtype | None) -> PredictVolume:
    """A whole-volume prediction from a batch :data:`Predict`: every slice of the item, in batches, under
    autocast to ``dtype``."""

    @torch.no_grad()
    def predict_volume(dataset: SliceDataset, item: int) -> np.ndarray:
        subject, _ = dataset.items[item]
        depth, out = dataset.subjects[subject].depth, []
        for start in range(0, depth, batch_size):
            samples = [dataset[(item, z, 0)] for z in range(start, min(depth, start + batch_size))]
            batch = {name: torch.stack([s[name] for s in samples]) for name in samples[0]}
            with autocast(torch.device("cpu"), dtype):
                out.append(predict(batch).float()[:, 0].numpy())
        return np.concatenate(out)

    return predict_volume


def score(method: Method, slices: Slices, subjects: Collection[str] | None = None) -> dict[str, Any]:
    """Per validation subject (of ``subjects``, default all) and evaluated pair the method serves: PSNR, SSIM,
    sharpness and seconds per slice; and per pair the mean over subjects."""
    served = {str(p) for p in parse_pairs(method.pairs)} if method.pairs != "-" else None
    per: dict[str, dict[str, dict[str, float]]] = {}
    for item, (subject, pair) in enumerate(slices.val.items):
        if served is not None and str(pair) not in served:
            continue
        if subjects is not None and slices.val.subjects[subject].id not in subjects:
            continue
        began = time.perf_counter()
        pred = method.predict(slices.val, item)
        seconds = time.perf_counter() - began
        real = np.asarray(slices.val.array(subject, pair.target), dtype=np.float32)
        scores = item_scores(slices.val, item, pred, real, METRICS)
        if scores is None:
            continue
        sid = slices.val.subjects[subject].id
        per.setdefault(str(pair), {})[sid] = {**scores, "s_per_slice": seconds / len(pred)}
        print(f"#   {method.name} {pair} {sid}: {scores}", flush=True)
    return {pair: {**rows, "mean": {m: float(np.mean([r[m] for r in rows.values()])) for m in
                                    (*METRICS.values(), "s_per_slice")}} for pair, rows in per.items()}


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def phmdiff_method(name: str, model: Path, args: argparse.Namespace, budget_min: float | None,
                   note: str = "") -> Method:
    """A trained PHMDiff (``model`` as ``--model`` takes it), sampled from seeded noise shared by the batch."""
    pre = load_pretrained(model)
    cfg, training = pre.config, pre.card["training"]
    steps = args.steps or cfg.sampling.steps
    schedule = [steps] * cfg.levels if isinstance(steps, int) else list(steps)
    mirror = {"model": cfg.sampling.mirror, "on": True, "off": False}[args.mirror]
    shift = cfg.sampling.mirror_shift if args.mirror_shift is None else args.mirror_shift
    evals = sum(n if cfg.sampling.sampler == "euler" else 2 * n - 1 for n in schedule) * (2 if mirror else 1)

    def predict(batch: Batch) -> torch.Tensor:
        return sample(pre.model, batch["source"], batch["src_mod"], batch["tgt_mod"], steps=schedule,
                      noise_seed=args.seed, mirror=mirror, mirror_shift=shift)[0]

    settings = {"batch": training.get("batch_size"), "lr": training.get("settings", {}).get("lr"),
                "levels": cfg.levels, "patch_sizes": cfg.patch_sizes, "mask_ratios": cfg.mask_ratios,
                "cgr": [cfg.diffusion.cgr_pixel, cfg.diffusion.cgr_structure, cfg.diffusion.cgr_feature],
                "sampler": f"{cfg.sampling.sampler} {schedule}", "train_s": training.get("elapsed_s")}
    trained_on = set(training.get("subjects", {}).get("train", []))
    seen = sorted(trained_on & set(args.val_subjects))
    if seen:
        note = f"NOT comparable, trained on {', '.join(seen)}; {note}"
    # a fine-tuned model's card also counts its initial model's training (total_*)
    elapsed = training.get("total_elapsed_s", training["elapsed_s"])
    budget = budget_min if budget_min is not None else round(elapsed / 60, 1)
    steps = training.get("total_steps", training["steps"])
    evaluated = ",".join(p for p in EVAL_PAIRS.split(",") if parse_pairs(p)[0] in pre.pairs)
    contrast = {"model": cfg.sampling.contrast, "on": True, "off": False}[args.contrast]
    detail = {"model": cfg.sampling.source_detail, "on": True, "off": False}[args.source_detail]
    settings["contrast"], settings["source_detail"], settings["mirror"] = contrast, detail, mirror
    settings["mirror_shift"] = shift if mirror else None
    predict_volume = as_synthesized(by_slices(predict, args.eval_batch, args.dtype),
                                    pre.card["contrast"] if contrast else {}, detail)
    return Method(name, seeing(predict_volume, cfg.source_norm), evaluated, budget, steps, params_of(pre.model),
                  evals, settings, note)


def seen_as(dataset: SliceDataset, source_norm: str) -> SliceDataset:
    """``dataset`` with its sources normalised by ``source_norm``, a model's own: the validation slices are built
    once with the protocol's (``rank``), which a model trained otherwise has never seen."""
    if dataset.source_norm == source_norm:
        return dataset
    view = copy.copy(dataset)  # the same cache files; a fresh source cache (__getstate__)
    view.source_norm = source_norm
    return view


def seeing(predict_volume: PredictVolume, source_norm: str) -> PredictVolume:
    """``predict_volume`` given each dataset :func:`seen_as` the model sees it (one view per dataset)."""
    views: dict[int, SliceDataset] = {}

    def predict_seen(dataset: SliceDataset, item: int) -> np.ndarray:
        if id(dataset) not in views:
            views[id(dataset)] = seen_as(dataset, source_norm)
        return predict_volume(views[id(dataset)], item)

    return predict_seen


def as_synthesized(predict_volume: PredictVolume, reference: dict[str, float], detail: bool = False
                   ) -> PredictVolume:
    """``predict_volume`` finished as ``phmdiff synthesize`` finishes a volume: the sources' detail added where
    ``detail``, background where no source has signal, then the contrast calibration of an MRI target whose
    training ratio is in ``reference`` (the card's ``contrast``; empty: none)."""

    def predict_finished(dataset: SliceDataset, item: int) -> np.ndarray:
        subject, pair = dataset.items[item]
        sources = [np.asarray(dataset.array(subject, m), dtype=np.float32) for m in pair.sources]
        foreground = source_foreground(sources, pair.sources)
        pred = predict_volume(dataset, item)
        pred = confine(add_source_detail(pred, sources) if detail else pred, None, foreground)[0]
        if pair.target not in reference:
            return pred
        return calibrate_model_range(pred, None, foreground, reference[pair.target])[0]

    return predict_finished


def train_command(name: str, args: argparse.Namespace) -> list[str]:
    """The ``phmdiff train`` command (as a user would run it) of one PHMDiff run, its config file written."""
    args.work.mkdir(parents=True, exist_ok=True)
    config = args.work / f"{name}.json"
    config.write_text(json.dumps({**json.loads(PROTOCOL.read_text()), "pairs": EVAL_PAIRS, **CONFIGS.get(name, {})}))
    flags = [flag for flag in RUNS[name] if flag != "--config" and "{work}" not in flag]
    never = "1000000000"  # no validation or checkpoint inside the budget; the trainer validates once after it
    return [sys.executable, "-m", "phmdiff_cli", "train", "--config", str(config), "--out", str(args.work / name),
            "--force", "-q", "--cache-dir", str(args.cache_dir), "--size", "small",
            "--val-slices", "1", "--val-every", never, "--checkpoint-every", never,
            "--checkpoint-minutes", never, "--minutes", str(args.minutes),
            "--batch-size", str(args.batch.get(name, DEFAULT_BATCH)), "--lr", str(args.lr[name]),
            "--warmup-steps", str(args.warmup), "--seed", str(args.seed), "--precision", args.precision, *flags]


def train_phmdiff_runs(names: list[str], args: argparse.Namespace) -> None:
    """Train the PHMDiff runs ``names``: one after another with all threads, or ``--parallel N`` side by side
    with an equal share of the cores each (every run then sees the same machine)."""
    if args.parallel <= 1:
        for name in names:
            subprocess.run(train_command(name, args), check=True, cwd=ROOT)
        return
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    for start in range(0, len(names), args.parallel):
        group = names[start : start + args.parallel]
        runs = [subprocess.Popen(train_command(name, args), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": threads})
                for name in group]
        failed = [name for name, run in zip(group, runs, strict=True) if run.wait() != 0]
        if failed:
            raise RuntimeError(f"phmdiff train failed for {failed}")


def train_network(name: str, slices: Slices, args: argparse.Namespace) -> baselines.Trained:
    """Train the baseline network ``monai-ddim`` or ``regression-unet`` on the evaluated pairs for the budget B,
    once per run (``regression-unet-finished`` scores the same network as ``regression-unet``)."""
    if name not in TRAINED:
        torch.manual_seed(args.seed)
        context, pairs = slices.train.k * 2 + 1, slices.pairs
        net, loss = ((baselines.ddpm_unet(context, pairs), baselines.ddpm_loss) if name == "monai-ddim" else
                     (baselines.regression_unet(context, pairs), baselines.l1_loss))
        TRAINED[name] = baselines.train_for(net, loss(net, pairs),
                                            batches(slices.train, args.batch.get(name, DEFAULT_BATCH), args.seed),
                                            minutes=args.minutes, lr=args.lr[name], warmup=args.warmup,
                                            ema_decay=args.ema_decay, dtype=args.dtype)
    return TRAINED[name]


def train_baseline(name: str, slices: Slices, args: argparse.Namespace) -> Method:
    """``monai-ddim`` or ``regression-unet`` trained on the evaluated pairs for the budget B; or
    ``regression-unet-finished``: that UNet finished as ``phmdiff synthesize`` finishes brain-sharp's output
    (left-right mirroring, the sources' detail, the contrast calibration to the training targets' ratios)."""
    network = "regression-unet" if name == "regression-unet-finished" else name
    trained, pairs = train_network(network, slices, args), slices.pairs
    settings = {"batch": args.batch.get(network, DEFAULT_BATCH), "lr": args.lr[network],
                "train_s": round(trained.seconds, 1), "precision": str(args.dtype)}
    if name == "monai-ddim":
        predict = baselines.ddim_predict(trained.model, pairs, args.ddim_steps, args.seed)
        settings["sampler"], evals = f"DDIM {args.ddim_steps} steps", args.ddim_steps
        return Method(name, by_slices(predict, args.eval_batch, args.dtype), EVAL_PAIRS, args.minutes,
                      trained.steps, params_of(trained.model), evals, settings)
    finished = name == "regression-unet-finished"
    predict_volume = by_slices(baselines.regression_predict(trained.model, pairs, mirror=finished),
                               args.eval_batch, args.dtype)
    if finished:
        predict_volume = as_synthesized(predict_volume, slices.contrast, detail=True)
    settings |= {"sampler": "one forward pass", "mirror": finished, "source_detail": finished,
                 "contrast": slices.contrast if finished else False}
    return Method(name, predict_volume, EVAL_PAIRS, args.minutes, trained.steps, params_of(trained.model),
                  2 if finished else 1, settings)


def build(name: str, slices: Slices, args: argparse.Namespace) -> Method:
    """Train (or load, or set up) the method ``name`` of :data:`ROLES`, or ``shipped``."""
    if name == "shipped":
        return phmdiff_method(f"shipped {args.shipped}", args.shipped, args, None,
                              "its own budget (the card's training.total_elapsed_s or elapsed_s)")
    if name in RUNS:  # trained by train_phmdiff_runs
        note = f"trained side by side with {args.parallel - 1} other run(s)" if args.parallel > 1 else ""
        return phmdiff_method(name, args.work / name / "last", args, args.minutes, note)
    if name == "hist-matched":
        return Method(name, baselines.hist_matched, EVAL_PAIRS, None, None, 0, 0,
                      note="oracle: quantiles of the subject's own real target")
    return train_baseline(name, slices, args)


def row_of(method: Method, scores: dict[str, Any]) -> dict[str, Any]:
    return {"method": method.name, "role": ROLES.get(method.name, "reference"), "pairs": method.pairs,
            "budget_min": method.budget_min, "steps": method.steps, "params_M": round(method.params / 1e6, 2),
            "evals_per_slice": method.evals, "scores": scores, "settings": method.settings, "note": method.note}


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether ``phmdiff`` beats every baseline run on both PSNR and SSIM (mean over validation subjects, each
    evaluated pair), which do not lose, and which ablations scored at least as well as the full model."""
    ours = next((r for r in rows if r["method"] == "phmdiff"), None)
    run = [r["method"] for r in rows if r["role"] == "baseline"]
    if ours is None or not run:
        return {"phmdiff_beats_all_baselines": None, "text": "no verdict: it needs the phmdiff row and a baseline"}

    def not_beaten(role: str) -> list[str]:
        return sorted({r["method"] for r in rows if r["role"] == role for pair, s in r["scores"].items()
                       if pair in ours["scores"] and (s["mean"]["psnr"] >= ours["scores"][pair]["mean"]["psnr"]
                                                      or s["mean"]["ssim"] >= ours["scores"][pair]["mean"]["ssim"])})

    lost_to, unhelpful = not_beaten("baseline"), not_beaten("ablation")
    text = (f"PHMDiff beats every baseline run ({', '.join(run)}) on mean PSNR and SSIM of every pair"
            if not lost_to else f"PHMDiff does NOT beat {', '.join(lost_to)} on both mean PSNR and SSIM")
    if unhelpful:
        text += f"; ablations scoring at least as well on PSNR or SSIM: {', '.join(unhelpful)}"
    return {"phmdiff_beats_all_baselines": not lost_to, "baselines_run": run, "not_beaten": lost_to,
            "ablations_not_worse": unhelpful, "text": text}


def print_table(rows: list[dict[str, Any]]) -> None:
    """A markdown table, a row per method and pair, PSNR / SSIM / sharpness per subject and their mean."""
    subjects = sorted({sid for r in rows for s in r["scores"].values() for sid in s if sid != "mean"})
    print("| method | budget min | pair | " + " | ".join(subjects) + " | mean |")
    print("|" + "---|" * (len(subjects) + 4))
    for r in rows:
        for pair, per in r["scores"].items():
            cells = [f"{per[sid]['psnr']:.2f} / {per[sid]['ssim']:.3f} / {per[sid]['sharpness']:.2f}"
                     if sid in per else "" for sid in (*subjects, "mean")]
            budget = "-" if r["budget_min"] is None else r["budget_min"]
            print(f"| {r['method']} | {budget} | {pair} | " + " | ".join(cells) + " |")


def per_method(text: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    """``"monai-ddim=4,plain-dit=16"`` -> ``{"monai-ddim": 4, "plain-dit": 16}``, names checked."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    unknown = [name for name, *_ in pairs if name.strip() not in DEFAULT_LR]
    if unknown or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE for trained methods {list(DEFAULT_LR)}")
    return {name.strip(): cast(value) for name, value in pairs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget B per method (default 30)")
    parser.add_argument("--only", default=",".join(ROLES), help="comma-separated methods (default: all)")
    parser.add_argument("--shipped", type=Path, default=None, help="also score this trained model (--model)")
    parser.add_argument("--steps", type=parse_steps, default=None, help="PHMDiff sampler steps, one number for "
                        "every level or one per level (6,4,4); default: each model's config")
    parser.add_argument("--pairs", default=EVAL_PAIRS, help=f"evaluated pairs (default {EVAL_PAIRS}); others "
                        "only with --only '' (the --shipped model alone: the baselines and runs serve the default)")
    parser.add_argument("--contrast", choices=("model", "on", "off"), default="model", help="contrast calibration "
                        "of PHMDiff volumes (phmdiff synthesize --contrast): each model's default, on or off")
    parser.add_argument("--source-detail", choices=("model", "on", "off"), default="model", help="the sources' "
                        "detail in PHMDiff volumes (phmdiff synthesize --source-detail): model default, on or off")
    parser.add_argument("--mirror", choices=("model", "on", "off"), default="model", help="test-time mirroring "
                        "of PHMDiff slices (phmdiff synthesize --mirror): model default, on or off")
    parser.add_argument("--mirror-shift", type=int, default=None, help="pixels the mirrored view is rolled by "
                        "(sampling.mirror_shift); default: each model's")
    parser.add_argument("--ddim-steps", type=int, default=20, help="DDIM steps of monai-ddim (default 20)")
    parser.add_argument("--batch", type=lambda t: per_method(t, int), default={},
                        help=f"NAME=N,... batch sizes (default {DEFAULT_BATCH} for all)")
    parser.add_argument("--lr", type=lambda t: per_method(t, float), default={},
                        help=f"NAME=X,... AdamW learning rates (default {DEFAULT_LR})")
    parser.add_argument("--warmup", type=int, default=20, help="linear LR warm-up steps, every trained method "
                        "(default 20; the trainer's own, min(500, steps/10), would never end within B)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the UNets (the trainer's)")
    parser.add_argument("--eval-batch", type=int, default=8, help="slices per inference batch")
    parser.add_argument("--precision", default="auto", help="autocast of training and inference (default auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=1, help="train this many PHMDiff runs side by side, each "
                        "with an equal share of the cores (default 1: one after another)")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "quality-runs",
                        help="run folders of the PHMDiff trainings")
    parser.add_argument("--cache-dir", type=Path, default=None, help="preprocessing cache (default WORK/cache)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    parser.add_argument("--subjects", default=None, help="comma-separated validation subjects scored (default: "
                        "all of weights/brain_data.json's)")
    parser.add_argument("--update", action="store_true", help="rerun only these methods: keep --out's other "
                        "rows, replace the rows of the methods run, and log this run in its 'runs'")
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(args.only) - set(ROLES))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(ROLES)}")
    if args.pairs != EVAL_PAIRS and (set(args.only) - {"hist-matched"} or not (args.shipped or args.only)):
        parser.error("--pairs other than the default needs --shipped MODEL or --only hist-matched (no training)")
    args.lr = {**DEFAULT_LR, **args.lr}
    args.cache_dir = (args.cache_dir or args.work / "cache").resolve()
    args.work = args.work.resolve()
    args.dtype = resolve_precision(args.precision, torch.device("cpu"))
    protocol = json.loads(PROTOCOL.read_text())["val_subjects"]
    args.val_subjects = [n.strip() for n in args.subjects.split(",") if n.strip()] if args.subjects else protocol
    unknown = sorted(set(args.val_subjects) - set(protocol))
    if unknown:
        parser.error(f"--subjects: not validation subjects of the protocol: {unknown}")
    return args


def merge(previous: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``previous`` rows with those of the methods in ``rows`` replaced, in :data:`ROLES` order (the shipped
    model's rows last)."""
    by_name = {r["method"]: r for r in previous} | {r["method"]: r for r in rows}
    order = list(ROLES)
    return sorted(by_name.values(), key=lambda r: order.index(r["method"]) if r["method"] in ROLES else len(order))


def report_of(previous: dict[str, Any] | None, rows: list[dict[str, Any]], info: dict[str, Any],
              settings: dict[str, Any]) -> dict[str, Any]:
    """The results file: ``rows`` alone, or (``--update``) merged into ``previous``, whose machine and settings
    stay on top and whose ``runs`` log this update."""
    if previous is None:
        return {"machine": info, "settings": settings, "rows": rows, "verdict": verdict(rows)}
    merged = merge(previous["rows"], rows)
    update = {"only": [r["method"] for r in rows], "machine": info, "settings": settings}
    return {**previous, "rows": merged, "verdict": verdict(merged), "runs": [*previous.get("runs", []), update]}


def main() -> None:
    global EVAL_PAIRS  # the script's evaluated pairs; --pairs replaces them for a shipped model alone
    args = parse_args()
    EVAL_PAIRS = args.pairs
    previous = json.loads(args.out.read_text()) if args.update and args.out.exists() else None
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
          f"load {info['load_avg_at_start']}, precision {args.dtype or 'fp32'}", flush=True)
    slices = load_slices(args.cache_dir)
    print(f"# {EVAL_PAIRS}: {len(slices.train.subjects)} training subjects, validation "
          f"{[s.id for s in slices.val.subjects]}", flush=True)
    names = [n for n in ROLES if n in args.only] + (["shipped"] if args.shipped else [])
    settings = {**{k: str(v) if isinstance(v, (Path, torch.dtype)) else v for k, v in vars(args).items()},
                "protocol": json.loads(PROTOCOL.read_text()), "eval_pairs": EVAL_PAIRS,
                "metrics": "phmdiff eval defaults on whole volumes (model grid): percentile scale, auto mask of "
                "the reference, PSNR, 3-D SSIM; sharpness"}
    rows: list[dict[str, Any]] = []
    report = report_of(previous, rows, info, settings)
    train_phmdiff_runs([n for n in names if n in RUNS], args)
    for name in names:
        print(f"# {name}: training / preparing", flush=True)
        method = build(name, slices, args)
        rows.append(row_of(method, score(method, slices, args.val_subjects)))
        report = report_of(previous, rows, info, settings)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))  # after every method: a crash keeps the finished ones
    print()
    print_table(report["rows"])
    print(f"\n{report['verdict']['text']}\nwrote {args.out}")


if __name__ == "__main__":
    main()

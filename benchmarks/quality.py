"""Quality at an equal CPU training budget (issue 8): PHMDiff, its ablations and baselines, t1n -> t2w.

Data: ``../shared/data/brats`` (4 subjects), validation subject TCGA-DU-7294, the other three train. Every
method trains for the same wall-clock minutes B on this CPU (torch's default threads, ``phmdiff train``'s
``--precision auto`` for all) from the same
preprocessed, augmented 2.5D slices (``phmdiff train``'s cache and :class:`SliceDataset`), and is scored on
the same fixed validation slices (:func:`~phmdiff_cli.engine.validation.fixed_subset`) exactly as training
validation scores them: PSNR (dB) and 2-D SSIM inside the reference's automatic foreground mask, on the
target's ``phmdiff eval`` scale (each volume / its foreground 99.5th percentile).

Methods (``--only`` picks some):

- ``phmdiff``: PHMDiff ``small`` trained by ``phmdiff train`` on t1n:t2w, t1n:t2f, t2w:t2f (one
  cross-conditioned model, as the shipped one), budget B; ablations, each with one part removed:
  ``no-pyramid`` (one 240 px level, 16 px patches), ``no-masking`` (mask ratio 0), ``no-cgr`` (the three CGR
  weights 0), ``one-model-per-pair`` (t1n:t2w alone for B/3: three such models would share B; only this one
  is trained), ``no-rank`` (percentile-scaled sources instead of their ranks), ``no-sigma-max`` (log-normal
  training noise only: no share of samples at the sampler's sigma_max), ``no-unet-head`` (the three-convolution
  refinement head, 32 channels, instead of the UNet head), ``coarse-noise-0.1`` (the finer levels trained on
  coarse conditions noised by at most 0.1 instead of 0.5).
- baselines: ``plain-dit`` (the same Transformer without masking and pyramid, the 3 pairs, B), ``monai-ddim``
  (MONAI DiffusionModelUNet, DDPM training, DDIM sampling), ``regression-unet`` (MONAI BasicUNet, L1, one
  forward pass), both on t1n:t2w for B, and ``hist-matched-inverted`` (no training).
- ``--shipped PATH`` adds an already-trained model, with its own budget.

PHMDiff models are sampled with their config's default steps (``--steps`` overrides) and evaluated from
``last/`` (``best/`` is chosen on this validation subject). Every method is scored in fp32 except
``monai-ddim``, whose network runs under its training autocast (fp32 DDIM would take ~50 min here; see
:func:`baselines.ddim_predict`). Single seed, one run each.

    pip install -e ".[bench]"     # monai-ddim's MONAI DiffusionModelUNet imports einops
    python benchmarks/quality.py --cache-dir runs/brain-small/cache      # ~60 min on 2 CPU cores (B = 4)
    python benchmarks/quality.py --cache-dir runs/brain-small/cache --only monai-ddim --update  # one row again
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import baselines
import numpy as np
import torch
from baselines import Batch, Predict
from engine_speed import DATA, ROOT, machine

from phmdiff_cli.data.slices import SampleKey, SliceDataset
from phmdiff_cli.diffusion import sample
from phmdiff_cli.engine.device import resolve_precision
from phmdiff_cli.engine.pretrained import load_pretrained
from phmdiff_cli.engine.settings import TrainSettings
from phmdiff_cli.engine.train_data import load_data, slice_dataset
from phmdiff_cli.engine.trainer import run_model_config
from phmdiff_cli.engine.validation import fixed_subset, item_scores

VAL_SUBJECT = "TCGA-DU-7294"
PAIR = "t1n:t2w"
ALL_PAIRS = "t1n:t2w,t1n:t2f,t2w:t2f"
#: PHMDiff runs of ``phmdiff train``: pairs, share of the budget B, extra flags.
RUNS: dict[str, tuple[str, float, list[str]]] = {
    "phmdiff": (ALL_PAIRS, 1.0, []),
    "no-pyramid": (ALL_PAIRS, 1.0, ["--levels", "1"]),
    "no-masking": (ALL_PAIRS, 1.0, ["--mask-ratio", "0"]),
    "no-cgr": (ALL_PAIRS, 1.0, ["--cgr-pixel", "0", "--cgr-structure", "0", "--cgr-feature", "0"]),
    "one-model-per-pair": (PAIR, 1 / 3, []),
    "no-rank": (ALL_PAIRS, 1.0, ["--source-norm", "percentile"]),
    "no-sigma-max": (ALL_PAIRS, 1.0, ["--config", "{work}/no-sigma-max.json"]),
    "no-unet-head": (ALL_PAIRS, 1.0, ["--config", "{work}/no-unet-head.json"]),
    "coarse-noise-0.1": (ALL_PAIRS, 1.0, ["--config", "{work}/coarse-noise-0.1.json"]),
    "plain-dit": (ALL_PAIRS, 1.0, ["--levels", "1", "--mask-ratio", "0"]),
}
#: The model-config overrides (``phmdiff train --config``) that the ``{work}/NAME.json`` flags above name.
CONFIGS: dict[str, dict[str, Any]] = {
    "no-sigma-max": {"model": {"diffusion": {"p_sigma_max": 0.0}}},
    "no-unet-head": {"model": {"refine_depth": 0, "refine_channels": 32}},
    "coarse-noise-0.1": {"model": {"diffusion": {"coarse_noise": 0.1}}},
}
ROLES = {"phmdiff": "proposed", "no-pyramid": "ablation", "no-masking": "ablation", "no-cgr": "ablation",
         "one-model-per-pair": "ablation", "no-rank": "ablation", "no-sigma-max": "ablation",
         "no-unet-head": "ablation", "coarse-noise-0.1": "ablation",
         "plain-dit": "baseline", "monai-ddim": "baseline",
         "regression-unet": "baseline", "hist-matched-inverted": "baseline"}
#: AdamW learning rate per trained method unless ``--lr`` says otherwise (PHMDiff runs: the trainer's 2e-4).
DEFAULT_LR = {**dict.fromkeys(RUNS, 2e-4), "monai-ddim": 2e-4, "regression-unet": 5e-4}
DEFAULT_BATCH = 8  # the trainer's default, for every trained method unless ``--batch`` says otherwise


@dataclass
class Method:
    """A method ready to score, and how it was trained (None: not trained)."""

    name: str
    predict: Predict
    pairs: str
    budget_min: float | None
    steps: int | None
    params: int
    evals: int  # network evaluations per slice at inference
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Slices:
    """The t1n:t2w slices: training subjects (augmented like ``phmdiff train``) and the validation subject's
    fixed evaluation subset."""

    train: SliceDataset
    val: SliceDataset
    keys: list[SampleKey]


def load_slices(data: Path, cache: Path, val_slices: int) -> Slices:
    """The datasets ``phmdiff train --pairs t1n:t2w --val-subjects TCGA-DU-7294`` builds (same grid and cache)."""
    settings = TrainSettings(data=str(data), pairs=PAIR, val_subjects=[VAL_SUBJECT], cache_dir=str(cache))
    found = load_data(settings)
    common: dict[str, Any] = {"settings": settings, "config": run_model_config(settings, found), "cache": cache,
                              "progress": False, "console": None}
    train = slice_dataset(found, found.train_ids, augment=True, **common)
    val = slice_dataset(found, found.val_ids, augment=False, **common)
    return Slices(train, val, fixed_subset(val, val_slices))


def batches(dataset: SliceDataset, size: int, seed: int) -> Iterator[Batch]:
    """The trainer's stream: foreground-weighted seeded draws, batched, no worker processes (CPU)."""
    return iter(torch.utils.data.DataLoader(dataset, batch_size=size, sampler=dataset.sampler(seed=seed)))


@torch.no_grad()
def score(predict: Predict, slices: Slices, batch_size: int) -> dict[str, float]:
    """PSNR, SSIM (as training validation computes them) and seconds per slice of ``predict`` alone."""
    rows: list[dict[str, np.ndarray]] = []
    seconds = 0.0
    for start in range(0, len(slices.keys), batch_size):
        samples = [slices.val[key] for key in slices.keys[start : start + batch_size]]
        batch = {name: torch.stack([s[name] for s in samples]) for name in samples[0]}
        began = time.perf_counter()
        pred = predict(batch).float().numpy()  # (B, 1, H, W)
        seconds += time.perf_counter() - began
        rows += [{"pred": p[0], "real": s["target"][0].numpy()} for p, s in zip(pred, samples, strict=True)]
    scores = item_scores(slices.val, 0, rows)  # item 0: the validation subject's t1n:t2w, the only item
    if scores is None:
        raise RuntimeError("the validation slices have no foreground")
    return {"psnr": scores["psnr"], "ssim": scores["ssim"], "s_per_slice": seconds / len(rows)}


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def phmdiff_method(name: str, model: Path, args: argparse.Namespace, budget_min: float | None,
                   note: str = "") -> Method:
    """A trained PHMDiff (``model`` as ``--model`` takes it), sampled from seeded noise shared by the batch."""
    pre = load_pretrained(model)
    pre.pair_for(("t1n",), "t2w")  # refuses a model not trained for the evaluated pair
    cfg, training = pre.config, pre.card["training"]
    schedule = [args.steps] * cfg.levels if args.steps else list(cfg.sampling.steps)
    evals = sum(n if cfg.sampling.sampler == "euler" else 2 * n - 1 for n in schedule)

    def predict(batch: Batch) -> torch.Tensor:
        return sample(pre.model, batch["source"], batch["src_mod"], batch["tgt_mod"], steps=schedule,
                      noise_seed=args.seed)[0]

    settings = {"batch": training.get("batch_size"), "lr": training.get("settings", {}).get("lr"),
                "levels": cfg.levels, "patch_sizes": cfg.patch_sizes, "mask_ratios": cfg.mask_ratios,
                "cgr": [cfg.diffusion.cgr_pixel, cfg.diffusion.cgr_structure, cfg.diffusion.cgr_feature],
                "sampler": f"{cfg.sampling.sampler} {schedule}", "train_s": training.get("elapsed_s")}
    pairs = ",".join(str(p) for p in pre.pairs)
    if VAL_SUBJECT in training.get("subjects", {}).get("train", []):
        note = f"NOT comparable, trained on {VAL_SUBJECT}; {note}"
    # a fine-tuned model's card also counts its initial model's training (total_*)
    elapsed = training.get("total_elapsed_s", training["elapsed_s"])
    budget = budget_min if budget_min is not None else round(elapsed / 60, 1)
    steps = training.get("total_steps", training["steps"])
    return Method(name, predict, pairs, budget, steps, params_of(pre.model), evals, settings, note)


def train_phmdiff(name: str, args: argparse.Namespace) -> Method:
    """Train one PHMDiff run with ``phmdiff train`` (a subprocess, as a user would) and load its ``last/``."""
    pairs, share, flags = RUNS[name]
    minutes, out = args.minutes * share, args.work / name
    args.work.mkdir(parents=True, exist_ok=True)
    if name in CONFIGS:
        (args.work / f"{name}.json").write_text(json.dumps(CONFIGS[name]))
    flags = [flag.format(work=args.work) for flag in flags]
    never = "1000000000"  # no validation or checkpoint inside the budget; the trainer validates once after it
    subprocess.run([sys.executable, "-m", "phmdiff_cli", "train", "--data", str(args.data), "--pairs", pairs,
                    "--out", str(out), "--force", "-q", "--cache-dir", str(args.cache_dir), "--size", "small",
                    "--val-subjects", VAL_SUBJECT, "--val-slices", "1", "--val-every", never,
                    "--checkpoint-every", never, "--checkpoint-minutes", never, "--minutes", str(minutes),
                    "--batch-size", str(args.batch.get(name, DEFAULT_BATCH)), "--lr", str(args.lr[name]),
                    "--warmup-steps", str(args.warmup), "--seed", str(args.seed), *flags], check=True)
    note = "three such models (one per pair) share the budget B; only t1n:t2w is trained" if share < 1 else ""
    return phmdiff_method(name, out / "last", args, round(minutes, 2), note)


def train_baseline(name: str, slices: Slices, args: argparse.Namespace) -> Method:
    """Train ``monai-ddim`` or ``regression-unet`` on t1n:t2w for the budget B."""
    torch.manual_seed(args.seed)
    context = slices.train.k * 2 + 1
    size, lr = args.batch.get(name, DEFAULT_BATCH), args.lr[name]
    if name == "monai-ddim":
        net, loss, evals = baselines.ddpm_unet(context), baselines.ddpm_loss, args.ddim_steps
    else:
        net, loss, evals = baselines.regression_unet(context), baselines.l1_loss, 1
    dtype = resolve_precision("auto", torch.device("cpu"))  # what `phmdiff train` picks for the PHMDiff runs
    trained = baselines.train_for(net, loss(net), batches(slices.train, size, args.seed), minutes=args.minutes,
                                  lr=lr, warmup=args.warmup, ema_decay=args.ema_decay, dtype=dtype)
    predict = (baselines.ddim_predict(trained.model, args.ddim_steps, args.seed, dtype) if name == "monai-ddim"
               else baselines.regression_predict(trained.model))
    settings = {"batch": size, "lr": lr, "train_s": round(trained.seconds, 1), "precision": str(dtype),
                "sampler": f"DDIM {args.ddim_steps} steps, {dtype} autocast" if name == "monai-ddim"
                else "one forward pass, fp32"}
    return Method(name, predict, PAIR, args.minutes, trained.steps, params_of(net), evals, settings)


def build(name: str, slices: Slices, args: argparse.Namespace) -> Method:
    """Train (or load, or set up) the method ``name`` of :data:`ROLES`, or ``shipped``."""
    if name == "shipped":
        return phmdiff_method(f"shipped {args.shipped}", args.shipped, args, None,
                              "its own budget (the card's training.total_elapsed_s or elapsed_s)")
    if name in RUNS:
        return train_phmdiff(name, args)
    if name == "hist-matched-inverted":
        reference = baselines.pooled_foreground(slices.train, "t2w")
        return Method(name, baselines.hist_matched_inverted(reference, "t1n"), "-", None, None, 0, 0,
                      note="quantiles of the training subjects' pooled t2w foreground")
    return train_baseline(name, slices, args)


def row_of(method: Method, scores: dict[str, float]) -> dict[str, Any]:
    return {"method": method.name, "role": ROLES.get(method.name, "reference"), "pairs": method.pairs,
            "budget_min": method.budget_min, "steps": method.steps, "params_M": round(method.params / 1e6, 2),
            "evals_per_slice": method.evals, "psnr_db": round(scores["psnr"], 3), "ssim": round(scores["ssim"], 4),
            "s_per_slice": round(scores["s_per_slice"], 3), "settings": method.settings, "note": method.note}


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether ``phmdiff`` beats every baseline run on both PSNR and SSIM, which do not lose, and which
    ablations scored at least as well as the full model (parts that did not help at this budget)."""
    ours = next((r for r in rows if r["method"] == "phmdiff"), None)
    run = [r["method"] for r in rows if r["role"] == "baseline"]
    if ours is None or not run:
        return {"phmdiff_beats_all_baselines": None, "text": "no verdict: it needs the phmdiff row and a baseline"}

    def not_beaten(role: str) -> list[str]:
        return [r["method"] for r in rows if r["role"] == role
                and (r["psnr_db"] >= ours["psnr_db"] or r["ssim"] >= ours["ssim"])]

    lost_to, unhelpful = not_beaten("baseline"), not_beaten("ablation")
    text = (f"PHMDiff beats every baseline run ({', '.join(run)}) on PSNR and SSIM" if not lost_to else
            f"PHMDiff does NOT beat {', '.join(lost_to)} on both PSNR and SSIM at this budget")
    if unhelpful:
        text += f"; ablations scoring at least as well on PSNR or SSIM: {', '.join(unhelpful)}"
    return {"phmdiff_beats_all_baselines": not lost_to, "baselines_run": run, "not_beaten": lost_to,
            "ablations_not_worse": unhelpful, "text": text}


def print_table(rows: list[dict[str, Any]]) -> None:
    """A markdown table of the rows (paste it into benchmarks/README.md)."""
    cols = {"method": "method", "pairs": "pairs trained", "budget_min": "budget min", "steps": "steps trained",
            "params_M": "params M", "evals_per_slice": "evals / slice", "psnr_db": "PSNR dB", "ssim": "SSIM",
            "s_per_slice": "s / slice"}
    print("| " + " | ".join(cols.values()) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")


def per_method(text: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    """``"monai-ddim=4,plain-dit=16"`` -> ``{"monai-ddim": 4, "plain-dit": 16}``, names checked."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    unknown = [name for name, *_ in pairs if name.strip() not in DEFAULT_LR]
    if unknown or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE for trained methods {list(DEFAULT_LR)}")
    return {name.strip(): cast(value) for name, value in pairs}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget B per method (default 4)")
    parser.add_argument("--val-slices", type=int, default=32, help="validation slices scored (default 32)")
    parser.add_argument("--only", default=",".join(ROLES), help="comma-separated methods (default: all)")
    parser.add_argument("--shipped", type=Path, default=None, help="also score this trained model (--model)")
    parser.add_argument("--steps", type=int, default=None, help="PHMDiff sampler steps per level (default: "
                        "each model's config)")
    parser.add_argument("--ddim-steps", type=int, default=20, help="DDIM steps of monai-ddim (default 20)")
    parser.add_argument("--batch", type=lambda t: per_method(t, int), default={},
                        help=f"NAME=N,... batch sizes (default {DEFAULT_BATCH} for all)")
    parser.add_argument("--lr", type=lambda t: per_method(t, float), default={},
                        help=f"NAME=X,... AdamW learning rates (default {DEFAULT_LR})")
    parser.add_argument("--warmup", type=int, default=20, help="linear LR warm-up steps, every trained method "
                        "(default 20; the trainer's own, min(500, steps/10), would never end within B)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the UNets (the trainer's)")
    parser.add_argument("--eval-batch", type=int, default=8, help="slices per inference batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA / "brats")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "quality-runs",
                        help="run folders of the PHMDiff trainings")
    parser.add_argument("--cache-dir", type=Path, default=None, help="preprocessing cache (default WORK/cache; "
                        "runs/brain-small/cache holds these subjects already)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    parser.add_argument("--update", action="store_true", help="rerun only these methods: keep --out's other "
                        "rows, replace the rows of the methods run, and log this run in its 'runs'")
    args = parser.parse_args()
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(args.only) - set(ROLES))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(ROLES)}")
    args.lr = {**DEFAULT_LR, **args.lr}
    args.cache_dir = args.cache_dir or args.work / "cache"
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
    args = parse_args()
    previous = json.loads(args.out.read_text()) if args.update and args.out.exists() else None
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
          f"load {info['load_avg_at_start']}", flush=True)
    slices = load_slices(args.data, args.cache_dir, args.val_slices)
    print(f"# {PAIR}: {len(slices.train.subjects)} training subjects, {len(slices.keys)} slices of {VAL_SUBJECT} "
          f"(z = {[k[1] for k in slices.keys]})", flush=True)
    names = [n for n in ROLES if n in args.only] + (["shipped"] if args.shipped else [])
    settings = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "val_subject": VAL_SUBJECT, "pair": PAIR, "eval_keys": slices.keys,
                "metrics": "psnr, ssim2d of phmdiff eval: percentile scale, auto mask of the reference"}
    rows: list[dict[str, Any]] = []
    report = report_of(previous, rows, info, settings)
    for name in names:
        print(f"# {name}: training / preparing", flush=True)
        method = build(name, slices, args)
        rows.append(row_of(method, score(method.predict, slices, args.eval_batch)))
        print(f"# {name}: PSNR {rows[-1]['psnr_db']} dB, SSIM {rows[-1]['ssim']}", flush=True)
        report = report_of(previous, rows, info, settings)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))  # after every method: a crash keeps the finished ones
    print()
    print_table(report["rows"])
    print(f"\n{report['verdict']['text']}\nwrote {args.out}")


if __name__ == "__main__":
    main()

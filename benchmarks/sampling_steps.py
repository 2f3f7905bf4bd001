"""Steps-vs-quality curve of a trained model: PSNR and SSIM on its validation subject against sampler steps.

The model (default: the shipped default model) samples the same fixed validation slices (the slices
``phmdiff train`` validates on, chosen by :func:`~phmdiff_cli.engine.validation.fixed_subset`, the same initial
noise) with Euler and Heun at 1, 2, 4, 8, 16 and 32 steps per pyramid level (Heun up to 16), plus a few
per-level settings around 7-13 evaluations per slice (the budget of a 3-minute volume on 2 CPU cores) and the
model's default; each is scored exactly as training validation and ``phmdiff eval`` score (PSNR in dB and 2-D
SSIM inside the reference's foreground, on the target's ``phmdiff eval`` scale). Seconds per slice are
measured on this machine: multiplied by a volume's slices they give ``phmdiff synthesize``'s sampling time.

The validation subject and the data come from the model card (``training.subjects.val``,
``training.data.root``), so the curve is measured on data the model never trained on.

    python benchmarks/sampling_steps.py                  # ~10 min on 2 CPU cores (t1n:t2w, 8 slices)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from engine_speed import ROOT, machine

from phmdiff_cli.data.slices import SliceDataset
from phmdiff_cli.engine.hub import DEFAULT_MODEL
from phmdiff_cli.engine.pretrained import Pretrained, load_pretrained
from phmdiff_cli.engine.settings import TrainSettings
from phmdiff_cli.engine.train_data import load_data, slice_dataset
from phmdiff_cli.engine.validation import fixed_subset, validate

RESULTS = ROOT / "benchmarks" / "results" / "sampling_steps.json"


def evaluations(sampler: str, steps: tuple[int, ...]) -> int:
    """Denoiser evaluations per slice: Euler one per step, Heun two per step but the last."""
    return sum(s if sampler == "euler" else 2 * s - 1 for s in steps)


def validation_slices(pretrained: Pretrained, pairs: str, cache: Path, data_root: Path | None) -> SliceDataset:
    """The model's validation subjects for ``pairs`` (from ``data_root`` or the card's data folders),
    preprocessed as in training (no augmentation)."""
    training = pretrained.card["training"]
    folders = training["data"].get("folders", [training["data"]["root"]])
    settings = TrainSettings(data=str(data_root) if data_root else folders, pairs=pairs,
                             val_subjects=training["subjects"]["val"], cache_dir=str(cache), augment=False)
    data = load_data(settings)
    return slice_dataset(data, data.val_ids, settings=settings, config=pretrained.config, cache=cache,
                         augment=False, progress=False, console=None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pretrained = load_pretrained(args.model)
    dataset = validation_slices(pretrained, args.pairs, args.cache_dir, args.data)
    keys = fixed_subset(dataset, args.val_slices)
    default = pretrained.config.sampling
    settings = [(sampler, (steps,) * pretrained.config.levels)
                for sampler in args.samplers for steps in args.steps
                if not (sampler == "heun" and steps > args.max_heun_steps)]
    settings += [(sampler, steps) for sampler, steps in args.per_level if (sampler, steps) not in settings]
    if (default.sampler, default.steps) not in settings:
        settings.append((default.sampler, default.steps))
    rows = []
    noises = args.coarse_noise or [default.coarse_noise]
    grid = [(sigma_min, noise) for sigma_min in args.sigma_min for noise in noises]
    for sigma_min, coarse_noise in grid:
        pretrained.model.config.sampling = replace(default, sigma_min=sigma_min, coarse_noise=coarse_noise)
        for sampler, steps in settings:
            start = time.perf_counter()
            result = validate(pretrained.model, dataset, keys, steps=steps, sampler=sampler,
                              batch_size=args.batch_size, device=torch.device("cpu"), dtype=None, seed=0)
            seconds = time.perf_counter() - start
            rows.append({"sampler": sampler, "steps": list(steps), "sigma_min": sigma_min,
                         "coarse_noise": coarse_noise, "evaluations": evaluations(sampler, steps),
                         "default": (sampler, steps, sigma_min, coarse_noise)
                         == (default.sampler, default.steps, default.sigma_min, default.coarse_noise),
                         "s_per_slice": seconds / len(keys), **result.mean,
                         "pairs": result.pairs})
            print(_line(rows[-1]), flush=True)
    return {"machine": machine(), "model": str(pretrained.path), "sha256": pretrained.card.get("sha256"),
            "pairs": args.pairs, "val_subjects": pretrained.card["training"]["subjects"]["val"],
            "slices": len(keys), "rows": rows}


def _line(row: dict[str, Any]) -> str:
    steps = ",".join(map(str, row["steps"]))
    mark = " (default)" if row["default"] else ""
    return (f"| {row['sampler']:5} | {steps:>8}{mark:10} | {row['sigma_min']:<6g} | {row['coarse_noise']:<4g} | "
            f"{row['evaluations']:>5} | "
            f"{row['psnr']:6.2f} | {row['ssim']:.3f} | {row['s_per_slice']:6.2f} |")


def _per_level(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``"euler:3,2,2;heun:2,2,1"`` -> ``[("euler", (3, 2, 2)), ("heun", (2, 2, 1))]``."""
    pairs = [item.split(":") for item in text.split(";") if item]
    return [(sampler, tuple(int(v) for v in steps.split(","))) for sampler, steps in pairs]


def model_arguments(parser: argparse.ArgumentParser, results: Path) -> None:
    """The options of a benchmark of one trained model on its validation slices: --model, --data,
    --val-slices, --cache-dir, --out (default ``results``)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="any phmdiff --model spec")
    parser.add_argument("--data", type=Path, help="the training data folder (default: the card's)")
    parser.add_argument("--val-slices", type=int, default=8, help="slices per validation subject and pair")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "cache")
    parser.add_argument("--out", type=Path, default=results)


def run_and_report(parser: argparse.ArgumentParser, columns: list[str],
                   run: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
    """Parse the options, print a markdown table header of ``columns`` (``run`` prints the rows as it goes),
    and write ``run``'s report as JSON to ``--out``."""
    args = parser.parse_args()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(parser, RESULTS)
    parser.add_argument("--pairs", default="t1n:t2w", help="pairs to score (of the model's)")
    parser.add_argument("--steps", default="1,2,4,8,16,32",
                        type=lambda s: [int(v) for v in s.split(",")], help="steps per level")
    parser.add_argument("--samplers", default="euler,heun", type=lambda s: s.split(","))
    parser.add_argument("--per-level", default="euler:3,2,2;euler:4,3,2;euler:6,4,3;heun:2,2,1;heun:3,2,2",
                        type=_per_level, help="further sampler:steps-per-level settings, ';'-separated")
    parser.add_argument("--max-heun-steps", type=int, default=16, help="skip slower Heun runs")
    parser.add_argument("--sigma-min", default="0.002", type=lambda s: [float(v) for v in s.split(",")])
    parser.add_argument("--coarse-noise", default=None, type=lambda s: [float(v) for v in s.split(",")],
                        help="inference noise on the coarse samples, comma-separated (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8)
    run_and_report(parser, ["sampler", "steps/level", "sigma_min", "coarse noise", "evals", "PSNR dB", "SSIM",
                            "s/slice"], run)


if __name__ == "__main__":
    main()

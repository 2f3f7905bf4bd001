"""Where a PHMDiff sample's error comes from: each pyramid level of the model's own cascade against the real
target at that level, and the finest level given the real coarse target instead (an oracle).

On middle slices of every validation subject of ``quality.py``'s protocol (``weights/brain_data.json``, the
evaluated pairs t1n -> t2w and t1c -> t2f), each model samples coarse to fine with its default sampler and steps
from seeded noise shared by the slices, and the table gives the root-mean-square error in the model
range [-1, 1] on the real target's foreground:

- ``l0 .. l{L-1}``: each level's own sample against the area-downsampled real target of that level;
- ``coarser up``: the next-to-finest own sample, upsampled to the finest level: what the finest level adds is
  the difference between this column and the last level's;
- ``oracle fine``: the finest level sampled from the real next-to-finest target (upsampled) as its coarse
  condition, the same noise;
- ``truth up``: that real coarse target itself, upsampled: the error a finest level that only copied a perfect
  coarse sample would make.

    python benchmarks/cascade_error.py --model weights/brain-small --model benchmarks/results/quality-runs/lr-5e-4/last
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import quality
import torch
from engine_speed import ROOT, machine

from phmdiff_cli.diffusion.pyramid import image_pyramid, upsample
from phmdiff_cli.diffusion.sampling import level_scheduler, solve_level
from phmdiff_cli.diffusion.schedulers import EDMScheduler
from phmdiff_cli.engine.device import autocast, resolve_precision
from phmdiff_cli.engine.pretrained import load_pretrained
from phmdiff_cli.models import PHMDiff

RESULTS = ROOT / "benchmarks" / "results" / "cascade_error.json"


def foreground_rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """RMSE of (B, 1, h, w) model-range images over the target's foreground (above the background's -1)."""
    fg = (target > -0.98).float()
    return float((((pred - target) ** 2) * fg).sum() / fg.sum().clamp(min=1)) ** 0.5


def level_start(model: PHMDiff, level: int, steps: int, coarse: torch.Tensor | None, batch: int,
                seed: int) -> tuple[EDMScheduler, torch.Tensor]:
    """The level's scheduler and starting point as :func:`~phmdiff_cli.diffusion.sample` sets them (shared
    seeded noise, SDEdit start from ``coarse`` when the model has ``refine_sigma``)."""
    cfg = model.config
    refine = cfg.diffusion.refine_sigma if level else 0.0
    scheduler = level_scheduler(cfg, level)
    scheduler.set_timesteps(steps)
    side = cfg.level_size(level)
    noise = torch.randn(1, 1, side, side, generator=torch.Generator().manual_seed(seed + level))
    x = noise.expand(batch, 1, side, side) * scheduler.init_noise_sigma
    return scheduler, (x + coarse if refine else x)


@torch.no_grad()
def cascade_errors(model: PHMDiff, batch: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    """The table's columns for one batch of slices (see the module docstring)."""
    cfg, steps = model.config, model.config.sampling.steps
    sources, targets = image_pyramid(batch["source"], cfg.levels), image_pyramid(batch["target"], cfg.levels)
    mods = batch["src_mod"], batch["tgt_mod"]
    row, coarse, own, size = {}, None, [], len(batch["target"])
    for level in range(cfg.levels):
        scheduler, x = level_start(model, level, steps[level], coarse, size, seed)
        own.append(solve_level(model, scheduler, x, sources[level], coarse, *mods, level=level))
        row[f"l{level}"] = foreground_rmse(own[-1], targets[level])
        coarse = upsample(own[-1], cfg.level_size(level + 1)) if level + 1 < cfg.levels else None
    fine, side = cfg.levels - 1, cfg.level_size(cfg.levels - 1)
    truth = upsample(targets[fine - 1], side)
    scheduler, x = level_start(model, fine, steps[fine], truth, size, seed)
    oracle = solve_level(model, scheduler, x, sources[fine], truth, *mods, level=fine)
    row.update({"coarser up": foreground_rmse(upsample(own[fine - 1], side), targets[fine]),
                "oracle fine": foreground_rmse(oracle, targets[fine]),
                "truth up": foreground_rmse(truth, targets[fine])})
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    slices = quality.load_slices(args.cache_dir)
    dtype = resolve_precision(args.precision, torch.device("cpu"))
    rows = []
    for path in args.model:
        pretrained = load_pretrained(path)
        model, val = pretrained.model, quality.seen_as(slices.val, pretrained.config.source_norm)
        for item, (subject, pair) in enumerate(val.items):
            depth = val.subjects[subject].depth
            zs = np.linspace(depth * 0.3, depth * 0.7, args.slices).round().astype(int)
            samples = [val[(item, int(z), 0)] for z in zs]
            batch = {name: torch.stack([s[name] for s in samples]) for name in samples[0]}
            with autocast(torch.device("cpu"), dtype):
                errors = cascade_errors(model, batch, args.seed)
            row = {"model": str(path), "pair": str(pair), "subject": val.subjects[subject].id, **errors}
            print("#", json.dumps(row), flush=True)
            rows.append(row)
    return {"machine": machine(), "precision": str(dtype), "slices_per_subject": args.slices, "rows": rows}


def print_table(report: dict[str, Any]) -> None:
    """Every row, then each model's mean; a level a model does not have is ``-``."""
    rows = report["rows"]
    columns = sorted({c for r in rows for c in r if c.startswith("l")}) + ["coarser up", "oracle fine", "truth up"]

    def cells(values: dict[str, float]) -> str:
        return " | ".join(f"{values[c]:.3f}" if c in values else "-" for c in columns)

    print("| model | pair | subject | " + " | ".join(columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['pair']} | {r['subject']} | {cells(r)} |")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        means = {c: float(np.mean([r[c] for r in mine])) for c in mine[0] if c in columns}
        print(f"| {model} | mean | | {cells(means)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True, help="a model folder (repeatable)")
    parser.add_argument("--slices", type=int, default=12, help="slices per validation subject, 30-70 %% of its depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / "results" / "quality-runs" / "cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args)
    print_table(report)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

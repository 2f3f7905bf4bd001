"""Percentile-scaled against rank-normalised sources (``ModelConfig.source_norm``): how fast a small network
learns each pair's intensity mapping from each, on a subject it never saw.

The network is the shape of PHMDiff's refinement head (three 3x3 convolutions, 32 channels), trained as a
plain L2 regression on the coarsest pyramid level (60 px, 4 mm) of ``phmdiff train``'s augmented 2.5D slices of
the three training subjects, with the same seed, data order and steps for both normalisations; it is scored on
16 slices of the held-out TCGA-DU-7294 by the Pearson correlation with the real target inside the brain (the
target's foreground), which no intensity rescaling changes. The engine's network is far larger and trains on a
diffusion loss; this isolates what the input normalisation alone does to learning the mapping.

    python benchmarks/source_norm.py            # ~5 min on 2 CPU cores (one thread)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from engine_speed import DATA, ROOT, machine
from torch import nn

from phmdiff_cli.data.normalize import SOURCE_NORMS
from phmdiff_cli.data.slices import SliceDataset
from phmdiff_cli.diffusion.pyramid import downsample
from phmdiff_cli.engine.settings import TrainSettings
from phmdiff_cli.engine.train_data import load_data, slice_dataset
from phmdiff_cli.engine.trainer import run_model_config

VAL_SUBJECT = "TCGA-DU-7294"
PAIRS = ("t1n:t2w", "t1n:t2f", "t2w:t2f")
RESULTS = ROOT / "benchmarks" / "results" / "source_norm.json"
#: Area-downsampling of the 240 px model grid to the coarsest pyramid level of ``small`` (60 px).
FACTOR = 4


def datasets(pair: str, norm: str, cache: Path) -> tuple[SliceDataset, SliceDataset]:
    """Training (augmented) and validation slices of ``pair``, as ``phmdiff train`` builds them."""
    settings = TrainSettings(data=str(DATA / "brats"), pairs=pair, val_subjects=[VAL_SUBJECT],
                             cache_dir=str(cache), source_norm=norm)
    data = load_data(settings)
    config = run_model_config(settings, data)
    common: dict[str, Any] = {"settings": settings, "config": config, "cache": cache, "progress": False,
                              "console": None}
    return (slice_dataset(data, data.train_ids, augment=True, **common),
            slice_dataset(data, data.val_ids, augment=False, **common))


def head_shaped_net(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.GELU(), nn.Conv2d(32, 1, 3, padding=1))


def brain_correlation(net: nn.Module, source: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        pred = net(source)
    brain = target > -0.98  # the target's foreground: above 1 % of its model range
    return float(np.corrcoef(pred[brain].numpy(), target[brain].numpy())[0, 1])


def run_one(pair: str, norm: str, args: argparse.Namespace) -> dict[str, Any]:
    train, val = datasets(pair, norm, args.cache_dir)
    depth = val.subjects[0].depth
    samples = [val[(0, z, 0)] for z in np.linspace(0.3 * depth, 0.7 * depth, 16).astype(int)]
    val_source = downsample(torch.stack([s["source"][0] for s in samples]), FACTOR)
    val_target = downsample(torch.stack([s["target"] for s in samples]), FACTOR)
    torch.manual_seed(args.seed)
    net = head_shaped_net(val_source.shape[1])
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr)
    loader = iter(torch.utils.data.DataLoader(train, batch_size=8, sampler=train.sampler(seed=args.seed)))
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(loader)
        loss = F.mse_loss(net(downsample(batch["source"][:, 0], FACTOR)), downsample(batch["target"], FACTOR))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            curve.append({"step": step, "brain_corr": round(brain_correlation(net, val_source, val_target), 4)})
    return {"pair": pair, "source_norm": norm, "curve": curve, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "brain-small" / "cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run_one(pair, norm, args) for pair in PAIRS for norm in SOURCE_NORMS]
    steps = [point["step"] for point in rows[0]["curve"]]
    print("| pair | sources | " + " | ".join(f"corr @ {s}" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for row in rows:
        print(f"| {row['pair']} | {row['source_norm']} | "
              + " | ".join(f"{p['brain_corr']:.3f}" for p in row["curve"]) + " |")
    report = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

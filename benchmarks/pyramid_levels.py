"""What each pyramid level of a trained model adds: its prediction against the real target, level by level.

On the model's held-out validation slices (as ``sampling_steps.py`` picks them), every level l makes one
denoiser evaluation at ``sigma_max`` (pure noise in: the conditional mean that the few-step default sampler
starts from, and at the finer levels nearly all it does) with two coarse conditions, beside two no-model references:

- ``real coarse``: the real target of level l - 1, upsampled: what training conditions on (teacher forcing);
- ``chained``: the model's own level l - 1 prediction (plus ``--coarse-noise`` Gaussian noise at its
  resolution), upsampled: what sampling conditions on;
- ``copy``: no model, the real coarse target upsampled: what a level that only copies its condition scores;
- ``chained copy``: no model at this level, the model's own level l - 1 prediction upsampled: what sampling
  would give without the level (the chained score minus this one is what the level adds when sampling).

Scores per level, inside the real target's foreground (model range > -0.99): Pearson correlation and RMSE (model
range, [-1, 1]) with the real target of that level. A finer level that adds information from the sources keeps
or raises the chained correlation from the level below; one that copies its condition loses it.

    python benchmarks/pyramid_levels.py --cache-dir runs/brain-small/cache      # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from engine_speed import ROOT, machine
from sampling_steps import model_arguments, run_and_report, validation_slices
from torch import Tensor

from phmdiff_cli.diffusion.edm import denoise
from phmdiff_cli.diffusion.pyramid import image_pyramid, upsample
from phmdiff_cli.engine.pretrained import load_pretrained
from phmdiff_cli.engine.validation import fixed_subset

RESULTS = ROOT / "benchmarks" / "results" / "pyramid_levels.json"


def agreement(pred: Tensor, real: Tensor) -> dict[str, float]:
    """Correlation and RMSE of (B, 1, h, w) ``pred`` with ``real`` inside ``real``'s foreground."""
    fg = real > -0.99
    a, b = pred[fg].double(), real[fg].double()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    return {"corr": round(float(corr), 4), "rmse": round(float((a - b).pow(2).mean().sqrt()), 4)}


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, Any]:
    pretrained = load_pretrained(args.model)
    model, cfg = pretrained.model, pretrained.config
    dataset = validation_slices(pretrained, args.pair, args.cache_dir, args.data)
    items = [dataset[key] for key in fixed_subset(dataset, args.val_slices)]
    batch = {name: torch.stack([item[name] for item in items]) for name in items[0]}
    reals, sources = image_pyramid(batch["target"], cfg.levels), image_pyramid(batch["source"], cfg.levels)
    generator = torch.Generator().manual_seed(args.seed)
    rows, chained = [], None
    for level in range(cfg.levels):
        side = cfg.level_size(level)
        x = torch.randn(len(items), 1, side, side, generator=generator) * cfg.sampling.sigma_max
        sigma = torch.full((len(items),), cfg.sampling.sigma_max)

        def predict(coarse: Tensor | None, level: int = level, x: Tensor = x, sigma: Tensor = sigma) -> Tensor:
            return denoise(model, x, sigma, sources[level], coarse, batch["src_mod"], batch["tgt_mod"],
                           level=level).clamp(-1.0, 1.0)

        row: dict[str, Any] = {"level": level, "side_px": side}
        if level == 0:
            chained = predict(None)
            row["chained"] = agreement(chained, reals[0])
        else:
            real_coarse = upsample(reals[level - 1], side)
            noise = args.coarse_noise * torch.randn(chained.shape, generator=generator)
            own_coarse = upsample(chained + noise, side)
            chained = predict(own_coarse)
            row.update(real_coarse=agreement(predict(real_coarse), reals[level]),
                       chained=agreement(chained, reals[level]), copy=agreement(real_coarse, reals[level]),
                       chained_copy=agreement(own_coarse, reals[level]))
        rows.append(row)
        print(_line(row), flush=True)
    return {"machine": machine(), "model": str(pretrained.path), "sha256": pretrained.card.get("sha256"),
            "pair": args.pair, "val_subjects": pretrained.card["training"]["subjects"]["val"],
            "slices": len(items), "coarse_noise": args.coarse_noise, "seed": args.seed, "rows": rows}


def _line(row: dict[str, Any]) -> str:
    cells = [f"{row[k]['corr']:.3f} / {row[k]['rmse']:.3f}" if k in row else "-"
             for k in ("real_coarse", "chained", "copy", "chained_copy")]
    return f"| {row['level']} | {row['side_px']} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(parser, RESULTS)
    parser.add_argument("--pair", default="t1n:t2w", help="the pair to score (of the model's)")
    parser.add_argument("--coarse-noise", type=float, default=0.0,
                        help="std of the noise added to the chained coarse prediction (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    run_and_report(parser, ["level", "px", "real coarse: corr / RMSE", "chained: corr / RMSE", "copy: corr / RMSE",
                            "chained copy: corr / RMSE"], run)


if __name__ == "__main__":
    main()

"""Helpers of the ``phmdiff synthesize`` tests: a tiny random model saved as the trainer would, cropped real
volumes, and stand-ins for the sampler (identity, NaN, out-of-memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typer.testing import CliRunner, Result

from phmdiff_cli.cli.app import app
from phmdiff_cli.config import model_config
from phmdiff_cli.data.slices import parse_pairs
from phmdiff_cli.engine.checkpoint import save_model
from phmdiff_cli.engine.pretrained import build_card
from phmdiff_cli.io import Volume, read_volume, write_volume

__all__ = [
    "PAIRS",
    "T1N",
    "T2W",
    "write_tiny_model",
    "crop_z",
    "run",
    "records",
    "identity_sample",
    "correlation",
]

#: What the test model "supports"; geometry and plumbing need no trained weights.
PAIRS = "t1n:t2w,t1n+t2w:t2f,pd:t1n,mr:ct"
T1N = "brats/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz"  # LPS, int16
T2W = "brats/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2w.nii.gz"

runner = CliRunner()


def write_tiny_model(folder: Path, source_norm: str = "rank") -> Path:
    """A ``tiny`` PHMDiff on a 64-pixel grid at 3.75 mm (a 240 mm field of view: a brain fits), its weights
    perturbed from the DiT initialisation (whose zero output layers would ignore the sources), saved with its
    card like a trained model. ``percentile`` sources let :func:`identity_sample` reproduce the input's values
    (with ``rank`` it reproduces their ranks)."""
    config = model_config("tiny", spacing_mm=3.75, max_sources=2, source_norm=source_norm)
    from phmdiff_cli.models import PHMDiff

    torch.manual_seed(0)
    model = PHMDiff(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    save_model(folder, model.state_dict(), build_card(config, parse_pairs(PAIRS)))
    return folder


def crop_z(source: Path, out: Path, z0: int, z1: int) -> Path:
    """Slices ``z0:z1`` of a real volume written to ``out`` on their sub-grid (origin moved along z)."""
    volume = read_volume(source)
    origin = np.asarray(volume.origin) + volume.direction_matrix[:, 2] * volume.spacing[2] * z0
    cropped = Volume(
        np.ascontiguousarray(volume.array[z0:z1]), volume.spacing, tuple(origin), volume.direction
    )
    return write_volume(cropped, out)


def run(*args: str | Path, input: str | None = None) -> Result:
    """``phmdiff synthesize ARGS`` in-process."""
    return runner.invoke(app, ["synthesize", *map(str, args)], input=input)


def records(result: Result) -> list[dict[str, Any]]:
    """The per-case records of a ``--json`` run."""
    return json.loads(result.stdout)["cases"]


def identity_sample(
    model: torch.nn.Module,
    source: torch.Tensor,
    src_mod: torch.Tensor,
    tgt_mod: torch.Tensor,
    *,
    samples: int = 1,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A stand-in for :func:`phmdiff_cli.diffusion.sample` that returns the first source's centre slice: the
    output must then reproduce the input volume, voxel for voxel up to the model grid's blur."""
    mean = source[:, :1, model.config.context].clone()
    return mean, torch.zeros_like(mean) if samples > 1 else None


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays of the same shape."""
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])

"""Validation during training: synthesize a fixed subset of validation slices, score them with the metric code
of ``phmdiff eval``, and draw a preview image (source | synthesized | real).

The subset is fixed for the whole run (the same slices, the same initial noise) so successive evaluations are
comparable; a few sampler steps per level keep it cheap. Metrics follow ``phmdiff eval``'s conventions for the
target modality (:func:`~phmdiff_cli.metrics.evaluate.resolve_norm` ``auto``: the percentile scale for MRI,
the SynthRAD CT window for CT) inside the reference's automatic foreground mask. Because the slices of the
subset are not neighbours, SSIM is the 2-D SSIM per slice averaged over slices (``ssim2d`` of ``phmdiff
eval``), reported here as ``ssim``; sharpness is ``phmdiff eval``'s (in-plane gradients, prediction over
reference). Metrics are kept per validation subject and averaged per pair, then over pairs: the run is
never judged on one brain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from phmdiff_cli.data.normalize import from_model_range
from phmdiff_cli.data.slices import SampleKey, SliceDataset
from phmdiff_cli.diffusion import sample
from phmdiff_cli.engine.device import autocast
from phmdiff_cli.io.atomic import atomic_path
from phmdiff_cli.metrics.evaluate import EvalSettings, auto_mask, image_scores, resolve_norm, scale_pair
from phmdiff_cli.modalities import is_ct

__all__ = ["VAL_METRICS", "Validation", "fixed_subset", "item_scores", "validate", "write_preview"]

#: ``phmdiff eval`` metric names used, and the names they are logged under.
VAL_METRICS = {"psnr": "psnr", "ssim2d": "ssim", "sharpness": "sharpness"}
#: Preview tiles are upscaled (nearest) to at least this many pixels a side.
_PREVIEW_MIN_TILE = 128


@dataclass
class Validation:
    """What one evaluation found.

    Attributes:
        pairs: ``"t1n:t2w"`` -> ``{"psnr": dB, "ssim": ..., "sharpness": ...}``, averaged over the validation
            subjects having the pair.
        mean: the same metrics averaged over the pairs (each pair counts once).
        subjects: subject id -> pair -> metrics, and under ``"mean"`` that subject's mean over its pairs.
        preview: rows ``(label, source, synthesized, real)`` of ``(H, W)`` model-range slices.
    """

    pairs: dict[str, dict[str, float]]
    mean: dict[str, float]
    subjects: dict[str, dict[str, dict[str, float]]]
    preview: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]


def _mean(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Metric-wise mean of score dicts (NaN for none)."""
    return {m: float(np.mean([r[m] for r in rows])) if rows else math.nan for m in VAL_METRICS.values()}


def fixed_subset(dataset: SliceDataset, per_item: int) -> list[SampleKey]:
    """``per_item`` slices of every (subject, pair) item, evenly spread over the slices whose target
    foreground is at least half of the item's fullest slice (the body of the organ, not its tips)."""
    keys: list[SampleKey] = []
    for item, (subject, pair) in enumerate(dataset.items):
        fg = dataset.subjects[subject].foreground[pair.target]
        candidates = np.flatnonzero(fg >= 0.5 * fg.max()) if fg.max() > 0 else np.arange(fg.size)
        picks = np.unique(
            np.linspace(0, candidates.size - 1, min(per_item, candidates.size)).round().astype(int)
        )
        keys += [(item, int(candidates[p]), 0) for p in picks]
    return keys


@torch.no_grad()
def _synthesize(
    model: nn.Module,
    dataset: SliceDataset,
    keys: Sequence[SampleKey],
    *,
    steps: int | Sequence[int],
    sampler: str,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    seed: int,
) -> dict[SampleKey, dict[str, np.ndarray]]:
    """Per key: float32 ``(H, W)`` model-range ``source`` (slot 0, centre slice), ``pred`` and ``real``."""
    out: dict[SampleKey, dict[str, np.ndarray]] = {}
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        batch = [dataset[key] for key in chunk]
        source = torch.stack([b["source"] for b in batch]).to(device)
        src_mod = torch.stack([b["src_mod"] for b in batch]).to(device)
        tgt_mod = torch.stack([b["tgt_mod"] for b in batch]).to(device)
        skull = torch.stack([b["skull"] for b in batch]).to(device)
        with autocast(device, dtype):
            pred, _ = sample(model, source, src_mod, tgt_mod, steps=steps, sampler=sampler, noise_seed=seed,
                             skull=skull)
        pred = pred.float().cpu().numpy()
        centre = dataset.k
        for i, key in enumerate(chunk):
            out[key] = {
                "source": batch[i]["source"][0, centre].numpy(),
                "pred": pred[i, 0],
                "real": batch[i]["target"][0].numpy(),
            }
    return out


def item_scores(
    dataset: SliceDataset,
    item: int,
    pred: np.ndarray,
    real: np.ndarray,
    metrics: Mapping[str, str] = VAL_METRICS,
) -> dict[str, float] | None:
    """Metrics of one (subject, pair) item's slices, as ``phmdiff eval`` computes them on file-unit volumes
    (the MRI background at 0); None when the reference has no foreground.

    Args:
        dataset: the validation slices. item: the (subject, pair) index.
        pred, real: float32 ``(n, H, W)`` model-range slices of that item (the whole volume for 3-D metrics).
        metrics: ``phmdiff eval`` metric name -> the name it is reported under.
    """
    subject, pair = dataset.items[item]
    params = dataset.subjects[subject].params[pair.target]
    if not is_ct(pair.target):  # MRI background at 0 (a z-scored volume's fill too), as eval expects
        params = replace(params, lo=0.0, hi=params.hi - params.lo)
    pred, real = from_model_range(pred, params), from_model_range(real, params)
    mask = auto_mask(real, pair.target)
    if not mask.any():
        return None
    scaled = scale_pair(pred, real, modality=pair.target, norm=resolve_norm("auto", pair.target))
    scores = image_scores(scaled, mask, EvalSettings(metrics=tuple(metrics)))
    return {metrics[name]: value for name, value in scores.items()}


def validate(
    model: nn.Module,
    dataset: SliceDataset,
    keys: Sequence[SampleKey],
    *,
    steps: int | Sequence[int],
    sampler: str,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    seed: int,
    preview_rows: int = 3,
) -> Validation:
    """Synthesize ``keys`` (from :func:`fixed_subset`) with ``model`` (e.g. the EMA weights) and score them.

    Args:
        model: a PHMDiff (put in eval mode by the caller).
        dataset: the validation slices (no augmentation).
        keys: the fixed subset.
        steps: sampler steps, for every level or per level (coarse to fine).
        sampler: ``"euler"`` or ``"heun"``.
        batch_size: slices per sampling batch.
        device, dtype: where and in which autocast precision to sample.
        seed: initial-noise seed (the same at every evaluation).
        preview_rows: slices per pair in the preview, from the first validation subject having the pair.
    """
    results = _synthesize(
        model,
        dataset,
        keys,
        steps=steps,
        sampler=sampler,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    per_pair: dict[str, list[dict[str, float]]] = {}
    subjects: dict[str, dict[str, dict[str, float]]] = {}
    preview: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    shown: set[str] = set()
    for item, (subject, pair) in enumerate(dataset.items):
        slices = [results[k] for k in keys if k[0] == item]
        stacked = {name: np.stack([s[name] for s in slices]) for name in ("pred", "real")} if slices else None
        scores = item_scores(dataset, item, stacked["pred"], stacked["real"]) if stacked else None
        if scores is not None:
            per_pair.setdefault(str(pair), []).append(scores)
            subjects.setdefault(dataset.subjects[subject].id, {})[str(pair)] = scores
        if str(pair) not in shown and slices:
            shown.add(str(pair))
            step = max(1, len(slices) // preview_rows)
            preview += [(str(pair), s["source"], s["pred"], s["real"]) for s in slices[::step][:preview_rows]]
    pairs = {name: _mean(rows) for name, rows in per_pair.items()}
    for found in subjects.values():
        found["mean"] = _mean(list(found.values()))
    return Validation(pairs, _mean(list(pairs.values())), subjects, preview)


def _to_uint8(tile: np.ndarray, scale: int) -> np.ndarray:
    """A model-range slice as 8-bit grey, upscaled ``scale`` times (nearest)."""
    grey = np.clip((tile + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return grey.repeat(scale, axis=0).repeat(scale, axis=1)


def write_preview(path: Path, preview: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """Write a PNG grid, one row per slice: source | synthesized | real, labelled with the pair (atomic).

    Slices are shown in the model's axial orientation (array row 0 at the top)."""
    height, width = preview[0][1].shape
    scale = max(1, math.ceil(_PREVIEW_MIN_TILE / max(height, width)))
    rows = [np.concatenate([_to_uint8(t, scale) for t in tiles], axis=1) for _, *tiles in preview]
    image = Image.fromarray(np.concatenate(rows, axis=0))
    draw = ImageDraw.Draw(image)
    tile_h = height * scale
    for row, (label, *_) in enumerate(preview):
        draw.text((3, row * tile_h + 2), label, fill=255)
        for col, name in enumerate(("source", "synthesized", "real")):
            draw.text((col * width * scale + 3, row * tile_h + tile_h - 13), name, fill=255)
    with atomic_path(path, force=True) as tmp:
        image.save(tmp, format="PNG")
    return path

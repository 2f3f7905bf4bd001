"""Does synthesis help segmentation? Train a MONAI UNet on real images only and another on real + synthetic
images, with the same seed and step budget, and score both on held-out *real* subjects (Dice, HD95 per label).

The segmenter is 2-D: it sees the axial slices of the canonical volume (:func:`phmdiff_cli.io.to_canonical`),
resampled in-plane onto a square grid (:class:`~phmdiff_cli.data.grid.ModelGrid`), with the image channels
normalised per volume to [-1, 1] as the synthesis model's inputs are. This is fast enough for a CPU and
measures whether the synthetic images help a segmenter trained on this data; it is not the best segmentation
one could get (train nnU-Net on the written ``dataset.json`` for that). Predictions are put back on each label
map's own grid (nearest neighbour) and scored there, so Dice and HD95 (mm) refer to the files as given.

BraTS label maps (any release: :mod:`phmdiff_cli.metrics.regions`) are scored on the tumour regions (whole tumour,
tumour core, enhancing tumour), other label maps per label. With ``folds`` > 1 the eligible subjects are split into
that many folds, each tested once by segmenters trained on the other subjects (same seed and step budget for both
arms); results are the mean and standard deviation over folds.

Arms (:data:`ARMS`): ``real`` trains on each training subject's real images; ``real+synthetic`` adds, for each
training subject, its missing channels completed by synthetic variant 0 and one extra sample per synthetic
variant. A channel with no image in an arm is zero-filled (an all-zero image, which normalises to the
background -1). Test inputs: the real images; with ``drop`` modalities also the synthetic stand-ins and
zero-filled images in their place, and the trivial substitute: the first kept channel (e.g. T1c) mapped by quantiles
onto the training subjects' pooled histogram of the dropped modality ("hist-matched"). Together they show what
synthesis recovers when a modality is missing at inference. A subject's brain mask, where it has one, bounds the
intensity fit of its images.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from phmdiff_cli.data.grid import MODEL_BACKGROUND, GridTransform, ModelGrid, from_model_grid, to_model_grid
from phmdiff_cli.data.layouts import LABEL_KEY, MASK_KEY
from phmdiff_cli.data.preprocess import prepare_volume, resample_onto
from phmdiff_cli.engine.augment import Entry
from phmdiff_cli.engine.device import autocast, grad_scaler
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import Volume, from_canonical, read_volume, to_canonical
from phmdiff_cli.metrics import dice, hd95
from phmdiff_cli.metrics.regions import REGIONS, detect_convention, region_map

__all__ = [
    "ARMS",
    "REAL_INPUT",
    "SegSettings",
    "SegCase",
    "ProgressFn",
    "cases_from_entries",
    "split_cases",
    "fold_splits",
    "build_network",
    "train_segmenter",
    "predict",
    "run_benchmark",
]

ARMS = ("real", "real+synthetic")
REAL_INPUT = "real"
#: Model-range values at most this far above the background count as background (anti-aliasing round-off).
_BACKGROUND_TOL = 1e-3
#: ``fn(stage, done, total)``; stage: "load", "train real", "train real+synthetic", "test" (with " (fold k)").
ProgressFn = Callable[[str, int, int], None]
#: ``fn(fold, arm, test_input, subject, x, classes, label)`` for every test prediction, on the segmentation grid:
#: x ``(z, C, H, W)`` the input channels, classes and label ``(z, H, W)`` class indices.
PredictionFn = Callable[[int, str, str, str, np.ndarray, np.ndarray, np.ndarray], None]
#: Quantiles kept of a modality's pooled training histogram (the hist-matched substitute).
_QUANTILES = 1001


@dataclass(frozen=True)
class SegSettings:
    """Segmenter and budget.

    Attributes:
        epochs: passes over the real arm's training slices; both arms get the same number of steps.
        minutes: wall-time cap per arm (the arms may then get different step counts: reported).
        batch_size: slices per step.
        learning_rate: Adam learning rate.
        size: in-plane grid, pixels (a multiple of 8: three 2x downsamplings).
        spacing_mm: in-plane grid spacing, mm.
        width: channels of the UNet's first level (doubled at each of its 4 levels).
        test_fraction: share of the eligible labelled subjects held out for testing (at least one); with
            ``folds`` > 1 unused.
        folds: 1 (one held-out split) or the number of folds of a cross-validation (every eligible subject
            tested once).
        seed: network initialisation, batch order and test split.
    """

    epochs: int = 20
    minutes: float | None = None
    batch_size: int = 16
    learning_rate: float = 1e-3
    size: int = 128
    spacing_mm: float = 2.0
    width: int = 16
    test_fraction: float = 0.25
    folds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"--seg-epochs must be at least 1, got {self.epochs}"),
            (self.minutes is None or self.minutes > 0, f"--seg-minutes must be positive, got {self.minutes}"),
            (self.batch_size >= 1, f"--seg-batch-size must be at least 1, got {self.batch_size}"),
            (
                self.size >= 16 and self.size % 8 == 0,
                f"--seg-size must be a multiple of 8 (>= 16), got {self.size}",
            ),
            (self.spacing_mm > 0, f"--seg-spacing must be positive, got {self.spacing_mm}"),
            (self.width >= 2, f"--seg-width must be at least 2, got {self.width}"),
            (
                0 < self.test_fraction < 1,
                f"--test-fraction must be between 0 and 1, got {self.test_fraction}",
            ),
            (self.folds >= 1, f"--folds must be at least 1, got {self.folds}"),
        ]
        for ok, problem in checks:
            if not ok:
                raise InputError(problem)


@dataclass(frozen=True)
class SegCase:
    """One labelled subject of the augmented dataset.

    Attributes:
        subject: subject id.
        label: its label map.
        real: modality -> real image.
        synthetic: modality -> {variant: synthetic image}.
        mask: its brain mask, if any.
    """

    subject: str
    label: Path
    real: dict[str, Path]
    synthetic: dict[str, dict[int, Path]] = field(default_factory=dict)
    mask: Path | None = None


def cases_from_entries(root: Path, entries: Sequence[Entry]) -> list[SegCase]:
    """The labelled subjects of an augmented dataset (from its manifest entries), in subject order."""
    labels = {e.subject: root / e.path for e in entries if e.key == LABEL_KEY}
    cases = []
    for subject, label in sorted(labels.items()):
        mine = [e for e in entries if e.subject == subject and e.key not in (LABEL_KEY, MASK_KEY)]
        real = {e.key: root / e.path for e in mine if not e.synthetic}
        mask = next((root / e.path for e in entries if e.subject == subject and e.key == MASK_KEY), None)
        synthetic: dict[str, dict[int, Path]] = {}
        for e in mine:
            if e.synthetic:
                synthetic.setdefault(e.key, {})[int(e.variant or 0)] = root / e.path
        cases.append(SegCase(subject, label, real, synthetic, mask))
    return cases


def _eligible(case: SegCase, channels: Sequence[str], drop: Sequence[str]) -> bool:
    """A test subject needs every channel real (and a synthetic stand-in of each dropped modality)."""
    return all(m in case.real for m in channels) and all(0 in case.synthetic.get(m, {}) for m in drop)


def split_cases(
    cases: Sequence[SegCase], channels: Sequence[str], drop: Sequence[str], settings: SegSettings
) -> tuple[list[SegCase], list[SegCase]]:
    """``(train, test)``: a seeded random ``test_fraction`` (at least one) of the eligible subjects is held
    out.

    Raises:
        InputError: fewer than two labelled subjects, or no subject eligible for testing.
    """
    if len(cases) < 2:
        raise InputError(
            f"--evaluate needs at least 2 labelled subjects, found {len(cases)}",
            hint="add label maps (ID-seg.nii.gz) to more subjects",
        )
    eligible = [c for c in cases if _eligible(c, channels, drop)]
    if not eligible:
        need = f"every channel ({', '.join(channels)}) as a real image"
        raise InputError(
            f"no labelled subject can be held out for testing: one needs {need}"
            + (f" and a synthetic {'+'.join(drop)}" if drop else "")
        )
    count = min(max(1, round(settings.test_fraction * len(cases))), len(eligible), len(cases) - 1)
    order = np.random.default_rng(settings.seed).permutation(len(eligible))
    test = {eligible[i].subject for i in order[:count]}
    return [c for c in cases if c.subject not in test], [c for c in cases if c.subject in test]


def fold_splits(
    cases: Sequence[SegCase], channels: Sequence[str], drop: Sequence[str], settings: SegSettings
) -> list[tuple[list[SegCase], list[SegCase]]]:
    """``[(train, test), ...]``: one split (:func:`split_cases`), or with ``settings.folds`` > 1 the eligible
    subjects in seeded random order cut into that many folds, each fold tested by the others (and the
    non-eligible subjects) trained on.

    Raises:
        InputError: as :func:`split_cases`, or more folds than eligible subjects.
    """
    if settings.folds == 1:
        return [split_cases(cases, channels, drop, settings)]
    split_cases(cases, channels, drop, settings)  # the same checks
    eligible = [c for c in cases if _eligible(c, channels, drop)]
    if settings.folds > len(eligible):
        raise InputError(f"--folds {settings.folds} needs at least {settings.folds} subjects that can be tested, "
                         f"found {len(eligible)}", hint=f"use --folds {max(2, len(eligible))} or fewer")
    order = np.random.default_rng(settings.seed).permutation(len(eligible))
    out = []
    for fold in np.array_split(order, settings.folds):
        test = {eligible[i].subject for i in fold}
        out.append(([c for c in cases if c.subject not in test], [c for c in cases if c.subject in test]))
    return out


##################################################################################
#                          Volumes on the segmentation grid                      #
##################################################################################


@dataclass
class _Label:
    """A label map as read, and its class indices on the segmentation grid ``(z, size, size)``."""

    volume: Volume
    slices: np.ndarray
    transform: GridTransform


class _Loader:
    """Reads label maps and images onto the segmentation grid, each file once."""

    def __init__(self, grid: ModelGrid, values: Sequence[int], notes: list[str]) -> None:
        self.grid, self.values, self.notes = grid, np.asarray(values), notes
        self._labels: dict[Path, _Label] = {}
        self._images: dict[Path, np.ndarray] = {}
        self._masks: dict[Path, Volume] = {}

    def _mask(self, path: Path) -> Volume:
        """A brain mask as read, once per file (every image of a case uses it)."""
        if path not in self._masks:
            self._masks[path] = read_volume(path)
        return self._masks[path]

    def label(self, case: SegCase) -> _Label:
        if case.label not in self._labels:
            volume = read_volume(case.label)
            index = np.searchsorted(self.values, np.rint(volume.array).astype(np.int64)).astype(np.float32)
            slices, transform = to_model_grid(
                to_canonical(volume).with_array(index),
                self.grid,
                interpolator="nearest",
                background=0.0,
                warn_crop=False,
            )
            self._labels[case.label] = _Label(volume, np.rint(slices).astype(np.int64), transform)
        return self._labels[case.label]

    def image(self, path: Path, modality: str, case: SegCase) -> np.ndarray:
        """``(z, size, size)`` float32 in [-1, 1], on the case's label grid."""
        if path not in self._images:
            reference = self.label(case).volume
            volume = read_volume(path)
            if not volume.same_grid(reference, tol=1e-3):
                self.notes.append(f"{path.name}: resampled (linear) onto the grid of {case.label.name}")
                volume = resample_onto(volume, reference, nearest=False)
            mask = self._mask(case.mask) if case.mask is not None else None
            if mask is not None and not mask.same_grid(volume, tol=1e-3):
                mask = resample_onto(mask, volume, nearest=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prepared = prepare_volume(volume, self.grid, modality=modality, mask=mask)
            self.notes += [f"segmentation grid: {w.message}" for w in caught]
            self._images[path] = prepared.array
        return self._images[path]

    def stack(self, case: SegCase, inputs: dict[str, _Input], channels: Sequence[str]) -> np.ndarray:
        """``(z, C, size, size)``: the channels in order, zero-filled (background) where the input is None; an
        array input is used as it is (on the segmentation grid)."""
        empty = np.full(self.label(case).slices.shape, MODEL_BACKGROUND, np.float32)

        def plane(modality: str) -> np.ndarray:
            given = inputs[modality]
            if given is None:
                return empty
            return given if isinstance(given, np.ndarray) else self.image(given, modality, case)

        return np.stack([plane(m) for m in channels], axis=1)

    def quantiles(self, cases: Sequence[SegCase], modality: str) -> np.ndarray:
        """``(_QUANTILES,)`` quantiles of ``modality``'s foreground values pooled over ``cases`` (those with it
        real), on the segmentation grid in the model range."""
        values = [image[image > MODEL_BACKGROUND + _BACKGROUND_TOL] for case in cases if modality in case.real
                  for image in (self.image(case.real[modality], modality, case),)]
        return np.quantile(np.concatenate(values), np.linspace(0.0, 1.0, _QUANTILES)).astype(np.float32)


#: A channel of a sample: a file, None (zero-filled), or an array already on the segmentation grid.
_Input = Path | np.ndarray | None


def hist_matched(image: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """``image``'s foreground (above the background) mapped by quantiles onto a reference histogram given by its
    ``quantiles`` (increasing); background kept."""
    out = image.copy()
    fg = image > MODEL_BACKGROUND + _BACKGROUND_TOL
    ranks = np.empty(int(fg.sum()))
    ranks[np.argsort(image[fg], kind="stable")] = (np.arange(ranks.size) + 0.5) / max(ranks.size, 1)
    out[fg] = np.interp(ranks, np.linspace(0.0, 1.0, quantiles.size), quantiles)
    return out


def _base_inputs(case: SegCase, channels: Sequence[str], arm: str) -> dict[str, _Input]:
    """Real images; in the synthetic arm missing channels come from synthetic variant 0."""
    extra = arm != "real"
    return {m: case.real.get(m) or (case.synthetic.get(m, {}).get(0) if extra else None) for m in channels}


def _training_inputs(case: SegCase, channels: Sequence[str], arm: str) -> list[dict[str, _Input]]:
    """The samples of one training subject: the base one, and (synthetic arm) one per synthetic variant that
    is not already in it."""
    base = _base_inputs(case, channels, arm)
    if arm == "real":
        return [base]
    variants = sorted({v for m in channels for v in case.synthetic.get(m, {}) if v or m in case.real})
    return [base] + [{m: case.synthetic.get(m, {}).get(v, base[m]) for m in channels} for v in variants]


def _test_inputs(
    case: SegCase, channels: Sequence[str], drop: Sequence[str], loader: _Loader,
    quantiles: dict[str, np.ndarray],
) -> dict[str, dict[str, _Input]]:
    """Test input name -> channels: the real images, and with ``drop`` the synthetic, zero-filled and
    histogram-matched stand-ins (the first kept channel mapped onto ``quantiles[m]`` of each dropped ``m``)."""
    real: dict[str, _Input] = {m: case.real[m] for m in channels}
    inputs = {REAL_INPUT: real}
    if drop:
        name = "+".join(drop)
        inputs[f"synthesized {name}"] = {**real, **{m: case.synthetic[m][0] for m in drop}}
        inputs[f"zero-filled {name}"] = {**real, **{m: None for m in drop}}
        kept = next((m for m in channels if m not in drop), None)
        if kept is not None:
            source = loader.image(case.real[kept], kept, case)
            inputs[f"hist-matched {name}"] = {**real, **{m: hist_matched(source, quantiles[m]) for m in drop}}
    return inputs


def _training_set(
    loader: _Loader, cases: Sequence[SegCase], channels: Sequence[str], arm: str
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(x, y, counts)``: slices ``(N, C, H, W)`` float32 with foreground (image or label), their class
    indices ``(N, H, W)`` int64, and counts (samples, slices, zero-filled channels, synthetic images)."""
    xs, ys = [], []
    counts = {
        "cases": len(cases),
        "samples": 0,
        "slices": 0,
        "zero_filled_channels": 0,
        "synthetic_images": 0,
    }
    for case in cases:
        label = loader.label(case).slices
        for inputs in _training_inputs(case, channels, arm):
            x = loader.stack(case, inputs, channels)
            keep = (x.reshape(len(x), -1).max(axis=1) > MODEL_BACKGROUND + _BACKGROUND_TOL) | (
                label.reshape(len(label), -1).max(axis=1) > 0
            )
            xs.append(x[keep])
            ys.append(label[keep])
            counts["samples"] += 1
            counts["zero_filled_channels"] += sum(p is None for p in inputs.values())
            counts["synthetic_images"] += sum(p is not None and p != case.real.get(m) for m, p in inputs.items())
    x, y = np.concatenate(xs), np.concatenate(ys)
    counts["slices"] = len(x)
    return x, y, counts


##################################################################################
#                               Network and training                             #
##################################################################################


def build_network(in_channels: int, classes: int, width: int) -> nn.Module:
    """MONAI ``UNet``, 2-D, 4 levels of ``width * (1, 2, 4, 8)`` channels with two residual units each."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=classes,
        channels=tuple(width * 2**i for i in range(4)),
        strides=(2, 2, 2),
        num_res_units=2,
    )


def train_segmenter(
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    steps: int,
    settings: SegSettings,
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    on_step: Callable[[int], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh :func:`build_network` for ``steps`` steps (or ``settings.minutes``) with Dice + CE loss.

    Seeded and independent of the global RNG state: the same data and settings give the same network.

    Args:
        x: ``(N, C, H, W)`` float32 slices.
        y: ``(N, H, W)`` int64 class indices in ``[0, classes)``.
        classes: output classes, background included.
        steps: optimizer steps.
        settings: batch size, learning rate, width, seed, time cap.
        device, dtype: where it runs, and the autocast dtype (None: fp32).
        on_step: called with the number of steps done.

    Returns:
        ``(network in eval mode, stats)``: stats hold steps done, seconds, the last loss and whether the time
        cap stopped it.
    """
    from monai.losses import DiceCELoss

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        net = build_network(x.shape[1], classes, settings.width).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    scaler = grad_scaler(device, dtype)
    # batch=True: Dice over the whole batch, so slices without a structure do not score it 0 (2-D slices often
    # lack a label that the volume has).
    criterion = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    start = time.perf_counter()
    deadline = start + 60 * settings.minutes if settings.minutes else math.inf
    order, position, done, loss = torch.randperm(len(x), generator=generator), 0, 0, torch.zeros(())
    net.train()
    while done < steps and time.perf_counter() < deadline:
        if position >= len(x):
            order, position = torch.randperm(len(x), generator=generator), 0
        index = order[position : position + settings.batch_size].numpy()
        position += settings.batch_size
        images = torch.from_numpy(x[index]).to(device)
        target = torch.from_numpy(y[index])[:, None].to(device)
        with autocast(device, dtype):
            logits = net(images)
        loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        done += 1
        if on_step:
            on_step(done)
    stats = {
        "steps": done,
        "seconds": round(time.perf_counter() - start, 3),
        "final_loss": float(loss.item()),
        "stopped_by_time": done < steps,
    }
    return net.eval(), stats


@torch.no_grad()
def predict(
    net: nn.Module, x: np.ndarray, device: torch.device, dtype: torch.dtype | None, batch_size: int
) -> np.ndarray:
    """Class indices ``(N, H, W)`` int64 of slices ``x`` ``(N, C, H, W)``."""
    out = []
    for start in range(0, len(x), batch_size):
        with autocast(device, dtype):
            logits = net(torch.from_numpy(x[start : start + batch_size]).to(device))
        out.append(logits.float().argmax(dim=1).cpu().numpy())
    return np.concatenate(out).astype(np.int64)


##################################################################################
#                                    Scoring                                     #
##################################################################################


def _on_label_grid(classes: np.ndarray, label: _Label, values: np.ndarray) -> np.ndarray:
    """Predicted class indices on the segmentation grid -> label values on the label map's own grid."""
    canonical = from_model_grid(classes.astype(np.float32), label.transform, interpolator="nearest")
    native = from_canonical(to_canonical(label.volume).with_array(canonical), label.volume).array
    return values[np.rint(native).astype(np.int64)]


def _score(pred: np.ndarray, label: _Label, labels: Sequence[int], convention: str | None
           ) -> dict[str, dict[str, float]]:
    """Per region (BraTS ``convention``) or per label: Dice, and HD95 in mm (inf when the structure is in only
    one of the maps)."""
    ref = np.rint(label.volume.array).astype(np.int64)
    spacing = label.volume.spacing
    if convention is None:
        dices, distances = dice(pred, ref, labels=labels), hd95(pred, ref, spacing=spacing, labels=labels)
        return {str(v): {"dice": dices[v], "hd95": distances[v]} for v in labels}
    out = {}
    for region in REGIONS:
        p, r = region_map(pred, convention, region), region_map(ref, convention, region)
        out[region] = {"dice": dice(p, r, labels=[1])[1], "hd95": hd95(p, r, spacing=spacing, labels=[1])[1]}
    return out


def _summary(folds: Sequence[dict[str, dict[str, dict[str, float]]]], structures: Sequence[str]) -> dict[str, Any]:
    """Per structure: Dice as the mean over folds of each fold's mean over its test subjects, its standard
    deviation over folds (None for one fold), and HD95 averaged over the finite values of every test subject with
    the infinite ones (structure predicted but absent, or missed) counted apart."""
    cases = {subject: scores for fold in folds for subject, scores in fold.items()}
    mean: dict[str, dict[str, Any]] = {}
    for name in structures:
        per_fold = [float(np.mean([c[name]["dice"] for c in fold.values()])) for fold in folds]
        finite = [c[name]["hd95"] for c in cases.values() if math.isfinite(c[name]["hd95"])]
        mean[name] = {
            "dice": float(np.mean(per_fold)),
            "dice_std": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else None,
            "hd95": float(np.mean(finite)) if finite else None,
            "hd95_inf": len(cases) - len(finite),
        }
    return {"mean": mean, "mean_dice": float(np.mean([m["dice"] for m in mean.values()])), "cases": cases}


def run_benchmark(
    cases: Sequence[SegCase],
    channels: Sequence[str],
    values: Sequence[int],
    settings: SegSettings,
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    drop: Sequence[str] = (),
    on_progress: ProgressFn | None = None,
    on_prediction: PredictionFn | None = None,
) -> dict[str, Any]:
    """Train both :data:`ARMS` on each fold's training subjects and score them on its held-out real subjects.

    Args:
        cases: the labelled subjects (:func:`cases_from_entries`).
        channels: the segmenter's input modalities, in order.
        values: every label value of the dataset (0 included), sorted.
        settings: segmenter, budget, split or folds.
        device, dtype: where it runs and the autocast dtype.
        drop: modalities of the missing-modality scenario (each test subject needs a synthetic variant 0).
        on_progress: progress callback.
        on_prediction: called with every test prediction (e.g. to draw a figure).

    Returns:
        A JSON-ready report: segmenter, label convention and scored structures, folds with per-arm training
        stats, and ``results[arm][input]`` with per-structure Dice (mean and std over folds) / HD95 (mm) and
        per-subject scores, plus notes on what the numbers can and cannot say.

    Raises:
        InputError: too few labelled subjects, none eligible for testing, or an unreadable file.
    """
    progress = on_progress or (lambda *_: None)
    notes: list[str] = []
    folds = fold_splits(cases, channels, drop, settings)
    loader = _Loader(ModelGrid(settings.size, settings.spacing_mm), values, notes)
    labels = [int(v) for v in values if v != 0]
    convention = detect_convention(values)
    structures = list(REGIONS) if convention else [str(v) for v in labels]
    for n, case in enumerate(cases, start=1):
        loader.label(case)
        progress("load", n, len(cases))

    runs = [_run_fold(k, train, test, loader, channels, values, convention, settings, device, dtype, drop,
                      progress, on_prediction) for k, (train, test) in enumerate(folds)]
    inputs = list(runs[0]["scores"]["real"])
    notes += _caveats([r["training"] for r in runs], sum(len(test) for _, test in folds))
    return {
        "segmenter": {
            "network": "MONAI UNet, 2-D on axial slices",
            "features": [settings.width * 2**i for i in range(4)],
            "channels": list(channels),
            "classes": len(values),
            "loss": "Dice + cross-entropy (MONAI DiceCELoss)",
            "optimizer": f"Adam, learning rate {settings.learning_rate:g}",
            "zero_fill": "an absent channel is an all-zero image (normalised: background, -1)",
            "settings": asdict(settings),
            "steps_budget": [r["steps_budget"] for r in runs],
        },
        "folds": [{"train": [c.subject for c in train], "test": [c.subject for c in test],
                   "training": run["training"]} for (train, test), run in zip(folds, runs, strict=True)],
        "labels": labels,
        "convention": convention,
        "structures": structures,
        "drop": list(drop),
        "inputs": inputs,
        "results": {arm: {name: _summary([r["scores"][arm][name] for r in runs], structures) for name in inputs}
                    for arm in ARMS},
        "notes": notes,
    }


def _run_fold(
    fold: int,
    train: Sequence[SegCase],
    test: Sequence[SegCase],
    loader: _Loader,
    channels: Sequence[str],
    values: Sequence[int],
    convention: str | None,
    settings: SegSettings,
    device: torch.device,
    dtype: torch.dtype | None,
    drop: Sequence[str],
    progress: ProgressFn,
    on_prediction: PredictionFn | None,
) -> dict[str, Any]:
    """Both arms trained on ``train`` with one step budget, scored on ``test``: training stats and
    ``scores[arm][input][subject]``."""
    tag = f" (fold {fold + 1})" if settings.folds > 1 else ""
    sets = {arm: _training_set(loader, train, channels, arm) for arm in ARMS}
    steps = settings.epochs * math.ceil(len(sets["real"][0]) / settings.batch_size)
    training: dict[str, dict[str, Any]] = {}
    nets: dict[str, nn.Module] = {}
    for arm, (x, y, counts) in sets.items():
        on_step = functools.partial(_report_step, progress, f"train {arm}{tag}", steps)
        nets[arm], stats = train_segmenter(x, y, len(values), steps, settings, device, dtype, on_step=on_step)
        training[arm] = {**counts, **stats}
    quantiles = {m: loader.quantiles(train, m) for m in drop}
    labels = [int(v) for v in values if v != 0]
    scores: dict[str, dict[str, dict[str, Any]]] = {arm: {} for arm in ARMS}
    for n, case in enumerate(test, start=1):
        label = loader.label(case)
        for name, case_inputs in _test_inputs(case, channels, drop, loader, quantiles).items():
            x = loader.stack(case, case_inputs, channels)
            for arm in ARMS:
                classes = predict(nets[arm], x, device, dtype, settings.batch_size)
                if on_prediction is not None:
                    on_prediction(fold, arm, name, case.subject, x, classes, label.slices)
                pred = _on_label_grid(classes, label, np.asarray(values))
                scores[arm].setdefault(name, {})[case.subject] = _score(pred, label, labels, convention)
        progress(f"test{tag}", n, len(test))
    return {"training": training, "steps_budget": steps, "scores": scores}


def _report_step(progress: ProgressFn, stage: str, total: int, done: int) -> None:
    progress(stage, done, total)


def _caveats(training: Sequence[dict[str, dict[str, Any]]], tested: int) -> list[str]:
    """What the numbers cannot say, stated with them (``training``: each fold's per-arm stats)."""
    out = []
    if tested < 5:
        out.append(f"{tested} held-out subject(s): differences between the arms are anecdotal, not significant")
    if all(t["real+synthetic"]["synthetic_images"] == 0 for t in training):
        out.append(
            "no synthetic image reached the real+synthetic arm (nothing missing and no --variants): both "
            "arms trained on the same data"
        )
    if any(arm["stopped_by_time"] for t in training for arm in t.values()):
        steps = "; ".join(", ".join(f"{arm} {a['steps']}" for arm, a in t.items()) for t in training)
        out.append(
            f"--seg-minutes stopped training before the step budget ({steps} steps): the arms are not on "
            "an equal budget"
        )
    return out

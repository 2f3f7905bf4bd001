"""The dataset of a training run: discovery, checks (modalities, complete subjects, grids), the subject split,
and the preprocessed slice datasets.

Every check reads image headers only, so bad data is refused before any preprocessing or run folder exists.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from phmdiff_cli.config import ModelConfig
from phmdiff_cli.data.grid import GridCropWarning, ModelGrid
from phmdiff_cli.data.layouts import Dataset, Subject, combine, discover
from phmdiff_cli.data.slices import Augment, Pair, SliceDataset, parse_pairs, split_subjects
from phmdiff_cli.data.summary import DatasetSummary, summary
from phmdiff_cli.engine.contrast import reference_ratio
from phmdiff_cli.engine.input_domain import domain_of, measure
from phmdiff_cli.engine.settings import TrainSettings
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import read_volume
from phmdiff_cli.modalities import is_ct

__all__ = ["TrainData", "load_data", "slice_dataset", "training_contrast", "training_domain"]


@dataclass
class TrainData:
    """The dataset as checked for training.

    Attributes:
        dataset: discovered subjects. summary: header facts. pairs: the pairs trained.
        train_ids, val_ids: the subject split (subjects serving at least one pair).
    """

    dataset: Dataset
    summary: DatasetSummary
    pairs: tuple[Pair, ...]
    train_ids: list[str]
    val_ids: list[str]
    split_rule: str = ""

    def subjects(self, ids: list[str]) -> list[Subject]:
        return [self.dataset.subject(sid) for sid in ids]


def _complete(subject: Subject, pair: Pair) -> bool:
    return set(pair.sources) | {pair.target} <= set(subject.images)


def _usable_subjects(dataset: Dataset, pairs: tuple[Pair, ...], skip_incomplete: bool) -> list[Subject]:
    """Subjects with every image of at least one pair.

    Raises:
        InputError: a modality of the pairs is in no subject, or a subject serves no pair (unless skipped).
    """
    where = dataset.manifest or dataset.root
    found = set(dataset.modalities)
    for pair in pairs:
        for modality in (*pair.sources, pair.target):
            if modality not in found:
                raise InputError(
                    f"no subject has a {modality} image (needed by {pair})",
                    path=where,
                    hint=f"modalities found: {', '.join(sorted(found)) or 'none'}",
                )
    usable = [s for s in dataset.subjects if any(_complete(s, p) for p in pairs)]
    for part in dataset.parts:  # several --data folders: each must serve a pair
        if not any(_complete(s, p) for s in part.subjects for p in pairs):
            raise InputError(
                "no subject of this folder has all the images of a pair",
                path=part.manifest or part.root,
                hint=f"its modalities: {', '.join(part.modalities) or 'none'}; pairs: "
                f"{', '.join(map(str, pairs))}",
            )
    incomplete = [s for s in dataset.subjects if s not in usable]
    if incomplete and not skip_incomplete:
        first = incomplete[0]
        needed = sorted({m for p in pairs for m in (*p.sources, p.target)} - set(first.images))
        raise InputError(
            f"subject {first.id} lacks {', '.join(needed)}: it has no complete pair",
            path=where,
            hint=f"{len(incomplete)} subject(s) are incomplete; add their images or pass "
            "--skip-incomplete to train without them",
        )
    if not usable:
        raise InputError("no subject has all the images of a pair", path=where)
    return usable


def _mm(spacing: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(s, 4) for s in spacing)


def _check_grids(data_summary: DatasetSummary, subjects: list[Subject], pairs: tuple[Pair, ...]) -> None:
    """Refuse, from the headers alone, a subject whose images differ in size or spacing from its reference
    (the target of its first pair, as the cache uses); origin and direction are checked on reading.

    Raises:
        InputError: naming the image and its reference, suggesting --resample.
    """
    infos = {(i.subject, i.key): i for i in data_summary.images if not i.synthetic}
    for subject in subjects:
        found = [p for p in pairs if _complete(subject, p)]
        ref = infos[(subject.id, found[0].target)]
        for modality in sorted({m for p in found for m in (*p.sources, p.target)}):
            image = infos[(subject.id, modality)]
            if image.size != ref.size or not np.allclose(image.spacing, ref.spacing, atol=1e-3):
                raise InputError(
                    f"not on the grid of {ref.path.name} (size {image.size} vs {ref.size}, spacing "
                    f"{_mm(image.spacing)} vs {_mm(ref.spacing)} mm)",
                    path=image.path,
                    hint=f"register the images, or let phmdiff resample them onto the {ref.key} grid "
                    "(--resample)",
                )


def _split(settings: TrainSettings, dataset: Dataset, ids: list[str]) -> tuple[list[str], list[str], str]:
    """Train and validation ids, and how they were chosen: ``--val-subjects``, else a seeded split of each
    dataset folder's subjects (so every folder of two or more subjects has a validation subject)."""
    if settings.val_subjects is None:
        train_ids: list[str] = []
        val_ids: list[str] = []
        for folder in dataset.folders:
            ours = [sid for sid in ids if dataset.folder_of(sid) == folder]
            train, val = split_subjects(ours, val_fraction=settings.val_fraction, seed=settings.seed)
            train_ids += train
            val_ids += val
        rule = f"seeded split: val_fraction {settings.val_fraction}, seed {settings.seed}"
        return sorted(train_ids), sorted(val_ids), rule + (" per folder" if dataset.parts else "")
    unknown = sorted(set(settings.val_subjects) - set(ids))
    if unknown:
        raise InputError(
            f"--val-subjects names unknown subject(s) {', '.join(unknown)}",
            hint=f"subjects: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}",
        )
    val_ids = sorted(set(settings.val_subjects))
    train_ids = [sid for sid in ids if sid not in val_ids]
    if not train_ids:
        raise InputError("--val-subjects leaves no subject to train on")
    return train_ids, val_ids, "--val-subjects"


def load_data(settings: TrainSettings, *, split: dict[str, Any] | None = None) -> TrainData:
    """Discover and check the dataset (or datasets, combined) of ``settings`` and split its subjects (or reuse
    a saved ``split``).

    Raises:
        InputError: see :func:`~phmdiff_cli.data.layouts.discover`, unknown or missing modalities, incomplete
            subjects, images on different grids (without ``resample``), bad validation subjects.
    """
    if not settings.data_folders or not settings.pairs:
        raise InputError(
            "--data and --pairs (or --source and --target) are required",
            hint="e.g. phmdiff train --data ./brats --pairs t1n:t2w --out runs/brain",
        )
    pairs = parse_pairs(settings.pairs)
    dataset = combine([discover(Path(folder)) for folder in settings.data_folders])
    data_summary = summary(dataset)
    usable = _usable_subjects(dataset, pairs, settings.skip_incomplete)
    if not settings.resample:
        _check_grids(data_summary, usable, pairs)
    ids = [s.id for s in usable]
    if split is not None:
        return TrainData(
            dataset, data_summary, pairs, list(split["train"]), list(split["val"]), split["rule"]
        )
    return TrainData(dataset, data_summary, pairs, *_split(settings, dataset, ids))


def slice_dataset(
    data: TrainData,
    ids: list[str],
    *,
    settings: TrainSettings,
    config: ModelConfig,
    cache: Path,
    augment: bool,
    progress: bool,
    console: Console | None,
) -> SliceDataset:
    """Preprocess (or read from the cache) the subjects ``ids``; grid-crop warnings are printed once each."""
    grid = ModelGrid(config.image_size, config.spacing_mm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GridCropWarning)
        dataset = SliceDataset(
            data.subjects(ids),
            data.pairs,
            grid,
            cache,
            k=config.context,
            slots=config.max_sources,
            augment=Augment(rotate=settings.rotate, zoom=settings.zoom, translate=settings.translate)
            if augment
            else None,
            source_norm=config.source_norm,
            resample=settings.resample,
            progress=progress,
        )
    if console is not None:
        for message in dict.fromkeys(
            str(w.message) for w in caught if issubclass(w.category, GridCropWarning)
        ):
            console.print(f"[yellow]Warning:[/] {escape(str(message))}", soft_wrap=True)
            console.print("[dim]Hint: pass a larger --spacing so the model grid covers the anatomy[/]")
    return dataset


def training_domain(data: TrainData) -> dict[str, Any]:
    """The model card's ``input_domain``: every source image of the training subjects measured
    (:func:`~phmdiff_cli.engine.input_domain.measure`; a subject's brain mask, where it has one on the image's grid,
    is the foreground)."""
    sources = {m for pair in data.pairs for m in pair.sources}
    stats = []
    for subject in data.subjects(data.train_ids):
        mask = read_volume(subject.mask) if subject.mask is not None else None
        for modality in sorted(sources & set(subject.images)):
            volume = read_volume(subject.images[modality])
            on_grid = mask is not None and mask.same_grid(volume, tol=1e-3)
            stats.append(measure(volume, modality, mask if on_grid else None))
    return domain_of(stats)


def training_contrast(data: TrainData) -> dict[str, float]:
    """The model card's ``contrast``: for each MRI target of the pairs, the mean median-to-99.5th-percentile
    ratio of the training subjects' real target images (:func:`~phmdiff_cli.engine.contrast.reference_ratio`),
    which a model whose ``sampling.contrast`` is on calibrates its output to."""
    targets = sorted({pair.target for pair in data.pairs if not is_ct(pair.target)})
    subjects = data.subjects(data.train_ids)
    return {m: round(reference_ratio((read_volume(s.images[m]).array for s in subjects if m in s.images), m), 4)
            for m in targets if any(m in s.images for s in subjects)}

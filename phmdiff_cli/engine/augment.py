"""Augment a segmentation dataset with synthetic images: complete missing modalities, add stochastic variants.

The augmented dataset keeps the input's layout (:func:`~phmdiff_cli.data.layouts.output_path`): real images,
labels and masks are copied bit-exact (or hard-/sym-linked), and every synthetic image carries the layout's
``_syn`` mark in its name (``ID-t2w_syn.nii.gz``: variant 0, ``ID-t2w_syn2.nii.gz``: variant 2), so discovery
keeps it apart from the real images. Beside them:

* ``manifest.csv``: one row per file (real or synthetic, from which source files, model, sha256, seed); it is
  also a valid ``csv`` layout manifest (columns ``subject, modality, path, synthetic``);
* ``dataset.json``: nnU-Net v2 style (``channel_names``, ``labels``, ``file_ending``, ``numTraining``) with an
  explicit ``dataset`` list of training cases (real cases completed with synthetic channels, plus one case per
  synthetic variant sharing the real label), which nnU-Net v2 and MONAI's data lists both read.

Synthetic images are made from real images only (never from other synthetic ones). Variant ``v`` uses noise
seed ``seed + v``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phmdiff_cli.data.layouts import LABEL_KEY, MASK_KEY, Dataset, Subject, output_path
from phmdiff_cli.data.slices import Pair
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import Volume, read_volume, write_volume
from phmdiff_cli.modalities import MODALITIES

if TYPE_CHECKING:
    from phmdiff_cli.engine.synthesizer import Synthesizer

__all__ = [
    "LINK_MODES",
    "MANIFEST_FILE",
    "DATASET_JSON",
    "MANIFEST_COLUMNS",
    "Job",
    "Entry",
    "SynthesizeFn",
    "check_locations",
    "plan_jobs",
    "augment_dataset",
    "synthesize_fn",
    "channels_of",
    "label_values",
    "write_manifest",
    "dataset_json",
]

#: How real files reach the output: bit-exact copies (default), hard links, or absolute symbolic links.
LINK_MODES = ("copy", "hardlink", "symlink")
MANIFEST_FILE = "manifest.csv"
DATASET_JSON = "dataset.json"
MANIFEST_COLUMNS = (
    "subject",
    "modality",
    "path",
    "synthetic",
    "variant",
    "reason",
    "pair",
    "sources",
    "seed",
    "model",
    "model_sha256",
    "origin",
)

#: ``fn(sources, target, seed, mask) -> image``: sources as read (modality set), the subject's brain mask or None;
#: the image on ``sources[0]``'s grid.
SynthesizeFn = Callable[[Sequence[Volume], str, int, Volume | None], Volume]


@dataclass(frozen=True)
class Job:
    """One synthetic image to make.

    Attributes:
        subject: subject id.
        pair: the model pair used; its sources are real images of the subject.
        variant: 0 for the completion of a missing modality (or the stand-in of a ``--drop`` modality), 1..K
            for the extra stochastic versions.
        seed: noise seed (base seed + variant).
        reason: ``"missing"`` (no real image of the target), ``"drop"`` (stand-in for a real image in the
            missing-modality scenario) or ``"variant"``.
    """

    subject: str
    pair: Pair
    variant: int
    seed: int
    reason: str


@dataclass(frozen=True)
class Entry:
    """One file of the augmented dataset: a row of ``manifest.csv``.

    Attributes:
        subject: subject (or nnU-Net case) id.
        key: canonical modality, :data:`~phmdiff_cli.data.layouts.LABEL_KEY` or ``MASK_KEY``.
        path: relative to the output root.
        synthetic: made by the model (else a copy or link of ``origin``).
        variant: synthetic variant, None for real files.
        reason: see :class:`Job`; ``"real"`` for real files.
        pair: the model pair (``t1n+t2w:t2f``) of a synthetic image.
        sources: the output-relative paths of the real images it was made from.
        seed: noise seed of a synthetic image.
        origin: the input file a real file came from (absolute).
    """

    subject: str
    key: str
    path: Path
    synthetic: bool = False
    variant: int | None = None
    reason: str = "real"
    pair: str = ""
    sources: tuple[Path, ...] = ()
    seed: int | None = None
    origin: str = ""


def check_locations(dataset: Dataset, out: Path) -> None:
    """Refuse an output that is, contains, or lies inside the input dataset (``--force`` would delete input
    files, or discovery would mix the two).

    Raises:
        InputError: the folders overlap.
    """
    data, target = dataset.root.resolve(), Path(out).resolve()
    if target == data or data in target.parents or target in data.parents:
        raise InputError(
            "the output folder overlaps the input dataset",
            path=out,
            hint=f"write the augmented dataset outside {dataset.root}",
        )


def _best_pair(pairs: Sequence[Pair], target: str, available: set[str]) -> Pair | None:
    """The model pair for ``target`` using the most available sources (the first such in the model's
    order)."""
    usable = [p for p in pairs if p.target == target and set(p.sources) <= available]
    return max(usable, key=lambda p: len(p.sources), default=None)


def plan_jobs(
    dataset: Dataset,
    pairs: Sequence[Pair],
    *,
    targets: Sequence[str] | None = None,
    variants: int = 0,
    drop: Sequence[str] = (),
    seed: int = 0,
) -> tuple[list[Job], list[str]]:
    """What to synthesize for each subject.

    A target the subject lacks gets variant 0 (``missing``); a ``drop`` modality it has gets variant 0 too
    (``drop``: the stand-in the scenario compares with the real image); every target it can be made for gets
    variants 1..``variants``. Each uses the model pair with the most sources among the subject's real images
    (the target itself excluded).

    Args:
        dataset: the input dataset.
        pairs: the model's pairs.
        targets: modalities to synthesize; default: the dataset's modalities that some pair produces.
        variants: extra stochastic versions per subject and target.
        drop: modalities of the missing-modality scenario (must be producible).
        seed: base noise seed.

    Returns:
        ``(jobs, notes)``: jobs in subject, target, variant order; notes name subjects left incomplete.

    Raises:
        InputError: a requested target or drop modality is not produced by any model pair, or variants < 0.
    """
    if variants < 0:
        raise InputError(f"--variants must be 0 or more, got {variants}")
    producible = {p.target for p in pairs}
    wanted = list(targets) if targets is not None else [m for m in dataset.modalities if m in producible]
    for modality in (*wanted, *drop):
        if modality not in producible:
            raise InputError(
                f"the model cannot synthesize {modality}", hint=f"it makes {', '.join(sorted(producible))}"
            )
    wanted = _canonical_order({*wanted, *drop})
    jobs: list[Job] = []
    notes: list[str] = []
    for subject in dataset.subjects:
        for target in wanted:
            pair = _best_pair(pairs, target, set(subject.images) - {target})
            missing = target not in subject.images
            if pair is None:
                if missing:
                    notes.append(
                        f"{subject.id}: lacks {target} and the model cannot make it from "
                        f"{'+'.join(sorted(subject.images)) or 'nothing'}"
                    )
                continue
            first = 0 if missing or target in drop else 1
            reason = "missing" if missing else "drop"
            jobs += [
                Job(subject.id, pair, v, seed + v, reason if v == 0 else "variant")
                for v in range(first, variants + 1)
            ]
    return jobs, notes


def _canonical_order(modalities: Iterable[str]) -> list[str]:
    """Modalities in the order of :data:`~phmdiff_cli.modalities.MODALITIES` (t1n, t1c, t2w, t2f, ...)."""
    order = list(MODALITIES)
    return sorted(set(modalities), key=order.index)


def synthesize_fn(synthesizer: Synthesizer, notes: list[str] | None = None) -> SynthesizeFn:
    """A :data:`SynthesizeFn` from a :class:`~phmdiff_cli.engine.synthesizer.Synthesizer`: the same model,
    device and settings with the job's seed; what the synthesizer noted (resampling, grid crop) and warned about
    (inputs unlike the training images) is appended to ``notes``."""
    from phmdiff_cli.engine.synthesizer import Synthesizer

    def run(sources: Sequence[Volume], target: str, seed: int, mask: Volume | None) -> Volume:
        settings = replace(synthesizer.settings, seed=seed, batch_size=synthesizer.batch_size)
        result = Synthesizer(synthesizer.pretrained, synthesizer.device, synthesizer.dtype, settings).run(
            sources, target, mask=mask
        )
        if notes is not None:
            notes.extend(n for n in (*result.notes, *result.warnings) if n not in notes)
        return result.image

    return run


def _place(src: Path, dst: Path, link: str) -> None:
    """Copy, hard-link or symlink ``src`` to ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link == "copy":
            shutil.copyfile(src, dst)  # the bytes; not the input's (often read-only) mode
        elif link == "hardlink":
            os.link(src, dst)
        else:
            os.symlink(src.resolve(), dst)
    except OSError as error:
        hint = "use --link copy (hard links need the same file system)" if link == "hardlink" else None
        raise InputError(f"cannot {link} into the output ({error.strerror})", path=src, hint=hint) from None


def _real_files(subject: Subject) -> list[tuple[str, Path]]:
    files = list(subject.images.items())
    files += [(key, path) for key, path in ((LABEL_KEY, subject.label), (MASK_KEY, subject.mask)) if path]
    return files


def augment_dataset(
    dataset: Dataset,
    root: Path,
    jobs: Sequence[Job],
    synthesize: SynthesizeFn,
    *,
    link: str = "copy",
    on_file: Callable[[Entry], None] | None = None,
) -> list[Entry]:
    """Write the augmented dataset into ``root`` (an existing, empty folder): the real files, then the jobs.

    Synthetic images already in the input (``Subject.synthetic``) are not carried over. A subject's sources
    are read once for all its jobs.

    Args:
        dataset: the input dataset (never modified).
        root: the output folder (the caller renames it into place when everything is written).
        jobs: from :func:`plan_jobs`.
        synthesize: makes one image (:func:`synthesize_fn`), from the subject's brain mask too where it has one.
        link: one of :data:`LINK_MODES`.
        on_file: called after each file (for progress).

    Returns:
        The manifest entries: each subject's real files, then its synthetic ones.

    Raises:
        InputError: unknown ``link``, a file that cannot be copied or linked, or an unreadable source.
    """
    if link not in LINK_MODES:
        raise InputError(f"unknown --link {link!r}", hint=f"use one of {', '.join(LINK_MODES)}")
    entries: list[Entry] = []
    for subject in dataset.subjects:
        for key, src in _real_files(subject):
            dst = output_path(dataset, root, subject.id, key)
            _place(src, dst, link)
            entries.append(Entry(subject.id, key, dst.relative_to(root), origin=str(src.resolve())))
            if on_file:
                on_file(entries[-1])
        volumes: dict[str, Volume] = {}
        mine = [j for j in jobs if j.subject == subject.id]
        mask = read_volume(subject.mask) if mine and subject.mask is not None else None
        for job in mine:
            for modality in job.pair.sources:
                if modality not in volumes:
                    volumes[modality] = read_volume(subject.images[modality])
                    volumes[modality].modality = modality  # nnU-Net names (case_0001) do not tell it
            image = synthesize([volumes[m] for m in job.pair.sources], job.pair.target, job.seed, mask)
            dst = output_path(dataset, root, subject.id, job.pair.target, synthetic=True, variant=job.variant)
            dst.parent.mkdir(parents=True, exist_ok=True)
            write_volume(image, dst)
            sources = tuple(
                output_path(dataset, root, subject.id, m).relative_to(root) for m in job.pair.sources
            )
            entries.append(
                Entry(
                    subject.id,
                    job.pair.target,
                    dst.relative_to(root),
                    synthetic=True,
                    variant=job.variant,
                    reason=job.reason,
                    pair=str(job.pair),
                    sources=sources,
                    seed=job.seed,
                )
            )
            if on_file:
                on_file(entries[-1])
    return entries


def channels_of(dataset: Dataset, entries: Sequence[Entry]) -> list[str]:
    """Image channels of the augmented dataset: the nnU-Net channel order for nnU-Net input, else every
    modality with a real or synthetic image, in canonical order."""
    if dataset.layout == "nnunet":
        return sorted(dataset.channels, key=dataset.channels.__getitem__)
    return _canonical_order(e.key for e in entries if e.key not in (LABEL_KEY, MASK_KEY))


def label_values(root: Path, entries: Sequence[Entry]) -> list[int]:
    """The label values (0 included) found in the label maps, sorted.

    Raises:
        InputError: a label map holds non-integer values.
    """
    values: set[int] = set()
    for entry in entries:
        if entry.key != LABEL_KEY:
            continue
        array = read_volume(root / entry.path).array
        found = np.unique(array)
        if not np.array_equal(found, np.rint(found)):
            raise InputError("the label map holds non-integer values", path=root / entry.path)
        values |= {int(v) for v in found}
    return sorted(values | {0})


def write_manifest(path: Path, entries: Sequence[Entry], *, model: str, model_sha256: str) -> None:
    """Write ``manifest.csv`` (:data:`MANIFEST_COLUMNS`; paths relative to its folder, sources joined by
    ``;``)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for e in entries:
            writer.writerow(
                [
                    e.subject,
                    e.key,
                    e.path.as_posix(),
                    int(e.synthetic),
                    "" if e.variant is None else e.variant,
                    e.reason,
                    e.pair,
                    ";".join(p.as_posix() for p in e.sources),
                    "" if e.seed is None else e.seed,
                    model if e.synthetic else "",
                    model_sha256 if e.synthetic else "",
                    e.origin,
                ]
            )


def _cases(entries: Sequence[Entry], channels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """nnU-Net ``dataset`` cases: each labelled subject with every channel (real, else synthetic variant 0),
    and one case per synthetic variant (its channels replacing the base case's); incomplete subjects
    skipped."""
    by_subject: dict[str, list[Entry]] = {}
    for entry in entries:
        by_subject.setdefault(entry.subject, []).append(entry)
    cases: dict[str, dict[str, Any]] = {}
    for subject, files in by_subject.items():
        label = next((e.path for e in files if e.key == LABEL_KEY), None)
        real = {e.key: e.path for e in files if not e.synthetic}
        synthetic = {(e.key, int(e.variant or 0)): e.path for e in files if e.synthetic}
        base = {m: p for m in channels if (p := real.get(m) or synthetic.get((m, 0)))}
        if label is None or len(base) < len(channels):
            continue
        cases[subject] = {"images": [base[m].as_posix() for m in channels], "label": label.as_posix()}
        for variant in sorted({v for (m, v) in synthetic if v or m in real}):
            images = [synthetic.get((m, variant), base[m]).as_posix() for m in channels]
            cases[f"{subject}_syn{variant or ''}"] = {
                "images": images,
                "label": label.as_posix(),
                "synthetic": True,
            }
    return cases


def dataset_json(
    dataset: Dataset,
    entries: Sequence[Entry],
    *,
    channels: Sequence[str],
    labels: Sequence[int],
    model: str,
    model_sha256: str,
) -> dict[str, Any]:
    """The nnU-Net v2 ``dataset.json`` of the augmented dataset (an nnU-Net input's own keys are kept).

    Paths in ``dataset`` are relative to the dataset folder; synthetic cases are flagged ``"synthetic": true``
    (nnU-Net ignores the extra key) and listed under ``phmdiff``.
    """
    base: dict[str, Any] = {}
    if dataset.layout == "nnunet":
        base = json.loads((dataset.root / DATASET_JSON).read_text())
    cases = _cases(entries, channels)
    names = base.get("labels") or {"background": 0, **{f"label_{v}": v for v in labels if v}}
    return {
        **base,
        "name": base.get("name", dataset.root.name),
        "description": f"{dataset.root.name} completed and augmented with synthetic images by phmdiff",
        "channel_names": {str(i): m for i, m in enumerate(channels)},
        "labels": names,
        "numTraining": len(cases),
        "file_ending": dataset.extension,
        "dataset": cases,
        "phmdiff": {
            "model": model,
            "model_sha256": model_sha256,
            "manifest": MANIFEST_FILE,
            "synthetic_cases": [c for c, v in cases.items() if v.get("synthetic")],
            "synthetic_images": sum(e.synthetic for e in entries),
        },
    }

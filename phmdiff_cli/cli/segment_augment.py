"""`phmdiff segment-augment`: complete a labelled dataset's missing modalities with synthetic images, add
stochastic variants, and (``--evaluate``) measure the Dice a segmenter gains from them on held-out real
subjects.

The augmented dataset is built in a temporary folder beside ``--out`` and renamed into place when complete;
the input dataset is only read.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from phmdiff_cli import __version__
from phmdiff_cli.cli.common import cli_command, console, emit_json, parse_steps
from phmdiff_cli.engine.hub import DEFAULT_MODEL
from phmdiff_cli.errors import InputError
from phmdiff_cli.jsonsafe import finite
from phmdiff_cli.modalities import canonical_modality

if TYPE_CHECKING:
    import torch

    from phmdiff_cli.data.layouts import Dataset
    from phmdiff_cli.engine.augment import Entry, Job
    from phmdiff_cli.engine.segbench import SegSettings
    from phmdiff_cli.engine.synthesizer import Synthesizer

__all__ = ["segment_augment"]


def _modalities(values: list[str] | None) -> list[str]:
    """Canonical names from repeated and/or comma-separated options (``--drop t2 --drop flair``,
    ``t2,flair``)."""
    names = (m for value in values or [] for m in value.split(",") if m.strip())
    return list(dict.fromkeys(canonical_modality(m) for m in names))


def _precision_name(dtype: torch.dtype | None) -> str:
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _environment() -> dict[str, Any]:
    import monai
    import torch

    return {
        "phmdiff_version": __version__,
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": sys.argv,
    }


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_table(evaluation: dict[str, Any]) -> None:
    """Arms x test inputs as rows, Dice (mean +- std over folds) and HD95 per structure (tumour region or label)
    as columns, on stdout."""
    out = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 200)
    folds = evaluation["folds"]
    tested = [s for fold in folds for s in fold["test"]]
    title = (f"Held-out real subjects: {', '.join(tested)}" if len(folds) == 1 else
             f"{len(folds)}-fold cross-validation, every subject tested once: {', '.join(tested)}")
    table = Table(title=title, show_edge=False)
    table.add_column("trained on")
    table.add_column("test input")
    for name in evaluation["structures"]:
        table.add_column(f"Dice {name}", justify="right")
        table.add_column(f"HD95 {name} (mm)", justify="right")
    table.add_column("mean Dice", justify="right", style="bold")
    for arm, by_input in evaluation["results"].items():
        for n, (name, result) in enumerate(by_input.items()):
            cells = []
            for structure in evaluation["structures"]:
                mean = result["mean"][structure]
                std = f" +- {mean['dice_std']:.3f}" if mean["dice_std"] is not None else ""
                inf = f" ({mean['hd95_inf']} inf)" if mean["hd95_inf"] else ""
                cells += [_cell(mean["dice"]) + std, _cell(mean["hd95"], 1) + inf]
            table.add_row(
                arm if n == 0 else "",
                name,
                *cells,
                _cell(result["mean_dice"]),
                end_section=n == len(by_input) - 1,
            )
    out.print(table)


def _summarise_plan(jobs: list[Job], dataset: Dataset, quiet: bool) -> None:
    if quiet:
        return
    reasons = Counter(job.reason for job in jobs)
    console.print(
        f"{dataset.root}: {len(dataset.subjects)} subjects ({dataset.layout}), "
        f"{sum(s.label is not None for s in dataset.subjects)} labelled; synthesizing "
        f"{reasons['missing']} missing, {reasons['drop']} --drop stand-in(s), {reasons['variant']} "
        "variant(s)",
        soft_wrap=True,
    )
    skipped = sum(len(paths) for s in dataset.subjects for paths in s.synthetic.values())
    if skipped:
        console.print(
            f"[yellow]Note:[/] {skipped} synthetic image(s) already in the input are not carried over",
            soft_wrap=True,
        )


@cli_command
def segment_augment(
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help="Labelled dataset: a folder (BraTS, SynthRAD, nnU-Net "
        "layouts; labels as ID-seg / label files) or a CSV manifest (subject, modality, path).",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="New folder for the augmented dataset (same layout, plus "
        "manifest.csv and an nnU-Net dataset.json). Must not exist unless --force.",
    ),
    model: str = typer.Option(
        DEFAULT_MODEL,
        "--model",
        "-m",
        help="Model folder, .safetensors file, run folder, shipped name or hf://org/repo[@revision].",
    ),
    targets: list[str] | None = typer.Option(
        None,
        "--targets",
        help="Modalities to synthesize (comma-separated or "
        "repeated); default: the dataset's modalities the model can make.",
    ),
    variants: int = typer.Option(
        0,
        "--variants",
        min=0,
        help="Extra stochastic synthetic versions per subject and "
        "target (seeds seed+1..seed+K), each paired with the subject's real label.",
    ),
    link: str = typer.Option(
        "copy", "--link", help="How real files reach the output: copy (bit-exact), hardlink or symlink."
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        help="Base seed: synthesis noise (variant v uses seed+v), segmenter "
        "initialisation, batch order and test split.",
    ),
    steps: str | None = typer.Option(
        None,
        "--steps",
        help="Solver steps per pyramid level (e.g. 12,8,6) or one number; default: the model's.",
    ),
    sampler: str | None = typer.Option(None, "--sampler", help="heun or euler; default: the model's."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Slices per synthesis batch; default from a memory budget."
    ),
    evaluate: bool = typer.Option(
        False,
        "--evaluate",
        help="Train a 2-D MONAI UNet on real images only and on real "
        "+ synthetic images (same seed and budget) and report Dice and HD95 on held-out real subjects: per "
        "tumour region (whole tumour, tumour core, enhancing) for BraTS labels of any release, else per label.",
    ),
    drop: list[str] | None = typer.Option(
        None,
        "--drop",
        help="Missing-modality scenario (with --evaluate): test "
        "the segmenters with this modality real, synthesized, and zero-filled.",
    ),
    seg_epochs: int = typer.Option(
        20,
        "--seg-epochs",
        min=1,
        help="Segmenter budget: passes over the real "
        "training slices (both arms get the same number of steps).",
    ),
    seg_minutes: float | None = typer.Option(
        None, "--seg-minutes", help="Wall-time cap per segmenter, minutes."
    ),
    seg_size: int = typer.Option(128, "--seg-size", help="Segmenter in-plane grid, pixels (multiple of 8)."),
    seg_spacing: float = typer.Option(2.0, "--seg-spacing", help="Segmenter in-plane grid spacing, mm."),
    seg_width: int = typer.Option(16, "--seg-width", help="Channels of the UNet's first level."),
    seg_batch_size: int = typer.Option(16, "--seg-batch-size", min=1, help="Slices per segmenter step."),
    test_fraction: float = typer.Option(
        0.25,
        "--test-fraction",
        help="Share of the labelled subjects held out "
        "(at least one; only subjects with every modality real).",
    ),
    folds: int = typer.Option(
        1,
        "--folds",
        help="Cross-validation folds: every subject that can be tested is tested once, by segmenters trained on "
        "the others; Dice as mean +- std over folds (1: one --test-fraction split).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16 (CUDA)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing --out (and --report)."),
    json_output: bool = typer.Option(
        False, "--json", help="Print the JSON document on stdout instead of the table."
    ),
    report: Path | None = typer.Option(
        None, "--report", help="Write the JSON document (plus versions) to a file."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or messages, errors only."),
) -> None:
    """Complete missing modalities of a labelled dataset with synthetic images and measure what they buy a
    segmenter.

    Every subject lacking a modality the model can make (from the subject's real images) gets it synthesized;
    --variants adds stochastic versions. Real images, labels and masks are copied bit-exact; synthetic files
    carry _syn (variant 0) or _synK in their name and are listed in manifest.csv with their sources, model
    sha256 and seed. dataset.json lists nnU-Net training cases (real subjects completed with synthetic
    channels, and one case per variant).

    Exit codes: 0 ok, 1 internal error, 2 bad input.
    """
    from phmdiff_cli.data.layouts import discover
    from phmdiff_cli.engine.augment import check_locations, plan_jobs
    from phmdiff_cli.engine.device import resolve_device, resolve_precision
    from phmdiff_cli.engine.pretrained import load_pretrained
    from phmdiff_cli.engine.segbench import SegSettings
    from phmdiff_cli.engine.synthesizer import SynthesisSettings, Synthesizer
    from phmdiff_cli.io.atomic import check_output

    wanted, dropped = (_modalities(targets) or None), _modalities(drop)
    if dropped and not evaluate:
        raise InputError("--drop is a scenario of --evaluate", hint="add --evaluate")
    seg = (
        SegSettings(
            seg_epochs,
            seg_minutes,
            seg_batch_size,
            size=seg_size,
            spacing_mm=seg_spacing,
            width=seg_width,
            test_fraction=test_fraction,
            folds=folds,
            seed=seed,
        )
        if evaluate
        else None
    )
    dataset = discover(data)
    labelled = sum(s.label is not None for s in dataset.subjects)
    if evaluate and labelled < 2:
        raise InputError(
            f"--evaluate needs at least 2 labelled subjects, found {labelled}",
            path=data,
            hint="add label maps (ID/ID-seg.nii.gz, or modality 'seg' in a CSV manifest)",
        )
    check_locations(dataset, out)
    check_output(out, force=force)
    if report is not None:
        check_output(report, force=force)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    pretrained = load_pretrained(model, dev)
    jobs, notes = plan_jobs(
        dataset, pretrained.pairs, targets=wanted, variants=variants, drop=dropped, seed=seed
    )
    synth = Synthesizer(
        pretrained, dev, dtype, SynthesisSettings(parse_steps(steps), sampler, seed, 1, batch_size)
    )
    _summarise_plan(jobs, dataset, quiet)

    started = time.perf_counter()
    entries, channels, values = _build(dataset, out, jobs, synth, link, force, quiet, notes)
    document = _record(dataset, out, synth, entries, channels, values, variants, link, notes)
    document["seconds"] = {"augment": round(time.perf_counter() - started, 3)}
    if not quiet:
        console.print(
            f"Wrote {out}: {document['files']['real']} real and {document['files']['synthetic']} "
            "synthetic files, manifest.csv, dataset.json",
            soft_wrap=True,
        )
        for note in notes:
            console.print(f"[yellow]Note:[/] {escape(note)}", soft_wrap=True)
    if seg is not None:
        started = time.perf_counter()
        document["evaluation"] = _evaluate(out, entries, channels, values, seg, dev, dtype, dropped, quiet)
        document["seconds"]["evaluate"] = round(time.perf_counter() - started, 3)
    _finish(document, json_output=json_output, report=report, force=force, quiet=quiet)


def _record(
    dataset: Dataset,
    out: Path,
    synth: Synthesizer,
    entries: list[Entry],
    channels: list[str],
    values: list[int],
    variants: int,
    link: str,
    notes: list[str],
) -> dict[str, Any]:
    """The JSON document of the augmentation: inputs, model, settings, and every synthetic file."""
    return {
        "data": str(dataset.root),
        "layout": dataset.layout,
        "out": str(out),
        "model": str(synth.pretrained.path),
        "model_sha256": str(synth.pretrained.card.get("sha256", "")),
        "device": str(synth.device),
        "precision": _precision_name(synth.dtype),
        "seed": synth.settings.seed,
        "variants": variants,
        "steps": list(synth.steps),
        "sampler": synth.sampler,
        "link": link,
        "channels": channels,
        "label_values": values,
        "files": {
            "real": sum(not e.synthetic for e in entries),
            "synthetic": sum(e.synthetic for e in entries),
        },
        "synthetic": [
            {
                "subject": e.subject,
                "modality": e.key,
                "path": e.path.as_posix(),
                "variant": e.variant,
                "reason": e.reason,
                "pair": e.pair,
                "seed": e.seed,
            }
            for e in entries
            if e.synthetic
        ],
        "notes": notes,
    }


def _build(
    dataset: Dataset,
    out: Path,
    jobs: list[Job],
    synth: Synthesizer,
    link: str,
    force: bool,
    quiet: bool,
    notes: list[str],
) -> tuple[list[Entry], list[str], list[int]]:
    """Write the augmented dataset atomically; return its entries, channels and label values (the
    synthesizer's notes go to ``notes``)."""
    from phmdiff_cli.engine.augment import (
        DATASET_JSON,
        MANIFEST_FILE,
        augment_dataset,
        channels_of,
        dataset_json,
        label_values,
        synthesize_fn,
        write_manifest,
    )
    from phmdiff_cli.io.atomic import atomic_path

    files = sum(len(s.images) + (s.label is not None) + (s.mask is not None) for s in dataset.subjects) + len(
        jobs
    )
    model, sha = str(synth.pretrained.path), str(synth.pretrained.card.get("sha256", ""))
    with _progress(quiet) as progress, atomic_path(out, force=force, directory=True) as tmp:
        task = progress.add_task("Writing", total=files)

        def advance(entry: Entry) -> None:
            what = f"{entry.subject} {entry.key}" + (" (synthetic)" if entry.synthetic else "")
            progress.update(task, advance=1, description=f"Writing {escape(what)}")

        entries = augment_dataset(dataset, tmp, jobs, synthesize_fn(synth, notes), link=link, on_file=advance)
        channels, values = channels_of(dataset, entries), label_values(tmp, entries)
        write_manifest(tmp / MANIFEST_FILE, entries, model=model, model_sha256=sha)
        meta = dataset_json(dataset, entries, channels=channels, labels=values, model=model, model_sha256=sha)
        (tmp / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return entries, channels, values


def _evaluate(
    out: Path,
    entries: list[Entry],
    channels: list[str],
    values: list[int],
    seg: SegSettings,
    dev: torch.device,
    dtype: torch.dtype | None,
    dropped: list[str],
    quiet: bool,
) -> dict[str, Any]:
    from phmdiff_cli.engine.segbench import cases_from_entries, run_benchmark

    cases = cases_from_entries(out, entries)
    if not quiet:
        console.print(
            f"Evaluating: 2-D MONAI UNet on {', '.join(channels)}, {seg.epochs} epoch(s), seed "
            f"{seg.seed}, {len(cases)} labelled subjects, {seg.folds} fold(s)",
            soft_wrap=True,
        )
    with _progress(quiet) as progress:
        tasks: dict[str, TaskID] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage.capitalize(), total=total)
            progress.update(tasks[stage], completed=done)

        return run_benchmark(cases, channels, values, seg, dev, dtype, drop=dropped, on_progress=on_progress)


def _finish(
    document: dict[str, Any], *, json_output: bool, report: Path | None, force: bool, quiet: bool
) -> None:
    """Table (stdout) or JSON (stdout), notes (stderr), and the --report file."""
    from phmdiff_cli.io.atomic import atomic_path

    evaluation = document.get("evaluation")
    clean = finite(document)
    if json_output:
        emit_json(clean)
    elif evaluation is not None:
        _print_table(evaluation)
    if evaluation is not None and not quiet:
        for note in evaluation["notes"]:
            console.print(f"[yellow]Note:[/] {escape(note)}", soft_wrap=True)
    if report is not None:
        with atomic_path(report, force=force) as tmp:
            tmp.write_text(json.dumps({**_environment(), **clean}, indent=2) + "\n", encoding="utf-8")

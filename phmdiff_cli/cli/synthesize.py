"""`phmdiff synthesize`: source volumes in, the missing modality out on the first source's exact grid.

One case (``--src A [--src B] -o OUT``) or many (``--list FILE|-``, one case per line, ``-o`` a pattern);
the model (and, without ``--model``, the one for heads) is loaded once. Each case is read, synthesized and
written before the next is read, so memory holds one case.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from phmdiff_cli import __version__
from phmdiff_cli.cli.common import cli_command, console, emit_json, fail, parse_steps, state
from phmdiff_cli.engine.hub import DEFAULT_MODEL, HEADS_MODEL
from phmdiff_cli.errors import EXIT_INTERNAL, EXIT_PARTIAL, InputError, PhmdiffError
from phmdiff_cli.io import Volume, read_volume, write_volume
from phmdiff_cli.io.atomic import atomic_path, check_output
from phmdiff_cli.io.nifti import NIFTI_SUFFIXES
from phmdiff_cli.io.readwrite import ITK_SUFFIXES, output_format
from phmdiff_cli.modalities import canonical_modality

if TYPE_CHECKING:
    from phmdiff_cli.engine.synthesizer import Synthesizer

__all__ = ["synthesize", "read_list", "fill_pattern"]

#: Placeholders of an output pattern (see :func:`fill_pattern`).
PLACEHOLDERS = ("stem", "name", "parent")
_PATTERN_HINT = "use {stem}, {name} or {parent}, e.g. -o 'out/{stem}_t2w.nii.gz'"
_IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES, ".dcm")
#: Autocast dtype (as str) -> --precision spelling.
_PRECISION_NAMES = {"None": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


@dataclass
class _Case:
    """One line of work: its sources, where it goes, and why it cannot run (if it cannot)."""

    index: int
    sources: list[Path]
    output: Path | None = None
    uncertainty: Path | None = None
    force: tuple[bool, bool] = (False, False)  # per output: replace it (--force, or an empty DICOM folder)
    error: PhmdiffError | None = None


def read_list(spec: str) -> list[list[Path]]:
    """Cases of a list file (``-``: stdin): one per line, a case's sources separated by commas or tabs; blank
    lines and lines starting with ``#`` are skipped; relative paths are relative to the working folder.

    Raises:
        InputError: the file cannot be read or lists no case.
    """
    try:
        text = sys.stdin.read() if spec == "-" else Path(spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(
            f"cannot read the list ({getattr(error, 'strerror', None) or error})", path=spec
        ) from None
    cases = [
        [Path(p.strip()) for p in re.split(r"[,\t]", line) if p.strip()]
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not cases:
        raise InputError(
            "the list names no source image",
            path="stdin" if spec == "-" else spec,
            hint="one case per line: a source path, or several separated by commas or tabs",
        )
    return cases


def fill_pattern(pattern: str, source: Path) -> Path:
    """The output path for a case whose first source is ``source``: ``{stem}`` is its name without image
    suffix (``.nii.gz``, ``.nii``, ``.mha``, ...; a DICOM folder's name), ``{name}`` its full name,
    ``{parent}`` the folder holding it.

    Raises:
        InputError: an unknown placeholder or a malformed pattern.
    """
    name = source.name
    stem = next((name[: -len(s)] for s in _IMAGE_SUFFIXES if name.lower().endswith(s)), name)
    try:
        return Path(pattern.format(stem=stem, name=name, parent=str(source.parent)))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
        raise InputError(
            f"bad output pattern {pattern!r} ({type(error).__name__}: {error})", hint=_PATTERN_HINT
        ) from None


def _has_placeholder(pattern: str) -> bool:
    return any(f"{{{p}}}" in pattern for p in PLACEHOLDERS)


def _writable(path: Path, fmt: str, force: bool) -> bool:
    """Check an output before any work; return the ``force`` to write it with (an existing *empty* folder may
    receive a DICOM series)."""
    if fmt == "dicom" and path.is_dir() and not any(path.iterdir()):
        return True
    check_output(path, force=force, directory=fmt == "dicom")
    return force


def _plan(
    case: _Case, output: str, uncertainty: str | None, fmt: str | None, force: bool, taken: dict[Path, int]
) -> None:
    """Fill in the case's output paths and check them; a duplicate of another case's output is an error."""
    case.output = fill_pattern(output, case.sources[0])
    case.uncertainty = fill_pattern(uncertainty, case.sources[0]) if uncertainty else None
    forces = []
    for path, path_fmt in ((case.output, fmt), (case.uncertainty, None)):  # --format is the output's
        if path is None:
            continue
        key = path.resolve()
        if key in taken:
            raise InputError(
                f"case {case.index + 1} writes the same output as case {taken[key] + 1}",
                path=path,
                hint="add {parent} or {stem} to the output pattern",
            )
        taken[key] = case.index
        inside = [src for src in case.sources if src.resolve() == key or key in src.resolve().parents]
        if inside:
            raise InputError(f"the output would replace the source {inside[0]}", path=path,
                             hint="write the output somewhere else")
        forces.append(_writable(path, output_format(path, path_fmt), force))
    case.force = (forces[0], forces[-1])


def _plan_cases(
    sources: list[list[Path]],
    output: str,
    uncertainty: str | None,
    fmt: str | None,
    force: bool,
    *,
    batch: bool,
) -> list[_Case]:
    """The cases with their outputs checked; in batch mode a case that cannot run carries its error, else the
    error is raised."""
    if len(sources) > 1 and not _has_placeholder(output):
        raise InputError(f"-o {output!r} names one file for {len(sources)} cases", hint=_PATTERN_HINT)
    cases = [_Case(n, s) for n, s in enumerate(sources)]
    taken: dict[Path, int] = {}
    for case in cases:
        try:
            _plan(case, output, uncertainty, fmt, force, taken)
        except PhmdiffError as error:
            if not batch:
                raise
            case.error = error
    return cases


@dataclass(frozen=True)
class _Reading:
    """How sources are read: their modalities when given (``--src-modality``), the DICOM series to pick, the
    brain mask (``--brain-mask``)."""

    modalities: list[str]
    series_uid: str | None
    brain_mask: str | None = None  # a path, or a pattern like -o's


def _read_sources(case: _Case, reading: _Reading) -> list[Volume]:
    modalities = reading.modalities
    if modalities and len(modalities) != len(case.sources):
        raise InputError(
            f"{len(modalities)} --src-modality for {len(case.sources)} sources",
            hint="give one --src-modality per source, in the same order",
        )
    volumes = []
    for n, path in enumerate(case.sources):
        volume = read_volume(path, series_uid=reading.series_uid if path.is_dir() else None)
        volume.modality = modalities[n] if modalities else volume.modality
        if volume.modality is None:
            raise InputError(
                "cannot tell the image's modality from its name or header",
                path=path,
                hint="give it with --src-modality (e.g. --src-modality t1)",
            )
        volumes.append(volume)
    return volumes


def _read_mask(case: _Case, reading: _Reading) -> Volume | None:
    """The case's ``--brain-mask`` (a pattern filled from its first source), or None."""
    if reading.brain_mask is None:
        return None
    path = fill_pattern(reading.brain_mask, case.sources[0])
    return read_volume(path, series_uid=reading.series_uid if path.is_dir() else None)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"
    )


def _environment() -> dict[str, Any]:
    import torch

    return {
        "phmdiff_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": sys.argv,
    }


@cli_command
def synthesize(
    src: list[Path] | None = typer.Option(
        None,
        "--src",
        "-s",
        help="Source image: NIfTI, MHA/NRRD or a DICOM series "
        "folder; repeat for models that take several sources. Modality from the file "
        "name (ID-t1n.nii.gz, t2.nii.gz, ct.nii.gz) or the DICOM header.",
    ),
    target: str = typer.Option(
        ...,
        "--target",
        "-t",
        help="Modality to synthesize: t1n, t1c, t2w, t2f, pd, mr, ct (aliases t1, t1ce, t2, flair).",
    ),
    output: str = typer.Option(
        ...,
        "--output",
        "-o",
        help="Output file (.nii.gz, .nii, .mha, .nrrd) or folder "
        "(DICOM series). A pattern with {stem}, {name}, {parent} of the first source, e.g. "
        "'out/{stem}_t2w.nii.gz'.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help=f"A model folder, .safetensors file, run folder, shipped name, or hf://org/repo (@rev pins one); "
        f"default: {DEFAULT_MODEL}, and {HEADS_MODEL} for a source that shows a head with skull (no --brain-mask).",
    ),
    src_modality: list[str] | None = typer.Option(
        None,
        "--src-modality",
        help="Modality of each source, in --src order, when the name or header does not tell it.",
    ),
    series_uid: str | None = typer.Option(
        None, "--series-uid", help="The DICOM series to read from source folders that hold several."
    ),
    brain_mask: str | None = typer.Option(
        None,
        "--brain-mask",
        help="Brain mask of the sources (NIfTI or DICOM, any grid; nonzero = brain): the sources are used inside "
        "it, the output is background outside. With --list a pattern like -o's, e.g. '{parent}/{stem}_mask.nii.gz'.",
    ),
    list_file: str | None = typer.Option(
        None,
        "--list",
        help="Several cases: a file ('-': stdin) with one case per line, "
        "a case's sources separated by commas or tabs; -o is then a pattern.",
    ),
    fmt: str | None = typer.Option(
        None,
        "--format",
        help="Output format, checked against -o: nifti (.nii.gz, "
        ".nii), itk (.mha, .nrrd) or dicom (a folder, or a path without image suffix).",
    ),
    uncertainty: str | None = typer.Option(
        None,
        "--uncertainty",
        help="Also write the per-voxel standard deviation over "
        "--samples draws here (same grid and units; a pattern like -o).",
    ),
    samples: int = typer.Option(1, "--samples", min=1, help="Draws per slice; the output is their mean."),
    steps: str | None = typer.Option(
        None,
        "--steps",
        help="Solver steps per pyramid level, coarse to fine (e.g. 12,8,6), "
        "or one number for all; default: the model's.",
    ),
    sampler: str | None = typer.Option(
        None, "--sampler", help="heun (2nd order) or euler; default: the model's."
    ),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**63 - 1, help="Seed of the noise shared by all slices (same seed, same output)."
    ),
    contrast: bool | None = typer.Option(
        None, "--contrast/--no-contrast", help="Calibrate an MRI output's contrast (its foreground's median over "
        "99.5th percentile) to the training targets' by one power law; default: the model's (on for brain-sharp, "
        "skipped for sources it warns about)."
    ),
    source_detail: bool | None = typer.Option(
        None, "--source-detail/--no-source-detail", help="Add the sources' fine detail where the output follows "
        "them locally (a 5-voxel linear fit); default: the model's (on for brain-sharp)."
    ),
    mirror: bool | None = typer.Option(
        None, "--mirror/--no-mirror", help="Average with the synthesis from the left-right mirrored sources "
        "(twice the network's work); default: the model's (on for brain-sharp)."
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        min=1,
        help="Slices per batch; default from a memory "
        "budget (256 MiB on CPU, half the free GPU memory); halved on out-of-memory.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16 (CUDA)."),
    compile_model_: bool = typer.Option(
        False, "--compile", help="torch.compile the Transformer blocks (slow start, faster on long runs)."
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite existing outputs."),
    json_output: bool = typer.Option(
        False,
        "--json",
        help="Print a JSON document on stdout: one record per case "
        "(paths, timings, device, precision, seed, steps, weights sha256).",
    ),
    report: Path | None = typer.Option(
        None, "--report", help="Write the same JSON document (plus versions) to a file."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or messages, errors only."),
) -> None:
    """Synthesize a missing modality (e.g. T2 from T1, CT from MRI) for whole volumes.

    The output lies on the exact grid of the (first) source: same shape, spacing, origin, direction and NIfTI
    header; sources on other grids are resampled onto it. CT is written in Hounsfield units (int16). MRI has
    no absolute unit: a synthesized MRI is float32 on the first MRI source's scale, the model range mapped to
    [0, hi] where hi is that source's foreground 99.5th percentile (so a T2 from a T1 has the T1's range);
    from CT alone, [0, 1000].

    Without --model, a source that shows a head with skull (and no --brain-mask) goes to the model trained on
    heads too (brain-heads), everything else to brain-sharp. Each source is checked against what the model was
    trained on (its card's input_domain): a head that is not skull-stripped, slices further apart or voxels coarser
    than the training images' get a warning on stderr and in --json ("warnings"). Slices thicker than the model's
    are made thin for synthesis and the output averaged back onto them.

    Exit codes: 0 ok, 1 internal error, 2 bad input, 3 some cases of a --list failed (the others are written).
    """
    from phmdiff_cli.engine.device import resolve_device, resolve_precision
    from phmdiff_cli.engine.synthesizer import SynthesisSettings

    target = canonical_modality(target)
    modalities = [canonical_modality(m) for m in src_modality or []]
    settings = SynthesisSettings(parse_steps(steps), sampler, seed, samples, batch_size, contrast, source_detail,
                                 mirror)
    if uncertainty and samples < 2:
        raise InputError("--uncertainty needs several draws", hint="add --samples 2 (or more)")
    if bool(src) == bool(list_file):
        raise InputError("give the sources with --src, or several cases with --list, not both or neither")
    batch = list_file is not None
    cases = _plan_cases(
        read_list(list_file) if list_file else [list(src or [])], output, uncertainty, fmt, force, batch=batch
    )
    if report is not None:
        check_output(report, force=force)

    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    synth = _synthesizer(model, dev, dtype, settings, compile_model_) if any(c.error is None for c in cases) else None
    heads = synth.heads.pretrained if synth is not None and synth.heads is not None else None
    common = {
        "device": str(dev),
        "precision": _PRECISION_NAMES[str(dtype)],
        "seed": seed,
        "samples": samples,
        "steps": list(synth.steps) if synth else None,
        "sampler": synth.sampler if synth else None,
        "batch_size": synth.batch_size if synth else None,
        "model": str(synth.pretrained.path) if synth else model or DEFAULT_MODEL,
        "heads_model": str(heads.path) if heads else None,
        "source_detail": synth.source_detail if synth else None,
        "mirror": synth.mirror if synth else None,
        "weights_sha256": synth.pretrained.card.get("sha256") if synth else None,
    }
    if synth is not None and not quiet:
        console.print(
            f"Model {common['model']} (sha256 {str(common['weights_sha256'])[:12]})"
            f"{f', for heads with skull {heads.path}' if heads else ''}, pairs "
            f"{', '.join(map(str, synth.pretrained.pairs))}; device {dev}, {common['precision']}, batch "
            f"{synth.batch_size}, steps {','.join(map(str, synth.steps))} ({synth.sampler}), seed {seed}"
        )

    started = time.perf_counter()
    reading = _Reading(modalities, series_uid, brain_mask)
    records = _run_all(cases, synth, target, reading, fmt, common, batch=batch, quiet=quiet)
    failed = [c for c in cases if c.error is not None]
    document = {
        **common,
        "target": target,
        "cases": records,
        "ok": len(cases) - len(failed),
        "failed": len(failed),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if json_output:
        emit_json(document)
    if report is not None:
        with atomic_path(report, force=force) as tmp:
            tmp.write_text(json.dumps({**_environment(), **document}, indent=2, default=str) + "\n")
    if failed and not batch:
        raise failed[0].error  # type: ignore[misc]
    if failed:
        others = "; the others were written" if len(failed) < len(cases) else ""
        console.print(f"[bold red]{len(failed)} of {len(cases)} cases failed[/]{others}.")
        raise typer.Exit(EXIT_PARTIAL)


def _synthesizer(model: str | None, device: Any, dtype: Any, settings: Any, compile_: bool) -> Synthesizer:
    """:func:`~phmdiff_cli.engine.synthesizer.load_synthesizer`, its networks compiled when asked."""
    from phmdiff_cli.engine.device import compile_model
    from phmdiff_cli.engine.synthesizer import load_synthesizer

    synth = load_synthesizer(model, device, dtype, settings)
    for each in (synth, synth.heads) if compile_ else ():
        if each is not None:
            compile_model(each.pretrained.model)
    return synth


def _run_all(
    cases: list[_Case],
    synth: Synthesizer | None,
    target: str,
    reading: _Reading,
    fmt: str | None,
    common: dict[str, Any],
    *,
    batch: bool,
    quiet: bool,
) -> list[dict[str, Any]]:
    """Run the cases one by one; a failing case is recorded (and printed in batch mode), not fatal."""
    records = []
    pending_estimate = [not quiet]  # printed once, after the first batch that runs
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("slices"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(
        *columns, console=console, transient=True, disable=quiet or not console.is_terminal
    ) as progress:
        for case in cases:
            task = progress.add_task(f"case {case.index + 1}/{len(cases)}", total=None)

            def on_batch(done: int, total: int, seconds: float, task: Any = task) -> None:
                progress.update(task, completed=done, total=total)
                if pending_estimate[0] and done < total:
                    pending_estimate[0] = False
                    per_case = seconds / done * total
                    more = (
                        f", ~{_duration(per_case * len(cases))} for {len(cases)} alike cases" if batch else ""
                    )
                    progress.console.print(
                        f"Estimated time: ~{_duration(per_case)} per case ({total} slices; "
                        f"the first {done} took {seconds:.1f} s){more}"
                    )

            if case.error is None and synth is not None:
                try:
                    records.append(_run_case(case, synth, target, reading, fmt, common, on_batch, quiet))
                except PhmdiffError as error:
                    case.error = error
                except Exception as error:  # noqa: BLE001 - in batch mode one bad case must not stop the rest
                    if not batch:
                        raise
                    if state.debug:
                        traceback.print_exc()
                    case.error = PhmdiffError(
                        f"internal error: {type(error).__name__}: {error}",
                        exit_code=EXIT_INTERNAL,
                        hint="run again with --debug and report it",
                    )
            progress.remove_task(task)
            if case.error is None:
                continue
            if batch:
                fail(case.error)  # prints the one-line error; the run goes on
            records.append(
                {
                    "index": case.index,
                    "status": "failed",
                    "sources": [str(p) for p in case.sources],
                    "output": str(case.output) if case.output else None,
                    "error": case.error.message,
                    "hint": case.error.hint,
                    **common,
                }
            )
    return records


def _run_case(
    case: _Case,
    synth: Synthesizer,
    target: str,
    reading: _Reading,
    fmt: str | None,
    common: dict[str, Any],
    on_batch: Any,
    quiet: bool,
) -> dict[str, Any]:
    """Read, synthesize and write one case; its JSON record."""
    start = time.perf_counter()
    volumes = _read_sources(case, reading)
    mask = _read_mask(case, reading)
    read_s = time.perf_counter() - start
    result = synth.run(volumes, target, mask=mask, on_batch=on_batch)
    if not quiet:
        for note in result.notes:
            console.print(f"[yellow]Note:[/] {escape(note)}", soft_wrap=True)
        for warning in result.warnings:
            console.print(f"[bold yellow]Warning:[/] {escape(warning)}", soft_wrap=True)
    write_start = time.perf_counter()
    write_volume(result.image, case.output, force=case.force[0], format=fmt)  # type: ignore[arg-type]
    if case.uncertainty is not None and result.std is not None:  # --uncertainty requires --samples >= 2
        write_volume(result.std, case.uncertainty, force=case.force[1])
    total = time.perf_counter() - start
    if not quiet:
        console.print(f"Wrote {case.output} ({result.pair}, {result.slices} slices, {_duration(total)})", markup=False)
    seconds = {"read": read_s, **result.seconds, "write": time.perf_counter() - write_start, "total": total}
    return {
        "index": case.index,
        "status": "ok",
        "sources": [
            {"path": str(p), "modality": v.modality} for p, v in zip(case.sources, volumes, strict=True)
        ],
        "target": target,
        "pair": str(result.pair),
        "output": str(case.output),
        "uncertainty": str(case.uncertainty) if case.uncertainty else None,
        "slices": result.slices,
        "skipped_slices": result.skipped,
        "batch_size_used": result.batch_size,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "brain_mask": str(mask.meta.get("path")) if mask is not None else None,
        "notes": result.notes,
        "warnings": result.warnings,
        "contrast_gamma": None if result.contrast_gamma is None else round(result.contrast_gamma, 4),
        **common,
        "model": result.model,
        "weights_sha256": result.weights_sha256,
    }

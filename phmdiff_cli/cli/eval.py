"""`phmdiff eval`: image-quality (or label-overlap) metrics of predictions against references, with explicit
conventions (normalisation, data range, mask, SSIM window) reported beside the numbers."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from phmdiff_cli.cli.common import cli_command, console, emit_json
from phmdiff_cli.errors import EXIT_PARTIAL, InputError
from phmdiff_cli.jsonsafe import finite

if TYPE_CHECKING:
    from phmdiff_cli.metrics.cases import Case, Pairing
    from phmdiff_cli.metrics.evaluate import EvalSettings

__all__ = ["evaluate"]

_WINDOWS = ("uniform", "gaussian")


def _settings(metrics: str, norm: str, data_range: float | None, window: str) -> EvalSettings:
    from phmdiff_cli.metrics.evaluate import NORMS, EvalSettings, parse_metrics

    if norm not in NORMS:
        raise InputError(f"unknown normalisation {norm!r}", hint=f"--norm takes one of {', '.join(NORMS)}")
    if window not in _WINDOWS:
        raise InputError(
            f"unknown SSIM window {window!r}", hint=f"--ssim-window takes one of {', '.join(_WINDOWS)}"
        )
    if data_range is not None and not (data_range > 0 and math.isfinite(data_range)):
        raise InputError(f"--data-range must be a positive number, got {data_range}")
    return EvalSettings(parse_metrics(metrics), norm, data_range, window)


def _pairing(
    pred: Path | None,
    ref: Path | None,
    pred_dir: Path | None,
    ref_dir: Path | None,
    target: str | None,
    mask: str,
) -> Pairing:
    """The cases to evaluate (single pair or folders), as a :class:`~phmdiff_cli.metrics.cases.Pairing`."""
    from phmdiff_cli.metrics.cases import MASK_MODES, Case, Pairing, pair_folders, target_key

    if target is not None:
        target_key(target)  # validate before any work
    single, folders = pred is not None or ref is not None, pred_dir is not None or ref_dir is not None
    if single == folders:
        raise InputError("give either --pred and --ref (one pair) or --pred-dir and --ref-dir (folders)")
    if single:
        if pred is None or ref is None:
            raise InputError("--pred and --ref go together")
        mask_spec: Path | str = mask if mask in MASK_MODES else Path(mask)
        return Pairing((Case(ref.name, pred, ref, mask_spec),), (), ())
    if pred_dir is None or ref_dir is None:
        raise InputError("--pred-dir and --ref-dir go together")
    if target is None:
        raise InputError(
            "folder mode needs --target", hint="e.g. --target t2w (the modality of the references)"
        )
    return pair_folders(pred_dir, ref_dir, target_key(target), mask)


def _score_case(
    case: Case, settings: EvalSettings, target: str | None, resample: bool
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of one case, and the conventions used for it."""
    from phmdiff_cli.metrics.cases import load_case, target_key
    from phmdiff_cli.metrics.evaluate import auto_mask, image_scores, label_scores, resolve_norm, scale_pair

    pred, ref, mask_volume = load_case(case, labels=settings.labels, resample=resample)
    if settings.labels:
        if mask_volume is not None:
            raise InputError("--mask does not apply to label maps (dice, hd95)", path=case.mask)
        return label_scores(pred.array, ref.array, spacing=ref.spacing, metrics=settings.metrics), {
            "inputs": "label maps",
            "spacing_mm": list(ref.spacing),
        }
    key = target_key(target) if target else None
    modality = key or ref.modality or pred.modality
    norm = resolve_norm(settings.norm, modality)
    scaled = scale_pair(pred.array, ref.array, modality=modality, norm=norm, data_range=settings.data_range)
    if mask_volume is not None:
        mask = mask_volume.array > 0
    else:
        mask = auto_mask(ref.array, modality) if case.mask == "auto" else None
    if mask is not None and not mask.any():
        raise InputError(
            "the automatic mask is empty (blank reference)", path=case.ref, hint="use --mask none"
        )
    conventions = {
        "modality": modality,
        "norm": norm,
        "data_range": scaled.data_range,
        "ssim_window": settings.window,
        "mask": str(case.mask),
        "mask_voxels": None if mask is None else int(mask.sum()),
    }
    try:
        return image_scores(scaled, mask, settings), conventions
    except InputError as error:
        raise InputError(error.problem, path=error.path or case.pred, hint=error.hint) from None


def _describe(conv: dict[str, Any], per_case_range: bool) -> str:
    if "inputs" in conv:
        return "label maps; Dice, HD95 in mm with the reference spacing"
    norms = {
        "window": "CT window [-1024, 3000] HU shifted to [0, 4024] (SynthRAD 2023); MAE/MSE on unclipped HU",
        "percentile": "each volume / its own foreground 99.5th percentile, clipped to [0, 1]",
        "minmax": "each volume mapped from its own [min, max] to [0, 1]",
        "none": "raw values",
    }
    mask = conv["mask"] + ("" if conv["mask_voxels"] is None else f" ({conv['mask_voxels']} voxels)")
    modality = conv["modality"] or "unknown (MRI assumed)"
    data_range = "reference max - min per case" if per_case_range else f"{conv['data_range']:g}"
    return (
        f"modality {modality}; norm {conv['norm']}: {norms[conv['norm']]}; "
        f"data range {data_range}; mask {mask}; SSIM window {conv['ssim_window']}"
    )


def _cell(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"


def _print_table(rows: list[dict[str, Any]], columns: list[str], summary: dict[str, dict[str, Any]]) -> None:
    out = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 200)
    table = Table(show_edge=False)
    table.add_column("case")
    for column in columns:
        table.add_column(column, justify="right")
    for i, row in enumerate(rows):
        table.add_row(
            row["case"], *(_cell(row["metrics"].get(c)) for c in columns), end_section=i == len(rows) - 1
        )
    for stat in ("mean", "std", "median"):
        table.add_row(stat, *(_cell(summary[c][stat]) for c in columns), style="bold")
    out.print(table)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str], force: bool) -> None:
    from phmdiff_cli.io.atomic import atomic_path

    with atomic_path(path, force=force) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "pred", "ref", *columns])
        for row in rows:
            writer.writerow(
                [
                    row["case"],
                    row["pred"],
                    row["ref"],
                    *(repr(row["metrics"][c]) if c in row["metrics"] else "" for c in columns),
                ]
            )


@cli_command
def evaluate(
    pred: Path | None = typer.Option(
        None, "--pred", help="Predicted (synthesized) image: NIfTI, MHA/NRRD or DICOM."
    ),
    ref: Path | None = typer.Option(None, "--ref", help="Reference (real) image on the same grid."),
    pred_dir: Path | None = typer.Option(None, "--pred-dir", help="Folder of predictions named <ID>... ."),
    ref_dir: Path | None = typer.Option(
        None,
        "--ref-dir",
        help="Folder of references: <ID>-<target>.nii.gz, or BraTS/SynthRAD/nnU-Net subjects.",
    ),
    target: str | None = typer.Option(
        None,
        "--target",
        help="Modality of the references (t1n, t2w, t2f, ct, ...; seg for label maps). "
        "Needed with --ref-dir; ct selects the SynthRAD CT conventions.",
    ),
    metrics: str = typer.Option(
        "psnr,ssim,mae",
        "--metrics",
        help="Comma-separated: psnr, ssim, ssim2d, ms-ssim, ms-ssim2d, mae, mse, nmse, sharpness "
        "(mean in-plane Sobel gradient of pred / ref inside the mask eroded by 3 voxels; 1 = as sharp); "
        "or dice, hd95 for label maps.",
    ),
    mask: str = typer.Option(
        "auto",
        "--mask",
        help="auto (reference foreground), none, or a mask file (folder mode: a file name beside "
        "each reference, {id} = subject ID, e.g. mask.nii.gz for SynthRAD).",
    ),
    norm: str = typer.Option(
        "auto",
        "--norm",
        help="Intensity scale: auto (window for CT, percentile otherwise), window, percentile, minmax, none.",
    ),
    data_range: float | None = typer.Option(
        None,
        "--data-range",
        help="PSNR/SSIM data range on the --norm scale (default: 4024 for window, 1 for "
        "percentile/minmax, reference max-min for none).",
    ),
    ssim_window: str = typer.Option(
        "uniform",
        "--ssim-window",
        help="uniform (7 voxels, scikit-image default, SynthRAD) or gaussian "
        "(11 taps, sigma 1.5, Wang 2004 / MONAI).",
    ),
    resample: bool = typer.Option(
        False,
        "--resample",
        help="Resample the prediction (linear) and mask (nearest) onto the reference grid "
        "instead of refusing a different grid.",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON document on stdout instead of a table."
    ),
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Also write the per-case values to this CSV file."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite the --csv file."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Compare predictions with references: PSNR, SSIM, MS-SSIM, MAE, MSE, NMSE, sharpness; Dice, HD95 for
    label maps.

    Results go to stdout (a table with mean, std, median; or --json); logs go to stderr.

    Non-finite values (PSNR of identical images is +inf) are null in JSON.

    Exit codes: 0 ok, 2 bad input, 3 some references had no prediction (the others are still reported).
    """
    from phmdiff_cli.io.atomic import check_output
    from phmdiff_cli.metrics.evaluate import summarize

    settings = _settings(metrics, norm, data_range, ssim_window)
    if csv_path is not None:
        check_output(csv_path, force=force)
    pairing = _pairing(pred, ref, pred_dir, ref_dir, target, mask)
    rows: list[dict[str, Any]] = []
    conventions: dict[str, Any] = {}
    with Progress(console=console, transient=True, disable=quiet or not console.is_terminal) as progress:
        task = progress.add_task("Evaluating", total=len(pairing.cases))
        for case in pairing.cases:
            progress.update(task, description=f"Evaluating {escape(case.id)}")
            scores, conventions = _score_case(case, settings, target, resample)
            extra = {k: conventions[k] for k in ("data_range", "mask_voxels") if k in conventions}
            rows.append(
                {"case": case.id, "pred": str(case.pred), "ref": str(case.ref), **extra, "metrics": scores}
            )
            progress.advance(task)
    per_case_range = conventions.get("norm") == "none" and settings.data_range is None
    console.print(f"Conventions: {_describe(conventions, per_case_range)}", soft_wrap=True, markup=False)
    columns = list(dict.fromkeys(c for row in rows for c in row["metrics"]))
    summary = summarize([row["metrics"] for row in rows])
    if pairing.no_reference:
        names = ", ".join(str(p) for p in pairing.no_reference)
        console.print(
            f"[yellow]Warning:[/] {len(pairing.no_reference)} prediction(s) match no reference: {names}",
            soft_wrap=True,
        )
    if pairing.no_prediction:
        console.print(
            f"[yellow]Warning:[/] {len(pairing.no_prediction)} reference(s) have no prediction: "
            f"{', '.join(pairing.no_prediction)}",
            soft_wrap=True,
        )
    if json_output:
        emit_json(
            finite(
                {
                    "conventions": {
                        k: v for k, v in conventions.items() if k not in ("data_range", "mask_voxels")
                    },
                    "metrics": list(settings.metrics),
                    "cases": rows,
                    "summary": summary,
                    "missing": {
                        "predictions": list(pairing.no_prediction),
                        "references": [str(p) for p in pairing.no_reference],
                    },
                }
            )
        )
    else:
        _print_table(rows, columns, summary)
    if csv_path is not None:
        _write_csv(csv_path, rows, columns, force)
        console.print(f"Wrote {csv_path}", markup=False)
    if pairing.no_prediction:
        raise typer.Exit(EXIT_PARTIAL)

"""`phmdiff info IMAGE`: geometry, orientation and intensity summary of a NIfTI, MHA/NRRD or DICOM series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from phmdiff_cli.cli.common import cli_command, console, emit_json
from phmdiff_cli.io import read_volume, volume_info

__all__ = ["info"]


def _numbers(values: list[float], digits: int = 4) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def _orientation(code: str) -> str:
    """'RAS' -> 'RAS (x->R, y->A, z->S)': the letters name where each voxel axis points."""
    return (
        f"{code} (" + ", ".join(f"{axis}->{letter}" for axis, letter in zip("xyz", code, strict=True)) + ")"
    )


def _rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    stats = summary["intensity"]
    direction = summary["direction"]
    rows = [
        ("file", str(summary["path"])),
        ("format", str(summary["format"])),
        ("size (x, y, z)", " x ".join(str(n) for n in summary["size"])),
        ("spacing (mm, x y z)", _numbers(summary["spacing"])),
        ("origin (mm, LPS)", _numbers(summary["origin"], 6)),
        ("direction (LPS, rows)", "  ".join(_numbers(direction[i : i + 3], 4) for i in (0, 3, 6))),
        ("orientation", _orientation(summary["orientation"])),
        ("dtype", summary["dtype"]),
        ("min / mean / max", f"{stats['min']:.6g} / {stats['mean']:.6g} / {stats['max']:.6g}"),
        ("p1 / p50 / p99", f"{stats['p1']:.6g} / {stats['p50']:.6g} / {stats['p99']:.6g}"),
        ("modality", summary["modality"] or "unknown"),
    ]
    dicom = summary.get("dicom")
    if dicom:
        rows += [
            ("series description", dicom["series_description"] or ""),
            ("series UID", dicom["series_uid"]),
            ("DICOM modality / slices", f"{dicom['modality']} / {dicom['number_of_slices']}"),
        ]
    rows += [("warning", text) for text in summary["warnings"]]
    return rows


@cli_command
def info(
    image: Path = typer.Argument(
        ..., help="NIfTI file (.nii, .nii.gz), MHA/NRRD file, or DICOM series folder."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON document on stdout instead of a table."
    ),
    series_uid: str | None = typer.Option(
        None, "--series-uid", help="SeriesInstanceUID to read when the folder holds several DICOM series."
    ),
) -> None:
    """Show an image's geometry (size, spacing, origin, direction, orientation), dtype and intensities.

    Orientation letters say where the x, y, z voxel axes point in LPS space (SimpleITK's convention: an
    identity direction is 'LPS'). Exit code 2 on unreadable or malformed input.
    """
    with console.status(f"Reading {escape(str(image))}", spinner="dots"):
        summary = volume_info(read_volume(image, series_uid=series_uid))
    if json_output:
        emit_json(summary)
        return
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in _rows(summary):
        table.add_row(key, value)
    Console(highlight=False).print(table)

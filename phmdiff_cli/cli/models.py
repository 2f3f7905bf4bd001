"""``phmdiff models list`` and ``phmdiff models info MODEL``: which models there are, what their cards say."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.json import JSON
from rich.markup import escape
from rich.table import Table

from phmdiff_cli.cli.common import cli_command, console, emit_json
from phmdiff_cli.engine.hub import WEIGHTS_ENV, available_models, resolve_model
from phmdiff_cli.errors import InputError

__all__ = ["app", "list_models", "model_info"]

app = typer.Typer(no_args_is_help=True)


def _stdout() -> Console:
    """Tables are data: they go to stdout, unlike logs (made per call so that $COLUMNS is honoured)."""
    return Console(highlight=False)


def _pairs(pairs: list[Any]) -> str:
    """``[["t1n", "t2w"], [["t1n", "t2w"], "t2f"]]`` -> ``t1n->t2w, t1n+t2w->t2f``."""
    def side(s: Any) -> str:
        return "+".join(s) if isinstance(s, list) else str(s)
    return ", ".join(f"{side(p[0])}->{side(p[1])}" for p in pairs)


def _grid(grid: dict[str, Any]) -> str:
    """A card's grid, ``{"size": 240, "spacing_mm": 1.0}`` (``ModelGrid.to_dict``) -> ``240x240 @ 1 mm``; another
    form as ``key=value`` pairs."""
    size, spacing = grid.get("size"), grid.get("spacing_mm")
    if isinstance(size, int) and isinstance(spacing, (int, float)):
        return f"{size}x{size} @ {spacing:g} mm"
    return " ".join(f"{k}={v}" for k, v in grid.items())


def _metrics(metrics: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested numeric metrics flattened to ``path=value`` strings (3 significant digits)."""
    out: list[str] = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            out += _metrics(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(f"{prefix}{key}={value:.3g}")
    return out


def _size(n: float, unit: str) -> str:
    """``12_345_678`` -> ``12.3 M<unit>``."""
    for prefix in ("", "k", "M", "G"):
        if n < 1000:
            return f"{n:.3g} {prefix}{unit}".rstrip()
        n /= 1000
    return f"{n:.3g} T{unit}"


def _summaries() -> list[dict[str, Any]]:
    """One summary per named model; an unreadable model gets an ``error`` entry, not a failure."""
    from phmdiff_cli.engine.checkpoint import describe_model  # imports torch: only when needed

    rows = []
    for name, folder in available_models().items():
        try:
            rows.append({"name": name, **describe_model(folder)})
        except InputError as error:
            rows.append({"name": name, "path": str(folder), "error": error.message})
    return rows


@app.command("list")
@cli_command
def list_models(
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list on stdout instead of a table."),
) -> None:
    """List the shipped models and those in $PHMDIFF_WEIGHTS: pairs, grid, size, sha256, validation scores."""
    rows = _summaries()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        console.print(f"No models installed yet. Train one with `phmdiff train`, put model folders in "
                      f"${WEIGHTS_ENV}, or pass --model hf://org/repo.")
        return
    table = Table("name", "pairs", "grid", "params", "file", box=None)
    table.add_column("sha256", no_wrap=True, min_width=12)
    table.add_column("validation", overflow="fold")
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], f"[red]{row['error']}[/]", "", "", "", "", "")
            continue
        table.add_row(row["name"], _pairs(row["pairs"]), _grid(row["grid"]), _size(row["params"], ""),
                      _size(row["file_bytes"], "B"), row["sha256"][:12], " ".join(_metrics(row["metrics"])))
    _stdout().print(table)


@app.command("info")
@cli_command
def model_info(
    model: str = typer.Argument(..., help="A model name, folder, .safetensors file or hf://org/repo[@revision]."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Show a model's card: architecture, pairs, grid, normalisation, training data, metrics, sha256."""
    from phmdiff_cli.engine.checkpoint import describe_model, read_card  # imports torch: only when needed

    path = resolve_model(model)
    summary = describe_model(path)
    card = read_card(path)
    if json_out:
        emit_json({"name": model, **summary, "card": card})
        return
    out = _stdout()
    out.print(f"[bold]{escape(model)}[/]  {escape(summary['path'])}")
    out.print(f"pairs {_pairs(card['pairs'])} | grid {_grid(card['grid'])} | "
                  f"{_size(summary['params'], '')} parameters | {_size(summary['file_bytes'], 'B')}")
    out.print(JSON.from_data(card))

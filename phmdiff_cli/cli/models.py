"""``phmdiff models list`` and ``phmdiff models info MODEL``: which models there are, what their cards say."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
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


def _score(metrics: dict[str, Any]) -> str:
    """``{"psnr": 19.4, "ssim": 0.669, "sharpness": 0.72}`` -> ``19.4 dB / 0.669 / 0.72`` (what it has)."""
    parts = [f"{metrics['psnr']:.1f} dB" if isinstance(metrics.get("psnr"), (int, float)) else "-",
             f"{metrics['ssim']:.3f}" if isinstance(metrics.get("ssim"), (int, float)) else "-"]
    if isinstance(metrics.get("sharpness"), (int, float)):
        parts.append(f"{metrics['sharpness']:.2f}")
    return " / ".join(parts)


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
    """List the shipped models and those in $PHMDIFF_WEIGHTS: number of pairs, grid, parameters / file size and
    mean validation PSNR / SSIM (`models info` and --json give the rest)."""
    rows = _summaries()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        console.print(f"No models installed yet. Train one with `phmdiff train`, put model folders in "
                      f"${WEIGHTS_ENV}, or pass --model hf://org/repo.")
        return
    table = Table("name", "pairs", "grid", "size", "validation mean", box=None)
    table.columns[0].no_wrap = True
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], f"[red]{escape(row['error'])}[/]", "", "", "")
            continue
        mean = row["metrics"].get("val", {}).get("mean", {})
        table.add_row(row["name"], str(len(row["pairs"])), _grid(row["grid"]),
                      f"{_size(row['params'], '')} / {_size(row['file_bytes'], 'B')}", _score(mean))
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
    _print_card(_stdout(), model, summary, card)


def _print_card(out: Console, model: str, summary: dict[str, Any], card: dict[str, Any]) -> None:
    """A model card for people: what it does, on which grid, trained on what (with the data's licences),
    how it scored per validation subject, and what it was not made for."""
    training, cfg = card.get("training", {}), card.get("model", {})
    out.print(f"[bold]{escape(model)}[/]  {escape(summary['path'])}")
    out.print(f"PHMDiff {cfg.get('size', '?')}: {_size(summary['params'], '')} parameters, "
              f"{_size(summary['file_bytes'], 'B')}, sha256 {summary['sha256'][:16]}...")
    out.print(f"[bold]Pairs[/] {_pairs(card['pairs'])}")
    sampling = cfg.get("sampling", {})
    out.print(f"[bold]Grid[/] {_grid(card['grid'])}, {cfg.get('levels', '?')} pyramid levels; sampler "
              f"{sampling.get('sampler', '?')} {','.join(map(str, sampling.get('steps', [])))} steps per level"
              + ("; averaged with its left-right mirror" if sampling.get("mirror") else "")
              + ("; the sources' detail added" if sampling.get("source_detail") else "")
              + ("; MRI contrast calibrated to the training targets'" if sampling.get("contrast") else ""))
    subjects = training.get("subjects", {})
    out.print(f"[bold]Training data[/] {escape(_data_sources(training.get('data')))}: "
              f"{len(subjects.get('train', []))} subjects; validation {', '.join(subjects.get('val', [])) or 'none'}")
    for subject, licence in training.get("licences", {}).items():
        out.print(f"  {escape(subject)}: {escape(str(licence))}")
    steps = training.get("total_steps", training.get("steps"))
    seconds = training.get("total_elapsed_s", training.get("elapsed_s"))
    if steps is not None and seconds is not None:
        out.print(f"[bold]Training[/] {steps} steps, {seconds / 60:.0f} min, {training.get('device', '?')} "
                  f"{training.get('precision', '')}")
    metrics = card.get("metrics", {})
    per_subject = metrics.get("val_subjects", {})
    table = Table("pair", *per_subject, "mean", box=None)
    for pair, scores in metrics.get("val", {}).items():
        cells = [_cell(s.get(pair, {})) for s in per_subject.values()]
        table.add_row("[bold]mean[/]" if pair == "mean" else pair, *cells, _cell(scores))
    if metrics.get("val"):
        out.print(f"[bold]Validation[/] PSNR dB/SSIM{'/sharpness' if _has_sharpness(metrics) else ''} at step "
                  f"{metrics.get('val_step', '?')}, on training validation's slices:")
        out.print(table)
    for key, title in (("intended_use", "Intended use"), ("limitations", "Limitations")):
        if card.get(key):
            out.print(f"[bold]{title}[/] {escape(str(card[key]))}")
    out.print("[dim]--json prints the whole card[/]")


def _data_sources(data: Any) -> str:
    """Where a card says the training data came from: its folders (``DatasetSummary.to_dict``), or the names
    of a list of data sets."""
    if isinstance(data, dict):
        return ", ".join(map(str, data.get("folders", [data["root"]] if "root" in data else []))) or "not recorded"
    if isinstance(data, list):
        return ", ".join(str(d.get("name", d)) if isinstance(d, dict) else str(d) for d in data)
    return "not recorded"


def _cell(scores: dict[str, Any]) -> str:
    """``19.4/0.67/0.72`` (what the scores have), or empty."""
    parts = [f"{scores[k]:{f}}" for k, f in (("psnr", ".1f"), ("ssim", ".2f"), ("sharpness", ".2f"))
             if isinstance(scores.get(k), (int, float))]
    return "/".join(parts)


def _has_sharpness(metrics: dict[str, Any]) -> bool:
    return "sharpness" in metrics.get("val", {}).get("mean", {})

"""The ``phmdiff`` command: registers the sub-commands, each defined in its own module."""

from __future__ import annotations

import typer

from phmdiff_cli import __version__
from phmdiff_cli.cli import eval as eval_cmd
from phmdiff_cli.cli import info, models, segment_augment, synthesize, train
from phmdiff_cli.cli.common import setup_logging, state

__all__ = ["app", "main"]

app = typer.Typer(
    name="phmdiff",
    help="Synthesize a missing medical image (MRI contrast, or CT from MRI) with a pyramid hierarchical "
    "masked diffusion model. Exit codes: 0 ok, 1 internal error, 2 bad input or usage, 3 some cases failed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"phmdiff {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """phmdiff: medical image synthesis from the images a patient already has."""
    state.debug = state.debug or debug
    setup_logging()


app.command("info")(info.info)
app.command("eval")(eval_cmd.evaluate)
app.command("evaluate", hidden=True)(eval_cmd.evaluate)  # the design notes' name; one entry in --help
app.command("train")(train.train)
app.command("synthesize")(synthesize.synthesize)
app.command("segment-augment")(segment_augment.segment_augment)
app.add_typer(models.app, name="models", help="List and inspect models.")


def main() -> None:
    """Console-script entry point."""
    app()

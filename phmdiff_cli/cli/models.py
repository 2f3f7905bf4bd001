"""`phmdiff models ...` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from phmdiff_cli.cli.common import cli_command
from phmdiff_cli.errors import PhmdiffError

app = typer.Typer(no_args_is_help=True)


@app.command("list")
@cli_command
def list_models() -> None:
    """Not implemented yet."""
    raise PhmdiffError("not implemented yet", exit_code=1)

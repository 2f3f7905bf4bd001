"""`phmdiff segment-augment` (placeholder until its issue lands)."""

from __future__ import annotations

from phmdiff_cli.cli.common import cli_command
from phmdiff_cli.errors import PhmdiffError


@cli_command
def segment_augment() -> None:
    """Not implemented yet."""
    raise PhmdiffError("not implemented yet", exit_code=1)

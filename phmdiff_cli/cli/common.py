"""What every command shares: the stderr console, error-to-exit-code mapping, JSON output on stdout."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from phmdiff_cli.errors import EXIT_INTERNAL, InputError, PhmdiffError

__all__ = ["console", "state", "cli_command", "emit_json", "fail", "setup_logging", "parse_steps"]

#: Logs, progress and errors go to stderr; data goes to stdout or files.
console = Console(stderr=True, highlight=False)

class _State:
    """Options of the root command (``phmdiff --debug ...``)."""

    debug: bool = bool(os.environ.get("PHMDIFF_DEBUG"))

state = _State()

F = TypeVar("F", bound=Callable[..., Any])


class _ConsoleHandler(logging.Handler):
    """Library log records (``phmdiff_cli.*``) as ``Warning: ...`` lines on the stderr console."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "[yellow]Warning:[/] " if record.levelno >= logging.WARNING else ""
        console.print(prefix + escape(record.getMessage()), soft_wrap=True)


def setup_logging() -> None:
    """Route the package's logs (and Python warnings, e.g. a grid that crops foreground) to the console."""
    logger = logging.getLogger("phmdiff_cli")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.DEBUG if state.debug else logging.INFO)
    logger.propagate = False
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(h, _ConsoleHandler) for h in warnings_logger.handlers):
        warnings_logger.addHandler(_ConsoleHandler())
    warnings_logger.propagate = False

def fail(error: PhmdiffError) -> typer.Exit:
    """Print ``Error: <file>: <problem>`` (+ hint) on stderr and return the Exit to raise."""
    # Messages hold user paths, which may contain [brackets]: never let rich read them as markup.
    console.print(f"[bold red]Error:[/] {escape(error.message)}", soft_wrap=True)
    if error.hint:
        console.print(f"[dim]Hint: {escape(error.hint)}[/]", soft_wrap=True)
    return typer.Exit(error.exit_code)

def cli_command(fn: F) -> F:
    """Decorate a command: user errors become one line and exit code 2, anything else exit code 1; a
    traceback only with ``--debug``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except PhmdiffError as error:
            if state.debug:
                traceback.print_exc()
            raise fail(error) from None
        except KeyboardInterrupt:
            console.print("Interrupted.")
            raise typer.Exit(130) from None
        except MemoryError:
            if state.debug:
                traceback.print_exc()
            raise fail(
                PhmdiffError("out of memory", hint="lower --batch-size", exit_code=EXIT_INTERNAL)
            ) from None
        except Exception as error:  # noqa: BLE001 - the last line of defence of a CLI
            if state.debug:
                traceback.print_exc()
            raise fail(
                PhmdiffError(
                    f"internal error: {type(error).__name__}: {error}",
                    hint="run again with --debug for the traceback and report it",
                    exit_code=EXIT_INTERNAL,
                )
            ) from None

    return wrapper  # type: ignore[return-value]

def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout (for pipelines)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def parse_steps(text: str | None) -> int | tuple[int, ...] | None:
    """``--steps``: one count for every pyramid level, or one per level coarse to fine (``12,8,6``)."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(
            f"bad --steps {text!r}", hint="one number (every level), or one per level: 12,8,6"
        ) from None
    return values[0] if len(values) == 1 else values

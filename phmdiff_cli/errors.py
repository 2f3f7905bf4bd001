"""User-facing errors: one line naming the file and the problem, plus a hint; mapped to exit codes by the CLI."""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXIT_OK", "EXIT_INTERNAL", "EXIT_BAD_INPUT", "EXIT_PARTIAL", "PhmdiffError", "InputError"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
#: Batch work where some cases failed and the others were written.
EXIT_PARTIAL = 3


class PhmdiffError(Exception):
    """An error the user can fix. Printed as ``Error: <path>: <problem>`` (+ ``Hint: <hint>``), no traceback.

    Args:
        problem: what is wrong, one sentence without a trailing period.
        path: the file or folder concerned, if any.
        hint: how to fix it, if known.
        exit_code: process exit code (2: usage or bad input).
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        hint: str | None = None,
        exit_code: int = EXIT_BAD_INPUT,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.hint = hint
        self.exit_code = exit_code
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one-line message, without the ``Error:`` prefix or the hint."""
        return f"{self.path}: {self.problem}" if self.path else self.problem


class InputError(PhmdiffError):
    """Bad input data: unreadable, malformed or unsuitable image, dataset or option (exit code 2)."""

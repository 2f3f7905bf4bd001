"""Training progress on stderr: a rich bar (step, loss, images per second, ETA) on a terminal, one plain line
per log interval otherwise (log files, CI), nothing with ``--quiet``."""

from __future__ import annotations

import datetime
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

__all__ = ["Reporter"]


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else str(datetime.timedelta(seconds=max(0, round(seconds))))


class Reporter:
    """Progress display of a training run.

    Args:
        console: the stderr console.
        quiet: show nothing.
        total: the step budget, if any.
        minutes: the time budget, if any.
        start: the first step of this session.
    """

    def __init__(
        self, console: Console, *, quiet: bool, total: int | None, minutes: float | None, start: int
    ) -> None:
        self.console, self.quiet, self.total, self.minutes = console, quiet, total, minutes
        self.bar: Progress | None = None
        if not quiet and console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]Training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[speed]} img/s"),
                TextColumn("ETA {task.fields[eta]}"),
                console=console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", speed="-", eta="-")

    def __enter__(self) -> Reporter:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, step: int) -> None:
        """Show that ``step`` steps are done (cheap: call it every step)."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def eta(self, step: int, steps_per_s: float, elapsed: float) -> float | None:
        """Seconds left: the sooner of the step budget at the current speed and the time budget."""
        left = []
        if self.total is not None and steps_per_s > 0:
            left.append((self.total - step) / steps_per_s)
        if self.minutes is not None:
            left.append(self.minutes * 60 - elapsed)
        return min(left) if left else None

    def update(
        self, step: int, *, loss: float, images_per_s: float, steps_per_s: float, elapsed: float
    ) -> None:
        """New interval averages: loss, images per second (all processes) and the ETA."""
        if self.quiet:
            return
        eta = _duration(self.eta(step, steps_per_s, elapsed))
        if self.bar is not None:
            self.bar.update(
                self.task, completed=step, loss=f"{loss:.4f}", speed=f"{images_per_s:.1f}", eta=eta
            )
        else:
            total = "" if self.total is None else f"/{self.total}"
            self.console.print(
                f"step {step}{total}  loss {loss:.4f}  {images_per_s:.1f} img/s  ETA {eta}", soft_wrap=True
            )

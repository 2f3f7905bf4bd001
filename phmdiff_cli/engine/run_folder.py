"""The run folder of ``phmdiff train --out RUN``: what it holds, creating it safely, and its JSON files.

::

    RUN/train_config.json   resolved settings and model config (what --resume and --config read)
    RUN/split.json          train / validation subject ids and how they were chosen
    RUN/data.json           dataset summary (layout, subjects, modalities, sizes, spacings)
    RUN/metrics.jsonl       one JSON object per log interval and per validation, for plotting
    RUN/samples/            step-XXXXXXX.png: source | synthesized | real, per validation
    RUN/state/              resumable checkpoint (see phmdiff_cli.engine.checkpoint)
    RUN/last/, RUN/best/    model folders (EMA weights): `--model RUN` resolves to best/, else last/
    RUN/cache/              preprocessed slices (unless --cache-dir)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phmdiff_cli.errors import InputError
from phmdiff_cli.io.atomic import atomic_path

__all__ = ["RunFolder"]

_CONFIG = "train_config.json"


@dataclass(frozen=True)
class RunFolder:
    """Paths of a run folder (see the module docstring)."""

    root: Path

    config = property(lambda self: self.root / _CONFIG)
    split = property(lambda self: self.root / "split.json")
    data = property(lambda self: self.root / "data.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    samples = property(lambda self: self.root / "samples")
    state = property(lambda self: self.root / "state")
    best = property(lambda self: self.root / "best")
    last = property(lambda self: self.root / "last")
    cache = property(lambda self: self.root / "cache")

    @classmethod
    def create(cls, out: str | Path, *, force: bool) -> RunFolder:
        """Make a new run folder (parents included). An existing empty folder is used as is; an existing run
        folder is emptied with ``force`` (its preprocessing cache is kept, it stays valid).

        Raises:
            InputError: the folder exists and is not empty (without ``force``, or when it is not a run
                folder: ``force`` never deletes a folder phmdiff did not make), or it cannot be created or
                written.
        """
        run = cls(Path(out))
        root = run.root
        if root.exists() and not root.is_dir():
            raise InputError("the run folder is a file", path=root, hint="choose another --out")
        contents = [p for p in root.iterdir()] if root.is_dir() else []
        if contents:
            if not run.config.is_file():
                raise InputError(
                    "folder exists and is not a phmdiff run folder",
                    path=root,
                    hint="choose a new or empty --out folder",
                )
            if not force:
                raise InputError(
                    "run folder already exists",
                    path=root,
                    hint="pass --resume to continue it, or --force to start it again",
                )
            for path in contents:
                if path != run.cache:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot create the run folder: {error.strerror}", path=root) from None
        if not os.access(root, os.W_OK):
            raise InputError("the run folder is not writable", path=root)
        return run

    @classmethod
    def open(cls, out: str | Path) -> RunFolder:
        """An existing run folder, for ``--resume``.

        Raises:
            InputError: no run folder there.
        """
        run = cls(Path(out))
        if not run.config.is_file():
            raise InputError(
                f"not a phmdiff run folder (no {_CONFIG})",
                path=run.root,
                hint="--resume takes the --out folder of an earlier `phmdiff train`",
            )
        return run

    def read_config(self) -> dict[str, Any]:
        """The saved ``{"settings": ..., "model": ...}`` (and ``"init"``: what an ``--init`` run started from)."""
        try:
            data = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"unreadable run configuration: {error}", path=self.config) from None
        if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
            raise InputError("run configuration lacks its settings", path=self.config)
        return data

    def write_json(self, path: Path, obj: Any) -> None:
        """Write ``obj`` as indented JSON, atomically."""
        try:
            with atomic_path(path, force=True) as tmp:
                tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
        except OSError as error:
            raise InputError(f"cannot write: {error.strerror}", path=path) from None

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (flushed, so a killed run keeps what it logged)."""
        with self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines after ``step``: a resumed run repeats the steps after its last checkpoint, and the
        log should hold each step once."""
        if not self.metrics.is_file():
            return
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if len(kept) != len(lines):
            with atomic_path(self.metrics, force=True) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _step_of(line: str) -> int | None:
    """The step of a log line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None

"""Atomic outputs: nothing half-written, no overwrite without force, never a folder replaced by a file."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.errors import InputError
from phmdiff_cli.io.atomic import atomic_path


def test_folder_is_not_replaced_by_a_file_even_with_force(tmp_path: Path) -> None:
    folder = tmp_path / "out.nii.gz"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="is a folder"), atomic_path(folder, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert (folder / "sub" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # no temporary left


def test_a_folder_output_is_replaced_whole_and_the_old_one_removed(tmp_path: Path) -> None:
    out = tmp_path / "series"
    out.mkdir()
    (out / "IM1.dcm").write_bytes(b"old")
    with atomic_path(out, force=True, directory=True) as tmp:
        (tmp / "IM2.dcm").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["IM2.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]


def test_a_failed_write_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "t2.nii"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(out, force=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t2.nii"]


def test_paths_with_brackets_give_a_one_line_error() -> None:
    result = CliRunner().invoke(app, ["info", "/nonexistent/x[/y].nii.gz"])
    assert result.exit_code == 2
    assert "Error: /nonexistent/x[/y].nii.gz: no such file" in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output

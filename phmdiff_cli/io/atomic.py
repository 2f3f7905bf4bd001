"""Atomic output: write to a temporary sibling, then rename, so a crash never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from phmdiff_cli.errors import InputError

__all__ = ["check_output", "atomic_path", "share_permissions"]


def check_output(path: str | Path, *, force: bool, directory: bool = False) -> Path:
    """Validate an output path before any work: refuse to overwrite without ``force``, refuse to replace a
    folder by a file or a file by a folder (even with ``force``: that is a wrong path, not an old output), and
    check the parent folder exists and is writable.

    Raises:
        InputError: the output exists (and ``force`` is false) or is of the other kind, or its folder is
            missing or not writable.
    """
    out = Path(path)
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError("output already exists", path=out, hint="pass --force to overwrite it")
        if out.is_dir() != directory or out.is_symlink():
            what = "a link" if out.is_symlink() else "a folder" if out.is_dir() else "a file"
            raise InputError(f"output exists and is {what}, not the {'folder' if directory else 'file'} to "
                             "write; refusing to replace it even with --force", path=out,
                             hint="choose another output path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError("output folder does not exist", path=parent, hint="create it first")
    if not os.access(parent, os.W_OK):
        raise InputError("output folder is not writable", path=parent)
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path, *, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    The temporary name keeps the final suffixes (``.nii.gz``) so writers that choose a format by extension work.
    With ``directory=True`` the temporary path is an empty folder (for DICOM series).

    Raises:
        InputError: as :func:`check_output`.
    """
    out = check_output(path, force=force, directory=directory)
    suffix = "".join(out.suffixes) if not directory else ""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=f".tmp{suffix}", dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as error:
        # os.access() says yes to root everywhere; read-only and virtual file systems only fail here.
        problem = f"cannot create files in the output folder ({error.strerror})"
        raise InputError(problem, path=parent) from None
    try:
        yield tmp
        share_permissions(tmp)
        _replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` onto ``out``. A folder cannot be replaced in one rename, so an old output is first renamed
    aside and deleted only once the new one is in place: at any moment one complete output exists."""
    if not out.is_dir():
        os.replace(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, aside / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside / out.name, out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def share_permissions(path: Path) -> None:
    """Give one file or folder the permissions a plain open()/mkdir() would: mkstemp/mkdtemp (and safetensors)
    create private 0600/0700 entries. Only ``path`` itself is changed, never what a folder holds (it may hold
    links to a user's files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)

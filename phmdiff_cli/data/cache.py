"""On-disk cache of preprocessed subjects: float16 model-grid slices as memory-mappable ``.npy`` files.

A subject is preprocessed once (:func:`~phmdiff_cli.data.preprocess.load_subject` +
:func:`~phmdiff_cli.data.preprocess.prepare_volume`) and stored in ``<cache>/<id>-<key>/`` with one
``<modality>.npy`` per image (``(z, size, size)`` float16, model range) and ``meta.json`` (intensity
parameters, grid transform, per-slice foreground). The key hashes the files (path, size, mtime), the
modalities, the model grid, the normalisation constants and the resampling choice, so a changed input or
setting is preprocessed again and a second run reads no image file. Entries are written to a temporary folder
and renamed, so concurrent DDP ranks or a crash never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phmdiff_cli.data.grid import GridTransform, ModelGrid
from phmdiff_cli.data.layouts import MASK_KEY, Subject
from phmdiff_cli.data.normalize import CT_WINDOW_HU, MRI_PERCENTILE, IntensityParams
from phmdiff_cli.data.preprocess import load_subject, prepare_volume
from phmdiff_cli.errors import InputError

__all__ = ["CACHE_VERSION", "CachedSubject", "cache_key", "cache_subject"]

#: Bump when preprocessing changes meaning, so old cache entries are not reused.
CACHE_VERSION = 2
_META = "meta.json"


@dataclass(frozen=True)
class CachedSubject:
    """A preprocessed subject in the cache.

    Attributes:
        id: subject id.
        folder: the cache entry.
        params: canonical modality -> intensity mapping.
        transform: grid transform shared by all the subject's images.
        foreground: canonical modality -> float32 ``(z,)`` foreground fraction per slice.
    """

    id: str
    folder: Path
    params: dict[str, IntensityParams]
    transform: GridTransform
    foreground: dict[str, np.ndarray]

    @property
    def depth(self) -> int:
        """Number of axial slices."""
        return self.transform.shape[0]

    def load(self, modality: str) -> np.ndarray:
        """Read-only memory map of one image: float16 ``(z, size, size)`` in the model range."""
        return np.load(self.folder / f"{modality}.npy", mmap_mode="r")

    @classmethod
    def read(cls, folder: Path) -> CachedSubject:
        """Open an entry written by :func:`cache_subject`."""
        meta = json.loads((folder / _META).read_text())
        images = meta["images"]
        return cls(
            id=meta["subject"],
            folder=folder,
            params={m: IntensityParams(**v["params"]) for m, v in images.items()},
            transform=GridTransform.from_dict(meta["transform"]),
            foreground={m: np.asarray(v["foreground"], dtype=np.float32) for m, v in images.items()},
        )


def _file_stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(
    subject: Subject, modalities: Sequence[str], grid: ModelGrid, *, reference: str, resample: bool
) -> str:
    """Hex digest identifying one preprocessing of ``subject`` (see the module docstring)."""
    files = {m: _file_stamp(subject.images[m]) for m in sorted(modalities)}
    if subject.mask is not None:
        files[MASK_KEY] = _file_stamp(subject.mask)
    recipe = {
        "version": CACHE_VERSION,
        "files": files,
        "grid": grid.to_dict(),
        "normalisation": {"mri_percentile": MRI_PERCENTILE, "ct_window_hu": list(CT_WINDOW_HU)},
        "reference": reference,
        "resample": resample,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def cache_subject(
    subject: Subject,
    modalities: Sequence[str],
    grid: ModelGrid,
    cache_dir: Path,
    *,
    reference: str,
    resample: bool = False,
) -> CachedSubject:
    """The cache entry of ``subject`` for these modalities and grid, preprocessing it first if needed.

    Args:
        subject: the subject (all ``modalities`` in ``subject.images``).
        modalities: canonical modalities to prepare.
        grid: the model grid.
        cache_dir: cache folder (created if missing).
        reference: the modality whose grid the others must share (see
            :func:`~phmdiff_cli.data.preprocess.load_subject`).
        resample: resample images on another grid onto the reference's instead of refusing.

    Raises:
        InputError: the cache folder cannot be written, or as
            :func:`~phmdiff_cli.data.preprocess.load_subject`.
    """
    key = cache_key(subject, modalities, grid, reference=reference, resample=resample)
    folder = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', subject.id)}-{key[:20]}"
    if (folder / _META).is_file():
        return CachedSubject.read(folder)
    volumes = load_subject(subject, modalities, reference=reference, resample=resample)
    mask = volumes.pop(MASK_KEY, None)
    prepared = {m: prepare_volume(volumes[m], grid, modality=m, mask=mask) for m in modalities}
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    except OSError as error:
        raise InputError(f"cannot write the preprocessing cache: {error.strerror}", path=cache_dir) from None
    try:
        for modality, item in prepared.items():
            np.save(tmp / f"{modality}.npy", item.array.astype(np.float16))
        meta = {
            "subject": subject.id,
            "files": {m: str(p) for m, p in subject.images.items() if m in prepared},
            "transform": prepared[reference].transform.to_dict(),
            "images": {
                m: {"params": p.params.to_dict(), "foreground": p.foreground.tolist()}
                for m, p in prepared.items()
            },
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        os.rename(tmp, folder)
    except OSError:
        # Another process (DDP rank) wrote the same entry first: theirs is identical, keep it.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / _META).is_file():
            raise
    return CachedSubject.read(folder)

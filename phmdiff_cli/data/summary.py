"""What a dataset holds, from image headers only (no voxel data): subjects, modalities, sizes, spacings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from rich.table import Table

from phmdiff_cli.data.layouts import LABEL_KEY, MASK_KEY, Dataset
from phmdiff_cli.errors import InputError

__all__ = ["ImageInfo", "DatasetSummary", "summary"]


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of one file.

    Attributes:
        subject: subject id.
        key: canonical modality, :data:`LABEL_KEY` or :data:`MASK_KEY`.
        path: the file.
        size: voxels ``(x, y, z)``.
        spacing: mm ``(x, y, z)``.
        synthetic: a synthetic image.
    """

    subject: str
    key: str
    path: Path
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    synthetic: bool = False


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`summary` found: one :class:`ImageInfo` per file."""

    root: Path
    layout: str
    subjects: int
    images: tuple[ImageInfo, ...]
    folders: tuple[Path, ...] = ()

    def by_key(self) -> dict[str, dict[str, Any]]:
        """Per modality (and seg/mask): number of files, distinct sizes ``(x, y, z)`` and spacings (mm)."""
        out: dict[str, dict[str, Any]] = {}
        for info in self.images:
            entry = out.setdefault(info.key, {"files": 0, "synthetic": 0, "sizes": set(), "spacings": set()})
            entry["synthetic" if info.synthetic else "files"] += 1
            entry["sizes"].add(info.size)
            entry["spacings"].add(tuple(round(s, 3) for s in info.spacing))
        return {
            k: {**v, "sizes": sorted(v["sizes"]), "spacings": sorted(v["spacings"])} for k, v in out.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for a model card (no per-file list)."""
        return {
            "root": str(self.root),
            **({"folders": [str(f) for f in self.folders]} if len(self.folders) > 1 else {}),
            "layout": self.layout,
            "subjects": self.subjects,
            "modalities": {
                k: {**v, "sizes": [list(s) for s in v["sizes"]], "spacings": [list(s) for s in v["spacings"]]}
                for k, v in self.by_key().items()
            },
        }

    def table(self) -> Table:
        """A rich table: modality, files, sizes and spacings, for ``train`` to print."""
        where = ", ".join(map(str, self.folders or (self.root,)))
        table = Table(title=f"{self.subjects} subjects ({self.layout} layout) in {where}")
        for column in ("modality", "files", "synthetic", "size (x, y, z)", "spacing mm (x, y, z)"):
            table.add_column(column)
        for key, v in sorted(self.by_key().items()):
            sizes = ", ".join("x".join(map(str, s)) for s in v["sizes"][:3]) + (
                " ..." if len(v["sizes"]) > 3 else ""
            )
            spacings = ", ".join("x".join(f"{x:g}" for x in s) for s in v["spacings"][:3])
            spacings += " ..." if len(v["spacings"]) > 3 else ""
            table.add_row(key, str(v["files"]), str(v["synthetic"]), sizes, spacings)
        return table


def _header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Size ``(x, y, z)`` and spacing (mm) from the header alone (no voxel data is read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(f"cannot read image header: {first}", path=path) from None
    return tuple(reader.GetSize()), tuple(reader.GetSpacing())


def summary(dataset: Dataset) -> DatasetSummary:
    """Read the header of every file of ``dataset`` (fast: no voxel data) and summarise it.

    Raises:
        InputError: a file's header cannot be read.
    """
    infos: list[ImageInfo] = []
    for subject in dataset.subjects:
        files: list[tuple[str, Path, bool]] = [(k, p, False) for k, p in sorted(subject.images.items())]
        files += [(k, p, False) for k, p in ((LABEL_KEY, subject.label), (MASK_KEY, subject.mask)) if p]
        files += [(k, p, True) for k, paths in subject.synthetic.items() for p in paths]
        for key, path, synthetic in files:
            infos.append(ImageInfo(subject.id, key, path, *_header(path), synthetic=synthetic))
    return DatasetSummary(dataset.root, dataset.layout, len(dataset.subjects), tuple(infos), dataset.folders)

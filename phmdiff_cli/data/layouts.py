"""Dataset discovery: find subjects and their images in the folder layouts users already have.

Layouts (``Dataset.layout``):

* ``synthrad``  - SynthRAD 2023: ``1PA001/mr.nii.gz``, ``ct.nii.gz``, ``mask.nii.gz``
* ``brats2023`` - ``ID/ID-t1n.nii.gz``, ``ID-t1c``, ``ID-t2w``, ``ID-t2f``, ``ID-seg``
* ``brats2021`` - ``ID/ID_t1.nii.gz``, ``ID_t1ce``, ``ID_t2``, ``ID_flair``, ``ID_seg``
* ``nnunet``    - ``imagesTr/case_0000.nii.gz`` + ``dataset.json`` (``channel_names``), ``labelsTr/case...``
* ``csv``       - a manifest with columns ``subject, modality, path`` (modality ``seg``/``label`` for labels,
  ``mask`` for masks; optional column ``synthetic``); relative paths are relative to the manifest's folder.

Synthetic images (written by ``segment-augment``) carry ``_syn`` (+ a variant number) right after the
modality: ``ID-t2w_syn.nii.gz``, ``ID-t2w_syn2.nii.gz``, ``ID_flair_syn.nii.gz``, ``t2w_syn.nii.gz``; in
nnU-Net, where a file name must be ``case_XXXX``, the mark goes on the case: ``case_syn2_0001.nii.gz``
(synthetic channel 1 of ``case``). Discovery reports them in ``Subject.synthetic``, never among the real
``Subject.images``, so training on real data is the default.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phmdiff_cli.errors import InputError
from phmdiff_cli.modalities import canonical_modality

__all__ = [
    "LAYOUTS",
    "LABEL_KEY",
    "MASK_KEY",
    "Subject",
    "Dataset",
    "discover",
    "combine",
    "output_path",
    "is_image_file",
]

LAYOUTS = ("synthrad", "brats2023", "brats2021", "nnunet", "csv")
#: Keys for the non-image files of a subject (file names and CSV ``modality`` column).
LABEL_KEY = "seg"
MASK_KEY = "mask"
_LABEL_NAMES = {"seg", "label", "labels"}
#: File-name tokens of brain/body masks (BraTS 2013 as released for DeepMedic: ``ID-brainmask.nii.gz``).
_MASK_NAMES = {"mask", "brainmask", "brain_mask", "brain-mask"}
_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_SYN = re.compile(r"^(?P<base>.+)_syn(?P<variant>\d*)$")
#: BraTS 2021 spelling of the canonical modalities (others keep their canonical name).
_BRATS2021_NAMES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
_HINT = (
    "name files as in BraTS (ID/ID-t1n.nii.gz), SynthRAD (ID/mr.nii.gz) or nnU-Net, or pass a CSV manifest"
)


@dataclass(frozen=True)
class Subject:
    """One patient.

    Attributes:
        id: subject identifier (folder name, nnU-Net case or CSV ``subject``).
        images: canonical modality -> real image file.
        label: segmentation label map, if any.
        mask: body/brain mask, if any.
        synthetic: canonical modality -> synthetic image files (variant order).
    """

    id: str
    images: dict[str, Path]
    label: Path | None = None
    mask: Path | None = None
    synthetic: dict[str, tuple[Path, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    """Subjects found under ``root`` in one layout.

    Attributes:
        root: the dataset folder (the manifest's folder for ``csv``).
        layout: one of :data:`LAYOUTS`.
        subjects: sorted by id.
        extension: file extension of the images (``.nii.gz``), used to write new files alike.
        channels: nnU-Net only: canonical modality -> channel index.
        manifest: ``csv`` only: the manifest file.
        parts: a :func:`combine` of several datasets only: the datasets combined (``root`` is the first's).
    """

    root: Path
    layout: str
    subjects: tuple[Subject, ...]
    extension: str = ".nii.gz"
    channels: dict[str, int] = field(default_factory=dict)
    manifest: Path | None = None
    parts: tuple[Dataset, ...] = ()

    @property
    def folders(self) -> tuple[Path, ...]:
        """The dataset folders (or manifests) the subjects come from, in the order given."""
        return tuple(p.manifest or p.root for p in self.parts) or (self.manifest or self.root,)

    def folder_of(self, subject_id: str) -> Path:
        """The dataset folder (or manifest) a subject comes from (KeyError if absent)."""
        for part in self.parts or (self,):
            if any(s.id == subject_id for s in part.subjects):
                return part.manifest or part.root
        raise KeyError(subject_id)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Canonical modalities with a real image in at least one subject, sorted."""
        return tuple(sorted({m for s in self.subjects for m in s.images}))

    def subject(self, subject_id: str) -> Subject:
        """The subject with this id (KeyError if absent)."""
        for subject in self.subjects:
            if subject.id == subject_id:
                return subject
        raise KeyError(subject_id)


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension (NIfTI, MHA/MHD, NRRD)."""
    return path.is_file() and not path.name.startswith(".") and _split_ext(path.name)[1] != ""


def _split_ext(name: str) -> tuple[str, str]:
    """``("ID-t1n", ".nii.gz")``; the extension is ``""`` when not an image extension."""
    lower = name.lower()
    for ext in _EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], ext
    return name, ""


def _common_extension(subjects: Iterable[Subject]) -> str:
    """The most frequent image extension of the subjects' real images (``.nii.gz`` when there are none)."""
    counts = Counter(_split_ext(p.name)[1] for s in subjects for p in s.images.values())
    return counts.most_common(1)[0][0] if counts else ".nii.gz"


def _split_syn(stem: str) -> tuple[str, int | None]:
    """``("ID-t2w", 2)`` for ``ID-t2w_syn2``; variant 0 for ``_syn``; ``None`` for a real image."""
    match = _SYN.match(stem)
    if match is None:
        return stem, None
    return match["base"], int(match["variant"] or 0)


def discover(root: Path, manifest: Path | None = None) -> Dataset:
    """Find the subjects of a dataset folder (or CSV manifest).

    Args:
        root: dataset folder, or a ``.csv`` manifest.
        manifest: a CSV manifest; when given, ``root`` is only used in messages.

    Raises:
        InputError: missing or empty folder, no recognisable layout, mixed layouts, an unknown modality, a
            duplicated modality, or a manifest row naming a missing file.
    """
    root = Path(root)
    if manifest is not None or (root.is_file() and root.suffix.lower() == ".csv"):
        return _discover_csv(Path(manifest or root))
    if not root.is_dir():
        raise InputError("dataset folder does not exist", path=root)
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise InputError("dataset folder is empty", path=root, hint=_HINT)
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return _discover_nnunet(root)
    return _discover_folders(root)


def combine(datasets: Sequence[Dataset]) -> Dataset:
    """One dataset of the subjects of several (one is returned as it is); the layout is theirs if they share
    one, else ``mixed``.

    Raises:
        InputError: the same subject id in two datasets, or the same folder given twice.
    """
    if len(datasets) == 1:
        return datasets[0]
    seen: dict[str, Path] = {}
    for part in datasets:
        where = part.manifest or part.root
        if where.resolve() in {p.resolve() for p in seen.values()}:
            raise InputError("dataset folder given twice", path=where)
        for subject in part.subjects:
            if subject.id in seen:
                raise InputError(
                    f"subject {subject.id} is also in {seen[subject.id]}",
                    path=where,
                    hint="subject ids must be unique across the --data folders",
                )
        seen.update({subject.id: where for subject in part.subjects})
    layouts = {part.layout for part in datasets}
    subjects = tuple(sorted((s for part in datasets for s in part.subjects), key=lambda s: s.id))
    return Dataset(
        datasets[0].root,
        layouts.pop() if len(layouts) == 1 else "mixed",
        subjects,
        extension=_common_extension(subjects),
        parts=tuple(datasets),
    )


##################################################################################
#                               Subject folders                                  #
##################################################################################


def _classify(folder: Path, stem: str) -> tuple[str, str]:
    """(layout, key) of one file stem in subject folder ``folder`` (key: a modality token, seg or mask)."""
    subject_id = folder.name
    if stem.startswith(subject_id) and len(stem) > len(subject_id) + 1:
        separator = stem[len(subject_id)]
        if separator in "-_":
            return ("brats2023" if separator == "-" else "brats2021"), stem[len(subject_id) + 1 :]
    return "synthrad", stem


def _key(token: str, path: Path) -> str:
    """Canonical modality, :data:`LABEL_KEY` or :data:`MASK_KEY` for a file-name token."""
    token = token.lower()
    if token in _LABEL_NAMES:
        return LABEL_KEY
    if token in _MASK_NAMES:
        return MASK_KEY
    try:
        return canonical_modality(token)
    except InputError:
        raise InputError(f"file name does not name a modality ({token!r})", path=path, hint=_HINT) from None


def _discover_folders(root: Path) -> Dataset:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    subjects: list[Subject] = []
    layouts: dict[str, Path] = {}
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        if not files:  # e.g. SynthRAD's "overview" folder of spreadsheets
            continue
        entries = []
        for path in files:
            stem, _ = _split_ext(path.name)
            base, variant = _split_syn(stem)
            layout, token = _classify(folder, base)
            layouts.setdefault(layout, folder)
            entries.append((_key(token, path), variant, path))
        subjects.append(_subject(folder.name, entries))
    if not subjects:
        raise InputError("no subject folders with images found", path=root, hint=_HINT)
    if len(layouts) > 1:
        described = ", ".join(f"{name} ({folder.name})" for name, folder in layouts.items())
        raise InputError(f"subject folders use different layouts: {described}", path=root, hint=_HINT)
    return Dataset(root, next(iter(layouts)), tuple(subjects), extension=_common_extension(subjects))


def _subject(subject_id: str, entries: Iterable[tuple[str, int | None, Path]]) -> Subject:
    """Assemble a subject from (key, synthetic variant or None, path) entries, refusing duplicates."""
    images: dict[str, Path] = {}
    others: dict[str, Path] = {}
    synthetic: dict[str, list[tuple[int, Path]]] = {}
    for key, variant, path in entries:
        if variant is not None:
            synthetic.setdefault(key, []).append((variant, path))
            continue
        target = others if key in (LABEL_KEY, MASK_KEY) else images
        if key in target:
            raise InputError(f"two files for {key!r} in subject {subject_id}: {target[key].name}", path=path)
        target[key] = path
    return Subject(
        subject_id,
        images,
        label=others.get(LABEL_KEY),
        mask=others.get(MASK_KEY),
        synthetic={k: tuple(p for _, p in sorted(v)) for k, v in sorted(synthetic.items())},
    )


##################################################################################
#                                   nnU-Net                                      #
##################################################################################


def _nnunet_channels(dataset_json: Path) -> tuple[dict[int, str], str]:
    """Channel index -> canonical modality, and the file ending, from an nnU-Net ``dataset.json``."""
    try:
        meta = json.loads(dataset_json.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read dataset.json: {error}", path=dataset_json) from None
    names = meta.get("channel_names") or meta.get("modality")  # v2 / v1 spelling
    if not isinstance(names, dict) or not names:
        raise InputError("dataset.json has no channel_names", path=dataset_json)
    channels: dict[int, str] = {}
    for index, name in names.items():
        try:
            channels[int(index)] = canonical_modality(str(name))
        except InputError as error:
            raise InputError(
                f"channel {index}: {error.problem}", path=dataset_json, hint=error.hint
            ) from None
        except ValueError:
            raise InputError(f"channel index {index!r} is not a number", path=dataset_json) from None
    return channels, str(meta.get("file_ending", ".nii.gz"))


def _discover_nnunet(root: Path) -> Dataset:
    channels, ending = _nnunet_channels(root / "dataset.json")
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    entries: dict[str, list[tuple[str, int | None, Path]]] = {}
    for path in sorted((root / "imagesTr").iterdir()):
        match = pattern.match(path.name)
        if match is None or path.name.startswith("."):
            continue
        channel = int(match["channel"])
        if channel not in channels:
            raise InputError(f"channel {channel} is not in dataset.json channel_names", path=path)
        case, variant = _split_syn(match["case"])
        entries.setdefault(case, []).append((channels[channel], variant, path))
    if not entries:
        raise InputError(f"no case_XXXX{ending} images in imagesTr", path=root / "imagesTr", hint=_HINT)
    for case in entries:
        label = root / "labelsTr" / f"{case}{ending}"
        if label.is_file():
            entries[case].append((LABEL_KEY, None, label))
    subjects = tuple(_subject(case, items) for case, items in sorted(entries.items()))
    by_name = {name: index for index, name in channels.items()}
    return Dataset(root, "nnunet", subjects, extension=ending, channels=by_name)


##################################################################################
#                                 CSV manifest                                   #
##################################################################################


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "y", "synthetic"}


def _discover_csv(manifest: Path) -> Dataset:
    if not manifest.is_file():
        raise InputError("manifest does not exist", path=manifest)
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower() for c in reader.fieldnames or []}
        missing = {"subject", "modality", "path"} - columns
        if missing:
            raise InputError(
                f"manifest lacks column(s) {', '.join(sorted(missing))}",
                path=manifest,
                hint="columns: subject, modality, path (and optionally synthetic)",
            )
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    entries: dict[str, list[tuple[str, int | None, Path]]] = {}
    counts: dict[tuple[str, str], int] = {}
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"]).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        try:
            key = _key(row["modality"], path)
        except InputError as error:
            raise InputError(
                f"line {line}: unknown modality {row['modality']!r}", path=manifest, hint=error.hint
            ) from None
        if not path.is_file():
            raise InputError(f"line {line}: image file does not exist: {path}", path=manifest)
        variant = None
        if _truthy(row.get("synthetic")):
            variant = counts.get((row["subject"], key), 0)
            counts[(row["subject"], key)] = variant + 1
        entries.setdefault(row["subject"], []).append((key, variant, path))
    if not entries:
        raise InputError("manifest lists no images", path=manifest)
    subjects = tuple(_subject(sid, items) for sid, items in sorted(entries.items()))
    return Dataset(manifest.parent, "csv", subjects, extension=_common_extension(subjects), manifest=manifest)


##################################################################################
#                              Writing in a layout                               #
##################################################################################


def output_path(
    dataset: Dataset,
    root: Path,
    subject_id: str,
    key: str,
    *,
    synthetic: bool = False,
    variant: int = 0,
) -> Path:
    """Where a file of ``subject_id`` goes under a new ``root``, named as in ``dataset``'s layout.

    Discovery of the new folder finds real files in ``Subject.images``/``label``/``mask`` and synthetic ones
    in ``Subject.synthetic`` (variant 0 is written ``_syn``, variant v > 0 ``_syn<v>``). The ``csv`` layout is
    written as ``brats2023`` folders (the caller writes the new manifest).

    Args:
        dataset: the discovered input dataset (gives the layout, extension and nnU-Net channels).
        root: the output dataset folder.
        subject_id: subject (or nnU-Net case) id.
        key: a modality (any alias), :data:`LABEL_KEY` or :data:`MASK_KEY`.
        synthetic: mark the file as synthetic (images only).
        variant: synthetic variant number (0, 1, ...).

    Raises:
        InputError: unknown modality, a synthetic label, or a modality that is not an nnU-Net channel.
    """
    key = key if key in (LABEL_KEY, MASK_KEY) else canonical_modality(key)
    if synthetic and key in (LABEL_KEY, MASK_KEY):
        raise InputError(f"a {key} cannot be synthetic")
    mark = (f"_syn{variant}" if variant else "_syn") if synthetic else ""
    ext = dataset.extension
    if dataset.layout == "nnunet":
        return _nnunet_path(dataset, root, subject_id, key, mark)
    if dataset.layout == "synthrad":
        return root / subject_id / f"{key}{mark}{ext}"
    if dataset.layout == "brats2021":
        return root / subject_id / f"{subject_id}_{_BRATS2021_NAMES.get(key, key)}{mark}{ext}"
    return root / subject_id / f"{subject_id}-{key}{mark}{ext}"


def _nnunet_path(dataset: Dataset, root: Path, case: str, key: str, mark: str) -> Path:
    if key == LABEL_KEY:
        return root / "labelsTr" / f"{case}{dataset.extension}"
    if key not in dataset.channels:
        raise InputError(
            f"modality {key!r} is not a channel of this nnU-Net dataset",
            path=dataset.root / "dataset.json",
            hint=f"channels: {', '.join(dataset.channels)}",
        )
    return root / "imagesTr" / f"{case}{mark}_{dataset.channels[key]:04d}{dataset.extension}"

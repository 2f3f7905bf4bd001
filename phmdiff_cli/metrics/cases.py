"""Which prediction goes with which reference, and loading one case onto a common grid.

Folder mode pairs files by subject ID. References (``--ref-dir``) are found either flat in the folder, named
``<ID><sep><modality>`` (``BraTS-GLI-00001-000-t2w.nii.gz``, ``ID_t2.nii.gz``), or in subject folders of a
layout :func:`~phmdiff_cli.data.layouts.discover` knows (BraTS ``ID/ID-t2w.nii.gz``, SynthRAD
``ID/ct.nii.gz``, nnU-Net, CSV). Predictions (``--pred-dir``) are the image files in the folder or one level
down whose name starts with a reference ID followed by a separator (``-``, ``_``, ``.``) or whose folder is
named by the ID; a prediction whose name ends with a modality other than the target (e.g. a source image kept
beside it) is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phmdiff_cli.data.layouts import LABEL_KEY, discover, is_image_file
from phmdiff_cli.errors import InputError
from phmdiff_cli.io import Volume, read_volume
from phmdiff_cli.io.orientation import orientation_code
from phmdiff_cli.modalities import ALIASES, canonical_modality, modality_from_filename

__all__ = ["Case", "Pairing", "target_key", "find_references", "pair_folders", "load_case", "MASK_MODES"]

#: ``--mask`` values that are not a file.
MASK_MODES = ("auto", "none")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_LABEL_TOKENS = ("seg", "label", "labels")


@dataclass(frozen=True)
class Case:
    """One prediction/reference pair.

    Attributes:
        id: subject ID (single-pair mode: the reference's file name).
        pred: predicted image file.
        ref: reference image file.
        mask: mask file, or ``"auto"``/``"none"``.
    """

    id: str
    pred: Path
    ref: Path
    mask: Path | str


@dataclass(frozen=True)
class Pairing:
    """The result of matching two folders.

    Attributes:
        cases: matched pairs, sorted by ID.
        no_prediction: IDs of references without a prediction.
        no_reference: prediction files matching no reference ID.
    """

    cases: tuple[Case, ...]
    no_prediction: tuple[str, ...]
    no_reference: tuple[Path, ...]


def target_key(target: str) -> str:
    """Canonical modality of ``--target``, or :data:`~phmdiff_cli.data.layouts.LABEL_KEY` for label maps."""
    return LABEL_KEY if target.strip().lower() in _LABEL_TOKENS else canonical_modality(target)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _flat_id(path: Path, key: str) -> str | None:
    """Subject ID of a flat reference file ``<ID><sep><modality>`` whose modality is ``key``, else None."""
    match = re.match(r"^(?P<id>.+)[-_.](?P<token>[A-Za-z0-9]+)$", _stem(path))
    if match is None:
        return None
    token = match["token"].lower()
    found = LABEL_KEY if token in _LABEL_TOKENS else ALIASES.get(token)
    return match["id"] if found == key else None


def find_references(ref_dir: Path, key: str) -> dict[str, Path]:
    """Subject ID -> reference file of modality ``key`` (a canonical modality or ``seg``) in ``ref_dir``.

    Raises:
        InputError: the folder is missing, or holds no reference of that modality.
    """
    if not ref_dir.is_dir():
        raise InputError("reference folder does not exist", path=ref_dir)
    flat = [p for p in sorted(ref_dir.iterdir()) if is_image_file(p)]
    refs: dict[str, Path] = {}
    if flat:
        for path in flat:
            subject = _flat_id(path, key)
            if subject is not None:
                refs[subject] = path
    else:
        for subject in discover(ref_dir).subjects:
            path = subject.label if key == LABEL_KEY else subject.images.get(key)
            if path is not None:
                refs[subject.id] = path
    if not refs:
        raise InputError(
            f"no reference image of modality {key!r}",
            path=ref_dir,
            hint=f"name references <ID>-{key}.nii.gz (flat or in <ID>/ folders), or pick another --target",
        )
    return refs


def _prediction_files(pred_dir: Path) -> list[Path]:
    if not pred_dir.is_dir():
        raise InputError("prediction folder does not exist", path=pred_dir)
    files = [p for p in sorted(pred_dir.iterdir()) if is_image_file(p)]
    for folder in sorted(p for p in pred_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files += [p for p in sorted(folder.iterdir()) if is_image_file(p)]
    return files


def _subject_of(path: Path, pred_dir: Path, ids: list[str]) -> str | None:
    """The reference ID of a prediction: its folder's name, else the longest ID its name starts with."""
    if path.parent != pred_dir and path.parent.name in ids:
        return path.parent.name
    name = path.name
    starts = [i for i in ids if name.startswith(i) and (len(name) == len(i) or name[len(i)] in "-_.")]
    return max(starts, key=len) if starts else None


def pair_folders(pred_dir: Path, ref_dir: Path, key: str, mask: str) -> Pairing:
    """Match predictions to references by subject ID.

    Args:
        pred_dir: folder of predictions.
        ref_dir: folder of references.
        key: target modality (canonical) or ``seg``.
        mask: ``auto``, ``none``, or a file name looked up in each reference's folder, where ``{id}`` stands
            for the subject ID (SynthRAD: ``mask.nii.gz``).

    Raises:
        InputError: a folder is missing, no reference or no prediction matches, a subject has several
            predictions, or a named mask file is missing.
    """
    refs = find_references(ref_dir, key)
    ids = sorted(refs)
    found: dict[str, list[Path]] = {}
    no_reference: list[Path] = []
    for path in _prediction_files(pred_dir):
        modality = modality_from_filename(path)
        if modality is not None and modality != key:
            continue
        subject = _subject_of(path, pred_dir, ids)
        if subject is None:
            no_reference.append(path)
        else:
            found.setdefault(subject, []).append(path)
    for subject, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(str(p.relative_to(pred_dir)) for p in paths)
            raise InputError(
                f"subject {subject} has {len(paths)} predictions: {names}",
                path=pred_dir,
                hint="keep one prediction per subject in --pred-dir",
            )
    if not found:
        raise InputError(
            f"no prediction matches a reference ID of {ref_dir}",
            path=pred_dir,
            hint=f"name predictions <ID>...nii.gz (IDs such as {ids[0]})",
        )
    cases = tuple(Case(s, found[s][0], refs[s], _case_mask(mask, refs[s], s)) for s in ids if s in found)
    return Pairing(cases, tuple(s for s in ids if s not in found), tuple(no_reference))


def _case_mask(mask: str, ref: Path, subject: str) -> Path | str:
    if mask in MASK_MODES:
        return mask
    path = ref.parent / mask.replace("{id}", subject)
    if not path.is_file():
        raise InputError(
            f"mask of subject {subject} not found",
            path=path,
            hint="in folder mode --mask names a file beside each reference ({id}: the subject ID)",
        )
    return path


def _grid_text(volume: Volume) -> str:
    def fmt(values: tuple[float, ...]) -> str:
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

    return (f"size {volume.size}, spacing {fmt(volume.spacing)} mm, origin {fmt(volume.origin)} mm, "
            f"axes {orientation_code(volume.direction)}")


def _on_ref_grid(
    volume: Volume, ref: Volume, path: Path, ref_path: Path, resample: bool, nearest: bool
) -> Volume:
    """``volume`` itself if on ``ref``'s grid, resampled onto it when ``resample``, else an InputError."""
    if volume.same_grid(ref, tol=1e-3):
        return volume
    if not resample:
        raise InputError(
            f"not on the grid of the reference {ref_path} ({_grid_text(volume)} vs {_grid_text(ref)})",
            path=path,
            hint="register the images, or pass --resample to resample onto the reference grid",
        )
    # The one SimpleITK resampling of the project (linear for images, nearest for masks and labels).
    from phmdiff_cli.data.preprocess import resample_onto

    return resample_onto(volume, ref, nearest=nearest)


def load_case(case: Case, *, labels: bool, resample: bool) -> tuple[Volume, Volume, Volume | None]:
    """Read a case's prediction, reference and mask file (if any), all on the reference's grid.

    Args:
        case: the pair.
        labels: the images are label maps (resampled with nearest neighbour).
        resample: resample prediction and mask onto the reference grid instead of refusing other grids.

    Raises:
        InputError: unreadable file, or a grid mismatch without ``resample`` (naming both files).
    """
    ref = read_volume(case.ref)
    pred = _on_ref_grid(read_volume(case.pred), ref, case.pred, case.ref, resample, nearest=labels)
    mask = None
    if isinstance(case.mask, Path):
        mask = _on_ref_grid(read_volume(case.mask), ref, case.mask, case.ref, resample, nearest=True)
        if not np.any(mask.array):
            raise InputError("the mask is empty", path=case.mask)
    return pred, ref, mask

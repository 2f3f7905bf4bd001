"""Canonical modality names, the aliases users type, and modality detection from file names."""

from __future__ import annotations

import re
from pathlib import Path

from phmdiff_cli.errors import InputError

__all__ = ["MODALITIES", "ALIASES", "ABSENT_ID", "modality_id", "canonical_modality", "modality_from_filename", "is_ct"]

#: Canonical names (BraTS 2023 spelling for the brain MRI contrasts).
MODALITIES: dict[str, str] = {
    "t1n": "T1-weighted MRI (native, no contrast agent)",
    "t1c": "T1-weighted MRI after gadolinium",
    "t2w": "T2-weighted MRI",
    "t2f": "T2-FLAIR MRI",
    "pd": "proton-density MRI",
    "mr": "MRI of unspecified contrast (e.g. SynthRAD pelvis/brain MR)",
    "ct": "CT in Hounsfield units",
}

#: Embedding index of an empty source slot; modality ids start at 1 in the order of MODALITIES.
ABSENT_ID = 0


def modality_id(name: str) -> int:
    """Embedding index of a canonical modality (1-based; 0 is :data:`ABSENT_ID`). Stable: append new modalities
    at the end of :data:`MODALITIES`, never reorder, or shipped models change meaning."""
    return list(MODALITIES).index(canonical_modality(name)) + 1


ALIASES: dict[str, str] = {
    "t1": "t1n", "t1w": "t1n", "t1n": "t1n", "t1native": "t1n", "mprage": "t1n",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c", "t1wce": "t1c",
    "t2": "t2w", "t2w": "t2w",
    "flair": "t2f", "t2f": "t2f", "t2flair": "t2f", "t2_flair": "t2f",
    "pd": "pd", "pdw": "pd",
    "mr": "mr", "mri": "mr",
    "ct": "ct", "sct": "ct",
}


def canonical_modality(name: str) -> str:
    """Map a user-typed modality (``t2``, ``FLAIR``, ``t1ce``) to its canonical name (``t2w``, ``t2f``, ``t1c``).

    Raises:
        InputError: the name is not a known modality; the message lists the valid names.
    """
    key = name.strip().lower().replace("-", "").replace(" ", "")
    if key in ALIASES:
        return ALIASES[key]
    known = ", ".join(MODALITIES)
    raise InputError(
        f"unknown modality {name!r}",
        hint=f"use one of {known} (aliases: t1, t1ce, t2, flair, ...)",
    )


_TOKEN = re.compile(r"[a-z0-9]+(?:_flair)?")


def modality_from_filename(path: str | Path) -> str | None:
    """Guess the modality from a file name such as ``BraTS-GLI-00001-000-t2f.nii.gz``, ``ID_t1ce.nii.gz`` or
    ``ct.nii.gz``; ``None`` when no part of the name is a known modality.

    The last matching token of the stem wins, so subject IDs that happen to contain ``ct`` do not.
    """
    name = Path(path).name.lower()
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".dcm"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    tokens = re.split(r"[-_.\s]+", name)
    for token in reversed(tokens):
        if token in ALIASES:
            return ALIASES[token]
    return None


def is_ct(modality: str | None) -> bool:
    """True for CT (values are Hounsfield units, windowed rather than normalised)."""
    return modality == "ct"

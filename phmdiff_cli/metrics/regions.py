"""Tumour regions of BraTS label maps. The label numbers differ between releases; the regions that BraTS scores
(whole tumour, tumour core, enhancing tumour) do not, so a segmenter is scored on the regions.

=============  ==========================================================  ====================================
convention     labels                                                      regions (WT / TC / ET)
=============  ==========================================================  ====================================
brats2013      1 necrosis, 2 oedema, 3 non-enhancing tumour, 4 enhancing   {1,2,3,4} / {1,3,4} / {4}
brats2017      1 necrosis and non-enhancing, 2 oedema, 4 enhancing         {1,2,4} / {1,4} / {4}   (to 2021)
brats2023      1 necrosis and non-enhancing, 2 oedema, 3 enhancing         {1,2,3} / {1,3} / {3}
=============  ==========================================================  ====================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["REGIONS", "CONVENTIONS", "detect_convention", "region_map"]

REGIONS = ("whole tumour", "tumour core", "enhancing tumour")
#: Convention -> region -> the labels it unites.
CONVENTIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "brats2013": {"whole tumour": (1, 2, 3, 4), "tumour core": (1, 3, 4), "enhancing tumour": (4,)},
    "brats2017": {"whole tumour": (1, 2, 4), "tumour core": (1, 4), "enhancing tumour": (4,)},
    "brats2023": {"whole tumour": (1, 2, 3), "tumour core": (1, 3), "enhancing tumour": (3,)},
}


def detect_convention(values: Iterable[int]) -> str | None:
    """The BraTS convention of a dataset's label values (0 included or not), or None for other labels (e.g. MS
    lesions 0/1, or two labels that could be anything). Label 4 means 2013-2015 (with 3) or 2017-2021 (without);
    1, 2 and 3 alone mean 2023+."""
    found = {int(v) for v in values} - {0}
    if len(found) < 3 or not found <= {1, 2, 3, 4}:
        return None
    if 4 in found:
        return "brats2013" if 3 in found else "brats2017"
    return "brats2023"


def region_map(labels: np.ndarray, convention: str, region: str) -> np.ndarray:
    """uint8 ``(z, y, x)``: 1 where ``labels`` is in the region, else 0."""
    members: Sequence[int] = CONVENTIONS[convention][region]
    return np.isin(labels, members).astype(np.uint8)

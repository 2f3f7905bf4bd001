"""What a model was trained on, measured the same way on every input it is given.

A model knows one kind of input. The shipped brain models saw skull-stripped brains on 1 mm grids; a scan as a
hospital exports it (skull on, 3-5 mm slices) is another kind, and the model's output for it looks plausible
while being wrong. So the model card records, per training image, the foreground volume, the largest axial
foreground cross-section and the voxel size (:func:`domain_of`), and ``synthesize`` measures each source the same
way (:func:`measure`) and says in words where it falls outside (:func:`check`).

Measured on ``../shared/data`` (:func:`~phmdiff_cli.data.normalize.foreground_mask`): skull-stripped brains
(BraTS 2023 and 2013, MS patients in MNI space) 1016-1679 mL; heads with skull 2335-3077 mL (the clinical scans of
two MS patients), 3439 mL (a 0.9 mm T1), 7672 mL (a T1 series down to the neck).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from phmdiff_cli.data.normalize import foreground_mask
from phmdiff_cli.data.preprocess import HEAD_AREA_CM2
from phmdiff_cli.io import Volume, to_canonical
from phmdiff_cli.modalities import is_ct

__all__ = ["InputStats", "measure", "shows_head", "domain_of", "check", "VOLUME_MARGIN", "AREA_MARGIN",
           "SPACING_MARGIN", "HEAD_ML"]

#: An input whose foreground volume or largest cross-section exceeds the largest training image's by this factor
#: is not what the model saw (the largest adult brains are ~1.2 times the training brains; heads with skull 1.4+).
VOLUME_MARGIN = 1.2
#: The same for the largest axial cross-section, tighter: a slab of a few slices of a head has a small volume, and
#: its cross-section is what tells it from a brain (brains <= 201 cm2 here, heads with skull 231-432 cm2).
AREA_MARGIN = 1.1
#: A training domain whose largest image exceeds this (mL) had heads with skull: no adult brain is this large.
HEAD_ML = 2000.0
#: Voxels coarser than the coarsest training voxels by this factor are not what the model saw.
SPACING_MARGIN = 1.5


@dataclass(frozen=True)
class InputStats:
    """One image, measured in its canonical (axial) orientation.

    Attributes:
        foreground_ml: foreground volume (the mask's, if given), mL.
        max_area_cm2: the largest axial foreground cross-section, cm^2 (a slab that misses most of the head still
            shows a head-sized cross-section).
        in_plane_mm: the coarser of the two in-plane voxel sizes, mm.
        slice_mm: the slice step (through-plane voxel size), mm.
    """

    foreground_ml: float
    max_area_cm2: float
    in_plane_mm: float
    slice_mm: float


def measure(volume: Volume, modality: str, mask: Volume | None = None) -> InputStats:
    """Measure ``volume`` (as read) as the model card's domain measures training images.

    Args:
        volume: the image in file units.
        modality: its canonical modality.
        mask: optional brain/body mask on the volume's grid (nonzero = inside): it is the foreground.
    """
    canonical = to_canonical(volume)
    fg = (to_canonical(mask).array > 0) if mask is not None else foreground_mask(canonical.array, modality)
    sx, sy, sz = (float(s) for s in canonical.spacing)
    areas = fg.reshape(fg.shape[0], -1).sum(axis=1) * (sx * sy / 100.0)
    return InputStats(float(fg.sum()) * sx * sy * sz / 1000.0, float(areas.max(initial=0.0)), max(sx, sy), sz)


def shows_head(volume: Volume, modality: str) -> bool:
    """Whether an image as read shows a head with skull, not a skull-stripped brain: its largest axial foreground
    cross-section exceeds :data:`~phmdiff_cli.data.preprocess.HEAD_AREA_CM2` (the rule a ``skull_condition`` model
    is told by, on its own grid), so a slab of a few slices counts too."""
    return measure(volume, modality).max_area_cm2 > HEAD_AREA_CM2


def domain_of(stats: Sequence[InputStats]) -> dict[str, Any]:
    """The model card's ``input_domain``: for each measure of :class:`InputStats`, the [min, max] over the
    training images, and their count."""
    fields = asdict(stats[0]).keys()
    return {"images": len(stats),
            **{name: [round(min(getattr(s, name) for s in stats), 3), round(max(getattr(s, name) for s in stats), 3)]
               for name in fields}}


def check(stats: InputStats, domain: dict[str, Any], modality: str, name: str) -> list[str]:
    """Sentences saying where an input falls outside the training domain, what that means and what to do;
    empty when it falls inside.

    Args:
        stats: the input, measured.
        domain: the model card's ``input_domain`` (:func:`domain_of`).
        modality: the input's modality (the advice differs for MRI and CT).
        name: how to name the input (its path).
    """
    out = []
    (lo_ml, hi_ml), (_, hi_area) = domain["foreground_ml"], domain["max_area_cm2"]
    if stats.foreground_ml > VOLUME_MARGIN * hi_ml or stats.max_area_cm2 > AREA_MARGIN * hi_area:
        measured = (f"its foreground is {stats.foreground_ml:.0f} mL, largest axial cross-section "
                    f"{stats.max_area_cm2:.0f} cm2; the training images had {lo_ml:.0f}-{hi_ml:.0f} mL, at most "
                    f"{hi_area:.0f} cm2")
        if is_ct(modality) or hi_ml > HEAD_ML:
            advice = "crop it to the anatomy the model knows"
            if not is_ct(modality):  # a model trained on heads with skull: the input shows more than a head
                advice = "crop it to the head, or pass --brain-mask"
            out.append(f"{name}: a larger field of view than the model was trained on ({measured}): {advice}")
        else:
            out.append(f"{name}: the source is probably not skull-stripped ({measured}, skull-stripped brains); "
                       "the output will not be reliable: pass --brain-mask, or skull-strip it first (HD-BET, "
                       "SynthStrip)")
    if stats.slice_mm > SPACING_MARGIN * domain["slice_mm"][1]:
        out.append(f"{name}: slices are {stats.slice_mm:.2g} mm apart; the model saw slices at most "
                   f"{domain['slice_mm'][1]:.2g} mm apart: the sources are resampled to thin slices for synthesis, so "
                   "detail between the slices is interpolated, not measured")
    if stats.in_plane_mm > SPACING_MARGIN * domain["in_plane_mm"][1]:
        out.append(f"{name}: in-plane voxels are {stats.in_plane_mm:.2g} mm; the model saw at most "
                   f"{domain['in_plane_mm'][1]:.2g} mm: expect a blurred output")
    return out

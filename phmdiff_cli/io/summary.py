"""What ``phmdiff info`` reports about a volume: geometry, orientation, dtype, intensities, provenance."""

from __future__ import annotations

from typing import Any

import numpy as np

from phmdiff_cli.io.orientation import ORIENTATION_CONVENTION, orientation_code
from phmdiff_cli.io.volume import Volume

__all__ = ["PERCENTILES", "volume_info"]

#: Intensity percentiles reported.
PERCENTILES = (1, 50, 99)


def volume_info(volume: Volume) -> dict[str, Any]:
    """A JSON-ready summary of ``volume``.

    Keys: ``path``, ``format``, ``size`` (x, y, z voxels, SimpleITK ``GetSize`` order), ``array_shape`` (z, y,
    x), ``spacing`` (mm, x y z), ``origin`` (mm, LPS), ``direction`` (9 floats, row-major, LPS),
    ``orientation`` (e.g. ``'LPS'``) with ``orientation_convention``, ``dtype``, ``intensity`` (min, max,
    mean, p1, p50, p99), ``modality`` (canonical or null), ``dicom`` (series_uid, series_description,
    modality, number_of_slices; DICOM input only) and ``warnings`` (what the reader corrected, e.g.
    resampling).
    """
    values = volume.array if volume.array.dtype.kind in "iuf" else volume.array.astype(np.uint8)
    lo, mid, hi = np.percentile(values, PERCENTILES)
    info: dict[str, Any] = {
        "path": volume.meta.get("path"),
        "format": volume.meta.get("format"),
        "size": list(volume.size),
        "array_shape": list(volume.shape),
        "spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "direction": list(volume.direction),
        "orientation": orientation_code(volume.direction),
        "orientation_convention": ORIENTATION_CONVENTION,
        "dtype": str(values.dtype),
        "intensity": {
            "min": float(values.min()),
            "max": float(values.max()),
            "mean": float(values.mean(dtype=np.float64)),
            "p1": float(lo),
            "p50": float(mid),
            "p99": float(hi),
        },
        "modality": volume.modality,
    }
    if volume.meta.get("format") == "dicom":
        info["dicom"] = {
            "series_uid": volume.meta.get("series_uid"),
            "series_description": volume.meta.get("series_description"),
            "modality": volume.meta.get("dicom_modality"),
            "number_of_slices": volume.meta.get("number_of_slices"),
        }
    info["warnings"] = list(volume.meta.get("warnings", []))
    return info

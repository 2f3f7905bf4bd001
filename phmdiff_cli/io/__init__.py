"""Medical image I/O: one volume type (array ``(z, y, x)`` + LPS spacing/origin/direction), NIfTI, MHA/NRRD
and DICOM series in and out, canonical orientation with an exact inverse, and the ``phmdiff info`` summary."""

from __future__ import annotations

from phmdiff_cli.io.orientation import canonical_grid, from_canonical, orientation_code, to_canonical
from phmdiff_cli.io.readwrite import read_volume, write_volume
from phmdiff_cli.io.summary import volume_info
from phmdiff_cli.io.volume import Volume

__all__ = [
    "Volume",
    "read_volume",
    "write_volume",
    "canonical_grid",
    "to_canonical",
    "from_canonical",
    "volume_info",
    "orientation_code",
]

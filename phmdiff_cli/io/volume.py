"""The one in-memory image type of phmdiff: a voxel array plus its physical grid, in SimpleITK's convention.

Convention (used everywhere inside the program; conversions happen only at the I/O boundary):

* ``array`` has shape ``(z, y, x)``, the order of ``SimpleITK.GetArrayFromImage``, and keeps the stored dtype.
* ``spacing`` is in mm, ``(x, y, z)`` order; ``origin`` is the physical position (mm) of voxel
  ``array[0, 0, 0]``.
* ``direction`` is the row-major 3x3 matrix whose *columns* are the physical directions of the x, y and z
  voxel axes; physical space is LPS (ITK and DICOM: +x to the patient's Left, +y Posterior, +z Superior).

So voxel index ``(i, j, k)`` = ``array[k, j, i]`` lies at ``origin + direction @ (spacing * (i, j, k))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk

__all__ = ["Grid", "Volume"]


class Grid(NamedTuple):
    """A physical grid without voxels: spacing ``(x, y, z)`` mm, LPS origin, row-major LPS direction."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @staticmethod
    def of(spacing: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> Grid:
        """From arrays: spacing (3,), origin (3,), direction (3, 3) or (9,) row-major."""
        s, o = np.asarray(spacing, dtype=float), np.asarray(origin, dtype=float)
        return Grid(
            (float(s[0]), float(s[1]), float(s[2])),
            (float(o[0]), float(o[1]), float(o[2])),
            tuple(float(v) for v in np.ravel(direction)),
        )


@dataclass
class Volume:
    """A 3-D image on a physical grid.

    Attributes:
        array: voxels, shape ``(z, y, x)``, dtype as stored (or as computed).
        spacing: voxel size in mm, ``(x, y, z)``.
        origin: physical position in mm (LPS) of the first voxel's centre.
        direction: 9 floats, row-major 3x3; column ``c`` is the LPS direction of voxel axis ``c`` (x, y, z).
        modality: canonical modality name (:mod:`phmdiff_cli.modalities`) if known.
        meta: provenance: ``path``, ``format`` (``'nifti'``, ``'dicom'`` or ``'itk'``), ``nifti_header`` (a
            ``nibabel.Nifti1Header``), ``dicom`` (the source series' tags needed to write a derived series),
            ``series_description``, ``series_uid``, ``warnings`` (what the reader corrected, e.g. resampling).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3-D (z, y, x), got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = tuple(float(d) for d in self.direction)
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("spacing and origin need 3 values and direction 9")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return self.array.shape  # type: ignore[return-value]

    @property
    def size(self) -> tuple[int, int, int]:
        """Grid size in SimpleITK order ``(x, y, z)``."""
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def grid(self) -> Grid:
        """Spacing, origin and direction."""
        return Grid(self.spacing, self.origin, self.direction)

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction as a 3x3 float64 array (columns: LPS directions of the x, y, z voxel axes)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping voxel index ``(i, j, k, 1)`` (x, y, z order) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def with_array(self, array: np.ndarray, modality: str | None = None) -> Volume:
        """The same grid and provenance with new voxels (e.g. a synthesized image).

        Args:
            array: shape ``(z, y, x)`` equal to ``self.shape``; any dtype.
            modality: the new image's modality; default: keep ``self.modality``.

        Raises:
            ValueError: the shape differs.
        """
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return replace(self, array=array, modality=modality or self.modality, meta=dict(self.meta))

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with the same voxels (copied) and grid."""
        array = self.array.astype(np.uint8) if self.array.dtype == np.bool_ else self.array
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, **kw: Any) -> Volume:
        """Wrap a 3-D scalar SimpleITK image; ``kw`` sets ``modality`` and ``meta``."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"expected a 3-D scalar image, got {image.GetDimension()}-D with "
                f"{image.GetNumberOfComponentsPerPixel()} components"
            )
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
            **kw,
        )

    def same_grid(self, other: Volume, tol: float = 1e-5) -> bool:
        """True when both volumes have the same shape, and spacing, origin and direction equal within ``tol``
        (absolute; mm for spacing and origin)."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=tol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=tol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=tol)
        )

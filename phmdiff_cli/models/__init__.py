"""The PHMDiff denoiser (architecture only; diffusion maths lives in :mod:`phmdiff_cli.diffusion`)."""

from __future__ import annotations

from phmdiff_cli.models.phmdiff import PHMDiff

__all__ = ["PHMDiff"]

"""phmdiff: synthesize a missing medical image with a Pyramid Hierarchical Masked Diffusion model."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"

"""EDM preconditioning, the PHMDiff training loss (with masking and CGR), schedulers and the pyramid
sampler."""

from __future__ import annotations

from phmdiff_cli.diffusion.losses import training_loss
from phmdiff_cli.diffusion.sampling import sample
from phmdiff_cli.diffusion.schedulers import EDMScheduler

__all__ = ["training_loss", "sample", "EDMScheduler"]

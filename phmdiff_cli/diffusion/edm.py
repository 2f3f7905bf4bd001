"""EDM preconditioning and noise levels (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"). Noise levels sigma are in units of the model range [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["precondition", "sample_sigma", "karras_sigmas", "denoise"]


def precondition(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM scalings for noise levels ``sigma`` (B,).

    Returns:
        ``(c_skip, c_out, c_in, c_noise)``; the first three (B, 1, 1, 1), ``c_noise = ln(sigma) / 4`` (B,).
        The denoiser is ``D(x) = c_skip * x + c_out * F(c_in * x, c_noise)``.
    """
    s = sigma.float().reshape(-1, 1, 1, 1)
    var = s**2 + sigma_data**2
    return sigma_data**2 / var, s * sigma_data / var.sqrt(), 1 / var.sqrt(), sigma.float().log() / 4


def sample_sigma(batch: int, p_mean: float, p_std: float, *, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
    """Training noise levels, ``ln(sigma) ~ N(p_mean, p_std^2)``, (B,) float32."""
    return (torch.randn(batch, device=device, generator=generator) * p_std + p_mean).exp()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """The EDM sampling schedule: ``steps`` noise levels from sigma_max down to sigma_min, evenly spaced in
    ``sigma**(1/rho)``, then a final 0. Python floats, so a sampling loop over them needs no device syncs."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [sigma_max, 0.0]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]


def denoise(
    model: nn.Module,
    x: Tensor,
    sigma: Tensor,
    source: Tensor,
    coarse: Tensor | None,
    src_mod: Tensor,
    tgt_mod: Tensor,
    *,
    level: int,
    keep: Tensor | None = None,
    skull: Tensor | None = None,
) -> Tensor:
    """The preconditioned denoiser D(x; sigma) of one level, float32 (B, 1, h, w).

    Args:
        model: a :class:`~phmdiff_cli.models.PHMDiff` (its ``config.diffusion.sigma_data`` is used).
        x: (B, 1, h, w) noisy target ``y + n``, n ~ N(0, sigma^2).
        sigma: (B,) noise levels.
        source, coarse, src_mod, tgt_mod, level, keep, skull: as in :meth:`PHMDiff.forward`.
    """
    c_skip, c_out, c_in, c_noise = precondition(sigma, model.config.diffusion.sigma_data)
    out, _ = model(c_in * x, c_noise, source, coarse, src_mod, tgt_mod, level=level, keep=keep, skull=skull)
    return c_skip * x + c_out * out.float()

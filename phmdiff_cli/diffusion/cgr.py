"""Cross-Granularity Regularization (CGR): consistency between adjacent pyramid levels.

Three terms, each weighted in :class:`~phmdiff_cli.config.DiffusionConfig` (weight 0 switches it off):

- pixel: the finer level's denoised prediction, area-downsampled, against the coarser level's prediction
  (MSE);
- structure: the same pair compared by their image gradients (L1 of finite differences), which ties edges
  across scales without forcing the intensities of the noisier prediction;
- feature: kernel maximum mean discrepancy between the encoder token features of the two levels (each token a
  sample of that level's feature distribution), which keeps the shared Transformer's representation of the
  same anatomy consistent across scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from phmdiff_cli.diffusion.pyramid import downsample

__all__ = ["cgr_pixel", "cgr_structure", "cgr_feature", "gaussian_mmd"]


def cgr_pixel(fine: Tensor, coarse: Tensor) -> Tensor:
    """MSE between ``fine`` (B, 1, 2h, 2w) area-downsampled and ``coarse`` (B, 1, h, w)."""
    return F.mse_loss(downsample(fine, 2), coarse)


def _gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def cgr_structure(fine: Tensor, coarse: Tensor) -> Tensor:
    """Mean L1 difference of the vertical and horizontal finite-difference gradients of ``fine``
    (area-downsampled) and ``coarse``."""
    (fy, fx), (cy, cx) = _gradients(downsample(fine, 2)), _gradients(coarse)
    return 0.5 * ((fy - cy).abs().mean() + (fx - cx).abs().mean())


def gaussian_mmd(a: Tensor, b: Tensor, bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)) -> Tensor:
    """Biased squared MMD per batch element between token sets a (B, n, D) and b (B, m, D), averaged over B.

    The kernel is a sum of Gaussians ``exp(-|u - v|^2 / (2 * D * h^2))`` over bandwidths h; distances are
    divided by D so the bandwidths suit layer-normalised features of any width.
    """
    dim = a.shape[-1]
    joint = torch.cat([a, b], dim=1)
    dist = torch.cdist(joint, joint).pow(2) / dim
    kernel = sum(torch.exp(-dist / (2 * h * h)) for h in bandwidths)
    n = a.shape[1]
    k_aa, k_bb, k_ab = kernel[:, :n, :n], kernel[:, n:, n:], kernel[:, :n, n:]
    return (k_aa.mean(dim=(1, 2)) + k_bb.mean(dim=(1, 2)) - 2 * k_ab.mean(dim=(1, 2))).mean()


def cgr_feature(fine: Tensor, coarse: Tensor, max_tokens: int = 64,
                generator: torch.Generator | None = None) -> Tensor:
    """Kernel MMD between the token features (B, N_f, D) and (B, N_c, D) of two levels, each layer-normalised
    and randomly subsampled to at most ``max_tokens`` tokens (the kernel matrix grows with the square)."""

    def prepare(feats: Tensor) -> Tensor:
        feats = F.layer_norm(feats.float(), feats.shape[-1:])
        if feats.shape[1] <= max_tokens:
            return feats
        scores = torch.rand(feats.shape[:2], device=feats.device, generator=generator)
        pick = scores.argsort(dim=1)[:, :max_tokens]
        return feats.gather(1, pick.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))

    return gaussian_mmd(prepare(fine), prepare(coarse))

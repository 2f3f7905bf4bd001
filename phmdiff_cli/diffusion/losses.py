"""The PHMDiff training objective: EDM denoising at every pyramid level in one step, MaskDiT masking, CGR."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from phmdiff_cli.diffusion.cgr import cgr_feature, cgr_pixel, cgr_structure
from phmdiff_cli.diffusion.edm import precondition, sample_sigma
from phmdiff_cli.diffusion.pyramid import image_pyramid, upsample
from phmdiff_cli.models.masking import block_mask, keep_to_mask

__all__ = ["training_loss", "check_batch"]


def check_batch(model: nn.Module, source: Tensor, src_mod: Tensor, tgt_mod: Tensor) -> None:
    """Raise ValueError unless the inputs have the shapes the model was built for (see
    :func:`training_loss`)."""
    cfg = model.config
    expected = (cfg.max_sources, cfg.source_channels, cfg.image_size, cfg.image_size)
    if source.ndim != 5 or tuple(source.shape[1:]) != expected:
        raise ValueError(f"source must be (B, {', '.join(map(str, expected))}), got {tuple(source.shape)}")
    if tuple(src_mod.shape) != source.shape[:2] or tuple(tgt_mod.shape) != source.shape[:1]:
        raise ValueError(f"src_mod must be (B, S) and tgt_mod (B,), got {tuple(src_mod.shape)}, "
                         f"{tuple(tgt_mod.shape)}")


def _masked_mean(err: Tensor, mask: Tensor) -> Tensor:
    return (err * mask).sum() / mask.sum().clamp(min=1)


def training_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    *,
    mask_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one training step over all pyramid levels (one batched Transformer pass where token counts
    match).

    Per level l the target is the area-downsampled ground truth; level l > 0 is conditioned on the downsampled
    ground truth of level l - 1, noise-augmented and upsampled (``DiffusionConfig.coarse_noise``). The EDM
    loss ``lambda(sigma) * |D - y|^2`` is computed in F-space (``|F - (y - c_skip x) / c_out|^2``, the same
    value with better conditioning) on the pixels of kept tokens; masked tokens add ``mae_weight`` times the
    same error.

    Args:
        model: a :class:`~phmdiff_cli.models.PHMDiff` (or a wrapper exposing ``config``), in train mode.
        batch: at the finest resolution H = W = ``config.image_size``, model range [-1, 1]:
            ``source`` (B, S, 2k+1, H, W), ``src_mod`` (B, S) long, ``tgt_mod`` (B,) long,
            ``target`` (B, 1, H, W).
        mask_ratio: fraction of tokens dropped at every level; None uses ``config.mask_ratios``; 0 = unmasked
            (the fine-tune phase).
        generator: random source on the batch's device, for reproducible steps.

    Returns:
        ``(loss, logs)``: the scalar to backpropagate, and detached scalar tensors ``denoise``, ``mae``,
        ``cgr_pixel``, ``cgr_structure``, ``cgr_feature`` and ``denoise_l{level}`` (tensors, so logging them
        costs no device sync until the caller asks).
    """
    cfg, dcfg = model.config, model.config.diffusion
    source, src_mod, tgt_mod, target = batch["source"], batch["src_mod"], batch["tgt_mod"], batch["target"]
    check_batch(model, source, src_mod, tgt_mod)
    b, device, levels = target.shape[0], target.device, list(range(cfg.levels))
    targets, sources = image_pyramid(target, cfg.levels), image_pyramid(source, cfg.levels)

    coarses: list[Tensor | None] = [None]
    for level in levels[1:]:
        aug = torch.rand(b, 1, 1, 1, device=device, generator=generator) * dcfg.coarse_noise
        previous = targets[level - 1]
        noisy = previous + aug * torch.randn(previous.shape, device=device, generator=generator)
        coarses.append(upsample(noisy, cfg.level_size(level)))

    keeps: list[Tensor | None] = []
    for level in levels:
        ratio = cfg.mask_ratios[level] if mask_ratio is None else mask_ratio
        keeps.append(None if ratio <= 0 else block_mask(b, cfg.grid_size(level), ratio, cfg.mask_block_sizes,
                                                        device=device, generator=generator))

    scalings, noisy_x, inputs, labels = [], [], [], []
    for level in levels:
        sigma = sample_sigma(b, dcfg.p_mean, dcfg.p_std, device=device, generator=generator)
        start = cfg.sampling.sigma_max
        if level > 0 and dcfg.refine_sigma > 0:  # a finer level starting to sample there never sees more
            start = dcfg.refine_sigma
            sigma = sigma.clamp(max=start)
        if dcfg.p_sigma_max > 0:
            top = torch.rand(b, device=device, generator=generator) < dcfg.p_sigma_max
            sigma = torch.where(top, torch.full_like(sigma, start), sigma)
        c_skip, c_out, c_in, c_noise = precondition(sigma, dcfg.sigma_data)
        x = targets[level] + sigma.reshape(-1, 1, 1, 1) * torch.randn(
            targets[level].shape, device=device, generator=generator)
        scalings.append((c_skip, c_out))
        noisy_x.append(x)
        inputs.append(c_in * x)
        labels.append(c_noise)
    outs, feats = model.forward_levels(inputs, labels, sources, coarses, src_mod, tgt_mod, levels=levels,
                                       keeps=keeps)

    logs: dict[str, Tensor] = {}
    denoised, denoise_total, mae_total = [], target.new_zeros(()), target.new_zeros(())
    for level in levels:
        (c_skip, c_out), x, out = scalings[level], noisy_x[level], outs[level].float()
        err = (out - (targets[level] - c_skip * x) / c_out) ** 2
        kept = _kept_pixels(keeps[level], cfg.grid_size(level), cfg.patch_sizes[level], err)
        level_denoise = _masked_mean(err, kept)
        denoise_total = denoise_total + level_denoise
        if keeps[level] is not None:
            mae_total = mae_total + _masked_mean(err, 1 - kept)
        logs[f"denoise_l{level}"] = level_denoise.detach()
        denoised.append(c_skip * x + c_out * out)

    loss = (denoise_total + dcfg.mae_weight * mae_total) / cfg.levels
    cgr = {"cgr_pixel": target.new_zeros(()), "cgr_structure": target.new_zeros(()),
           "cgr_feature": target.new_zeros(())}
    for level in levels[1:]:
        fine, coarse = denoised[level], denoised[level - 1]
        if dcfg.cgr_pixel:
            cgr["cgr_pixel"] = cgr["cgr_pixel"] + cgr_pixel(fine, coarse)
        if dcfg.cgr_structure:
            cgr["cgr_structure"] = cgr["cgr_structure"] + cgr_structure(fine, coarse)
        if dcfg.cgr_feature:
            cgr["cgr_feature"] = cgr["cgr_feature"] + cgr_feature(feats[level], feats[level - 1],
                                                                  generator=generator)
    pairs = max(cfg.levels - 1, 1)
    loss = loss + (dcfg.cgr_pixel * cgr["cgr_pixel"] + dcfg.cgr_structure * cgr["cgr_structure"]
                   + dcfg.cgr_feature * cgr["cgr_feature"]) / pairs
    logs.update(denoise=(denoise_total / cfg.levels).detach(), mae=(mae_total / cfg.levels).detach(),
                **{k: (v / pairs).detach() for k, v in cgr.items()})
    return loss, logs


def _kept_pixels(keep: Tensor | None, grid: int, patch: int, like: Tensor) -> Tensor:
    """(B, 1, h, w) float mask, 1 on pixels of kept tokens (all ones without masking)."""
    if keep is None:
        return torch.ones_like(like)
    mask = keep_to_mask(keep, grid * grid).reshape(-1, 1, grid, grid).to(like.dtype)
    return mask.repeat_interleave(patch, 2).repeat_interleave(patch, 3)

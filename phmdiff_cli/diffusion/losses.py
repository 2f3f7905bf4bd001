"""The PHMDiff training objective: EDM denoising at every pyramid level in one step, MaskDiT masking, CGR."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn

from phmdiff_cli.config import DiffusionConfig, ModelConfig
from phmdiff_cli.diffusion.cgr import cgr_feature, cgr_pixel, cgr_structure
from phmdiff_cli.diffusion.edm import denoise, precondition, sample_sigma
from phmdiff_cli.diffusion.pyramid import image_pyramid, upsample
from phmdiff_cli.models.masking import block_mask, keep_to_mask

__all__ = ["training_loss", "check_batch", "anchor_losses", "NoisedTarget"]


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
    ground truth of level l - 1, noise-augmented and upsampled (``DiffusionConfig.coarse_noise``), or for an
    ``own_coarse`` share of the samples on the model's own cascade (:func:`with_own_coarse`); an ``own_start``
    share is noised around the model's own first evaluation (:func:`with_own_start`). The EDM
    loss ``lambda(sigma) * |D - y|^2`` is computed in F-space (``|F - (y - c_skip x) / c_out|^2``, the same
    value with better conditioning) on the pixels of kept tokens; masked tokens add ``mae_weight`` times the
    same error; the decisive samples (``p_sigma_max``) add the ``anchor_l1`` / ``anchor_ssim`` terms.

    Args:
        model: a :class:`~phmdiff_cli.models.PHMDiff` (or a wrapper exposing ``config``), in train mode.
        batch: at the finest resolution H = W = ``config.image_size``, model range [-1, 1]:
            ``source`` (B, S, 2k+1, H, W), ``src_mod`` (B, S) long, ``tgt_mod`` (B,) long,
            ``target`` (B, 1, H, W); optional ``skull`` (B,) long (:meth:`PHMDiff.forward`).
        mask_ratio: fraction of tokens dropped at every level; None uses ``config.mask_ratios``; 0 = unmasked
            (the fine-tune phase).
        generator: random source on the batch's device, for reproducible steps.

    Returns:
        ``(loss, logs)``: the scalar to backpropagate, and detached scalar tensors ``denoise``, ``mae``,
        ``anchor_l1``, ``anchor_ssim``, ``cgr_pixel``, ``cgr_structure``, ``cgr_feature`` and
        ``denoise_l{level}`` (tensors, so logging them costs no device sync until the caller asks).
    """
    cfg = model.config
    source, src_mod, tgt_mod, target = batch["source"], batch["src_mod"], batch["tgt_mod"], batch["target"]
    skull = batch.get("skull")
    check_batch(model, source, src_mod, tgt_mod)
    targets, sources = image_pyramid(target, cfg.levels), image_pyramid(source, cfg.levels)
    # The random draws keep this order (coarse conditions, masks, noise): a resumed run repeats its steps exactly.
    coarses = coarse_conditions(targets, cfg, generator)
    if cfg.diffusion.own_coarse > 0:
        coarses = with_own_coarse(coarses, model, sources, src_mod, tgt_mod, generator, skull)
    keeps = token_masks(target.shape[0], cfg, mask_ratio, device=target.device, generator=generator)
    noised = [noised_target(targets[level], level, cfg, generator) for level in range(cfg.levels)]
    if cfg.diffusion.own_start > 0:
        noised = with_own_start(noised, model, sources, coarses, src_mod, tgt_mod, generator, skull)
    outs, feats = model.forward_levels([n.input for n in noised], [n.label for n in noised], sources, coarses,
                                       src_mod, tgt_mod, levels=list(range(cfg.levels)), keeps=keeps, skull=skull)
    denoise, mae, denoised, logs = denoising_losses(outs, noised, targets, keeps, cfg)
    cgr = cgr_losses(denoised, feats, cfg.diffusion, generator)
    anchor = anchor_losses(denoised, noised, targets, cfg.diffusion)
    d, pairs = cfg.diffusion, max(cfg.levels - 1, 1)
    loss = (denoise + d.mae_weight * mae + d.anchor_l1 * anchor["anchor_l1"] + d.anchor_ssim * anchor["anchor_ssim"]
            ) / cfg.levels + (
        d.cgr_pixel * cgr["cgr_pixel"] + d.cgr_structure * cgr["cgr_structure"] + d.cgr_feature * cgr["cgr_feature"]
    ) / pairs
    logs.update(denoise=(denoise / cfg.levels).detach(), mae=(mae / cfg.levels).detach(),
                **{k: (v / cfg.levels).detach() for k, v in anchor.items()},
                **{k: (v / pairs).detach() for k, v in cgr.items()})
    return loss, logs


def coarse_conditions(targets: list[Tensor], cfg: ModelConfig, generator: torch.Generator | None
                      ) -> list[Tensor | None]:
    """Per level, the coarse condition of training: None at level 0; for l > 0 the ground truth of level l - 1
    plus Gaussian noise of a per-sample std drawn from [0, ``coarse_noise``) (cascaded diffusion's conditioning
    augmentation), upsampled to level l."""
    coarses: list[Tensor | None] = [None]
    for level in range(1, cfg.levels):
        previous = targets[level - 1]
        aug = torch.rand(previous.shape[0], 1, 1, 1, device=previous.device, generator=generator)
        noisy = previous + aug * cfg.diffusion.coarse_noise * torch.randn(
            previous.shape, device=previous.device, generator=generator)
        coarses.append(upsample(noisy, cfg.level_size(level)))
    return coarses


@torch.no_grad()
def with_own_coarse(coarses: list[Tensor | None], model: nn.Module, sources: list[Tensor], src_mod: Tensor,
                    tgt_mod: Tensor, generator: torch.Generator | None, skull: Tensor | None = None
                    ) -> list[Tensor | None]:
    """Replace the coarse conditions of an ``own_coarse`` share of the samples by what the sampler gives the
    finer levels: level l - 1's denoised prediction at its starting sigma, from pure noise, conditioned on the
    same cascade below it (one evaluation per level, unmasked, no gradients), upsampled to level l.

    Args:
        coarses: per level, the (B, 1, h, w) real-target conditions of :func:`coarse_conditions` (None at 0).
        sources: per level, the (B, S, 2k+1, h, w) source pyramid.

    Returns:
        The same list with the chosen samples' conditions (the same samples at every level) replaced.
    """
    cfg = model.config
    d = cfg.diffusion
    batch, device = src_mod.shape[0], src_mod.device
    own = (torch.rand(batch, device=device, generator=generator) < d.own_coarse).reshape(-1, 1, 1, 1)
    mixed: list[Tensor | None] = [None]
    cascade: Tensor | None = None
    for level in range(cfg.levels - 1):
        side, start = cfg.level_size(level), cfg.start_sigma(level)
        x = start * torch.randn(batch, 1, side, side, device=device, generator=generator)
        if level and d.refine_sigma > 0:  # SDEdit: the sampler starts this level from the coarser sample
            x = x + cascade
        sigma = torch.full((batch,), start, device=device)
        pred = denoise(model, x, sigma, sources[level], cascade, src_mod, tgt_mod, level=level,
                       skull=skull).clamp(-1.0, 1.0)
        cascade = upsample(pred, cfg.level_size(level + 1))
        mixed.append(torch.where(own, cascade, coarses[level + 1]))
    return mixed


def token_masks(batch: int, cfg: ModelConfig, mask_ratio: float | None, *, device: torch.device,
                generator: torch.Generator | None) -> list[Tensor | None]:
    """Per level, the (B, N_keep) indices of the tokens the encoder sees (MaskDiT), or None when unmasked."""
    keeps: list[Tensor | None] = []
    for level in range(cfg.levels):
        ratio = cfg.mask_ratios[level] if mask_ratio is None else mask_ratio
        keeps.append(None if ratio <= 0 else block_mask(batch, cfg.grid_size(level), ratio, cfg.mask_block_sizes,
                                                        device=device, generator=generator))
    return keeps


class NoisedTarget(NamedTuple):
    """One level's target with training noise: ``x = y + sigma * n``, its EDM scalings, the network input
    ``c_in * x`` and noise label ``c_noise``; all (B, 1, h, w) or broadcastable (B, 1, 1, 1), labels (B,);
    ``decisive`` (B,) float, 1 for the samples noised at the level's starting sigma (the ``p_sigma_max``
    share: the evaluation that decides a few-step sample)."""

    x: Tensor
    c_skip: Tensor
    c_out: Tensor
    input: Tensor
    label: Tensor
    decisive: Tensor


def noised_target(target: Tensor, level: int, cfg: ModelConfig, generator: torch.Generator | None) -> NoisedTarget:
    """Draw a level's training noise: log-normal sigma (EDM), a ``p_sigma_max`` share at the level's starting
    sigma (the decisive first evaluation of sampling), finer levels capped at ``refine_sigma`` when they sample
    from the coarser sample (SDEdit)."""
    d = cfg.diffusion
    sigma = sample_sigma(target.shape[0], d.p_mean, d.p_std, device=target.device, generator=generator)
    start = cfg.start_sigma(level)
    if start < cfg.sampling.sigma_max:  # a finer level starting to sample there never sees more
        sigma = sigma.clamp(max=start)
    top = torch.zeros_like(sigma, dtype=torch.bool)
    if d.p_sigma_max > 0:
        top = torch.rand(target.shape[0], device=target.device, generator=generator) < d.p_sigma_max
        sigma = torch.where(top, torch.full_like(sigma, start), sigma)
    c_skip, c_out, c_in, c_noise = precondition(sigma, d.sigma_data)
    x = target + sigma.reshape(-1, 1, 1, 1) * torch.randn(target.shape, device=target.device, generator=generator)
    return NoisedTarget(x, c_skip, c_out, c_in * x, c_noise, top.float())


@torch.no_grad()
def with_own_start(noised: list[NoisedTarget], model: nn.Module, sources: list[Tensor], coarses: list[Tensor | None],
                   src_mod: Tensor, tgt_mod: Tensor, generator: torch.Generator | None,
                   skull: Tensor | None = None) -> list[NoisedTarget]:
    """Re-noise an ``own_start`` share of the samples as the sampler's later evaluations see them: at every
    level, the model's own first evaluation D from pure noise ``x0`` at the level's starting sigma (unmasked, no
    gradients, on the sample's sources and coarse condition), moved by the Euler step to ``second_sigma``:
    ``D + second_sigma / start * (x0 - D)``, the sampler's second evaluation, marked decisive. Only there: D's
    error (~0.2) is far above a smaller sigma, and the preconditioned target ``(y - c_skip x) / c_out`` of such
    an input grows as 1 / sigma (a first try with log-normal sigmas clipped to ``second_sigma`` had losses ~10).

    Args:
        noised: per level, :func:`noised_target`'s draws for the whole batch.
        sources, coarses: per level, the (B, S, 2k+1, h, w) sources and (B, 1, h, w) coarse conditions (None at
            level 0) of the training step.

    Returns:
        ``noised`` with the chosen samples (the same at every level) replaced.
    """
    cfg = model.config
    d, batch, device = cfg.diffusion, src_mod.shape[0], src_mod.device
    own = torch.rand(batch, device=device, generator=generator) < d.own_start
    sigma = torch.full((batch,), d.second_sigma, device=device)
    c_skip, c_out, c_in, c_noise = precondition(sigma, d.sigma_data)
    pick, mixed = own.reshape(-1, 1, 1, 1), []
    for level, n in enumerate(noised):
        start = cfg.start_sigma(level)
        x0 = start * torch.randn(n.x.shape, device=device, generator=generator)
        first = denoise(model, x0, torch.full((batch,), start, device=device), sources[level], coarses[level],
                        src_mod, tgt_mod, level=level, skull=skull)
        x = first + sigma.reshape(-1, 1, 1, 1) / start * (x0 - first)
        mixed.append(NoisedTarget(torch.where(pick, x, n.x), torch.where(pick, c_skip, n.c_skip),
                                  torch.where(pick, c_out, n.c_out), torch.where(pick, c_in * x, n.input),
                                  torch.where(own, c_noise, n.label),
                                  torch.where(own, 1.0, n.decisive)))
    return mixed


def denoising_losses(outs: list[Tensor], noised: list[NoisedTarget], targets: list[Tensor],
                     keeps: list[Tensor | None], cfg: ModelConfig
                     ) -> tuple[Tensor, Tensor, list[Tensor], dict[str, Tensor]]:
    """The EDM loss ``lambda(sigma) |D - y|^2`` in F-space (``|F - (y - c_skip x) / c_out|^2``: the same value,
    better conditioned) on the pixels of kept tokens, and the same error on masked tokens (the ``mae`` term).

    Returns:
        ``(denoise, mae, denoised, logs)``: the two sums over levels, each level's denoised prediction D
        (B, 1, h, w), and the per-level ``denoise_l{level}`` logs.
    """
    denoise, mae = targets[0].new_zeros(()), targets[0].new_zeros(())
    denoised, logs = [], {}
    for level, (out, n) in enumerate(zip(outs, noised, strict=True)):
        out = out.float()
        err = (out - (targets[level] - n.c_skip * n.x) / n.c_out) ** 2
        kept = _kept_pixels(keeps[level], cfg.grid_size(level), cfg.patch_sizes[level], err)
        level_denoise = _masked_mean(err, kept)
        denoise = denoise + level_denoise
        if keeps[level] is not None:
            mae = mae + _masked_mean(err, 1 - kept)
        logs[f"denoise_l{level}"] = level_denoise.detach()
        denoised.append(n.c_skip * n.x + n.c_out * out)
    return denoise, mae, denoised, logs


def cgr_losses(denoised: list[Tensor], feats: list[Tensor], d: DiffusionConfig, generator: torch.Generator | None
               ) -> dict[str, Tensor]:
    """Cross-Granularity Regularization, summed over adjacent level pairs: pixel and structure agreement of the
    denoised predictions, kernel MMD of the encoder tokens (terms with weight 0 are not computed)."""
    zero = denoised[0].new_zeros(())
    cgr = {"cgr_pixel": zero, "cgr_structure": zero, "cgr_feature": zero}
    for level in range(1, len(denoised)):
        fine, coarse = denoised[level], denoised[level - 1]
        if d.cgr_pixel:
            cgr["cgr_pixel"] = cgr["cgr_pixel"] + cgr_pixel(fine, coarse)
        if d.cgr_structure:
            cgr["cgr_structure"] = cgr["cgr_structure"] + cgr_structure(fine, coarse)
        if d.cgr_feature:
            cgr["cgr_feature"] = cgr["cgr_feature"] + cgr_feature(feats[level], feats[level - 1], generator=generator)
    return cgr


def anchor_losses(denoised: list[Tensor], noised: list[NoisedTarget], targets: list[Tensor], d: DiffusionConfig
                  ) -> dict[str, Tensor]:
    """Structure-aware terms on the decisive evaluation (the samples noised at the level's starting sigma),
    summed over levels: mean absolute error of the denoised prediction D (``anchor_l1``) and 1 - SSIM (7-pixel
    uniform window, as ``phmdiff eval``; ``anchor_ssim``), each averaged over the decisive samples. A few-step
    sampler's output is that evaluation; its weighted MSE alone learns the blurred conditional mean, where L1
    (the median) and SSIM reward edges and local contrast. Terms with weight 0 are not computed."""
    zero = denoised[0].new_zeros(())
    anchor = {"anchor_l1": zero, "anchor_ssim": zero}
    for pred, n, target in zip(denoised, noised, targets, strict=True):
        share = n.decisive.sum().clamp(min=1)
        if d.anchor_l1:
            per_sample = (pred - target).abs().mean(dim=(1, 2, 3))
            anchor["anchor_l1"] = anchor["anchor_l1"] + (per_sample * n.decisive).sum() / share
        if d.anchor_ssim:
            # float32 even under autocast: SSIM's local variances E[x^2] - E[x]^2 cancel catastrophically in
            # bf16 (about 0.01 on the background, above the stabilising constant), which made the loss NaN.
            with torch.autocast(pred.device.type, enabled=False):
                per_sample = _ssim_loss()(pred.float(), target.float()).reshape(-1)
            anchor["anchor_ssim"] = anchor["anchor_ssim"] + (per_sample * n.decisive).sum() / share
    return anchor


@functools.cache
def _ssim_loss() -> nn.Module:
    """MONAI's per-sample 1 - SSIM in the model range [-1, 1] (data range 2), imported on first use."""
    from monai.losses import SSIMLoss  # MONAI takes seconds to import

    return SSIMLoss(spatial_dims=2, data_range=2.0, kernel_type="uniform", win_size=7, reduction="none")


def _kept_pixels(keep: Tensor | None, grid: int, patch: int, like: Tensor) -> Tensor:
    """(B, 1, h, w) float mask, 1 on pixels of kept tokens (all ones without masking)."""
    if keep is None:
        return torch.ones_like(like)
    mask = keep_to_mask(keep, grid * grid).reshape(-1, 1, grid, grid).to(like.dtype)
    return mask.repeat_interleave(patch, 2).repeat_interleave(patch, 3)

"""Coarse-to-fine sampling of a target slice from its sources, with optional repeated draws for
uncertainty."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from phmdiff_cli.config import ModelConfig
from phmdiff_cli.diffusion.edm import denoise
from phmdiff_cli.diffusion.losses import check_batch
from phmdiff_cli.diffusion.pyramid import image_pyramid, upsample
from phmdiff_cli.diffusion.schedulers import EDMScheduler

__all__ = ["sample", "solve_level", "level_scheduler"]


def level_scheduler(cfg: ModelConfig, level: int, solver: str | None = None) -> EDMScheduler:
    """The ODE solver of one pyramid level as the model samples it: from the level's starting sigma
    (:meth:`~phmdiff_cli.config.ModelConfig.start_sigma`), with its ``second_sigma``; ``solver`` defaults to
    ``config.sampling.sampler``."""
    s = cfg.sampling
    return EDMScheduler(solver or s.sampler, s.sigma_min, cfg.start_sigma(level), s.rho,
                        second_sigma=cfg.diffusion.second_sigma)


def _initial_noise(shape: tuple[int, ...], batch: int, samples: int, shared: torch.Generator | None,
                   device: torch.device) -> Tensor:
    """(samples * B, *shape) unit noise; with a generator, drawn on the CPU (the same numbers on every device)
    once per draw and shared by the B slices of the batch."""
    if shared is None:
        return torch.randn(samples * batch, *shape, device=device)
    noise = torch.randn(samples, 1, *shape, generator=shared)
    return noise.expand(samples, batch, *shape).reshape(samples * batch, *shape).to(device)


@torch.no_grad()
def solve_level(model: nn.Module, scheduler: EDMScheduler, x: Tensor, source: Tensor, coarse: Tensor | None,
                src_mod: Tensor, tgt_mod: Tensor, *, level: int, skull: Tensor | None = None) -> Tensor:
    """One pyramid level's ODE solve along ``scheduler.timesteps`` (set beforehand) from its start ``x``
    (B, 1, h, w) (noise at ``init_noise_sigma``, plus the coarser sample under SDEdit), clamped to [-1, 1];
    other arguments as in :meth:`~phmdiff_cli.models.PHMDiff.forward`, at this level's resolution."""
    for sigma in scheduler.timesteps:
        sigmas = torch.full((x.shape[0],), sigma, device=x.device)
        denoised = denoise(model, x, sigmas, source, coarse, src_mod, tgt_mod, level=level, skull=skull)
        x = scheduler.step(denoised, x)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def sample(
    model: nn.Module,
    source: Tensor,
    src_mod: Tensor,
    tgt_mod: Tensor,
    *,
    steps: int | list[int] | tuple[int, ...] | None = None,
    sampler: str | None = None,
    noise_seed: int | None = None,
    generator: torch.Generator | None = None,
    samples: int = 1,
    skull: Tensor | None = None,
    mirror: bool | None = None,
    mirror_shift: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Synthesize target slices, coarse to fine, with the deterministic EDM ODE solver (the finer levels from
    the coarser sample noised to ``DiffusionConfig.refine_sigma`` when it is set, else from pure noise).

    Run it under :func:`phmdiff_cli.engine.device.autocast` for mixed precision; the sampler state stays
    float32. The loop makes no host-device synchronisation (noise levels are Python floats, no ``.item()``).

    Args:
        model: a :class:`~phmdiff_cli.models.PHMDiff` in eval mode.
        source: (B, S, 2k+1, H, W) source slots at the finest level, model range [-1, 1]; absent slots zero.
        src_mod: (B, S) long modality ids (0 = absent).
        tgt_mod: (B,) long target modality ids.
        steps: solver steps per level (an int for every level, or one per level coarse to fine); default
            ``config.sampling.steps``.
        sampler: ``"heun"`` or ``"euler"``; default ``config.sampling.sampler``.
        noise_seed: seeds a CPU generator: results are reproducible, and every slice of the batch starts from
            the same noise (consistent texture through a volume). Ignored when ``generator`` is given.
        generator: a CPU ``torch.Generator`` used like ``noise_seed`` (shared noise across the batch).
            Without either, each slice gets independent noise from the global RNG.
        samples: N draws per slice (different noise per draw), batched together as N * B.
        skull: (B,) long, 1 where the sources show a head with skull (models with ``skull_condition``).
        mirror: also synthesize from the sources mirrored along W (left-right on the model grid) and count the
            mirrored-back results as draws (test-time mirroring, as nnU-Net does); batched together as 2 * B;
            default ``config.sampling.mirror``.
        mirror_shift: pixels by which the mirrored sources are also rolled (circularly) along H and W, the
            result rolled back; default ``config.sampling.mirror_shift``. Half a patch puts the mirrored view's
            patch seams in the middle of the first view's patches (on a grid of whole patches the mirror alone
            keeps them in place).

    Returns:
        ``(mean, std)``: mean (B, 1, H, W) in [-1, 1]; std (B, 1, H, W), the per-pixel standard deviation over
        the N draws (2 N with ``mirror``), or None when ``samples == 1``.
    """
    cfg = model.config
    check_batch(model, source, src_mod, tgt_mod)
    steps_per_level = [steps] * cfg.levels if isinstance(steps, int) else list(steps or cfg.sampling.steps)
    if len(steps_per_level) != cfg.levels or samples < 1:
        raise ValueError(f"need {cfg.levels} step counts and samples >= 1, got {steps_per_level}, {samples}")
    mirror = cfg.sampling.mirror if mirror is None else mirror
    shift = cfg.sampling.mirror_shift if mirror_shift is None else mirror_shift
    if mirror:
        source = torch.cat([source, source.roll((shift, shift), dims=(-2, -1)).flip(-1)])
        src_mod, tgt_mod = src_mod.repeat(2, 1), tgt_mod.repeat(2)
        skull = None if skull is None else skull.repeat(2)
    b, device = source.shape[0], source.device
    if generator is None and noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
    noises = [_initial_noise((1, cfg.level_size(lv), cfg.level_size(lv)), b, samples, generator, device)
              for lv in range(cfg.levels)]
    # Drawn after the initial noise, and only when used, so models without it sample what they always did.
    coarse_noises = [_initial_noise((1, cfg.level_size(lv), cfg.level_size(lv)), b, samples, generator, device)
                     * cfg.sampling.coarse_noise for lv in range(cfg.levels - 1)] if cfg.sampling.coarse_noise else []
    repeat = (samples,) + (1,) * (source.ndim - 1)
    sources = image_pyramid(source.repeat(repeat), cfg.levels)
    src_mod, tgt_mod = src_mod.repeat(samples, 1), tgt_mod.repeat(samples)
    skull = None if skull is None else skull.repeat(samples)

    refine = cfg.diffusion.refine_sigma
    schedulers = [level_scheduler(cfg, level, sampler) for level in range(cfg.levels)]
    coarse: Tensor | None = None
    for level, scheduler in enumerate(schedulers):
        scheduler.set_timesteps(steps_per_level[level])
        x = noises[level] * scheduler.init_noise_sigma
        if level and refine:  # SDEdit: the finer level starts from the coarser sample, noised
            x = x + coarse
        x = solve_level(model, scheduler, x, sources[level], coarse, src_mod, tgt_mod, level=level, skull=skull)
        if level + 1 < cfg.levels:
            coarse = upsample(x + coarse_noises[level] if coarse_noises else x, cfg.level_size(level + 1))
    draws = x.reshape(samples, b, *x.shape[1:])
    if mirror:  # (samples, 2B, ...) -> (2 samples, B, ...), the mirrored halves flipped and rolled back
        draws = torch.cat([draws[:, : b // 2], draws[:, b // 2 :].flip(-1).roll((-shift, -shift), dims=(-2, -1))])
    return draws.mean(dim=0), (draws.std(dim=0) if samples > 1 else None)

"""Model, diffusion and sampling configuration, and the size registry.

A :class:`ModelConfig` holds everything needed to rebuild a model and train it (architecture, pyramid,
masking, EDM and loss weights) plus its default sampling settings; it is saved as ``config.json`` beside
``model.safetensors`` so a model rebuilds from its folder alone (``ModelConfig.from_dict(json.load(f))``).

Sizes (:data:`SIZES`, see ``benchmarks/README.md`` for the measurements behind the defaults):

=======  ==========  ==========  ======  =====  ======  ======  ===================================
size     image (px)  patches     hidden  depth  tokens  params  use
=======  ==========  ==========  ======  =====  ======  ======  ===================================
tiny     64          2, 4, 8     64      2      64      0.45 M  tests; a training step in ~0.1 s
small    240         4, 8, 16    256     8      225     13.0 M  the shipped CPU model
base     240         2, 4, 8     512     12     900     73 M    GPU
large    240         2, 4, 8     768     24     900     295 M   GPU
=======  ==========  ==========  ======  =====  ======  ======  ===================================

Tokens are per level (equal at every level, 3 levels). ``small`` uses 16-pixel patches at the finest level so a
CPU step stays near a second; the GPU sizes use 8-pixel patches (4x the tokens) for finer detail. Every size:

- refines each level with a small conditioned UNet after unpatchify (``refine_depth`` 2), which removes the
  block edges of large patches and learns local source -> target mappings at full resolution;
- sees its MRI sources by rank (``source_norm``);
- trains half of its samples at the sampler's first noise level (``DiffusionConfig.p_sigma_max``), and its finer
  levels on coarse conditions noised by up to 0.5 (``DiffusionConfig.coarse_noise``).

The dataclass defaults of those fields (a three-convolution head for ``refine_depth`` 0, ``"percentile"``, 0,
0.1) are what a ``config.json`` written before they existed meant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from phmdiff_cli.data.normalize import SOURCE_NORMS
from phmdiff_cli.errors import InputError
from phmdiff_cli.modalities import MODALITIES

__all__ = ["SAMPLERS", "DiffusionConfig", "SamplingConfig", "ModelConfig", "SIZES", "model_config"]


@dataclass
class DiffusionConfig:
    """EDM training distribution (Karras et al. 2022) and loss weights.

    Attributes:
        sigma_data: standard deviation of the data in the model range [-1, 1].
        p_mean, p_std: training noise levels, ``ln(sigma) ~ N(p_mean, p_std^2)``. Wider and higher than EDM's
            unconditional (-1.2, 1.2): a few-step conditional sampler decides the anatomy in its first
            evaluations, at sigma 3-20, where N(-1.2, 1.2) puts under 1 % of the training samples.
        p_sigma_max: fraction of training samples whose noise level is the sampler's ``sigma_max`` instead of
            a log-normal draw. A few-step sampler's output is decided by its first evaluation at sigma_max (the
            conditional mean given the sources), where the log-normal puts about 2 % of its samples.
        coarse_noise: training only: the upsampled coarse condition of level l > 0 is the downsampled ground
            truth plus Gaussian noise of a per-sample std drawn from U(0, coarse_noise), so the finer level
            learns to correct an imperfect coarse sample rather than copy it. The registered sizes use 0.5:
            with 0.1 the finer levels copied the coarse sample and added nothing from the sources (a coarse
            sample's error is ~0.2 rms; benchmarks/README.md, "Coarse-sample augmentation").
        refine_sigma: 0, or the noise level at which the finer levels start sampling (SDEdit, Meng et al.
            2022): from the upsampled coarser sample plus noise of this std, instead of from pure noise at
            ``sampling.sigma_max``; they then train on noise levels up to it (log-normal draws clipped to it, and
            the ``p_sigma_max`` share at it), where their evaluations are spent.
        own_coarse: training only: the share of samples whose finer levels are conditioned, instead, on the
            model's own cascade, as in sampling: level l - 1's first evaluation from pure noise at its starting
            sigma (conditioned on its own cascade in turn), computed without gradients and upsampled. Conditioned
            only on the real coarse target, the finer levels learn to copy it (a 30-minute model: each finer
            level's sample is the upsampled coarser sample, no closer to the target; benchmarks/README.md,
            "Where the error comes from"), so a few-step sample is decided at the coarsest level.
        second_sigma: 0, or the noise level of the sampler's second evaluation at every level: after the
            first evaluation D at the level's starting sigma, the solver steps straight to this level (an Euler
            step: D plus ``second_sigma / start`` of the start's deviation from D, its noise), then follows the
            Karras schedule from here to ``sampling.sigma_min``. A few-step sample is its first evaluation's
            conditional mean plus what the later evaluations add from this level down.
        own_start: training only: the share of samples noised as the sampler's later evaluations see them,
            used with ``second_sigma``: the model's own first evaluation from pure noise at the level's
            starting sigma (no gradients, on the sample's own sources and coarse condition), moved by the Euler
            step to ``second_sigma``, instead of the target plus noise. Trained on the target plus noise only,
            the later evaluations see a blurred mean plus noise they never met and add texture that follows no
            source (every evaluation below sigma ~1 lowered SSIM; benchmarks/README.md, "Sampling steps").
            These samples are decisive for the ``anchor_l1`` / ``anchor_ssim`` terms.
        mae_weight: weight of the reconstruction loss on masked tokens (MaskDiT: 0.1).
        anchor_l1, anchor_ssim: weights of the mean absolute error and of 1 - SSIM of the denoised prediction
            on the ``p_sigma_max`` samples (the sampler's decisive first evaluation), beside its EDM loss
            (:func:`~phmdiff_cli.diffusion.losses.anchor_losses`); 0 = off.
        cgr_pixel: CGR pixel term: the fine prediction, area-downsampled, against the coarser level's
            prediction.
        cgr_structure: CGR structure term: agreement of the image gradients of the same pair.
        cgr_feature: CGR feature term: Gaussian-kernel MMD between the encoder token features of adjacent
            levels.
    """

    sigma_data: float = 0.5
    p_mean: float = -0.4
    p_std: float = 1.6
    p_sigma_max: float = 0.0
    coarse_noise: float = 0.1
    refine_sigma: float = 0.0
    own_coarse: float = 0.0
    second_sigma: float = 0.0
    own_start: float = 0.0
    mae_weight: float = 0.1
    anchor_l1: float = 0.0
    anchor_ssim: float = 0.0
    cgr_pixel: float = 0.1
    cgr_structure: float = 0.05
    cgr_feature: float = 0.01


#: The ODE solvers of :class:`~phmdiff_cli.diffusion.schedulers.EDMScheduler`: every sampler name is checked here.
SAMPLERS = ("heun", "euler")


@dataclass
class SamplingConfig:
    """Default sampling settings of a model (overridable per call).

    Attributes:
        sampler: ``"heun"`` (deterministic EDM 2nd order, 2 * steps - 1 evaluations) or ``"euler"``.
        steps: steps per level, coarse to fine.
        sigma_min, sigma_max, rho: the EDM noise-level schedule. sigma_max = 20 (40 times the data's
            standard deviation: the start is pure noise) rather than EDM's 80, which training never reaches.
        coarse_noise: std of the Gaussian noise added to each level's sample before it conditions the next
            level (cascaded diffusion's conditioning augmentation at inference, Ho et al. 2022): it tells the
            finer level, trained with ``DiffusionConfig.coarse_noise``, how far to trust the coarse sample.
        contrast: calibrate a synthesized MRI volume's contrast to the training targets' (the card's
            ``contrast``; :mod:`~phmdiff_cli.engine.contrast`): on for a regression whose bright tail shrinks,
            off where it did not help (measured per model, benchmarks/README.md). Whole volumes only: training
            validation, on a few slices, scores the network's output as it is.
        source_detail: add the sources' fine detail to a synthesized volume in the proportion it follows them
            locally (:mod:`~phmdiff_cli.engine.source_detail`): on where it was measured to help (a regression's
            blurred mean), before the output is confined and calibrated. Whole volumes only, as ``contrast``.
        mirror: average each slice's synthesis with that of its left-right mirrored sources, mirrored back
            (test-time mirroring; :func:`~phmdiff_cli.diffusion.sampling.sample`): twice the network's
            evaluations, on where it was measured to help.
        mirror_shift: pixels by which the mirrored view is also rolled along both in-plane axes (on the model
            grid, rolled back after), so that its patch seams fall elsewhere than the first view's. Half a patch
            (8 px) on brain-sharp: no gain on the subject-pairs it was not chosen on (benchmarks/README.md,
            "Test-time mirroring"), so 0 in the shipped cards.
    """

    sampler: str = "heun"
    steps: tuple[int, ...] = (12, 8, 6)
    sigma_min: float = 0.002
    sigma_max: float = 20.0
    rho: float = 7.0
    coarse_noise: float = 0.0
    contrast: bool = False
    source_detail: bool = False
    mirror: bool = False
    mirror_shift: int = 0


@dataclass
class ModelConfig:
    """A PHMDiff model: architecture, pyramid, masking, diffusion and default sampling.

    Attributes:
        size: registry name this config was built from (``"custom"`` otherwise); informational.
        image_size: H = W of the finest level, pixels, on the model grid.
        spacing_mm: in-plane pixel spacing of the model grid at the finest level, mm.
        levels: pyramid levels L; level 0 is the coarsest, ``image_size / 2**(L-1)`` pixels.
        patch_sizes: patch size per level, coarse to fine; doubling it per level keeps the token count equal,
            which lets all levels share one batched Transformer pass in training.
        context: k, the number of neighbouring source slices on each side (2k + 1 channels per source).
        source_norm: how the model sees its MRI sources: ``"percentile"`` (as prepared: divided by the
            foreground 99.5th percentile) or ``"rank"`` (each voxel's quantile in its volume's foreground, the
            same for any monotone change of scanner intensities; ``"foreground-rank"`` keeps the darkest
            foreground apart from the background); see
            :func:`~phmdiff_cli.data.normalize.normalize_source`. Targets are always percentile-scaled.
        max_sources: S, source slots per sample (unused slots are zero-filled with modality id 0).
        num_modalities: modality embedding entries (ids 0..num_modalities-1; 0 = absent slot).
        skull_condition: condition on whether the sources show a head with skull or a skull-stripped brain
            (:func:`~phmdiff_cli.data.preprocess.shows_skull`, measured on each training subject and each
            input), for a model trained on both; may be added to an ``--init`` model (zero-initialised).
        hidden_size, depth, num_heads: the shared encoder (DiT blocks).
        decoder_hidden_size, decoder_depth, decoder_heads: the light decoder that re-inserts mask tokens.
        mlp_ratio: MLP width / hidden width.
        refine_channels: width of the full-resolution convolutional refinement head per level (0 = none, a
            linear unpatchify only).
        refine_depth: 2x downsamplings of that head: 0 = three full-resolution convolutions
            (:class:`~phmdiff_cli.models.layers.RefinementHead`, what a config.json without this field meant),
            > 0 = a conditioned UNet that also reads the decoder tokens
            (:class:`~phmdiff_cli.models.layers.RefinementUNet`).
        mask_ratios: training fraction of tokens dropped per level (0 disables masking at that level).
        mask_block_sizes: side lengths, in tokens, of the square blocks masks are drawn from.
        diffusion: EDM and loss settings.
        sampling: default sampler settings.
    """

    size: str = "custom"
    image_size: int = 64
    spacing_mm: float = 1.0
    levels: int = 3
    patch_sizes: tuple[int, ...] = (2, 4, 8)
    context: int = 1
    source_norm: str = "percentile"
    max_sources: int = 3
    num_modalities: int = len(MODALITIES) + 1
    skull_condition: bool = False
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 2
    decoder_hidden_size: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 2
    mlp_ratio: float = 4.0
    refine_channels: int = 0
    refine_depth: int = 0
    mask_ratios: tuple[float, ...] = (0.5, 0.5, 0.5)
    mask_block_sizes: tuple[int, ...] = (1, 2, 4)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        self.patch_sizes = tuple(int(p) for p in self.patch_sizes)
        self.mask_ratios = tuple(float(r) for r in self.mask_ratios)
        self.mask_block_sizes = tuple(int(s) for s in self.mask_block_sizes)
        self.sampling.steps = tuple(int(s) for s in self.sampling.steps)
        self._validate()

    def _validate(self) -> None:
        def bad(problem: str, hint: str) -> InputError:
            return InputError(f"invalid model config: {problem}", hint=hint)

        if self.levels < 1 or len(self.patch_sizes) != self.levels or len(self.mask_ratios) != self.levels:
            raise bad(f"levels={self.levels}, patch_sizes={self.patch_sizes}, mask_ratios={self.mask_ratios}",
                      "give one patch size and one mask ratio per level")
        for level in range(self.levels):
            side, patch = self.level_size(level), self.patch_sizes[level]
            if self.image_size % 2 ** (self.levels - 1) or side % patch:
                raise bad(f"level {level} is {side} px, not a multiple of its patch size {patch}",
                          "image_size must be divisible by 2**(levels-1) * patch size")
        if self.refine_depth < 0 or self.level_size(0) % 2**self.refine_depth:
            raise bad(f"refine_depth {self.refine_depth} for a {self.level_size(0)} px coarsest level",
                      "every level's side must be divisible by 2**refine_depth")
        if not all(0.0 <= r < 1.0 for r in self.mask_ratios):
            raise bad(f"mask_ratios {self.mask_ratios} outside [0, 1)", "use e.g. 0.5")
        if self.hidden_size % self.num_heads or self.decoder_hidden_size % self.decoder_heads:
            raise bad("hidden sizes must be divisible by their head counts", "e.g. hidden 256 with 4 heads")
        if self.source_norm not in SOURCE_NORMS:
            raise bad(f"source_norm {self.source_norm!r}", f"use one of {', '.join(SOURCE_NORMS)}")
        d = self.diffusion
        if not 0.0 <= d.own_start <= 1.0 or d.second_sigma < 0 or (d.own_start and not d.second_sigma):
            raise bad(f"own_start {d.own_start}, second_sigma {d.second_sigma}",
                      "own_start is a share in [0, 1] and needs a second_sigma > 0")
        if len(self.sampling.steps) != self.levels or self.sampling.sampler not in SAMPLERS:
            raise bad(f"sampling {self.sampling}", "one step count per level; sampler heun or euler")
        if not 0 <= self.sampling.mirror_shift < self.image_size:
            raise bad(f"sampling.mirror_shift {self.sampling.mirror_shift}",
                      f"pixels on the model grid, from 0 to {self.image_size - 1}")

    @property
    def source_channels(self) -> int:
        """Channels per source slot: the slice and its k neighbours on each side."""
        return 2 * self.context + 1

    def level_size(self, level: int) -> int:
        """H = W of ``level`` in pixels (level 0 coarsest)."""
        return self.image_size // 2 ** (self.levels - 1 - level)

    def start_sigma(self, level: int) -> float:
        """Noise level of the sampler's first evaluation at ``level``: ``sampling.sigma_max``, or
        ``diffusion.refine_sigma`` at the finer levels when they start from the coarser sample (SDEdit)."""
        refine = self.diffusion.refine_sigma
        return refine if level and refine > 0 else self.sampling.sigma_max

    def grid_size(self, level: int) -> int:
        """Tokens per side at ``level``."""
        return self.level_size(level) // self.patch_sizes[level]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output (e.g. a loaded ``config.json``).

        Raises:
            InputError: unknown fields (a config written by a newer phmdiff) or invalid values.
        """
        data = dict(data)
        nested = {"diffusion": DiffusionConfig, "sampling": SamplingConfig}
        for key, sub in nested.items():
            if key in data:
                data[key] = sub(**_known(sub, data[key]))
        return cls(**_known(cls, data))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"model config has unknown fields {unknown}",
                         hint="the model was saved by a newer phmdiff: upgrade with `pip install -U phmdiff`")
    return data


#: Registered sizes; see the module docstring and benchmarks/README.md.
SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(size="tiny", image_size=64, patch_sizes=(2, 4, 8), hidden_size=64, depth=2,
                        num_heads=2, decoder_hidden_size=64, decoder_depth=1, decoder_heads=2, refine_channels=8,
                        refine_depth=2,
                        source_norm="rank", diffusion=DiffusionConfig(p_sigma_max=0.5, coarse_noise=0.5),
                        sampling=SamplingConfig(steps=(4, 3, 2))),
    "small": ModelConfig(size="small", image_size=240, patch_sizes=(4, 8, 16), hidden_size=256, depth=8,
                         num_heads=4, decoder_hidden_size=192, decoder_depth=2, decoder_heads=3, refine_channels=16,
                         refine_depth=2,
                         source_norm="rank", diffusion=DiffusionConfig(p_sigma_max=0.5, coarse_noise=0.5),
                         sampling=SamplingConfig(sampler="euler", steps=(3, 2, 2))),
    "base": ModelConfig(size="base", image_size=240, patch_sizes=(2, 4, 8), hidden_size=512, depth=12,
                        num_heads=8, decoder_hidden_size=384, decoder_depth=4, decoder_heads=6, refine_channels=32,
                        refine_depth=2,
                        source_norm="rank", diffusion=DiffusionConfig(p_sigma_max=0.5, coarse_noise=0.5)),
    "large": ModelConfig(size="large", image_size=240, patch_sizes=(2, 4, 8), hidden_size=768, depth=24,
                         num_heads=12, decoder_hidden_size=512, decoder_depth=6, decoder_heads=8, refine_channels=32,
                         refine_depth=2,
                         source_norm="rank", diffusion=DiffusionConfig(p_sigma_max=0.5, coarse_noise=0.5)),
}


def model_config(size: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of a registered size with fields replaced, e.g. ``model_config("small", levels=2,
    patch_sizes=(8, 16), mask_ratios=(0.5, 0.5), sampling=SamplingConfig(steps=(10, 6)))``.

    Raises:
        InputError: unknown size, or overrides that make an invalid config.
    """
    if size not in SIZES:
        raise InputError(f"unknown model size {size!r}", hint=f"use one of {', '.join(SIZES)}")
    base = ModelConfig.from_dict(SIZES[size].to_dict())
    return replace(base, **overrides) if overrides else base

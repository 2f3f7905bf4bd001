"""Whole-volume synthesis: source images as read -> the target modality on the first source's exact grid.

The path of a case: sources resampled onto the first source's grid (when they are not on it) ->
:func:`~phmdiff_cli.data.preprocess.prepare_volume` and
:func:`~phmdiff_cli.data.normalize.normalize_source` (the same preprocessing as training) -> batches of axial
slices with their 2.5D context (:func:`~phmdiff_cli.data.slices.source_stack`) -> the pyramid sampler with one
seeded noise shared by every slice -> background where no source has signal
(:func:`~phmdiff_cli.engine.source_support.confine`) -> :func:`~phmdiff_cli.data.preprocess.restore_volume` on
the first source's grid, in file units.

Output units: CT in Hounsfield units (int16, the model's window [-1024, 3000] HU). MRI has no absolute unit,
so a synthesized MRI is written on the first MRI source's scale: the model range [-1, 1] maps to [0, hi],
where ``hi`` is that source's foreground 99.5th percentile (the value its own normalisation mapped to +1),
float32. A target MRI made from CT alone is on a [0, 1000] scale.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from phmdiff_cli.config import SAMPLERS
from phmdiff_cli.data.grid import MODEL_BACKGROUND, GridTransform
from phmdiff_cli.data.normalize import CT_WINDOW_HU, IntensityParams, normalize_source
from phmdiff_cli.data.preprocess import (
    Prepared,
    prepare_volume,
    resample_onto,
    restore_volume,
    shows_skull,
    thicken_onto,
    thin_slices,
)
from phmdiff_cli.data.slices import Pair, source_stack
from phmdiff_cli.diffusion import sample
from phmdiff_cli.engine.contrast import calibrate_model_range
from phmdiff_cli.engine.device import autocast, configure_backends
from phmdiff_cli.engine.hub import DEFAULT_MODEL, HEADS_MODEL, available_models
from phmdiff_cli.engine.input_domain import check, measure, shows_head
from phmdiff_cli.engine.pretrained import Pretrained, load_pretrained
from phmdiff_cli.engine.source_detail import add_source_detail
from phmdiff_cli.engine.source_support import confine, source_foreground
from phmdiff_cli.errors import EXIT_INTERNAL, InputError, PhmdiffError
from phmdiff_cli.io import Volume, canonical_grid
from phmdiff_cli.modalities import is_ct, modality_id

__all__ = [
    "SAMPLERS",
    "MRI_FROM_CT_HI",
    "CPU_BUDGET_BYTES",
    "SynthesisSettings",
    "Synthesis",
    "Synthesizer",
    "load_synthesizer",
    "match_pair",
    "output_params",
    "slice_bytes",
    "default_batch_size",
    "is_out_of_memory",
]

#: Scale hi of an MRI synthesized from CT only (no MRI source to borrow a scale from), arbitrary units.
MRI_FROM_CT_HI = 1000.0
#: Activation memory per batch on a CPU: 5 slices of the small model. Larger batches were no faster per slice
#: (35-43 ms per slice-evaluation from 1 to 32 slices, benchmarks/README.md) but cost memory and delay the
#: time estimate.
CPU_BUDGET_BYTES = 256 * 2**20
#: Fraction of the free accelerator memory a batch may use.
GPU_BUDGET_FRACTION = 0.5
#: Slices further apart than this many model spacings are resampled to the model spacing for synthesis.
THIN_MARGIN = 1.25
#: A model-range value at most this far above the background counts as background (Gaussian anti-aliasing of a
#: constant -1 is -1 only up to float rounding).
_BACKGROUND_TOL = 1e-4

#: ``on_batch(done_slices, total_slices, seconds_of_this_batch)``, called after each batch.
BatchCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class SynthesisSettings:
    """How to sample.

    Attributes:
        steps: solver steps per pyramid level (coarse to fine), one int for every level, or None for the
            model's default (``config.sampling.steps``).
        sampler: ``"heun"`` or ``"euler"``; None for the model's default.
        seed: seed of the initial noise, shared by every slice of a volume (through-plane consistency).
        samples: draws per slice; more than one gives the mean and a per-voxel standard deviation.
        batch_size: slices per batch; None: :func:`default_batch_size`.
        contrast: calibrate an MRI output's contrast to the training targets' (:mod:`~phmdiff_cli.engine.contrast`);
            None for the model's default (``config.sampling.contrast``), which skips it for sources outside the
            card's ``input_domain`` (the reference ratio holds for brains like the training ones: on raw clinical
            heads, with or without a brain mask, it cost 0.4-2.5 dB; benchmarks/README.md).
        source_detail: add the sources' fine detail where the output follows them
            (:mod:`~phmdiff_cli.engine.source_detail`); None for the model's default
            (``config.sampling.source_detail``).
        mirror: average with the synthesis from the left-right mirrored sources (twice the network's
            evaluations); None for the model's default (``config.sampling.mirror``).
    """

    steps: int | tuple[int, ...] | None = None
    sampler: str | None = None
    seed: int = 0
    samples: int = 1
    batch_size: int | None = None
    contrast: bool | None = None
    source_detail: bool | None = None
    mirror: bool | None = None


@dataclass
class Synthesis:
    """One synthesized case.

    Attributes:
        image: the target on the first source's exact grid and axes (its meta, e.g. the NIfTI header, kept);
            CT int16 HU, MRI float32 (see the module docstring for the scale).
        std: per-voxel standard deviation over the draws, float32 in the image's units, same grid; None for
            one draw.
        pair: the model's pair used (its source order may differ from the order given).
        slices: axial slices of the volume; ``skipped`` of them had only background in their 2.5D context and
            were set to the background (air) without running the model.
        batch_size: the batch size in the end (halved on out-of-memory).
        seconds: ``prepare``, ``sample``, ``source_detail`` (where it ran) and ``restore`` wall times, and
            ``sample_cpu``, the CPU time of all threads while sampling.
        notes: what was done to the inputs that the user should know (resampling, grid crop).
        warnings: where the inputs differ from what the model was trained on (the card's ``input_domain``), what
            that means and what to do; empty for inputs like the training images.
        contrast_gamma: the exponent of the contrast calibration (:func:`~phmdiff_cli.engine.contrast.calibrate`);
            None when it did not run (a CT target, a model that leaves it off, ``contrast=False``, or sources
            outside the card's ``input_domain`` under the model's default).
        model: the folder (or file) of the model that synthesized it, and ``weights_sha256`` its weights' hash
            from the card: the heads model when :class:`Synthesizer` handed a head to it.
    """

    image: Volume
    std: Volume | None
    pair: Pair
    slices: int
    skipped: int
    batch_size: int
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    contrast_gamma: float | None = None
    model: str = ""
    weights_sha256: str | None = None


def match_pair(pretrained: Pretrained, modalities: Sequence[str], target: str) -> Pair:
    """The model's pair with these source modalities (in any order) and this target.

    Raises:
        InputError: no such pair; the message lists what the model supports.
    """
    for pair in pretrained.pairs:
        if pair.target == target and sorted(pair.sources) == sorted(modalities):
            return pair
    return pretrained.pair_for(modalities, target)  # raises, listing the supported pairs


def output_params(target: str, prepared: Sequence[Prepared]) -> IntensityParams:
    """The mapping of the model range to the output's file units (see the module docstring).

    Args:
        target: canonical target modality.
        prepared: the sources as prepared, first source first.
    """
    if is_ct(target):
        return IntensityParams(target, *CT_WINDOW_HU)
    scale = next((p.params.hi for p in prepared if not is_ct(p.params.modality)), MRI_FROM_CT_HI)
    return IntensityParams(target, 0.0, scale)


def slice_bytes(pretrained: Pretrained, samples: int = 1) -> int:
    """Estimated peak activation memory (bytes, float32) of one slice in a sampling batch.

    Counts the source stack and its pyramid, the level input, the largest Transformer activations (QKV and
    MLP; no attention matrix: ``scaled_dot_product_attention``'s fused kernels never build it, on CUDA or the
    CPU) and the refinement head's full-resolution feature maps at the finest level: five
    for the three-convolution head (convolution, modulation, activation, convolution, activation), thirteen for
    the UNet head: the eight it holds at once by count (its first stage's four, the upsampled bottleneck's two,
    the skip concatenation's, the last convolution's) fell ~17 MiB short of the measured peak-RSS growth per
    added slice of ``small`` (53-71 MiB, benchmarks/README.md), about five maps more.
    """
    cfg = pretrained.config
    pixels = cfg.image_size**2
    sources = cfg.max_sources * cfg.source_channels * pixels
    tokens = max(cfg.grid_size(level) ** 2 for level in range(cfg.levels))
    floats = (
        2 * sources * 4 / 3  # the stack, and its pyramid (1 + 1/4 + 1/16 + ...)
        + (sources + 2 * pixels) * 2  # one level's input and its patches
        + tokens * cfg.hidden_size * (3 + cfg.mlp_ratio + 2)
        + (13 if cfg.refine_depth else 5) * cfg.refine_channels * pixels
    )
    return int(4 * floats * samples)


def default_batch_size(pretrained: Pretrained, device: torch.device, samples: int = 1) -> int:
    """Slices per batch within the memory budget: :data:`CPU_BUDGET_BYTES` on a CPU, half the free memory on
    CUDA; at least 1."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_BUDGET_FRACTION)
    else:
        budget = CPU_BUDGET_BYTES
    return max(1, budget // slice_bytes(pretrained, samples))


def is_out_of_memory(error: BaseException) -> bool:
    """True for the out-of-memory errors of PyTorch (any device) and Python."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


class Synthesizer:
    """Synthesizes whole volumes with one loaded model (load it once, call :meth:`run` per case).

    Args:
        pretrained: the model (eval mode, on ``device``).
        device: where it runs.
        dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for fp32.
        settings: sampling settings.
        heads: the synthesizer of a model trained on heads with skull, given the cases whose first source shows
            one (:func:`~phmdiff_cli.engine.input_domain.shows_head`) and that come without a brain mask; None: this
            model takes every case.

    Raises:
        InputError: steps or sampler that do not fit the model, or contrast calibration asked of a model whose
            card has no ``contrast`` reference.
    """

    def __init__(
        self,
        pretrained: Pretrained,
        device: torch.device,
        dtype: torch.dtype | None,
        settings: SynthesisSettings,
        heads: Synthesizer | None = None,
    ) -> None:
        cfg = pretrained.config
        steps = cfg.sampling.steps if settings.steps is None else settings.steps
        self.steps = (steps,) * cfg.levels if isinstance(steps, int) else tuple(steps)
        if len(self.steps) != cfg.levels or min(self.steps) < 1:
            raise InputError(
                f"steps {','.join(map(str, self.steps))} do not fit the model's {cfg.levels} pyramid levels",
                hint=f"give one number, or {cfg.levels} comma-separated numbers >= 1",
            )
        self.sampler = settings.sampler or cfg.sampling.sampler
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}", hint=f"use one of {', '.join(SAMPLERS)}")
        if settings.samples < 1:
            raise InputError(f"samples must be at least 1, got {settings.samples}")
        self.contrast = cfg.sampling.contrast if settings.contrast is None else settings.contrast
        self.contrast_reference: dict[str, float] = pretrained.card.get("contrast", {})
        self.source_detail = cfg.sampling.source_detail if settings.source_detail is None else settings.source_detail
        self.mirror = cfg.sampling.mirror if settings.mirror is None else settings.mirror
        if self.contrast and not self.contrast_reference:
            raise InputError(f"{pretrained.path}: the model card has no contrast reference",
                             hint="leave out --contrast: the card predates the measurement (ship or train it again)")
        self.pretrained, self.device, self.dtype, self.settings = pretrained, device, dtype, settings
        self.heads = heads
        self.backends = configure_backends(device)
        draws = settings.samples * (2 if self.mirror else 1)  # a mirrored copy of a slice costs one more draw
        self.batch_size = settings.batch_size or default_batch_size(pretrained, device, draws)

    def run(
        self,
        sources: Sequence[Volume],
        target: str,
        *,
        mask: Volume | None = None,
        on_batch: BatchCallback | None = None,
    ) -> Synthesis:
        """Synthesize ``target`` from ``sources`` (as read; each with its ``modality`` set).

        The output is on the grid of ``sources[0]``; the others are resampled onto it (linear) when needed. Slices
        thicker than the model's are made thin for synthesis (:func:`thin_slices`) and the output averaged back
        onto them (:func:`thicken_onto`), so that a slice's 2.5-D context holds its physical neighbours. A case
        whose first source shows a head with skull, given without a mask, goes to the ``heads`` synthesizer when
        there is one.

        Args:
            sources: the source images, first one's grid = the output's.
            target: canonical target modality.
            mask: a brain (or body) mask, any grid (resampled nearest-neighbour onto the first source): sources are
                used inside it only, and the output is background outside it (MRI 0, CT -1024 HU).
            on_batch: progress callback.

        Raises:
            InputError: the model has no pair for these modalities, or a source's modality is unknown.
            PhmdiffError: NaN/Inf in the output (hint: fp32), or out of memory even one slice at a time.
        """
        for volume in sources:
            if volume.modality is None:
                raise InputError(
                    "cannot tell the image's modality",
                    path=volume.meta.get("path"),
                    hint="name the file by modality (e.g. ID-t1n.nii.gz) or give --src-modality",
                )
        first = sources[0]
        if self.heads is not None and mask is None and not is_ct(first.modality) and shows_head(first, first.modality):
            result = self.heads.run(sources, target, on_batch=on_batch)
            result.notes.insert(0, f"{first.meta.get('path', 'the first source')} shows a head with skull: "
                                   f"synthesized by {self.heads.pretrained.path.name}, the model trained on heads too "
                                   "(--model picks one model for every input)")
            return result
        pair = match_pair(self.pretrained, [v.modality for v in sources], target)  # type: ignore[misc]
        start = time.perf_counter()
        notes: list[str] = [w for v in sources for w in v.meta.get("warnings", [])]
        reference = sources[0]
        aligned = [reference] + [self._aligned(v, reference, notes) for v in sources[1:]]
        if mask is not None and not mask.same_grid(reference, tol=1e-3):
            mask = resample_onto(mask, reference, nearest=True)
        if mask is not None and not (mask.array > 0).any():
            raise InputError("the brain mask has no voxel inside on the source's grid", path=mask.meta.get("path"),
                             hint="give the mask of this image (nonzero = brain)")
        warned = self._check_inputs(aligned, mask)
        work, work_mask = self._thin(aligned, mask, notes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepared = [prepare_volume(v, self.pretrained.grid, mask=work_mask) for v in work]
        notes += [str(w.message) for w in caught]
        by_modality = {v.modality: p for v, p in zip(aligned, prepared, strict=True)}
        norm = self.pretrained.config.source_norm
        volumes = [normalize_source(by_modality[m].array, m, norm) for m in pair.sources]
        seconds = {"prepare": time.perf_counter() - start}

        start, cpu_start = time.perf_counter(), time.process_time()
        skull = shows_skull(by_modality[pair.sources[0]].foreground, self.pretrained.grid)
        mean, std, todo = self._sample_volume(volumes, pair, skull, on_batch)
        seconds["sample"] = time.perf_counter() - start
        seconds["sample_cpu"] = time.process_time() - cpu_start  # all threads: busy cores x wall time
        on_grid = [by_modality[m].array for m in pair.sources]  # the prepared sources, before rank normalisation
        if self.source_detail:
            start = time.perf_counter()
            mean = add_source_detail(mean, on_grid)
            seconds["source_detail"] = time.perf_counter() - start
        foreground = source_foreground(on_grid, pair.sources, head=skull)
        mean, std = confine(mean, std, foreground)
        gamma = None
        if self.contrast and target in self.contrast_reference:
            if warned and self.settings.contrast is None:
                # The reference is the training brains' tissue mix; a head with skull, or a loose mask, holds another.
                notes.append("contrast calibration skipped: the sources are unlike the training images (see the "
                             "warnings); --contrast applies it anyway")
            else:
                mean, std, gamma = calibrate_model_range(mean, std, foreground, self.contrast_reference[target])

        start = time.perf_counter()
        params, transform = output_params(target, prepared), prepared[0].transform
        background = CT_WINDOW_HU[0] if is_ct(target) else 0.0
        image = self._restore(mean, params, transform, work[0], reference, mask, background)
        if is_ct(target):
            image = image.with_array(np.rint(image.array).astype(np.int16))
        std_image = None
        if std is not None:
            # A std is a difference of intensities: it scales by (hi - lo) / 2 with no offset. Shifting it by
            # -1 and restoring with lo = 0 does exactly that, and the area outside the model grid becomes 0.
            scale = IntensityParams(target, 0.0, params.hi - params.lo)
            std_image = self._restore(std - 1.0, scale, transform, work[0], reference, mask, 0.0)
        seconds["restore"] = time.perf_counter() - start
        return Synthesis(image, std_image, pair, mean.shape[0], mean.shape[0] - todo, self.batch_size, seconds,
                         notes, warned, gamma, str(self.pretrained.path), self.pretrained.card.get("sha256"))

    def _check_inputs(self, sources: Sequence[Volume], mask: Volume | None) -> list[str]:
        """Warnings for sources unlike the training images (the card's ``input_domain``; none without one)."""
        domain = self.pretrained.card.get("input_domain")
        if not domain:
            return []
        return [warning for v in sources if v.modality is not None
                for warning in check(measure(v, v.modality, mask), domain, v.modality, v.meta.get("path", "a source"))]

    def _thin(self, sources: list[Volume], mask: Volume | None, notes: list[str]
              ) -> tuple[list[Volume], Volume | None]:
        """The sources (all on the first's grid) and mask with slices at the model spacing when theirs are
        further apart than :data:`THIN_MARGIN` model spacings; else as given."""
        step, spacing = self.pretrained.grid.spacing_mm, float(canonical_grid(sources[0]).spacing[2])
        if spacing <= THIN_MARGIN * step:
            return sources, mask
        notes.append(f"slices {spacing:.3g} mm apart resampled to {step:g} mm for synthesis (linear); the output "
                     "is averaged back onto the source's slices")
        thin_mask = thin_slices(mask, step, nearest=True) if mask is not None else None
        return [thin_slices(v, step) for v in sources], thin_mask

    @staticmethod
    def _restore(slices: np.ndarray, params: IntensityParams, transform: GridTransform, work: Volume,
                 reference: Volume, mask: Volume | None, background: float) -> Volume:
        """Model-grid slices -> file units on ``reference``'s exact grid (through ``work``, its thin-slice
        version, when there is one); ``background`` outside ``mask``."""
        image = restore_volume(slices, params, transform, work)
        if work is not reference:
            image = thicken_onto(image, reference)
        if mask is not None:
            image = image.with_array(np.where(mask.array > 0, image.array, np.float32(background)))
        return image

    @staticmethod
    def _aligned(volume: Volume, reference: Volume, notes: list[str]) -> Volume:
        if volume.same_grid(reference, tol=1e-3):
            return volume
        notes.append(
            f"{volume.meta.get('path', 'a source')}: resampled (linear) onto the grid of "
            f"{reference.meta.get('path', 'the first source')}"
        )
        return resample_onto(volume, reference, nearest=False)

    def _sample_volume(
        self, volumes: Sequence[np.ndarray], pair: Pair, skull: bool, on_batch: BatchCallback | None
    ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Sample every slice whose 2.5D context holds foreground, in batches; halve them on out-of-memory.
        ``skull``: the sources show a head with skull (:func:`~phmdiff_cli.data.preprocess.shows_skull`).

        Returns:
            ``(mean, std, n_sampled)``: float32 ``(Z, H, W)`` in the model range (-1 where skipped), the std
            ``(Z, H, W)`` (0 where skipped) or None, and the number of slices sampled.
        """
        depth, height, width = volumes[0].shape
        todo = np.flatnonzero(self._occupied(volumes))
        mean = np.full((depth, height, width), MODEL_BACKGROUND, dtype=np.float32)
        std = np.zeros_like(mean) if self.settings.samples > 1 else None
        done = 0
        while done < todo.size:
            z = todo[done : done + self.batch_size]
            start = time.perf_counter()
            result = self._try_batch(volumes, pair, skull, z)
            if result is None:  # out of memory: the failed batch's tensors are released by now
                self._shrink_batch()
                continue
            batch_mean, batch_std = result
            mean[z] = batch_mean
            if std is not None:
                std[z] = batch_std
            done += z.size
            if on_batch is not None:
                on_batch(done, int(todo.size), time.perf_counter() - start)
        return mean, std, int(todo.size)

    def _occupied(self, volumes: Sequence[np.ndarray]) -> np.ndarray:
        """Boolean ``(Z,)``: the 2.5D context of slice z holds some foreground in some source."""
        k = self.pretrained.config.context
        occupied = np.zeros(volumes[0].shape[0], dtype=bool)
        for volume in volumes:
            occupied |= volume.reshape(volume.shape[0], -1).max(axis=1) > MODEL_BACKGROUND + _BACKGROUND_TOL
        # "full" then the centred part: "same" returns the kernel's length for volumes thinner than 2k + 1 slices
        return np.convolve(occupied, np.ones(2 * k + 1), mode="full")[k : k + occupied.size] > 0

    def _try_batch(
        self, volumes: Sequence[np.ndarray], pair: Pair, skull: bool, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """:meth:`_sample_batch`, or None on out-of-memory. Returning (rather than handling the error in the
        caller's ``except``) drops the exception and its traceback, whose frames hold the batch's tensors,
        before the caller frees the cache."""
        try:
            return self._sample_batch(volumes, pair, skull, z)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(error):
                raise
            return None

    def _shrink_batch(self) -> None:
        """Halve the batch after an out-of-memory error (the device's cached blocks freed first)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size == 1:
            raise PhmdiffError(
                "out of memory even with one slice per batch",
                exit_code=EXIT_INTERNAL,
                hint="use fewer --samples, or a device with more memory",
            )
        self.batch_size //= 2

    @torch.inference_mode()
    def _sample_batch(
        self, volumes: Sequence[np.ndarray], pair: Pair, skull: bool, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean (and std) ``(len(z), H, W)`` float32 in the model range for slices ``z``."""
        cfg = self.pretrained.config
        stack, src_mod = source_stack(
            volumes, pair.sources, k=cfg.context, slots=cfg.max_sources, z=z.tolist()
        )
        source = torch.from_numpy(stack).to(self.device)
        src_mod_t = torch.from_numpy(src_mod).to(self.device).expand(len(z), -1)
        tgt_mod = torch.full((len(z),), modality_id(pair.target), dtype=torch.long, device=self.device)
        with autocast(self.device, self.dtype):
            # One noise seed for every batch: each slice starts from the same noise (consistent texture).
            mean, std = sample(
                self.pretrained.model,
                source,
                src_mod_t,
                tgt_mod,
                steps=list(self.steps),
                sampler=self.sampler,
                noise_seed=self.settings.seed,
                samples=self.settings.samples,
                skull=torch.full((len(z),), int(skull), dtype=torch.long, device=self.device),
                mirror=self.mirror,
            )
        if not bool(torch.isfinite(mean).all()):
            raise PhmdiffError(
                "the synthesized image has NaN or infinite values", hint="run again with --precision fp32"
            )
        return mean[:, 0].float().cpu().numpy(), None if std is None else std[:, 0].float().cpu().numpy()


def load_synthesizer(
    model: str | None, device: torch.device, dtype: torch.dtype | None, settings: SynthesisSettings
) -> Synthesizer:
    """The synthesizer of ``model`` (any ``--model`` spec); for None, of the shipped
    :data:`~phmdiff_cli.engine.hub.DEFAULT_MODEL`, handing the cases that show a head with skull to
    :data:`~phmdiff_cli.engine.hub.HEADS_MODEL` where that is installed (what ``phmdiff synthesize`` does without
    ``--model``)."""
    heads = None
    if model is None and HEADS_MODEL in available_models():
        heads = Synthesizer(load_pretrained(HEADS_MODEL, device), device, dtype, settings)
    return Synthesizer(load_pretrained(model or DEFAULT_MODEL, device), device, dtype, settings, heads)

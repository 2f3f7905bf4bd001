"""Training settings: defaults, a JSON config file, command-line flags (highest priority), and the model
configuration they resolve to.

The resolved settings are saved in the run folder (``train_config.json``) and are what ``--resume`` reads
back, so a resumed run trains the same model on the same data; only the budget, logging and hardware
settings of :data:`RESUMABLE` may change on resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phmdiff_cli.config import SAMPLERS, ModelConfig, model_config
from phmdiff_cli.errors import InputError

if TYPE_CHECKING:  # the CLI reads the defaults for its help text: keep this import light
    from phmdiff_cli.data.summary import DatasetSummary

__all__ = [
    "DEFAULT_MAX_STEPS",
    "RESUMABLE",
    "TrainSettings",
    "load_settings",
    "resumed_settings",
    "auto_spacing",
    "build_model_config",
]

#: The step budget when neither ``max_steps`` nor ``minutes`` is given (Ctrl-C stops and saves any time).
DEFAULT_MAX_STEPS = 100_000
#: Settings a resumed run may change: the budget and its LR cooldown, evaluation/checkpoint/log intervals and
#: the hardware.
RESUMABLE = frozenset(
    {
        "max_steps",
        "minutes",
        "lr_cooldown",
        "val_every",
        "checkpoint_every",
        "checkpoint_minutes",
        "log_every",
        "device",
        "precision",
        "compile",
        "num_workers",
    }
)

#: Gradient-norm clip of fp16 runs (``grad_clip`` None): loss-scaled fp16 gradients can spike before the
#: scaler backs off.
FP16_GRAD_CLIP = 1.0
#: Settings that shape the network and its grid: with ``init`` they are the initial model's.
_MODEL_KEYS = ("size", "spacing", "levels", "mask_ratio", "cgr_pixel", "cgr_structure", "cgr_feature", "context",
               "source_norm", "model")
#: ``model`` fields that set the training objective and default sampler, not the network: a run from ``init`` may
#: change them (e.g. a regression-trained model fine-tuned on its own first evaluations).
OBJECTIVE_KEYS = ("diffusion", "sampling")
#: ``model`` fields a run from ``init`` may also set: the objective's, and a zero-initialised conditioning that it
#: adds to the initial network (the model starts as it was).
INIT_KEYS = (*OBJECTIVE_KEYS, "skull_condition")


@dataclass
class TrainSettings:
    """Everything ``phmdiff train`` needs (JSON keys of ``--config`` and of ``train_config.json``).

    Data:
        data: dataset folder or CSV manifest, or a list of them (trained on together). pairs:
        ``"t1n:t2w,t2w:t2f"`` (source[+source]:target). cache_dir: preprocessing cache (default
        ``<out>/cache``). val_subjects: validation subject ids (else a seeded ``val_fraction`` of each dataset
        folder's subjects). skip_incomplete: train without subjects that serve no pair (else an error).
        resample: resample images on another grid onto the target's. augment: flips and source intensity
        jitter; with it, rotate (degrees), zoom (fraction) and translate (pixels of the model grid): random
        in-plane pose.
    Model:
        init: start from this model's weights (a ``--model`` spec); its config is kept, so the model settings
        below must be left at their defaults, except ``model``'s ``diffusion`` and ``sampling`` fields (the
        training objective and default sampler), which change the initial model's. size: ``tiny``,
        ``small``, ``base``, ``large``. spacing: model grid spacing, mm (None: the largest in-plane field of
        view of the data over the image size). levels: pyramid levels. mask_ratio: fraction of tokens masked
        at every level. cgr_pixel, cgr_structure, cgr_feature: CGR weights. context: 2.5D neighbours on each
        side. source_norm: ``percentile`` or ``rank`` MRI sources (None: the size's). model: further
        ``ModelConfig`` fields (e.g. ``{"depth": 4}``).
    Optimisation:
        batch_size: slices per step and process. lr, weight_decay: AdamW. warmup_steps: linear LR warm-up
        (None: min(500, max_steps / 10)), then constant. lr_cooldown: the last fraction of the budget decays
        the LR linearly to 0 (warmup-stable-decay; 0: no decay). max_steps, minutes: budgets (the whole run's,
        resumed sessions included; the first reached stops). finetune_fraction: the last fraction of the
        budget trains unmasked (MaskDiT; with ``minutes`` the switch goes by the clock and is recorded in
        the checkpoint). ema_decay: EMA decay (saved models are EMA weights). grad_clip: largest gradient
        norm (0: no clipping; None: 1.0 when training in fp16, whose loss scaler also skips steps with inf/NaN
        gradients, else none).
    Evaluation and checkpoints:
        val_every: steps between validations. val_slices: slices per validation subject and pair.
        val_steps, val_sampler: sampler steps per level and sampler for validation (None: the model's own
        sampling, what its card ships, so ``best/`` is chosen as it will be used). checkpoint_every,
        checkpoint_minutes: checkpoint intervals (whichever comes first). log_every: steps between
        metrics-log lines.
    Hardware and reproducibility:
        seed, device, precision, compile, num_workers (None: 0 on the CPU, else up to 8).
    """

    data: str | list[str] | None = None
    pairs: str | None = None
    cache_dir: str | None = None
    val_subjects: list[str] | None = None
    val_fraction: float = 0.2
    skip_incomplete: bool = False
    resample: bool = False
    augment: bool = True
    rotate: float = 0.0
    zoom: float = 0.0
    translate: float = 0.0
    init: str | None = None
    size: str = "small"
    spacing: float | None = None
    levels: int | None = None
    mask_ratio: float | None = None
    cgr_pixel: float | None = None
    cgr_structure: float | None = None
    cgr_feature: float | None = None
    context: int | None = None
    source_norm: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    lr_cooldown: float = 0.0
    max_steps: int | None = None
    minutes: float | None = None
    finetune_fraction: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float | None = None
    val_every: int = 1000
    val_slices: int = 8
    val_steps: int | None = None
    val_sampler: str | None = None
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 10.0
    log_every: int = 20
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    num_workers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def data_folders(self) -> list[str]:
        """``data`` as a list (empty when not given)."""
        return [self.data] if isinstance(self.data, str) else list(self.data or [])

    @property
    def step_budget(self) -> int | None:
        """``max_steps``, or :data:`DEFAULT_MAX_STEPS` when no budget is given at all."""
        if self.max_steps is None and self.minutes is None:
            return DEFAULT_MAX_STEPS
        return self.max_steps

    @property
    def warmup(self) -> int:
        """Linear LR warm-up steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        budget = self.step_budget
        return 500 if budget is None else min(500, budget // 10)

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the budget done after ``step`` steps and ``elapsed_s`` seconds: the larger of the step
        and time fractions, as the first budget reached stops (0 with no budget)."""
        done = [step / self.step_budget] if self.step_budget else []
        if self.minutes:
            done.append(elapsed_s / (self.minutes * 60))
        return max(done, default=0.0)

    def clip_norm(self, dtype: object) -> float:
        """The gradient-norm clip of a run in autocast ``dtype`` (a ``torch.dtype`` or None; 0: none); see
        ``grad_clip``."""
        if self.grad_clip is not None:
            return self.grad_clip
        return FP16_GRAD_CLIP if str(dtype) == "torch.float16" else 0.0

    def lr_at(self, step: int, progress: float = 0.0) -> float:
        """Learning rate of optimizer step ``step`` (0-based) at budget fraction ``progress``: a linear warm-up,
        constant (as DiT), then with ``lr_cooldown`` a linear decay to 0 over the budget's last fraction."""
        warm = min(1.0, (step + 1) / max(1, self.warmup))
        cool = min(1.0, max(0.0, 1.0 - progress) / self.lr_cooldown) if self.lr_cooldown > 0 else 1.0
        return self.lr * warm * cool

    def check(self) -> None:
        """Raise InputError naming the first out-of-range setting."""
        positive = {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "val_every": self.val_every,
            "val_slices": self.val_slices,
            "val_steps": self.val_steps,
            "checkpoint_every": self.checkpoint_every,
            "checkpoint_minutes": self.checkpoint_minutes,
            "log_every": self.log_every,
            "max_steps": self.max_steps,
            "minutes": self.minutes,
            "spacing": self.spacing,
            "levels": self.levels,
        }
        for name, value in positive.items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise _bad(name, value, "must be a positive number")
        fractions = {
            "val_fraction": self.val_fraction,
            "finetune_fraction": self.finetune_fraction,
            "ema_decay": self.ema_decay,
            "mask_ratio": self.mask_ratio,
        }
        for name, value in fractions.items():
            if value is not None and not 0.0 <= value < 1.0:
                raise _bad(name, value, "must be in [0, 1)")
        if not 0.0 <= self.lr_cooldown <= 1.0:
            raise _bad("lr_cooldown", self.lr_cooldown, "must be in [0, 1]")
        if self.val_sampler is not None and self.val_sampler not in SAMPLERS:
            raise _bad("val_sampler", self.val_sampler, f"must be one of {', '.join(SAMPLERS)}")
        for name in (
            "cgr_pixel",
            "cgr_structure",
            "cgr_feature",
            "weight_decay",
            "warmup_steps",
            "context",
            "num_workers",
            "grad_clip",
            "translate",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise _bad(name, value, "must not be negative")
        if not 0.0 <= self.rotate <= 180.0:
            raise _bad("rotate", self.rotate, "must be in [0, 180] degrees")
        if not 0.0 <= self.zoom < 1.0:
            raise _bad("zoom", self.zoom, "must be in [0, 1)")
        defaults = TrainSettings()
        kept = [name for name in _MODEL_KEYS if getattr(self, name) != getattr(defaults, name)
                and not (name == "model" and set(self.model) <= set(INIT_KEYS))]
        if self.init is not None and kept:
            raise InputError(
                f"{', '.join(_flag(k) if k != 'model' else 'model fields but diffusion, sampling' for k in kept)}"
                " cannot be used with --init",
                hint=f"the architecture and grid are those of {self.init}",
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, value: Any, problem: str) -> InputError:
    return InputError(f"{_flag(name)} {value!r} {problem}")


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
}


def _check_types(data: Mapping[str, Any], path: Path | None) -> None:
    """Refuse unknown keys and values of the wrong JSON type (``null`` is allowed where the default is)."""
    known = {f.name: str(f.type) for f in fields(TrainSettings)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(
            f"unknown setting(s) {', '.join(unknown)}", path=path, hint=f"settings: {', '.join(known)}"
        )
    for name, value in data.items():
        parts = [p.strip() for p in known[name].split("|")]  # e.g. "list[str] | None"
        if value is None and "None" in parts:
            continue
        allowed = tuple(t for p in parts if p != "None" for t in _TYPES[p.split("[")[0]])
        ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
        if ok and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise InputError(f"setting {name!r} must be {known[name]}, got {value!r}", path=path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("config file does not exist", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(
            f"not a JSON config file: {error}",
            path=path,
            hint='write the settings as a JSON object, e.g. {"size": "tiny"}',
        ) from None
    if not isinstance(data, dict):
        raise InputError("the config file must hold a JSON object", path=path)
    return data


def load_settings(config_file: Path | None, flags: Mapping[str, Any]) -> TrainSettings:
    """Defaults, overridden by ``config_file`` (JSON object of :class:`TrainSettings` keys; dashes allowed;
    a run folder's ``train_config.json`` works too), overridden by the explicitly given ``flags``.

    Raises:
        InputError: unreadable config, unknown keys, wrong types or out-of-range values.
    """
    merged: dict[str, Any] = {}
    if config_file is not None:
        data = _read_json(config_file)
        data = data.get("settings", data)  # a train_config.json holds {"settings": ..., "model": ...}
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        _check_types(data, config_file)
        merged.update(data)
    merged.update(flags)
    _check_types(merged, None)
    settings = TrainSettings(**merged)
    settings.check()
    return settings


def resumed_settings(saved: Mapping[str, Any], flags: Mapping[str, Any], path: Path) -> TrainSettings:
    """The settings of a run being resumed: ``saved`` (from its ``train_config.json``) with the
    :data:`RESUMABLE` ``flags`` applied.

    Raises:
        InputError: a flag would change something other than :data:`RESUMABLE` (the model, data or
            optimisation of a run cannot change half-way).
    """
    _check_types(saved, path)
    settings = TrainSettings(**saved)
    changed = sorted(k for k, v in flags.items() if k not in RESUMABLE and getattr(settings, k) != v)
    if changed:
        raise InputError(
            f"cannot change {', '.join(_flag(k) for k in changed)} when resuming",
            path=path,
            hint=f"resuming may change only {', '.join(sorted(_flag(k) for k in RESUMABLE))}; "
            "start a new run for other changes",
        )
    settings = replace(settings, **{k: v for k, v in flags.items() if k in RESUMABLE})
    settings.check()
    return settings


def auto_spacing(summary: DatasetSummary, modalities: Iterable[str], image_size: int) -> float:
    """The model spacing (mm, rounded up to 0.01) at which ``image_size`` pixels span the largest in-plane
    field of view (x and y of the files, i.e. axial acquisitions) among the images of ``modalities``.

    BraTS (240 x 240 at 1 mm) gives 1.0 mm for a 240-pixel model and 3.75 mm for a 64-pixel one.
    """
    wanted = set(modalities)
    fov = max(
        (
            max(i.size[0] * i.spacing[0], i.size[1] * i.spacing[1])
            for i in summary.images
            if i.key in wanted and not i.synthetic
        ),
        default=0.0,
    )
    if fov <= 0:
        raise InputError(
            "cannot tell the field of view of the images", path=summary.root, hint="pass --spacing"
        )
    return math.ceil(round(fov / image_size * 100, 6)) / 100


def build_model_config(settings: TrainSettings, *, sources: int) -> ModelConfig:
    """The model configuration of ``settings``: the registered size, its pyramid resized to ``levels`` (patch
    sizes halve towards the coarse levels so every level keeps the finest level's token grid), the mask ratio,
    CGR weights, context, ``model`` overrides and ``spacing`` (when None, the size's; see
    :func:`auto_spacing` for a data-driven one).

    Args:
        settings: the training settings.
        sources: the largest number of sources of a pair (at least that many source slots).

    Raises:
        InputError: unknown size or model field, or an invalid combination (e.g. levels the image size cannot
            be halved into).
    """
    config = model_config(settings.size)
    levels = settings.levels or config.levels
    ratio = settings.mask_ratio if settings.mask_ratio is not None else config.mask_ratios[-1]
    if levels != config.levels or settings.mask_ratio is not None:
        finest = config.patch_sizes[-1]
        steps = config.sampling.steps
        config = replace(
            config,
            levels=levels,
            patch_sizes=tuple(max(1, finest // 2 ** (levels - 1 - level)) for level in range(levels)),
            mask_ratios=(ratio,) * levels,
            sampling=replace(
                config.sampling, steps=tuple(steps[min(i, len(steps) - 1)] for i in range(levels))
            ),
        )
    cgr = {
        k: getattr(settings, k)
        for k in ("cgr_pixel", "cgr_structure", "cgr_feature")
        if getattr(settings, k) is not None
    }
    data = config.to_dict()
    data["diffusion"].update(cgr)
    data["max_sources"] = max(config.max_sources, sources)
    if settings.context is not None:
        data["context"] = settings.context
    if settings.source_norm is not None:
        data["source_norm"] = settings.source_norm
    config = with_model_overrides(ModelConfig.from_dict(data), settings.model)
    return config if settings.spacing is None else replace(config, spacing_mm=float(settings.spacing))


def with_model_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """``config`` with ``ModelConfig`` fields replaced (nested ``diffusion`` / ``sampling`` dicts field by field).

    Raises:
        InputError: unknown fields or an invalid result.
    """
    data = config.to_dict()
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return ModelConfig.from_dict(data)

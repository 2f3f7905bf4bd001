"""``phmdiff train``: the training loop, validation, checkpoints and resume, in one process or several.

Reproducibility: every random draw of a step (noise levels, noise, masks) comes from a generator seeded by
``(seed, rank, step)``, the data stream from :class:`~phmdiff_cli.data.slices.SliceSampler` (seeded, started
at ``step * batch_size``) and the learning rate is a function of the step. So a resumed run continues with the
same numbers as an uninterrupted one, and a checkpoint needs only the weights, the EMA, the optimizer state
and the step.

Multi-process (``torchrun``): every process trains on its own share of the sample stream (DDP averages the
gradients); decisions that depend on a clock or a signal are agreed on by all processes at every step; only
rank 0 validates, writes files and logs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from phmdiff_cli.config import ModelConfig
from phmdiff_cli.data.slices import SliceDataset
from phmdiff_cli.diffusion import training_loss
from phmdiff_cli.engine import distributed
from phmdiff_cli.engine.checkpoint import load_training_state, save_model, save_training_state
from phmdiff_cli.engine.device import (
    autocast,
    compile_model,
    compile_stats,
    configure_backends,
    grad_scaler,
    resolve_precision,
    unwrap_model,
)
from phmdiff_cli.engine.ema import EMA
from phmdiff_cli.engine.pretrained import Pretrained, build_card, load_pretrained
from phmdiff_cli.engine.progress import Reporter
from phmdiff_cli.engine.run_folder import RunFolder
from phmdiff_cli.engine.settings import TrainSettings, auto_spacing, build_model_config, with_model_overrides
from phmdiff_cli.engine.train_data import TrainData, load_data, slice_dataset, training_contrast, training_domain
from phmdiff_cli.engine.validation import Validation, fixed_subset, validate, write_preview
from phmdiff_cli.errors import EXIT_INTERNAL, InputError, PhmdiffError
from phmdiff_cli.jsonsafe import finite
from phmdiff_cli.models import PHMDiff

__all__ = ["RunState", "TrainResult", "optimizer_step", "run_model_config", "train"]


@dataclass
class RunState:
    """Progress of a run, saved in every checkpoint.

    Attributes:
        step: optimizer steps done.
        elapsed_s: wall-clock seconds of training so far, over all sessions.
        finetune_from: step where the unmasked fine-tune began (None: not yet).
        best_ssim, best_step: best mean validation SSIM and its step.
        val: the latest validation metrics (``{"pairs": ..., "mean": ..., "step": ...}``).
        skipped_steps: fp16 steps the loss scaler skipped (inf/NaN gradients; the scale is then halved).
    """

    step: int = 0
    elapsed_s: float = 0.0
    finetune_from: int | None = None
    best_ssim: float | None = None
    best_step: int | None = None
    val: dict[str, Any] | None = None
    skipped_steps: int = 0


@dataclass
class TrainResult:
    """How a run ended: its folder, its state, the signal that stopped it (None: budget reached), and whether
    this process is rank 0 (the one that reports)."""

    run: Path
    state: RunState
    signal: int | None = None
    main: bool = True


##################################################################################
#                                    Helpers                                     #
##################################################################################


def _git_commit() -> str | None:
    """The git commit of the phmdiff source tree, if it is a checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def optimizer_step(
    loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip: float
) -> tuple[Tensor | None, bool]:
    """Backward and one optimizer step through the loss ``scaler`` (a pass-through unless fp16), the gradient
    norm clipped to ``clip`` (0: not clipped).

    Returns:
        ``(norm, skipped)``: the gradient norm before clipping (detached; None without clipping), and whether
        the scaler skipped the step (an inf or NaN gradient: fp16 overflow; the scale is then lowered).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    norm = None
    if clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).detach()
    scale = scaler.get_scale() if scaler.is_enabled() else None  # a host sync: enabled for fp16 only
    scaler.step(optimizer)
    scaler.update()
    return norm, scale is not None and scaler.get_scale() < scale


def _step_seed(seed: int, rank: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _Objective(nn.Module):
    """The training loss as a module, so that DDP's forward hooks see every step.

    Unmasked steps (the fine-tune) leave the mask token out of the graph; DDP would then wait for its gradient
    forever unless told to search for unused parameters every step. As in MaskDiT, the token joins the loss with
    weight 0 instead: every parameter gets a gradient at every step, masked or not, and one DDP wrapper serves
    the whole run."""

    def __init__(self, model: PHMDiff) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: dict[str, Tensor], mask_ratio: float | None, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, logs = training_loss(self.model, batch, mask_ratio=mask_ratio, generator=generator)
        return loss + 0.0 * unwrap_model(self.model).mask_token.sum(), logs


@contextmanager
def _stop_on_signals(stop: list[int]) -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into a request (``stop`` gets the signal number) to save and exit after
    the current step; a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


##################################################################################
#                                    Trainer                                     #
##################################################################################


@dataclass
class _Clock:
    """Wall-clock bookkeeping of one session."""

    start: float = field(default_factory=time.monotonic)
    offset: float = 0.0  # elapsed seconds of earlier sessions
    last_checkpoint: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return self.offset + time.monotonic() - self.start


@dataclass
class _Meter:
    """Training speed over a log interval, not counting validation and checkpoint time."""

    steps: int = 0
    start: float = field(default_factory=time.monotonic)
    overhead: float = 0.0

    def rate(self) -> float:
        """Steps per second."""
        seconds = time.monotonic() - self.start - self.overhead
        return self.steps / seconds if seconds > 0 else 0.0


class Trainer:
    """One process's training session (see the module docstring).

    Args:
        settings: resolved settings. config: the model configuration. data: the checked dataset.
        run: the run folder (rank 0 writes there). info, device: process and device.
        console: where rank 0 prints (stderr). quiet: no progress display.
    """

    def __init__(
        self,
        settings: TrainSettings,
        config: ModelConfig,
        data: TrainData,
        run: RunFolder,
        info: distributed.DistInfo,
        device: torch.device,
        console: Console,
        quiet: bool,
    ) -> None:
        self.settings, self.config, self.data, self.run = settings, config, data, run
        self.info, self.device, self.console, self.quiet = info, device, console, quiet
        self.dtype = resolve_precision(settings.precision, device)
        self.backends = configure_backends(device)
        self.state = RunState()
        self.cache = Path(settings.cache_dir) if settings.cache_dir else run.cache
        torch.manual_seed(settings.seed)  # the initial weights
        self.model = PHMDiff(config).to(device)
        self.ema = EMA(self.model, settings.ema_decay) if info.is_main else None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.scaler = grad_scaler(device, self.dtype)
        self.generator = torch.Generator(device=device)
        self.train_set: SliceDataset | None = None
        self.val_set: SliceDataset | None = None
        self.val_keys: list[tuple[int, int, int]] = []
        self.commit = _git_commit() if info.is_main else None
        #: the step of the newest checkpoint (None: none yet).
        self.saved_step: int | None = None
        #: what an ``--init`` run started from (:func:`init_lineage`), for the model card.
        self.lineage: dict[str, Any] | None = None
        #: the training sources measured (:func:`training_domain`), for the model card; measured once.
        self.domain: dict[str, Any] | None = None
        self.contrast: dict[str, float] = {}

    # ------------------------------------------------------------------ setup

    def start_from(self, initial: Pretrained) -> None:
        """Initial weights from a trained model of the same config (``--init``), a conditioning added by the run's
        config (``skull_condition``) left at its zero start; the EMA starts from them."""
        missing, unexpected = self.model.load_state_dict(initial.model.state_dict(), strict=False)
        if unexpected or any(not key.startswith("skull_embed.") for key in missing):
            raise PhmdiffError(f"{initial.path}: the model does not match the run's config",
                               hint=f"missing {missing}, unexpected {unexpected}")
        if self.ema is not None:
            self.ema = EMA(self.model, self.settings.ema_decay)

    def prepare_data(self) -> None:
        """Preprocess the data into the cache: rank 0 first, then the others read it."""
        if self.info.is_main:
            self._datasets()
        distributed.barrier(self.info)
        if not self.info.is_main:
            self._datasets()

    def _datasets(self) -> None:
        """The training slices, and on rank 0 the validation slices and their fixed subset."""
        main = self.info.is_main
        show = self.console if main else None
        progress = main and not self.quiet and self.console.is_terminal
        common = {"settings": self.settings, "config": self.config, "cache": self.cache, "progress": progress}
        self.train_set = slice_dataset(
            self.data, self.data.train_ids, augment=self.settings.augment, console=show, **common
        )
        if main and self.data.val_ids:
            self.val_set = slice_dataset(self.data, self.data.val_ids, augment=False, console=show, **common)
            self.val_keys = fixed_subset(self.val_set, self.settings.val_slices)

    def restore(self) -> None:
        """Load the run's checkpoint, if it has one.

        Raises:
            InputError: the checkpoint was made with another number of processes or batch size.
        """
        if not (self.run.state / "LATEST").is_file():
            return
        saved = load_training_state(self.run.state, device=self.device)
        extra = saved.extra
        for key, now in (("world_size", self.info.world_size), ("batch_size", self.settings.batch_size)):
            if extra[key] != now:
                raise InputError(
                    f"the checkpoint was made with {key} {extra[key]}, not {now}",
                    path=saved.path,
                    hint="resume with the same number of processes and batch size",
                )
        self.model.load_state_dict(saved.model)
        if self.ema is not None and saved.ema is not None:
            self.ema.load_state_dict(saved.ema, int(extra["ema_updates"]))
        self.optimizer.load_state_dict(saved.optimizer_state)
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(extra["torch_rng"])
        self.state = RunState(**extra["run"])
        self.saved_step = self.state.step

    # ------------------------------------------------------------------ loop

    def _loader(self) -> Iterator[dict[str, Tensor]]:
        assert self.train_set is not None
        workers = self.settings.num_workers
        if workers is None:  # CPU training needs every core for the model; a GPU needs its data fed
            workers = (
                0 if self.device.type == "cpu" else min(8, (os.cpu_count() or 2) // self.info.world_size)
            )
        sampler = self.train_set.sampler(
            seed=self.settings.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
            start=self.state.step * self.settings.batch_size,
        )
        loader = torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.settings.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def _planned_finetune(self) -> int | None:
        budget = self.settings.step_budget
        if budget is None or self.settings.finetune_fraction <= 0:
            return None
        return round(budget * (1.0 - self.settings.finetune_fraction))

    def fit(self) -> TrainResult:
        """Train until the budget is reached or a signal asks to stop; checkpoint and validate on the way."""
        s, state = self.settings, self.state
        objective = self._wrap(_Objective(compile_model(self.model) if s.compile else self.model))
        clock, meter = _Clock(offset=state.elapsed_s), _Meter()
        budget, minutes, planned = s.step_budget, s.minutes, self._planned_finetune()
        batches = self._loader()
        sums: dict[str, Tensor] = {}
        stop: list[int] = []
        reporter = Reporter(
            self.console,
            quiet=self.quiet or not self.info.is_main,
            total=budget,
            minutes=minutes,
            start=state.step,
        )
        with _stop_on_signals(stop), reporter:
            while budget is None or state.step < budget:
                # the largest clock of all ranks: every rank stops, switches phase and sets the LR alike
                elapsed, halt = distributed.all_max([clock.elapsed(), float(bool(stop))], self.info)
                time_up = minutes is not None and elapsed >= minutes * 60
                finetune_time = minutes is not None and elapsed >= (1 - s.finetune_fraction) * minutes * 60
                if halt or time_up:
                    break
                if (
                    state.finetune_from is None
                    and s.finetune_fraction > 0
                    and (finetune_time or (planned is not None and state.step >= planned))
                ):
                    state.finetune_from = state.step
                    self.say(f"Step {state.step}: unmasked fine-tune from here on")
                logs = self._step(objective, next(batches), s.progress(state.step, elapsed))
                state.step += 1
                meter.steps += 1
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0) + value
                reporter.advance(state.step)
                if state.step % s.log_every == 0:
                    self._log_interval(sums, meter, clock, reporter)
                    sums, meter = {}, _Meter()
                paused = time.monotonic()
                if self.val_set is not None and state.step % s.val_every == 0:
                    self._validate(clock)
                if (
                    state.step % s.checkpoint_every == 0
                    or time.monotonic() - clock.last_checkpoint >= s.checkpoint_minutes * 60
                ):
                    self._checkpoint(clock)
                meter.overhead += time.monotonic() - paused  # not training time
        signum = stop[0] if stop else None
        final_val = signum is None and self.val_set is not None and (state.val or {}).get("step") != state.step
        if final_val:
            self._validate(clock)
        if final_val or self.saved_step != state.step:  # last/'s card then has the final step's metrics
            self._checkpoint(clock)
        # The other ranks wait for rank 0's last validation and checkpoint: a rank that leaves the process
        # group while rank 0 still works has been seen to abort in gloo's teardown.
        distributed.barrier(self.info)
        return TrainResult(self.run.root, state, signum, self.info.is_main)

    def _wrap(self, loss_module: _Objective) -> nn.Module:
        """The loss module, DDP-wrapped with several processes (every parameter has a gradient at every step:
        see :class:`_Objective`)."""
        if not self.info.enabled:
            return loss_module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(loss_module, device_ids=ids)

    def _step(self, objective: nn.Module, batch: dict[str, Tensor], progress: float) -> dict[str, Tensor]:
        """One optimizer step at budget fraction ``progress``; returns detached per-step scalars (no device
        sync)."""
        s, step = self.settings, self.state.step
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr_at(step, progress)
        self.generator.manual_seed(_step_seed(s.seed, self.info.rank, step))
        finetune = self.state.finetune_from is not None and step >= self.state.finetune_from
        self.model.train()
        with autocast(self.device, self.dtype):
            loss, logs = objective(batch, 0.0 if finetune else None, self.generator)
        norm, skipped = optimizer_step(loss, self.model, self.optimizer, self.scaler, s.clip_norm(self.dtype))
        if norm is not None:
            logs["grad_norm"] = norm
        self.state.skipped_steps += skipped
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss.detach().float(), **{k: v.float() for k, v in logs.items()}}

    # ------------------------------------------------------------------ logging, validation, checkpoints

    def say(self, text: str) -> None:
        """Print an informational line (rank 0, not with --quiet)."""
        if self.info.is_main and not self.quiet:
            self.console.print(text, soft_wrap=True)

    def _log_interval(
        self, sums: dict[str, Tensor], meter: _Meter, clock: _Clock, reporter: Reporter
    ) -> None:
        """Average the interval's scalars over steps and processes; log them (rank 0); stop on NaN."""
        keys = sorted(sums)
        values = torch.stack([sums[k] for k in keys]) / meter.steps
        values = distributed.mean(values, self.info).tolist()
        record = dict(zip(keys, values, strict=True))
        if not math.isfinite(record["loss"]):
            raise PhmdiffError(
                f"training diverged: the loss is {record['loss']} at step {self.state.step}",
                hint="lower --lr or use --precision fp32, then restart or --resume from the last checkpoint",
                exit_code=EXIT_INTERNAL,
            )
        rate = meter.rate()
        images_per_s = rate * self.settings.batch_size * self.info.world_size
        reporter.update(
            self.state.step,
            loss=record["loss"],
            images_per_s=images_per_s,
            steps_per_s=rate,
            elapsed=clock.elapsed(),
        )
        if self.info.is_main:
            finetune = self.state.finetune_from is not None
            self.run.log(
                {
                    "step": self.state.step,
                    "elapsed_s": round(clock.elapsed(), 3),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "img_per_s": round(images_per_s, 3),
                    "phase": "finetune" if finetune else "masked",
                    **({"skipped_steps": self.state.skipped_steps} if self.scaler.is_enabled() else {}),
                    **(compile_stats() if self.settings.compile else {}),
                    **finite(record),
                }
            )

    def _validate(self, clock: _Clock) -> None:
        """Rank 0: validation of the EMA weights, the preview PNG, a log line, and best/ on a new best."""
        if not self.info.is_main or self.val_set is None or self.ema is None:
            return
        s, state = self.settings, self.state
        steps = [s.val_steps] * self.config.levels if s.val_steps else list(self.config.sampling.steps)
        sampler = s.val_sampler or self.config.sampling.sampler
        result: Validation = validate(
            self.ema.module,
            self.val_set,
            self.val_keys,
            steps=steps,
            sampler=sampler,
            batch_size=2 * s.batch_size,
            device=self.device,
            dtype=self.dtype,
            seed=s.seed,
        )
        preview = self.run.samples / f"step-{state.step:07d}.png"
        self.run.samples.mkdir(exist_ok=True)
        write_preview(preview, result.preview)
        state.val = finite(
            {"step": state.step, "mean": result.mean, "pairs": result.pairs, "subjects": result.subjects}
        )
        ssim = result.mean["ssim"]
        best = math.isfinite(ssim) and (state.best_ssim is None or ssim > state.best_ssim)
        if best:
            state.best_ssim, state.best_step = ssim, state.step
            save_model(self.run.best, self.ema.state_dict(), self._card(), force=True)
        self.run.log(
            {
                "step": state.step,
                "elapsed_s": round(clock.elapsed(), 3),
                "val": state.val,
                "sampler": {"name": sampler, "steps": steps},
                "best": best,
                "preview": str(preview.relative_to(self.run.root)),
            }
        )
        pairs = ", ".join(f"{k} {_scores(v)}" for k, v in result.pairs.items())
        subjects = ", ".join(f"{k} {_scores(v['mean'])}" for k, v in result.subjects.items())
        self.say(
            f"Step {state.step}: validation PSNR {result.mean['psnr']:.2f} dB, SSIM {ssim:.4f}, sharpness "
            f"{result.mean['sharpness']:.2f}{' [bold green]best[/]' if best else ''}\n  pairs: {pairs}\n"
            f"  subjects: {subjects}"
        )

    def _card(self) -> dict[str, Any]:
        state = self.state
        training = {
            "data": self.data.summary.to_dict(),
            "subjects": {
                "train": self.data.train_ids,
                "val": self.data.val_ids,
                "split": self.data.split_rule,
            },
            "steps": state.step,
            "elapsed_s": round(state.elapsed_s, 1),
            "finetune_from": state.finetune_from,
            "batch_size": self.settings.batch_size,
            "processes": self.info.world_size,
            "device": str(self.device),
            "precision": str(self.dtype or "fp32"),
            "seed": self.settings.seed,
            "settings": self.settings.to_dict(),
            "git_commit": self.commit,
            "command": " ".join(sys.argv),
        }
        if self.lineage is not None:  # a fine-tuned model: its whole training, the initial model's included
            training["init"] = self.lineage
            training["total_steps"] = state.step + self.lineage["steps"]
            training["total_elapsed_s"] = round(state.elapsed_s + self.lineage["elapsed_s"], 1)
        metrics = (
            {}
            if state.val is None
            else {
                "val": {**state.val["pairs"], "mean": state.val["mean"]},
                "val_subjects": state.val.get("subjects", {}),
                "val_step": state.val["step"],
            }
        )
        if self.domain is None:  # measured once, for the first card (rank 0 only writes cards)
            self.domain, self.contrast = training_domain(self.data), training_contrast(self.data)
        return build_card(self.config, self.data.pairs, training=training, metrics=metrics,
                          input_domain=self.domain, contrast=self.contrast)

    def _checkpoint(self, clock: _Clock) -> None:
        """Rank 0: the resumable state (the commit point), then ``last/`` (EMA weights + card)."""
        self.state.elapsed_s = clock.elapsed()
        clock.last_checkpoint = time.monotonic()
        self.saved_step = self.state.step
        if not self.info.is_main or self.ema is None:
            return
        extra = {
            "run": asdict(self.state),
            "ema_updates": self.ema.updates,
            "world_size": self.info.world_size,
            "batch_size": self.settings.batch_size,
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        save_training_state(
            self.run.state,
            model=self.model.state_dict(),
            ema=self.ema.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            extra=extra,
        )
        save_model(self.run.last, self.ema.state_dict(), self._card(), force=True)


##################################################################################
#                                   Entry point                                  #
##################################################################################


def _scores(metrics: dict[str, float]) -> str:
    """``PSNR/SSIM/sharpness`` of a metrics dict, compactly."""
    return f"{metrics['psnr']:.2f}/{metrics['ssim']:.3f}/{metrics.get('sharpness', math.nan):.2f}"


def _describe(trainer: Trainer) -> str:
    cfg, data, info = trainer.config, trainer.data, trainer.info
    params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    val = f"{len(data.val_ids)} ({', '.join(data.val_ids)})" if data.val_ids else "none (no validation)"
    precision = str(trainer.dtype or "fp32").replace("torch.", "")
    return (
        f"Model: PHMDiff {cfg.size}, {params:.2f} M parameters, {cfg.image_size} px at "
        f"{cfg.spacing_mm:g} mm, {cfg.levels} levels, mask ratios {list(cfg.mask_ratios)}\n"
        f"Pairs: {', '.join(map(str, data.pairs))}; subjects: {len(data.train_ids)} training, validation "
        f"{val}\nDevice: {trainer.device} ({precision}{', TF32, cuDNN autotuning' if trainer.backends else ''}), "
        f"{info.world_size} process(es), batch {trainer.settings.batch_size} per process"
    )


def run_model_config(settings: TrainSettings, data: TrainData, initial: Pretrained | None = None) -> ModelConfig:
    """The model configuration of a new run: the ``--init`` model's (with the settings' training objective and
    sampler overrides, ``model.diffusion`` / ``model.sampling``), else the settings' with the grid spacing fitted
    to the data unless given.

    Raises:
        InputError: a pair has more sources than the initial model takes.
    """
    sources = max(len(p.sources) for p in data.pairs)
    if initial is not None:
        if sources > initial.config.max_sources:
            raise InputError(
                f"a pair has {sources} sources; the --init model takes at most {initial.config.max_sources}",
                path=initial.path,
            )
        return with_model_overrides(initial.config, settings.model)
    config = build_model_config(settings, sources=sources)
    if settings.spacing is None:
        modalities = {m for p in data.pairs for m in (*p.sources, p.target)}
        config = replace(config, spacing_mm=auto_spacing(data.summary, modalities, config.image_size))
    return config


def init_lineage(initial: Pretrained) -> dict[str, Any]:
    """What a fine-tuned model started from: the initial model's path, sha256 and whole training (steps and
    seconds, its own initial model's included)."""
    training = initial.card.get("training", {})
    return {
        "model": str(initial.path),
        "sha256": initial.card.get("sha256"),
        "steps": int(training.get("total_steps", training.get("steps", 0))),
        "elapsed_s": float(training.get("total_elapsed_s", training.get("elapsed_s", 0.0))),
    }


def _new_run(
    settings: TrainSettings,
    out: Path,
    data: TrainData,
    config: ModelConfig,
    force: bool,
    lineage: dict[str, Any] | None,
) -> RunFolder:
    """Rank 0: create the run folder; save the resolved settings, model config (and ``--init`` lineage), split
    and data summary."""
    run = RunFolder.create(out, force=force)
    saved = {"settings": settings.to_dict(), "model": config.to_dict()}
    run.write_json(run.config, {**saved, "init": lineage} if lineage else saved)
    run.write_json(run.split, {"train": data.train_ids, "val": data.val_ids, "rule": data.split_rule})
    run.write_json(run.data, data.summary.to_dict())
    return run


def train(
    settings: TrainSettings,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Train (or resume) a run in folder ``out``; under ``torchrun`` each process calls this.

    Args:
        settings: resolved settings (for ``resume``: those saved in the run folder, see
            :func:`~phmdiff_cli.engine.settings.resumed_settings`).
        out: the run folder.
        resume: continue the run in ``out`` from its last checkpoint (from step 0 if it has none).
        force: start ``out`` again if it is an existing run.
        quiet: no progress display and no dataset table.
        console: where rank 0 prints (default: stderr).

    Raises:
        InputError: bad data, settings or run folder (nothing is left behind by a new run that fails before
            its first checkpoint).
    """
    console = console or Console(stderr=True, highlight=False)
    info, device = distributed.init_distributed(settings.device)
    created: Path | None = None
    initial: Pretrained | None = None
    try:
        if resume:
            run = RunFolder.open(out)
            data = load_data(settings, split=json.loads(run.split.read_text(encoding="utf-8")))
            saved = run.read_config()
            config, lineage = ModelConfig.from_dict(saved["model"]), saved.get("init")
        else:
            # The warm-up is fixed now: the step budget it derives from may change on resume.
            settings = replace(settings, warmup_steps=settings.warmup)
            data = load_data(settings)
            initial = load_pretrained(settings.init) if settings.init else None
            lineage = init_lineage(initial) if initial else None
            config = run_model_config(settings, data, initial)
            run, existed = RunFolder(Path(out)), Path(out).exists()
            if info.is_main:
                _new_run(settings, run.root, data, config, force, lineage)
                created = None if existed else run.root
            distributed.barrier(info)  # the run folder exists before any process writes its cache there
        if info.is_main and not quiet:
            console.print(data.summary.table())
        trainer = Trainer(settings, config, data, run, info, device, console, quiet)
        trainer.lineage = lineage
        if not resume and initial is not None:
            trainer.start_from(initial)
        trainer.prepare_data()
        if resume:
            trainer.restore()
            if info.is_main:
                run.truncate_log(trainer.state.step)
        trainer.say(_describe(trainer))
        trainer.say(f"Run folder: {run.root} (continue an interrupted run with --resume)")
        if resume and trainer.state.step:
            trainer.say(f"Resuming at step {trainer.state.step}")
        return trainer.fit()
    except PhmdiffError:
        if created is not None and not (created / "state").exists():
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        distributed.shutdown(info)

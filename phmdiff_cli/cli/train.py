"""`phmdiff train`: train a cross-conditioned PHMDiff model on a folder of subjects; resumable; one process or
many (``torchrun --nproc_per_node N -m phmdiff_cli train ...``)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer

from phmdiff_cli.cli.common import cli_command, console
from phmdiff_cli.errors import InputError

__all__ = ["train"]


def _default(name: str) -> str:
    """The default of a setting, for the help text (flags default to None so that explicit ones are known)."""
    from phmdiff_cli.engine.settings import TrainSettings

    value = TrainSettings.__dataclass_fields__[name].default
    return f"(default: {'auto' if value is None else value})"


def _explicit(**flags: Any) -> dict[str, Any]:
    """The flags given on the command line (the others are None)."""
    return {k: v for k, v in flags.items() if v is not None}


def _pairs(pairs: str | None, source: str | None, target: str | None) -> str | None:
    if source is None and target is None:
        return pairs
    if pairs is not None:
        raise InputError("give either --pairs or --source and --target")
    if source is None or target is None:
        raise InputError("--source and --target go together", hint="e.g. --source mr --target ct")
    return f"{source}:{target}"


@cli_command
def train(
    data: list[Path] | None = typer.Option(
        None,
        "--data",
        help="Dataset folder (BraTS 2021/2023, SynthRAD, nnU-Net "
        "layouts) or a CSV manifest (columns subject, modality, path); repeat it to train on several.",
    ),
    pairs: str | None = typer.Option(
        None,
        "--pairs",
        help="Source:target pairs, comma-separated, e.g. "
        "t1n:t2w,t1n:t2f,t2w:t2f; several sources with +, e.g. t1n+t2w:t2f.",
    ),
    source: str | None = typer.Option(None, "--source", help="Source modality (with --target: one pair)."),
    target: str | None = typer.Option(None, "--target", help="Target modality (with --source)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: checkpoints, models (best/, last/), logs."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="JSON file of settings (keys as the long flags, "
        "with _ for -; a run's train_config.json works); flags override it. "
        "YAML is not read.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out from its last checkpoint "
        "(its saved settings; only budgets, intervals and hardware flags may change).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Start the run in --out again, deleting its checkpoints."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no dataset table."),
    size: str | None = typer.Option(
        None, "--size", help=f"Model size: tiny, small, base, large. {_default('size')}"
    ),
    spacing: float | None = typer.Option(
        None,
        "--spacing",
        help="Model grid spacing in mm. (default: auto: the "
        "largest in-plane field of view of the data / the model's image size)",
    ),
    levels: int | None = typer.Option(None, "--levels", help="Pyramid levels. (default: the size's, 3)"),
    mask_ratio: float | None = typer.Option(
        None, "--mask-ratio", help="Fraction of tokens masked in training. (default: the size's, 0.5)"
    ),
    cgr_pixel: float | None = typer.Option(
        None, "--cgr-pixel", help="CGR pixel-consistency weight. (default: 0.1)"
    ),
    cgr_structure: float | None = typer.Option(
        None, "--cgr-structure", help="CGR gradient-consistency weight. (default: 0.05)"
    ),
    cgr_feature: float | None = typer.Option(
        None, "--cgr-feature", help="CGR feature-MMD weight. (default: 0.01)"
    ),
    context: int | None = typer.Option(
        None, "--context", help="Neighbouring source slices on each side (2.5D). (default: 1)"
    ),
    source_norm: str | None = typer.Option(
        None, "--source-norm", metavar="percentile|rank|foreground-rank",
        help="MRI sources as prepared (percentile) or by their rank in their volume's foreground (rank: the same "
        "for any scanner's monotone intensities; foreground-rank: the darkest foreground at -0.5, apart from "
        "the background's -1). (default: the size's)",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help=f"Slices per step and process. {_default('batch_size')}"
    ),
    lr: float | None = typer.Option(None, "--lr", help=f"AdamW learning rate. {_default('lr')}"),
    warmup_steps: int | None = typer.Option(
        None, "--warmup-steps", help="Linear LR warm-up steps. (default: min(500, max steps / 10))"
    ),
    lr_cooldown: float | None = typer.Option(
        None,
        "--lr-cooldown",
        help=f"Last fraction of the budget that decays the LR linearly to 0. {_default('lr_cooldown')}",
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Step budget of the whole run. (default: 100000 without --minutes)"
    ),
    minutes: float | None = typer.Option(
        None,
        "--minutes",
        help="Time budget of the whole run (resumed sessions included); the first budget reached stops.",
    ),
    finetune_fraction: float | None = typer.Option(
        None,
        "--finetune-fraction",
        help=f"Last fraction of the budget trained unmasked (MaskDiT). {_default('finetune_fraction')}",
    ),
    ema_decay: float | None = typer.Option(None, "--ema-decay", help=f"EMA decay. {_default('ema_decay')}"),
    grad_clip: float | None = typer.Option(
        None, "--grad-clip", help="Largest gradient norm; 0: none. (default: 1.0 in fp16, else none)"
    ),
    val_subjects: str | None = typer.Option(
        None,
        "--val-subjects",
        help="Validation subject IDs, comma-separated. (default: a seeded --val-fraction of each --data "
        "folder's subjects, at least one of each folder with two or more)",
    ),
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help=f"Fraction of subjects for validation. {_default('val_fraction')}"
    ),
    val_every: int | None = typer.Option(
        None, "--val-every", help=f"Steps between validations. {_default('val_every')}"
    ),
    val_slices: int | None = typer.Option(
        None, "--val-slices", help=f"Slices per validation subject and pair. {_default('val_slices')}"
    ),
    val_steps: int | None = typer.Option(
        None, "--val-steps", help="Sampler steps per level in validation. (default: the model's own, as its card ships)"
    ),
    val_sampler: str | None = typer.Option(
        None, "--val-sampler", help="Validation sampler: euler or heun. (default: the model's own)"
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help=f"Steps between checkpoints. {_default('checkpoint_every')}"
    ),
    checkpoint_minutes: float | None = typer.Option(
        None, "--checkpoint-minutes", help=f"Minutes between checkpoints. {_default('checkpoint_minutes')}"
    ),
    log_every: int | None = typer.Option(
        None, "--log-every", help=f"Steps between metrics.jsonl lines. {_default('log_every')}"
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Preprocessing cache. (default: RUN/cache)"
    ),
    resample: bool | None = typer.Option(
        None,
        "--resample/--no-resample",
        help="Resample sources on another grid onto the target's instead of refusing. (default: no-resample)",
    ),
    skip_incomplete: bool | None = typer.Option(
        None,
        "--skip-incomplete/--no-skip-incomplete",
        help="Train without subjects that have no complete pair instead of refusing.",
    ),
    augment: bool | None = typer.Option(
        None,
        "--augment/--no-augment",
        help="Left-right flips and source intensity jitter. (default: augment)",
    ),
    rotate: float | None = typer.Option(
        None, "--rotate", help=f"With --augment: random in-plane rotation up to this many degrees. {_default('rotate')}"
    ),
    zoom: float | None = typer.Option(
        None, "--zoom", help=f"With --augment: random in-plane zoom up to this fraction, e.g. 0.1. {_default('zoom')}"
    ),
    translate: float | None = typer.Option(
        None,
        "--translate",
        help=f"With --augment: random in-plane shift up to this many pixels of the model grid, e.g. 16. "
        f"{_default('translate')}",
    ),
    init: str | None = typer.Option(
        None,
        "--init",
        help="Start from this model's weights (shipped name, folder, run folder or hf://org/repo) instead of "
        "random ones (fine-tuning); its config is kept, so --size, --levels, --spacing, --mask-ratio, "
        "--cgr-*, --context and --source-norm are not allowed with it.",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help=f"Seed of the split, initial weights and data order. {_default('seed')}"
    ),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:N or mps. (default: auto)"
    ),
    precision: str | None = typer.Option(
        None, "--precision", help="auto, bf16, fp16 or fp32. (default: auto)"
    ),
    compile: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the Transformer blocks. (default: no-compile)"
    ),
    num_workers: int | None = typer.Option(
        None, "--num-workers", help="Data-loading processes. (default: 0 on the CPU, up to 8 on a GPU)"
    ),
) -> None:
    """Train a PHMDiff model that synthesizes each --pairs target from its sources (one shared model).

    The run folder gets train_config.json (resolved settings), split.json, metrics.jsonl (plot it), samples/
    (source | synthesized | real per validation), state/ (checkpoint), last/ and best/ (models: pass the run
    folder as --model). Ctrl-C saves a checkpoint and exits (130); --resume continues exactly where it
    stopped.
    Multi-GPU: torchrun --nproc_per_node N -m phmdiff_cli train ... (only rank 0 writes).
    """
    from phmdiff_cli.engine.run_folder import RunFolder
    from phmdiff_cli.engine.settings import load_settings, resumed_settings
    from phmdiff_cli.engine.trainer import train as run_training

    flags = _explicit(
        data=None if not data else [str(d) for d in data] if len(data) > 1 else str(data[0]),
        pairs=_pairs(pairs, source, target),
        cache_dir=None if cache_dir is None else str(cache_dir),
        val_subjects=None
        if val_subjects is None
        else [v.strip() for v in val_subjects.split(",") if v.strip()],
        val_fraction=val_fraction,
        skip_incomplete=skip_incomplete,
        resample=resample,
        augment=augment,
        rotate=rotate,
        zoom=zoom,
        translate=translate,
        init=init,
        size=size,
        spacing=spacing,
        levels=levels,
        mask_ratio=mask_ratio,
        cgr_pixel=cgr_pixel,
        cgr_structure=cgr_structure,
        cgr_feature=cgr_feature,
        context=context,
        source_norm=source_norm,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        lr_cooldown=lr_cooldown,
        max_steps=max_steps,
        minutes=minutes,
        finetune_fraction=finetune_fraction,
        ema_decay=ema_decay,
        grad_clip=grad_clip,
        val_every=val_every,
        val_slices=val_slices,
        val_steps=val_steps,
        val_sampler=val_sampler,
        checkpoint_every=checkpoint_every,
        checkpoint_minutes=checkpoint_minutes,
        log_every=log_every,
        seed=seed,
        device=device,
        precision=precision,
        compile=compile,
        num_workers=num_workers,
    )
    if resume and force:
        raise InputError("--resume and --force contradict each other", hint="--force starts the run again")
    if resume:
        if config is not None:
            raise InputError("--config cannot be used with --resume", hint="the run's own settings are used")
        run = RunFolder.open(out)
        settings = resumed_settings(run.read_config()["settings"], flags, run.config)
    else:
        settings = load_settings(config, flags)
    result = run_training(settings, out, resume=resume, force=force, quiet=quiet, console=console)
    state = result.state
    if result.signal is not None:
        name = signal.Signals(result.signal).name
        if result.main:
            console.print(
                f"Stopped by {name} at step {state.step}; checkpoint saved. Continue with: "
                f"phmdiff train --resume --out {result.run}",
                soft_wrap=True,
            )
        raise typer.Exit(128 + result.signal)
    if not result.main:
        return
    best = (
        f"best: {result.run / 'best'} (validation SSIM {state.best_ssim:.4f} at step {state.best_step}), "
        if state.best_step is not None
        else ""
    )
    console.print(
        f"Done: {state.step} steps. Models: {best}last: {result.run / 'last'}. Use them with "
        f"--model {result.run}",
        soft_wrap=True,
    )

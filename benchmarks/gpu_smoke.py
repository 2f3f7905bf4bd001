"""The first command to run on a new GPU machine: do phmdiff's CUDA paths work, and how fast are they?

One command, no download (real images from ``../shared/data`` or ``$PHMDIFF_DATA``, the shipped model), under
8 minutes on one GPU; prints a table and writes ``results/gpu_smoke.json``. Each check passes or fails:

- ``precision``: what ``--precision auto`` resolves to (bf16 from compute capability 8.0, else fp16).
- ``forward``: fp32 / bf16 / fp16 autocast outputs of every pyramid level agree within 3 % (relative L2).
- ``train-<precision>``: 30 training steps on real slices, finite losses, the last ten below the first ten;
  fp16 also reports the loss scale and the steps its scaler skipped.
- ``compile``: regional ``torch.compile`` across the masked -> unmasked switch and a partial batch: the
  compilations (a first compile and the recompiles, within the limit, never a silent fall back) and the speed
  against eager.
- ``synthesize``: a whole real volume with a partial last batch, timed with ``torch.cuda.synchronize`` (the
  GPU runs asynchronously), with ``max_memory_allocated``.
- ``oom-backoff``: a real out-of-memory error (the GPU's memory capped for the process) that the synthesizer's
  back-off survives by halving its batch.
- ``resume``: 2 + 2 resumed steps against 4 straight ones (``phmdiff train``): bit for bit on the CPU; on CUDA
  within 1e-3 of the weights' scale (cuDNN and atomics-based kernels are not bit-exact run to run).
- ``workers``: resident memory of 8 data-loader workers after 64 batches (the bounded source cache).

Without CUDA it says so, runs the parts a CPU can check (``tiny`` model, the OOM injected rather than real,
compile through Dynamo's eager backend: recompiles only) and exits 0.

    python benchmarks/gpu_smoke.py                 # writes benchmarks/results/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from engine_speed import DATA, ROOT, machine

from phmdiff_cli.config import model_config
from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.layouts import discover
from phmdiff_cli.data.slices import SliceDataset, parse_pairs
from phmdiff_cli.diffusion import training_loss
from phmdiff_cli.diffusion.edm import denoise
from phmdiff_cli.diffusion.pyramid import image_pyramid
from phmdiff_cli.engine import synthesizer
from phmdiff_cli.engine.checkpoint import load_model
from phmdiff_cli.engine.device import (
    autocast,
    compile_model,
    compile_stats,
    configure_backends,
    grad_scaler,
    resolve_precision,
)
from phmdiff_cli.engine.hub import DEFAULT_MODEL
from phmdiff_cli.engine.pretrained import load_pretrained
from phmdiff_cli.engine.trainer import optimizer_step
from phmdiff_cli.io import read_volume
from phmdiff_cli.models import PHMDiff

RESULTS = ROOT / "benchmarks" / "results" / "gpu_smoke.json"
BRATS = DATA / "brats"
SUBJECTS = ("BraTS-GLI-00001-000", "BraTS-MET-00110-000")
PAIRS = "t1n:t2w,t2w:t2f"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Largest relative L2 difference of a half-precision forward from fp32's.
FORWARD_TOLERANCE = 0.03
#: Largest |resumed - straight| weight difference over the weights' max |value| on CUDA.
RESUME_TOLERANCE = 1e-3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall-clock seconds, the GPU's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def slices_of(size: str, cache: Path) -> SliceDataset:
    """Two real BraTS subjects on the size's grid (240 px at 1 mm, or ``tiny``'s 64 px at 3.75 mm)."""
    cfg = model_config(size)
    spacing = 1.0 if cfg.image_size == 240 else 3.75
    subjects = [discover(BRATS).subject(sid) for sid in SUBJECTS]
    return SliceDataset(subjects, parse_pairs(PAIRS), ModelGrid(cfg.image_size, spacing), cache,
                        k=cfg.context, slots=cfg.max_sources, source_norm=cfg.source_norm)


def batches(dataset: SliceDataset, size: int, device: torch.device, workers: int = 0) -> Iterator[dict]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=size, sampler=dataset.sampler(seed=0),
                                         num_workers=workers)
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def perturbed_model(size: str, device: torch.device) -> PHMDiff:
    """Random weights moved off DiT's zero initialisation (whose zero outputs would agree trivially)."""
    torch.manual_seed(0)
    model = PHMDiff(model_config(size)).to(device)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


def check_forward(args: argparse.Namespace, dataset: SliceDataset) -> dict[str, Any]:
    model, cfg = perturbed_model(args.size, args.device), model_config(args.size)
    batch = next(batches(dataset, 4, args.device))
    sources, targets = image_pyramid(batch["source"], cfg.levels), image_pyramid(batch["target"], cfg.levels)
    sigma = torch.full((4,), 1.0, device=args.device)
    levels: dict[str, dict[str, float]] = {}
    for level in range(cfg.levels):
        coarse = None if level == 0 else torch.nn.functional.interpolate(targets[level - 1], scale_factor=2)
        outs = {}
        for name in args.precisions:
            with torch.no_grad(), autocast(args.device, PRECISIONS[name]):
                outs[name] = denoise(model, targets[level], sigma, sources[level], coarse, batch["src_mod"],
                                     batch["tgt_mod"], level=level).float()
        ref = outs["fp32"]
        levels[str(level)] = {n: float((o - ref).norm() / ref.norm()) for n, o in outs.items() if n != "fp32"}
    worst = max((e for lv in levels.values() for e in lv.values()), default=0.0)
    return {"ok": worst <= FORWARD_TOLERANCE, "relative_l2": levels, "tolerance": FORWARD_TOLERANCE}


def check_training(args: argparse.Namespace, dataset: SliceDataset, name: str) -> dict[str, Any]:
    dtype = PRECISIONS[name]
    torch.manual_seed(0)
    model = PHMDiff(model_config(args.size)).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    scaler = grad_scaler(args.device, dtype)
    clip = 1.0 if dtype == torch.float16 else 0.0
    losses, skipped = [], 0
    stream = batches(dataset, args.batch, args.device)

    def steps() -> None:
        nonlocal skipped
        for _ in range(args.steps):
            with autocast(args.device, dtype):
                loss, _ = training_loss(model, next(stream))
            losses.append(loss.detach().float())
            skipped += optimizer_step(loss, model, optimizer, scaler, clip)[1]

    _, seconds = timed(args.device, steps)
    values = torch.stack(losses).cpu().numpy()
    first, last = float(values[:10].mean()), float(values[-10:].mean())
    report = {"ok": bool(np.isfinite(values).all() and last < first), "first10": first, "last10": last,
              "s_per_step": seconds / args.steps}
    if scaler.is_enabled():
        report.update(loss_scale=scaler.get_scale(), skipped_steps=skipped)
    return report


def train_step(model: PHMDiff, batch: dict, ratio: float | None, n: int, args: argparse.Namespace) -> None:
    """Forward and backward of the first ``n`` samples of ``batch`` at mask ratio ``ratio`` (no update)."""
    with autocast(args.device, args.dtype):
        loss = training_loss(model, {k: v[:n] for k, v in batch.items()}, mask_ratio=ratio)[0]
    loss.backward()


def check_compile(args: argparse.Namespace, dataset: SliceDataset) -> dict[str, Any]:
    """Masked steps, unmasked steps, then a partial batch; eager first, then compiled, same data."""
    import torch._dynamo

    backend = "inductor" if args.cuda else "eager"  # on a CPU, Dynamo's guards only: inductor takes minutes
    report: dict[str, Any] = {"backend": backend}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = PHMDiff(model_config(args.size)).to(args.device).train()
        if compiled:
            compile_model(model, backend=backend)
        stream = batches(dataset, args.batch, args.device)
        times = []
        for ratio, n in ((None, args.batch), (0.0, args.batch), (0.0, args.batch - 1)):  # masked, unmasked, partial
            for _ in range(3):  # the first calls of a phase compile
                train_step(model, next(stream), ratio, n, args)
            batch = next(stream)
            times.append(timed(args.device, lambda b=batch, r=ratio, n=n, m=model: train_step(m, b, r, n, args))[1])
        report["compiled" if compiled else "eager"] = {"s_per_step": times}
    report.update(compile_stats())
    speed = [e / c for e, c in zip(report["eager"]["s_per_step"], report["compiled"]["s_per_step"], strict=True)]
    report.update(speedup=speed, ok=report["compilations"] <= 1 + torch._dynamo.config.recompile_limit)
    torch._dynamo.reset()
    return report


def check_synthesize(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped model on the example volume, batch size chosen so the last batch is partial."""
    pretrained = load_pretrained(args.model, device=args.device)
    volume = read_volume(ROOT / "examples" / "TCGA-DU-7294-t1n.nii.gz")
    volume.modality = "t1n"
    settings = synthesizer.SynthesisSettings(batch_size=args.synth_batch)
    synth = synthesizer.Synthesizer(pretrained, args.device, args.dtype, settings)
    if args.cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    result, seconds = timed(args.device, lambda: synth.run([volume], "t2w"))
    sampled = result.slices - result.skipped
    report = {"ok": result.image.array.shape == volume.array.shape and sampled % args.synth_batch > 0,
              "seconds": seconds, "slices_sampled": sampled, "batch": args.synth_batch,
              "last_batch": sampled % args.synth_batch}
    if args.cuda:
        report["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30
    return report


def check_oom(args: argparse.Namespace) -> dict[str, Any]:
    """A batch too large for the memory allowed: the synthesizer must halve it and finish."""
    pretrained = load_pretrained(args.model, device=args.device)
    volume = read_volume(ROOT / "examples" / "TCGA-DU-7294-t1n.nii.gz")
    volume.modality = "t1n"
    synth = synthesizer.Synthesizer(pretrained, args.device, args.dtype, synthesizer.SynthesisSettings(batch_size=64))
    real = synth._sample_batch
    if args.cuda:  # a real OOM: cap this process at what about 8 slices need
        per_slice = synthesizer.slice_bytes(pretrained)
        total = torch.cuda.get_device_properties(args.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + 8 * per_slice)
                                                       / total), args.device)
    else:  # injected: the CPU has no allocator limit to hit
        def sample_batch(volumes: Any, pair: Any, z: np.ndarray) -> Any:
            if len(z) > 8:
                raise torch.OutOfMemoryError("injected: out of memory")
            return real(volumes, pair, z)

        synth._sample_batch = sample_batch  # type: ignore[method-assign]
    try:
        result = synth.run([volume], "t2w")
        return {"ok": result.image.array.shape == volume.array.shape, "batch_after": synth.batch_size,
                "real_oom": args.cuda}
    finally:
        if args.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, args.device)


def train_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "phmdiff_cli", "train", *args], check=True, cwd=ROOT)


def check_resume(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    common = ["--data", str(BRATS), "--pairs", "t1n:t2w", "--size", args.size, "--batch-size", "4",
              "--val-fraction", "0", "--device", args.device.type, "--precision", args.precision,
              "--cache-dir", str(work / "cache"), "-q"]
    train_cli(*common, "--out", str(work / "straight"), "--max-steps", "4")
    train_cli(*common, "--out", str(work / "resumed"), "--max-steps", "2")
    train_cli("--resume", "--out", str(work / "resumed"), "--max-steps", "4", "-q")
    straight, _ = load_model(work / "straight" / "last")
    resumed, _ = load_model(work / "resumed" / "last")
    scale = max(float(t.abs().max()) for t in straight.values() if t.is_floating_point())
    diff = max(float((straight[k] - resumed[k]).abs().max()) for k in straight if straight[k].is_floating_point())
    tolerance = RESUME_TOLERANCE * scale if args.cuda else 0.0
    return {"ok": diff <= tolerance, "max_abs_diff": diff, "tolerance": tolerance}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def check_workers(args: argparse.Namespace, dataset: SliceDataset) -> dict[str, Any]:
    """8 workers over the training slices; their resident memory after 64 batches."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=dataset.sampler(seed=0),
                                         num_workers=8, persistent_workers=True)
    stream = iter(loader)
    for _ in range(64):
        next(stream)
    children = [int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
    rss = [rss_mib(pid) for pid in children]
    del stream, loader
    from phmdiff_cli.data.slices import SOURCE_CACHE_BYTES

    bound = SOURCE_CACHE_BYTES / 2**20 + 1024  # the cache, plus torch and numpy's own
    return {"ok": bool(rss) and max(rss) <= bound, "workers": len(rss), "max_rss_mib": max(rss, default=0.0),
            "bound_mib": bound}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", default=str(ROOT / "weights" / DEFAULT_MODEL))
    args = parser.parse_args()
    args.cuda = torch.cuda.is_available()
    args.device = torch.device("cuda" if args.cuda else "cpu")
    args.size = "small" if args.cuda else "tiny"
    args.precision = "auto"
    args.dtype = resolve_precision("auto", args.device)
    args.precisions = ["fp32", "bf16", "fp16"] if args.cuda else ["fp32", "bf16"]
    args.batch, args.steps, args.synth_batch = (8, 30, 12) if args.cuda else (4, 30, 4)
    return args


def main() -> None:
    args = parse_args()
    info: dict[str, Any] = {**machine(), "cuda": args.cuda, "backends": configure_backends(args.device)}
    if args.cuda:
        props = torch.cuda.get_device_properties(args.device)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(args.device)),
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        print("# no CUDA device: running the CPU-checkable parts (tiny model, injected OOM, eager-backend compile)")
    report: dict[str, Any] = {"machine": info, "checks": {}}
    report["checks"]["precision"] = {"ok": True, "auto": str(args.dtype)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = slices_of(args.size, work / "cache")
        checks: dict[str, Callable[[], dict[str, Any]]] = {
            "forward": lambda: check_forward(args, dataset),
            **{f"train-{p}": (lambda p=p: check_training(args, dataset, p)) for p in args.precisions},
            "compile": lambda: check_compile(args, dataset),
            "synthesize": lambda: check_synthesize(args),
            "oom-backoff": lambda: check_oom(args),
            "resume": lambda: check_resume(args, work),
            "workers": lambda: check_workers(args, dataset),
        }
        for name, check in checks.items():
            began = time.perf_counter()
            try:
                report["checks"][name] = check()
            except Exception as error:  # noqa: BLE001 - a failed check is reported, the others still run
                report["checks"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            report["checks"][name]["check_s"] = round(time.perf_counter() - began, 1)
            print(f"# {name}: {'ok' if report['checks'][name]['ok'] else 'FAILED'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print("\n| check | ok | details |\n|---|---|---|")
    for name, result in report["checks"].items():
        details = ", ".join(f"{k} {v}" for k, v in result.items() if k != "ok")
        print(f"| {name} | {'yes' if result['ok'] else '**no**'} | {details} |")
    print(f"\nwrote {args.out}")
    sys.exit(0 if all(r["ok"] for r in report["checks"].values()) else 1)


if __name__ == "__main__":
    main()

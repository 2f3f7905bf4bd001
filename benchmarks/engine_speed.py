"""Engine speed: training images/s and sampling slice-evaluations/s of PHMDiff against its baselines.

On 240 x 240 BraTS slices (t1n + t2w -> t2f, +-1 neighbour slices), at a matched parameter count:

- ``phmdiff``          PHMDiff ``small`` with its default masking (0.5 per level), all 3 levels per step;
- ``phmdiff-unmasked`` the same model and step with mask_ratio = 0 (the fine-tune phase);
- ``phmdiff-mask0.75`` the same with 75 % of the tokens masked at every level;
- ``dit-plain``        the same Transformer without pyramid or masking (one level, the patch size of
                       PHMDiff's finest level), EDM loss;
- ``monai-unet``       MONAI ``DiffusionModelUNet`` + ``DDPMScheduler``, sources concatenated as input
                       channels, epsilon-prediction MSE.

Each in fp32 and bf16 autocast, eager (and torch.compile for PHMDiff). MFU is model FLOPs (counted with
``torch.utils.flop_counter``) per second over a measured matmul peak of the same dtype. "Slice-evaluations/s"
counts one denoiser evaluation of one slice (for PHMDiff: at one pyramid level); "s/slice" multiplies by the
evaluations a full sample needs (PHMDiff: its default sampler and steps per level; dit-plain: Heun 18 steps;
MONAI: DDPM 1000 steps).

    python benchmarks/engine_speed.py --quick     # < 10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from phmdiff_cli.config import SamplingConfig, model_config
from phmdiff_cli.data.normalize import fit_intensity, to_model_range
from phmdiff_cli.diffusion import training_loss
from phmdiff_cli.diffusion.edm import denoise
from phmdiff_cli.diffusion.pyramid import image_pyramid
from phmdiff_cli.engine.device import autocast, compile_model, cpu_has_amx, resolve_precision
from phmdiff_cli.engine.pretrained import Pretrained, load_pretrained
from phmdiff_cli.modalities import modality_id
from phmdiff_cli.models import PHMDiff

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PHMDIFF_DATA", ROOT.parent / "shared" / "data"))
SOURCES, TARGET = ("t1n", "t2w"), "t2f"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def machine() -> dict[str, object]:
    """CPU model, cores, threads, torch version, AMX, load average (others may share the CPU)."""
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx": cpu_has_amx(),
            "load_avg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def cpu_model(model: str) -> tuple[dict[str, object], torch.device, torch.dtype | None, Pretrained]:
    """A trained model loaded on the CPU with ``--precision auto``'s dtype, and the machine (printed as a header
    line): what the benchmarks that run the shipped model start with."""
    info, device = machine(), torch.device("cpu")
    dtype = resolve_precision("auto", device)
    print(f"# {info['cpu']}, {info['cores']} cores, precision {dtype}, model {model}", flush=True)
    return info, device, dtype, load_pretrained(model, device)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an n x n x n matrix product in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _sync() -> None:
    """Wait for queued GPU work (kernels run asynchronously: without it a timing ends before they do)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def seconds_per_call(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Fastest of ``iters`` calls after ``warmup`` calls: the minimum, not the median, because other jobs
    share this CPU and only ever make a call slower."""
    for _ in range(warmup):
        fn()
    return min(_timed(fn) for _ in range(iters))


def flops_of(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def brats_batch(batch: int, max_sources: int) -> dict[str, torch.Tensor]:
    """``batch`` axial 240 x 240 slices of one BraTS subject in the model range."""
    folder = DATA / "brats" / "BraTS-GLI-00001-000"

    def volume(modality: str) -> torch.Tensor:
        array = np.asarray(nib.load(folder / f"{folder.name}-{modality}.nii.gz").dataobj, np.float32)
        array = np.clip(array, 0, None)
        return torch.from_numpy(to_model_range(array, fit_intensity(array, modality))).permute(2, 0, 1)

    vols = {m: volume(m) for m in (*SOURCES, TARGET)}
    zs = torch.linspace(50, 110, batch).long()
    source = torch.zeros(batch, max_sources, 3, 240, 240)
    for slot, m in enumerate(SOURCES):
        source[:, slot] = torch.stack([vols[m][zs + dz] for dz in (-1, 0, 1)], dim=1)
    src_mod = torch.zeros(batch, max_sources, dtype=torch.long)
    src_mod[:, : len(SOURCES)] = torch.tensor([modality_id(m) for m in SOURCES])
    return {"source": source, "src_mod": src_mod, "tgt_mod": torch.full((batch,), modality_id(TARGET)),
            "target": vols[TARGET][zs].unsqueeze(1).contiguous()}


class Case:
    """One model under test: a training step, one denoiser evaluation, and evaluations per sampled slice."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.name, self.model, self.batch = name, model, batch
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.params = sum(p.numel() for p in model.parameters())

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self) -> None:
        raise NotImplementedError

    evals_per_slice = 1

    def train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()


class PHMDiffCase(Case):
    def __init__(self, name: str, model: PHMDiff, batch: dict[str, torch.Tensor],
                 mask_ratio: float | None) -> None:
        super().__init__(name, model, batch)
        self.mask_ratio = mask_ratio
        cfg = model.config
        self.sources = image_pyramid(batch["source"], cfg.levels)
        self.coarses = [None] + [torch.zeros(len(batch["target"]), 1, cfg.level_size(lv), cfg.level_size(lv))
                                 for lv in range(1, cfg.levels)]
        # Denoiser evaluations per level of the config's default sampler: Euler one per step, Heun 2 * steps - 1.
        per_level = [s if cfg.sampling.sampler == "euler" else 2 * s - 1 for s in cfg.sampling.steps]
        self.evals_per_slice = sum(per_level)
        self.eval_weights = [n / sum(per_level) for n in per_level]

    def loss(self) -> torch.Tensor:
        return training_loss(self.model, self.batch, mask_ratio=self.mask_ratio)[0]

    def evaluate(self) -> None:
        """One evaluation per level, so the average cost per evaluation is weighted later by the step
        counts."""
        b = self.batch
        with torch.no_grad():
            for level, (src, coarse) in enumerate(zip(self.sources, self.coarses, strict=True)):
                x = torch.randn(len(b["target"]), 1, *src.shape[-2:])
                denoise(self.model, x, torch.full((len(x),), 1.0), src, coarse, b["src_mod"], b["tgt_mod"],
                        level=level)


class UNetCase(Case):
    """MONAI DiffusionModelUNet, DDPM epsilon prediction, sources as extra input channels."""

    evals_per_slice = 1000

    def __init__(self, name: str, batch: dict[str, torch.Tensor]) -> None:
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDPMScheduler

        in_channels = 1 + batch["source"].shape[1] * batch["source"].shape[2]
        model = DiffusionModelUNet(spatial_dims=2, in_channels=in_channels, out_channels=1,
                                   channels=(64, 128, 256), attention_levels=(False, False, True),
                                   num_res_blocks=1, num_head_channels=64)
        super().__init__(name, model.to(memory_format=torch.channels_last), batch)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.cond = batch["source"].flatten(1, 2)

    def loss(self) -> torch.Tensor:
        target = self.batch["target"]
        noise = torch.randn_like(target)
        t = torch.randint(0, 1000, (len(target),))
        x = torch.cat([self.scheduler.add_noise(target, noise, t), self.cond], dim=1)
        out = self.model(x.contiguous(memory_format=torch.channels_last), timesteps=t)
        return F.mse_loss(out.float(), noise)

    def evaluate(self) -> None:
        target = self.batch["target"]
        x = torch.cat([torch.randn_like(target), self.cond], dim=1)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            self.model(x, timesteps=torch.full((len(target),), 500))


def build_cases(batch: dict[str, torch.Tensor], unet_batch: dict[str, torch.Tensor]) -> list[Case]:
    torch.manual_seed(0)
    small = model_config("small")
    phmdiff = PHMDiff(small)
    plain_cfg = model_config("small", levels=1, patch_sizes=(small.patch_sizes[-1],), mask_ratios=(0.0,),
                             sampling=SamplingConfig(steps=(18,)))
    return [PHMDiffCase("phmdiff", phmdiff, batch, None),
            PHMDiffCase("phmdiff-unmasked", phmdiff, batch, 0.0),
            PHMDiffCase("phmdiff-mask0.75", phmdiff, batch, 0.75),
            PHMDiffCase("dit-plain", PHMDiff(plain_cfg), batch, 0.0),
            UNetCase("monai-unet", unet_batch)]


Key = tuple[Case, str, bool]


def warm_up(key: Key) -> float:
    """First training step (includes one-off costs: oneDNN primitive creation, compilation) and one
    evaluation; returns the first step's seconds."""
    case, precision, _ = key
    with autocast(torch.device("cpu"), PRECISIONS[precision]):
        seconds = _timed(case.train_step)
        if not isinstance(case, UNetCase):  # a second call settles the allocator; too slow for the UNet
            case.train_step()
        case.evaluate()
    return seconds


def time_rounds(keys: list[Key], rounds: int, iters: int) -> dict[Key, tuple[float, float]]:
    """Fastest training step and evaluation of every key, over ``rounds`` interleaved rounds of ``iters``
    calls each (the slow UNet: 1 call): interleaving spreads the load of other jobs over all cases alike."""
    best: dict[Key, tuple[float, float]] = {}
    for i in range(rounds):
        print(f"# round {i + 1}/{rounds} of {len(keys)} cases", flush=True)
        for key in keys:
            case, precision, _ = key
            n = 1 if isinstance(case, UNetCase) else iters
            with autocast(torch.device("cpu"), PRECISIONS[precision]):
                step = seconds_per_call(case.train_step, 0, n)
                evaluation = seconds_per_call(case.evaluate, 0, n)
            old = best.get(key, (step, evaluation))
            best[key] = (min(old[0], step), min(old[1], evaluation))
    return best


def row_of(key: Key, seconds: tuple[float, float], first_step: float, flops: int,
           peaks: dict[str, float]) -> dict[str, object]:
    """One table row: throughput, MFU against the measured peak of the same dtype, sampling cost per slice."""
    (case, precision, compiled), (step, evaluation) = key, seconds
    n = len(case.batch["target"])
    per_eval = evaluation / (case.model.config.levels if isinstance(case, PHMDiffCase) else 1)
    return {"model": case.name, "precision": precision, "compiled": compiled,
            "params_M": round(case.params / 1e6, 2), "batch": n, "train_img_s": round(n / step, 3),
            "train_step_s": round(step, 3), "train_gflop": round(flops / 1e9, 1),
            "mfu": round(flops / step / 1e9 / peaks[precision], 3),
            "eval_slice_per_s": round(n / per_eval, 2),
            "evals_per_slice": case.evals_per_slice,
            "sample_s_per_slice": round(case.evals_per_slice * per_eval / n, 2),
            "first_step_s": round(first_step, 2)}


def print_table(rows: list[dict[str, object]]) -> None:
    cols = ["model", "precision", "compiled", "params_M", "batch", "train_img_s", "mfu", "eval_slice_per_s",
            "evals_per_slice", "sample_s_per_slice", "first_step_s"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds (not 4); compile PHMDiff in fp32 only")
    parser.add_argument("--batch", type=int, default=4, help="slices per training step (Transformers)")
    parser.add_argument("--unet-batch", type=int, default=1, help="slices per step for the (slow) MONAI UNet")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per round (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine_speed.json")
    args = parser.parse_args()
    iters = args.iters or 2
    rounds = 2 if args.quick else 4
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
          f"AMX {info['amx']}, load {info['load_avg_at_start']}")
    peaks = {p: round(matmul_peak(d or torch.float32), 1) for p, d in PRECISIONS.items()}
    batch = brats_batch(args.batch, model_config("small").max_sources)
    cases = build_cases(batch, {k: v[: args.unet_batch] for k, v in batch.items()})
    flops = {case: flops_of(lambda c=case: c.loss().backward()) for case in cases}  # forward + backward
    # The 75 % mask row only answers "how does speed scale with the ratio": fp32 is enough.
    eager: list[Key] = [(case, p, False) for case in cases for p in PRECISIONS
                        if not (case.name == "phmdiff-mask0.75" and p != "fp32")]
    first = {key: warm_up(key) for key in eager}
    seconds = time_rounds(eager, rounds, iters)
    compiled: list[Key] = []
    if not args.no_compile:
        compile_model(cases[0].model)  # in place: time it only after the eager rounds
        compiled = [(cases[0], p, True) for p in (["fp32"] if args.quick else PRECISIONS)]
        first.update({key: warm_up(key) for key in compiled})
        seconds.update(time_rounds(compiled, rounds, iters))
    peaks = {p: max(peaks[p], round(matmul_peak(d or torch.float32), 1)) for p, d in PRECISIONS.items()}
    rows = [row_of(key, seconds[key], first[key], flops[key[0]], peaks) for key in eager + compiled]
    print(f"# measured matmul peak GFLOP/s (best of start and end): {peaks}")
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "matmul_peak_gflops": peaks, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

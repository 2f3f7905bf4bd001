"""Whole-volume synthesis speed and memory: `phmdiff synthesize`'s path (read -> synthesize -> write) timed on
real volumes with the ``small`` model config.

The weights are a seeded random initialisation (perturbed from DiT's zero-initialised output layers): speed
and memory do not depend on training (quality does: ``sampling_steps.py`` measures the shipped model's
steps-vs-quality curve). Each measurement runs in a fresh process, so its peak RSS (``getrusage``) is its own.

Runs:

- ``default``: the whole 240 x 240 x 155 BraTS T1 volume -> T2 at the model's default sampling (the ``small``
  config's: Euler, steps 3,2,2 per level = 7 denoiser evaluations per slice), per precision: what
  ``phmdiff synthesize`` does without options, end to end.
- ``ct-sized``: a 512 x 512 x 300 MR volume (the Siemens MPRAGE series resampled to 0.6 mm slices) to a CT,
  steps 1 (3 evaluations), fp32: memory while streaming a large volume, against the size of one float32 copy.

    python benchmarks/synthesize_speed.py            # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from engine_speed import DATA, ROOT, machine

from phmdiff_cli.config import model_config
from phmdiff_cli.data.slices import parse_pairs
from phmdiff_cli.engine.pretrained import Pretrained, build_card
from phmdiff_cli.engine.synthesizer import SynthesisSettings, Synthesizer
from phmdiff_cli.io import Volume, read_volume, write_volume
from phmdiff_cli.models import PHMDiff

BRAIN = DATA / "brats/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz"
MR_SERIES = DATA / "dicom/mr_siemens_t1_mprage_vs-seg-001"
RESULTS = ROOT / "benchmarks" / "results" / "synthesize_speed.json"
PAIRS = "t1n:t2w,t1n:ct"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
#: Batch sizes of the sweep (5: the default CPU batch of the small model).
SWEEP = [1, 5, 8, 19, 32]


def small_model() -> Pretrained:
    """The ``small`` config with seeded random weights (speed does not depend on training)."""
    config = model_config("small")
    torch.manual_seed(0)
    model = PHMDiff(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    card = build_card(config, parse_pairs(PAIRS))
    return Pretrained(model.eval(), {**card, "sha256": "random-init"}, Path("random-init"))


def z_block(volume: Volume, z0: int, z1: int) -> Volume:
    """Slices ``z0:z1`` of a volume on their own sub-grid."""
    origin = np.asarray(volume.origin) + volume.direction_matrix[:, 2] * volume.spacing[2] * z0
    array = volume.array[z0:z1].copy()
    return Volume(array, volume.spacing, tuple(origin), volume.direction, volume.modality)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process: read, synthesize, write; wall times and the peak RSS."""
    torch.manual_seed(0)
    pretrained = small_model()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    source = read_volume(spec["source"])
    read_s = time.perf_counter() - start
    sampling = pretrained.config.sampling
    steps, sampler = tuple(spec.get("steps") or sampling.steps), spec.get("sampler") or sampling.sampler
    settings = SynthesisSettings(steps=steps, sampler=sampler, seed=0)
    synth = Synthesizer(pretrained, torch.device("cpu"), PRECISIONS[spec["precision"]], settings)
    result = synth.run([source], spec["target"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_volume(result.image, Path(tmp) / "out.nii.gz")
        write_s = time.perf_counter() - start
    sampled = result.slices - result.skipped
    return {
        **spec,
        "steps": list(steps),
        "sampler": sampler,
        "shape_zyx": list(source.shape),
        "slices": result.slices,
        "sampled_slices": sampled,
        "batch_size": result.batch_size,
        "seconds": {"read": read_s, **result.seconds, "write": write_s},
        "wall_seconds": read_s + sum(result.seconds[k] for k in ("prepare", "sample", "restore")) + write_s,
        "seconds_per_sampled_slice": result.seconds["sample"] / max(sampled, 1),
        # CPU seconds of all threads per slice: less sensitive than wall time to other processes on the cores.
        "cpu_seconds_per_sampled_slice": result.seconds["sample_cpu"] / max(sampled, 1),
        "load_avg_1min": os.getloadavg()[0],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_model_gib": rss_model,
        "float32_volume_gib": int(np.prod(source.shape)) * 4 / 2**30,
    }


def batch_sweep(sizes: list[int]) -> list[dict[str, Any]]:
    """Seconds per slice per denoiser evaluation and peak-RSS growth per slice, by batch size (increasing, in
    one process: the RSS peak grows with the batch), on real 2.5D source stacks of the BraTS volume."""
    from phmdiff_cli.data.preprocess import prepare_volume
    from phmdiff_cli.data.slices import source_stack
    from phmdiff_cli.diffusion import sample
    from phmdiff_cli.modalities import modality_id

    pretrained = small_model()
    cfg = pretrained.config
    # 32 slices only: preparing the whole volume would raise the RSS peak above that of small batches.
    volume = prepare_volume(z_block(read_volume(BRAIN), 60, 92), pretrained.grid).array
    rows, previous = [], None
    for size in sizes:
        stack, src_mod = source_stack([volume], ["t1n"], k=cfg.context, slots=cfg.max_sources, z=range(size))
        args = (torch.from_numpy(stack), torch.from_numpy(src_mod).expand(size, -1),
                torch.full((size,), modality_id("t2w")))
        sample(pretrained.model, *args, steps=1, noise_seed=0)  # warm-up at this shape
        start = time.perf_counter()
        sample(pretrained.model, *args, steps=1, noise_seed=0)  # 3 evaluations (one per level)
        seconds = (time.perf_counter() - start) / (3 * size)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        growth = None if previous is None else (rss - previous[1]) / (size - previous[0])
        rows.append({"batch": size, "ms_per_slice_eval": 1000 * seconds, "peak_rss_mib": rss,
                     "rss_mib_per_added_slice": growth})
        previous = (size, rss)
    return rows


def measure(spec: dict[str, Any]) -> Any:
    """Run :func:`child` (or, for ``{"sizes": [...]}``, :func:`batch_sweep`) in a fresh interpreter (its own
    peak RSS)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def ct_sized_volume(folder: Path) -> Path:
    """The real MPRAGE series (512 x 512 x 120 at 1.5 mm) resampled (linear) to 300 slices of 0.6 mm."""
    image = read_volume(MR_SERIES).to_sitk()
    spacing = (*image.GetSpacing()[:2], image.GetSpacing()[2] * image.GetSize()[2] / 300)
    resampled = sitk.Resample(
        image,
        (*image.GetSize()[:2], 300),
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        0.0,
        sitk.sitkInt16,
    )
    return write_volume(Volume.from_sitk(resampled, modality="t1n"), folder / "ct_sized-t1n.nii")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(batch_sweep(spec["sizes"]) if "sizes" in spec else child(spec)))
        return
    sweep = measure({"sizes": SWEEP})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            run = measure({"name": "default", "source": str(BRAIN), "target": "t2w", "precision": precision})
            rows.append({**run, "seconds_per_volume": run["wall_seconds"]})
        ct = measure(
            {
                "name": "ct-sized",
                "source": str(ct_sized_volume(Path(tmp))),
                "target": "ct",
                "steps": [1, 1, 1],
                "sampler": "euler",
                "precision": "fp32",
            }
        )
        ct["seconds_per_volume"] = ct["wall_seconds"]
        rows.append(ct)
    report = {"machine": machine(), "model": "small (random init)", "batch_sweep": sweep, "runs": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['machine']}\n")
    # s/slice: wall seconds per sampled slice; cpu/slice: CPU seconds of all threads per slice; load:
    # 1-minute load average at the end of the run; f32 copies: peak RSS above the loaded model, in float32
    # copies of the volume (voxels x 4 bytes).
    print(f"{'run':9} {'prec':5} {'volume (z,y,x)':16} {'evals':>5} {'batch':>5} {'s/slice':>8} "
          f"{'cpu/slice':>9} {'s/volume':>9} {'load':>5} {'peak RSS GiB':>12} {'f32 copies':>10}")
    for r in rows:
        evals = sum(s if r["sampler"] == "euler" else 2 * s - 1 for s in r["steps"])
        copies = (r["peak_rss_gib"] - r["rss_after_model_gib"]) / r["float32_volume_gib"]
        print(f"{r['name']:9} {r['precision']:5} {str(tuple(r['shape_zyx'])):16} {evals:5d} "
              f"{r['batch_size']:5d} {r['seconds_per_sampled_slice']:8.2f} "
              f"{r['cpu_seconds_per_sampled_slice']:9.2f} "
              f"{r['seconds_per_volume']:9.1f} {r['load_avg_1min']:5.1f} {r['peak_rss_gib']:12.2f} "
              f"{copies:10.1f}")
    print(f"\n{'batch':>5} {'ms/slice-eval':>13} {'peak RSS MiB':>12} {'MiB/added slice':>15}")
    for r in sweep:
        growth = r["rss_mib_per_added_slice"]
        print(f"{r['batch']:5d} {r['ms_per_slice_eval']:13.1f} {r['peak_rss_mib']:12.0f} "
              f"{'' if growth is None else f'{growth:.1f}':>15}")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

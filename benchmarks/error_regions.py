"""Where in the brain a synthetic T2 loses: its squared error and SSIM by region, beside the histogram bar's.

For each subject with a T1 and a T2, ``phmdiff synthesize`` makes a T2 from the T1 as a user would (the default
model, or ``--model``). Both it and the histogram-matched inverted T1 (the bar of issue "Sharp synthesis": the
T1's brain voxels mapped by quantiles onto the real T2's) are scored as ``phmdiff eval`` scores them (each volume
over its foreground's 99.5th percentile, inside the real T2's foreground mask, 3-D SSIM with a 7-voxel window), and
the mask is split into three regions:

- ``edge``: within :data:`EDGE_VOXELS` voxels (3-D distance) of the mask's boundary;
- ``csf``: the rest of the real T2's brightest 10 % (ventricles, sulci, oedema);
- ``rest``: the parenchyma.

Per region: its share of the mask's voxels, its share of the squared error, the mean SSIM-map value and the mean
signed error (prediction minus real, on the [0, 1] scale). Also the mean real and synthetic value of the outermost
voxel layers (distance 1, 2, 3), where the skull stripping of each source leaves its own rim.

    python benchmarks/error_regions.py      # ~3 min on 2 CPU cores; writes results/error_regions.json
    python benchmarks/error_regions.py --model runs/x/last --steps 1 --out /tmp/x.json   # another model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from baselines import match_quantiles
from engine_speed import DATA, ROOT, machine
from scipy import ndimage
from skimage.metrics import structural_similarity

from phmdiff_cli.io import read_volume
from phmdiff_cli.metrics.evaluate import auto_mask, scale_pair

#: (subject folder under ``DATA``, one of the validation subjects of weights/brain_data.json).
SUBJECTS = [("ms_mni/OMS-MNI-p19", True), ("brats/TCGA-DU-7294", True), ("ms_mni/OMS-MNI-p07", False),
            ("brats/BraTS-GLI-00001-000", False), ("brats/BraTS-MET-00110-000", False),
            ("brats/BrainLesion-case-01", False)]
#: The edge region's depth, voxels.
EDGE_VOXELS = 3
#: The real T2's brightest fraction of the mask counted as CSF (beyond the edge).
CSF_FRACTION = 0.10


def regions(real: np.ndarray, mask: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The three regions of ``mask`` (bool ``(z, y, x)``) for the real T2 ``real`` on the [0, 1] scale, and the
    3-D distance of each mask voxel to the outside, voxels."""
    depth = ndimage.distance_transform_edt(mask)
    edge = mask & (depth <= EDGE_VOXELS)
    csf = mask & ~edge & (real > np.percentile(real[mask], 100 * (1 - CSF_FRACTION)))
    return {"edge": edge, "csf": csf, "rest": mask & ~edge & ~csf}, depth


def region_scores(pred: np.ndarray, real: np.ndarray, parts: dict[str, np.ndarray], mask: np.ndarray
                  ) -> dict[str, dict[str, float]]:
    """Per region: voxel share, squared-error share, mean SSIM-map value, mean signed error. ``pred`` and ``real``
    on the [0, 1] scale, 0 outside ``mask`` (as ``phmdiff eval``'s masked SSIM sets them)."""
    _, ssim_map = structural_similarity(real, pred, data_range=1.0, full=True)
    error = pred - real
    total = float((error[mask] ** 2).sum())
    return {name: {"voxels": round(float(part.sum() / mask.sum()), 4),
                   "squared_error": round(float((error[part] ** 2).sum()) / total, 4),
                   "ssim": round(float(ssim_map[part].mean()), 4), "bias": round(float(error[part].mean()), 4)}
            for name, part in parts.items()}


def measure(folder: Path, model: list[str], work: Path) -> dict[str, object]:
    """Synthesize ``folder``'s T2 from its T1 and score it and the histogram bar by region."""
    sid = folder.name
    out = work / f"{sid}-t2w.nii.gz"
    subprocess.run(["phmdiff", "synthesize", "--src", str(folder / f"{sid}-t1n.nii.gz"), "--target", "t2w", "-o",
                    str(out), "-q", *model], check=True)
    t1, real_file = (read_volume(folder / f"{sid}-{m}.nii.gz").array.astype(np.float64) for m in ("t1n", "t2w"))
    mask = auto_mask(real_file, "t2w")
    hist = np.zeros_like(real_file)
    hist[mask] = match_quantiles(-t1[mask], real_file[mask])
    found: dict[str, object] = {"subject": sid}
    for name, pred_file in (("model", read_volume(out).array.astype(np.float64)), ("hist-matched", hist)):
        scaled = scale_pair(pred_file, real_file, modality="t2w", norm="percentile")
        pred, real = np.where(mask, scaled.pred, 0.0), np.where(mask, scaled.ref, 0.0)
        parts, depth = regions(real, mask)
        found[name] = region_scores(pred, real, parts, mask)
        found[name]["psnr"] = round(float(10 * np.log10(1.0 / np.mean((pred[mask] - real[mask]) ** 2))), 3)
        layers = {d: mask & (depth > d - 1) & (depth <= d) for d in (1, 2, 3)}
        found[name]["rim"] = {str(d): {"real": round(float(real[m].mean()), 4), "pred": round(float(pred[m].mean()), 4)}
                              for d, m in layers.items()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model for every synthesis (default: phmdiff synthesize's)")
    parser.add_argument("--steps", help="phmdiff synthesize --steps (default: the model's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "error_regions.json")
    args = parser.parse_args()
    model = (["--model", args.model] if args.model else []) + (["--steps", args.steps] if args.steps else [])
    rows = []
    print("| subject | validation | method | PSNR | edge: voxels / SE share / SSIM / bias | csf | rest "
          "| rim d1 real / pred |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, validation in SUBJECTS:
            row = {**measure(DATA / name, model, Path(tmp)), "validation": validation}
            rows.append(row)
            for method in ("model", "hist-matched"):
                found = row[method]
                cells = [" / ".join(f"{found[r][k]:.3f}" for k in ("voxels", "squared_error", "ssim", "bias"))
                         for r in ("edge", "csf", "rest")]
                rim = found["rim"]["1"]
                print(f"| {row['subject']} | {validation} | {method} | {found['psnr']:.2f} | " + " | ".join(cells)
                      + f" | {rim['real']:.3f} / {rim['pred']:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "model": args.model or "default", "steps": args.steps,
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

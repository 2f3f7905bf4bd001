"""Dark patches in the ventricles: how much of the CSF a synthetic T2 renders dark where the real T2 is bright.

For each subject with a T1 and a T2, ``phmdiff synthesize`` makes a T2 from the T1 as a user would (the default
model and settings, plus the variants asked for on the first subject). The CSF is taken from the real images:
inside both the T1's and the real T2's foreground, the real T2 in its top 5 % and the T1 in its lowest 10 %. The
figure is the fraction of those voxels the synthetic T2 puts below its own median over the same foreground (0 for
the real T2 itself; near 1 for an image that keeps the T1's dark CSF).

    python benchmarks/ventricle_patches.py    # ~3 min on 2 CPU cores; writes results/ventricle_patches.json
    python benchmarks/ventricle_patches.py --model runs/x/last --variants default --out x.json   # another model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from engine_speed import DATA, ROOT, machine

#: (subject folder under ``DATA``, trained on by the default model).
SUBJECTS = [("brats/TCGA-DU-7294", False), ("ms_mni/OMS-MNI-p19", False), ("ms_mni/OMS-MNI-p07", True),
            ("brats/BraTS-GLI-00001-000", True), ("brats/BraTS-MET-00110-000", True)]
#: ``phmdiff synthesize`` options measured on the first subject beside the defaults.
VARIANTS = {"default": [], "no-source-detail": ["--no-source-detail"], "no-mirror": ["--no-mirror"],
            "fp32": ["--precision", "fp32"]}


def volume(path: Path) -> np.ndarray:
    """``(z, y, x)`` float32 voxels of an image file."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


def dark_fraction(t1: np.ndarray, real_t2: np.ndarray, synthetic_t2: np.ndarray) -> tuple[float, int]:
    """The fraction of CSF voxels (both foregrounds, real T2 in its top 5 %, T1 in its lowest 10 %) that
    ``synthetic_t2`` puts below its median over the same foreground, and the number of CSF voxels. All three
    arrays of one shape, on one grid."""
    fg = (t1 > 0) & (real_t2 > 0)
    csf = fg & (real_t2 > np.percentile(real_t2[fg], 95)) & (t1 < np.percentile(t1[fg], 10))
    return float((synthetic_t2[csf] < np.median(synthetic_t2[fg])).mean()), int(csf.sum())


def measure(folder: Path, options: list[str], work: Path) -> dict[str, float | int]:
    """Synthesize ``folder``'s T2 from its T1 with ``options`` and score its dark fraction."""
    sid = folder.name
    out = work / f"{sid}-{len(list(work.iterdir()))}.nii.gz"
    command = ["phmdiff", "synthesize", "--src", str(folder / f"{sid}-t1n.nii.gz"), "--target", "t2w", "-o",
               str(out), "-q", *options]
    subprocess.run(command, check=True)
    fraction, n = dark_fraction(volume(folder / f"{sid}-t1n.nii.gz"), volume(folder / f"{sid}-t2w.nii.gz"),
                                volume(out))
    return {"dark_fraction": round(fraction, 4), "csf_voxels": n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ventricle_patches.json")
    parser.add_argument("--model", help="a model for every synthesis (default: phmdiff synthesize's)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated options measured on the first subject (default: {','.join(VARIANTS)})")
    args = parser.parse_args(argv)
    model = ["--model", args.model] if args.model else []
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        parser.error(f"unknown --variants {','.join(sorted(unknown))}; choose from {','.join(VARIANTS)}")
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, trained) in enumerate(SUBJECTS):
            for variant, options in (variants if index == 0 else {"default": []}).items():
                row = {"subject": Path(name).name, "trained_on": trained, "variant": variant,
                       **measure(DATA / name, [*model, *options], Path(tmp))}
                rows.append(row)
                print(f"| {row['subject']} | {trained} | {variant} | {row['dark_fraction']:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "model": args.model or "default", "rows": rows}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Draw the README's quickstart figure: source T1 | synthesized T2 | real T2 of the example subject.

Run after the README's first command (which writes the synthetic T2 next to the example); the real T2 of
TCGA-DU-7294 (the shipped model's validation subject, never trained on) comes from ../shared/data/brats.
Each image is shown on its own model-range scale (0 to its foreground 99.5th percentile), axial slices in
radiological view (patient right on the left, anterior at the top).

    python examples/make_figure.py          # writes examples/quickstart.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from phmdiff_cli.data.normalize import fit_intensity, foreground_mask, to_model_range
from phmdiff_cli.engine.validation import write_preview
from phmdiff_cli.io import read_volume
from phmdiff_cli.io.orientation import to_canonical

HERE = Path(__file__).resolve().parent
SUBJECT = "TCGA-DU-7294"
#: Where the slices sit in the brain's superior-inferior extent (fractions of the foreground z range).
LEVELS = (0.35, 0.55, 0.75)


def model_range_zyx(path: Path, modality: str) -> np.ndarray:
    """(z, y, x) canonical (LPS) voxels of a volume, scaled to [-1, 1] as the model sees them."""
    array = to_canonical(read_volume(path)).array.astype(np.float32)
    return to_model_range(array, fit_intensity(array, modality))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=HERE / f"{SUBJECT}-t1n.nii.gz")
    parser.add_argument("--synthetic", type=Path, default=HERE / f"{SUBJECT}-t2w-synthetic.nii.gz")
    parser.add_argument("--real", type=Path,
                        default=HERE.parents[1] / "shared" / "data" / "brats" / SUBJECT / f"{SUBJECT}-t2w.nii.gz")
    parser.add_argument("--out", type=Path, default=HERE / "quickstart.png")
    args = parser.parse_args()
    source = model_range_zyx(args.source, "t1n")
    synthetic, real = model_range_zyx(args.synthetic, "t2w"), model_range_zyx(args.real, "t2w")
    raw_real = to_canonical(read_volume(args.real)).array
    z_fg = np.flatnonzero(foreground_mask(raw_real, "t2w").any(axis=(1, 2)))
    slices = [int(z_fg[0] + f * (z_fg[-1] - z_fg[0])) for f in LEVELS]
    rows = [(f"t1n -> t2w, z = {z}", source[z], synthetic[z], real[z]) for z in slices]
    print(write_preview(args.out, rows))


if __name__ == "__main__":
    main()

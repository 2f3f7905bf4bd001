"""What synthesis buys a segmenter when FLAIR is missing (the BraSyn setting), on expert BraTS labels.

Data: ``../shared/data/brats2013_t1c_flair/`` (six glioma patients, T1c + FLAIR, z-scored, brain masks, expert
labels 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing tumour; CC BY-NC-SA 3.0). Exactly what

    phmdiff segment-augment --data ../shared/data/brats2013_t1c_flair --out aug --targets t2f --drop t2f \\
        --variants 1 --evaluate --folds 3 --seg-epochs 20

does, in one process so that the figure can show the predictions:

1. the shipped model synthesizes a FLAIR for every subject from its T1c (the stand-in, variant 0) and one more
   draw (variant 1), inside the subject's brain mask;
2. 3-fold cross-validation (two subjects tested per fold, every subject once), a 2-D MONAI UNet per fold and arm,
   the same seed and step budget for each: ``real`` trained on real T1c + FLAIR, ``real+synthetic`` also on the
   synthetic FLAIR variants (augmentation);
3. each tested with FLAIR real, synthesized from T1c, zero-filled, and the histogram-matched T1c (the T1c mapped
   by quantiles onto the training subjects' pooled FLAIR histogram: the trivial substitute);
4. Dice and HD95 per BraTS region (whole tumour, tumour core, enhancing tumour), mean +- std over folds.

Writes ``results/downstream.json`` and ``examples/downstream.png`` (T1c | real FLAIR | synthetic FLAIR |
histogram-matched T1c with the expert whole-tumour contour; below, each arm's prediction for each test input).

    python benchmarks/downstream.py          # 13 min on 2 AVX512-BF16 cores, 40 on 2 AVX2-only cores (fp32)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from engine_speed import DATA, ROOT, cpu_model
from PIL import Image, ImageDraw
from scipy import ndimage

from phmdiff_cli.data.layouts import discover
from phmdiff_cli.engine.augment import augment_dataset, channels_of, label_values, plan_jobs, synthesize_fn
from phmdiff_cli.engine.hub import DEFAULT_MODEL
from phmdiff_cli.engine.segbench import SegSettings, cases_from_entries, run_benchmark
from phmdiff_cli.engine.synthesizer import SynthesisSettings, Synthesizer
from phmdiff_cli.jsonsafe import finite

FOLDER = DATA / "brats2013_t1c_flair"
DROP = "t2f"
#: Label colours of the prediction tiles (1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing).
COLOURS = {1: (255, 60, 60), 2: (60, 200, 60), 3: (60, 120, 255), 4: (255, 220, 0)}
TILE = 192  # pixels per tile side in the figure


class FigureSlices:
    """Collects, for one test subject of the first fold, the axial slice with the most tumour: its inputs and
    every arm's prediction for every test input."""

    def __init__(self) -> None:
        self.subject: str | None = None
        self.z = 0
        self.label: np.ndarray | None = None
        self.inputs: dict[str, np.ndarray] = {}
        self.predictions: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, fold: int, arm: str, name: str, subject: str, x: np.ndarray, classes: np.ndarray,
                 label: np.ndarray) -> None:
        if fold != 0 or self.subject not in (None, subject):
            return
        if self.subject is None:
            self.subject, self.z = subject, int(np.argmax((label > 0).sum(axis=(1, 2))))
            self.label = label[self.z]
        self.inputs[name] = x[self.z]
        self.predictions[(arm, name)] = classes[self.z]


def _grey(tile: np.ndarray) -> np.ndarray:
    """A model-range tile [-1, 1] as RGB uint8, scaled to TILE pixels."""
    grey = np.clip((tile + 1.0) * 127.5, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(Image.fromarray(rgb).resize((TILE, TILE), Image.NEAREST))


def _overlay(base: np.ndarray, labels: np.ndarray, *, contour: bool) -> np.ndarray:
    """``base`` (RGB, TILE) with ``labels`` (class indices, seg grid) as colours or, ``contour``, as the outline of
    the whole tumour."""
    big = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((TILE, TILE), Image.NEAREST))
    out = base.copy()
    if contour:
        tumour = big > 0
        out[tumour & ~ndimage.binary_erosion(tumour, iterations=2)] = (255, 0, 255)
        return out
    for value, colour in COLOURS.items():
        out[big == value] = (0.45 * out[big == value] + 0.55 * np.asarray(colour)).astype(np.uint8)
    return out


def write_figure(path: Path, slices: FigureSlices, channels: list[str], arms: list[str], inputs: list[str]) -> Path:
    """Row 1: T1c, real FLAIR, synthetic FLAIR, histogram-matched T1c with the expert whole-tumour contour. Then
    one row per arm: its prediction for each test input, over the T1c."""
    t1c, flair = channels.index("t1c"), channels.index(DROP)
    label = slices.label
    assert label is not None
    first = [("T1c", slices.inputs["real"][t1c]), ("real FLAIR", slices.inputs["real"][flair])]
    titles = {f"synthesized {DROP}": "synthetic FLAIR", f"hist-matched {DROP}": "T1c hist-matched to FLAIR"}
    first += [(titles[name], slices.inputs[name][flair]) for name in inputs if name in titles]
    rows = [[(title, _overlay(_grey(tile), label, contour=True)) for title, tile in first]]
    for arm in arms:
        rows.append([(f"{arm} <- {name}", _overlay(_grey(slices.inputs["real"][t1c]), slices.predictions[(arm, name)],
                                                   contour=False)) for name in inputs])
    width = max(len(r) for r in rows) * TILE
    canvas = Image.new("RGB", (width, len(rows) * TILE))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (title, tile) in enumerate(row):
            canvas.paste(Image.fromarray(tile), (c * TILE, r * TILE))
            draw.text((c * TILE + 3, r * TILE + 2), title, fill=(255, 255, 255))
    draw.text((3, TILE - 13), f"{slices.subject}, seg-grid z={slices.z}", fill=(255, 255, 255))
    canvas.save(path)
    return path


def print_table(evaluation: dict[str, Any]) -> None:
    regions = evaluation["structures"]
    print("| trained on | test input | " + " | ".join(f"Dice {r}" for r in regions) + " | HD95 WT (mm) |")
    print("|---|---|" + "---|" * (len(regions) + 1))
    for arm, by_input in evaluation["results"].items():
        for name, result in by_input.items():
            cells = [f"{result['mean'][r]['dice']:.3f} +- {result['mean'][r]['dice_std']:.3f}" for r in regions]
            hd = result["mean"][regions[0]]["hd95"]
            print(f"| {arm} | {name} | " + " | ".join(cells) + f" | {'-' if hd is None else f'{hd:.1f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "weights" / DEFAULT_MODEL))
    parser.add_argument("--variants", type=int, default=1, help="extra synthetic FLAIR draws per subject")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seg-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "downstream.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "examples" / "downstream.png")
    args = parser.parse_args()
    info, device, dtype, pretrained = cpu_model(args.model)
    started = time.perf_counter()
    dataset = discover(FOLDER)
    synth = Synthesizer(pretrained, device, dtype, SynthesisSettings(seed=args.seed))
    jobs, notes = plan_jobs(dataset, pretrained.pairs, targets=[DROP], variants=args.variants, drop=[DROP],
                            seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="phmdiff-downstream-") as work:
        root = Path(work) / "aug"
        entries = augment_dataset(dataset, root, jobs, synthesize_fn(synth, notes), link="symlink")
        synthesized = time.perf_counter() - started
        print(f"# {len(jobs)} synthetic FLAIR volumes in {synthesized / 60:.1f} min", flush=True)
        channels, values = channels_of(dataset, entries), label_values(root, entries)
        settings = SegSettings(epochs=args.seg_epochs, folds=args.folds, seed=args.seed)
        figure = FigureSlices()
        evaluation = run_benchmark(cases_from_entries(root, entries), channels, values, settings, device, dtype,
                                   drop=[DROP], on_progress=None, on_prediction=figure)
    report = {"machine": info, "model": args.model, "weights_sha256": pretrained.card.get("sha256"),
              "command": "python benchmarks/downstream.py", "synthesis_notes": notes,
              "minutes": {"synthesis": round(synthesized / 60, 1),
                          "total": round((time.perf_counter() - started) / 60, 1)},
              "evaluation": evaluation}
    args.out.write_text(json.dumps(finite(report), indent=1) + "\n")
    write_figure(args.figure, figure, channels, list(evaluation["results"]), evaluation["inputs"])
    print_table(evaluation)
    print(f"wrote {args.out} and {args.figure} ({report['minutes']['total']} min)")


if __name__ == "__main__":
    main()

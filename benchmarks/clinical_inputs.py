"""Raw clinical scans in: what the shipped model makes of a T1 as a hospital exports it (skull on, 3 mm slices).

Data: ``../shared/data/clinical_raw/`` (two MS patients, CC BY; Lesjak et al., Neuroinformatics 2016): T1W, T2W
and FLAIR, each on its own grid (0.5-0.9 mm in-plane, 3-4 mm slices), with the rigid ITK transforms that align the
T1W and the T2W onto the FLAIR. For each subject and target (T2W, FLAIR), from the raw T1W:

- ``raw``: ``phmdiff synthesize`` as a user would run it (the Synthesizer, its default settings; without ``--model``
  the default models: brain-heads for these heads with skull);
- ``brain-mask``: the same with ``--brain-mask`` (the mask below; without ``--model``, brain-sharp);
- ``hist-matched``: the T1W itself (inverted for T2W), mapped by quantiles onto the *real* target's histogram
  inside the evaluation mask (an oracle histogram, as in ``quality.py``).

Everything is compared on the FLAIR's grid (the T1W-grid images moved by ``T1W_to_FLAIR.txt``, the real T2W by
``T2W_to_FLAIR.txt``, linear), inside the brain mask and inside the head (the FLAIR's foreground, holes filled).
Each image is scaled by its own 99.5th percentile inside the evaluation mask (``phmdiff eval``'s percentile
scale, restricted to the mask) and scored with ``phmdiff eval``'s PSNR and 3-D SSIM.

Brain mask (there is no deep skull-stripper offline): the intracranial region of the Clinical toolbox's
skull-stripped CT template (values above 2000 on its Cormack scale: 1723 mL in MNI space) carried onto the
subject's T1W by an affine registration of the SPM12 avg152 T1 template (SimpleITK: Mattes mutual information,
3 resolutions, sampling seeded: the same mask in every run). Reproducible, but only affine: it follows
the skull's inner surface to within a few millimetres, not the brain's folds, so it keeps some CSF and, where the
skull is thin, some meninges; its volume per subject is in the results (the training brains had 1016-1679 mL).

    python benchmarks/clinical_inputs.py      # ~3 min on 2 CPU cores; writes results/clinical_inputs.json
    python benchmarks/clinical_inputs.py --model weights/brain-sharp --out /tmp/s.json --figure /tmp/s.png  # one model
    python benchmarks/clinical_inputs.py --contrast off --out /tmp/off.json --figure /tmp/off.png   # uncalibrated
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from baselines import match_quantiles
from engine_speed import DATA, ROOT, machine
from scipy import ndimage

from phmdiff_cli.data.normalize import IntensityParams, foreground_mask, unit_scale
from phmdiff_cli.engine.device import resolve_precision
from phmdiff_cli.engine.synthesizer import SynthesisSettings, Synthesizer, load_synthesizer
from phmdiff_cli.engine.validation import write_preview
from phmdiff_cli.io import Volume, read_volume
from phmdiff_cli.metrics.evaluate import EvalSettings, Scaled, image_scores

SUBJECTS = ("OMS-raw-p01-study1", "OMS-raw-p04-study1")
#: The figure's subject: the one no shipped model trains on (weights/brain_small.py keeps it for validation).
FIGURE_SUBJECT = "OMS-raw-p04-study1"
TARGETS = {"t2w": "T2W", "t2f": "FLAIR"}
TEMPLATES = DATA / "templates_mni152_2mm"
#: Cormack-scale level of the skull-stripped CT template taken as intracranial (1723 mL in MNI space).
ICV_LEVEL = 2000.0
#: T1 -> T2 inverts the contrast; the histogram-matched source is inverted for it (as in ``quality.py``).
INVERTED = {"t2w"}


def brain_mask(t1: sitk.Image) -> sitk.Image:
    """The template's intracranial mask on ``t1``'s grid (uint8), by an affine registration of the T1 template."""
    fixed = sitk.Cast(t1, sitk.sitkFloat32)
    moving = sitk.ReadImage(str(TEMPLATES / "spm12_canonical_avg152T1.nii"), sitk.sitkFloat32)
    icv = sitk.ReadImage(str(TEMPLATES / "clinicaltbx_scct_stripped.nii"), sitk.sitkFloat32) > ICV_LEVEL
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed=1)  # 0 is sitkWallClock: a new draw each run
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SetInitialTransform(start, inPlace=False)
    transform = reg.Execute(fixed, moving)
    return sitk.Resample(icv, t1, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def head_mask(image: sitk.Image) -> np.ndarray:
    """The largest foreground component of a raw MRI, holes filled slice by slice: the head."""
    fg = foreground_mask(sitk.GetArrayFromImage(image).astype(np.float32), "t2f")
    labels, count = ndimage.label(fg)
    if count:
        fg = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return np.stack([ndimage.binary_fill_holes(s) for s in fg])


def onto(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, *, nearest: bool = False) -> np.ndarray:
    """``image`` resampled onto ``reference``'s grid through ``transform`` (reference point -> image point)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, transform, interpolator, 0.0)
    return sitk.GetArrayFromImage(out)


def hist_matched(source: np.ndarray, real: np.ndarray, mask: np.ndarray, invert: bool) -> np.ndarray:
    """``source`` inside ``mask`` mapped by quantiles onto ``real``'s values inside it; 0 outside."""
    out = np.zeros_like(real)
    out[mask] = match_quantiles(-source[mask] if invert else source[mask], real[mask])
    return out


def scores(pred: np.ndarray, real: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR and 3-D SSIM inside ``mask``, each image scaled by its 99.5th percentile inside it."""
    def scaled(a: np.ndarray) -> np.ndarray:
        return unit_scale(a, IntensityParams("mr", 0.0, max(float(np.percentile(a[mask], 99.5)), 1e-6)))

    p, r = scaled(pred).astype(np.float64), scaled(real).astype(np.float64)
    found = image_scores(Scaled(p, r, p, r, 1.0, 0.0, "percentile"), mask, EvalSettings(("psnr", "ssim")))
    return {k: round(float(v), 4) for k, v in found.items()}


def run_subject(subject: str, synth: Synthesizer, figure_rows: list[Any]) -> dict[str, Any]:
    folder = DATA / "clinical_raw" / subject
    t1_path = folder / "T1W.nii.gz"
    t1, flair = sitk.ReadImage(str(t1_path)), sitk.ReadImage(str(folder / "FLAIR.nii.gz"))
    to_flair = {"T1W": sitk.ReadTransform(str(folder / "T1W_to_FLAIR.txt")),
                "T2W": sitk.ReadTransform(str(folder / "T2W_to_FLAIR.txt")), "FLAIR": sitk.Transform()}
    mask_t1 = brain_mask(t1)
    spacing = np.prod(t1.GetSpacing()) / 1000.0
    source = read_volume(t1_path)
    source.modality = "t1n"
    mask_volume = Volume.from_sitk(mask_t1)
    masks = {"brain": onto(mask_t1, flair, to_flair["T1W"], nearest=True) > 0, "head": head_mask(flair)}
    t1_on_flair = onto(t1, flair, to_flair["T1W"])
    out: dict[str, Any] = {"brain_mask_ml": round(float(sitk.GetArrayFromImage(mask_t1).sum() * spacing), 1),
                           "warnings": [], "targets": {}}
    for target, name in TARGETS.items():
        real = onto(sitk.ReadImage(str(folder / f"{name}.nii.gz")), flair, to_flair[name])
        arms, gammas = {}, {}
        for arm, mask in (("raw", None), ("brain-mask", mask_volume)):
            result = synth.run([source], target, mask=mask)
            out["warnings"] = sorted({*out["warnings"], *result.warnings})
            arms[arm], gammas[arm] = onto(result.image.to_sitk(), flair, to_flair["T1W"]), result.contrast_gamma
        rows: dict[str, Any] = {"contrast_gamma": gammas}  # None: the calibration was off or skipped
        for region, mask in masks.items():
            found = {arm: scores(pred, real, mask) for arm, pred in arms.items()}
            found["hist-matched"] = scores(hist_matched(t1_on_flair, real, mask, target in INVERTED), real, mask)
            rows[region] = found
            print(f"# {subject} t1n -> {target} inside the {region}: {found}", flush=True)
        out["targets"][target] = rows
        if target == "t2w" and subject == FIGURE_SUBJECT:
            z = int(np.argmax(masks["brain"].sum(axis=(1, 2))))
            figure_rows += [(f"{subject} raw T1 -> T2 (no mask), FLAIR grid z={z}", t1_on_flair[z], arms["raw"][z],
                             real[z]),
                            ("with --brain-mask", t1_on_flair[z], arms["brain-mask"][z], real[z])]
    return out


def to_model_range_2d(tile: np.ndarray) -> np.ndarray:
    """A tile scaled to [-1, 1] by its 99.5th percentile (what the preview expects)."""
    hi = max(float(np.percentile(tile, 99.5)), 1e-6)
    return np.clip(tile / hi, 0.0, 1.0) * 2.0 - 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="one model for every input (default: phmdiff synthesize's default models)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "clinical_inputs.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "examples" / "clinical_raw_t2.png")
    parser.add_argument("--contrast", choices=("model", "on", "off"), default="model",
                        help="contrast calibration (synthesize --contrast): the model's default, on or off")
    args = parser.parse_args()
    info, device = machine(), torch.device("cpu")
    dtype = resolve_precision("auto", device)
    contrast = {"model": None, "on": True, "off": False}[args.contrast]
    synth = load_synthesizer(args.model, device, dtype, SynthesisSettings(contrast=contrast))
    print(f"# {info['cpu']}, {info['cores']} cores, precision {dtype}, model {synth.pretrained.path}"
          f"{f' (heads: {synth.heads.pretrained.path})' if synth.heads else ''}", flush=True)
    figure: list[Any] = []
    results = {subject: run_subject(subject, synth, figure) for subject in SUBJECTS}
    # A model trained on raw heads (weights/brain_small.py heads) has seen some of these subjects: the mean is
    # over the others (all, if it saw both), and each subject's row says whether it was trained on.
    trained = {sid for each in (synth, synth.heads) if each is not None
               for sid in each.pretrained.card.get("training", {}).get("subjects", {}).get("train", [])}
    for subject, found in results.items():
        found["in_training"] = subject.removesuffix("-study1") in trained
    held_out = [s for s in SUBJECTS if not results[s]["in_training"]] or list(SUBJECTS)
    arms = ("raw", "brain-mask", "hist-matched")
    means = {target: {region: {arm: {m: round(float(np.mean([results[s]["targets"][target][region][arm][m]
                                                             for s in held_out])), 4) for m in ("psnr", "ssim")}
                               for arm in arms} for region in ("brain", "head")}
             for target in TARGETS}
    report = {"machine": info, "model": str(synth.pretrained.path),
              "weights_sha256": synth.pretrained.card.get("sha256"),
              "heads_model": str(synth.heads.pretrained.path) if synth.heads else None,
              "heads_weights_sha256": synth.heads.pretrained.card.get("sha256") if synth.heads else None,
              "contrast": args.contrast, "subjects": results, "mean_over": held_out, "mean": means}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    write_preview(args.figure, [(label, *(to_model_range_2d(t) for t in tiles)) for label, *tiles in figure])
    print("| subject | target | region | raw | --brain-mask | hist-matched (oracle) |")
    print("|---|---|---|---|---|---|")
    rows = {f"{s}{' (trained on)' if results[s]['in_training'] else ''}": results[s]["targets"] for s in SUBJECTS}
    for name, targets in {**rows, f"mean of {', '.join(held_out)}": means}.items():
        for target, regions in targets.items():
            for region in ("brain", "head"):
                cells = [f"{regions[region][a]['psnr']:.2f} / {regions[region][a]['ssim']:.3f}" for a in arms]
                print(f"| {name} | t1n -> {target} | {region} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()

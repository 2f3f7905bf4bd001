"""How the shipped ``brain-small`` model and its successor ``brain-sharp`` are made: the training commands, and the
copy of a run's last model into ``weights/<name>`` with a card that names the training data's licences.

    python weights/brain_small.py train    # ~70 min on 2 CPU cores (--minutes 70), from the repository root
    python weights/brain_small.py extend   # resume it to step 5000 (~50 min here)
    python weights/brain_small.py tune     # fine-tune step 5000 with pose augmentation (~30 min here)
    python weights/brain_small.py ship [RUN [NAME]]   # RUN/last -> weights/NAME (default runs/brain-small-tune,
                                                      # brain-small)
    python weights/brain_small.py recard NAME         # weights/NAME's card as ship writes it, weights kept
    python weights/brain_small.py all      # one run on every subject of weights/brain_data.json (~180 min)
    python weights/brain_small.py all-tune # the shipped model fine-tuned on every subject (~95 min here)
    python weights/brain_small.py sharp    # the successor's engine on every subject, from scratch (75 min)
    python weights/brain_small.py sharp-extend  # resume it to 200 minutes, the LR decaying over the last 30
    python weights/brain_small.py sharp-unmasked  # the same recipe unmasked from step 0, to brain-sharp's 11271
                                                  # steps (~4 h here: resume it across sessions; not shipped yet)
    python weights/brain_small.py heads    # heads with skull as training subjects, in runs/heads-data (~1 min)
    python weights/brain_small.py heads-tune    # brain-sharp fine-tuned on brains and a head (45 min; not shipped)
    python weights/brain_small.py heads-skull   # the same, told whether the sources show a skull (3000 steps);
                                                # ship runs/brain-heads-skull brain-heads
    python weights/brain_small.py sharp-all     # brain-sharp fine-tuned on every subject but one (100 min; not shipped)
    python weights/brain_small.py sharp-control # its control: the same 4933 steps on the eight subjects (not shipped)

The validation subject, TCGA-DU-7294, is held out from training; it is also the example image in
``examples/`` (its T1), so the quickstart synthesizes a T2 the model has never seen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from phmdiff_cli.engine.checkpoint import CARD_FILE, INT8_SCALE, load_model, quantize_int8, save_model
from phmdiff_cli.engine.settings import TrainSettings, load_settings
from phmdiff_cli.engine.source_support import head_foreground
from phmdiff_cli.engine.train_data import load_data, training_contrast, training_domain
from phmdiff_cli.io.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "brain-small"
TUNED = ROOT / "runs" / "brain-small-tune"
DATA = "../shared/data/brats"
DATASET = ["--data", DATA, "--pairs", "t1n:t2w,t1n:t2f,t2w:t2f", "--val-subjects", "TCGA-DU-7294"]
TRAIN = [
    "phmdiff", "train", *DATASET, "--size", "small", "--batch-size", "8", "--lr", "3e-4",
    "--max-steps", "6000", "--minutes", "70", "--val-every", "400", "--val-slices", "8",
    "--checkpoint-minutes", "10", "--precision", "bf16", "--config", "weights/brain_small.json",
    "--out", str(RUN.relative_to(ROOT)),
]
#: ``extend`` resumes the same run to a step count (which, unlike a time budget, does not depend on how
#: busy the machine is), continuing the unmasked fine-tune that began in the first stage's last 10 % of minutes.
RESUME = ["phmdiff", "train", "--resume", "--out", str(RUN.relative_to(ROOT)), "--minutes", "1000"]
#: ``tune`` starts a new run from step 5000's model: random rotations (up to 10 degrees) and zooms (up to 10 %)
#: show the three training subjects in new poses (resuming without them, to step 8400, had overfit), and
#: three more pairs give the same targets from other sources (t1c -> t2w, t1c -> t2f, t2f -> t2w); a fresh
#: optimiser, so a warm-up, the LR decaying to 0 over the second half, unmasked from its 9th step.
TUNE = [
    "phmdiff", "train", "--data", DATA, "--pairs", "t1n:t2w,t1n:t2f,t2w:t2f,t1c:t2w,t1c:t2f,t2f:t2w",
    "--val-subjects", "TCGA-DU-7294", "--init", str(RUN.relative_to(ROOT) / "last"), "--rotate", "10", "--zoom", "0.1",
    "--lr", "1e-4", "--warmup-steps", "50", "--lr-cooldown", "0.5", "--finetune-fraction", "0.99",
    "--max-steps", "900", "--val-every", "300", "--val-slices", "8", "--checkpoint-minutes", "10",
    "--precision", "bf16", "--out", str(TUNED.relative_to(ROOT)),
]
#: ``all`` trains on every subject of the brain data protocol, ``weights/brain_data.json``: brats/, ms_mni/ and
#: brats2013_t1c_flair/ (three sources and grids; subjects without T1 and T2 serve t1c -> t2f), the six pairs
#: above and the four three-sources -> missing-one pairs, validated on four subjects of three sources with the
#: sampler the card ships. The successor of brain-small starts here (its engine: issue "sharp synthesis").
ALL = [
    "phmdiff", "train", "--config", "weights/brain_data.json", "--size", "small", "--batch-size", "8",
    "--lr", "3e-4", "--ema-decay", "0.998", "--rotate", "10", "--zoom", "0.1", "--minutes", "180",
    "--val-every", "400", "--val-slices", "8", "--checkpoint-minutes", "10", "--out", "runs/brain-all",
]


def fine_tune(config: str, init: str, minutes: int, out: str) -> list[str]:
    """A fine-tune of ``init`` on ``config``'s data: a fresh optimiser at LR 1e-4, unmasked from the start, the LR
    decaying to 0 over the second half of ``minutes``."""
    return ["phmdiff", "train", "--config", config, "--init", init, "--batch-size", "8", "--lr", "1e-4",
            "--warmup-steps", "50", "--lr-cooldown", "0.5", "--finetune-fraction", "0.99", "--ema-decay", "0.998",
            "--rotate", "10", "--zoom", "0.1", "--minutes", str(minutes), "--val-every", "500", "--val-slices", "8",
            "--checkpoint-minutes", "10", "--cache-dir", "runs/cache-protocol", "--out", out]


#: ``all-tune`` starts from the shipped model (three training subjects) and fine-tunes it on every training subject
#: of the protocol (eight, from three sources) and its ten pairs: a fresh optimiser at the tune stage's LR, unmasked
#: from the start (the model has had its masked pre-training), the LR decaying to 0 over the second half. A later
#: session continues it with ``--init runs/brain-all-tune/last`` (or ``--resume`` while the run folder exists).
ALL_TUNE = fine_tune("weights/brain_data.json", "weights/brain-small", 95, "runs/brain-all-tune")
#: ``sharp`` starts brain-small's successor (issue "Sharp synthesis"): one 240 px level whose every training
#: sample is the sampler's decisive first evaluation at sigma_max, a regression on the sources (at 30 minutes on
#: two pairs it beat the regression UNet on T1 -> T2, where the diffusion objective's other noise levels halved
#: what the same network learned; benchmarks/README.md), at the UNet's LR 5e-4, on every subject and pair of
#: weights/brain_data.json. Its config is that file plus ``SHARP_MODEL`` (written to ``runs/brain-sharp.json``).
#: ``sharp-extend`` resumed it (92 minutes had run) to a 200-minute total, the LR decaying linearly to 0 over the
#: last 15 % (30 minutes); a later session goes on with ``--resume --minutes N --lr-cooldown F`` (N the new total).
SHARP_MODEL = {"diffusion": {"p_sigma_max": 1.0}, "sampling": {"sampler": "euler", "steps": [1]}}
SHARP_RECIPE = [
    "phmdiff", "train", "--config", "runs/brain-sharp.json", "--size", "small", "--levels", "1",
    "--batch-size", "8", "--lr", "5e-4", "--ema-decay", "0.998", "--rotate", "10", "--zoom", "0.1",
    "--val-every", "500", "--val-slices", "8", "--checkpoint-minutes", "10", "--cache-dir", "runs/cache-protocol",
]
SHARP = [*SHARP_RECIPE, "--minutes", "75", "--out", "runs/brain-sharp"]
#: ``sharp-unmasked`` is brain-sharp's recipe with no token masked from step 0 (brain-sharp trained half its tokens
#: masked for its first 4266 of 11271 steps): at 32 minutes on two pairs the unmasked network scored above the
#: masked one alone, level once finished, and at 80 it beat the regression UNet on T1 -> T2 (benchmarks/README.md,
#: "The regression's parts" and "At 80 minutes"). Its budget is
#: brain-sharp's step count with the same LR decay over the last 15 %, on steps so that a busier machine only makes
#: it slower; it takes about four hours on 2 cores, so a later session goes on with ``phmdiff train --resume --out
#: runs/brain-sharp-unmasked``.
SHARP_UNMASKED = [*SHARP_RECIPE, "--mask-ratio", "0", "--max-steps", "11271", "--lr-cooldown", "0.15",
                  "--out", "runs/brain-sharp-unmasked"]
#: ``heads`` writes heads with skull (issue "Real clinical scans in", part 5) as BraTS-layout subjects under
#: ``HEADS``: the two raw clinical MS patients (T1W and T2W moved onto the FLAIR by their rigid transforms, all three
#: resampled linearly to 1 mm on the FLAIR's field of view; OMS-raw-p04 is validation only). ``heads-tune``
#: fine-tunes brain-sharp on them and the brain protocol (``weights/brain_heads.json``): a fresh optimiser at a
#: fifth of its LR, unmasked, decaying over the second half. Measured, not shipped: the held-out raw head's T1 gave a
#: whole-head T2, but a skull-stripped validation brain lost 3-4 dB on T1 -> T2 (benchmarks/README.md, "Training on
#: heads"); the SPM12 avg152 templates as a further head did not change that.
HEADS = ROOT / "runs" / "heads-data"
RAW_HEADS = {"OMS-raw-p01": "OMS-raw-p01-study1", "OMS-raw-p04": "OMS-raw-p04-study1"}
RAW_NAMES = {"t1n": "T1W", "t2w": "T2W", "t2f": "FLAIR"}
HEADS_TUNE = fine_tune("weights/brain_heads.json", "weights/brain-sharp", 45, "runs/brain-heads")
#: ``heads-skull`` is ``heads-tune`` told which it gets: the model conditioned on whether the sources show a head
#: with skull (``skull_condition``, measured on each subject and input by the largest axial cross-section), since
#: the same T1 ranks mean other tissues in a head than in a stripped brain. Its config is brain_heads.json plus
#: ``SKULL_MODEL`` (written to ``runs/brain-heads-skull.json``). Measured at 45 minutes on heads with noisy air, then
#: at 90 on heads with the air 0 (benchmarks/README.md, "The output confined to the sources"), then to 3000 steps
#: (its LR schedule on steps; 90 minutes bound it where a machine is slower): shipped as ``weights/brain-heads``,
#: the model ``phmdiff synthesize`` picks by default for sources that show a head with skull.
SKULL_MODEL = {"skull_condition": True}
HEADS_SKULL = [*fine_tune("runs/brain-heads-skull.json", "weights/brain-sharp", 90, "runs/brain-heads-skull"),
               "--max-steps", "3000"]
#: ``sharp-all`` is brain-sharp fine-tuned on every subject but one (``weights/brain_all.json``): the protocol's
#: training subjects plus three of its four validation subjects (OMS-MNI-p19, BraTS2013-pat0001 and -pat0002).
#: TCGA-DU-7294 stays out: it is the quick start's example, which should show a brain the model has never seen, and
#: the one protocol subject left to score it on (beside the raw heads of ``benchmarks/clinical_inputs.py``).
#: Measured, not shipped: TCGA-DU-7294's T2 targets fell 0.66-0.96 dB (benchmarks/README.md, "Training on every
#: subject but one").
SHARP_ALL = fine_tune("weights/brain_all.json", "weights/brain-sharp", 100, "runs/brain-sharp-all")
#: ``sharp-control`` is ``sharp-all``'s control: the same recipe and step count (4933, its LR schedule on steps) on
#: the protocol's eight training subjects, to tell the three added subjects from the added steps. Measured, not
#: shipped: TCGA-DU-7294's T2 targets moved -0.18 to +0.02 dB, so the three subjects made sharp-all's loss
#: (benchmarks/README.md, "Training on every subject but one").
SHARP_CONTROL = [*fine_tune("weights/brain_data.json", "weights/brain-sharp", 125, "runs/brain-sharp-control"),
                 "--max-steps", "4933"]
STAGES = {
    "train": TRAIN,
    "extend": [*RESUME, "--max-steps", "5000"],
    "tune": TUNE,
    "all": ALL,
    "all-tune": ALL_TUNE,
    "sharp": SHARP,
    "sharp-unmasked": SHARP_UNMASKED,
    "sharp-extend": ["phmdiff", "train", "--resume", "--out", "runs/brain-sharp", "--minutes", "200",
                     "--lr-cooldown", "0.15", "--checkpoint-minutes", "10"],
    "heads-tune": HEADS_TUNE,
    "heads-skull": HEADS_SKULL,
    "sharp-all": SHARP_ALL,
    "sharp-control": SHARP_CONTROL,
}
#: Stages whose ``--config`` is a data protocol plus model settings, written before they run: (config, protocol,
#: model settings).
STAGE_CONFIGS = {"sharp": (ROOT / "runs" / "brain-sharp.json", "brain_data.json", SHARP_MODEL),
                 "sharp-unmasked": (ROOT / "runs" / "brain-sharp.json", "brain_data.json", SHARP_MODEL),
                 "heads-skull": (ROOT / "runs" / "brain-heads-skull.json", "brain_heads.json", SKULL_MODEL)}
#: The data's terms, from ../shared/data/README.md: weights inherit them (``ship`` adds "validation only" to the
#: subjects a run held out).
BRATS2013 = ("CC BY-NC-SA 3.0 CH (BraTS 2015, Menze et al., IEEE TMI 2015; DeepMedic examples): weights trained on it "
             "are for non-commercial use and shared alike")
LICENCES = {
    "BraTS-GLI-00001-000": "BraTS 2023 challenge terms (research use)",
    "BraTS-MET-00110-000": "BraTS 2023 challenge terms (research use)",
    "BrainLesion-case-01": "source undocumented; treated as BraTS challenge terms (research use)",
    "TCGA-DU-7294": "CC BY 3.0 (TCIA TCGA-LGG, https://doi.org/10.7937/K9/TCIA.2016.L4LTD3TK)",
    **{f"OMS-MNI-p{n}": "CC BY (Lesjak et al., Neuroinformatics 2018, University of Ljubljana)" for n in ("07", "19")},
    **{f"BraTS2013-pat000{n}": BRATS2013 for n in range(1, 7)},
    **{f"OMS-raw-p0{n}": "CC BY (Lesjak et al., Neuroinformatics 2016, University of Ljubljana)" for n in (1, 4)},
}
#: How each run that ``ship`` takes was made.
RECIPES = {
    "brain-small-tune": "python weights/brain_small.py train, extend, then tune",
    "brain-all-tune": "python weights/brain_small.py train, extend, tune, then all-tune (every training subject of "
                      "weights/brain_data.json)",
    "brain-sharp": "python weights/brain_small.py sharp, then sharp-extend (every training subject of "
                   "weights/brain_data.json, 200 minutes)",
    "brain-heads": "python weights/brain_small.py sharp, sharp-extend, heads, then heads-tune (brain-sharp "
                   "fine-tuned on weights/brain_heads.json: the brains and heads with skull)",
    "brain-heads-skull": "python weights/brain_small.py sharp, sharp-extend, heads, then heads-skull (brain-sharp "
                         "fine-tuned 3000 steps on weights/brain_heads.json, the brains and a head with skull, told "
                         "which of the two the sources show)",
}


INTENDED_USE = ("research and demonstration: synthesizing a missing brain MRI contrast (T2, FLAIR, T1c) from the "
                "others on CPU; not for diagnosis")
TRAINED_ON = ("trained on eight skull-stripped adult brains (gliomas, a metastasis, multiple sclerosis; BraTS and MNI "
              "preprocessing, 1 mm isotropic; four of them T1c and FLAIR only); not trained on heads with skull, "
              "thick or anisotropic slices, children, CT or other organs (synthesize warns about such inputs)")
NON_COMMERCIAL = "trained partly on CC BY-NC-SA data: non-commercial use"
#: What each model's card tells people it is for, and what it was not made for.
CARD_NOTES = {
    "brain-small": {
        "intended_use": INTENDED_USE,
        "limitations": f"{TRAINED_ON}; blurred (sharpness about 0.5-0.7) and below a histogram-matched source on "
                       "SSIM for T1 -> T2 and on PSNR for T1c -> FLAIR on brains from other sources "
                       f"(benchmarks/README.md); {NON_COMMERCIAL}",
    },
    "brain-sharp": {
        "intended_use": f"{INTENDED_USE}; the default model since it replaced brain-small: one network evaluation "
                        "per slice averaged with one of its left-right mirror (sampling.mirror), the sources' detail "
                        "added (sampling.source_detail), the output's contrast calibrated to the training targets' "
                        "(sampling.contrast)",
        "limitations": f"{TRAINED_ON}; a regression, smoother than a real scan (sharpness about 0.6-1.2); on the "
                       "validation brains from other sources below a histogram-matched source (with the real "
                       "target's histogram) on T1 -> T2 SSIM on one of two and on T1c -> FLAIR PSNR on two of four "
                       f"(benchmarks/README.md); {NON_COMMERCIAL}",
    },
    "brain-heads": {
        "intended_use": f"{INTENDED_USE}; the default for sources that show a head with skull (phmdiff synthesize "
                        "without --model and without --brain-mask): a whole-head output; brain-sharp's finishing "
                        "steps",
        "limitations": "trained on the eight skull-stripped brains of brain-sharp and one raw clinical head with skull "
                       "(an MS patient's 3 mm T1, T2 and FLAIR, resampled to 1 mm), told which of the two it gets; "
                       "heads from other scanners, children, CT or other organs not seen. On the held-out raw head "
                       "below a histogram-matched T1 (with the real T2's histogram) on T1 -> T2 inside the brain, and "
                       "0.5 dB below brain-sharp on a skull-stripped validation brain (benchmarks/README.md, "
                       f"\"Training on heads\"); {NON_COMMERCIAL}",
    },
}


#: The finishing steps ``phmdiff synthesize`` applies by default per model (``sampling``), each decided by measurement
#: on the validation subjects (benchmarks/README.md): the contrast calibration raised brain-sharp's PSNR on every
#: subject and pair and lowered brain-small's T1 -> T2; the sources' detail raised brain-sharp's T1 -> T2 SSIM on
#: both subjects (a three-level sampler's output is not a blurred mean: not measured on brain-small, left off);
#: test-time mirroring raised brain-sharp's mean SSIM on all ten pairs (measured on it only).
FINISHING = {"brain-sharp": {"contrast": True, "source_detail": True, "mirror": True},
             "brain-heads": {"contrast": True, "source_detail": True, "mirror": True},
             "brain-small": {"contrast": False, "source_detail": False, "mirror": False}}


def measured(card: dict) -> dict:
    """The card's ``input_domain`` and ``contrast``, each measured from its training subjects when the card lacks
    it (cards of runs trained before the trainer measured them)."""
    if "input_domain" in card and "contrast" in card:
        return {"input_domain": card["input_domain"], "contrast": card["contrast"]}
    training = card["training"]
    fields = set(TrainSettings.__dataclass_fields__)
    settings = load_settings(None, {k: v for k, v in training["settings"].items() if k in fields and v is not None})
    subjects = training["subjects"]
    data = load_data(settings, split={**subjects, "rule": subjects["split"]})
    return {"input_domain": card.get("input_domain") or training_domain(data),
            "contrast": card.get("contrast") or training_contrast(data)}


def card_of(card: dict, name: str) -> dict:
    """``card`` as ``weights/<name>`` ships it: measured fields, the card notes, the default finishing steps."""
    model = {**card["model"], "sampling": {**card["model"]["sampling"], **FINISHING[name]}}
    return {**card, "model": model, **measured(card), **CARD_NOTES[name]}


def ship(run: Path, name: str = "brain-small") -> Path:
    """Copy the run's last (EMA) model to ``weights/<name>``, its matrices and kernels as int8 with a float32
    scale per row and the rest as float16 (a quarter of the size; loaded back as float32); the card's data root
    becomes the relative path trained from. ``last/``, not ``best/``: best is picked on the validation
    subject, whose scores the card then reports, so choosing by them would flatter the model."""
    state, card = load_model(run / "last")
    state = {key: t.half() if t.is_floating_point() and not key.endswith(INT8_SCALE) else t
             for key, t in quantize_int8(state).items()}
    training = dict(card["training"])
    training["data"] = {**training["data"], "root": DATA}
    subjects = training["subjects"]
    training["licences"] = {**{sid: LICENCES[sid] for sid in subjects["train"]},
                            **{sid: f"{LICENCES[sid]}; validation only" for sid in subjects["val"]}}
    training["recipe"] = RECIPES[run.name]
    training["stored_dtype"] = "int8 per row (matrices, kernels), float16 (the rest)"
    return save_model(ROOT / "weights" / name, state, card_of({**card, "training": training}, name), force=True)


def recard(name: str) -> Path:
    """Rewrite ``weights/<name>/config.json`` as :func:`card_of` makes it, the weights (and their sha256) kept:
    for card changes without the run folder."""
    path = ROOT / "weights" / name / CARD_FILE
    card = card_of(json.loads(path.read_text()), name)
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def resampled(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """``image`` on ``grid`` (float32, linear, 0 outside) through ``transform`` (grid point -> image point)."""
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, transform or sitk.Transform(), sitk.sitkLinear, 0.0)


def iso_grid(image: sitk.Image, mm: float = 1.0) -> sitk.Image:
    """An empty grid of ``mm`` isotropic voxels over ``image``'s field of view (same origin and direction)."""
    size = [int(round(n * s / mm)) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing([mm] * 3)
    return grid


def head_mask(images: list[sitk.Image]) -> sitk.Image:
    """The head in images of one grid (uint8, 1 inside): ``head_foreground`` (``synthesize`` cuts a head's output
    to the same), dilated by 2 voxels to keep the skin."""
    head = sitk.GetImageFromArray(head_foreground([sitk.GetArrayFromImage(i) for i in images]).astype(np.uint8))
    head.CopyInformation(images[0])
    return sitk.BinaryDilate(head, [2] * 3)


def prepare_heads(data: Path, out: Path = HEADS) -> Path:
    """Write the training heads (see ``HEADS``) of the shared data folder ``data`` as ``out/ID/ID-<modality>.nii.gz``
    (float32, 1 mm, 0 outside the :func:`head_mask`: a raw scan's noisy air, as a target, taught a model to paint
    a haze around every brain); returns ``out``."""
    images: dict[str, dict[str, sitk.Image]] = {}
    for sid, study in RAW_HEADS.items():
        folder = data / "clinical_raw" / study
        flair = sitk.ReadImage(str(folder / "FLAIR.nii.gz"))
        grid = iso_grid(flair)
        moves = {name: sitk.ReadTransform(str(folder / f"{name}_to_FLAIR.txt")) for name in ("T1W", "T2W")}
        images[sid] = {key: resampled(sitk.ReadImage(str(folder / f"{name}.nii.gz")), grid, moves.get(name))
                       for key, name in RAW_NAMES.items()}
    for sid, modalities in images.items():
        (out / sid).mkdir(parents=True, exist_ok=True)
        head = sitk.Cast(head_mask(list(modalities.values())), sitk.sitkFloat32)
        for key, image in modalities.items():
            image = image * head
            with atomic_path(out / sid / f"{sid}-{key}.nii.gz", force=True) as tmp:
                sitk.WriteImage(image, str(tmp))
    return out


def main() -> None:
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action in STAGE_CONFIGS:
        path, protocol, model = STAGE_CONFIGS[action]
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({**json.loads((ROOT / "weights" / protocol).read_text()), "model": model}))
    if action in STAGES:
        sys.exit(subprocess.run(STAGES[action], cwd=ROOT).returncode)  # phmdiff's own message, no traceback
    elif action == "heads":
        print(prepare_heads((ROOT / DATA).parent))
    elif action == "ship" and (len(sys.argv) < 4 or sys.argv[3] in CARD_NOTES):
        print(ship(Path(sys.argv[2]) if len(sys.argv) > 2 else TUNED, *sys.argv[3:4]))
    elif action == "recard" and len(sys.argv) == 3 and sys.argv[2] in CARD_NOTES:
        print(recard(sys.argv[2]))
    else:
        names = " | ".join(CARD_NOTES)
        sys.exit(f"usage: python {Path(__file__).name} {' | '.join(STAGES)} | heads | ship [RUN [{names}]] "
                 f"| recard {names}")


if __name__ == "__main__":
    main()

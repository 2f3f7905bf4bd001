"""`phmdiff train` end to end on real BraTS subjects with the tiny model (64 px at 3.75 mm): a run writes a
loadable model and logs validation metrics; resume is bit-for-bit; Ctrl-C saves; 2 CPU processes via torchrun;
another dataset layout; bad inputs exit 2 and leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.engine.checkpoint import load_training_state
from phmdiff_cli.engine.pretrained import load_pretrained

runner = CliRunner()

GLI, TCGA = "BraTS-GLI-00001-000", "TCGA-DU-7294"
PAIRS = "t1n:t2w,t2w:t2f"
MODALITIES = ("t1n", "t2w", "t2f")
#: Tiny model, small batches and validation: each step takes a fraction of a second on 2 cores.
TINY = "--size tiny --batch-size 4 --val-slices 2 --val-steps 2 --log-every 2 -q".split()


#: One thread per process: on 2 shared cores, two OpenMP threads wait on each other (tiny steps take 30 times
#: longer under load).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


@pytest.fixture(scope="session")
def brats2(brats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two BraTS 2023 subjects (symlinks to the real files)."""
    root = tmp_path_factory.mktemp("brats2")
    for sid in (GLI, TCGA):
        for mod in MODALITIES:
            _link(brats_dir / sid / f"{sid}-{mod}.nii.gz", root / sid / f"{sid}-{mod}.nii.gz")
    return root


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One preprocessing cache for every run of this module (the cache key resolves symlinks)."""
    return tmp_path_factory.mktemp("train-cache")


def _train(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["train", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _base(data: Path, cache: Path, run: Path) -> list[str]:
    """Arguments of a quiet tiny-model run of :data:`PAIRS` on ``data``."""
    return ["--data", str(data), "--pairs", PAIRS, "--out", str(run), "--cache-dir", str(cache), *TINY]


def _command(data: Path, cache: Path, run: Path, *args: str) -> list[str]:
    """``python -m phmdiff_cli train`` of the tiny model, not quiet: progress lines go to stderr."""
    return [sys.executable, "-m", "phmdiff_cli", "train", *_base(data, cache, run)[:-1], *args]


@pytest.fixture(scope="session")
def trained(brats2: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-step run with validation every 6 steps (one subject trains, the other validates)."""
    run = tmp_path_factory.mktemp("runs") / "brain"
    args = ["--max-steps", "12", "--val-every", "6", "--checkpoint-every", "6", "--lr", "1e-3"]
    code, output = _train(*_base(brats2, cache, run), *args)
    assert code == 0, output
    assert "Done: 12 steps" in output
    return run


##################################################################################
#                              A run and its outputs                             #
##################################################################################


@pytest.mark.slow
def test_run_writes_a_loadable_model(trained: Path) -> None:
    model = load_pretrained(trained)  # the run folder resolves to best/
    assert model.path == trained / "best"
    assert [str(p) for p in model.pairs] == PAIRS.split(",")
    assert (model.config.size, model.config.image_size, model.config.spacing_mm) == ("tiny", 64, 3.75)
    last = load_pretrained(trained / "last")
    assert last.card["training"]["steps"] == 12
    split = json.loads((trained / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [GLI, TCGA] and len(split["val"]) == 1
    assert last.card["training"]["subjects"]["val"] == split["val"]
    assert last.card["training"]["data"]["layout"] == "brats2023"
    assert set(last.card["metrics"]["val"]) == {*PAIRS.split(","), "mean"}
    # the training subject's source images, measured for synthesize's input checks: a skull-stripped BraTS brain
    domain = last.card["input_domain"]
    assert domain["images"] == len({p.split(":")[0] for p in PAIRS.split(",")})
    assert 1000 < domain["foreground_ml"][0] <= domain["foreground_ml"][1] < 1700 and domain["slice_mm"] == [1, 1]
    # the training subject's real targets' median over 99.5th percentile, for synthesize's contrast calibration
    train_dir = Path(last.card["training"]["data"]["root"]) / split["train"][0]
    for target in ("t2w", "t2f"):
        real = nib.load(train_dir / f"{split['train'][0]}-{target}.nii.gz").get_fdata()
        brain = real[real > 0.01 * np.percentile(real[real > 0], 99)]
        assert last.card["contrast"][target] == pytest.approx(np.median(brain) / np.percentile(brain, 99.5), abs=1e-4)
    assert set(last.card["contrast"]) == {"t2w", "t2f"} and not last.model.config.sampling.contrast
    saved = json.loads((trained / "train_config.json").read_text())
    assert saved["settings"]["max_steps"] == 12 and saved["model"]["spacing_mm"] == 3.75
    assert load_training_state(trained / "state").extra["run"]["step"] == 12


@pytest.mark.slow
def test_validation_metrics_and_previews_are_logged(trained: Path) -> None:
    log = _log(trained)
    losses = [r for r in log if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6, 8, 10, 12]
    assert all(np.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in losses)
    # finetune_fraction 0.1 of 12 steps: steps 12 (index 11) onwards train unmasked
    assert [r["phase"] for r in losses][-1] == "finetune" and losses[0]["phase"] == "masked"
    vals = [r for r in log if "val" in r]
    assert [r["step"] for r in vals] == [6, 12]
    for record in vals:
        for pair in PAIRS.split(","):
            scores = record["val"]["pairs"][pair]
            assert 0 < scores["psnr"] < 60 and -1 <= scores["ssim"] <= 1
        preview = Image.open(trained / record["preview"])
        # 3 columns (source | synthesized | real) of 64-px slices shown at 128 px; 2 slices per pair
        assert preview.size == (3 * 128, 2 * len(PAIRS.split(",")) * 128)
    assert vals[0]["best"] is True


@pytest.mark.slow
def test_last_card_has_the_final_validation(brats2: Path, cache: Path, tmp_path: Path) -> None:
    """A run whose last step is a checkpoint step but not a validation step: the final validation runs after
    that checkpoint, and ``last/``'s card must carry its metrics, not the previous validation's."""
    run = tmp_path / "run"
    args = ["--max-steps", "8", "--val-every", "6", "--checkpoint-every", "4"]
    code, output = _train(*_base(brats2, cache, run), *args)
    assert code == 0, output
    final = [r for r in _log(run) if "val" in r][-1]
    assert final["step"] == 8
    card = load_pretrained(run / "last").card
    assert card["metrics"]["val_step"] == 8
    assert card["metrics"]["val"]["mean"] == pytest.approx(final["val"]["mean"])


@pytest.mark.slow
def test_init_starts_from_a_model_and_keeps_its_config(
    trained: Path, brats2: Path, cache: Path, tmp_path: Path
) -> None:
    """--init copies a model's weights (one step at a negligible LR leaves them there) and its config (a tiny
    model, though --size defaults to small), and the card counts the initial model's training; model settings
    beside it and a missing model exit 2."""
    run, initial = tmp_path / "run", load_pretrained(trained / "last")
    base = [a for a in _base(brats2, cache, run) if a not in ("--size", "tiny")]
    args = ["--init", str(trained / "last"), "--max-steps", "1", "--lr", "1e-12", "--val-fraction", "0"]
    code, output = _train(*base, *args, "--rotate", "10", "--zoom", "0.1", "--translate", "8")
    assert code == 0, output
    tuned = load_pretrained(run / "last")
    assert tuned.config == initial.config and tuned.config.size == "tiny"
    training = tuned.card["training"]
    assert training["settings"]["init"] == str(trained / "last")
    lineage = {"model": str(trained / "last"), "sha256": initial.card["sha256"], "steps": 12}
    assert {k: training["init"][k] for k in lineage} == lineage
    assert training["total_steps"] == 13 and training["total_elapsed_s"] > initial.card["training"]["elapsed_s"]
    for name, weight in initial.model.state_dict().items():
        assert torch.allclose(tuned.model.state_dict()[name], weight, atol=1e-6), name
    code, output = _train(*base, *args, "--size", "tiny", "--force")
    assert code == 2 and "--size cannot be used with --init" in output
    # the training objective and default sampler may change: the same network trained on its own first evaluations
    objective = tmp_path / "objective.json"
    objective.write_text(json.dumps({"model": {"diffusion": {"own_start": 0.5, "second_sigma": 0.5},
                                               "sampling": {"sampler": "euler"}}}))
    code, output = _train(*base, *args, "--config", str(objective), "--force")
    assert code == 0, output
    changed = load_pretrained(run / "last").config
    assert (changed.diffusion.own_start, changed.diffusion.second_sigma, changed.sampling.sampler) == (
        0.5, 0.5, "euler")
    assert replace(changed, diffusion=initial.config.diffusion, sampling=initial.config.sampling) == initial.config
    # a zero-initialised conditioning may be added (skull_condition): the rest of the network is the initial one
    skull = tmp_path / "skull.json"
    skull.write_text(json.dumps({"model": {"skull_condition": True}}))
    code, output = _train(*base, *args, "--config", str(skull), "--force")
    assert code == 0, output
    grown = load_pretrained(run / "last")
    assert grown.config.skull_condition and replace(grown.config, skull_condition=False) == initial.config
    for name, weight in initial.model.state_dict().items():
        assert torch.allclose(grown.model.state_dict()[name], weight, atol=1e-6), name
    brain, head = grown.model.skull_embed.weight  # one step at a negligible LR; no head in the data
    assert torch.allclose(brain, torch.zeros_like(brain), atol=1e-6) and torch.count_nonzero(head) == 0
    elsewhere = [str(tmp_path / "new") if a == str(run) else a for a in base]
    code, output = _train(*elsewhere, "--init", tmp_path / "nothing", *args[2:])
    assert code == 2 and "nothing" in output and not (tmp_path / "new").exists(), output


##################################################################################
#                                Resume and signals                              #
##################################################################################


@pytest.mark.slow
def test_resume_continues_bit_for_bit(brats2: Path, cache: Path, tmp_path: Path) -> None:
    args = ["--val-fraction", "0", "--log-every", "1", "--checkpoint-every", "2"]
    assert _train(*_base(brats2, cache, tmp_path / "whole"), *args, "--max-steps", "4")[0] == 0
    assert _train(*_base(brats2, cache, tmp_path / "parts"), *args, "--max-steps", "2")[0] == 0
    code, output = _train("--resume", "--out", tmp_path / "parts", "--max-steps", "4")
    assert code == 0, output
    whole, parts = (load_training_state(tmp_path / name / "state") for name in ("whole", "parts"))
    assert parts.extra["run"]["step"] == whole.extra["run"]["step"] == 4
    for key in whole.model:
        assert np.array_equal(whole.model[key].numpy(), parts.model[key].numpy()), key
        assert np.array_equal(whole.ema[key].numpy(), parts.ema[key].numpy()), key
    assert [r["loss"] for r in _log(tmp_path / "whole")] == [r["loss"] for r in _log(tmp_path / "parts")]


@pytest.mark.slow
def test_resume_may_add_an_lr_cooldown(brats2: Path, cache: Path, tmp_path: Path) -> None:
    """The cooldown set on resume decays the LR over the last fraction of the whole run's step budget."""
    run, args = tmp_path / "run", ["--val-fraction", "0", "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "0"]
    assert _train(*_base(brats2, cache, run), *args, "--max-steps", "2")[0] == 0
    code, output = _train("--resume", "--out", run, "--max-steps", "4", "--lr-cooldown", "0.5")
    assert code == 0, output
    # step i (0-based) runs at budget fraction i / 4: constant up to 0.5, then linear to 0 at 1
    assert [r["lr"] for r in _log(run)] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits(brats2: Path, cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = _command(brats2, cache, run, "--val-fraction", "0", "--log-every", "1")
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ONE_THREAD) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("step 2"):
                process.send_signal(signal.SIGINT)
                break
        rest = process.stderr.read()
        code = process.wait(timeout=60)
    assert code == 130, rest
    assert "Stopped by SIGINT" in rest and "--resume" in rest
    step = load_training_state(run / "state").extra["run"]["step"]
    assert step >= 2
    assert load_pretrained(run).card["training"]["steps"] == step


@pytest.mark.slow
def test_sigkill_loses_at_most_one_checkpoint_interval(brats2: Path, cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = _command(
        brats2, cache, run, "--val-fraction", "0", "--log-every", "1", "--checkpoint-every", "2"
    )
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ONE_THREAD) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("step 5"):
                process.kill()
                break
        process.wait(timeout=60)
    saved = load_training_state(run / "state").extra["run"]["step"]
    logged = max(r["step"] for r in _log(run))
    assert saved >= 4 and saved % 2 == 0 and logged - saved <= 2 * 2, (saved, logged)
    code, output = _train("--resume", "--out", run, "--max-steps", str(logged + 1))
    assert code == 0, output
    steps = [r["step"] for r in _log(run)]
    assert steps == list(range(1, logged + 2))  # each step logged once: the killed run's tail was dropped


@pytest.mark.slow
def test_two_cpu_processes_with_torchrun(brats2: Path, cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # a linear LR decay over the whole budget: set from the ranks' agreed clock and step
    cooldown = ["--minutes", "60", "--lr-cooldown", "1"]
    args = ["-q", "--max-steps", "4", *cooldown, "--val-every", "4", "--checkpoint-every", "2"]
    command = torchrun + _command(brats2, cache, run, *args)[1:]  # torchrun -m phmdiff_cli train ...
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Done: 4 steps") == 1  # only rank 0 reports
    assert len(list((run / "state").glob("ckpt-*"))) == 1
    assert [r["step"] for r in _log(run)] == [2, 4, 4]  # only rank 0 logs: two loss lines, one validation
    lr2, lr4 = (r["lr"] for r in _log(run) if "lr" in r)  # steps 1 and 3 (0-based) at 1/4 and 3/4 of the budget
    assert lr2 / lr4 == pytest.approx(3.0, rel=0.01)
    card = load_pretrained(run / "last").card
    assert card["training"]["processes"] == 2 and card["training"]["steps"] == 4


##################################################################################
#                                  Other layout                                  #
##################################################################################


@pytest.mark.slow
def test_brats2021_layout_reuses_the_cache(
    trained: Path, brats_dir: Path, cache: Path, tmp_path: Path
) -> None:
    names = {"t1n": "t1", "t2w": "t2", "t2f": "flair"}
    data = tmp_path / "brats2021"
    for sid in (GLI, TCGA):
        for mod, name in names.items():
            _link(brats_dir / sid / f"{sid}-{mod}.nii.gz", data / sid / f"{sid}_{name}.nii.gz")
    # the files of the `trained` run's subjects under other names: preprocessed once, whatever the layout
    entries = sorted(p.name for p in cache.iterdir())
    args = ["--pairs", "t1:t2,t2:flair", "--val-fraction", "0", "--max-steps", "2"]  # aliases, as users type
    code, output = _train(*_base(data, cache, tmp_path / "run"), *args)
    assert code == 0, output
    assert sorted(p.name for p in cache.iterdir()) == entries
    card = load_pretrained(tmp_path / "run").card
    assert card["training"]["data"]["layout"] == "brats2021"
    assert card["pairs"] == [["t1n", "t2w"], ["t2w", "t2f"]]


##################################################################################
#                                   Bad input                                    #
##################################################################################


def _incomplete(root: Path, brats_dir: Path) -> Path:
    """TCGA without its T2."""
    for sid in (GLI, TCGA):
        for mod in MODALITIES:
            if (sid, mod) != (TCGA, "t2w"):
                _link(brats_dir / sid / f"{sid}-{mod}.nii.gz", root / sid / f"{sid}-{mod}.nii.gz")
    return root


def _mismatched(root: Path, brats_dir: Path) -> Path:
    """GLI's T2 on a 2 mm grid (a small real crop of it, with the spacing doubled in its header)."""
    for mod in ("t1n", "t2f"):
        _link(brats_dir / GLI / f"{GLI}-{mod}.nii.gz", root / GLI / f"{GLI}-{mod}.nii.gz")
    image = nib.load(brats_dir / GLI / f"{GLI}-t2w.nii.gz")
    nib.save(
        nib.Nifti1Image(np.asanyarray(image.dataobj[::2, ::2, ::2]), image.affine @ np.diag([2, 2, 2, 1])),
        root / GLI / f"{GLI}-t2w.nii.gz",
    )
    return root


#: name -> (makes the data folder from brats_dir, or None for brats_dir itself; arguments; expected message).
BAD = {
    "empty folder": (lambda t, b: t.mkdir() or t, ["--pairs", PAIRS], "dataset folder is empty"),
    "unknown modality": (None, ["--pairs", "t1n:t9"], "unknown modality 't9'"),
    "modality not in the data": (None, ["--pairs", "t1n:ct"], "no subject has a ct image"),
    "subject missing the target": (_incomplete, ["--pairs", PAIRS], f"subject {TCGA} lacks t2w"),
    "mismatched grids": (_mismatched, ["--pairs", "t1n:t2f,t2w:t2f"], "not on the grid of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_exits_2_and_leaves_nothing(case: str, brats_dir: Path, tmp_path: Path) -> None:
    make, args, message = BAD[case]
    data = make(tmp_path / "data", brats_dir) if make else brats_dir
    code, output = _train("--data", data, *args, "--out", tmp_path / "run", *TINY)
    assert code == 2, output
    assert output.startswith("Error: ") and message in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()


def test_bad_run_folders_exit_2(brats2: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    cases = {
        "cannot create the run folder": ["--out", tmp_path / "file" / "run"],
        "run folder already exists": ["--out", run],
        "not a phmdiff run folder": ["--out", brats2],
    }
    for message, args in cases.items():
        code, output = _train("--data", brats2, "--pairs", PAIRS, *args, *TINY)
        assert code == 2 and output.startswith("Error: ") and message in output, output
    code, output = _train("--resume", "--out", brats2)
    assert code == 2 and "not a phmdiff run folder" in output
    assert sorted(p.name for p in run.iterdir()) == ["train_config.json"]


@pytest.mark.slow
def test_resume_refuses_other_model_settings(trained: Path) -> None:
    code, output = _train("--resume", "--out", trained, "--lr", "0.1", "--size", "small")
    assert code == 2 and "cannot change --lr, --size when resuming" in output, output

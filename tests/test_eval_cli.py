"""`phmdiff eval` end to end on real volumes: single pairs, folders, masks, grids, outputs, exit codes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.io import read_volume
from phmdiff_cli.metrics import hd95
from phmdiff_cli.metrics.evaluate import auto_mask

runner = CliRunner()
CT_NAME = "totalsegmentator_example_ct_3mm.nii.gz"


def _eval(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["eval", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def _json(*args: str | Path) -> dict:
    code, out, err = _eval(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def _write(array: np.ndarray, like: Path, path: Path, origin_shift: float = 0.0) -> Path:
    """Write ``array`` (z, y, x) on the grid of the image ``like``, origin moved ``origin_shift`` mm in x."""
    reference = sitk.ReadImage(str(like))
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    origin = reference.GetOrigin()
    image.SetOrigin((origin[0] + origin_shift, *origin[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def ct_case(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real CT, a copy +50 HU inside the body, the body mask, and the copy on a grid moved by 3 mm."""
    ct = data_dir / "ct" / CT_NAME
    hu = read_volume(ct).array
    body = auto_mask(hu, "ct")
    folder = tmp_path_factory.mktemp("ct")
    return {
        "ref": ct,
        "pred": _write(np.where(body, hu + 50, hu).astype(np.int32), ct, folder / "sct.nii.gz"),
        "mask": _write(body.astype(np.uint8), ct, folder / "body.nii.gz"),
        "moved": _write(hu.astype(np.int32), ct, folder / "moved-ct.nii.gz", origin_shift=3.0),
        "body_fraction": float(body.mean()),
    }


def test_identical_pair_gives_infinite_psnr_as_null(ct_case: dict[str, Any]) -> None:
    doc = _json("--pred", ct_case["ref"], "--ref", ct_case["ref"], "--metrics", "psnr,ssim,mae")
    case = doc["cases"][0]
    assert case["metrics"] == {"psnr": None, "ssim": pytest.approx(1.0, abs=1e-12), "mae": 0.0}
    assert doc["summary"]["psnr"]["mean"] is None and doc["summary"]["ssim"]["median"] == pytest.approx(1.0)
    assert doc["conventions"] == {
        "modality": "ct",
        "norm": "window",
        "ssim_window": "uniform",
        "mask": "auto",
    }
    assert case["data_range"] == 4024.0


def test_evaluate_is_eval_under_the_design_notes_name(ct_case: dict[str, Any]) -> None:
    args = ["--pred", str(ct_case["ref"]), "--ref", str(ct_case["ref"]), "--metrics", "mae", "--json"]
    alias, plain = runner.invoke(app, ["evaluate", *args]), runner.invoke(app, ["eval", *args])
    assert alias.exit_code == plain.exit_code == 0
    assert json.loads(alias.stdout)["cases"] == json.loads(plain.stdout)["cases"]
    listed = runner.invoke(app, ["--help"]).stdout
    assert " eval " in listed and "evaluate" not in listed  # one help entry


def test_sharpness_single_and_folder_mode(ct_case: dict[str, Any], tmp_path: Path) -> None:
    """The CT against itself: sharpness 1 beside PSNR inf (null); an in-plane blurred copy: below 1, the same
    in folder mode."""
    doc = _json("--pred", ct_case["ref"], "--ref", ct_case["ref"], "--metrics", "psnr,sharpness")
    assert doc["metrics"] == ["psnr", "sharpness"]
    assert doc["cases"][0]["metrics"] == {"psnr": None, "sharpness": pytest.approx(1.0, abs=1e-6)}
    hu = read_volume(ct_case["ref"]).array.astype(np.float32)
    blurred = _write(ndimage.gaussian_filter(hu, (0, 1.5, 1.5)), ct_case["ref"], tmp_path / "blur.nii.gz")
    single_doc = _json("--pred", blurred, "--ref", ct_case["ref"], "--metrics", "sharpness")
    single = single_doc["cases"][0]["metrics"]
    assert 0.3 < single["sharpness"] < 0.9
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    _link(refs / "case-1_ct.nii.gz", ct_case["ref"])
    _link(preds / "case-1-sct.nii.gz", blurred)
    folder = _json("--pred-dir", preds, "--ref-dir", refs, "--target", "ct", "--metrics", "sharpness,mae")
    assert folder["cases"][0]["metrics"]["sharpness"] == pytest.approx(single["sharpness"], rel=1e-12)
    assert folder["summary"]["sharpness"]["n"] == 1


def test_ct_offset_in_the_body_gives_mae_50(ct_case: dict[str, Any]) -> None:
    args = ("--pred", ct_case["pred"], "--ref", ct_case["ref"], "--metrics", "mae,psnr")
    for mask in ("auto", str(ct_case["mask"])):
        metrics = _json(*args, "--mask", mask)["cases"][0]["metrics"]
        assert metrics["mae"] == pytest.approx(50.0, abs=1e-9)
        assert metrics["psnr"] == pytest.approx(20 * math.log10(4024 / 50), abs=0.05)
    whole = _json(*args, "--mask", "none")["cases"][0]
    assert whole["metrics"]["mae"] == pytest.approx(50.0 * ct_case["body_fraction"], rel=1e-6)
    assert whole["mask_voxels"] is None


def test_table_on_stdout_logs_on_stderr(ct_case: dict[str, Any]) -> None:
    code, out, err = _eval("--pred", ct_case["pred"], "--ref", ct_case["ref"], "--metrics", "mae")
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert any(CT_NAME in line and "50.0000" in line for line in lines)
    assert [line.split()[0] for line in lines[-3:]] == ["mean", "std", "median"]
    assert "SynthRAD" in err and "Conventions" not in out


def test_grid_mismatch_is_refused_or_resampled(ct_case: dict[str, Any]) -> None:
    code, out, err = _eval("--pred", ct_case["moved"], "--ref", ct_case["ref"], "--metrics", "mae")
    assert code == 2 and out == ""
    assert "moved-ct.nii.gz" in err and CT_NAME in err and "--resample" in err and "Traceback" not in err
    resampled = _json("--pred", ct_case["moved"], "--ref", ct_case["ref"], "--metrics", "mae", "--resample")
    assert 0 < resampled["cases"][0]["metrics"]["mae"] < 500  # a 1-voxel (3 mm) shift of real anatomy


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "psnr,bogus"], "unknown metric(s) bogus"),
        (["--norm", "zscore"], "--norm takes one of"),
        (["--ssim-window", "box"], "--ssim-window takes one of"),
        (["--data-range", "0"], "--data-range must be a positive number"),
        (["--pred-dir", "."], "either --pred and --ref"),
        (["--mask", "missing-mask.nii.gz"], "missing-mask.nii.gz"),
    ],
)
def test_bad_options_exit_2(ct_case: dict[str, Any], args: list[str], message: str) -> None:
    code, out, err = _eval("--pred", ct_case["pred"], "--ref", ct_case["ref"], *args)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_csv_is_written_and_never_overwritten_silently(ct_case: dict[str, Any], tmp_path: Path) -> None:
    table = tmp_path / "scores.csv"
    args = ("--pred", ct_case["pred"], "--ref", ct_case["ref"], "--metrics", "mae,mse", "--csv", table)
    assert _eval(*args)[0] == 0
    header, row = table.read_text().splitlines()
    assert header == "case,pred,ref,mae,mse"
    assert [float(v) for v in row.split(",")[-2:]] == pytest.approx([50.0, 2500.0])
    code, _, err = _eval(*args)
    assert code == 2 and "already exists" in err and "--force" in err
    assert _eval(*args, "--force")[0] == 0


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def test_folder_mode_matches_brats_subjects(brats_dir: Path, tmp_path: Path) -> None:
    """Predictions that are the subjects' own T2 give PSNR inf (null) only if every match is right."""
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    for subject in ("BraTS-GLI-00001-000", "TCGA-DU-7294", "BrainLesion-case-01"):
        _link(refs / subject, brats_dir / subject)
    _link(
        preds / "BraTS-GLI-00001-000-t2w_syn.nii.gz",
        brats_dir / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2w.nii.gz",
    )
    _link(preds / "TCGA-DU-7294_syn.nii.gz", brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-t2w.nii.gz")
    _link(
        preds / "TCGA-DU-7294-t1n.nii.gz", brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-t1n.nii.gz"
    )  # a source
    _link(preds / "Unknown-Case-9-t2w.nii.gz", brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-t2w.nii.gz")
    code, out, err = _eval(
        "--pred-dir", preds, "--ref-dir", refs, "--target", "t2", "--metrics", "psnr,mae", "--json"
    )
    assert code == 3, err  # a reference without prediction: partial result
    doc = json.loads(out)
    assert [c["case"] for c in doc["cases"]] == ["BraTS-GLI-00001-000", "TCGA-DU-7294"]
    assert all(c["metrics"] == {"psnr": None, "mae": 0.0} for c in doc["cases"])
    assert doc["missing"] == {
        "predictions": ["BrainLesion-case-01"],
        "references": [str(preds / "Unknown-Case-9-t2w.nii.gz")],
    }
    assert "BrainLesion-case-01" in err and "Unknown-Case-9" in err


def test_folder_mode_flat_references_and_id_prefixes(ct_case: dict[str, Any], tmp_path: Path) -> None:
    """``case-1`` must not claim ``case-10``'s prediction; a prediction folder named by the ID matches too."""
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    _link(refs / "case-1_ct.nii.gz", ct_case["ref"])
    _link(refs / "case-10_ct.nii.gz", ct_case["pred"])
    _link(preds / "case-1-sct.nii.gz", ct_case["ref"])
    _link(preds / "case-10" / "sct.nii.gz", ct_case["pred"])
    doc = _json("--pred-dir", preds, "--ref-dir", refs, "--target", "ct", "--metrics", "mae")
    assert {c["case"]: c["metrics"]["mae"] for c in doc["cases"]} == {"case-1": 0.0, "case-10": 0.0}
    assert doc["summary"]["mae"] == {"mean": 0.0, "std": 0.0, "median": 0.0, "n": 2}
    _link(preds / "case-10_syn.nii.gz", ct_case["pred"])
    code, _, err = _eval("--pred-dir", preds, "--ref-dir", refs, "--target", "ct")
    assert code == 2 and "case-10 has 2 predictions" in err


def test_folder_mode_synthrad_layout_with_its_masks(ct_case: dict[str, Any], tmp_path: Path) -> None:
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    _link(refs / "1PA001" / "ct.nii.gz", ct_case["ref"])
    _link(refs / "1PA001" / "mask.nii.gz", ct_case["mask"])
    _link(preds / "1PA001.nii.gz", ct_case["pred"])
    doc = _json(
        "--pred-dir", preds, "--ref-dir", refs, "--target", "ct", "--mask", "mask.nii.gz", "--metrics", "mae"
    )
    assert doc["cases"][0]["case"] == "1PA001"
    assert doc["cases"][0]["metrics"]["mae"] == pytest.approx(50.0, abs=1e-9)
    code, _, err = _eval("--pred-dir", preds, "--ref-dir", refs, "--target", "ct", "--mask", "body.nii.gz")
    assert code == 2 and "mask of subject 1PA001 not found" in err


def test_label_maps_dice_and_hd95(brats_dir: Path, tmp_path: Path) -> None:
    """Label maps (cropped around the tumour to keep HD95 quick) against a copy moved 2 slices along z."""
    full = sitk.ReadImage(str(brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-seg.nii.gz"))
    ref_path = tmp_path / "seg.nii.gz"
    sitk.WriteImage(full[60:140, 60:140, 80:145], str(ref_path))
    seg = read_volume(ref_path)
    moved = np.roll(seg.array, 2, axis=0)
    pred = _write(moved, ref_path, tmp_path / "pred-seg.nii.gz")
    doc = _json("--pred", pred, "--ref", ref_path, "--metrics", "dice,hd95")
    expected = {
        f"dice_{k}": 2
        * ((moved == k) & (seg.array == k)).sum()
        / ((moved == k).sum() + (seg.array == k).sum())
        for k in (1, 2)
    }
    expected |= {f"hd95_{k}": v for k, v in hd95(moved, seg.array, spacing=seg.spacing).items()}
    assert doc["cases"][0]["metrics"] == pytest.approx(expected, abs=1e-6)
    assert 0.3 < doc["cases"][0]["metrics"]["dice_1"] < 1.0

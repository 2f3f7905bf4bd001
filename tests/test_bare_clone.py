"""What a clone without ../shared/data still checks, on real images the repository ships (tests/data/README.md):
a DICOM series read against SimpleITK and written back as a derived series, the example NIfTI round trip, and
`info`, `synthesize` (the shipped model) and `eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app
from phmdiff_cli.io import read_volume, write_volume

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO / "tests" / "data" / "mr_t1_4slices"
EXAMPLE = REPO / "examples" / "TCGA-DU-7294-t1n.nii.gz"
runner = CliRunner()


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_shipped_dicom_series_reads_as_simpleitk_does_and_round_trips(tmp_path: Path) -> None:
    volume, reference = read_volume(SERIES), _sitk_series(SERIES)
    assert volume.size == reference.GetSize() == (512, 512, 4)
    np.testing.assert_allclose(volume.spacing, reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.direction, reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))
    back = read_volume(write_volume(volume, tmp_path / "derived"))
    assert back.same_grid(volume, tol=1e-4) and np.array_equal(back.array, volume.array)


def test_example_nifti_round_trips_exactly(tmp_path: Path) -> None:
    volume = read_volume(EXAMPLE)
    out = read_volume(write_volume(volume, tmp_path / "copy.nii.gz"))
    assert out.same_grid(volume, tol=0) and np.array_equal(out.array, volume.array)


def test_info_synthesize_and_eval_end_to_end_with_the_shipped_model(tmp_path: Path) -> None:
    info = runner.invoke(app, ["info", str(SERIES), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["size"] == [512, 512, 4]
    # 12 slices of the example through the tumour: the shipped model on CPU in seconds
    source = tmp_path / "block-t1n.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(EXAMPLE))[:, :, 70:82], str(source))  # SimpleITK keeps the grid
    out = tmp_path / "block-t2w.nii.gz"
    made = runner.invoke(app, ["synthesize", "--src", str(source), "--target", "t2w", "-o", str(out), "-q", "--json"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["cases"][0]["warnings"] == []  # the shipped example is what the model knows
    synthetic = read_volume(out)
    assert synthetic.same_grid(read_volume(source), tol=1e-6) and np.isfinite(synthetic.array).all()
    scored = runner.invoke(app, ["eval", "--pred", str(out), "--ref", str(out), "--metrics", "ssim,sharpness",
                                 "--json"])
    metrics = json.loads(scored.stdout)["cases"][0]["metrics"]
    assert metrics["ssim"] == 1.0 and metrics["sharpness"] == 1.0

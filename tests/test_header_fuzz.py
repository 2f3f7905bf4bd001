"""Seeded header fuzzing: NIfTI-1 and NIfTI-2 files made from a real volume with 1 to 4 header bytes changed, and
copies of a real 4-slice DICOM series (tests/data) with 1 to 6 header bytes changed in 1 to 3 files, read as
``phmdiff info`` reads them, and (a dozen of those that read, per format) through ``synthesize`` and ``eval``:
each gives an answer or a one-line error, never an internal error."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from io_helpers import read_outcome
from synthesize_helpers import write_tiny_model
from typer.testing import CliRunner

from phmdiff_cli.cli.app import app

runner = CliRunner()
#: Mutants per header format; each reads a 24 x 24 x 6 block of a real T1, a few ms.
MUTANTS = 150
#: Of the mutants that read, this many also go through `synthesize` (a tiny model) and `eval` (~0.2 s each).
COMMANDED = 12


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("fuzz-model") / "model")


def assert_commands_answer(mutants: list[Path], reference: Path, model: Path, out: Path) -> None:
    """``synthesize`` and ``eval`` on each mutant: an output or a one-line error (exit 2), never an internal
    error."""
    for n, mutant in enumerate(mutants):
        made = runner.invoke(app, ["synthesize", "--src", str(mutant), "--src-modality", "t1n", "--target", "t2w",
                                   "--model", str(model), "--steps", "1", "--sampler", "euler", "-o",
                                   str(out / f"synthetic-{n}.nii.gz"), "-q"])
        # psnr and mae: 3-D SSIM's 7-voxel window does not fit the 6-slice block
        scored = runner.invoke(app, ["eval", "--pred", str(mutant), "--ref", str(reference), "--metrics", "psnr,mae",
                                     "--json"])
        for result in (made, scored):
            assert result.exit_code in (0, 2), f"{mutant}: {result.output}"
            assert "internal error" not in result.output and "Traceback" not in result.output, result.output


@pytest.fixture(scope="module")
def originals(brats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, int]]:
    """Uncompressed NIfTI-1 and NIfTI-2 files of a real block, and their header sizes."""
    source = nib.load(brats_dir / "TCGA-DU-7294" / "TCGA-DU-7294-t1n.nii.gz")
    block = np.asanyarray(source.dataobj)[100:124, 100:124, 70:76]
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for kind, image_class, header_bytes in (("nifti1", nib.Nifti1Image, 348), ("nifti2", nib.Nifti2Image, 540)):
        path = root / f"{kind}.nii"
        nib.save(image_class(block, source.affine), path)
        out[kind] = (path.read_bytes(), header_bytes)
    return out


@pytest.mark.parametrize("kind", ["nifti1", "nifti2"])
def test_mutated_headers_never_end_in_an_internal_error(
    kind: str, originals: dict[str, tuple[bytes, int]], tiny_model: Path, tmp_path: Path
) -> None:
    data, header_bytes = originals[kind]
    rng = np.random.default_rng(2026)
    outcomes = {"read": 0, "refused": 0}
    for n in range(MUTANTS):
        mutant = bytearray(data)
        for offset in rng.choice(header_bytes, size=int(rng.integers(1, 5)), replace=False):
            mutant[offset] = int(rng.integers(0, 256))
        path = tmp_path / f"{kind}-{n}.nii"
        path.write_bytes(bytes(mutant))
        outcomes[read_outcome(path)] += 1
    assert outcomes["read"] > 0 and outcomes["refused"] > 0, outcomes  # the mutations reach both outcomes
    # and the command itself: one line, exit 2, for a refused mutant
    refused = next(p for p in sorted(tmp_path.glob("*.nii")) if read_outcome(p) == "refused")
    result = runner.invoke(app, ["info", str(refused)])
    assert result.exit_code == 2 and "internal error" not in result.output and "Traceback" not in result.output
    original = tmp_path / f"{kind}.nii"
    original.write_bytes(data)
    read = [p for p in sorted(tmp_path.glob(f"{kind}-*.nii")) if read_outcome(p) == "read"]
    assert_commands_answer(read[:COMMANDED], original, tiny_model, tmp_path)


DICOM_MUTANTS = 150
SERIES = Path(__file__).resolve().parent / "data" / "mr_t1_4slices"


def test_mutated_dicom_headers_never_end_in_an_internal_error(tiny_model: Path, tmp_path: Path) -> None:
    originals = {p.name: p.read_bytes() for p in sorted(SERIES.glob("*.dcm"))}
    header_bytes = 2048  # the tags before the pixel data (each file is 512 x 512 x 2 bytes of pixels after them)
    rng = np.random.default_rng(2027)
    outcomes = {"read": 0, "refused": 0}
    for n in range(DICOM_MUTANTS):
        folder = tmp_path / f"series-{n}"
        folder.mkdir()
        for name, data in originals.items():
            (folder / name).write_bytes(data)
        for name in rng.choice(sorted(originals), size=int(rng.integers(1, 4)), replace=False):
            mutant = bytearray(originals[name])
            for offset in rng.choice(header_bytes, size=int(rng.integers(1, 7)), replace=False):
                mutant[offset] = int(rng.integers(0, 256))
            (folder / name).write_bytes(bytes(mutant))
        outcomes[read_outcome(folder)] += 1
    assert outcomes["read"] > 0 and outcomes["refused"] > 0, outcomes
    read = [p for p in sorted(tmp_path.glob("series-*")) if read_outcome(p) == "read"]
    assert_commands_answer(read[:COMMANDED], SERIES, tiny_model, tmp_path)

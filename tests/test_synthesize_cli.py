"""`phmdiff synthesize` as a pipeline tool: batch lists, the hub, and the errors users meet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_store_helpers import hf_snapshot
from synthesize_helpers import crop_z, identity_sample, records, run, write_tiny_model

from phmdiff_cli.engine import hub, synthesizer
from phmdiff_cli.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_PARTIAL
from phmdiff_cli.io import read_volume


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("synthesize_cli") / "model")


@pytest.fixture(scope="module")
def cases(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small T1 volumes of two subjects, in subject folders named like BraTS (``ID/ID-t1n.nii.gz``)."""
    root = tmp_path_factory.mktemp("cases")
    out = []
    for subject, z in (("BraTS-GLI-00001-000", 70), ("BraTS-MET-00110-000", 60)):
        (root / subject).mkdir()
        source = data_dir / "brats" / subject / f"{subject}-t1n.nii.gz"
        out.append(crop_z(source, root / subject / f"{subject}-t1n.nii.gz", z, z + 6))
    return out


def test_batch_list_on_stdin_with_one_failing_case(cases: list[Path], tmp_path: Path, model: Path) -> None:
    broken = tmp_path / "broken-t1n.nii.gz"
    broken.write_bytes(b"not an image")
    listing = f"# subjects\n{cases[0]}\n\n{broken}\n{cases[1]}\n"
    pattern = str(tmp_path / "out" / "{stem}_t2w.nii.gz")
    (tmp_path / "out").mkdir()
    result = run("--list", "-", "--target", "t2w", "-o", pattern, "--model", model, "--steps", "1", "--json",
                 "--report", tmp_path / "run.json", input=listing)
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert f"Error: {broken}: not a readable NIfTI file" in result.stderr
    assert "1 of 3 cases failed" in result.stderr
    ok, failed, ok2 = records(result)
    assert [ok["status"], failed["status"], ok2["status"]] == ["ok", "failed", "ok"]
    for record, source in ((ok, cases[0]), (ok2, cases[1])):
        written = tmp_path / "out" / source.name.replace("-t1n.nii.gz", "-t1n_t2w.nii.gz")
        assert record["output"] == str(written)
        assert read_volume(written).same_grid(read_volume(source), tol=1e-6)
        assert record["weights_sha256"] == json.loads((model / "config.json").read_text())["sha256"]
        assert record["device"] == "cpu" and record["precision"] in ("fp32", "bf16") and record["seed"] == 0
        assert record["steps"] == [1, 1, 1] and record["seconds"]["total"] > 0
    assert "not a readable" in failed["error"] and not (tmp_path / "out" / "broken-t1n_t2w.nii.gz").exists()
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["cases"] == records(result) and report["failed"] == 1 and "torch_version" in report


def test_list_file_with_several_sources_per_case_and_parent_pattern(
    data_dir: Path, cases: list[Path], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synthesizer, "sample", identity_sample)
    t2w = crop_z(data_dir / "brats/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2w.nii.gz",
                 tmp_path / "BraTS-GLI-00001-000-t2w.nii.gz", 70, 76)
    listing = tmp_path / "cases.txt"
    listing.write_text(f"{cases[0]}\t{t2w}\n")
    result = run("--list", listing, "--target", "flair", "-o", "{parent}/{stem}_t2f.nii.gz", "--model", model,
                 "--json", "-q")
    assert result.exit_code == 0, result.output
    (record,) = records(result)
    assert record["pair"] == "t1n+t2w:t2f" and [s["modality"] for s in record["sources"]] == ["t1n", "t2w"]
    assert Path(record["output"]) == cases[0].parent / "BraTS-GLI-00001-000-t1n_t2f.nii.gz"


def test_several_cases_need_an_output_pattern_and_distinct_outputs(
    cases: list[Path], tmp_path: Path, model: Path
) -> None:
    listing = "\n".join(map(str, cases))
    result = run(
        "--list", "-", "--target", "t2w", "-o", tmp_path / "one.nii.gz", "--model", model, input=listing
    )
    assert result.exit_code == EXIT_BAD_INPUT and "names one file for 2 cases" in result.stderr
    same = run("--list", "-", "--target", "t2w", "-o", "{parent}/../t2w.nii.gz", "--model", model, "--steps",
               "1", "--json", input=listing)  # both subject folders share one parent
    assert same.exit_code == EXIT_PARTIAL and "case 2 writes the same output as case 1" in same.stderr
    assert [r["status"] for r in records(same)] == ["ok", "failed"]
    assert (cases[0].parent.parent / "t2w.nii.gz").is_file()


def test_model_from_an_offline_hugging_face_cache(
    cases: list[Path],
    tmp_path: Path,
    model: Path,
    hf_cache: Path,
) -> None:
    hf_snapshot(hf_cache, model, repo="org/brain")
    out = tmp_path / "t2w.nii.gz"
    result = run("--src", cases[0], "--target", "t2w", "-o", out, "--model", "hf://org/brain@v1", "--steps",
                 "1", "--json")
    assert result.exit_code == 0, result.output
    assert "models--org--brain" in records(result)[0]["model"] and out.is_file()
    missing = run(
        "--src", cases[0], "--target", "t2w", "-o", tmp_path / "x.nii.gz", "--model", "hf://org/other"
    )
    assert missing.exit_code == EXIT_BAD_INPUT and "not in the local Hugging Face cache" in missing.stderr


def test_target_the_model_does_not_support_lists_what_it_does(
    cases: list[Path], tmp_path: Path, model: Path
) -> None:
    result = run("--src", cases[0], "--target", "t1ce", "-o", tmp_path / "x.nii.gz", "--model", model)
    assert result.exit_code == EXIT_BAD_INPUT
    assert (
        "not trained for t1n:t1c" in result.stderr and "t1n:t2w, t1n+t2w:t2f, pd:t1n, mr:ct" in result.stderr
    )
    unknown = run("--src", cases[0], "--target", "t3", "-o", tmp_path / "x.nii.gz", "--model", model)
    assert unknown.exit_code == EXIT_BAD_INPUT and "unknown modality 't3'" in unknown.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_existing_output_needs_force(cases: list[Path], tmp_path: Path, model: Path) -> None:
    out = tmp_path / "t2w.nii.gz"
    out.write_bytes(b"keep me")
    result = run("--src", cases[0], "--target", "t2w", "-o", out, "--model", tmp_path / "no-model-needed")
    assert (
        result.exit_code == EXIT_BAD_INPUT
        and "output already exists" in result.stderr
        and "--force" in result.stderr
    )
    assert out.read_bytes() == b"keep me"  # refused before the model was even looked for
    forced = run("--src", cases[0], "--target", "t2w", "-o", out, "--model", model, "--steps", "1", "--force")
    assert forced.exit_code == 0 and read_volume(out).same_grid(read_volume(cases[0]))


def test_unreadable_or_unnamed_sources(cases: list[Path], tmp_path: Path, model: Path) -> None:
    missing = run("--src", tmp_path / "nope-t1n.nii.gz", "--target", "t2w", "-o", tmp_path / "a.nii.gz",
                  "--model", model)
    assert missing.exit_code == EXIT_BAD_INPUT and "nope-t1n.nii.gz: no such file" in missing.stderr
    assert "Traceback" not in missing.output
    anonymous = tmp_path / "scan.nii.gz"
    shutil.copy(cases[0], anonymous)
    unnamed = run("--src", anonymous, "--target", "t2w", "-o", tmp_path / "a.nii.gz", "--model", model)
    assert unnamed.exit_code == EXIT_BAD_INPUT and "--src-modality" in unnamed.stderr
    named = run("--src", anonymous, "--src-modality", "t1", "--target", "t2w", "-o", tmp_path / "a.nii.gz",
                "--model", model, "--steps", "1")
    assert named.exit_code == 0, named.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uncertainty", "std.nii.gz"], "--uncertainty needs several draws"),
        (["--steps", "2,2"], "do not fit the model's 3 pyramid levels"),
        (["--sampler", "ddim"], "unknown sampler 'ddim'"),
        (["--device", "cuda:3"], "is not available"),
        (["--precision", "fp8"], "unknown precision"),
        (["--format", "dicom"], "does not match the output name"),
    ],
)
def test_bad_options(cases: list[Path], tmp_path: Path, model: Path, args: list[str], message: str) -> None:
    result = run("--src", cases[0], "--target", "t2w", "-o", tmp_path / "a.nii.gz", "--model", model, *args)
    assert result.exit_code == EXIT_BAD_INPUT and message in result.stderr, result.output
    assert not (tmp_path / "a.nii.gz").exists()


def test_default_model_not_shipped_is_a_clear_error(
    cases: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "SHIPPED_WEIGHTS", tmp_path / "weights")
    monkeypatch.delenv("PHMDIFF_WEIGHTS", raising=False)
    result = run("--src", cases[0], "--target", "t2w", "-o", tmp_path / "a.nii.gz")
    assert result.exit_code == EXIT_BAD_INPUT and "shipped default model is missing" in result.stderr
    assert "phmdiff train" in result.stderr


def test_nan_output_suggests_fp32_and_writes_nothing(
    cases: list[Path], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_sample(*args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        mean, _ = identity_sample(*args, **kwargs)  # type: ignore[arg-type]
        return mean.index_fill(2, torch.tensor([3]), float("nan")), None

    monkeypatch.setattr(synthesizer, "sample", nan_sample)
    out = tmp_path / "a.nii.gz"
    result = run("--src", cases[0], "--target", "t2w", "-o", out, "--model", model)
    assert result.exit_code == EXIT_BAD_INPUT and "NaN or infinite" in result.stderr
    assert "--precision fp32" in result.stderr and list(tmp_path.iterdir()) == []


def test_output_suffix_picks_the_format_and_an_unknown_one_is_refused(
    cases: list[Path], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synthesizer, "sample", identity_sample)
    common = ("--src", cases[0], "--target", "t2w", "--model", model, "--steps", "1")
    refused = run(*common, "-o", tmp_path / "out.txt")
    assert refused.exit_code == EXIT_BAD_INPUT and "unknown output suffix '.txt'" in refused.stderr
    assert ".nii.gz" in refused.stderr and "--format dicom" in refused.stderr
    assert not (tmp_path / "out.txt").exists()
    named = run(*common, "-o", tmp_path / "series.v2", "--format", "dicom")  # any folder name, when asked
    assert named.exit_code == 0, named.output
    assert (tmp_path / "series.v2").is_dir() and any((tmp_path / "series.v2").glob("*.dcm"))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_volumes_thinner_than_the_context_synthesize(
    depth: int, data_dir: Path, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 to 3 slices (the 2.5D context is 3): an output on the source's grid, not an IndexError."""
    monkeypatch.setattr(synthesizer, "sample", identity_sample)
    source = crop_z(data_dir / "brats/TCGA-DU-7294/TCGA-DU-7294-t1n.nii.gz", tmp_path / "thin.nii.gz", 70, 70 + depth)
    out = tmp_path / "out.nii.gz"
    result = run("--src", source, "--src-modality", "t1", "--target", "t2w", "-o", out, "--model", model,
                 "--steps", "1")
    assert result.exit_code == 0, result.output
    assert read_volume(out).same_grid(read_volume(source), tol=1e-6)


@pytest.mark.parametrize("shape", [(2, 2, 3), (300, 300, 4)])
def test_tiny_and_larger_than_grid_images_synthesize(
    shape: tuple[int, int, int], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2 x 2 in-plane image, and one wider than the model grid's field of view (240 mm; the brain is cut, with a
    warning): each gives an output on its own grid."""
    import nibabel as nib

    monkeypatch.setattr(synthesizer, "sample", identity_sample)
    rng = np.random.default_rng(0)
    source = tmp_path / "odd-t1n.nii.gz"
    nib.save(nib.Nifti1Image(rng.uniform(0, 500, shape).astype(np.float32), np.eye(4)), source)
    out = tmp_path / "out.nii.gz"
    result = run("--src", source, "--target", "t2w", "-o", out, "--model", model, "--steps", "1")
    assert result.exit_code == 0, result.output
    assert read_volume(out).same_grid(read_volume(source), tol=1e-6)
    assert ("cuts off" in result.stderr) == (shape[0] > 240)


def test_a_single_dicom_slice_synthesizes(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's MR_small.dcm alone: a one-slice volume in, a one-slice CT (the test model's mr:ct) out, on its
    grid."""
    import pydicom

    monkeypatch.setattr(synthesizer, "sample", identity_sample)
    folder = tmp_path / "mr"
    folder.mkdir()
    (folder / "MR_small.dcm").write_bytes((Path(pydicom.__file__).parent / "data/test_files/MR_small.dcm").read_bytes())
    out = tmp_path / "ct.nii.gz"
    result = run("--src", folder, "--target", "ct", "-o", out, "--model", model, "--steps", "1")
    assert result.exit_code == 0, result.output
    written = read_volume(out)
    assert written.size[2] == 1 and written.same_grid(read_volume(folder), tol=1e-5)


def test_out_of_memory_retries_with_smaller_batches(
    cases: list[Path], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def small_memory(limit: int, error: BaseException):  # noqa: ANN202
        def sample(model: torch.nn.Module, source: torch.Tensor, *args: object, **kwargs: object):  # noqa: ANN202
            if source.shape[0] > limit:
                raise error
            return identity_sample(model, source, *args, **kwargs)  # type: ignore[arg-type]

        return sample

    errors = [
        torch.OutOfMemoryError("CUDA out of memory"),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB (out of memory)"),
        MemoryError(),
    ]
    for n, error in enumerate(errors):
        monkeypatch.setattr(synthesizer, "sample", small_memory(3, error))
        result = run("--src", cases[0], "--target", "t2w", "-o", tmp_path / f"{n}.nii.gz", "--model", model,
                     "--batch-size", "6", "--json")
        assert result.exit_code == 0, result.output
        assert records(result)[0]["batch_size_used"] == 3
    monkeypatch.setattr(synthesizer, "sample", small_memory(0, MemoryError()))
    result = run("--src", cases[0], "--target", "t2w", "-o", tmp_path / "x.nii.gz", "--model", model)
    assert result.exit_code == EXIT_INTERNAL and "out of memory even with one slice" in result.stderr


def test_output_may_not_replace_a_source_folder_even_with_force(cases: list[Path], model: Path) -> None:
    folder = cases[0].parent
    before = sorted(p.name for p in folder.iterdir())
    result = run("--src", cases[0], "--target", "t2w", "-o", folder, "--model", model, "--force")
    assert result.exit_code == EXIT_BAD_INPUT and "would replace the source" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


def test_malformed_output_pattern_is_a_usage_error(cases: list[Path], tmp_path: Path, model: Path) -> None:
    result = run("--src", cases[0], "--target", "t2w", "-o", str(tmp_path / "{stem.foo}.nii.gz"), "--model", model)
    assert result.exit_code == EXIT_BAD_INPUT and "bad output pattern" in result.stderr


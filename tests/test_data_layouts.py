"""Dataset discovery on fixture folders built from the real BraTS / TotalSegmentator files (symlinks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from phmdiff_cli.data.layouts import LABEL_KEY, MASK_KEY, discover, output_path
from phmdiff_cli.data.summary import summary
from phmdiff_cli.errors import InputError

GLI = "BraTS-GLI-00001-000"
TCGA = "TCGA-DU-7294"
BRATS2021_NAMES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


@pytest.fixture
def brats2021(brats_dir: Path, tmp_path: Path) -> Path:
    """Two subjects renamed to the BraTS 2021 convention (``ID_t1ce.nii.gz``, ``ID_seg.nii.gz``)."""
    for sid in (GLI, TCGA):
        for mod, name in BRATS2021_NAMES.items():
            _link(brats_dir / sid / f"{sid}-{mod}.nii.gz", tmp_path / sid / f"{sid}_{name}.nii.gz")
    _link(brats_dir / TCGA / f"{TCGA}-seg.nii.gz", tmp_path / TCGA / f"{TCGA}_seg.nii.gz")
    return tmp_path


@pytest.fixture
def synthrad(data_dir: Path, tmp_path: Path) -> Path:
    """SynthRAD layout: ``1PA001/{mr,ct,mask}.nii.gz`` (MR and CT of different people, on different grids)."""
    ct = data_dir / "ct" / "totalsegmentator_example_ct_3mm.nii.gz"
    _link(data_dir / "ct" / "totalsegmentator_example_mr_sm_3mm.nii.gz", tmp_path / "1PA001" / "mr.nii.gz")
    _link(ct, tmp_path / "1PA001" / "ct.nii.gz")
    sitk.WriteImage(
        sitk.Cast(sitk.ReadImage(str(ct)) > -500, sitk.sitkUInt8), str(tmp_path / "1PA001" / "mask.nii.gz")
    )
    (tmp_path / "overview").mkdir()  # SynthRAD ships spreadsheets in a folder without images
    (tmp_path / "overview" / "1_pelvis_train.csv").write_text("ID\n1PA001\n")
    return tmp_path


@pytest.fixture
def nnunet(brats_dir: Path, tmp_path: Path) -> Path:
    """nnU-Net raw dataset: channels 0 T1, 1 T2, 2 FLAIR; one label."""
    channels = {"0": "T1", "1": "T2", "2": "FLAIR"}
    for sid in (GLI, TCGA):
        for index, mod in enumerate(("t1n", "t2w", "t2f")):
            _link(
                brats_dir / sid / f"{sid}-{mod}.nii.gz", tmp_path / "imagesTr" / f"{sid}_{index:04d}.nii.gz"
            )
    _link(brats_dir / TCGA / f"{TCGA}-seg.nii.gz", tmp_path / "labelsTr" / f"{TCGA}.nii.gz")
    meta = {
        "channel_names": channels,
        "labels": {"background": 0, "tumour": [1, 2]},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    return tmp_path


@pytest.fixture
def manifest(brats_dir: Path, tmp_path: Path) -> Path:
    """CSV manifest with relative and absolute paths, a label and a synthetic image."""
    _link(brats_dir / TCGA / f"{TCGA}-t1n.nii.gz", tmp_path / "img" / "a.nii.gz")
    rows = [
        "subject,modality,path,synthetic",
        "p1,T1,img/a.nii.gz,",
        f"p1,flair,{brats_dir / TCGA / f'{TCGA}-t2f.nii.gz'},",
        f"p1,label,{brats_dir / TCGA / f'{TCGA}-seg.nii.gz'},",
        f"p1,t2,{brats_dir / TCGA / f'{TCGA}-t2w.nii.gz'},yes",
    ]
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_brats2023_real_folder(brats_dir: Path) -> None:
    dataset = discover(brats_dir)
    assert dataset.layout == "brats2023"
    assert [s.id for s in dataset.subjects] == sorted(p.name for p in brats_dir.iterdir() if p.is_dir())
    assert dataset.modalities == ("t1c", "t1n", "t2f", "t2w")
    tcga = dataset.subject(TCGA)
    assert tcga.images["t2f"] == brats_dir / TCGA / f"{TCGA}-t2f.nii.gz"
    assert tcga.label == brats_dir / TCGA / f"{TCGA}-seg.nii.gz"
    assert dataset.subject(GLI).label is None


def test_brats2021_renamed(brats2021: Path) -> None:
    dataset = discover(brats2021)
    assert dataset.layout == "brats2021"
    assert dataset.modalities == ("t1c", "t1n", "t2f", "t2w")
    assert dataset.subject(TCGA).images["t1c"].name == f"{TCGA}_t1ce.nii.gz"
    assert dataset.subject(TCGA).label is not None and dataset.subject(GLI).label is None


def test_synthrad_with_mask(synthrad: Path) -> None:
    dataset = discover(synthrad)
    assert dataset.layout == "synthrad"
    (subject,) = dataset.subjects
    assert subject.id == "1PA001" and set(subject.images) == {"mr", "ct"}
    assert subject.mask == synthrad / "1PA001" / "mask.nii.gz"


def test_nnunet_channels_and_labels(nnunet: Path) -> None:
    dataset = discover(nnunet)
    assert dataset.layout == "nnunet"
    assert dataset.channels == {"t1n": 0, "t2w": 1, "t2f": 2}
    assert [s.id for s in dataset.subjects] == [GLI, TCGA]
    assert dataset.subject(GLI).images["t2f"].name == f"{GLI}_0002.nii.gz"
    assert dataset.subject(TCGA).label == nnunet / "labelsTr" / f"{TCGA}.nii.gz"


def test_csv_manifest(manifest: Path) -> None:
    dataset = discover(manifest)
    assert dataset.layout == "csv" and dataset.manifest == manifest
    (subject,) = dataset.subjects
    assert subject.images == {"t1n": manifest.parent / "img" / "a.nii.gz", "t2f": subject.images["t2f"]}
    assert subject.label is not None and subject.label.name == f"{TCGA}-seg.nii.gz"
    assert subject.synthetic["t2w"][0].name == f"{TCGA}-t2w.nii.gz"
    assert discover(Path("ignored"), manifest=manifest).subjects == dataset.subjects


def _error(root: Path, manifest: Path | None = None) -> InputError:
    with pytest.raises(InputError) as info:
        discover(root, manifest)
    return info.value


def test_errors_name_the_path(tmp_path: Path, brats_dir: Path) -> None:
    assert "does not exist" in _error(tmp_path / "missing").message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _error(empty).message == f"{empty}: dataset folder is empty"
    (empty / "notes").mkdir()
    (empty / "notes" / "readme.txt").write_text("x")
    assert "no subject folders with images" in _error(empty).message
    odd = _link(brats_dir / GLI / f"{GLI}-t1n.nii.gz", tmp_path / "odd" / "P1" / "scan.nii.gz")
    error = _error(tmp_path / "odd")
    assert str(odd) in error.message and "does not name a modality" in error.message and error.hint


def test_mixed_layouts_refused(tmp_path: Path, brats_dir: Path) -> None:
    _link(brats_dir / GLI / f"{GLI}-t1n.nii.gz", tmp_path / GLI / f"{GLI}-t1n.nii.gz")
    _link(brats_dir / TCGA / f"{TCGA}-t1n.nii.gz", tmp_path / TCGA / "t1n.nii.gz")
    assert "different layouts" in _error(tmp_path).message


def test_manifest_errors(tmp_path: Path, brats_dir: Path) -> None:
    image = brats_dir / GLI / f"{GLI}-t1n.nii.gz"
    bad = tmp_path / "bad.csv"
    bad.write_text(f"subject,modality,path\np,t9,{image}\n")
    error = _error(bad)
    assert str(bad) in error.message and "line 2" in error.message and "'t9'" in error.message
    bad.write_text(f"subject,modality,path\np,t1,{tmp_path / 'nope.nii.gz'}\n")
    assert "nope.nii.gz" in _error(bad).message
    bad.write_text(f"subject,path\np,{image}\n")
    assert "lacks column(s) modality" in _error(bad).message


def test_nnunet_unknown_channel_name(nnunet: Path) -> None:
    (nnunet / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "DWI", "2": "FLAIR"}}))
    error = _error(nnunet)
    assert str(nnunet / "dataset.json") in error.message and "'DWI'" in error.message


@pytest.mark.parametrize("layout", ["brats2023", "brats2021", "synthrad", "nnunet", "csv"])
def test_written_files_are_rediscovered(layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Files written with output_path into a new root are found again, synthetic ones apart from real ones."""
    source = {
        "brats2023": lambda: request.getfixturevalue("brats_dir"),
        "brats2021": lambda: request.getfixturevalue("brats2021"),
        "synthrad": lambda: request.getfixturevalue("synthrad"),
        "nnunet": lambda: request.getfixturevalue("nnunet"),
        "csv": lambda: request.getfixturevalue("manifest"),
    }[layout]()
    dataset = discover(source)
    out = tmp_path / "out"
    subject = dataset.subjects[-1]
    real, synthetic_mod = sorted(subject.images.items())[0], sorted(subject.images)[-1]
    _link(real[1], output_path(dataset, out, subject.id, real[0]))
    for variant in (0, 2):
        _link(real[1], output_path(dataset, out, subject.id, synthetic_mod, synthetic=True, variant=variant))
    if subject.label is not None:
        _link(subject.label, output_path(dataset, out, subject.id, LABEL_KEY))
    if layout == "nnunet":
        (out / "dataset.json").write_text((source / "dataset.json").read_text())
    again = discover(out)
    assert again.layout == ("brats2023" if layout == "csv" else layout)
    found = again.subject(subject.id)
    assert set(found.images) == {real[0]}
    assert [p.name for p in found.synthetic[synthetic_mod]] == [
        output_path(dataset, out, subject.id, synthetic_mod, synthetic=True, variant=v).name for v in (0, 2)
    ]
    assert (found.label is None) == (subject.label is None)


def test_output_path_refuses_synthetic_label_and_unknown_channel(nnunet: Path, tmp_path: Path) -> None:
    dataset = discover(nnunet)
    with pytest.raises(InputError, match="cannot be synthetic"):
        output_path(dataset, tmp_path, "x", LABEL_KEY, synthetic=True)
    with pytest.raises(InputError, match="not a channel"):
        output_path(dataset, tmp_path, "x", "ct")
    assert output_path(dataset, tmp_path, "x", "flair") == tmp_path / "imagesTr" / "x_0002.nii.gz"


def test_summary_reads_headers_only(synthrad: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_voxels(*args: object, **kwargs: object) -> None:
        raise AssertionError("summary must not read voxel data")

    monkeypatch.setattr(sitk, "ReadImage", no_voxels)
    result = summary(discover(synthrad))
    monkeypatch.undo()
    ct = sitk.ReadImage(str(data_dir / "ct" / "totalsegmentator_example_ct_3mm.nii.gz"))
    by_key = result.by_key()
    assert result.subjects == 1 and set(by_key) == {"mr", "ct", MASK_KEY}
    assert by_key["ct"]["sizes"] == [ct.GetSize()]
    assert by_key["ct"]["spacings"] == [tuple(round(s, 3) for s in ct.GetSpacing())]
    assert json.loads(json.dumps(result.to_dict()))["modalities"]["ct"]["files"] == 1
    assert result.table().row_count == 3


def test_summary_of_brats(brats_dir: Path) -> None:
    by_key = summary(discover(brats_dir)).by_key()
    assert by_key["t1n"]["files"] == 4 and by_key[LABEL_KEY]["files"] == 1
    assert by_key["t2w"]["sizes"] == [(240, 240, 155)] and by_key["t2w"]["spacings"] == [(1.0, 1.0, 1.0)]

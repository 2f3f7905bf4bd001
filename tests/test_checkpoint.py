"""Model folders (safetensors + model card) and atomic, resumable training state."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from model_store_helpers import CARD, TinyNet, write_model

from phmdiff_cli.engine import checkpoint
from phmdiff_cli.engine.checkpoint import (
    INT8_SCALE,
    clean_state_dict,
    describe_model,
    load_model,
    load_training_state,
    quantize_int8,
    read_card,
    save_model,
    save_training_state,
)
from phmdiff_cli.errors import InputError

TOKENS = torch.arange(10).reshape(2, 5)


# ------------------------------------------------------------------------------------------------------------
# Model folders
# ------------------------------------------------------------------------------------------------------------

def test_round_trip_rebuilds_the_same_network(tmp_path: Path) -> None:
    net = write_model(tmp_path / "m")
    state, card = load_model(tmp_path / "m")
    fresh = TinyNet()
    fresh.load_state_dict(state)  # strict: every key present, none extra
    assert torch.equal(fresh(TOKENS), net(TOKENS))
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert card["sha256"] == hashlib.sha256(weights).hexdigest()
    assert (card["format"], card["format_version"]) == ("phmdiff-model", 1)
    assert card["pairs"] == CARD["pairs"] and card["training"] == CARD["training"]
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == card
    # the .safetensors file with config.json beside it names the same model
    assert torch.equal(load_model(tmp_path / "m" / "model.safetensors")[0]["scale"], net.scale)


def test_files_are_readable_by_others(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "m", *(tmp_path / "m").iterdir()):
        assert path.stat().st_mode & 0o444 & ~umask == 0o444 & ~umask, path


def test_ddp_and_compile_prefixes_are_stripped() -> None:
    net = TinyNet()
    wrapped = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    wrapped["module.block._orig_mod.weight"] = torch.ones(2, 3).t()  # a compiled sub-module, non-contiguous
    clean = clean_state_dict(wrapped)
    assert set(clean) == set(net.state_dict()) | {"block.weight"}
    assert clean["block.weight"].is_contiguous() and clean["block.weight"].shape == (3, 2)
    # the tied readout no longer shares storage with the embedding (safetensors refuses shared tensors)
    assert clean["readout.weight"].data_ptr() != clean["embed.weight"].data_ptr()
    with pytest.raises(ValueError, match="collide"):
        clean_state_dict({"module.w": torch.zeros(1), "w": torch.zeros(1)})


def test_existing_folder_needs_force(tmp_path: Path) -> None:
    write_model(tmp_path / "m", seed=0)
    with pytest.raises(InputError, match="already exists"):
        write_model(tmp_path / "m", seed=1)
    net = write_model(tmp_path / "m", seed=1, force=True)
    assert torch.equal(load_model(tmp_path / "m")[0]["embed.weight"], net.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left


def test_failed_save_keeps_the_previous_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = write_model(tmp_path / "m", seed=0)

    def crash(path: Path) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "sha256_file", crash)  # after model.safetensors, before config.json
    with pytest.raises(OSError, match="disk full"):
        write_model(tmp_path / "m", seed=1, force=True)
    monkeypatch.undo()
    assert torch.equal(load_model(tmp_path / "m")[0]["embed.weight"], net.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("bad, match", [
    ({"pairs": [["t1n", "t9"]]}, "unknown modalities"),
    ({"pairs": [[["t1n", ["t2w"]], "t2f"]]}, "unknown modalities"),
    ({"pairs": []}, "pairs is empty"),
    ({"grid": None}, "'grid'"),
])
def test_invalid_card_is_refused_before_writing(tmp_path: Path, bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_model(tmp_path / "m", **bad)
    assert not (tmp_path / "m").exists()


def test_modified_weights_fail_the_sha256_check(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 mismatch") as error:
        load_model(tmp_path / "m")
    assert error.value.path == str(weights)


def _edit_card(folder: Path, **changes: object) -> Path:
    path = folder / "config.json"
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps({k: v for k, v in card.items() if v is not None}))
    return path


@pytest.mark.parametrize("changes, match", [
    ({"format": "diffusers"}, "format is 'diffusers'"),
    ({"pairs": None}, "'pairs'"),
    ({"pairs": [["t1n", "t2w", "ct"]]}, r"not \[source, target\]"),
    ({"format_version": 2}, "newer than this phmdiff"),
])
def test_incomplete_or_foreign_card_is_an_input_error(tmp_path: Path, changes: dict, match: str) -> None:
    write_model(tmp_path / "m")
    card_path = _edit_card(tmp_path / "m", **changes)
    with pytest.raises(InputError, match=match) as error:
        load_model(tmp_path / "m")
    assert error.value.path == str(card_path)


def test_missing_or_corrupt_files_are_input_errors(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable model card"):
        read_card(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(InputError, match="model file missing") as error:
        load_model(tmp_path / "m")
    assert error.value.path == str(tmp_path / "m" / "config.json")
    with pytest.raises(InputError, match="not a model"):
        load_model(tmp_path / "m" / "notes.txt")


def test_truncated_weights_with_matching_hash_are_an_input_error(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    _edit_card(tmp_path / "m", sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    with pytest.raises(InputError, match="not a valid safetensors file"):
        load_model(tmp_path / "m")


def test_describe_counts_parameters_from_the_header(tmp_path: Path) -> None:
    net = write_model(tmp_path / "m")
    summary = describe_model(tmp_path / "m")
    # the tied readout is stored twice, like in the state dict the model loads
    assert summary["params"] == sum(t.numel() for t in net.state_dict().values())
    assert summary["file_bytes"] == (tmp_path / "m" / "model.safetensors").stat().st_size
    assert summary["metrics"] == CARD["metrics"] and summary["grid"] == CARD["grid"]


def test_int8_weights_load_back_within_half_a_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {"conv": torch.randn(4, 3, 3, 3), "linear": torch.randn(6, 5) * torch.arange(1, 7)[:, None],
             "bias": torch.randn(6), "tokens": TOKENS}
    stored = quantize_int8(state)
    assert stored["conv"].dtype == stored["linear"].dtype == torch.int8 and stored["bias"] is state["bias"]
    assert stored["linear" + INT8_SCALE].shape == (6,)  # one scale per output row
    save_model(tmp_path / "m", stored, CARD)
    loaded, _ = load_model(tmp_path / "m")
    assert set(loaded) == set(state) and loaded["conv"].dtype == torch.float32
    for name in ("conv", "linear"):
        rows = state[name].reshape(state[name].shape[0], -1)
        step = rows.abs().amax(dim=1) / 127  # the row's quantisation step
        error = (loaded[name] - state[name]).reshape(rows.shape).abs().amax(dim=1)
        assert torch.all(error <= step / 2 + 1e-6) and torch.all(error > 0)
    assert torch.equal(loaded["bias"], state["bias"]) and torch.equal(loaded["tokens"], TOKENS)
    assert describe_model(tmp_path / "m")["params"] == sum(t.numel() for t in state.values())


# ------------------------------------------------------------------------------------------------------------
# Training state
# ------------------------------------------------------------------------------------------------------------

def _train_steps(net: TinyNet, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                 n: int) -> None:
    for _ in range(n):
        tokens = torch.randint(0, 10, (4, 5))  # the global RNG, which resume must restore
        loss = net(tokens).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _make_run() -> tuple[TinyNet, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    net = TinyNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    return net, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, opt, sched = _make_run()
    _train_steps(net, opt, sched, 3)
    ema = {k: v * 0.5 for k, v in net.state_dict().items()}
    save_training_state(tmp_path, model=net.state_dict(), ema=ema, optimizer_state=opt.state_dict(),
                        extra={"step": 3, "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                               "sampler": {"epoch": 0, "order": [3, 1, 2]}})
    _train_steps(net, opt, sched, 2)

    torch.manual_seed(123)  # a different RNG state and initialisation, which the checkpoint must override
    net2, opt2, sched2 = _make_run()
    state = load_training_state(tmp_path)
    net2.load_state_dict(state.model)
    opt2.load_state_dict(state.optimizer_state)
    sched2.load_state_dict(state.extra["scheduler"])
    torch.set_rng_state(state.extra["torch_rng"])
    _train_steps(net2, opt2, sched2, 2)
    assert state.extra["step"] == 3 and state.extra["sampler"]["order"] == [3, 1, 2]
    assert state.ema is not None and torch.equal(state.ema["scale"], ema["scale"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    for (name, a), b in zip(net.state_dict().items(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _save_step(root: Path, step: int) -> None:
    """A checkpoint whose every part encodes ``step``, so a mixed checkpoint is detectable."""
    w = torch.full((64, 64), float(step))
    save_training_state(root, model={"w": w}, ema={"w": 2 * w},
                        optimizer_state={"state": {}, "param_groups": [{"lr": 0.5 * step}]},
                        extra={"step": step})


def _assert_consistent(root: Path, step: int | None = None) -> int:
    state = load_training_state(root)
    s = state.extra["step"]
    assert step is None or s == step
    assert torch.equal(state.model["w"], torch.full((64, 64), float(s)))
    assert state.ema is not None and torch.equal(state.ema["w"], torch.full((64, 64), 2.0 * s))
    assert state.optimizer_state["param_groups"][0]["lr"] == 0.5 * s
    return s


def _crash_in_save_file(real=checkpoint.save_file):  # noqa: ANN001
    calls = []

    def save_file(tensors: dict, path: Path, **kw: object) -> None:
        calls.append(path)
        if len(calls) == 2:  # model.safetensors written, ema.safetensors half-written
            Path(path).write_bytes(b"\x00" * 10)
            raise KeyboardInterrupt
        real(tensors, path, **kw)

    return save_file


def _crash_in_torch_save(obj: object, path: Path) -> None:
    Path(path).write_bytes(b"PK\x03\x04 partial")
    raise OSError("No space left on device")


def _crash_in_replace(src: str, dst: str) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("where, crash", [
    ("save_file", _crash_in_save_file()),
    ("torch.save", _crash_in_torch_save),
    ("os.replace", _crash_in_replace),  # everything written, the pointer not yet flipped
])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        where: str, crash: object) -> None:
    _save_step(tmp_path, 1)
    # A SIGKILL runs no cleanup: the half-written folder must stay behind and be ignored.
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)
    owner, name = where.split(".") if "." in where else ("checkpoint", where)
    target = {"torch": checkpoint.torch, "os": checkpoint.os, "checkpoint": checkpoint}[owner]
    monkeypatch.setattr(target, name, crash)
    with pytest.raises((KeyboardInterrupt, OSError)):
        _save_step(tmp_path, 2)
    monkeypatch.undo()
    assert len(list(tmp_path.glob("ckpt-*"))) == 2  # the old one and the leftover
    _assert_consistent(tmp_path, 1)
    _save_step(tmp_path, 3)  # the next save cleans the leftover up
    assert len(list(tmp_path.glob("ckpt-*"))) == 1
    _assert_consistent(tmp_path, 3)


_WRITER = textwrap.dedent("""
    import sys, torch
    from phmdiff_cli.engine.checkpoint import save_training_state
    step = 0
    while True:
        step += 1
        w = torch.full((512, 512), float(step))  # 1 MiB per file, so kills land inside writes too
        save_training_state(sys.argv[1], model={"w": w}, ema={"w": 2 * w}, extra={"step": step},
                            optimizer_state={"state": {}, "param_groups": [{"lr": 0.5 * step}]})
""")


def test_sigkill_at_a_random_moment_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "LATEST").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(float(np.random.default_rng().uniform(0.05, 0.4)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = load_training_state(tmp_path)
    s = state.extra["step"]
    assert s >= 1
    assert torch.equal(state.model["w"], torch.full((512, 512), float(s)))
    assert torch.equal(state.ema["w"], torch.full((512, 512), 2.0 * s))


def test_unsafe_types_are_refused_at_save_time(tmp_path: Path) -> None:
    _save_step(tmp_path, 1)
    with pytest.raises(TypeError, match=r"extra\['numpy_rng'\]\[1\] is a ndarray"):
        save_training_state(tmp_path, model={"w": torch.zeros(1)}, ema=None, optimizer_state={},
                            extra={"numpy_rng": np.random.get_state()})
    _assert_consistent(tmp_path, 1)


class _Exploit:
    """Unpickling this would create a file: the proof that the training state is never unpickled freely."""

    marker: Path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_training_state_is_read_with_weights_only(tmp_path: Path) -> None:
    _save_step(tmp_path, 1)
    exploit = _Exploit()
    exploit.marker = tmp_path / "pwned"
    ckpt = tmp_path / (tmp_path / "LATEST").read_text().strip()
    torch.save({"optimizer": {}, "extra": {"x": exploit}}, ckpt / "training.pt", pickle_module=pickle)
    with pytest.raises(InputError, match="unreadable training state"):
        load_training_state(tmp_path)
    assert not exploit.marker.exists()


def test_missing_checkpoint_and_force(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no training checkpoint"):
        load_training_state(tmp_path)
    _save_step(tmp_path, 1)
    with pytest.raises(InputError, match="already exists"):
        save_training_state(tmp_path, model={}, ema=None, optimizer_state={}, extra={}, force=False)
    (tmp_path / "LATEST").write_text("ckpt-gone\n")
    with pytest.raises(InputError, match="missing or incomplete"):
        load_training_state(tmp_path)

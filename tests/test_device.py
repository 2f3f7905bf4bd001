"""Device and precision policy, autocast agreement, compile-prefix handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)

from phmdiff_cli.config import model_config
from phmdiff_cli.engine import device
from phmdiff_cli.engine.checkpoint import clean_state_dict
from phmdiff_cli.engine.device import (
    autocast,
    compile_model,
    cpu_bf16_speedup,
    cpu_has_amx,
    grad_scaler,
    resolve_device,
    resolve_precision,
    unwrap_model,
)
from phmdiff_cli.errors import InputError
from phmdiff_cli.models import PHMDiff

CPU = torch.device("cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device(" CPU ") == CPU
    mps = torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if mps else "cpu")
    assert resolve_device("auto").type == expected
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(InputError, match="not available"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_resolve_precision_on_cpu() -> None:
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    with pytest.raises(InputError, match="fp16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(InputError, match="unknown precision"):
        resolve_precision("int8", CPU)


@pytest.mark.parametrize(("amx", "speedup", "expected"), [
    (True, 0.5, torch.bfloat16), (False, 2.9, torch.bfloat16), (False, 1.1, None), (False, 0.5, None)])
def test_auto_precision_on_cpu_follows_amx_or_the_measured_bf16_speedup(
    monkeypatch: pytest.MonkeyPatch, amx: bool, speedup: float, expected: torch.dtype | None
) -> None:
    """AMX, or bf16 matrix products measured >= 1.3x faster (a Zen 5 EPYC: 2.9x), -> bf16; a CPU whose bf16
    kernels are no faster (a Xeon without AMX: 0.5x) stays in fp32."""
    monkeypatch.setattr(device, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
    assert resolve_precision("auto", CPU) is expected


def test_bf16_probe_measures_a_ratio() -> None:
    assert 0.05 < cpu_bf16_speedup() < 50
    assert cpu_bf16_speedup() == cpu_bf16_speedup()  # measured once per process: a stable choice


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="Linux only")
def test_amx_detection_agrees_with_cpuinfo() -> None:
    """PyTorch's AMX probe can only succeed where the CPU advertises AMX tiles."""
    if cpu_has_amx():
        assert "amx_bf16" in Path("/proc/cpuinfo").read_text()


def test_grad_scaler_only_for_fp16_on_cuda() -> None:
    assert not grad_scaler(CPU, torch.bfloat16).is_enabled()
    assert not grad_scaler(CPU, None).is_enabled()


def test_bf16_and_fp32_forward_agree() -> None:
    cfg = model_config("tiny")
    torch.manual_seed(0)
    model = PHMDiff(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    side = cfg.level_size(2)
    args = (torch.randn(2, 1, side, side), torch.randn(2), torch.randn(2, 3, 3, side, side),
            torch.randn(2, 1, side, side), torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.tensor([4, 5]))
    with torch.no_grad():
        ref, _ = model(*args, level=2)
        with autocast(CPU, torch.bfloat16):
            low, _ = model(*args, level=2)
        with autocast(CPU, None):
            same, _ = model(*args, level=2)
    assert low.dtype == torch.bfloat16 and same.dtype == torch.float32
    rel = (low.float() - ref).norm() / ref.norm()
    assert 0 < rel < 0.03


def test_compile_prefix_is_stripped_and_regional_compile_keeps_names() -> None:
    model = PHMDiff(model_config("tiny"))
    names = set(model.state_dict())
    wrapped = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    assert unwrap_model(wrapped) is model
    clean = clean_state_dict(wrapped.state_dict())
    assert set(clean) == names
    PHMDiff(model_config("tiny")).load_state_dict(clean, strict=True)
    assert set(compile_model(model).state_dict()) == names

"""Device and precision policy: which device, which autocast dtype, loss scaling, optional torch.compile.

Whether bf16 autocast pays on a CPU depends on the chip, not on a flag it advertises (benchmarks/README.md):
on an Intel Xeon with AVX512-BF16 but no AMX, oneDNN ran the model's matrix products at half the fp32 rate;
on an AMD EPYC (Zen 5, AVX512-BF16, no AMX) a training step of ``small`` is 1.9x faster in bf16. So ``auto``
picks bf16 on a CPU with AMX, or where a short probe measures bf16 matrix products clearly faster
(:func:`cpu_bf16_speedup`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from phmdiff_cli.errors import InputError

__all__ = ["resolve_device", "resolve_precision", "cpu_has_amx", "cpu_bf16_speedup", "autocast", "grad_scaler",
           "compile_model", "unwrap_model"]

_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
#: bf16 autocast is chosen on a CPU without AMX when its matrix products measure at least this much faster
#: (measured: 0.5x on a Xeon without AMX, 2.9x on a Zen 5 EPYC; the margin absorbs a busy machine's noise).
CPU_BF16_MIN_SPEEDUP = 1.3


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` -> a device.

    Raises:
        InputError: unknown spelling, or a device this machine does not have.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InputError(f"device {spec!r} is not available (this machine has {count} CUDA devices)",
                             hint="use --device cpu, or install a CUDA build of PyTorch")
    elif device.type == "mps" and not _mps_available():
        raise InputError("device 'mps' is not available", hint="MPS needs Apple silicon; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


@functools.cache
def cpu_has_amx() -> bool:
    """True when the CPU has usable AMX tiles (bf16 matrix units): asks PyTorch to enable them, which fails
    where the CPU lacks AMX or the OS/hypervisor does not grant it; falls back to /proc/cpuinfo flags."""
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    if init_amx is not None:
        return bool(init_amx())
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "amx_bf16" in cpuinfo.read_text()


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a Transformer-sized linear layer (1024 tokens, 256 -> 1024) on this CPU,
    best of 5 runs each with torch's current threads: about 50 ms, measured once per process."""
    layer, tokens = nn.Linear(256, 1024), torch.randn(1024, 256)

    def best(dtype: torch.dtype | None) -> float:
        times = []
        with torch.no_grad(), autocast(torch.device("cpu"), dtype):
            for _ in range(6):
                start = time.perf_counter()
                layer(tokens)
                times.append(time.perf_counter() - start)
        return min(times[1:])  # the first call pays oneDNN's kernel set-up

    return best(None) / best(torch.bfloat16)


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"`` -> the autocast dtype, or None for plain fp32.

    auto: CUDA -> bf16 where supported (Ampere and newer), else fp16 (with :func:`grad_scaler`); CPU -> bf16
    with AMX or where :func:`cpu_bf16_speedup` is at least :data:`CPU_BF16_MIN_SPEEDUP`, else fp32; MPS -> fp32
    (autocast support there is still partial).

    Raises:
        InputError: unknown spelling, or fp16 requested on a CPU (no fast fp16 kernels there).
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type != "cpu":
            return None
        return torch.bfloat16 if cpu_has_amx() or cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP else None
    if spec not in _PRECISIONS:
        raise InputError(f"unknown precision {spec!r}", hint="use auto, bf16, fp16 or fp32")
    if spec == "fp16" and device.type == "cpu":
        raise InputError("fp16 is not supported on the CPU", hint="use --precision bf16 or fp32")
    return _PRECISIONS[spec]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op when dtype is None (fp32)."""
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 on CUDA (bf16 and fp32 have fp32's exponent range); a disabled one
    passes ``scale(loss)``, ``step(opt)`` and ``update()`` through, so training loops need no branch."""
    enabled = device.type == "cuda" and dtype == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def compile_model(model: nn.Module, **options: object) -> nn.Module:
    """Compile the Transformer blocks of a PHMDiff in place (regional compilation with ``nn.Module.compile``)
    and return the model.

    Compiling each block rather than the whole model keeps the compile time low (identical blocks share the
    compiled code), survives the different shapes of levels and masks, and leaves parameter names unchanged,
    so ``state_dict()`` stays loadable by an uncompiled model.

    Args:
        model: a module with ``blocks`` and ``decoder_blocks`` (PHMDiff).
        options: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``, ``dynamic=True``).
    """
    for block in [*model.blocks, *model.decoder_blocks]:
        block.compile(**options)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile(model)`` wrapper (``_orig_mod``), or the model itself."""
    return getattr(model, "_orig_mod", model)

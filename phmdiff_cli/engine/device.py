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

__all__ = ["resolve_device", "resolve_precision", "cuda_autocast_dtype", "configure_backends", "cpu_has_amx",
           "cpu_bf16_speedup", "autocast", "grad_scaler", "compile_model", "compile_stats", "unwrap_model"]

_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
#: bf16 autocast is chosen on a CPU without AMX when its matrix products measure at least this much faster
#: (measured: 0.5x on a Xeon without AMX, 2.9x on a Zen 5 EPYC; the margin absorbs a busy machine's noise).
CPU_BF16_MIN_SPEEDUP = 1.3
#: The first CUDA compute capability with bf16 tensor cores (Ampere, sm_80). ``torch.cuda.is_bf16_supported()``
#: also says yes on a V100 (sm_70) or T4 (sm_75), where bf16 is emulated, several times slower than fp16.
BF16_MIN_CAPABILITY = (8, 0)
#: Recompiles Dynamo allows per compiled block before it gives up on it. A block meets a handful of shapes (the
#: masked and unmasked token counts of training, full and partial batches, a batch halved after an
#: out-of-memory error); automatic dynamic shapes cover most after the first change. Past the limit the block
#: fails loudly (``fail_on_recompile_limit_hit``) instead of running eager without a word.
RECOMPILE_LIMIT = 16


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

    auto: CUDA -> :func:`cuda_autocast_dtype` of the GPU (bf16 on Ampere and newer, else fp16 with
    :func:`grad_scaler`); CPU -> bf16
    with AMX or where :func:`cpu_bf16_speedup` is at least :data:`CPU_BF16_MIN_SPEEDUP`, else fp32; MPS -> fp32
    (autocast support there is still partial).

    Raises:
        InputError: unknown spelling, or fp16 requested on a CPU (no fast fp16 kernels there).
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return cuda_autocast_dtype(torch.cuda.get_device_capability(device))
        if device.type != "cpu":
            return None
        return torch.bfloat16 if cpu_has_amx() or cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP else None
    if spec not in _PRECISIONS:
        raise InputError(f"unknown precision {spec!r}", hint="use auto, bf16, fp16 or fp32")
    if spec == "fp16" and device.type == "cpu":
        raise InputError("fp16 is not supported on the CPU", hint="use --precision bf16 or fp32")
    return _PRECISIONS[spec]


def cuda_autocast_dtype(capability: tuple[int, int]) -> torch.dtype:
    """bf16 on GPUs of compute capability :data:`BF16_MIN_CAPABILITY` or newer, fp16 (loss-scaled) on older."""
    return torch.bfloat16 if tuple(capability) >= BF16_MIN_CAPABILITY else torch.float16


def configure_backends(device: torch.device) -> dict[str, bool]:
    """On CUDA: TF32 for float32 matrix products and convolutions (Ampere and newer run them on tensor cores,
    10-bit mantissa, as cuDNN already does for convolutions by default) and cuDNN autotuning (the model's
    convolution shapes repeat every step). A no-op elsewhere. Returns what was set, for logs and reports."""
    if device.type != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return {"tf32_matmul": True, "tf32_cudnn": True, "cudnn_benchmark": True}


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

    Dynamo traces the blocks' parameters as inputs (``inline_inbuilt_nn_modules``), so the identical blocks
    share their compiled graphs instead of each adding a cache entry; a new shape (the unmasked fine-tune's
    token count, a partial batch) recompiles once, then dimensions that changed are dynamic. Recompiles are
    capped at :data:`RECOMPILE_LIMIT` per block and hitting the cap is an error, not a silent fall back to eager;
    :func:`compile_stats` counts compilations for the logs.

    Args:
        model: a module with ``blocks`` and ``decoder_blocks`` (PHMDiff).
        options: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``, ``dynamic=True``).
    """
    import torch._dynamo.config as dynamo_config  # imported on use: importing Dynamo takes a second

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.fail_on_recompile_limit_hit = True
    for block in [*model.blocks, *model.decoder_blocks]:
        block.compile(**options)
    return model


def compile_stats() -> dict[str, int]:
    """Dynamo's counters in this process: ``compilations`` (frames compiled: a block class's first compile and
    each recompile for a new shape or guard; the blocks of one class share them) and the ``graphs`` made."""
    from torch._dynamo.utils import counters

    return {"compilations": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"])}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile(model)`` wrapper (``_orig_mod``), or the model itself."""
    return getattr(model, "_orig_mod", model)

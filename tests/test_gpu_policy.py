"""The GPU paths' logic, checked on the CPU: precision choice from a GPU's compute capability, TF32 and cuDNN
settings, the fp16 loss-scaler step (CPU ``GradScaler`` standing in for the CUDA one) with clipping and skipped
steps, the bounded source cache of data workers, the out-of-memory back-off, and compile that does not fall back
to eager silently."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)
from torch import nn

from phmdiff_cli.data import slices
from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.layouts import discover
from phmdiff_cli.data.slices import SliceDataset, parse_pairs
from phmdiff_cli.engine import device, synthesizer
from phmdiff_cli.engine.device import configure_backends, cuda_autocast_dtype, resolve_precision
from phmdiff_cli.engine.settings import TrainSettings
from phmdiff_cli.engine.trainer import optimizer_step
from phmdiff_cli.errors import PhmdiffError

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("gpu", "capability", "dtype"),
    [("V100", (7, 0), torch.float16), ("T4", (7, 5), torch.float16), ("A100", (8, 0), torch.bfloat16),
     ("L4", (8, 9), torch.bfloat16), ("H100", (9, 0), torch.bfloat16)],
)
def test_auto_precision_on_a_gpu_follows_its_compute_capability(
    gpu: str, capability: tuple[int, int], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.cuda.is_bf16_supported()`` says yes on a V100 or T4 (emulated bf16): the capability decides."""
    assert cuda_autocast_dtype(capability) == dtype
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", CUDA) == dtype, gpu


@pytest.fixture
def backend_flags() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_tf32_and_cudnn_autotuning_on_cuda_only(backend_flags: None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
    assert configure_backends(torch.device("cpu")) == {}
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    assert configure_backends(CUDA) == {"tf32_matmul": True, "tf32_cudnn": True, "cudnn_benchmark": True}
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark


def test_gradient_clipping_defaults_to_fp16_runs() -> None:
    assert TrainSettings().clip_norm(torch.float16) == 1.0
    assert TrainSettings().clip_norm(torch.bfloat16) == 0.0 and TrainSettings().clip_norm(None) == 0.0
    assert TrainSettings(grad_clip=0.0).clip_norm(torch.float16) == 0.0
    assert TrainSettings(grad_clip=2.5).clip_norm(None) == 2.5


def _problem() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(16, 8)


def test_loss_scaled_step_clips_and_counts_a_skipped_overflow() -> None:
    model, optimizer, x = _problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # enabled: stands in for CUDA fp16's
    before = [p.detach().clone() for p in model.parameters()]
    norm, skipped = optimizer_step((model(x) * 100).pow(2).mean(), model, optimizer, scaler, clip=1.0)
    assert not skipped and norm is not None and norm > 1.0  # the true norm, unscaled, before clipping
    step = [(p.detach() - b).norm() for p, b in zip(model.parameters(), before, strict=True)]
    assert 0 < float(torch.stack(step).norm()) <= 0.1 * 1.0 + 1e-6  # lr x the clipped norm
    # an overflow (inf gradient): the step is skipped, the weights kept, the scale halved
    kept, scale = [p.detach().clone() for p in model.parameters()], scaler.get_scale()
    norm, skipped = optimizer_step(model(x).sum() * float("inf"), model, optimizer, scaler, clip=1.0)
    assert skipped and scaler.get_scale() == scale / 2
    assert all(torch.equal(p, k) for p, k in zip(model.parameters(), kept, strict=True))


def test_bf16_and_fp32_steps_do_not_clip_or_sync() -> None:
    model, optimizer, x = _problem()
    scaler = device.grad_scaler(torch.device("cpu"), torch.bfloat16)  # disabled: a pass-through
    norm, skipped = optimizer_step(model(x).pow(2).mean(), model, optimizer, scaler, clip=0.0)
    assert norm is None and not skipped


def test_each_worker_keeps_a_bounded_source_cache(
    brats_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subjects = [discover(brats_dir).subject(sid) for sid in ("BraTS-GLI-00001-000", "TCGA-DU-7294")]
    dataset = SliceDataset(subjects, parse_pairs("t1n:t2w,t1c:t2w,t2f:t2w"), ModelGrid(64, 3.75), tmp_path,
                           source_norm="rank")
    one = dataset.source_array(0, "t1n").nbytes
    monkeypatch.setattr(slices, "SOURCE_CACHE_BYTES", 2 * one)
    for item in range(len(dataset.items)):
        dataset[(item, 20, 0)]
        assert sum(a.nbytes for a in dataset._sources.values()) <= 2 * one
    assert len(dataset._sources) == 2  # the two most recently used of six source volumes
    again = dataset.source_array(*next(iter(dataset._sources)))
    assert np.array_equal(again, np.asarray(dataset._sources[next(reversed(dataset._sources))]))


class _Pretrained:
    config = type("C", (), {"context": 1})()


def test_out_of_memory_halves_the_batch_after_releasing_the_failed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """An injected out-of-memory error: the back-off halves the batch until it fits, and by the time it frees
    the cache nothing holds the failed batch (its tensors are gone with the exception's frames)."""
    synth = synthesizer.Synthesizer.__new__(synthesizer.Synthesizer)
    synth.pretrained, synth.device, synth.batch_size = _Pretrained(), torch.device("cpu"), 8
    synth.settings = type("S", (), {"samples": 1})()
    alive: list[object] = []

    def sample_batch(volumes: object, pair: object, skull: bool, z: np.ndarray) -> tuple[np.ndarray, None]:
        held = torch.zeros(len(z), 64, 64)
        import weakref

        alive.append(weakref.ref(held))
        if len(z) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return held.numpy() - 1.0, None

    shrinks: list[int] = []

    def shrink() -> None:
        assert all(ref() is None for ref in alive)  # the failed batch is released first
        shrinks.append(synth.batch_size)
        synthesizer.Synthesizer._shrink_batch(synth)

    monkeypatch.setattr(synth, "_sample_batch", sample_batch)
    monkeypatch.setattr(synth, "_shrink_batch", shrink)
    volume = np.zeros((5, 64, 64), dtype=np.float32)
    mean, _, sampled = synth._sample_volume([volume], None, False, None)  # type: ignore[arg-type]
    assert shrinks == [8, 4] and synth.batch_size == 2 and sampled == 5 and mean.shape == (5, 64, 64)
    synth.batch_size = 1
    with pytest.raises(PhmdiffError, match="out of memory even with one slice"):
        synth._shrink_batch()


def test_regional_compile_meets_every_training_and_sampling_shape_without_falling_back() -> None:
    """Masked and unmasked training steps, full and partial batches, one slice: each block recompiles a few
    times at most, and a block past the limit would raise instead of running eager without a word. Dynamo's
    eager backend: the guards and recompiles are Dynamo's, whatever compiles the graphs."""
    import torch._dynamo

    from phmdiff_cli.config import model_config
    from phmdiff_cli.diffusion import sample, training_loss
    from phmdiff_cli.models import PHMDiff

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = device.compile_model(PHMDiff(cfg), backend="eager")
    assert torch._dynamo.config.fail_on_recompile_limit_hit
    assert torch._dynamo.config.recompile_limit >= device.RECOMPILE_LIMIT

    def batch(n: int) -> dict[str, torch.Tensor]:
        return {"source": torch.randn(n, cfg.max_sources, cfg.source_channels, 64, 64),
                "src_mod": torch.ones(n, cfg.max_sources, dtype=torch.long),
                "tgt_mod": torch.full((n,), 2), "target": torch.rand(n, 1, 64, 64) * 2 - 1}

    for n, ratio in ((4, None), (4, None), (4, 0.0), (3, 0.0)):
        training_loss(model, batch(n), mask_ratio=ratio)[0].backward()
    model.eval()
    for n in (4, 3, 1):
        b = batch(n)
        sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=1)
    stats = device.compile_stats()
    # one class of blocks (DiTBlock): a first compile, then recompiles for new shapes, a few at most
    assert 2 <= stats["compilations"] <= 1 + device.RECOMPILE_LIMIT and stats["graphs"] >= stats["compilations"]
    torch._dynamo.reset()

"""Data-parallel training across processes (``torchrun``): process group setup and the few collectives the
trainer needs.

``torchrun --nproc_per_node N -m phmdiff_cli train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in their environment; :func:`init_distributed` joins them (gloo on
the CPU, nccl on CUDA, each process on GPU ``LOCAL_RANK``). A plain ``phmdiff train`` is world size 1 and
makes no collective call at all.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from phmdiff_cli.engine.device import resolve_device
from phmdiff_cli.errors import InputError

__all__ = ["DistInfo", "init_distributed", "all_max", "mean", "barrier", "shutdown"]

#: Collectives wait this long for the slowest rank; rank 0 preprocesses the data while the others wait.
_TIMEOUT = datetime.timedelta(hours=2)
#: A gloo group for the per-step control values (clock, stop request) on CUDA runs: reducing CPU tensors there
#: leaves the GPU's queue alone, where an NCCL reduction read back to the host would wait for every queued
#: kernel of the step. None: the default group (gloo already, or one process).
_control_group: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the training processes.

    Attributes:
        rank: global rank (0 writes files and logs).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_spec: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1) and pick this process's
    device.

    Args:
        device_spec: ``--device`` (auto, cpu, cuda, cuda:N, mps); under torchrun a CUDA device becomes
            ``cuda:LOCAL_RANK``.

    Raises:
        InputError: the device is unavailable, MPS is asked for with several processes, or there are fewer
            GPUs than processes on this node.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_spec)
    if world_size <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "mps":
        raise InputError("multi-process training does not support MPS", hint="use --device cpu or cuda")
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise InputError(
                f"local rank {info.local_rank} has no GPU (this node has {torch.cuda.device_count()})",
                hint="lower --nproc_per_node",
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=_TIMEOUT, device_id=device if device.type == "cuda" else None
        )
        if backend == "nccl":
            global _control_group
            _control_group = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    return info, device


def all_max(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise maximum of ``values`` over all processes, so every rank takes the same decision (stop,
    switch to the fine-tune phase, learning rate) at the same step; a no-op in a single process. Reduced on
    the CPU (:data:`_control_group`), so it never waits for the GPU."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_control_group)
    return tensor.tolist()


def barrier(info: DistInfo) -> None:
    """Wait for every process (a no-op in a single process)."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group (a no-op in a single process)."""
    global _control_group
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``tensor`` over all processes (the tensor itself in a single process)."""
    if not info.enabled:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / info.world_size

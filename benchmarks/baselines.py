"""The baselines of ``quality.py``: MONAI DDPM/DDIM UNet, one-step regression UNet, histogram-matched inverted
source, and the wall-clock-budget training loop the two UNets share.

Every method is a :data:`Predict`: a batch of :class:`~phmdiff_cli.data.slices.SliceDataset` samples in (the
keys ``source`` ``(B, S, 2k+1, H, W)``, ``src_mod``, ``tgt_mod``, ``target``), the synthesized target slices
``(B, 1, H, W)`` in the model range [-1, 1] out. The baselines read source slot 0 only: the 2.5D stack of the
pair's one source.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from phmdiff_cli.data.normalize import from_model_range
from phmdiff_cli.data.slices import SliceDataset
from phmdiff_cli.engine.device import autocast
from phmdiff_cli.engine.ema import EMA
from phmdiff_cli.engine.settings import TrainSettings
from phmdiff_cli.metrics.evaluate import auto_mask

Batch = dict[str, Tensor]
Predict = Callable[[Batch], Tensor]
#: DDPM training steps (MONAI's default linear beta schedule, shared by the DDIM sampler).
DDPM_STEPS = 1000


def stack(batch: Batch) -> Tensor:
    """The 2.5D source of slot 0: ``(B, 2k+1, H, W)``."""
    return batch["source"][:, 0]


@dataclass
class Trained:
    """A network after :func:`train_for`: its EMA weights (eval mode), optimizer steps and seconds trained."""

    model: nn.Module
    steps: int
    seconds: float


def train_for(model: nn.Module, loss_fn: Callable[[Batch], Tensor], batches: Iterator[Batch], *,
              minutes: float, lr: float, warmup: int, ema_decay: float, dtype: torch.dtype | None) -> Trained:
    """Train ``model`` until ``minutes`` of wall clock have passed, as ``phmdiff train`` does: AdamW (no weight
    decay), a linear warm-up then a constant learning rate, autocast to ``dtype`` (None: fp32), EMA weights kept
    and returned. Like the trainer's budget, the clock starts at the first step and data loading counts."""
    schedule = TrainSettings(lr=lr, warmup_steps=warmup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = EMA(model, ema_decay)
    model.train()
    start, steps = time.monotonic(), 0
    while time.monotonic() - start < minutes * 60:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(steps)
        with autocast(torch.device("cpu"), dtype):
            loss = loss_fn(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)
        steps += 1
    return Trained(ema.module, steps, time.monotonic() - start)


# ----------------------------------------------------------------------------- one-step regression UNet


def regression_unet(context: int) -> nn.Module:
    """MONAI BasicUNet, ``context`` source channels in, one target channel out (about 1.9 M parameters)."""
    return BasicUNet(spatial_dims=2, in_channels=context, out_channels=1, features=(16, 32, 64, 128, 256, 16))


def l1_loss(model: nn.Module) -> Callable[[Batch], Tensor]:
    return lambda batch: F.l1_loss(model(stack(batch)), batch["target"])


def regression_predict(model: nn.Module) -> Predict:
    return lambda batch: model(stack(batch)).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------- conditional DDPM, DDIM sampling


def ddpm_unet(context: int) -> nn.Module:
    """MONAI DiffusionModelUNet on the noisy target concatenated with ``context`` source channels. No
    attention: at the lowest level (60 x 60 px) it would cost more per step than the convolutions, leaving
    fewer steps in the budget."""
    return DiffusionModelUNet(spatial_dims=2, in_channels=1 + context, out_channels=1, channels=(32, 64, 64),
                              attention_levels=(False, False, False), num_res_blocks=1)


def ddpm_loss(model: nn.Module) -> Callable[[Batch], Tensor]:
    """Epsilon-prediction MSE at a uniformly drawn DDPM timestep."""
    scheduler = DDPMScheduler(num_train_timesteps=DDPM_STEPS)

    def loss(batch: Batch) -> Tensor:
        target = batch["target"]
        noise = torch.randn_like(target)
        t = torch.randint(0, DDPM_STEPS, (len(target),))
        x = torch.cat([scheduler.add_noise(target, noise, t), stack(batch)], dim=1)
        return F.mse_loss(model(x, timesteps=t), noise)

    return loss


def ddim_predict(model: nn.Module, steps: int, seed: int, dtype: torch.dtype | None) -> Predict:
    """Deterministic DDIM (eta 0, x0 clipped to [-1, 1]) in ``steps`` network evaluations, from noise seeded
    by ``seed`` at every batch. The network runs under autocast to ``dtype`` (None: fp32), the precision it
    was trained in; the DDIM state stays fp32. Why not fp32: on the 2-core CPU of benchmarks/README.md one
    fp32 forward of 8 slices takes ~40 s (~15 s in bf16), so 20 fp32 steps over 32 slices take ~50 min."""
    scheduler = DDIMScheduler(num_train_timesteps=DDPM_STEPS)
    scheduler.set_timesteps(steps)

    def predict(batch: Batch) -> Tensor:
        cond = stack(batch)
        x = torch.randn(len(cond), 1, *cond.shape[-2:], generator=torch.Generator().manual_seed(seed))
        for t in scheduler.timesteps:
            with autocast(torch.device("cpu"), dtype):
                eps = model(torch.cat([x, cond], dim=1), timesteps=torch.full((len(x),), int(t)))
            x, _ = scheduler.step(eps.float(), int(t), x)
        return x.clamp(-1.0, 1.0)

    return predict


# ----------------------------------------------------------------------------- histogram-matched inverted source


def pooled_foreground(dataset: SliceDataset, modality: str, every: int = 7) -> np.ndarray:
    """Sorted model-range values of ``modality`` inside its evaluation mask (:func:`auto_mask` of the volume
    in file units), pooled over all subjects of ``dataset`` (every ``every``-th voxel: plenty for quantiles)."""
    values = []
    for index, subject in enumerate(dataset.subjects):
        if modality in subject.params:
            volume = np.asarray(dataset.array(index, modality), dtype=np.float32)  # (z, H, W)
            mask = auto_mask(from_model_range(volume, subject.params[modality]), modality)
            values.append(volume[mask][::every])
    return np.sort(np.concatenate(values))


def hist_matched_inverted(reference: np.ndarray, modality: str) -> Predict:
    """The source's centre slice, inverted inside its foreground and mapped by quantiles onto ``reference``
    (sorted target values of other subjects, :func:`pooled_foreground`); the background stays at -1.

    The foreground is :func:`auto_mask` of the slice on the [0, 1] scale (its threshold is relative, so the
    scale does not matter); ``modality`` is the source's."""

    def match(image: np.ndarray) -> np.ndarray:
        """``(H, W)`` model-range source slice -> ``(H, W)`` model-range prediction."""
        out = np.full_like(image, -1.0)
        mask = auto_mask(((image + 1.0) * 0.5)[None], modality)[0]
        n = int(mask.sum())
        if n:
            order = np.argsort(-image[mask], kind="stable")  # brightest source voxel -> darkest quantile
            quantile = np.empty(n)
            quantile[order] = (np.arange(n) + 0.5) / n
            out[mask] = reference[(quantile * reference.size).astype(int)]
        return out

    def predict(batch: Batch) -> Tensor:
        source = stack(batch)
        centre = source[:, source.shape[1] // 2].numpy()
        return torch.from_numpy(np.stack([match(image) for image in centre]))[:, None]

    return predict

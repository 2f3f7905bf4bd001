"""The baselines of ``quality.py``: MONAI DDPM/DDIM UNet, one-step regression UNet, histogram-matched inverted
source, and the wall-clock-budget training loop the two UNets share.

The UNets are :data:`Predict`: a batch of :class:`~phmdiff_cli.data.slices.SliceDataset` samples in (the
keys ``source`` ``(B, S, 2k+1, H, W)``, ``src_mod``, ``tgt_mod``, ``target``), the synthesized target slices
``(B, 1, H, W)`` in the model range [-1, 1] out. They read source slot 0 only (the 2.5D stack of a one-source
pair) and are told which of their pairs a sample is by the group of input channels its source fills, so one
network serves them all.
The histogram baseline works on whole volumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from phmdiff_cli.data.slices import Pair, SliceDataset
from phmdiff_cli.engine.device import autocast
from phmdiff_cli.engine.ema import EMA
from phmdiff_cli.engine.settings import TrainSettings
from phmdiff_cli.metrics.evaluate import auto_mask
from phmdiff_cli.modalities import modality_id

Batch = dict[str, Tensor]
Predict = Callable[[Batch], Tensor]
#: DDPM training steps (MONAI's default linear beta schedule, shared by the DDIM sampler).
DDPM_STEPS = 1000


def stack(batch: Batch, pairs: Sequence[Pair]) -> Tensor:
    """The 2.5D source of slot 0 in its pair's group of channels, the other pairs' groups zero:
    ``(B, len(pairs) * (2k+1), H, W)``. (Constant one-hot planes would tell a network the pair only at the image
    border: the normalisation after its first convolution subtracts their constant response.)"""
    source = batch["source"][:, 0]
    ids = torch.tensor([[modality_id(p.sources[0]), modality_id(p.target)] for p in pairs])
    which = torch.stack([batch["src_mod"][:, 0], batch["tgt_mod"]], dim=1)  # (B, 2)
    onehot = (which[:, None, :] == ids[None]).all(dim=2).to(source.dtype)  # (B, len(pairs))
    return (onehot[:, :, None, None, None] * source[:, None]).flatten(1, 2)


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


def regression_unet(context: int, pairs: Sequence[Pair]) -> nn.Module:
    """MONAI BasicUNet, ``context`` source channels per pair in (:func:`stack`), one target channel out (about
    1.9 M parameters)."""
    return BasicUNet(spatial_dims=2, in_channels=context * len(pairs), out_channels=1,
                     features=(16, 32, 64, 128, 256, 16))


def l1_loss(model: nn.Module, pairs: Sequence[Pair]) -> Callable[[Batch], Tensor]:
    return lambda batch: F.l1_loss(model(stack(batch, pairs)), batch["target"])


def regression_predict(model: nn.Module, pairs: Sequence[Pair], mirror: bool = False) -> Predict:
    """One forward pass; with ``mirror``, averaged with the pass on the left-right mirrored slices (flipped
    back), the test-time mirroring ``phmdiff synthesize`` applies."""

    def predict(batch: Batch) -> Tensor:
        x = stack(batch, pairs)
        out = model(x)
        if mirror:
            out = 0.5 * (out + model(x.flip(-1)).flip(-1))
        return out.clamp(-1.0, 1.0)

    return predict


# ----------------------------------------------------------------------------- conditional DDPM, DDIM sampling


def ddpm_unet(context: int, pairs: Sequence[Pair]) -> nn.Module:
    """MONAI DiffusionModelUNet on the noisy target concatenated with ``context`` source channels. No
    attention: at the lowest level (60 x 60 px) it would cost more per step than the convolutions, leaving
    fewer steps in the budget."""
    return DiffusionModelUNet(spatial_dims=2, in_channels=1 + context * len(pairs), out_channels=1,
                              channels=(32, 64, 64), attention_levels=(False, False, False), num_res_blocks=1)


def ddpm_loss(model: nn.Module, pairs: Sequence[Pair]) -> Callable[[Batch], Tensor]:
    """Epsilon-prediction MSE at a uniformly drawn DDPM timestep."""
    scheduler = DDPMScheduler(num_train_timesteps=DDPM_STEPS)

    def loss(batch: Batch) -> Tensor:
        target = batch["target"]
        noise = torch.randn_like(target)
        t = torch.randint(0, DDPM_STEPS, (len(target),))
        x = torch.cat([scheduler.add_noise(target, noise, t), stack(batch, pairs)], dim=1)
        return F.mse_loss(model(x, timesteps=t), noise)

    return loss


def ddim_predict(model: nn.Module, pairs: Sequence[Pair], steps: int, seed: int) -> Predict:
    """Deterministic DDIM (eta 0, x0 clipped to [-1, 1]) in ``steps`` network evaluations, from noise seeded
    by ``seed`` at every batch; the DDIM state stays fp32 under the caller's autocast."""
    scheduler = DDIMScheduler(num_train_timesteps=DDPM_STEPS)
    scheduler.set_timesteps(steps)

    def predict(batch: Batch) -> Tensor:
        cond = stack(batch, pairs)
        x = torch.randn(len(cond), 1, *cond.shape[-2:], generator=torch.Generator().manual_seed(seed))
        for t in scheduler.timesteps:
            eps = model(torch.cat([x, cond], dim=1), timesteps=torch.full((len(x),), int(t)))
            x, _ = scheduler.step(eps.float(), int(t), x)
        return x.clamp(-1.0, 1.0)

    return predict


# ----------------------------------------------------------------------------- histogram-matched source

def _foreground(volume: np.ndarray, modality: str) -> np.ndarray:
    """The evaluation mask (:func:`auto_mask`) of a model-range volume ``(z, H, W)`` on the [0, 1] scale."""
    return auto_mask((volume + 1.0) * 0.5, modality)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Each value's quantile in ``values`` (ties broken by position), in (0, 1)."""
    order = np.argsort(values, kind="stable")
    quantile = np.empty(order.size)
    quantile[order] = (np.arange(order.size) + 0.5) / order.size
    return quantile


def match_quantiles(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``values`` ``(n,)`` mapped by quantiles onto ``reference``'s values: the same ranks, the reference's
    histogram."""
    reference = np.sort(reference, axis=None)
    return reference[(_ranks(values) * reference.size).astype(int)]


def best_source(sources: dict[str, np.ndarray], real: np.ndarray, mask: np.ndarray) -> tuple[str, float]:
    """The source most rank-correlated with the real target inside ``mask`` (an oracle choice) and the
    correlation's sign: -1 where the source is inverted against the target (T1 against T2: CSF dark in one,
    bright in the other)."""
    target = _ranks(real[mask])
    found = {name: float(np.corrcoef(_ranks(volume[mask]), target)[0, 1]) for name, volume in sources.items()}
    name = max(found, key=lambda n: abs(found[n]))
    return name, float(np.sign(found[name]))


def hist_matched(dataset: SliceDataset, item: int) -> np.ndarray:
    """The item's source volume inside its foreground, mapped by quantiles onto the foreground values of the
    same subject's *real* target (an oracle histogram); background -1. Of several sources the one most
    rank-correlated with the real target is used, inverted where that correlation is negative (T1 -> T2): both
    oracle choices, so the bar is the strongest a histogram gives. Returns float32 ``(z, H, W)`` in the model
    range."""
    subject, pair = dataset.items[item]
    real = np.asarray(dataset.array(subject, pair.target), dtype=np.float32)
    target_mask = _foreground(real, pair.target)
    sources = {m: np.asarray(dataset.array(subject, m), dtype=np.float32) for m in pair.sources}
    inside = np.logical_and.reduce([target_mask, *(_foreground(v, m) for m, v in sources.items())])
    name, sign = best_source(sources, real, inside)
    out = np.full_like(sources[name], -1.0)
    mask = _foreground(sources[name], name)
    out[mask] = match_quantiles(sign * sources[name][mask], real[target_mask])
    return out

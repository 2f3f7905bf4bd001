"""Exponential moving average (EMA) of a model's weights: what validation and the saved models use.

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the schedule of TensorFlow's
``ExponentialMovingAverage(num_updates=...)``), so a short run's EMA follows the trained weights instead of
staying near the random initialisation, while a long run's averages over about ``1 / (1 - decay)`` steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """An EMA copy of ``model`` (float32, no gradients, same device).

    Args:
        model: the trained model (uncompiled, not DDP-wrapped).
        decay: the decay after warm-up, e.g. 0.999.

    Attributes:
        module: the averaged model, in eval mode.
        updates: number of :meth:`update` calls so far (saved for resume).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} outside [0, 1)")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema <- decay * ema + (1 - decay) * model`` for every parameter; buffers are copied."""
        weight = 1.0 - self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, weight)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the model's own state dict."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore weights and update count saved by :meth:`state_dict` (resume)."""
        self.module.load_state_dict(state)
        self.updates = updates

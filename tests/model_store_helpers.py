"""A tiny torch module and a model card for the model-store tests (checkpoint, hub, ``phmdiff models``)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phmdiff_cli.engine.checkpoint import save_model

__all__ = ["TinyNet", "CARD", "COMMIT", "write_model", "hf_snapshot"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"

#: A card as the trainer would pass it to save_model (the bookkeeping keys are filled in by save_model).
CARD: dict[str, Any] = {
    "model": {"kind": "tiny", "vocab": 10, "dim": 16},
    "pairs": [["t1n", "t2w"], ["t1n", "t2f"]],
    "modalities": ["t1n", "t2w", "t2f"],
    "grid": {"size": 64, "spacing_mm": 3.75},  # as ModelGrid.to_dict writes it
    "normalisation": {"mri": {"percentile": 99.5, "range": [-1, 1]}},
    "training": {"data": [{"name": "BraTS 2023 (4 subjects)", "licence": "BraTS challenge terms"}],
                 "steps": 12},
    "metrics": {"val": {"t1n->t2w": {"psnr": 21.5, "ssim": 0.8}}},
}


class TinyNet(nn.Module):
    """Token ids (B, N) -> logits (B, N, vocab), with the cases safetensors is picky about: a readout tied
    to the embedding (shared storage) and a buffer."""

    def __init__(self, vocab: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.readout = nn.Linear(dim, vocab, bias=False)
        self.readout.weight = self.embed.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.norm(self.embed(tokens)) * self.scale)


def write_model(folder: Path, *, seed: int = 0, force: bool = False, **card: Any) -> TinyNet:
    """Save a seeded TinyNet with :data:`CARD` (keys overridden by ``card``) in ``folder``; return the net."""
    torch.manual_seed(seed)
    net = TinyNet()
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_model(folder, net.state_dict(), {**copy.deepcopy(CARD), **card}, force=force)
    return net


def hf_snapshot(root: Path, model: Path, repo: str = "org/brain", sub: str = "") -> Path:
    """The Hugging Face cache layout: models--org--repo/{refs/main, snapshots/<commit>/...}."""
    storage = root / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT / sub
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(model / name, snapshot / name)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    (storage / "refs" / "v1").write_text(COMMIT)
    return storage / "snapshots" / COMMIT / sub

"""A PHMDiff model and its card, together: the card the trainer writes and the model the synthesizer loads.

:mod:`phmdiff_cli.engine.checkpoint` stores generic tensors and JSON; this module knows what a PHMDiff card
holds (model config, pairs, model grid, normalisation) and rebuilds the network from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phmdiff_cli.config import ModelConfig
from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.normalize import CT_WINDOW_HU, MRI_PERCENTILE, RANK_FLOOR
from phmdiff_cli.data.slices import Pair
from phmdiff_cli.engine.checkpoint import load_model
from phmdiff_cli.engine.hub import resolve_model
from phmdiff_cli.errors import InputError
from phmdiff_cli.models import PHMDiff

__all__ = ["Pretrained", "build_card", "card_pairs", "load_pretrained"]


def build_card(config: ModelConfig, pairs: Sequence[Pair], *, training: dict[str, Any] | None = None,
               metrics: dict[str, Any] | None = None, input_domain: dict[str, Any] | None = None,
               contrast: dict[str, float] | None = None) -> dict[str, Any]:
    """The model card of a PHMDiff model (``checkpoint.save_model`` adds format, sha256, version, date).

    Args:
        config: the model's architecture and sampling defaults.
        pairs: the source -> target pairs it was trained on (canonical names).
        training: data (subjects, licences), steps, budget, seed, git commit...
        metrics: validation metrics, e.g. ``{"t1n:t2w": {"psnr": 24.1, "ssim": 0.86}}``.
        input_domain: what the training sources were like
            (:func:`~phmdiff_cli.engine.input_domain.domain_of`); ``synthesize`` checks inputs against it.
        contrast: the training targets' median-to-99.5th-percentile ratio per MRI target
            (:func:`~phmdiff_cli.engine.train_data.training_contrast`); used where ``sampling.contrast`` is on.
    """
    modalities = sorted({m for p in pairs for m in (*p.sources, p.target)})
    return {
        "model": config.to_dict(),
        "pairs": [[list(p.sources) if len(p.sources) > 1 else p.sources[0], p.target] for p in pairs],
        "modalities": modalities,
        "grid": ModelGrid(config.image_size, config.spacing_mm).to_dict(),
        "normalisation": {
            "mri": f"each volume divided by its foreground {MRI_PERCENTILE}th percentile, clipped to [0, 1], "
                   "mapped to [-1, 1]; synthesized MRI is written on the first source's scale",
            "ct": f"Hounsfield units clipped to {list(CT_WINDOW_HU)} and mapped linearly to [-1, 1]",
            **({"mri_sources": "then each source voxel replaced by its quantile in its volume's foreground, "
                               f"mapped to [{RANK_FLOOR[config.source_norm]:g}, 1] (background -1)"}
               if config.source_norm in RANK_FLOOR else {}),
        },
        "training": training or {},
        "metrics": metrics or {},
        **({"input_domain": input_domain} if input_domain else {}),
        **({"contrast": contrast} if contrast else {}),
    }


def card_pairs(card: dict[str, Any]) -> tuple[Pair, ...]:
    """The pairs of a model card as :class:`Pair` tuples."""
    return tuple(Pair(tuple(src) if isinstance(src, list) else (src,), tgt) for src, tgt in card["pairs"])


@dataclass
class Pretrained:
    """A loaded model: the network (eval mode, on its device), its card, and where it came from."""

    model: PHMDiff
    card: dict[str, Any]
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def grid(self) -> ModelGrid:
        return ModelGrid(self.config.image_size, self.config.spacing_mm)

    @property
    def pairs(self) -> tuple[Pair, ...]:
        return card_pairs(self.card)

    def pair_for(self, sources: Sequence[str], target: str) -> Pair:
        """The trained pair for these sources and target.

        Raises:
            InputError: the model was not trained for it; the message lists what it supports.
        """
        wanted = Pair(tuple(sources), target)
        for pair in self.pairs:
            if pair == wanted:
                return pair
        supported = ", ".join(str(p) for p in self.pairs)
        raise InputError(f"the model was not trained for {wanted}", path=self.path,
                         hint=f"this model supports {supported}")


def load_pretrained(spec: str | Path, device: torch.device | str = "cpu") -> Pretrained:
    """Resolve ``--model`` (folder, .safetensors file, run folder, shipped name, ``hf://org/repo``) and rebuild
    the network from its card.

    Raises:
        InputError: the model cannot be found, is corrupt, or its weights do not fit its config.
    """
    path = resolve_model(str(spec))
    state, card = load_model(path)
    config = ModelConfig.from_dict(card["model"])
    model = PHMDiff(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"weights do not match the model config: {first}", path=path) from None
    return Pretrained(model.eval().to(device), card, path)

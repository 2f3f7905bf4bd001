"""Random multi-scale block masks over a token grid (MaskDiT-style masked training, with block structure).

Each token gets a random score shared by the block it belongs to; the block size (one of ``block_sizes``
tokens per side) is drawn per region of the largest size, so one mask mixes small and large holes. The tokens
with the lowest scores are kept, which gives every sample the same number of kept tokens: the encoder then
runs on a dense (B, N_keep, D) tensor, the real compute saving of masking.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["num_kept", "block_mask", "keep_to_mask"]


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens kept when masking a fraction ``ratio`` of ``num_tokens`` (at least one)."""
    return max(1, round(num_tokens * (1.0 - ratio)))


def block_mask(
    batch: int,
    grid: int,
    ratio: float,
    block_sizes: tuple[int, ...] = (1, 2, 4),
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the kept tokens of a square ``grid`` x ``grid`` token grid, per sample.

    Args:
        batch: B.
        grid: tokens per side; tokens are numbered row-major.
        ratio: fraction of tokens dropped, in [0, 1).
        block_sizes: block side lengths in tokens.
        device: where the indices live.
        generator: random source (on ``device``) for reproducible masks.

    Returns:
        (B, N_keep) long, ascending within each row, ``N_keep = num_kept(grid**2, ratio)``.
    """
    largest = max(block_sizes)
    regions = -(-grid // largest)
    scores = []
    for size in block_sizes:
        cells = -(-grid // size)
        noise = torch.rand(batch, cells, cells, device=device, generator=generator)
        scores.append(noise.repeat_interleave(size, 1).repeat_interleave(size, 2)[:, :grid, :grid])
    choice = torch.randint(len(block_sizes), (batch, regions, regions), device=device, generator=generator)
    choice = choice.repeat_interleave(largest, 1).repeat_interleave(largest, 2)[:, :grid, :grid]
    score = torch.stack(scores).gather(0, choice.unsqueeze(0)).squeeze(0).reshape(batch, grid * grid)
    keep = score.argsort(dim=1)[:, : num_kept(grid * grid, ratio)]
    return keep.sort(dim=1).values


def keep_to_mask(keep: Tensor, num_tokens: int) -> Tensor:
    """(B, N_keep) kept indices -> (B, num_tokens) bool, True where a token was kept."""
    mask = torch.zeros(keep.shape[0], num_tokens, dtype=torch.bool, device=keep.device)
    return mask.scatter(1, keep, True)

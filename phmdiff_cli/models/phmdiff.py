"""The PHMDiff denoiser: one Transformer shared by all pyramid levels (MaskDiT encoder + light decoder).

Per level l the input image stack is, channel-wise: the preconditioned noisy target (1), the source slots
(S * (2k + 1) slices resized to the level) and the upsampled coarser sample (1; zeros at level 0). It is cut
into patches of ``patch_sizes[l]`` pixels by a per-level linear patch embedding, so every level has a similar
token count and the same blocks serve all levels. The conditioning vector (adaLN) is the sum of the
noise-level, level, target-modality and source-slot embeddings (CDM-style cross-conditioning: one model, many
source -> target pairs).

Per level the decoder tokens are unpatchified and a convolutional head, conditioned by the same vector as the
blocks, refines them at full resolution (``refine_channels``), so large patches do not leave block edges: three
convolutions (:class:`~phmdiff_cli.models.layers.RefinementHead`) or, with ``refine_depth > 0``, a small UNet
that also reads the decoder tokens at its bottleneck (:class:`~phmdiff_cli.models.layers.RefinementUNet`), the
convolutional path that learns local source -> target mappings fast.

In training, a random subset of tokens is dropped before the encoder (gather, so the encoder's cost falls with
the mask ratio); the decoder re-inserts a learned mask token at the dropped positions. Without ``keep`` the
encoder sees every token (inference and the unmasked fine-tune).

This module has no diffusion maths: it maps (c_in * x, c_noise, conditions) to the raw network output F; EDM
preconditioning lives in :mod:`phmdiff_cli.diffusion.edm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from phmdiff_cli.config import ModelConfig
from phmdiff_cli.models.layers import (
    DiTBlock,
    FinalLayer,
    RefinementHead,
    RefinementUNet,
    TimestepEmbedder,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)

__all__ = ["PHMDiff"]


class PHMDiff(nn.Module):
    """Pyramid hierarchical masked diffusion Transformer.

    Args:
        config: architecture; see :class:`phmdiff_cli.config.ModelConfig`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dim, dec = config.hidden_size, config.decoder_hidden_size
        self.in_channels = 1 + config.max_sources * config.source_channels + 1
        self.patch_embed = nn.ModuleList(nn.Linear(p * p * self.in_channels, dim) for p in config.patch_sizes)
        self.t_embedder = TimestepEmbedder(dim)
        self.level_embed = nn.Embedding(config.levels, dim)
        self.target_embed = nn.Embedding(config.num_modalities, dim)
        # One entry per (slot, modality): the encoder must know which channels hold which contrast.
        self.source_embed = nn.Embedding(config.max_sources * config.num_modalities, dim)
        # Whether the sources show a head with skull: the same T1 ranks mean other tissues in a head than in a
        # skull-stripped brain. Zero-initialised, so a model it is added to starts as it was.
        self.skull_embed = nn.Embedding(2, dim) if config.skull_condition else None
        self.blocks = nn.ModuleList(
            DiTBlock(dim, config.num_heads, dim, config.mlp_ratio) for _ in range(config.depth))
        self.decoder_embed = nn.Linear(dim, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_blocks = nn.ModuleList(
            DiTBlock(dec, config.decoder_heads, dim, config.mlp_ratio) for _ in range(config.decoder_depth))
        self.final_layers = nn.ModuleList(FinalLayer(dec, dim, p, 1) for p in config.patch_sizes)
        self.refine = nn.ModuleList(self._refinement_head() for _ in config.patch_sizes) \
            if config.refine_channels else None
        for level in range(config.levels):
            # Fixed, so not saved: they rebuild from the config.
            grid = config.grid_size(level)
            self.register_buffer(f"pos_embed_{level}", sincos_pos_embed_2d(dim, grid), persistent=False)
            dec_pos = sincos_pos_embed_2d(dec, grid)
            self.register_buffer(f"decoder_pos_embed_{level}", dec_pos, persistent=False)
        self.initialize_weights()

    def _refinement_head(self) -> nn.Module:
        cfg = self.config
        if cfg.refine_depth:
            return RefinementUNet(self.in_channels, cfg.refine_channels, cfg.hidden_size, cfg.decoder_hidden_size,
                                  cfg.refine_depth)
        return RefinementHead(self.in_channels, cfg.refine_channels, cfg.hidden_size)

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers so every
        block starts as the identity and the network output F starts at 0 (D = c_skip * x)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for emb in (self.level_embed, self.target_embed, self.source_embed):
            nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for layer in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(layer.weight, std=0.02)
        for block in [*self.blocks, *self.decoder_blocks, *self.final_layers]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for final in self.final_layers:
            nn.init.zeros_(final.linear.weight)
        for head in self.refine or []:
            head.zero_init()
        if self.skull_embed is not None:
            nn.init.zeros_(self.skull_embed.weight)

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        source: Tensor,
        coarse: Tensor | None,
        src_mod: Tensor,
        tgt_mod: Tensor,
        *,
        level: int,
        keep: Tensor | None = None,
        skull: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One pyramid level.

        Args:
            x: (B, 1, h, w) preconditioned noisy target (``c_in * (y + n)``), h = w =
                ``config.level_size(level)``.
            noise_labels: (B,) noise labels (EDM ``c_noise = ln(sigma) / 4``).
            source: (B, S, 2k+1, h, w) source slots at this level, model range; absent slots zero.
            coarse: (B, 1, h, w) upsampled sample of level - 1, or None at level 0.
            src_mod: (B, S) long modality ids per slot (0 = absent).
            tgt_mod: (B,) long target modality ids.
            level: pyramid level, 0 = coarsest.
            keep: (B, N_keep) long ascending indices of the tokens the encoder sees; None = all.
            skull: (B,) long, 1 where the sources show a head with skull, 0 a brain (``config.skull_condition``);
                None = all brains.

        Returns:
            ``(F, features)``: F (B, 1, h, w) raw output; features (B, N_keep, hidden) encoder tokens.
        """
        outs, feats = self.forward_levels([x], [noise_labels], [source], [coarse], src_mod, tgt_mod,
                                          levels=[level], keeps=[keep], skull=skull)
        return outs[0], feats[0]

    def forward_levels(
        self,
        xs: Sequence[Tensor],
        noise_labels: Sequence[Tensor],
        sources: Sequence[Tensor],
        coarses: Sequence[Tensor | None],
        src_mod: Tensor,
        tgt_mod: Tensor,
        *,
        levels: Sequence[int],
        keeps: Sequence[Tensor | None],
        skull: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Several levels of the same samples (lists aligned with ``levels``; arguments as in
        :meth:`forward`).

        Levels with the same token grid and kept-token count run through the Transformer as one batch of
        ``len(group) * B`` sequences: bigger matrix products, one pass instead of L.
        """
        sizes = [self.config.grid_size(level) ** 2 for level in levels]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, keep in enumerate(keeps):
            groups.setdefault((sizes[i], sizes[i] if keep is None else keep.shape[1]), []).append(i)
        outs: list[Tensor] = [torch.empty(0)] * len(levels)
        feats: list[Tensor] = [torch.empty(0)] * len(levels)
        stacks = [self._stack(x, source, coarse) for x, source, coarse in zip(xs, sources, coarses, strict=True)]
        for (num_tokens, _), idx in groups.items():
            tokens = torch.cat([self._embed(levels[i], stacks[i]) for i in idx])
            c = torch.cat([self._condition(noise_labels[i], levels[i], src_mod, tgt_mod, skull) for i in idx])
            keep = self._group_keep([keeps[i] for i in idx], num_tokens)
            h = self._encode(tokens, c, keep)
            # Same grid, so the first level's decoder position embedding serves the whole group.
            dec = self._decode(h, c, keep, num_tokens, levels[idx[0]])
            parts = zip(idx, dec.chunk(len(idx)), h.chunk(len(idx)), c.chunk(len(idx)), strict=True)
            for i, dec_i, h_i, c_i in parts:
                outs[i], feats[i] = self._output(dec_i, c_i, levels[i], stacks[i]), h_i
        return outs, feats

    @staticmethod
    def _stack(x: Tensor, source: Tensor, coarse: Tensor | None) -> Tensor:
        """(B, in_channels, h, w) input stack [x, sources, coarse] (zeros for a missing coarse sample)."""
        coarse = torch.zeros_like(x) if coarse is None else coarse
        return torch.cat([x, source.flatten(1, 2), coarse], dim=1)

    def _embed(self, level: int, stack: Tensor) -> Tensor:
        """(B, N, hidden) tokens of a level's input stack."""
        tokens = self.patch_embed[level](patchify(stack, self.config.patch_sizes[level]))
        return tokens + getattr(self, f"pos_embed_{level}")

    def _condition(self, noise_labels: Tensor, level: int, src_mod: Tensor, tgt_mod: Tensor,
                   skull: Tensor | None = None) -> Tensor:
        """(B, hidden) adaLN conditioning vector."""
        slots = torch.arange(src_mod.shape[1], device=src_mod.device) * self.config.num_modalities
        level_ids = torch.full_like(tgt_mod, level)
        c = (self.t_embedder(noise_labels) + self.level_embed(level_ids) + self.target_embed(tgt_mod)
             + self.source_embed(src_mod + slots).sum(dim=1))
        if self.skull_embed is not None:
            c = c + self.skull_embed(torch.zeros_like(tgt_mod) if skull is None else skull)
        return c

    @staticmethod
    def _group_keep(keeps: list[Tensor | None], num_tokens: int) -> Tensor | None:
        if all(k is None for k in keeps):
            return None
        ref = next(k for k in keeps if k is not None)
        full = torch.arange(num_tokens, device=ref.device).expand(ref.shape[0], -1)
        return torch.cat([full if k is None else k for k in keeps])

    def _encode(self, tokens: Tensor, c: Tensor, keep: Tensor | None) -> Tensor:
        """Encoder blocks on the kept tokens: (B, N, D) -> (B, N_keep, D)."""
        if keep is not None:
            tokens = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        for block in self.blocks:
            tokens = block(tokens, c)
        return tokens

    def _decode(self, h: Tensor, c: Tensor, keep: Tensor | None, num_tokens: int, level: int) -> Tensor:
        """Decoder blocks on all N positions, mask tokens where the encoder saw nothing: (B, N, D_dec)."""
        h = self.decoder_embed(h)
        if keep is not None:
            full = self.mask_token.to(h.dtype).expand(h.shape[0], num_tokens, -1)
            h = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]), h)
        h = h + getattr(self, f"decoder_pos_embed_{level}")
        for block in self.decoder_blocks:
            h = block(h, c)
        return h

    def _output(self, h: Tensor, c: Tensor, level: int, stack: Tensor) -> Tensor:
        """(B, 1, h, w) raw output F: decoder tokens unpatchified, then refined at full resolution."""
        patch = self.config.patch_sizes[level]
        out = unpatchify(self.final_layers[level](h, c), patch, self.config.grid_size(level), 1)
        if self.refine is None:
            return out
        head = self.refine[level]
        return head(out, stack, c, h) if isinstance(head, RefinementUNet) else head(out, stack, c)

"""DiT building blocks (Peebles & Xie 2023): adaLN-Zero blocks, timestep embedder, final layer, sin-cos
position embeddings, patchify. Tokens are (B, N, D) in row-major order of the (gh, gw) token grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["modulate", "TimestepEmbedder", "Attention", "Mlp", "DiTBlock", "FinalLayer", "RefinementHead",
           "RefinementUNet", "sincos_pos_embed_2d", "patchify", "unpatchify"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with (B, D) shift/scale broadcast over the N tokens of (B, N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                      Embedding layers for noise level                          #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar noise labels (B,) into (B, hidden) via sin-cos frequencies and an MLP.

    EDM noise labels are of order 1 (``ln(sigma) / 4``, about -2..1.5); they are multiplied by ``input_scale``
    so that the frequencies span them the way DiT's integer timesteps 0..999 span its frequencies.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, input_scale: float = 1000.0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.input_scale = input_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        steps = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000.0) * steps / half)
        args = (t.float() * self.input_scale)[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


#################################################################################
#                                 Core DiT blocks                               #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through the fused ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear, as in DiT."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on a (B, cond_dim) vector.

    Args:
        dim: token width.
        num_heads: attention heads.
        cond_dim: width of the conditioning vector (the encoder width, also for the narrower decoder).
        mlp_ratio: MLP hidden width / dim.
    """

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, 1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens (B, N, dim) to patches (B, N, patch**2 *
    out)."""

    def __init__(self, dim: int, cond_dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class RefinementHead(nn.Module):
    """Full-resolution convolutional refinement of the unpatchified output, conditioned like the blocks.

    Large patches (16 px at the finest level of ``small``) squeeze a patch into one token, so a linear
    unpatchify leaves block edges and cannot represent per-pixel detail. Three 3x3 convolutions over the
    output and the level's input stack (noisy target, sources, coarse sample) add a residual that restores
    it at a few percent of the Transformer's cost. The first convolution's features are modulated (FiLM) by
    the conditioning vector: the head must know the noise level (the noisy-target channel is noise at high
    sigma, the image at low sigma) and the target modality (a T1 maps to a T2 and to a FLAIR differently).
    The modulation and the last convolution are zero-initialised, so the head starts as the identity (DiT's
    adaLN-Zero idea).

    Args:
        in_channels: channels of the input stack, without the output channel.
        channels: hidden width of the convolutions.
        cond_dim: width of the conditioning vector.
    """

    def __init__(self, in_channels: int, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels + 1, channels, 3, padding=1)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels))
        self.conv_mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)
        self.zero_init()

    def zero_init(self) -> None:
        """Zero the modulation and the output convolution (called again after a model-wide initialisation)."""
        for layer in (self.modulation[-1], self.conv_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, out: Tensor, stack: Tensor, c: Tensor) -> Tensor:
        """``out`` (B, 1, h, w) + refinement of [out, stack (B, in_channels, h, w)] under conditioning
        ``c`` (B, cond_dim) -> (B, 1, h, w)."""
        h = self.conv_in(torch.cat([out, stack.to(out.dtype)], dim=1))
        shift, scale = self.modulation(c).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = F.gelu(h * (1 + scale) + shift)
        return out + self.conv_out(F.gelu(self.conv_mid(h)))


class RefinementUNet(nn.Module):
    """A small conditioned UNet that refines the unpatchified output: the convolutional path of a hybrid
    denoiser, for models with ``refine_depth > 0``.

    The three-convolution :class:`RefinementHead` sees 7 x 7 pixels, so every structure larger than that has to
    come through the Transformer's 16-pixel tokens, which learn a source -> target mapping several times slower
    than a convolutional network (benchmarks/README.md, "What would close the gap"; ``quality.py``'s
    ``no-unet-head`` ablation). This head goes ``depth`` times down
    by strided convolutions (widths ``channels * 2**i``), adds the decoder's tokens (projected, resized) at its
    bottleneck so the local path also sees the Transformer's global context, and comes back up with skip
    connections (U-ViT / Simple Diffusion: convolutions at high resolution, a Transformer at low resolution).
    Every down stage is GroupNorm'd and modulated (FiLM) by the blocks' conditioning vector (noise level, target
    modality, level). The modulations and the output convolution start at zero, so the head starts as the
    identity and the model as its Transformer alone.

    Args:
        in_channels: channels of the input stack, without the output channel.
        channels: width at full resolution.
        cond_dim: width of the conditioning vector.
        token_dim: width of the decoder tokens.
        depth: 2x downsamplings; the level's side must be divisible by ``2**depth``.
    """

    def __init__(self, in_channels: int, channels: int, cond_dim: int, token_dim: int, depth: int) -> None:
        super().__init__()
        widths = [channels * 2**i for i in range(depth + 1)]
        self.conv_in = nn.Conv2d(in_channels + 1, widths[0], 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(depth))
        self.mid = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for w in widths[1:])
        self.norms = nn.ModuleList(nn.GroupNorm(min(8, w // 2), w) for w in widths)
        self.modulation = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * w)) for w in widths)
        self.tokens = nn.Linear(token_dim, widths[-1])
        self.up = nn.ModuleList(nn.Conv2d(widths[i + 1] + widths[i], widths[i], 3, padding=1)
                                for i in range(depth))
        self.conv_out = nn.Conv2d(widths[0], 1, 3, padding=1)
        self.zero_init()

    def zero_init(self) -> None:
        """Zero the modulations and the output convolution (called again after a model-wide initialisation)."""
        for layer in (*(m[-1] for m in self.modulation), self.conv_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _film(self, h: Tensor, c: Tensor, stage: int) -> Tensor:
        shift, scale = self.modulation[stage](c).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return F.silu(self.norms[stage](h) * (1 + scale) + shift)

    def forward(self, out: Tensor, stack: Tensor, c: Tensor, tokens: Tensor) -> Tensor:
        """``out`` (B, 1, h, w) + refinement of [out, stack (B, in_channels, h, w)] under conditioning
        ``c`` (B, cond_dim), with decoder ``tokens`` (B, g*g, token_dim) of the square token grid -> (B, 1, h,
        w)."""
        h = self._film(self.conv_in(torch.cat([out, stack.to(out.dtype)], dim=1)), c, 0)
        skips = []
        for stage, (down, mid) in enumerate(zip(self.down, self.mid, strict=True), start=1):
            skips.append(h)
            h = F.silu(mid(self._film(down(h), c, stage)))
        grid = math.isqrt(tokens.shape[1])
        context = self.tokens(tokens).transpose(1, 2).reshape(len(h), -1, grid, grid)
        h = h + F.interpolate(context.to(h.dtype), size=h.shape[-2:], mode="bilinear", align_corners=False)
        for up, skip in zip(reversed(self.up), reversed(skips), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = F.silu(up(torch.cat([h, skip], dim=1)))
        return out + self.conv_out(h)


#################################################################################
#                     Position embeddings and patch layout                      #
#################################################################################


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE/DiT), (grid * grid, dim), rows in row-major token order.

    Half the channels encode the row, half the column, each with ``dim / 4`` frequencies.
    """
    if dim % 4:
        raise ValueError(f"position embedding width {dim} must be divisible by 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), tokens row-major, features ordered (p_row, p_col, C)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: Tensor, patch: int, grid: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify` for a square grid: (B, grid*grid, p*p*C) -> (B, C, grid*p, grid*p)."""
    b = x.shape[0]
    x = x.reshape(b, grid, grid, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid * patch, grid * patch)

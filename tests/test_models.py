"""PHMDiff architecture: shapes per level and size, masking, initialisation, config round trips."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)

from phmdiff_cli.config import SIZES, DiffusionConfig, ModelConfig, SamplingConfig, model_config
from phmdiff_cli.errors import InputError
from phmdiff_cli.models import PHMDiff
from phmdiff_cli.models.layers import patchify, sincos_pos_embed_2d, unpatchify
from phmdiff_cli.models.masking import block_mask, keep_to_mask, num_kept


def _inputs(cfg: ModelConfig, level: int, batch: int = 2) -> dict:
    side = cfg.level_size(level)
    return dict(
        x=torch.randn(batch, 1, side, side),
        noise_labels=torch.randn(batch),
        source=torch.randn(batch, cfg.max_sources, cfg.source_channels, side, side),
        coarse=None if level == 0 else torch.randn(batch, 1, side, side),
        src_mod=torch.tensor([[1, 3, 0], [2, 0, 0]])[:batch, : cfg.max_sources],
        tgt_mod=torch.tensor([4, 7])[:batch],
    )


def _randomize(model: torch.nn.Module) -> None:
    """Non-zero weights everywhere (the adaLN-Zero init makes the output exactly 0, which hides errors)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_tiny_forward_shapes_per_level(level: int) -> None:
    cfg = model_config("tiny")
    model = PHMDiff(cfg)
    out, feats = model(**_inputs(cfg, level), level=level)
    side = cfg.level_size(level)
    assert out.shape == (2, 1, side, side)
    assert feats.shape == (2, cfg.grid_size(level) ** 2, cfg.hidden_size)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_builds_and_runs_each_level(size: str) -> None:
    """Shape inference on the meta device: no memory or compute, so the large sizes are checked too."""
    cfg = model_config(size)
    with torch.device("meta"):
        model = PHMDiff(cfg)
        for level in range(cfg.levels):
            out, _ = model(**_inputs(cfg, level, batch=1), level=level)
            assert out.shape == (1, 1, cfg.level_size(level), cfg.level_size(level))
    params = sum(p.numel() for p in model.parameters())
    expected_millions = {"tiny": (0.2, 1), "small": (8, 15), "base": (40, 80), "large": (200, 320)}[size]
    assert expected_millions[0] * 1e6 < params < expected_millions[1] * 1e6


def test_output_is_zero_at_initialisation() -> None:
    """adaLN-Zero and a zero final layer: F = 0, so the EDM denoiser starts as D = c_skip * x."""
    cfg = model_config("tiny")
    out, _ = PHMDiff(cfg)(**_inputs(cfg, 1), level=1)
    assert torch.count_nonzero(out) == 0


def test_skull_condition_starts_as_the_model_it_is_added_to() -> None:
    """A plain model's weights in a ``skull_condition`` model give the same output whatever the flag (the
    embedding starts at zero); once it has learned something, a head and a brain are told apart per sample."""
    plain_cfg = model_config("tiny")
    plain, skull_model = PHMDiff(plain_cfg), PHMDiff(model_config("tiny", skull_condition=True))
    _randomize(plain)
    missing, unexpected = skull_model.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["skull_embed.weight"] and unexpected == []
    inputs = _inputs(plain_cfg, 2)
    reference, _ = plain(**inputs, level=2)
    for skull in (None, torch.tensor([0, 1])):
        out, _ = skull_model(**inputs, level=2, skull=skull)
        assert torch.allclose(out, reference, atol=1e-6)
    with torch.no_grad():
        skull_model.skull_embed.weight[1].normal_()
    head, _ = skull_model(**inputs, level=2, skull=torch.tensor([0, 1]))
    assert torch.allclose(head[0], reference[0], atol=1e-6) and not torch.allclose(head[1], reference[1], atol=1e-3)


def _random_head(model: PHMDiff, level: int) -> torch.nn.Module:
    head = model.refine[level]
    torch.manual_seed(2)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    return head


@pytest.mark.parametrize("depth", [0, 2])
def test_refinement_heads_start_as_the_identity(depth: int) -> None:
    """Zero-initialised, either head leaves the unpatchified output unchanged: the model starts as its
    Transformer alone."""
    cfg = model_config("tiny", refine_depth=depth)
    plain = PHMDiff(model_config("tiny", refine_channels=0))
    _randomize(plain)
    refined = PHMDiff(cfg)
    refined.load_state_dict(plain.state_dict(), strict=False)
    inputs = _inputs(cfg, 2)
    torch.testing.assert_close(refined(**inputs, level=2)[0], plain(**inputs, level=2)[0])


def test_three_convolution_head_adds_detail_within_its_receptive_field() -> None:
    """With weights, one source pixel changes the output of the ``refine_depth = 0`` head in its 7 x 7 receptive
    field (3 convolutions of 3 x 3) and nowhere else: pixel detail that a linear unpatchify of one token per
    patch cannot place."""
    head = _random_head(PHMDiff(model_config("tiny", refine_depth=0)), 2)
    out, stack = torch.zeros(1, 1, 32, 32), torch.zeros(1, head.conv_in.in_channels - 1, 32, 32)
    c = torch.zeros(1, 64)
    nudged = stack.clone()
    nudged[0, 2, 16, 16] = 1.0  # one pixel of the centre slice of the first source
    change = (head(out, nudged, c) - head(out, stack, c)).abs()[0, 0]
    assert change[13:20, 13:20].min() > 0
    change[13:20, 13:20] = 0
    assert change.max() == 0


def test_unet_head_sees_far_and_reads_the_decoder_tokens() -> None:
    """The UNet head (``refine_depth = 2``) carries one source pixel's influence well beyond 7 x 7 pixels, and
    its output depends on the Transformer's decoder tokens (its global context), not only on the input stack."""
    model = PHMDiff(model_config("tiny"))
    head = _random_head(model, 2)
    out, stack = torch.zeros(1, 1, 64, 64), torch.zeros(1, model.in_channels, 64, 64)
    c, tokens = torch.zeros(1, 64), torch.zeros(1, 64, 64)  # grid 8 x 8 of decoder width 64
    nudged = stack.clone()
    nudged[0, 2, 32, 32] = 1.0
    change = (head(out, nudged, c, tokens) - head(out, stack, c, tokens)).abs()[0, 0]
    assert change[32, 32 + 8] > 0 and change[32 - 8, 32] > 0
    other_tokens = torch.randn(1, 64, 64)
    assert (head(out, stack, c, other_tokens) - head(out, stack, c, tokens)).abs().mean() > 1e-3


@pytest.mark.parametrize("depth", [0, 2])
def test_refinement_head_follows_the_conditioning(depth: int) -> None:
    """The head is modulated by the blocks' conditioning vector: the same pixels refine differently for another
    target modality or noise level (an unconditioned head would average T1 -> T2 and T1 -> FLAIR)."""
    model = PHMDiff(model_config("tiny", refine_depth=depth))
    head = _random_head(model, 2)
    out, stack = torch.zeros(1, 1, 16, 16), torch.rand(1, model.in_channels, 16, 16)
    extra = [torch.randn(1, 64, 64)] if depth else []
    src_mod = torch.tensor([[1, 0, 0]])
    to_t2 = model._condition(torch.zeros(1), 2, src_mod, torch.tensor([3]))
    to_flair = model._condition(torch.zeros(1), 2, src_mod, torch.tensor([4]))
    noisier = model._condition(torch.ones(1), 2, src_mod, torch.tensor([3]))
    base = head(out, stack, to_t2, *extra)
    assert (head(out, stack, to_flair, *extra) - base).abs().mean() > 1e-3
    assert (head(out, stack, noisier, *extra) - base).abs().mean() > 1e-3


def test_configs_without_a_refinement_head_still_load() -> None:
    """A config.json written before ``refine_channels`` existed rebuilds the model it described."""
    data = model_config("tiny").to_dict()
    del data["refine_channels"]
    assert PHMDiff(ModelConfig.from_dict(data)).refine is None


def test_configs_from_before_the_unet_head_keep_the_three_convolution_head() -> None:
    """The registered sizes use the UNet head; a config.json without ``refine_depth`` (the models shipped
    before it) had the three-convolution head, and its weights load into that."""
    data = model_config("tiny").to_dict()
    assert data["refine_depth"] == 2
    del data["refine_depth"]
    old = PHMDiff(ModelConfig.from_dict(data))
    assert type(old.refine[0]).__name__ == "RefinementHead"
    old.load_state_dict(PHMDiff(model_config("tiny", refine_depth=0)).state_dict())


def test_refine_depth_must_divide_the_coarsest_level() -> None:
    with pytest.raises(InputError, match="refine_depth"):
        model_config("tiny", refine_depth=5)  # 16 px coarsest level, 32 px needed


def test_configs_from_before_rank_sources_and_p_sigma_max_keep_their_meaning() -> None:
    """The registered sizes see sources by rank and train at sigma_max; a config.json without those fields
    (the first shipped model's) was trained on percentile-scaled sources with log-normal noise only."""
    data = model_config("small").to_dict()
    assert (data["source_norm"], data["diffusion"]["p_sigma_max"]) == ("rank", 0.5)
    del data["source_norm"], data["diffusion"]["p_sigma_max"]
    old = ModelConfig.from_dict(data)
    assert (old.source_norm, old.diffusion.p_sigma_max) == ("percentile", 0.0)


def test_masking_changes_the_encoder_token_count() -> None:
    cfg = model_config("tiny")
    model = PHMDiff(cfg)
    _randomize(model)
    seen: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    decoder_seen: list[int] = []
    model.decoder_blocks[0].register_forward_pre_hook(lambda _m, args: decoder_seen.append(args[0].shape[1]))
    inputs = _inputs(cfg, 2)
    n = cfg.grid_size(2) ** 2
    keep = block_mask(2, cfg.grid_size(2), 0.75, generator=torch.Generator().manual_seed(0))
    masked, feats = model(**inputs, level=2, keep=keep)
    full, _ = model(**inputs, level=2)
    assert seen == [num_kept(n, 0.75), n]
    assert decoder_seen == [n, n]
    assert feats.shape[1] == num_kept(n, 0.75)
    assert masked.shape == full.shape and not torch.allclose(masked, full)


def test_levels_batched_together_match_separate_passes() -> None:
    cfg = model_config("tiny")
    model = PHMDiff(cfg)
    _randomize(model)
    per_level = [_inputs(cfg, level) for level in range(cfg.levels)]
    keeps = [block_mask(2, cfg.grid_size(lv), 0.5, generator=torch.Generator().manual_seed(lv))
             for lv in range(cfg.levels)]
    outs, _ = model.forward_levels([i["x"] for i in per_level], [i["noise_labels"] for i in per_level],
                                   [i["source"] for i in per_level], [i["coarse"] for i in per_level],
                                   per_level[0]["src_mod"], per_level[0]["tgt_mod"], levels=[0, 1, 2],
                                   keeps=keeps)
    for level, inputs in enumerate(per_level):
        alone, _ = model(**{**inputs, "src_mod": per_level[0]["src_mod"], "tgt_mod": per_level[0]["tgt_mod"]},
                         level=level, keep=keeps[level])
        torch.testing.assert_close(outs[level], alone, atol=1e-5, rtol=1e-4)


def test_target_and_source_modality_change_the_output() -> None:
    cfg = model_config("tiny")
    model = PHMDiff(cfg)
    _randomize(model)
    inputs = _inputs(cfg, 0)
    base, _ = model(**inputs, level=0)
    other_target, _ = model(**{**inputs, "tgt_mod": torch.tensor([5, 5])}, level=0)
    swapped_slots, _ = model(**{**inputs, "src_mod": inputs["src_mod"][:, [1, 0, 2]]}, level=0)
    assert not torch.allclose(base, other_target)
    assert not torch.allclose(base, swapped_slots)


def test_block_mask_keeps_whole_blocks() -> None:
    keep = block_mask(16, 8, 0.5, block_sizes=(4,), generator=torch.Generator().manual_seed(0))
    assert keep.shape == (16, 32)
    assert torch.all(keep[:, 1:] > keep[:, :-1])  # sorted and unique
    blocks = keep_to_mask(keep, 64).reshape(16, 2, 4, 2, 4)
    # Every aligned 4x4 block is wholly kept or wholly dropped.
    per_block = blocks.sum(dim=(2, 4))
    assert set(per_block.unique().tolist()) <= {0, 16}


def test_block_mask_mixes_block_sizes() -> None:
    """With sizes (1, 4), masks contain isolated single tokens as well as whole 4x4 blocks."""
    keep = block_mask(64, 16, 0.5, block_sizes=(1, 4), generator=torch.Generator().manual_seed(0))
    mask = keep_to_mask(keep, 256).reshape(64, 4, 4, 4, 4)
    partial_blocks = ((mask.sum(dim=(2, 4)) % 16) != 0).float().mean()
    assert 0.2 < partial_blocks < 0.8


def test_patchify_round_trip_and_pos_embed() -> None:
    x = torch.randn(2, 3, 32, 32)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 64, 48)
    torch.testing.assert_close(unpatchify(tokens, 4, 8, 3), x)
    assert torch.equal(tokens[0, 1].reshape(4, 4, 3).permute(2, 0, 1), x[0, :, 0:4, 4:8])
    pos = sincos_pos_embed_2d(64, 8)
    assert pos.shape == (64, 64) and len({tuple(r.tolist()) for r in pos}) == 64


def test_config_json_round_trip_rebuilds_the_same_model(tmp_path) -> None:
    cfg = model_config("tiny", levels=2, patch_sizes=(4, 8), mask_ratios=(0.3, 0.6),
                       sampling=SIZES["tiny"].sampling.__class__(steps=(5, 3)))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    again = ModelConfig.from_dict(json.loads(path.read_text()))
    assert again == cfg
    state = PHMDiff(cfg).state_dict()
    PHMDiff(again).load_state_dict(state, strict=True)


def test_config_errors_are_input_errors() -> None:
    with pytest.raises(InputError, match="unknown model size"):
        model_config("huge")
    with pytest.raises(InputError, match="patch size"):
        model_config("tiny", patch_sizes=(2, 4, 6))
    with pytest.raises(InputError, match="unknown fields"):
        ModelConfig.from_dict({**model_config("tiny").to_dict(), "future_option": 1})
    with pytest.raises(InputError, match="own_start 0.5, second_sigma 0.0"):
        model_config("tiny", diffusion=DiffusionConfig(own_start=0.5))  # no second_sigma to train at
    with pytest.raises(InputError, match="mirror_shift 64"):  # tiny's grid is 64 px: a roll of 64 is none
        model_config("tiny", sampling=SamplingConfig(steps=(4, 3, 2), mirror_shift=64))

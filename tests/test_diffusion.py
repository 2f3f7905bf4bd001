"""EDM maths, the schedulers against analytic ODE solutions, the pyramid sampler and the training loss."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)

from phmdiff_cli.config import model_config
from phmdiff_cli.diffusion import EDMScheduler, sample, training_loss
from phmdiff_cli.diffusion.cgr import cgr_feature, cgr_pixel, cgr_structure, gaussian_mmd
from phmdiff_cli.diffusion.edm import karras_sigmas, precondition
from phmdiff_cli.diffusion.losses import NoisedTarget, anchor_losses
from phmdiff_cli.models import PHMDiff

SIGMA_MAX = 80.0


def _solve(solver: str, steps: int, denoiser, x0: torch.Tensor) -> torch.Tensor:
    scheduler = EDMScheduler(solver, sigma_max=SIGMA_MAX)
    scheduler.set_timesteps(steps)
    x = x0 * scheduler.init_noise_sigma
    for sigma in scheduler.timesteps:
        x = scheduler.step(denoiser(x, sigma), x)
    return x


def _gaussian_problem(mu: float = 0.3, s: float = 0.5):
    """Data N(mu, s^2): the ideal denoiser is linear and the probability-flow ODE has the closed-form solution
    x(sigma) = mu + (x(sigma_max) - mu) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2)."""
    def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    def exact(x_start: torch.Tensor) -> torch.Tensor:
        return mu + (x_start - mu) * s / math.sqrt(s**2 + SIGMA_MAX**2)

    return denoiser, exact


def test_karras_schedule() -> None:
    sigmas = karras_sigmas(5, 0.002, 80.0, 7.0)
    assert len(sigmas) == 6 and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False))
    # Evenly spaced in sigma^(1/rho).
    roots = [s ** (1 / 7) for s in sigmas[:-1]]
    assert max(abs((b - a) - (roots[1] - roots[0])) for a, b in zip(roots, roots[1:], strict=False)) < 1e-9


def test_heun_evaluates_twice_per_step_except_the_last() -> None:
    heun, euler = EDMScheduler("heun"), EDMScheduler("euler")
    heun.set_timesteps(6)
    euler.set_timesteps(6)
    assert len(heun.timesteps) == 11 and len(euler.timesteps) == 6
    assert heun.timesteps[:3] == [heun.sigmas[0], heun.sigmas[1], heun.sigmas[1]]


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_point_mass_data_is_reached_exactly(solver: str) -> None:
    """D(x, sigma) = y0 makes the ODE solution linear in sigma, which both solvers integrate exactly."""
    y0 = torch.tensor([0.25, -0.5, 0.9])
    start = torch.randn(3, generator=torch.Generator().manual_seed(0))
    out = _solve(solver, 7, lambda x, sigma: y0.expand_as(x), start)
    torch.testing.assert_close(out, y0, atol=1e-5, rtol=0)


def test_heun_matches_the_analytic_gaussian_solution_with_second_order_convergence() -> None:
    denoiser, exact = _gaussian_problem()
    x0 = torch.linspace(-2, 2, 9)
    x0 = x0.double()
    def error(solver: str, steps: int) -> float:
        return (_solve(solver, steps, denoiser, x0) - exact(x0 * SIGMA_MAX)).abs().max().item()

    heun = [error("heun", n) for n in (16, 32, 64)]
    euler = [error("euler", n) for n in (16, 32, 64)]
    assert heun[2] < 5e-3 and heun[2] < euler[2] / 10
    # Halving the step size divides the error by ~4 (order 2) for Heun, by ~2 (order 1) for Euler.
    assert all(3.5 < a / b < 5.5 for a, b in zip(heun, heun[1:], strict=False))
    assert all(1.8 < a / b < 2.2 for a, b in zip(euler, euler[1:], strict=False))


@pytest.mark.parametrize(("solver", "expected"), [("heun", [-0.556224, 0.723314, 2.002852]),
                                                    ("euler", [0.025071, 0.435924, 0.846776])])
def test_golden_values_of_a_six_step_solve(solver: str, expected: list[float]) -> None:
    """Full-loop regression values (diffusers-style) on the Gaussian problem, 6 steps from x(80) = 80 * x0.
    Far from the exact (-0.2019, 0.5481, 1.2981): six Karras steps are coarse for this problem."""
    denoiser, _ = _gaussian_problem()
    out = _solve(solver, 6, denoiser, torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=2e-6, rtol=0)


def test_preconditioning_identities() -> None:
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = precondition(sigma, 0.5)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close((weight.reshape(-1, 1, 1, 1) * c_out**2).flatten(), torch.ones(3))
    torch.testing.assert_close((c_in**2 * (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25)).flatten(), torch.ones(3))
    assert c_skip[0].item() == pytest.approx(1.0, abs=1e-4) and c_skip[2].item() < 1e-4
    torch.testing.assert_close(c_noise, sigma.log() / 4)


def _batch(cfg, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = cfg.image_size
    return dict(
        source=torch.rand(batch, cfg.max_sources, cfg.source_channels, side, side, generator=g) * 2 - 1,
        src_mod=torch.tensor([[1, 3, 0]] * batch),
        tgt_mod=torch.full((batch,), 4),
        target=torch.rand(batch, 1, side, side, generator=g) * 2 - 1,
    )


def _tiny_model() -> PHMDiff:
    torch.manual_seed(0)
    model = PHMDiff(model_config("tiny")).eval()
    with torch.no_grad():
        for final in model.final_layers:  # non-zero output, so sampling depends on the network
            final.linear.weight.normal_(0, 0.05)
            final.adaLN_modulation[-1].bias.normal_(0, 0.5)
    return model


def test_sample_shapes_range_and_seeded_determinism() -> None:
    model = _tiny_model()
    b = _batch(model.config)
    args = (model, b["source"], b["src_mod"], b["tgt_mod"])
    mean, std = sample(*args, steps=[3, 2, 2], noise_seed=7)
    again, _ = sample(*args, steps=[3, 2, 2], noise_seed=7)
    other, _ = sample(*args, steps=[3, 2, 2], noise_seed=8)
    euler, _ = sample(*args, steps=2, sampler="euler", noise_seed=7)
    assert mean.shape == (2, 1, 64, 64) and std is None
    assert mean.min() >= -1 and mean.max() <= 1
    assert torch.equal(mean, again)
    assert not torch.allclose(mean, other) and not torch.allclose(mean, euler)


def test_seeded_noise_is_shared_across_the_batch() -> None:
    """Slice 0 comes out the same whatever its batch neighbour is: same noise, and no cross-sample mixing."""
    model = _tiny_model()
    b1, b2 = _batch(model.config, seed=1), _batch(model.config, seed=2)
    source = torch.stack([b1["source"][0], b2["source"][1]])
    first, _ = sample(model, b1["source"], b1["src_mod"], b1["tgt_mod"], steps=2, noise_seed=3)
    mixed, _ = sample(model, source, b1["src_mod"], b1["tgt_mod"], steps=2, noise_seed=3)
    torch.testing.assert_close(first[0], mixed[0])
    same = b1["source"][:1].expand(2, -1, -1, -1, -1)
    twin, _ = sample(model, same, b1["src_mod"], b1["tgt_mod"], steps=2, noise_seed=3)
    torch.testing.assert_close(twin[0], twin[1])


def test_several_samples_give_mean_and_std() -> None:
    model = _tiny_model()
    b = _batch(model.config)
    mean, std = sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=2, noise_seed=0, samples=3)
    assert mean.shape == std.shape == (2, 1, 64, 64)
    assert std.min() >= 0 and std.mean() > 0
    single, _ = sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=2, noise_seed=0)
    assert not torch.allclose(mean, single)


@pytest.mark.parametrize("shift", [0, 3])
def test_mirrored_draws_are_the_mirror_image_synthesized_and_flipped_back(shift: int) -> None:
    """``mirror`` adds, per draw, the synthesis of the W-mirrored sources (rolled by ``mirror_shift`` first)
    flipped and rolled back: the mean over both, and the std over all 2 N draws."""
    model = _tiny_model()
    b = _batch(model.config)
    args = (b["src_mod"], b["tgt_mod"])
    views = (b["source"], b["source"].roll((shift, shift), dims=(-2, -1)).flip(-1))
    plain = [sample(model, source, *args, steps=2, noise_seed=0, samples=2) for source in views]
    mean, std = sample(model, b["source"], *args, steps=2, noise_seed=0, samples=2, mirror=True, mirror_shift=shift)

    def back(x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1).roll((-shift, -shift), dims=(-2, -1))

    a, m = plain[0], (back(plain[1][0]), back(plain[1][1]))
    torch.testing.assert_close(mean, (a[0] + m[0]) / 2)
    # four draws: their squared deviations sum to each pair's (its 1-dof variance) plus the pairs' mean gap squared
    pooled = (a[1] ** 2 + m[1] ** 2 + (a[0] - m[0]) ** 2) / 3
    torch.testing.assert_close(std, pooled.sqrt(), atol=1e-5, rtol=1e-4)
    if shift:  # the roll is not the identity: it changes what the mirrored view sees
        unrolled = sample(model, b["source"], *args, steps=2, noise_seed=0, samples=2, mirror=True)[0]
        assert (unrolled - mean).abs().max() > 1e-3


def test_sampling_loop_never_syncs_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any Tensor -> Python conversion inside sampling would be a device sync on an accelerator."""
    model = _tiny_model()
    b = _batch(model.config)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host-device sync inside the sampling loop")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    mean, _ = sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=2, noise_seed=0)
    monkeypatch.undo()
    assert mean.shape == (2, 1, 64, 64)


def test_sample_rejects_wrong_shapes() -> None:
    model = _tiny_model()
    b = _batch(model.config)
    with pytest.raises(ValueError, match="source must be"):
        sample(model, b["source"][:, :2], b["src_mod"], b["tgt_mod"], steps=2)


def test_training_loss_logs_and_gradients() -> None:
    torch.manual_seed(0)
    model = PHMDiff(model_config("tiny")).train()
    loss, logs = training_loss(model, _batch(model.config), generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    expected = {"denoise", "mae", "cgr_pixel", "cgr_structure", "cgr_feature", "denoise_l0", "denoise_l2"}
    assert expected <= set(logs)
    assert logs["mae"] > 0
    loss.backward()
    for level in range(model.config.levels):
        assert model.patch_embed[level].weight.grad.abs().sum() > 0
    unmasked_loss, unmasked = training_loss(model, _batch(model.config), mask_ratio=0.0)
    assert unmasked["mae"] == 0


def test_cgr_weights_switch_terms_off() -> None:
    torch.manual_seed(0)
    model = PHMDiff(model_config("tiny")).train()
    batch = _batch(model.config)
    with_cgr, logs = training_loss(model, batch, generator=torch.Generator().manual_seed(0))
    dcfg = model.config.diffusion
    dcfg.cgr_pixel = dcfg.cgr_structure = dcfg.cgr_feature = 0.0
    without, logs_off = training_loss(model, batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logs["denoise"], logs_off["denoise"])
    expected = 0.1 * logs["cgr_pixel"] + 0.05 * logs["cgr_structure"] + 0.01 * logs["cgr_feature"]
    torch.testing.assert_close(with_cgr - without, expected, rtol=1e-4, atol=1e-6)
    assert logs_off["cgr_pixel"] == 0


def test_anchor_terms_score_only_the_decisive_samples() -> None:
    """``anchor_l1`` is the mean absolute error of D over the decisive samples, ``anchor_ssim`` 1 - SSIM (0 for
    an exact prediction); a non-decisive sample's error does not count."""
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    pred = target + torch.tensor([0.0, 0.5]).reshape(2, 1, 1, 1)
    ones = torch.ones(2, 1, 1, 1)
    noised = NoisedTarget(target, ones, ones, target, torch.zeros(2), torch.tensor([1.0, 0.0]))
    cfg = model_config("tiny").diffusion
    cfg.anchor_l1 = cfg.anchor_ssim = 1.0
    exact = anchor_losses([pred], [noised], [target], cfg)
    assert float(exact["anchor_l1"]) == 0 and float(exact["anchor_ssim"]) == pytest.approx(0, abs=1e-5)
    shifted = anchor_losses([pred + 0.1], [noised], [target], cfg)
    assert float(shifted["anchor_l1"]) == pytest.approx(0.1, abs=1e-6)
    blurred = torch.nn.functional.avg_pool2d(target, 5, stride=1, padding=2)
    assert float(anchor_losses([blurred], [noised], [target], cfg)["anchor_ssim"]) > 0.2


def test_anchor_weights_add_their_terms_to_the_loss() -> None:
    torch.manual_seed(0)
    model = PHMDiff(model_config("tiny")).train()
    batch = _batch(model.config)
    without, logs_off = training_loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert logs_off["anchor_l1"] == 0 and logs_off["anchor_ssim"] == 0
    dcfg = model.config.diffusion
    dcfg.anchor_l1, dcfg.anchor_ssim = 1.0, 0.5
    with_anchor, logs = training_loss(model, batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logs["denoise"], logs_off["denoise"])
    assert logs["anchor_l1"] > 0 and logs["anchor_ssim"] > 0
    torch.testing.assert_close(with_anchor - without, logs["anchor_l1"] + 0.5 * logs["anchor_ssim"],
                               rtol=1e-4, atol=1e-6)


def test_own_coarse_conditions_the_finer_levels_on_the_models_own_cascade(monkeypatch) -> None:
    """With ``own_coarse`` the chosen samples' finer levels get what the sampler gives them: the coarser level's
    clamped first evaluation (conditioned on its own cascade), upsampled, not the real coarse target; the other
    samples keep the real one."""
    from phmdiff_cli.diffusion import losses
    from phmdiff_cli.diffusion.pyramid import upsample

    torch.manual_seed(0)
    cfg = model_config("tiny")
    cfg.diffusion.own_coarse = 0.5
    model = PHMDiff(cfg).train()
    evaluations: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []
    real_denoise = losses.denoise

    def spy_denoise(*args, level, **kwargs):
        out = real_denoise(*args, level=level, **kwargs)
        evaluations.append((level, args[4], out))
        return out

    given: list[list[torch.Tensor | None]] = []
    forward = model.forward_levels

    def spy_forward(xs, labels, sources, coarses, *args, **kwargs):
        if len(coarses) == cfg.levels:  # the training pass (not the own evaluations through forward)
            given.append(list(coarses))
        return forward(xs, labels, sources, coarses, *args, **kwargs)

    monkeypatch.setattr(losses, "denoise", spy_denoise)
    model.forward_levels = spy_forward
    batch = _batch(cfg, batch=32)
    for target in (batch["target"], -batch["target"]):
        training_loss(model, {**batch, "target": target}, generator=torch.Generator().manual_seed(0))
    assert [level for level, *_ in evaluations] == [0, 1, 0, 1]  # the levels below the finest, per step
    level0, level1 = evaluations[0], evaluations[1]
    assert level0[1] is None
    torch.testing.assert_close(level1[1], upsample(level0[2].clamp(-1, 1), cfg.level_size(1)))
    own = (given[0][2] == upsample(level1[2].clamp(-1, 1), cfg.level_size(2))).all(dim=(1, 2, 3))
    assert 8 <= int(own.sum()) <= 24
    for level in (1, 2):  # own samples do not see the target; the others do
        same = (given[0][level] == given[1][level]).all(dim=(1, 2, 3))
        assert torch.equal(same, own)


def test_second_sigma_jumps_from_the_first_evaluation_to_it() -> None:
    """With ``second_sigma`` a schedule is sigma_max, then the Karras schedule of the remaining steps from
    ``second_sigma``; the Euler step lands on the first evaluation D plus ``second_sigma / sigma_max`` of the
    start's deviation from D, and ``sample`` evaluates every level there."""
    euler = EDMScheduler("euler", sigma_min=0.002, sigma_max=20.0, second_sigma=0.5)
    for steps, sigmas in ((1, [20.0, 0.0]), (2, [20.0, 0.5, 0.0]), (3, [20.0, 0.5, 0.002, 0.0])):
        euler.set_timesteps(steps)
        assert euler.sigmas == pytest.approx(sigmas)
    euler.set_timesteps(3)
    x, d = torch.randn(2, 1, 4, 4) * 20, torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(euler.step(d, x), d + 0.5 / 20 * (x - d))
    model = _tiny_model()
    model.config.diffusion.second_sigma = 0.5
    b = _batch(model.config)
    seen: list[tuple[int, float]] = []
    forward = model.forward

    def spy(x, noise_labels, *args, level, **kwargs):
        seen.append((level, math.exp(4 * float(noise_labels[0]))))
        return forward(x, noise_labels, *args, level=level, **kwargs)

    model.forward = spy
    sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=2, sampler="euler", noise_seed=5)
    assert [level for level, _ in seen] == [0, 0, 1, 1, 2, 2]
    assert [sigma for _, sigma in seen] == pytest.approx([20.0, 0.5] * 3)


def test_own_start_noises_a_share_around_the_models_own_first_evaluation(monkeypatch) -> None:
    """With ``own_start`` the chosen samples are what the sampler's later evaluations see: the model's own first
    evaluation D from noise x0 at sigma_max, moved by the Euler step to ``second_sigma``
    (``D + sigma / sigma_max * (x0 - D)``), the same whatever the target, and decisive (anchored); the others
    keep the target plus noise."""
    from phmdiff_cli.diffusion import losses

    torch.manual_seed(0)
    cfg = model_config("tiny")
    cfg.diffusion.second_sigma, cfg.diffusion.own_start = 0.5, 0.5
    cfg.diffusion.anchor_l1 = 1.0
    model = PHMDiff(cfg).train()
    firsts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real_denoise = losses.denoise

    def spy_denoise(model, x, sigma, *args, level, **kwargs):
        out = real_denoise(model, x, sigma, *args, level=level, **kwargs)
        firsts.append((level, x, sigma, out))
        return out

    passes: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    forward = model.forward_levels

    def spy_forward(xs, labels, *args, **kwargs):
        if len(xs) == cfg.levels:  # the training pass (not the first evaluations through forward)
            passes.append((list(xs), list(labels)))
        return forward(xs, labels, *args, **kwargs)

    anchored: list[torch.Tensor] = []
    real_anchor = losses.anchor_losses

    def spy_anchor(denoised, noised, *args):
        anchored.append(noised[0].decisive)
        return real_anchor(denoised, noised, *args)

    monkeypatch.setattr(losses, "denoise", spy_denoise)
    monkeypatch.setattr(losses, "anchor_losses", spy_anchor)
    model.forward_levels = spy_forward
    batch = _batch(cfg, batch=32)
    for target in (batch["target"], -batch["target"]):
        training_loss(model, {**batch, "target": target}, generator=torch.Generator().manual_seed(0))
    assert [level for level, *_ in firsts] == [0, 1, 2, 0, 1, 2]
    assert all(torch.all(sigma == 20.0) for _, _, sigma, _ in firsts)
    (xs, labels), (xs_flipped, _) = passes
    own = (xs[2] == xs_flipped[2]).all(dim=(1, 2, 3))  # own starts do not see the target
    assert 8 <= int(own.sum()) <= 24
    sigma = torch.exp(4 * labels[2])
    torch.testing.assert_close(sigma[own], torch.full_like(sigma[own], 0.5))
    _, x0, _, first = firsts[2]
    _, _, c_in, _ = precondition(sigma, cfg.diffusion.sigma_data)
    expected = c_in * (first + sigma.reshape(-1, 1, 1, 1) / 20.0 * (x0 - first))
    torch.testing.assert_close(xs[2][own], expected[own])
    assert torch.all(anchored[0][own] == 1)


def test_cgr_terms_vanish_for_consistent_levels() -> None:
    fine = torch.rand(2, 1, 32, 32)
    coarse = torch.nn.functional.avg_pool2d(fine, 2)
    assert cgr_pixel(fine, coarse) == 0 and cgr_structure(fine, coarse) == 0
    assert cgr_pixel(fine, coarse + 0.1) == pytest.approx(0.01)
    feats = torch.randn(2, 50, 16)
    assert gaussian_mmd(feats, feats).abs() < 1e-6
    assert cgr_feature(feats, feats + 3.0 * torch.randn(2, 50, 16)) > 0.05


def _training_noise_labels(model: PHMDiff) -> list[torch.Tensor]:
    """The per-level (B,) noise labels of one training step of 64 samples."""
    labels: list[torch.Tensor] = []
    forward = model.forward_levels

    def spy(xs, noise_labels, *args, **kwargs):
        labels.extend(noise_labels)
        return forward(xs, noise_labels, *args, **kwargs)

    model.forward_levels = spy
    training_loss(model.train(), _batch(model.config, batch=64), generator=torch.Generator().manual_seed(0))
    model.forward_levels = forward
    return labels


def test_p_sigma_max_trains_that_share_at_the_samplers_first_noise_level() -> None:
    """``p_sigma_max`` of the samples are noised at ``sampling.sigma_max`` (noise label ln(sigma) / 4), where a
    few-step sampler's first evaluation decides the output; the rest keep the log-normal draw."""
    cfg = model_config("tiny")
    cfg.diffusion.p_sigma_max = 0.5
    labels = _training_noise_labels(PHMDiff(cfg))
    top = math.log(cfg.sampling.sigma_max) / 4
    at_top = torch.cat([(label - top).abs() < 1e-6 for label in labels]).float()
    assert len(labels) == cfg.levels and 0.4 < at_top.mean() < 0.6


def test_coarse_noise_augments_the_coarse_sample_at_inference_only_when_set() -> None:
    """With ``sampling.coarse_noise`` the next level is conditioned on the coarse sample plus seeded Gaussian
    noise of that std (at the coarse resolution, then upsampled); the level-0 evaluations are unchanged, and a
    model without it samples exactly what it did before the option existed."""
    model = _tiny_model()
    b = _batch(model.config)
    seen: list[tuple[int, torch.Tensor | None]] = []
    forward = model.forward

    def spy(x, noise_labels, source, coarse, *args, level, **kwargs):
        seen.append((level, None if coarse is None else coarse.clone()))
        return forward(x, noise_labels, source, coarse, *args, level=level, **kwargs)

    model.forward = spy
    plain, _ = sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=1, noise_seed=5)
    clean = [c for level, c in seen if level == 1][0]
    seen.clear()
    model.config.sampling.coarse_noise = 0.3
    noisy_out, _ = sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=1, noise_seed=5)
    noisy = [c for level, c in seen if level == 1][0]
    diff = noisy - clean
    assert 0.1 < diff.std() < 0.3
    torch.testing.assert_close(diff[0], diff[1])  # seeded: shared by the batch like the initial noise
    assert not torch.allclose(plain, noisy_out)
    model.config.sampling.coarse_noise = 0.0
    seen.clear()
    again, _ = sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=1, noise_seed=5)
    assert torch.equal(again, plain)


def test_refine_sigma_starts_the_finer_levels_from_the_coarser_sample() -> None:
    """SDEdit finer levels: level 0 samples from pure noise at sigma_max; levels 1 and 2 from the upsampled
    coarser sample plus noise of std ``refine_sigma``, and they train on noise levels up to it."""
    model = _tiny_model()
    model.config.diffusion.refine_sigma = 1.0
    b = _batch(model.config)
    seen: list[tuple[int, float, torch.Tensor, torch.Tensor | None]] = []
    forward = model.forward

    def spy(x, noise_labels, source, coarse, *args, level, **kwargs):
        seen.append((level, float(noise_labels[0]), x.clone(), coarse))
        return forward(x, noise_labels, source, coarse, *args, level=level, **kwargs)

    model.forward = spy
    sample(model, b["source"], b["src_mod"], b["tgt_mod"], steps=2, noise_seed=5)
    first = {level: (label, x, coarse) for level, label, x, coarse in reversed(seen)}
    assert math.exp(4 * first[0][0]) == pytest.approx(model.config.sampling.sigma_max)
    for level in (1, 2):
        label, x, coarse = first[level]
        assert math.exp(4 * label) == pytest.approx(1.0)
        _, _, c_in, _ = precondition(torch.tensor([1.0]), model.config.diffusion.sigma_data)
        start = x / c_in  # the denoiser's input is c_in * x
        assert 0.8 < float((start - coarse).std()) < 1.2  # the coarse sample plus unit noise
        assert float(torch.corrcoef(torch.stack([start.flatten(), coarse.flatten()]))[0, 1]) > 0.1
    model.forward = forward
    sigmas = [torch.exp(4 * label) for label in _training_noise_labels(model)]
    assert sigmas[0].max() > 1.5  # level 0 as before
    assert all(float(s.max()) <= 1.0 + 1e-5 for s in sigmas[1:])

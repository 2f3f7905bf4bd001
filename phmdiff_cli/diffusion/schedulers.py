"""Deterministic EDM samplers as diffusers-style scheduler classes (``set_timesteps`` then ``step``), kept
apart from the model: the caller evaluates the denoiser at each entry of ``timesteps`` and hands the result to
``step``.

    scheduler = EDMScheduler("heun")
    scheduler.set_timesteps(18)
    x = noise * scheduler.init_noise_sigma
    for sigma in scheduler.timesteps:
        x = scheduler.step(denoiser(x, sigma), x)
"""

from __future__ import annotations

from torch import Tensor

from phmdiff_cli.config import SAMPLERS
from phmdiff_cli.diffusion.edm import karras_sigmas

__all__ = ["EDMScheduler"]


class EDMScheduler:
    """EDM probability-flow ODE solver (Karras et al. 2022, Algorithm 1 with S_churn = 0).

    ``heun`` is second order: each step from sigma_i to sigma_{i+1} > 0 evaluates the denoiser twice (at
    sigma_i, then at sigma_{i+1} to correct), the last step to 0 is an Euler step, so N steps cost 2N - 1
    evaluations. ``euler`` is first order, N evaluations.

    Args:
        solver: ``"heun"`` or ``"euler"``.
        sigma_min, sigma_max, rho: the schedule (:func:`~phmdiff_cli.diffusion.edm.karras_sigmas`).
        second_sigma: 0, or the second noise level of every schedule of two or more steps: sigma_max, then the
            Karras schedule of the remaining steps from ``second_sigma`` down
            (:attr:`~phmdiff_cli.config.DiffusionConfig.second_sigma`).
    """

    def __init__(self, solver: str = "heun", sigma_min: float = 0.002, sigma_max: float = 20.0,
                 rho: float = 7.0, second_sigma: float = 0.0) -> None:
        if solver not in SAMPLERS:
            raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(SAMPLERS)}")
        self.solver = solver
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.second_sigma = second_sigma
        self.sigmas: list[float] = []
        self.timesteps: list[float] = []

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise (sigma_max)."""
        return self.sigma_max

    @property
    def order(self) -> int:
        return 2 if self.solver == "heun" else 1

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Build the schedule: ``sigmas`` (N + 1 levels ending at 0) and ``timesteps``, the noise level of
        each denoiser evaluation in order (Heun: 2N - 1 entries)."""
        if 0 < self.second_sigma < self.sigma_max and num_inference_steps > 1:
            rest = karras_sigmas(num_inference_steps - 1, self.sigma_min, self.second_sigma, self.rho)
            self.sigmas = [self.sigma_max, *rest]
        else:
            self.sigmas = karras_sigmas(num_inference_steps, self.sigma_min, self.sigma_max, self.rho)
        self.timesteps = []
        for i in range(num_inference_steps):
            self.timesteps.append(self.sigmas[i])
            if self.solver == "heun" and self.sigmas[i + 1] > 0:
                self.timesteps.append(self.sigmas[i + 1])
        self._index = 0
        self._first: tuple[Tensor, Tensor] | None = None

    def step(self, denoised: Tensor, sample: Tensor) -> Tensor:
        """Advance by one denoiser evaluation.

        Args:
            denoised: D(sample; sigma) at the current entry of ``timesteps``.
            sample: the sample the denoiser was evaluated at.

        Returns:
            The next sample to evaluate (after the last entry: the final sample at sigma = 0).
        """
        if self._first is not None:  # Heun correction at sigma_{i+1}: average the two slopes
            x_i, d_i = self._first
            s_i, s_next = self.sigmas[self._index], self.sigmas[self._index + 1]
            self._first = None
            self._index += 1
            return x_i + (s_next - s_i) * 0.5 * (d_i + (sample - denoised) / s_next)
        s_i, s_next = self.sigmas[self._index], self.sigmas[self._index + 1]
        d_i = (sample - denoised) / s_i
        x_next = sample + (s_next - s_i) * d_i
        if self.solver == "heun" and s_next > 0:
            self._first = (sample, d_i)
        else:
            self._index += 1
        return x_next

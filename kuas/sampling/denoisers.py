"""Denoisers: wrap a discrete-time U-Net so that samplers see ``D(x, sigma) -> x0``.

This is the only place that knows whether a network predicts the noise (eps, SD 1.x / 2.x-base / XL) or
the velocity (v, SD 2.x 768). Samplers work on the variance-exploding latent ``x = x0 + sigma * eps``;
the network was trained on the variance-preserving one ``x / sqrt(1 + sigma^2)`` at timestep ``t(sigma)``.
The scalings are those of Karras et al. 2022 (EDM, table 1) with sigma_data = 1, as k-diffusion uses them:

    eps model:  D(x, s) = x - s * F(x * c_in, t(s))                  c_in = 1 / sqrt(s^2 + 1)
    v model:    D(x, s) = x / (s^2 + 1) - s / sqrt(s^2 + 1) * F(x * c_in, t(s))

``model_fn`` is any callable with the U-Net signature ``model_fn(x, timesteps, context=None, y=None, ...)``;
keyword arguments given to the denoiser (the conditioning) pass through to it untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from kuas.sampling.schedules import DiscreteSchedule

__all__ = ["Denoiser", "EpsDenoiser", "LCMDenoiser", "VDenoiser", "batch_sigma"]


class Denoiser(Protocol):
    """Anything a sampler can call: ``denoiser(x, sigma, **cond) -> x0`` (sigma: shape (batch,))."""

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor: ...


def batch_sigma(x: Tensor, sigma: Tensor | float) -> Tensor:
    """Sigma as a tensor of shape (batch,) on x's device (accepts a float, a 0-d or a (batch,) tensor); float32,
    or float64 when x is float64 (for high-precision checks)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (batch,) vector to broadcast over x, in x's dtype."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


class EpsDenoiser:
    """x0 from a network that predicts the added noise eps (SD 1.x, SD 2.x-base, SDXL)."""

    def __init__(self, model_fn: Callable[..., Tensor], schedule: DiscreteSchedule):
        self.model_fn = model_fn
        self.schedule = schedule

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for a (batch,) sigma."""
        return torch.ones_like(sigma), -sigma, (sigma**2 + 1) ** -0.5

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = batch_sigma(x, sigma)
        c_skip, c_out, c_in = (_per_sample(c, x) for c in self.scalings(sigma))
        out = self.model_fn(x * c_in, self.schedule.sigma_to_t(sigma), **cond)
        return x * c_skip + out.to(x.dtype) * c_out


class VDenoiser(EpsDenoiser):
    """x0 from a network that predicts v = alpha * eps - sigma_vp * x0 (SD 2.x 768-v, v-pred XL fine-tunes)."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s2 = sigma**2 + 1
        return 1 / s2, -sigma * s2**-0.5, s2**-0.5


class LCMDenoiser:
    """The consistency-model boundary condition on top of another denoiser (Luo et al. 2023, "Latent Consistency
    Models", eq. 9): ``f(x, t) = c_skip(t) * x_t + c_out(t) * x0(x, t)`` with ``c_skip = sd^2 / ((k t)^2 + sd^2)``,
    ``c_out = k t / sqrt((k t)^2 + sd^2)``, sigma_data ``sd`` = 0.5 and timestep scaling ``k`` = 10.

    ``x_t`` is the variance-preserving latent (``x / sqrt(1 + sigma^2)``) as in the paper and diffusers;
    A1111 uses the variance-exploding ``x`` there. At the LCM timesteps (t >= 19) c_skip < 1e-5, so the two
    agree to that order.
    """

    def __init__(self, inner: EpsDenoiser, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        self.inner = inner
        self.schedule = inner.schedule
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = batch_sigma(x, sigma)
        x0 = self.inner(x, sigma, **cond)
        scaled_t = self.schedule.sigma_to_t(sigma).round() * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled_t**2 + self.sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + self.sigma_data**2) ** 0.5
        x_vp = x * _per_sample((sigma**2 + 1) ** -0.5, x)
        return _per_sample(c_skip, x) * x_vp + _per_sample(c_out, x) * x0

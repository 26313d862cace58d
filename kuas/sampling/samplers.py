"""Samplers: pure functions that integrate the diffusion ODE / SDE over a list of sigmas.

Every sampler has the form

    sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, disable=None, extra_args=None, ...)

``denoiser(x, sigma, **extra_args)`` returns the predicted clean latent x0 (see `kuas.sampling.denoisers`);
``x`` is the noisy latent at ``sigmas[0]`` in the variance-exploding convention (``x0 + sigma * eps``, so pure
noise times ``sigmas[0]`` for txt2img); ``sigmas`` decreases to 0 and the return value is the latent at
``sigmas[-1]``. The ODE is Karras et al.'s ``dx/dsigma = (x - D(x, sigma)) / sigma``.

Randomness comes only from ``generator`` (or an explicit ``noise_sampler(sigma, sigma_next)``): noise is
drawn on the generator's device in float32 and moved to x's device and dtype, so a CPU generator gives the
same images on every device. ``callback(StepInfo)`` runs once per step; raising `SamplingInterrupted` in it
(or returning `SamplingInterrupted`) stops sampling, and the exception carries the last x and x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import trange

from kuas.errors import InvalidInputError, KuasError
from kuas.sampling.denoisers import Denoiser, batch_sigma

__all__ = [
    "BrownianNoiseSampler",
    "GaussianNoiseSampler",
    "NoiseSampler",
    "SamplingInterrupted",
    "StepInfo",
    "get_ancestral_step",
    "sample_ddim",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
]

NoiseSampler = Callable[[float, float], Tensor]


# --------------------------------------------------------------------------------------------------
# Step reports and cancellation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after the first model evaluation of step ``i`` (0-based) of ``total``."""

    i: int
    total: int
    x: Tensor
    sigma: float
    sigma_hat: float
    denoised: Tensor


class SamplingInterrupted(KuasError):
    """Raised (or returned) by a step callback to stop sampling; carries the state at the stop.

    ``step`` is the step index, ``x`` the latent at that step's sigma and ``denoised`` its x0 prediction
    (what A1111 returns when a job is interrupted).
    """

    def __init__(
        self,
        message: str = "sampling interrupted by the callback",
        *,
        step: int | None = None,
        x: Tensor | None = None,
        denoised: Tensor | None = None,
    ):
        super().__init__(message)
        self.step = step
        self.x = x
        self.denoised = denoised


def _report(
    callback, i: int, total: int, x: Tensor, sigma: float, sigma_hat: float, denoised: Tensor
) -> None:
    if callback is None:
        return
    info = StepInfo(i=i, total=total, x=x, sigma=sigma, sigma_hat=sigma_hat, denoised=denoised)
    try:
        result = callback(info)
    except SamplingInterrupted as stop:
        if stop.x is None:
            stop.step, stop.x, stop.denoised = i, x, denoised
        raise
    if result is SamplingInterrupted or isinstance(result, SamplingInterrupted):
        raise SamplingInterrupted(step=i, x=x, denoised=denoised)


# --------------------------------------------------------------------------------------------------
# Noise sources
# --------------------------------------------------------------------------------------------------


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator()
    g.seed()  # a fresh non-deterministic seed for this call only
    return g


class GaussianNoiseSampler:
    """Independent standard normal noise per call, from one generator or one generator per batch item.

    With ``seeds`` (one per batch item) each item's noise depends only on its own seed, so an image does not
    change with its position in the batch.
    """

    def __init__(
        self, x: Tensor, generator: torch.Generator | None = None, seeds: Sequence[int] | None = None
    ):
        self.shape = tuple(x.shape)
        self.device, self.dtype = x.device, x.dtype
        if seeds is not None:
            if len(seeds) != x.shape[0]:
                raise InvalidInputError(f"need one seed per batch item ({x.shape[0]}), got {len(seeds)}")
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        else:
            self.generators = [_default_generator(generator)]

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        if len(self.generators) == 1:
            g = self.generators[0]
            noise = torch.randn(self.shape, generator=g, device=g.device, dtype=torch.float32)
        else:
            noise = torch.stack(
                [
                    torch.randn(self.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                    for g in self.generators
                ]
            )
        return noise.to(self.device, self.dtype)


def _mix64(*values: int) -> int:
    """A deterministic 63-bit hash of integers (splitmix64 finaliser), used to seed Brownian tree nodes."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h = z ^ (z >> 31)
    return h & 0x7FFFFFFFFFFFFFFF


class _BrownianPath:
    """One Brownian motion W on [t0, t1] with W(t0) = 0, evaluated lazily by bisection ("virtual Brownian
    tree", Li et al. 2020): the value at the midpoint of every dyadic interval is drawn from the Brownian
    bridge between its ends, with a seed derived from (root seed, depth, index). Any query therefore gives the
    same value whatever was asked before, and no state is kept between queries. Below ``depth`` levels the path
    is linearly interpolated (the bridge's mean), an error of order sqrt((t1 - t0) / 2**depth)."""

    def __init__(self, seed: int, t0: float, t1: float, shape: Sequence[int], depth: int = 20):
        self.seed, self.t0, self.t1 = int(seed), float(t0), float(t1)
        self.shape, self.depth = tuple(shape), depth

    def _normal(self, level: int, index: int) -> Tensor:
        g = torch.Generator().manual_seed(_mix64(self.seed, level, index))
        return torch.randn(self.shape, generator=g, dtype=torch.float32)

    def __call__(self, t: float) -> Tensor:
        span = self.t1 - self.t0
        u = min(max((t - self.t0) / span, 0.0), 1.0)
        w_left = torch.zeros(self.shape)
        w_right = self._normal(0, -1) * math.sqrt(span)
        if u == 0.0:
            return w_left
        if u == 1.0:
            return w_right
        left, width, index = 0.0, 1.0, 0
        for level in range(self.depth):
            mid = left + width / 2
            w_mid = (w_left + w_right) / 2 + self._normal(level, index) * math.sqrt(span * width / 4)
            if u == mid:
                return w_mid
            width /= 2
            if u < mid:
                w_right, index = w_mid, 2 * index
            else:
                w_left, left, index = w_mid, mid, 2 * index + 1
        frac = (u - left) / width
        return w_left + (w_right - w_left) * frac


class BrownianNoiseSampler:
    """Noise for SDE samplers from a Brownian motion over sigma: ``(W(sigma_next) - W(sigma)) / sqrt(|dsigma|)``.

    Noise for overlapping sigma intervals is correlated as a real Brownian path makes it, which is what lets
    DPM++ SDE samplers converge as the step count grows (k-diffusion uses torchsde's BrownianTree for this;
    kuas uses its own tree, so the noise values differ from A1111's). With ``seeds`` (one per batch item)
    each item has its own path; otherwise one seed per item is drawn from ``generator``.
    """

    def __init__(
        self,
        x: Tensor,
        sigma_min: float,
        sigma_max: float,
        *,
        generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
        depth: int = 20,
    ):
        if seeds is None:
            g = _default_generator(generator)
            seeds = torch.randint(0, 2**62, (x.shape[0],), generator=g, device=g.device).tolist()
        elif len(seeds) != x.shape[0]:
            raise InvalidInputError(f"need one seed per batch item ({x.shape[0]}), got {len(seeds)}")
        lo, hi = float(sigma_min), float(sigma_max)
        if not hi > lo:
            raise InvalidInputError(
                f"Brownian noise needs sigma_max > sigma_min, got {sigma_min} and {sigma_max}"
            )
        self.paths = [_BrownianPath(s, lo, hi, x.shape[1:], depth) for s in seeds]
        self.device, self.dtype = x.device, x.dtype

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        scale = math.sqrt(abs(sigma_next - sigma))
        increments = [
            (p(sigma_next) - p(sigma)) / scale if scale > 0 else torch.zeros(p.shape) for p in self.paths
        ]
        return torch.stack(increments).to(self.device, self.dtype)


def _brownian_default(x: Tensor, sigmas: Sequence[float], generator) -> BrownianNoiseSampler:
    positive = [s for s in sigmas if s > 0]
    lo, hi = min(positive), max(positive)
    if hi <= lo:
        hi = lo * 2
    return BrownianNoiseSampler(x, lo, hi, generator=generator)


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _floats(sigmas: Tensor | Sequence[float]) -> list[float]:
    values = [float(s) for s in (sigmas.detach().cpu().tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(values) < 2:
        raise InvalidInputError(f"sigmas must hold at least 2 values (start and end), got {len(values)}")
    return values


def _model(denoiser: Denoiser, x: Tensor, sigma: float, extra_args: dict | None) -> Tensor:
    return denoiser(x, batch_sigma(x, sigma), **(extra_args or {}))


def _steps(n: int, disable: bool | None):
    return trange(n, disable=disable, leave=False, desc="sampling")


def get_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step from sigma to sigma_next into a deterministic step to sigma_down plus fresh noise of
    std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (eta = 1 is the DDPM posterior, eta = 0 none)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def _churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, noise) -> tuple[Tensor, float]:
    """Karras et al. 2022 Algorithm 2 lines 4-6: raise the noise level to sigma_hat by adding fresh noise."""
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma, sigma_hat) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


# --------------------------------------------------------------------------------------------------
# Euler family (Karras et al. 2022)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler steps of the probability-flow ODE, Karras et al. 2022 Algorithm 2 (with optional churn)."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or (GaussianNoiseSampler(x, generator) if s_churn > 0 else None)
    for i in _steps(n, disable):
        x, sigma_hat = _churn(x, s[i], n, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = _model(denoiser, x, sigma_hat, extra_args)
        _report(callback, i, n, x, s[i], sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        x = x + d * (s[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler step to sigma_down, then fresh noise up to sigma_next (ancestral sampling, Ho et al. 2020 in
    Karras et al.'s ODE form, as k-diffusion's "Euler a")."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or GaussianNoiseSampler(x, generator)
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise(s[i], s[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 Algorithm 2 (Euler on the last step, to sigma = 0)."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or (GaussianNoiseSampler(x, generator) if s_churn > 0 else None)
    for i in _steps(n, disable):
        x, sigma_hat = _churn(x, s[i], n, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = _model(denoiser, x, sigma_hat, extra_args)
        _report(callback, i, n, x, s[i], sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - _model(denoiser, x_euler, s[i + 1], extra_args)) / s[i + 1]
            x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1) as k-diffusion's "DPM2": a midpoint step whose midpoint is
    the geometric mean of the two sigmas; Euler on the last step."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or (GaussianNoiseSampler(x, generator) if s_churn > 0 else None)
    for i in _steps(n, disable):
        x, sigma_hat = _churn(x, s[i], n, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = _model(denoiser, x, sigma_hat, extra_args)
        _report(callback, i, n, x, s[i], sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
        else:
            sigma_mid = math.exp((math.log(sigma_hat) + math.log(s[i + 1])) / 2)
            x_mid = x + d * (sigma_mid - sigma_hat)
            d_mid = (x_mid - _model(denoiser, x_mid, sigma_mid, extra_args)) / sigma_mid
            x = x + d_mid * (s[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-2 midpoint step to sigma_down, then fresh noise up to sigma_next ("DPM2 a")."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or GaussianNoiseSampler(x, generator)
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        d = (x - denoised) / s[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
        else:
            sigma_mid = math.exp((math.log(s[i]) + math.log(sigma_down)) / 2)
            x_mid = x + d * (sigma_mid - s[i])
            d_mid = (x_mid - _model(denoiser, x_mid, sigma_mid, extra_args)) / sigma_mid
            x = x + d_mid * (sigma_down - s[i])
            if sigma_up > 0:
                x = x + noise(s[i], s[i + 1]) * s_noise * sigma_up
    return x


def _lms_coefficient(nodes: Sequence[float], j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis polynomial that is 1 at nodes[j] and 0 at the other nodes."""
    others = [t for k, t in enumerate(nodes) if k != j]
    poly = np.polynomial.polynomial.polyfromroots(others) if others else np.array([1.0])
    poly = poly / np.polynomial.polynomial.polyval(nodes[j], poly)
    antiderivative = np.polynomial.polynomial.polyint(poly)
    return float(
        np.polynomial.polynomial.polyval(b, antiderivative)
        - np.polynomial.polynomial.polyval(a, antiderivative)
    )


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth over sigma with variable steps): the derivative is extrapolated by the
    Lagrange polynomial through the last `order` derivatives and integrated exactly (k-diffusion's "LMS")."""
    s = _floats(sigmas)
    n = len(s) - 1
    ds: list[Tensor] = []
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        ds.append((x - denoised) / s[i])
        if len(ds) > order:
            ds.pop(0)
        cur = len(ds)
        nodes = [s[i - k] for k in range(cur)]  # newest first
        for k in range(cur):
            x = x + _lms_coefficient(nodes, k, s[i], s[i + 1]) * ds[-1 - k]
    return x


# --------------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022b), written in t = -log(sigma)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2) to sigma_down, then ancestral noise."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or GaussianNoiseSampler(x, generator)
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(sigma_down)
            sigma_mid = math.exp(math.log(s[i]) - h / 2)
            x_mid = (sigma_mid / s[i]) * x - math.expm1(-h / 2) * denoised
            denoised_mid = _model(denoiser, x_mid, sigma_mid, extra_args)
            x = (sigma_down / s[i]) * x - math.expm1(-h) * denoised_mid
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise(s[i], s[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Stochastic DPM-Solver++ with a two-stage (2S-style) step, k-diffusion's "DPM++ SDE" (Lu et al. 2022b
    with ancestral noise at each stage); Brownian noise by default. Euler on the last step."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or _brownian_default(x, s, generator)
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        t, t_next = -math.log(s[i]), -math.log(s[i + 1])
        h = t_next - t
        sigma_mid = math.exp(-(t + r * h))
        # stage 1: to the intermediate sigma, ancestrally
        down, up = get_ancestral_step(s[i], sigma_mid, eta)
        x_mid = (down / s[i]) * x - math.expm1(math.log(down) - math.log(s[i])) * denoised
        if up > 0:
            x_mid = x_mid + noise(s[i], sigma_mid) * s_noise * up
        denoised_mid = _model(denoiser, x_mid, sigma_mid, extra_args)
        # stage 2: the full step, with the x0 estimates blended as in DPM-Solver++(2S)
        down, up = get_ancestral_step(s[i], s[i + 1], eta)
        fac = 1 / (2 * r)
        blended = (1 - fac) * denoised + fac * denoised_mid
        x = (down / s[i]) * x - math.expm1(math.log(down) - math.log(s[i])) * blended
        if up > 0:
            x = x + noise(s[i], s[i + 1]) * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2); first order on the first and the last step."""
    s = _floats(sigmas)
    n = len(s) - 1
    old_denoised: Tensor | None = None
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            if old_denoised is None:
                estimate = denoised
            else:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * estimate
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Appendix: the SDE variant), "midpoint" or "heun" correction."""
    if solver_type not in ("midpoint", "heun"):
        raise InvalidInputError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or _brownian_default(x, s, generator)
    old_denoised: Tensor | None = None
    h_last: float | None = None
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            h = None
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            one_minus = -math.expm1(-h - eta_h)
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x + one_minus * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (one_minus / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * one_minus * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(s[i], s[i + 1]) * s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022b, third-order multistep with the SDE's exponential integrator)."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or _brownian_default(x, s, generator)
    d_1: Tensor | None = None
    d_2: Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            h = None
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and d_2 is not None and d_1 is not None and h_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                first = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                second = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * first - phi_3 * second
            elif h_1 is not None and d_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = x + noise(s[i], s[i + 1]) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


# --------------------------------------------------------------------------------------------------
# DDIM, PLMS, UniPC, LCM in sigma space
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma space: x_next = x0 + sqrt(s_next^2 - s_up^2) * eps + s_up * z
    with s_up = eta * s_next * sqrt(1 - s_next^2 / s^2) (the paper's sigma_t divided by sqrt(alpha_next));
    eta = 0 is the deterministic DDIM, which is exactly an Euler step in sigma."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or (GaussianNoiseSampler(x, generator) if eta > 0 else None)
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        eps = (x - denoised) / s[i]
        sigma_up = eta * s[i + 1] * math.sqrt(max(0.0, 1 - s[i + 1] ** 2 / s[i] ** 2))
        x = denoised + eps * math.sqrt(max(0.0, s[i + 1] ** 2 - sigma_up**2))
        if sigma_up > 0 and noise is not None:
            x = x + noise(s[i], s[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
) -> Tensor:
    """PLMS / PNDM (Liu et al. 2022, "Pseudo Numerical Methods", eq. 12 with fixed Adams-Bashforth weights on
    eps): a pseudo improved-Euler first step, then 2nd/3rd/4th-order linear multistep on the predicted noise."""
    s = _floats(sigmas)
    n = len(s) - 1
    old_eps: list[Tensor] = []
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        eps = (x - denoised) / s[i]
        if not old_eps:
            if s[i + 1] > 0:
                x_next = x + eps * (s[i + 1] - s[i])
                eps_next = (x_next - _model(denoiser, x_next, s[i + 1], extra_args)) / s[i + 1]
                eps_prime = (eps + eps_next) / 2
            else:
                eps_prime = eps
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + eps_prime * (s[i + 1] - s[i])
        old_eps.append(eps)
        if len(old_eps) > 3:
            old_eps.pop(0)
    return x


def _unipc_coefficients(
    rks: list[float], h: float, order: int, variant: str, corrector: bool
) -> tuple[list[float], float]:
    """Weights of the UniPC update (Zhao et al. 2023, Algorithm 2/3 with B(h) = h (bh1) or e^h - 1 (bh2)) for
    the data-prediction model: returns (rhos, B(h)) where rks holds the ratios of older steps' log-sigma gaps."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    ratios = rks + [1.0]
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in ratios])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:
        if order == 1:
            return [0.5], b_h
        solved = np.linalg.solve(np.array(rows), np.array(b))
        return solved.tolist(), b_h
    if order == 1:
        return [], b_h
    if order == 2:
        return [0.5], b_h
    solved = np.linalg.solve(np.array(rows)[:-1, :-1], np.array(b)[:-1])
    return solved.tolist(), b_h


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    order: int = 3,
    variant: str = "bh1",
    lower_order_final: bool = True,
    use_corrector: bool = True,
) -> Tensor:
    """UniPC multistep predictor-corrector (Zhao et al. 2023, "UniPC", data prediction, B(h) variants bh1/bh2).

    Defaults follow A1111 (bh1, order 3, lower order on the final steps); diffusers' UniPCMultistepScheduler
    defaults to bh2 and order 2. The corrector reuses the next step's model evaluation, so it costs nothing.
    """
    if variant not in ("bh1", "bh2"):
        raise InvalidInputError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    if order < 1:
        raise InvalidInputError(f"UniPC order must be >= 1, got {order}")
    s = _floats(sigmas)
    n = len(s) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    outputs: list[Tensor] = []  # x0 predictions, newest last
    x_before: Tensor | None = None  # the sample the last predictor step started from
    last_order = 1
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        if use_corrector and x_before is not None:
            # UniC: redo the last step from x_before using this evaluation too (order last_order + 1 accuracy)
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, last_order)]
            rhos, b_h = _unipc_coefficients(rks, h, last_order, variant, corrector=True)
            m0 = outputs[-1]
            correction = rhos[-1] * (denoised - m0)
            for k, rk in enumerate(rks, start=1):
                correction = correction + rhos[k - 1] * (outputs[-1 - k] - m0) / rk
            x = (s[i] / s[i - 1]) * x_before - math.expm1(-h) * m0 - b_h * correction
        _report(callback, i, n, x, s[i], s[i], denoised)
        outputs.append(denoised)
        if len(outputs) > order:
            outputs.pop(0)
        if s[i + 1] == 0:
            x = denoised
            break
        step_order = min(order, n - i) if lower_order_final else order
        step_order = min(step_order, len(outputs))
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, step_order)]
        rhos, b_h = _unipc_coefficients(rks, h, step_order, variant, corrector=False)
        m0 = outputs[-1]
        x_before = x
        x = (s[i + 1] / s[i]) * x - math.expm1(-h) * m0
        for k, rk in enumerate(rks, start=1):
            x = x - b_h * rhos[k - 1] * (outputs[-1 - k] - m0) / rk
        last_order = step_order
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
    disable: bool | None = None,
    extra_args: dict | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1): jump to the consistency
    model's x0, then re-noise to the next sigma with fresh noise. Use with `LCMDenoiser` for LCM weights."""
    s = _floats(sigmas)
    n = len(s) - 1
    noise = noise_sampler or GaussianNoiseSampler(x, generator)
    for i in _steps(n, disable):
        denoised = _model(denoiser, x, s[i], extra_args)
        _report(callback, i, n, x, s[i], s[i], denoised)
        x = denoised
        if s[i + 1] > 0:
            x = x + noise(s[i], s[i + 1]) * s[i + 1]
    return x

"""Noise schedules: the SD discrete schedule and the sigma lists the samplers step through.

Everything here works in k-diffusion's "variance exploding" view of a DDPM: a noisy latent is
``x = x0 + sigma * eps`` with ``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)``. A discrete model
trained on 1000 timesteps knows 1000 sigmas; `DiscreteSchedule` maps between sigma and the (continuous)
timestep the U-Net expects.

Each ``get_sigmas_<name>`` returns ``n + 1`` float32 sigmas, decreasing, the last one 0: a sampler with
``n`` steps walks from ``sigmas[0]`` down to ``sigmas[-1] = 0`` (clean data). The names follow A1111's
"Schedule type" list; see `kuas.sampling.registry` for labels, keys and aliases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kuas.errors import InvalidInputError

__all__ = [
    "ALIGN_YOUR_STEPS_SD1",
    "ALIGN_YOUR_STEPS_SDXL",
    "NOISE_SCHEDULES",
    "ZTSNR_LAST_ALPHA_CUMPROD",
    "DiscreteSchedule",
    "alphas_cumprod_from_betas",
    "append_zero",
    "beta_ppf",
    "discard_next_to_last_sigma",
    "get_sigmas_align_your_steps",
    "get_sigmas_beta",
    "get_sigmas_ddim",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_kl_optimal",
    "get_sigmas_lcm",
    "get_sigmas_normal",
    "get_sigmas_polyexponential",
    "get_sigmas_sgm_uniform",
    "get_sigmas_simple",
    "get_sigmas_uniform",
    "linear_betas",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
    "sd_alphas_cumprod",
    "sigmas_from_timesteps",
]

# NVIDIA's published 10-step "Align Your Steps" sigmas (11 values, the last step goes to 0).
ALIGN_YOUR_STEPS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
ALIGN_YOUR_STEPS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


# --------------------------------------------------------------------------------------------------
# Training schedules (betas -> alphas_cumprod)
# --------------------------------------------------------------------------------------------------


def scaled_linear_betas(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, device=None
) -> Tensor:
    """The SD "scaled_linear" betas: linear in sqrt(beta), squared (float64, as the reference computes them)."""
    return (
        torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64, device=device) ** 2
    )


def linear_betas(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, device=None
) -> Tensor:
    """Plain DDPM "linear" betas (float64)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64, device=device)


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """Cumulative product of (1 - beta): the fraction of signal variance left at each timestep."""
    return torch.cumprod(1.0 - betas, dim=0)


def sd_alphas_cumprod(device=None) -> Tensor:
    """alphas_cumprod of every SD 1.x / 2.x / XL checkpoint (1000 scaled_linear steps, 0.00085 to 0.012)."""
    return alphas_cumprod_from_betas(scaled_linear_betas(device=device))


# A1111's "Noise schedule for sampling" setting (infotext "Noise Schedule"): SD's own, or SD's rescaled to zero
# terminal SNR, which a model trained on it (`rescale_zero_terminal_snr`) must be sampled on.
NOISE_SCHEDULES: tuple[str, ...] = ("Default", "Zero Terminal SNR")

# The last alphas_cumprod of a zero-terminal-SNR schedule as A1111 and ComfyUI sample it: not 0 (an infinite
# sigma) but this tiny value, so that the last sigma is finite (about 4518) and every sigma-space sampler
# runs unchanged; the signal left at that timestep (sqrt: 2e-4) is nil in practice.
ZTSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def rescale_zero_terminal_snr(alphas_cumprod: Tensor, last: float = ZTSNR_LAST_ALPHA_CUMPROD) -> Tensor:
    """A schedule whose last timestep holds (almost) no signal: Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1.

    SD's schedule ends at alphas_cumprod 0.0047: its noisiest training inputs still carry 7% of the image,
    so a model learns to read layout and brightness from that remnant, which pure sampling noise does not
    have. The rescale shifts sqrt(alphas_cumprod) so its last value is 0 and scales it so the first stays
    unchanged; the last entry is then set to `last` (0 gives exactly zero SNR, and an infinite sigma).
    Returns float64. Train with v-prediction: at zero SNR an eps model's target says nothing about x0.
    """
    root = torch.as_tensor(alphas_cumprod).to(torch.float64).sqrt()
    first, final = root[0].clone(), root[-1].clone()
    root = (root - final) * (first / (first - final))
    out = root**2
    out[-1] = last
    return out


# --------------------------------------------------------------------------------------------------
# The discrete schedule
# --------------------------------------------------------------------------------------------------


class DiscreteSchedule:
    """The 1000 sigmas a discrete-time model was trained on, and the sigma <-> timestep maps.

    ``sigma_to_t`` interpolates linearly in log-sigma between neighbouring training sigmas and returns a
    continuous timestep (k-diffusion's behaviour, without quantisation); ``t_to_sigma`` is its inverse.
    Sigmas are kept in float32 like the reference wrappers.
    """

    def __init__(self, alphas_cumprod: Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod)
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise InvalidInputError(
                f"alphas_cumprod must be a 1-D tensor with at least 2 entries, got shape "
                f"{tuple(alphas_cumprod.shape)}; pass the model's training schedule (e.g. sd_alphas_cumprod())"
            )
        ac = alphas_cumprod.to(torch.float32)
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def sd(cls, device=None, *, zero_terminal_snr: bool = False) -> DiscreteSchedule:
        """The schedule shared by SD 1.x, 2.x and XL (rescaled to zero terminal SNR for models trained so)."""
        ac = sd_alphas_cumprod(device=device)
        return cls(rescale_zero_terminal_snr(ac) if zero_terminal_snr else ac)

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def device(self) -> torch.device:
        return self.sigmas.device

    def to(self, device) -> DiscreteSchedule:
        """A copy whose tables live on `device`."""
        return DiscreteSchedule(self.alphas_cumprod.to(device))

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Continuous timestep for each sigma (log-sigma interpolation, clamped to [0, T-1])."""
        sigma = sigma if torch.is_tensor(sigma) else torch.tensor(sigma, dtype=torch.float32)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float32).log()
        flat = log_sigma.reshape(-1)
        # index of the last training sigma that is <= sigma, kept so that [low, low + 1] is a valid pair
        low = torch.searchsorted(log_sigmas, flat, right=True) - 1
        low = low.clamp(0, log_sigmas.numel() - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((flat - lo) / (hi - lo)).clamp(0, 1)
        t = low.to(torch.float32) + w
        return t.reshape(sigma.shape)

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating log-sigma between neighbours."""
        t = (t if torch.is_tensor(t) else torch.tensor(t)).to(torch.float32)
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.clamp(0, log_sigmas.numel() - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def __repr__(self) -> str:
        return (
            f"DiscreteSchedule(num_timesteps={self.num_timesteps}, sigma_min={self.sigma_min:.4f}, "
            f"sigma_max={self.sigma_max:.4f})"
        )


# --------------------------------------------------------------------------------------------------
# Sigma lists
# --------------------------------------------------------------------------------------------------


def append_zero(sigmas: Tensor) -> Tensor:
    """Append the final sigma 0 (clean data)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidInputError(f"the number of sampling steps must be an integer >= 1, got {n!r}")


def _finish(sigmas: Tensor, device) -> Tensor:
    return append_zero(sigmas.to(torch.float32)).to(device if device is not None else sigmas.device)


def _range(
    schedule: DiscreteSchedule | None, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    if sigma_min is None or sigma_max is None:
        if schedule is None:
            raise InvalidInputError("pass either a DiscreteSchedule or both sigma_min and sigma_max")
        sigma_min = schedule.sigma_min if sigma_min is None else sigma_min
        sigma_max = schedule.sigma_max if sigma_max is None else sigma_max
    if not 0 < sigma_min < sigma_max:
        raise InvalidInputError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    return float(sigma_min), float(sigma_max)


def get_sigmas_uniform(n: int, schedule: DiscreteSchedule, device=None) -> Tensor:
    """A1111 "Uniform" (the model's own schedule): n timesteps evenly spaced from T-1 down to 0."""
    _check_steps(n)
    t = torch.linspace(schedule.num_timesteps - 1, 0, n)
    return _finish(schedule.to("cpu").t_to_sigma(t), device)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None) -> Tensor:
    """Karras et al. 2022 (EDM) eq. 5: evenly spaced in sigma^(1/rho)."""
    _check_steps(n)
    sigma_min, sigma_max = _range(None, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device=None) -> Tensor:
    """Evenly spaced in log-sigma, from sigma_max to sigma_min."""
    _check_steps(n)
    sigma_min, sigma_max = _range(None, sigma_min, sigma_max)
    return _finish(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp(), device)


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device=None
) -> Tensor:
    """log-sigma follows ramp**rho from log(sigma_max) to log(sigma_min) (rho = 1 is Exponential)."""
    _check_steps(n)
    sigma_min, sigma_max = _range(None, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n) ** rho
    return _finish(
        torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)), device
    )


def get_sigmas_sgm_uniform(
    n: int,
    schedule: DiscreteSchedule,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    device=None,
) -> Tensor:
    """A1111 "SGM Uniform": n + 1 timesteps evenly spaced from t(sigma_max) to t(sigma_min), the last dropped.

    This is the spacing of Stability's sgm "discrete" sampler (and the times A1111's UniPC evaluates at).
    """
    _check_steps(n)
    schedule = schedule.to("cpu")
    sigma_min, sigma_max = _range(schedule, sigma_min, sigma_max)
    start, end = schedule.sigma_to_t(torch.tensor(sigma_max)), schedule.sigma_to_t(torch.tensor(sigma_min))
    t = torch.linspace(float(start), float(end), n + 1)[:-1]
    return _finish(schedule.t_to_sigma(t), device)


def get_sigmas_normal(
    n: int,
    schedule: DiscreteSchedule,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    device=None,
) -> Tensor:
    """A1111 "Normal": n timesteps evenly spaced from t(sigma_max) to t(sigma_min) inclusive.

    With the model's own sigma range this equals "Uniform".
    """
    _check_steps(n)
    schedule = schedule.to("cpu")
    sigma_min, sigma_max = _range(schedule, sigma_min, sigma_max)
    start, end = schedule.sigma_to_t(torch.tensor(sigma_max)), schedule.sigma_to_t(torch.tensor(sigma_min))
    t = torch.linspace(float(start), float(end), n)
    return _finish(schedule.t_to_sigma(t), device)


def get_sigmas_simple(n: int, schedule: DiscreteSchedule, device=None) -> Tensor:
    """A1111/ComfyUI "Simple": every (T/n)-th training sigma counted down from the largest (truncating)."""
    _check_steps(n)
    sigmas = schedule.sigmas.to("cpu")
    stride = sigmas.numel() / n
    picked = [sigmas[-(1 + int(i * stride))] for i in range(n)]
    return _finish(torch.stack(picked), device)


def get_sigmas_ddim(n: int, schedule: DiscreteSchedule, device=None) -> Tensor:
    """A1111 "DDIM": training timesteps 1, 1 + T//n, 1 + 2*(T//n), ... reversed (CompVis DDIM's "uniform" set).

    Note that when n does not divide T this yields more than n steps (e.g. 31 for n = 30), exactly as A1111.
    """
    _check_steps(n)
    sigmas = schedule.sigmas.to("cpu")
    stride = max(sigmas.numel() // n, 1)
    picked = sigmas[1::stride].flip(0)
    return _finish(picked, device)


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float, device=None) -> Tensor:
    """ "KL Optimal" (Sabour et al. 2024, "Align Your Steps", eq. for the KL-optimal schedule): evenly spaced in
    arctan(sigma) from sigma_max to sigma_min, then 0.

    kuas follows ComfyUI's form (n sigmas then 0); A1111's version returns n + 1 sigmas that stop at
    sigma_min, leaving a residual noise of sigma_min in the output.
    """
    _check_steps(n)
    sigma_min, sigma_max = _range(None, sigma_min, sigma_max)
    if n == 1:
        return _finish(torch.tensor([sigma_max]), device)
    w = torch.arange(n, dtype=torch.float64) / (n - 1)
    sigmas = torch.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max))
    return _finish(sigmas, device)


def get_sigmas_align_your_steps(n: int, sdxl: bool = False, device=None) -> Tensor:
    """NVIDIA's "Align Your Steps" sigmas (Sabour et al. 2024), log-linearly resampled to n steps as A1111 does."""
    _check_steps(n)
    base = torch.tensor(ALIGN_YOUR_STEPS_SDXL if sdxl else ALIGN_YOUR_STEPS_SD1, dtype=torch.float64)
    if n == base.numel():
        return _finish(base, device)
    logs = base.log()
    pos = torch.linspace(0, base.numel() - 1, n, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=base.numel() - 2)
    frac = pos - lo
    sigmas = ((1 - frac) * logs[lo] + frac * logs[lo + 1]).exp()
    return _finish(sigmas, device)


def get_sigmas_beta(
    n: int,
    sigma_min: float,
    sigma_max: float,
    alpha: float = 0.6,
    beta: float = 0.6,
    device=None,
) -> Tensor:
    """ "Beta" (Lee et al. 2024, "Beta Sampling is All You Need"), in A1111's form: sigma_min +
    (sigma_max - sigma_min) * BetaPPF(1 - i/(n-1); alpha, beta), then 0. A1111's default alpha = beta = 0.6."""
    _check_steps(n)
    sigma_min, sigma_max = _range(None, sigma_min, sigma_max)
    qs = [1.0 - (i / (n - 1) if n > 1 else 0.0) for i in range(n)]
    sig = [sigma_min + beta_ppf(q, alpha, beta) * (sigma_max - sigma_min) for q in qs]
    return _finish(torch.tensor(sig, dtype=torch.float64), device)


def get_sigmas_lcm(n: int, schedule: DiscreteSchedule, original_steps: int = 50, device=None) -> Tensor:
    """Sigmas for LCM models as A1111 samples them: n timesteps evenly spaced over the distillation grid
    (T/original_steps * k - 1, i.e. 19, 39, ... 999 for SD) and snapped to the nearest grid point in log-sigma.

    diffusers' LCMScheduler picks different grid points (floor of evenly spaced indices, never the last one);
    pass its timesteps through `DiscreteSchedule.t_to_sigma` to reproduce it.
    """
    _check_steps(n)
    schedule = schedule.to("cpu")
    skip = schedule.num_timesteps // original_steps
    grid_t = torch.arange(1, original_steps + 1) * skip - 1
    grid_log = schedule.log_sigmas[grid_t]
    pos = torch.linspace(original_steps - 1, 0, n)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    w = pos - lo
    log_sigma = (1 - w) * grid_log[lo] + w * grid_log[hi]
    nearest = (log_sigma[:, None] - grid_log[None, :]).abs().argmin(dim=1)
    return _finish(grid_log[nearest].exp(), device)


def discard_next_to_last_sigma(sigmas: Tensor) -> Tensor:
    """Drop the penultimate sigma (A1111 does this for DPM2 / DPM2 a / DPM++ 3M SDE, after asking for one
    step more), so the last real step is not a tiny one from sigma_min to 0."""
    if sigmas.numel() < 3:
        return sigmas
    return torch.cat([sigmas[:-2], sigmas[-1:]])


# --------------------------------------------------------------------------------------------------
# Beta distribution quantile (no scipy at run time)
# --------------------------------------------------------------------------------------------------


def _betainc_cf(a: float, b: float, x: float) -> float:
    """Continued fraction for the regularized incomplete beta (modified Lentz), valid for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b): the Beta(a, b) CDF at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_cf(b, a, 1.0 - x) / b


def beta_ppf(q: float, alpha: float, beta: float) -> float:
    """Quantile of the Beta(alpha, beta) distribution by bisection on its CDF (accurate to ~1e-12)."""
    if not (alpha > 0 and beta > 0):
        raise InvalidInputError(f"Beta schedule parameters must be > 0, got alpha={alpha}, beta={beta}")
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _betainc(alpha, beta, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return 0.5 * (lo + hi)


def sigmas_from_timesteps(
    schedule: DiscreteSchedule, timesteps: Sequence[float] | Tensor, device=None
) -> Tensor:
    """Sigmas for explicit (descending) training timesteps, then 0: how to reproduce another tool's timesteps."""
    t = torch.as_tensor(timesteps, dtype=torch.float32)
    return _finish(schedule.to("cpu").t_to_sigma(t), device)

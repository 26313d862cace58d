"""Samplers: parity with diffusers' schedulers, convergence order on Gaussian data, the registry and callbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kuas.errors import InvalidInputError
from kuas.sampling import registry as R
from kuas.sampling import samplers as S
from kuas.sampling import schedules as K
from kuas.sampling.denoisers import EpsDenoiser

diffusers = pytest.importorskip("diffusers")

SD_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
SHAPE = (2, 4, 4, 4)


class TinyEps:
    """A small random nonlinear eps-prediction "U-Net": eps(x, t), smooth in both."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        d = math.prod(SHAPE[1:])
        self.w1 = torch.randn(d, 32, generator=g) / math.sqrt(d)
        self.w2 = torch.randn(32, d, generator=g) / math.sqrt(32)
        self.b = torch.randn(32, generator=g)

    def __call__(self, x, t, **cond):
        h = x.reshape(x.shape[0], -1).float()
        tt = (torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1) / 1000).expand(x.shape[0], 1)
        hidden = torch.tanh(h @ self.w1 + self.b * torch.cos(3 * tt))
        out = 0.8 * h * (0.5 + tt) + 0.5 * hidden @ self.w2
        return out.reshape(x.shape)


def _noise(seed=1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _run_diffusers(scheduler, model, x, *, step_kwargs=None, per_step=None):
    """The standard diffusers denoising loop; ``per_step(i)`` returns extra step() kwargs for step i."""
    for i, t in enumerate(scheduler.timesteps):
        eps = model(scheduler.scale_model_input(x, t), t)
        kwargs = dict(step_kwargs or {})
        if per_step is not None:
            kwargs.update(per_step(i))
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


def _kuas_sigmas(scheduler) -> torch.Tensor:
    """The distinct sigmas of a k-style diffusers scheduler (Heun/DPM2 list each intermediate sigma twice)."""
    return torch.unique_consecutive(scheduler.sigmas.float())


def _vp_sigmas(scheduler, timesteps, final_zero=True) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.float()
    sig = [((1 - ac[int(t)]) / ac[int(t)]) ** 0.5 for t in timesteps]
    return torch.stack(sig + ([torch.tensor(0.0)] if final_zero else []))


class _Bank:
    """Pre-drawn noises handed out in order; the same list feeds diffusers (variance_noise) and kuas."""

    def __init__(self, n, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.noises = [torch.randn(SHAPE, generator=g) for _ in range(n)]
        self.used = 0

    def __call__(self, sigma, sigma_next):
        z = self.noises[self.used]
        self.used += 1
        return z


def _denoiser(scheduler, model):
    return EpsDenoiser(model, K.DiscreteSchedule(scheduler.alphas_cumprod))


# --------------------------------------------------------------------------------------------------
# Parity with diffusers (k-diffusion style schedulers: the sample is x0 + sigma * eps)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls_name, kuas_fn, config",
    [
        ("EulerDiscreteScheduler", S.sample_euler, {}),
        ("EulerDiscreteScheduler", S.sample_euler, {"use_karras_sigmas": True}),
        ("HeunDiscreteScheduler", S.sample_heun, {}),
        ("KDPM2DiscreteScheduler", S.sample_dpm_2, {}),
        ("LMSDiscreteScheduler", S.sample_lms, {}),
    ],
)
def test_deterministic_k_samplers_match_diffusers(cls_name, kuas_fn, config):
    if cls_name == "LMSDiscreteScheduler":
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    model = TinyEps()
    sched = getattr(diffusers, cls_name)(**SD_CONFIG, **config)
    sched.set_timesteps(10)  # linspace spacing: integer timesteps 999, 888, ... 0
    x_init = _noise() * sched.init_noise_sigma
    ref = _run_diffusers(sched, model, x_init.clone())
    ours = kuas_fn(_denoiser(sched, model), x_init.clone(), _kuas_sigmas(sched))
    assert (ours - ref).abs().max() < 1e-4


def test_euler_ancestral_matches_diffusers():
    model = TinyEps()
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD_CONFIG)
    sched.set_timesteps(10)
    x_init = _noise() * sched.init_noise_sigma
    ref = _run_diffusers(
        sched, model, x_init.clone(), step_kwargs={"generator": torch.Generator().manual_seed(5)}
    )
    # diffusers draws one noise per step from its generator: the same stream, in the same order
    ours = S.sample_euler_ancestral(
        _denoiser(sched, model),
        x_init.clone(),
        _kuas_sigmas(sched),
        generator=torch.Generator().manual_seed(5),
    )
    assert (ours - ref).abs().max() < 1e-4


def test_dpm2_ancestral_matches_diffusers():
    model = TinyEps()
    sched = diffusers.KDPM2AncestralDiscreteScheduler(**SD_CONFIG)
    sched.set_timesteps(10)
    x_init = _noise() * sched.init_noise_sigma
    ref = _run_diffusers(
        sched, model, x_init.clone(), step_kwargs={"generator": torch.Generator().manual_seed(5)}
    )
    ours = S.sample_dpm_2_ancestral(
        _denoiser(sched, model),
        x_init.clone(),
        _kuas_sigmas(sched),
        generator=torch.Generator().manual_seed(5),
    )
    assert (ours - ref).abs().max() < 1e-4


def test_dpm2_karras_differs_from_diffusers_only_by_its_rounded_timesteps():
    """diffusers' KDPM2 with Karras sigmas feeds the model round(t(sigma)) at the step sigmas (it keeps the exact
    t at the midpoints) while k-diffusion and kuas use the continuous t. Measured: 3e-4 apart; with the same
    rounding applied to kuas' model calls the two agree to float precision."""
    model = TinyEps()
    sched = diffusers.KDPM2DiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True)
    sched.set_timesteps(10)
    x_init = _noise() * sched.init_noise_sigma
    ref = _run_diffusers(sched, model, x_init.clone())
    sigmas = _kuas_sigmas(sched)
    denoiser = _denoiser(sched, model)
    plain = S.sample_dpm_2(denoiser, x_init.clone(), sigmas)
    assert 1e-4 < (plain - ref).abs().max() < 1e-3

    step_ts = denoiser.schedule.sigma_to_t(sigmas[:-1])

    def rounding_model(x, t, **cond):
        at_step = (t[:, None] - step_ts[None, :]).abs().min(dim=1).values < 1e-3
        return model(x, torch.where(at_step, t.round(), t))

    rounded = S.sample_dpm_2(EpsDenoiser(rounding_model, denoiser.schedule), x_init.clone(), sigmas)
    assert (rounded - ref).abs().max() < 1e-4


def test_dpmpp_sde_matches_diffusers_with_the_same_brownian_noise():
    pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler module imports torchsde")
    model = TinyEps()
    sched = diffusers.DPMSolverSDEScheduler(**SD_CONFIG, use_karras_sigmas=True)
    sched.set_timesteps(8)
    sigmas = _kuas_sigmas(sched)
    x_init = _noise() * sched.init_noise_sigma
    positive = sigmas[sigmas > 0]
    # one Brownian path object answers both: its values depend only on the (sigma, sigma_next) asked for
    noise = S.BrownianNoiseSampler(x_init, float(positive.min()), float(positive.max()), seeds=[11, 12])
    sched.noise_sampler = noise
    ref = _run_diffusers(sched, model, x_init.clone())
    ours = S.sample_dpmpp_sde(_denoiser(sched, model), x_init.clone(), sigmas, noise_sampler=noise)
    assert (ours - ref).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------------
# Parity with diffusers' variance-preserving schedulers (their sample is x / sqrt(1 + sigma^2))
# --------------------------------------------------------------------------------------------------


def _vp_start(sigmas):
    return _noise() * math.sqrt(1 + float(sigmas[0]) ** 2)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers_multistep(karras):
    model = TinyEps()
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
    )
    sched.set_timesteps(10)
    ref = _run_diffusers(sched, model, _noise())
    sigmas = sched.sigmas.float()
    # with Karras sigmas diffusers feeds the model round(t(sigma)); do the same so that only the solver differs
    kuas_model = (lambda x, t, **c: model(x, t.round())) if karras else model
    ours = S.sample_dpmpp_2m(
        EpsDenoiser(kuas_model, K.DiscreteSchedule(sched.alphas_cumprod)), _vp_start(sigmas), sigmas
    )
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_matches_diffusers_multistep(solver_type):
    model = TinyEps()
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2, solver_type=solver_type
    )
    sched.set_timesteps(10)
    bank = _Bank(10)
    ref = _run_diffusers(sched, model, _noise(), per_step=lambda i: {"variance_noise": bank.noises[i]})
    sigmas = sched.sigmas.float()
    ours = S.sample_dpmpp_2m_sde(
        _denoiser(sched, model), _vp_start(sigmas), sigmas, solver_type=solver_type, noise_sampler=_Bank(10)
    )
    assert (ours - ref).abs().max() < 1e-4


def test_dpmpp_3m_sde_differs_from_diffusers_by_its_third_order_term():
    """diffusers' third-order "sde-dpmsolver++" update weights D2 by (1 - e^-2h - 2h)/(2h)^2 - 0.5, which tends to
    -1 as h -> 0; k-diffusion's DPM++ 3M SDE (and kuas) use -phi_3(2h) = (1 - e^-2h - 2h)/(2h)^2 + 0.5, which
    tends to 0 as a third-order correction must. So the two agree through the first two (lower order) steps
    and differ by exactly 1 * D2 after the first third-order step. (k-diffusion's second-order warm-up step uses
    the phi_2 weight, which is diffusers' solver_type="heun".)"""
    model = TinyEps()
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"
    )
    sched.set_timesteps(20)  # >= 15 steps: diffusers uses order 3 from the third step on
    bank = _Bank(20)
    sigmas = sched.sigmas.float()
    x = _noise()
    for i, t in enumerate(sched.timesteps[:3]):
        x = sched.step(model(x, t), t, x, variance_noise=bank.noises[i]).prev_sample
        ours = S.sample_dpmpp_3m_sde(
            _denoiser(sched, model), _vp_start(sigmas), sigmas[: i + 2], noise_sampler=_Bank(20)
        )
        ref_ve = x * math.sqrt(1 + float(sigmas[i + 1]) ** 2)
        if i < 2:
            assert (ours - ref_ve).abs().max() < 1e-4
    m0, m1, m2 = sched.model_outputs[-1], sched.model_outputs[-2], sched.model_outputs[-3]
    lam = [-math.log(float(v)) for v in sigmas[:4]]
    h, h0, h1 = lam[3] - lam[2], lam[2] - lam[1], lam[1] - lam[0]
    r0, r1 = h0 / h, h1 / h
    d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
    assert d2.abs().max() > 0.01
    assert ((ours - ref_ve) - d2).abs().max() < 1e-4


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers_on_a1111_timesteps(eta):
    model = TinyEps()
    # leading spacing + offset 1 is CompVis/A1111's DDIM timestep set (1, 101, ... 901); final alpha 1 = sigma 0
    sched = diffusers.DDIMScheduler(**SD_CONFIG, set_alpha_to_one=True, steps_offset=1, clip_sample=False)
    sched.set_timesteps(10)
    bank = _Bank(10)
    ref = _run_diffusers(
        sched,
        model,
        _noise(),
        step_kwargs={"eta": eta},
        per_step=lambda i: {"variance_noise": bank.noises[i]},
    )
    schedule = K.DiscreteSchedule(sched.alphas_cumprod)
    sigmas = K.get_sigmas_ddim(10, schedule)
    assert torch.allclose(sigmas[:-1], _vp_sigmas(sched, sched.timesteps, final_zero=False))
    ours = S.sample_ddim(
        EpsDenoiser(model, schedule), _vp_start(sigmas), sigmas, eta=eta, noise_sampler=_Bank(10)
    )
    assert (ours - ref).abs().max() < 1e-4


def test_ddim_with_sd_final_alpha_stops_at_sigma_min():
    """SD's scheduler config (set_alpha_to_one=False), like A1111's CompVis DDIM, ends at alphas_cumprod[0]
    (sigma 0.029) instead of 0. kuas reproduces it by ending the sigmas there and mapping the result to the
    variance-preserving latent; its standard sigmas (ending at 0) give a measurably different, cleaner result."""
    model = TinyEps()
    sched = diffusers.DDIMScheduler(**SD_CONFIG, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    sched.set_timesteps(10)
    ref = _run_diffusers(sched, model, _noise())
    schedule = K.DiscreteSchedule(sched.alphas_cumprod)
    sigmas = K.get_sigmas_ddim(10, schedule)
    ending_at_min = torch.cat([sigmas[:-1], schedule.sigmas[:1]])
    ours = S.sample_ddim(EpsDenoiser(model, schedule), _vp_start(sigmas), ending_at_min)
    assert (ours / math.sqrt(1 + schedule.sigma_min**2) - ref).abs().max() < 1e-4
    to_zero = S.sample_ddim(EpsDenoiser(model, schedule), _vp_start(sigmas), sigmas)
    assert 1e-3 < (to_zero - ref).abs().max() < 0.2


def test_plms_matches_diffusers_pndm():
    model = TinyEps()
    sched = diffusers.PNDMScheduler(**SD_CONFIG, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(10)
    ref = _run_diffusers(sched, model, _noise())
    schedule = K.DiscreteSchedule(sched.alphas_cumprod)
    sigmas = K.get_sigmas_ddim(10, schedule)
    ours = S.sample_plms(EpsDenoiser(model, schedule), _vp_start(sigmas), sigmas)
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("variant, order", [("bh2", 2), ("bh2", 3)])
def test_unipc_matches_diffusers(variant, order):
    model = TinyEps()
    sched = diffusers.UniPCMultistepScheduler(**SD_CONFIG, solver_type=variant, solver_order=order)
    sched.set_timesteps(10)
    ref = _run_diffusers(sched, model, _noise())
    sigmas = sched.sigmas.float()
    ours = S.sample_unipc(_denoiser(sched, model), _vp_start(sigmas), sigmas, variant=variant, order=order)
    assert (ours - ref).abs().max() < 1e-4


def test_unipc_bh1_order_3_matches_diffusers_ending_at_sigma_min():
    """A1111's defaults (bh1, order 3). diffusers' bh1 turns the final step to sigma 0 into NaN (B(h) = -h is
    infinite there and multiplies a zero), so compare on its "sigma_min" ending, where A1111's UniPC also stops;
    kuas takes sigmas ending at sigma_min and its result is mapped to the variance-preserving latent."""
    model = TinyEps()
    sched = diffusers.UniPCMultistepScheduler(
        **SD_CONFIG, solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"
    )
    sched.set_timesteps(10)
    ref = _run_diffusers(sched, model, _noise())
    sigmas = sched.sigmas.float()
    assert float(sigmas[-1]) > 0
    ours = S.sample_unipc(_denoiser(sched, model), _vp_start(sigmas), sigmas, variant="bh1", order=3)
    assert (ours / math.sqrt(1 + float(sigmas[-1]) ** 2) - ref).abs().max() < 1e-4


def test_lcm_matches_diffusers():
    from kuas.sampling.denoisers import LCMDenoiser

    model = TinyEps()
    sched = diffusers.LCMScheduler(**SD_CONFIG)
    sched.set_timesteps(4)
    ref = _run_diffusers(sched, model, _noise(), step_kwargs={"generator": torch.Generator().manual_seed(3)})
    schedule = K.DiscreteSchedule(sched.alphas_cumprod)
    sigmas = K.sigmas_from_timesteps(schedule, sched.timesteps)
    ours = S.sample_lcm(
        LCMDenoiser(EpsDenoiser(model, schedule)),
        _vp_start(sigmas),
        sigmas,
        generator=torch.Generator().manual_seed(3),
    )
    assert (ours - ref).abs().max() < 1e-4


def test_dpmpp_2s_ancestral_without_noise_matches_diffusers_singlestep():
    """DPM++ 2S a with eta = 0 is DPM-Solver++(2S) with the intermediate point at the log-sigma midpoint. diffusers'
    singlestep solver spends two schedule steps per second-order step (its order list is 1, 2, 1, 2, ...), so on
    an exponential (log-uniform) schedule of 2n steps its every other sigma is exactly that midpoint. Compared up
    to the last second-order pair (diffusers ends with first-order steps); diffusers truncates the timesteps it
    feeds the model to integers, so kuas' model calls are snapped to those same timesteps."""
    model = TinyEps()
    sched = diffusers.DPMSolverSinglestepScheduler(**SD_CONFIG, solver_order=2, use_exponential_sigmas=True)
    sched.set_timesteps(8)
    assert list(sched.get_order_list(8)) == [1, 2, 1, 2, 1, 2, 1, 1]
    x = _noise()
    for t in sched.timesteps[:6]:
        x = sched.step(model(x, t), t, x).prev_sample
    sigmas = sched.sigmas.float()
    pairs = sigmas[0:7:2]  # sigma_0, sigma_2, sigma_4, sigma_6
    used = sched.timesteps.float()

    def snapped(x, t, **c):
        nearest = used[(t[:, None] - used[None, :]).abs().argmin(dim=1)]
        assert (nearest - t).abs().max() <= 1.0
        return model(x, nearest)

    ours = S.sample_dpmpp_2s_ancestral(
        EpsDenoiser(snapped, K.DiscreteSchedule(sched.alphas_cumprod)), _vp_start(sigmas), pairs, eta=0.0
    )
    assert (ours / math.sqrt(1 + float(pairs[-1]) ** 2) - x).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------------
# Convergence on Gaussian data, where the exact denoiser and the exact ODE solution are known
# --------------------------------------------------------------------------------------------------

MU, STD = 0.3, 0.5


def gaussian_denoiser(x, sigma):
    """E[x0 | x] for data N(MU, STD^2) noised to x = x0 + sigma * eps."""
    return MU + STD**2 / (STD**2 + sigma.reshape(-1, 1) ** 2) * (x - MU)


def gaussian_consistency(x, sigma):
    """The exact probability-flow ODE map from sigma to 0 for the same data (a perfect consistency model)."""
    return MU + (x - MU) * STD / torch.sqrt(STD**2 + sigma.reshape(-1, 1) ** 2)


ODE_CASES = [
    # (sampler, options, lower bound on the observed order of convergence)
    (S.sample_euler, {}, 0.9),
    (S.sample_ddim, {}, 0.9),
    (S.sample_euler_ancestral, {"eta": 0.0}, 0.9),
    (S.sample_heun, {}, 1.8),
    (S.sample_dpm_2, {}, 1.8),
    (S.sample_dpm_2_ancestral, {"eta": 0.0}, 1.8),
    (S.sample_dpmpp_2m, {}, 1.8),
    (S.sample_dpmpp_2s_ancestral, {"eta": 0.0}, 1.8),
    (S.sample_dpmpp_sde, {"eta": 0.0}, 1.8),
    (S.sample_dpmpp_2m_sde, {"eta": 0.0}, 1.8),
    (S.sample_dpmpp_2m_sde, {"eta": 0.0, "solver_type": "heun"}, 1.8),
    (S.sample_plms, {}, 1.8),
    (S.sample_lms, {}, 3.0),
    # Multistep methods of order 3 and more: their first-order warm-up step (and UniPC's lower-order final
    # steps) each add an O(h^2) error, so the global order observed is 2; without the lower-order final steps
    # UniPC-3 with its corrector shows order 4.
    (S.sample_dpmpp_3m_sde, {"eta": 0.0}, 1.8),
    (S.sample_unipc, {"variant": "bh1", "order": 3}, 1.8),
    (S.sample_unipc, {"variant": "bh1", "order": 3, "lower_order_final": False}, 3.5),
    (S.sample_unipc, {"variant": "bh2", "order": 2}, 2.4),
]


@pytest.mark.parametrize(
    "fn, options, min_order", ODE_CASES, ids=[f"{fn.__name__}{options}" for fn, options, _ in ODE_CASES]
)
@pytest.mark.parametrize("spacing", ["exponential", "karras"])
def test_deterministic_samplers_converge_at_their_order(fn, options, min_order, spacing):
    x_start = torch.linspace(-3, 3, 101, dtype=torch.float64).reshape(1, -1)
    steps, errors = [32, 64, 128], []
    for n in steps:
        # integrate from sigma 10 to sigma 0.05 (no final jump to 0, whose error would not shrink with n)
        make = K.get_sigmas_exponential if spacing == "exponential" else K.get_sigmas_karras
        sigmas = make(n, 0.05, 10.0)[:-1].double()
        s0, s1 = float(sigmas[0]), float(sigmas[-1])
        x_t = MU + (x_start - MU) * math.sqrt(STD**2 + s0**2) / STD
        exact = MU + (x_t - MU) * math.sqrt(STD**2 + s1**2) / math.sqrt(STD**2 + s0**2)
        out = fn(gaussian_denoiser, x_t.clone(), sigmas, **options)
        errors.append(float((out - exact).abs().max()))
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert order > min_order, (errors, order)
    assert errors[-1] < 0.05


STOCHASTIC_CASES = [
    (S.sample_euler_ancestral, {}, 200, gaussian_denoiser),
    (S.sample_ddim, {"eta": 1.0}, 200, gaussian_denoiser),
    (S.sample_dpm_2_ancestral, {}, 50, gaussian_denoiser),
    (S.sample_dpmpp_2s_ancestral, {}, 50, gaussian_denoiser),
    (S.sample_dpmpp_sde, {}, 50, gaussian_denoiser),
    (S.sample_dpmpp_2m_sde, {}, 50, gaussian_denoiser),
    (S.sample_dpmpp_2m_sde, {"solver_type": "heun"}, 50, gaussian_denoiser),
    (S.sample_dpmpp_3m_sde, {}, 50, gaussian_denoiser),
    (S.sample_lcm, {}, 8, gaussian_consistency),
]


@pytest.mark.parametrize(
    "fn, options, steps, denoiser",
    STOCHASTIC_CASES,
    ids=[f"{fn.__name__}{options}" for fn, options, _, _ in STOCHASTIC_CASES],
)
def test_stochastic_samplers_sample_the_data_distribution(fn, options, steps, denoiser):
    sigmas = K.get_sigmas_karras(steps, 0.01, 14.6).double()
    z = torch.randn(1, 20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = MU + z * math.sqrt(STD**2 + float(sigmas[0]) ** 2)
    out = fn(denoiser, x_t, sigmas, generator=torch.Generator().manual_seed(1), **options)
    assert abs(float(out.mean()) - MU) < 0.02
    assert abs(float(out.std()) / STD - 1) < 0.03
    # the same generator gives the same samples; another seed different ones
    again = fn(denoiser, x_t, sigmas, generator=torch.Generator().manual_seed(1), **options)
    other = fn(denoiser, x_t, sigmas, generator=torch.Generator().manual_seed(2), **options)
    assert torch.equal(out, again)
    assert (out - other).abs().max() > 1e-3


def test_brownian_noise_is_standard_normal_consistent_and_batch_independent():
    x = torch.zeros(2, 5000)
    noise = S.BrownianNoiseSampler(x, 0.1, 10.0, seeds=[3, 4])
    z = noise(5.0, 2.0)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    assert torch.equal(z, noise(5.0, 2.0))  # no hidden state: the same query gives the same answer
    # increments over adjacent intervals add up like a Brownian path's
    whole = noise(5.0, 1.0) * math.sqrt(4.0)
    parts = noise(5.0, 2.0) * math.sqrt(3.0) + noise(2.0, 1.0) * math.sqrt(1.0)
    assert torch.allclose(whole, parts, atol=1e-5)
    # disjoint intervals are independent
    assert abs(float(torch.corrcoef(torch.stack([noise(5.0, 2.0)[0], noise(2.0, 1.0)[0]]))[0, 1])) < 0.05
    # an item's noise depends only on its own seed, not on its batch position or neighbours
    alone = S.BrownianNoiseSampler(torch.zeros(1, 5000), 0.1, 10.0, seeds=[4])
    assert torch.equal(alone(5.0, 2.0)[0], z[1])


def test_noise_is_drawn_on_the_generator_and_moved_to_x():
    x = torch.zeros(2, 3, dtype=torch.float64)
    a = S.GaussianNoiseSampler(x, torch.Generator().manual_seed(0))(1.0, 0.5)
    assert a.dtype == torch.float64
    expected = torch.randn((2, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    assert torch.equal(a, expected)
    per_item = S.GaussianNoiseSampler(x, seeds=[10, 11])(1.0, 0.5)
    single = S.GaussianNoiseSampler(x[:1], seeds=[11])(1.0, 0.5)
    assert torch.equal(per_item[1], single[0])


# --------------------------------------------------------------------------------------------------
# Registry, the convenience `sample`, callbacks and interruption
# --------------------------------------------------------------------------------------------------

A1111_NAMES = {
    # name or alias -> (sampler, schedule key with "Automatic")
    "DPM++ 2M": ("DPM++ 2M", "karras"),
    "DPM++ SDE": ("DPM++ SDE", "karras"),
    "DPM++ 2M SDE": ("DPM++ 2M SDE", "exponential"),
    "DPM++ 2M SDE Heun": ("DPM++ 2M SDE Heun", "exponential"),
    "DPM++ 2S a": ("DPM++ 2S a", "karras"),
    "DPM++ 3M SDE": ("DPM++ 3M SDE", "exponential"),
    "Euler a": ("Euler a", "uniform"),
    "Euler": ("Euler", "uniform"),
    "LMS": ("LMS", "uniform"),
    "Heun": ("Heun", "uniform"),
    "DPM2": ("DPM2", "karras"),
    "DPM2 a": ("DPM2 a", "karras"),
    "DDIM": ("DDIM", "ddim"),
    "PLMS": ("PLMS", "ddim"),
    "UniPC": ("UniPC", "sgm_uniform"),
    "LCM": ("LCM", "lcm"),
    "k_euler_a": ("Euler a", "uniform"),
    "k_euler_ancestral": ("Euler a", "uniform"),
    "k_euler": ("Euler", "uniform"),
    "k_lms": ("LMS", "uniform"),
    "k_heun": ("Heun", "uniform"),
    "k_dpm_2": ("DPM2", "karras"),
    "k_dpm_2_a": ("DPM2 a", "karras"),
    "k_dpmpp_2s_a": ("DPM++ 2S a", "karras"),
    "k_dpmpp_2m": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde": ("DPM++ SDE", "karras"),
    "k_dpmpp_2m_sde": ("DPM++ 2M SDE", "exponential"),
    "k_dpmpp_2m_sde_heun": ("DPM++ 2M SDE Heun", "exponential"),
    "k_dpmpp_3m_sde": ("DPM++ 3M SDE", "exponential"),
    "k_lcm": ("LCM", "lcm"),
    "ddim": ("DDIM", "ddim"),
    "plms": ("PLMS", "ddim"),
    "unipc": ("UniPC", "sgm_uniform"),
    # legacy "<sampler> <schedule>" names and their k_*_ka / _exp aliases (A1111 < 1.9)
    "DPM++ 2M Karras": ("DPM++ 2M", "karras"),
    "DPM++ SDE Karras": ("DPM++ SDE", "karras"),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "karras"),
    "DPM++ 2M SDE Exponential": ("DPM++ 2M SDE", "exponential"),
    "DPM++ 2M SDE Heun Karras": ("DPM++ 2M SDE Heun", "karras"),
    "DPM++ 3M SDE Karras": ("DPM++ 3M SDE", "karras"),
    "DPM++ 2S a Karras": ("DPM++ 2S a", "karras"),
    "LMS Karras": ("LMS", "karras"),
    "DPM2 Karras": ("DPM2", "karras"),
    "DPM2 a Karras": ("DPM2 a", "karras"),
    "Euler a SGM Uniform": ("Euler a", "sgm_uniform"),
    "Euler Align Your Steps": ("Euler", "align_your_steps"),
    "k_lms_ka": ("LMS", "karras"),
    "k_dpm_2_ka": ("DPM2", "karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "karras"),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "karras"),
    # case and spacing
    "euler A": ("Euler a", "uniform"),
    "dpm++  2m   karras": ("DPM++ 2M", "karras"),
}


@pytest.mark.parametrize("name", list(A1111_NAMES))
def test_every_a1111_name_and_alias_resolves(name):
    spec, key = R.resolve_sampler(name)
    assert (spec.name, key) == A1111_NAMES[name]
    assert key in R.SCHEDULES


def test_explicit_schedule_and_every_schedule_label_resolve():
    for spec in R.SCHEDULES.values():
        for label in (spec.label, spec.key, spec.label.upper(), *spec.aliases):
            _, key = R.resolve_sampler("Euler", label)
            assert key == ("uniform" if spec.key == "automatic" else spec.key)
    assert R.resolve_sampler("DPM++ 2M", "Exponential")[1] == "exponential"
    assert R.resolve_sampler("DPM++ 2M Karras", "Exponential")[1] == "karras"  # a suffix in the name wins


def test_all_labels_and_aliases_are_unambiguous():
    seen = {}
    for spec in R.SAMPLERS.values():
        for n in (spec.name, *spec.aliases):
            key = R._norm(n)
            assert seen.setdefault(key, spec.name) == spec.name


@pytest.mark.parametrize("bad", ["Euler b", "DPM fast", "", "k_euler_b"])
def test_unknown_sampler_raises_listing_valid_names(bad):
    with pytest.raises(InvalidInputError) as err:
        R.resolve_sampler(bad)
    message = str(err.value)
    assert "Euler a" in message and "k_dpmpp_2m" in message and "DPM++ 3M SDE" in message


def test_unknown_schedule_raises_listing_valid_names():
    with pytest.raises(InvalidInputError) as err:
        R.resolve_sampler("Euler", "Karras-ish")
    assert (
        "Karras" in str(err.value)
        and "SGM Uniform" in str(err.value)
        and "Align Your Steps" in str(err.value)
    )


def test_sigmas_for_applies_discard_next_to_last_sigma():
    schedule = K.DiscreteSchedule.sd()
    dpm2 = R.sigmas_for("DPM2", "karras", 10, schedule)
    plain = K.get_sigmas_karras(11, schedule.sigma_min, schedule.sigma_max)
    assert len(dpm2) == 11 and torch.equal(dpm2, torch.cat([plain[:-2], plain[-1:]]))
    euler = R.sigmas_for("Euler", "Automatic", 10, schedule)
    assert torch.equal(euler, K.get_sigmas_uniform(10, schedule))
    assert len(R.sigmas_for("DPM++ 3M SDE", "Automatic", 7, schedule)) == 8


@pytest.mark.parametrize("name", R.sampler_names())
def test_sample_runs_every_sampler_and_calls_back_once_per_step(name):
    spec, key = R.resolve_sampler(name)
    sigmas = R.sigmas_for(spec, key, 6, K.DiscreteSchedule.sd())
    infos = []
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    out = R.sample(
        gaussian_denoiser,
        x,
        sigmas,
        sampler=spec,
        generator=torch.Generator().manual_seed(1),
        callback=infos.append,
        disable=True,
    )
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert [info.i for info in infos] == list(range(len(sigmas) - 1))
    assert all(info.total == len(sigmas) - 1 for info in infos)
    assert [info.sigma for info in infos] == pytest.approx(sigmas[:-1].tolist())
    assert all(info.denoised.shape == x.shape for info in infos)


@pytest.mark.parametrize("how", ["raise", "return"])
def test_callback_can_interrupt_sampling(how):
    sigmas = K.get_sigmas_karras(10, 0.03, 14.6)
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(0)) * 14.6

    def stop_at_3(info):
        if info.i == 3:
            if how == "raise":
                raise S.SamplingInterrupted()
            return S.SamplingInterrupted

    with pytest.raises(S.SamplingInterrupted) as err:
        S.sample_dpmpp_2m(gaussian_denoiser, x, sigmas, callback=stop_at_3)
    assert err.value.step == 3
    assert torch.allclose(
        err.value.denoised, gaussian_denoiser(err.value.x, torch.tensor([float(sigmas[3])]))
    )


def test_cli_lists_samplers_aliases_and_schedules(capsys):
    import argparse
    import json

    from kuas.cli import samplers as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["samplers"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for name in R.sampler_names():
        assert f"  {name} " in text
    assert "k_euler_a, k_euler_ancestral; Uniform" in text and "k_dpmpp_2m; Karras" in text
    assert "SGM Uniform" in text and "sgm_uniform, SGMUniform" in text
    args = parser.parse_args(["samplers", "--json"])
    args.func(args)
    data = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in data["samplers"]] == R.sampler_names()
    assert [s["label"] for s in data["schedules"]] == R.schedule_labels()

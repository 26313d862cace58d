"""Noise schedules: the SD discrete schedule and every A1111 schedule type, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from kuas.errors import InvalidInputError
from kuas.sampling import registry as R
from kuas.sampling import schedules as K


@pytest.fixture(scope="module")
def sd():
    return K.DiscreteSchedule.sd()


def test_sd_schedule_constants(sd):
    assert sd.num_timesteps == 1000
    assert sd.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert sd.sigma_min == pytest.approx(0.0292, abs=1e-4)
    betas = K.scaled_linear_betas()
    assert float(betas[0]) == pytest.approx(0.00085) and float(betas[-1]) == pytest.approx(0.012)
    # the first alpha_cumprod is 1 - beta_0
    assert float(sd.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, abs=1e-7)


def test_sd_alphas_cumprod_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).alphas_cumprod
    assert torch.allclose(K.sd_alphas_cumprod().float(), ref, rtol=1e-5, atol=1e-7)


def test_zero_terminal_snr_rescale_matches_diffusers_and_a1111():
    """Lin et al.'s Algorithm 1: the first alpha_cumprod kept, the last one (almost) 0, as diffusers
    computes it; A1111 and ComfyUI keep the last at 4.897e-8 so that sigma_max is finite (about 4518.76)."""
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref_rescale

    ref = torch.cumprod(1 - ref_rescale(K.scaled_linear_betas().float()), dim=0)
    ours = K.rescale_zero_terminal_snr(K.sd_alphas_cumprod())
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert torch.allclose(ours[:-1].float(), ref[:-1], rtol=1e-4, atol=1e-7)
    assert float(ref[-1]) == 0.0 and float(ours[-1]) == K.ZTSNR_LAST_ALPHA_CUMPROD
    assert float(ours[0]) == pytest.approx(float(K.sd_alphas_cumprod()[0]), rel=1e-12)
    assert bool((ours[1:] < ours[:-1]).all())  # still a noising schedule
    exact = K.rescale_zero_terminal_snr(K.sd_alphas_cumprod(), last=0.0)
    assert float(exact[-1]) == 0.0 and torch.equal(exact[:-1], ours[:-1])
    zt = K.DiscreteSchedule.sd(zero_terminal_snr=True)
    assert zt.sigma_max == pytest.approx(4518.76, abs=0.05)
    assert zt.sigma_min == pytest.approx(K.DiscreteSchedule.sd().sigma_min, rel=1e-3)
    # every sampler's sigma list starts from the rescaled schedule's end
    sigmas = R.sigmas_for("Euler", "automatic", 20, zt)
    assert float(sigmas[0]) == pytest.approx(zt.sigma_max, rel=1e-5) and float(sigmas[-1]) == 0.0


def test_sigma_to_t_inverts_t_to_sigma(sd):
    t = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 999
    assert torch.allclose(sd.sigma_to_t(sd.t_to_sigma(t)), t, atol=2e-3)
    integer = torch.arange(0, 1000, 37).float()
    assert torch.allclose(sd.t_to_sigma(integer), sd.sigmas[integer.long()], rtol=1e-6)
    # between two training sigmas t is interpolated in log-sigma
    mid = (sd.sigmas[10] * sd.sigmas[11]).sqrt()
    assert float(sd.sigma_to_t(mid)) == pytest.approx(10.5, abs=1e-3)
    # outside the trained range it clamps
    assert float(sd.sigma_to_t(torch.tensor(1e-4))) == 0.0
    assert float(sd.sigma_to_t(torch.tensor(100.0))) == 999.0


def _check_shape(sigmas, n):
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
    assert float(sigmas[-1]) == 0.0
    assert (sigmas[1:] <= sigmas[:-1]).all()


def test_karras_closed_form(sd):
    sigmas = K.get_sigmas_karras(9, sd.sigma_min, sd.sigma_max)
    _check_shape(sigmas, 9)
    assert float(sigmas[0]) == pytest.approx(sd.sigma_max, rel=1e-5)
    assert float(sigmas[-2]) == pytest.approx(sd.sigma_min, rel=1e-5)
    middle = ((sd.sigma_max ** (1 / 7) + sd.sigma_min ** (1 / 7)) / 2) ** 7
    assert float(sigmas[4]) == pytest.approx(middle, rel=1e-5)
    assert (sigmas[1:-1] < sigmas[:-2]).all()


def test_exponential_and_polyexponential(sd):
    sigmas = K.get_sigmas_exponential(5, 0.1, 10.0)
    _check_shape(sigmas, 5)
    assert sigmas[:-1].log().tolist() == pytest.approx(
        [math.log(10) - i * math.log(100) / 4 for i in range(5)], abs=1e-5
    )
    assert torch.allclose(K.get_sigmas_polyexponential(5, 0.1, 10.0, rho=1.0), sigmas)
    quad = K.get_sigmas_polyexponential(5, 0.1, 10.0, rho=2.0)
    assert float(quad[2]) == pytest.approx(math.exp(0.25 * math.log(100) + math.log(0.1)), rel=1e-5)


def test_karras_and_exponential_match_diffusers(sd):
    diffusers = pytest.importorskip("diffusers")
    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    for option, ours in (
        ("use_karras_sigmas", K.get_sigmas_karras),
        ("use_exponential_sigmas", K.get_sigmas_exponential),
    ):
        sched = diffusers.EulerDiscreteScheduler(**cfg, **{option: True})
        sched.set_timesteps(12)
        assert torch.allclose(ours(12, sd.sigma_min, sd.sigma_max), sched.sigmas, rtol=1e-5)


def test_uniform_normal_sgm_uniform_simple_ddim_hand_values(sd):
    s = sd.sigmas
    uniform = K.get_sigmas_uniform(4, sd)
    _check_shape(uniform, 4)
    assert torch.allclose(uniform[:-1], sd.t_to_sigma(torch.tensor([999.0, 666.0, 333.0, 0.0])))
    assert torch.allclose(K.get_sigmas_normal(4, sd), uniform)
    # Normal with a narrower range: t(sigma_max) .. t(sigma_min) inclusive
    narrow = K.get_sigmas_normal(3, sd, sigma_min=float(s[100]), sigma_max=float(s[900]))
    assert torch.allclose(narrow[:-1], s[[900, 500, 100]], rtol=1e-4)

    sgm = K.get_sigmas_sgm_uniform(4, sd)
    _check_shape(sgm, 4)
    assert torch.allclose(sgm[:-1], sd.t_to_sigma(torch.tensor([999.0, 749.25, 499.5, 249.75])))

    simple = K.get_sigmas_simple(4, sd)
    _check_shape(simple, 4)
    assert torch.equal(simple[:-1], s[[999, 749, 499, 249]])

    ddim = K.get_sigmas_ddim(4, sd)
    _check_shape(ddim, 4)
    assert torch.equal(ddim[:-1], s[[751, 501, 251, 1]])
    # 1000 // 30 = 33 does not divide 1000: A1111 then takes 31 timesteps (1, 34, ... 991)
    assert len(K.get_sigmas_ddim(30, sd)) == 32


def test_kl_optimal_align_your_steps_beta_lcm(sd):
    kl = K.get_sigmas_kl_optimal(5, 0.1, 10.0)
    _check_shape(kl, 5)
    assert kl[:-1].atan().tolist() == pytest.approx(
        [math.atan(10) + i / 4 * (math.atan(0.1) - math.atan(10)) for i in range(5)], abs=1e-6
    )

    ays = K.get_sigmas_align_your_steps(11)
    assert ays[:-1].tolist() == pytest.approx(list(K.ALIGN_YOUR_STEPS_SD1), abs=1e-6)
    ays_xl = K.get_sigmas_align_your_steps(6, sdxl=True)
    _check_shape(ays_xl, 6)
    logs = [math.log(v) for v in K.ALIGN_YOUR_STEPS_SDXL]
    assert math.log(float(ays_xl[1])) == pytest.approx(logs[2], abs=1e-6)  # position 2.0 of 0..10 in 6 points
    five = K.get_sigmas_align_your_steps(5, sdxl=True)  # positions 0, 2.5, 5, 7.5, 10: log-linear in between
    assert math.log(float(five[1])) == pytest.approx((logs[2] + logs[3]) / 2, abs=1e-6)

    beta = K.get_sigmas_beta(5, 0.1, 10.0, alpha=1.0, beta=1.0)  # Beta(1, 1) is uniform: linear in sigma
    assert beta[:-1].tolist() == pytest.approx([10.0, 7.525, 5.05, 2.575, 0.1], abs=1e-5)
    _check_shape(K.get_sigmas_beta(7, sd.sigma_min, sd.sigma_max), 7)

    lcm = K.get_sigmas_lcm(4, sd)
    _check_shape(lcm, 4)
    t = sd.sigma_to_t(lcm[:-1]).round()
    assert t.tolist() == [
        999.0,
        679.0,
        339.0,
        19.0,
    ]  # A1111: linspace(999, 19, 4) snapped to the 20k + 19 grid


def test_beta_ppf_closed_forms():
    for q in (0.1, 0.37, 0.5, 0.93):
        assert K.beta_ppf(q, 1.0, 1.0) == pytest.approx(q, abs=1e-10)
        # Beta(1/2, 1/2) is the arcsine distribution: F(x) = 2/pi asin(sqrt(x))
        assert K.beta_ppf(q, 0.5, 0.5) == pytest.approx(math.sin(math.pi * q / 2) ** 2, abs=1e-9)
        # Beta(a, 1): F(x) = x^a
        assert K.beta_ppf(q, 3.0, 1.0) == pytest.approx(q ** (1 / 3), abs=1e-9)


@pytest.mark.parametrize("key", [k for k in R.SCHEDULES if k != "automatic"])
@pytest.mark.parametrize("steps", [1, 2, 20])
def test_every_schedule_type_gives_n_plus_one_decreasing_sigmas(sd, key, steps):
    sigmas = R.sigmas_for("Euler", key, steps, sd)
    _check_shape(sigmas, steps)
    assert float(sigmas[0]) <= sd.sigma_max * 1.001


def test_discard_next_to_last_sigma():
    sigmas = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.0])
    assert K.discard_next_to_last_sigma(sigmas).tolist() == [5.0, 2.0, 1.0, 0.0]


def test_bad_arguments_raise(sd):
    with pytest.raises(InvalidInputError, match="steps"):
        K.get_sigmas_karras(0, 0.1, 10.0)
    with pytest.raises(InvalidInputError, match="sigma_min < sigma_max"):
        K.get_sigmas_exponential(5, 10.0, 0.1)
    with pytest.raises(InvalidInputError, match="alphas_cumprod"):
        K.DiscreteSchedule(torch.ones(2, 2))

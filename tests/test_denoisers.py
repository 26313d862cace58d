"""Denoisers (eps / v / LCM boundary) and classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

from kuas.errors import InvalidInputError
from kuas.sampling.denoisers import EpsDenoiser, LCMDenoiser, VDenoiser
from kuas.sampling.guidance import CFGDenoiser, rescale_guidance
from kuas.sampling.schedules import DiscreteSchedule


@pytest.fixture(scope="module")
def sd():
    return DiscreteSchedule.sd()


def _truth(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, 5, 5, generator=g)
    eps = torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([14.0, 1.3, 0.05])
    return x0, eps, sigma


def test_eps_and_v_denoisers_recover_x0_from_the_true_targets(sd):
    x0, eps, sigma = _truth()
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * eps  # variance-exploding noisy latent
    alpha, sigma_vp = (1 + s**2) ** -0.5, s * (1 + s**2) ** -0.5
    seen = {}

    def eps_model(x_in, t, **cond):
        seen["eps"] = (x_in, t, cond)
        return eps

    def v_model(x_in, t, **cond):
        return alpha * eps - sigma_vp * x0  # v of the variance-preserving latent alpha x0 + sigma_vp eps

    from_eps = EpsDenoiser(eps_model, sd)(x, sigma, context="ctx")
    from_v = VDenoiser(v_model, sd)(x, sigma)
    assert torch.allclose(from_eps, x0, atol=1e-5)
    assert torch.allclose(from_v, x0, atol=1e-5)
    assert torch.allclose(from_eps, from_v, atol=1e-5)
    x_in, t, cond = seen["eps"]
    assert torch.allclose(x_in, x * alpha)  # the model sees the variance-preserving latent
    assert torch.allclose(t, sd.sigma_to_t(sigma))
    assert cond == {"context": "ctx"}


def test_denoiser_accepts_a_float_sigma_and_keeps_x_dtype(sd):
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    out = EpsDenoiser(lambda x_in, t, **c: torch.zeros_like(x_in, dtype=torch.float16), sd)(x, 2.0)
    assert out.dtype == torch.float64 and torch.equal(out, x)


def test_v_denoiser_matches_diffusers_pred_original_sample(sd):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    sched.set_timesteps(5)
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * float(sched.sigmas[1])
    out = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    t = sched.timesteps[1]
    ref = sched.step(out, t, x).pred_original_sample
    ours = VDenoiser(lambda x_in, tt, **c: out, DiscreteSchedule(sched.alphas_cumprod))(x, sched.sigmas[1])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_lcm_boundary_condition_matches_diffusers(sd):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(4)
    x0, eps, _ = _truth(3)
    for t in (19, 259, 999):
        sigma = float(sd.sigmas[t])
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        x = x0 + sigma * eps
        got = LCMDenoiser(EpsDenoiser(lambda x_in, tt, **c: eps, sd))(x, sigma)
        x_vp = x / (1 + sigma**2) ** 0.5
        assert torch.allclose(got, c_skip * x_vp + c_out * x0, atol=1e-5)
    # at t = 19 the boundary condition is still (nearly) the identity: c_skip ~ 7e-6
    assert sched.get_scalings_for_boundary_condition_discrete(19)[0] < 1e-5


class _Recorder:
    """An inner denoiser returning a cond-dependent x0, recording every call's batch size."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, context=None, y=None):
        self.batches.append(x.shape[0])
        return (
            x * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + (0 if y is None else y.view(-1, 1, 1, 1))
        )


def _conds(seed=0, tokens=(7, 7)):
    g = torch.Generator().manual_seed(seed)
    cond = {"context": torch.randn(2, tokens[0], 8, generator=g), "y": torch.randn(2, generator=g)}
    uncond = {"context": torch.randn(2, tokens[1], 8, generator=g), "y": torch.randn(2, generator=g)}
    return cond, uncond


def test_cfg_equals_two_separate_passes_in_one_batch():
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    cond, uncond = _conds()
    inner = _Recorder()
    guided = CFGDenoiser(inner, cond, uncond, scale=7.5)(x, torch.tensor([3.0, 3.0]))
    assert inner.batches == [4]
    c = _Recorder()(x, None, **cond)
    u = _Recorder()(x, None, **uncond)
    assert torch.allclose(guided, u + 7.5 * (c - u), atol=1e-6)


def test_cfg_with_different_prompt_lengths_runs_two_passes():
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    cond, uncond = _conds(tokens=(14, 7))
    inner = _Recorder()
    guided = CFGDenoiser(inner, cond, uncond, scale=3.0)(x, 1.0)
    assert inner.batches == [2, 2]
    c, u = _Recorder()(x, None, **cond), _Recorder()(x, None, **uncond)
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-6)


def test_cfg_scale_one_does_one_conditional_pass():
    x = torch.randn(2, 4, 3, 3)
    cond, _ = _conds()
    inner = _Recorder()
    out = CFGDenoiser(inner, cond, None, scale=1.0)(x, 1.0)
    assert inner.batches == [2]
    assert torch.allclose(out, _Recorder()(x, None, **cond))


def test_guidance_rescale():
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    cond, uncond = _conds(1)
    plain = CFGDenoiser(_Recorder(), cond, uncond, scale=9.0)(x, 1.0)
    assert torch.equal(CFGDenoiser(_Recorder(), cond, uncond, scale=9.0, rescale=0.0)(x, 1.0), plain)
    full = CFGDenoiser(_Recorder(), cond, uncond, scale=9.0, rescale=1.0)(x, 1.0)
    c = _Recorder()(x, None, **cond)
    # rescale 1: each sample's std equals the conditional prediction's
    assert torch.allclose(full.flatten(1).std(1), c.flatten(1).std(1), rtol=1e-5)
    half = CFGDenoiser(_Recorder(), cond, uncond, scale=9.0, rescale=0.5)(x, 1.0)
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, atol=1e-6)


def test_rescale_matches_diffusers_formula():
    diffusers_pipe = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    g = torch.Generator().manual_seed(9)
    guided, cond = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    ref = diffusers_pipe.rescale_noise_cfg(guided, cond, guidance_rescale=0.7)
    assert torch.allclose(rescale_guidance(guided, cond, 0.7), ref, atol=1e-6)


def test_cfg_rejects_bad_arguments():
    cond, uncond = _conds()
    with pytest.raises(InvalidInputError, match="unconditional"):
        CFGDenoiser(_Recorder(), cond, None, scale=7.0)
    with pytest.raises(InvalidInputError, match="same keys"):
        CFGDenoiser(_Recorder(), cond, {"context": uncond["context"]}, scale=7.0)
    with pytest.raises(InvalidInputError, match="rescale"):
        CFGDenoiser(_Recorder(), cond, uncond, scale=7.0, rescale=1.5)

"""Token merging and step caching: exact attach/detach, the merge arithmetic, the cache wiring, and their
quality cost on a tiny U-Net (error small, growing with the ratio / interval)."""

from __future__ import annotations

import math

import pytest
import torch

import kuas
from kuas.errors import InvalidInputError
from kuas.speedups import step_caching, token_merging
from kuas.speedups.tome import MergePlan, TokenMerging, bipartite_merge_plan

UNET = {"model_channels": 32, "channel_mult": (1, 2), "attention_resolutions": (1, 2), "num_res_blocks": 1,
        "transformer_depth": 1, "num_heads": -1, "num_head_channels": 8}
TE = {"width": 64, "layers": 2, "heads": 2, "mlp_width": 128}


@pytest.fixture(scope="module")
def unet():
    sd = kuas.create("sd1", unet=UNET, vae={"ch": 32, "num_res_blocks": 1}, text_encoder=TE)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial weights (kuas zero-initialises the residual outputs)
        for p in sd.unet.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return sd.unet


@pytest.fixture(scope="module")
def inputs():
    """Smooth latents (neighbouring tokens alike, as in real images) and a random text context."""
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randn(2, 4, 4, 4, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=True)
    return x, torch.tensor([400.0, 400.0]), torch.randn(2, 77, 64, generator=gen)


def _run(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, context=ctx)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    span = float(b.max() - b.min())
    return 10 * math.log10(span**2 / float(((a - b) ** 2).mean()))


# -- token merging -----------------------------------------------------------------------------------------
def test_merge_plan_means_and_copies_back():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 64, 8, generator=gen)
    plan = bipartite_merge_plan(metric, (8, 8), 24, generator=gen)
    assert plan.size == 64 - 24 and plan.index.shape == (2, 64)
    # every slot is used, and each token maps to exactly one slot
    for row in plan.index:
        assert set(row.tolist()) == set(range(plan.size))
    x = torch.randn(2, 64, 5, generator=gen)
    merged = plan.merge(x)
    for b in range(2):
        for slot in range(plan.size):
            members = (plan.index[b] == slot).nonzero().squeeze(1)
            assert torch.allclose(merged[b, slot], x[b, members].mean(0), atol=1e-6)
    back = plan.unmerge(merged)
    assert torch.equal(back, merged.gather(1, plan.index[..., None].expand(-1, -1, 5)))
    # tokens that were not merged come back unchanged
    alone = torch.bincount(plan.index[0], minlength=plan.size) == 1
    keep = alone[plan.index[0]]
    assert torch.equal(back[0, keep], x[0, keep])


def test_merge_plan_keeps_one_destination_per_cell_and_merges_the_most_similar():
    # tokens equal within each 2x2 cell, plus one outlier: merging 11 of the 12 sources leaves it alone
    h = w = 4
    metric = torch.zeros(1, 16, 3)
    for i in range(16):
        y, x = divmod(i, w)
        metric[0, i] = torch.tensor([1.0 + (y // 2), 1.0 + (x // 2), 0.5])
    metric[0, 5] = torch.tensor([-1.0, 0.0, 2.0])  # unlike everything
    plan = bipartite_merge_plan(metric, (h, w), 11)  # no generator: top-left of each cell is the destination
    destinations = {0, 2, 8, 10}
    assert {int(plan.index[0, d]) for d in destinations} == set(range(plan.size - 4, plan.size))
    assert int((plan.index[0] == plan.index[0, 5]).sum()) == 1  # the outlier is not merged


def test_random_destinations_come_from_their_own_seeded_generator():
    metric = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(3))
    state = torch.random.get_rng_state()
    a = TokenMerging(0.5, seed=7).plan(metric, (8, 8))
    b = TokenMerging(0.5, seed=7).plan(metric, (8, 8))
    c = TokenMerging(0.5, seed=8).plan(metric, (8, 8))
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    # an odd batch (cond and uncond not together) uses the fixed top-left destinations
    odd = TokenMerging(0.5, seed=7).plan(metric[:1], (8, 8))
    assert torch.equal(odd.index, bipartite_merge_plan(metric[:1], (8, 8), 32).index)


def test_token_merging_attaches_to_full_resolution_blocks_and_restores_exactly(unet, inputs):
    x, t, ctx = inputs
    ref = _run(unet, x, t, ctx)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    blocks = [m for m in unet.modules() if hasattr(m, "token_merge")]
    with token_merging(unet, 0.5) as merger:
        attached = [b for b in blocks if b.token_merge is merger]
        merged = _run(unet, x, t, ctx)
    levels = sorted({st.level for st in unet.modules() if hasattr(st, "level") and st.transformer_blocks[0]
                     in attached})
    assert levels == [0] and 0 < len(attached) < len(blocks)
    assert not torch.equal(merged, ref)
    assert all(b.token_merge is None for b in blocks)
    assert torch.equal(_run(unet, x, t, ctx), ref)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), token_merging(unet, 0.5):  # restored on error too
        raise RuntimeError("boom")
    assert all(b.token_merge is None for b in blocks)
    with token_merging(unet, 0.0) as none:
        assert none is None and torch.equal(_run(unet, x, t, ctx), ref)


def test_token_merging_quality_falls_with_the_ratio(unet, inputs):
    x, t, ctx = inputs
    ref = _run(unet, x, t, ctx)
    scores = []
    for ratio in (0.25, 0.5, 0.7):
        with token_merging(unet, ratio, random=False):
            scores.append(_psnr(_run(unet, x, t, ctx), ref))
    assert scores[0] > scores[1] > scores[2] > 30, scores  # close to exact on smooth input, monotone
    with token_merging(unet, 0.5, max_downsample=2, random=False):  # merging deeper levels too costs more
        assert _psnr(_run(unet, x, t, ctx), ref) < scores[1]


def test_token_merging_rejects_bad_settings(unet):
    with pytest.raises(InvalidInputError, match="ratio"), token_merging(unet, 0.8):
        pass
    with pytest.raises(InvalidInputError, match="max_downsample"), token_merging(unet, 0.5, max_downsample=3):
        pass


# -- step caching ------------------------------------------------------------------------------------------
def test_cached_calls_reuse_the_deep_feature_exactly(unet, inputs):
    x, t, ctx = inputs
    ref = _run(unet, x, t, ctx)
    for branch in (0, 1, 2):
        with step_caching(unet, 3, branch=branch) as cache:
            outs = [_run(unet, x, t, ctx) for _ in range(5)]
        # same input every call: a cached call must rebuild exactly what the full call computed
        assert all(torch.allclose(o, ref, atol=1e-6) for o in outs)
        assert (cache.full_calls, cache.cached_calls) == (2, 3)  # calls 0 and 3 run in full
    assert unet.step_cache is None
    assert torch.equal(_run(unet, x, t, ctx), ref)


def test_step_caching_counts_each_input_shape_separately(unet, inputs):
    x, t, ctx = inputs
    with step_caching(unet, 2) as cache:
        _run(unet, x, t, ctx)
        _run(unet, x[:1], t[:1], ctx[:1])  # another shape: its own first (full) call
        _run(unet, x, t, ctx)
    assert (cache.full_calls, cache.cached_calls) == (2, 1)


def test_step_caching_quality_over_a_denoising_run(unet, inputs):
    """A short Euler run: reusing deep features costs a little, more with a longer interval, less with a
    deeper branch."""
    x, _, ctx = inputs
    sigmas = torch.linspace(1.0, 0.1, 7)

    def run(interval: int, branch: int = 0) -> torch.Tensor:
        z = x.clone()
        with step_caching(unet, interval, branch=branch):
            for i in range(len(sigmas) - 1):
                t = torch.full((2,), 999.0 * float(sigmas[i]))
                eps = _run(unet, z, t, ctx)
                z = z + (sigmas[i + 1] - sigmas[i]) * eps
        return z

    exact = run(1)
    two, three = _psnr(run(2), exact), _psnr(run(3), exact)
    assert math.isfinite(two) and two > three > 25, (two, three)
    assert _psnr(run(3, branch=2), exact) > three


def test_step_caching_rejects_bad_settings(unet):
    with pytest.raises(InvalidInputError, match="interval"), step_caching(unet, 0):
        pass
    with pytest.raises(InvalidInputError, match="branch"), step_caching(unet, 2, branch=len(unet.input_blocks)):
        pass


def test_merge_plan_is_a_plain_dataclass():
    plan = MergePlan(torch.tensor([[0, 0, 1]]), 2)
    x = torch.tensor([[[1.0], [3.0], [5.0]]])
    assert torch.equal(plan.merge(x), torch.tensor([[[2.0], [5.0]]]))
    assert torch.equal(plan.unmerge(plan.merge(x)), torch.tensor([[[2.0], [2.0], [5.0]]]))


def test_token_merging_starts_at_the_highest_level_with_attention():
    """kuas' built-in model has no attention at full latent resolution: merging goes one level down."""
    sd = kuas.create("sd1", unet={**UNET, "channel_mult": (1, 2, 2), "attention_resolutions": (2, 4)},
                     vae={"ch": 32, "num_res_blocks": 1}, text_encoder=TE)
    transformers = [m for m in sd.unet.modules() if hasattr(m, "transformer_blocks")]
    with token_merging(sd, 0.5) as merger:
        levels = {st.level for st in transformers if st.transformer_blocks[0].token_merge is merger}
    assert levels == {1}
    with token_merging(sd, 0.5, max_downsample=2) as merger:
        levels = {st.level for st in transformers if st.transformer_blocks[0].token_merge is merger}
    assert levels == {1, 2}

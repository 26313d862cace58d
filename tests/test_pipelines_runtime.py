"""The pipelines under a runtime policy: opt-in speedups per call (attached for sampling, detached after,
recorded in the infotext), the float32 retry of an overflowing U-Net, channels_last and lowvram giving
the same images."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import randomize

import kuas
from kuas.errors import InvalidInputError

TE = {"width": 64, "layers": 2, "heads": 2, "mlp_width": 128}
TINY = {
    "unet": {"model_channels": 32, "channel_mult": (1, 2), "attention_resolutions": (1, 2), "num_res_blocks": 1,
             "transformer_depth": 1, "num_heads": -1, "num_head_channels": 8},
    "vae": {"ch": 32, "num_res_blocks": 1},
    "text_encoder": TE,
}
FAST = {"width": 64, "height": 64, "steps": 4, "watermark": False, "seed": 3}




@pytest.fixture(scope="module")
def sd():
    return randomize(kuas.create("sd1", **TINY))


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _psnr(a, b) -> float:
    mse = float(((_pixels(a) - _pixels(b)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _attached(sd) -> bool:
    return sd.unet.step_cache is not None or any(
        getattr(m, "token_merge", None) is not None for m in sd.unet.modules())


def test_speedups_apply_per_call_and_detach(sd):
    exact = sd.txt2img("a red circle", **FAST)[0]
    seen = []

    def spy(step, total, x0):
        seen.append(_attached(sd))

    fast = sd.txt2img("a red circle", tome_ratio=0.5, deepcache_interval=2, callback=spy, **FAST)[0]
    assert seen == [True] * FAST["steps"]  # attached while sampling
    assert not _attached(sd)  # detached after
    assert _pixels(fast).tolist() != _pixels(exact).tolist()
    assert 15 < _psnr(fast, exact) < math.inf  # close to the exact image, not equal
    text = fast.info["parameters"]
    assert "Token merging ratio: 0.5" in text and "DeepCache interval: 2" in text
    assert "Token merging" not in exact.info["parameters"]
    again = sd.txt2img("a red circle", **FAST)[0]
    assert _pixels(again).tolist() == _pixels(exact).tolist()  # nothing left behind


def test_step_caching_starts_fresh_for_every_image(sd):
    one = sd.txt2img("a red circle", deepcache_interval=3, **FAST)[0]
    two = sd.txt2img("a red circle", deepcache_interval=3, **FAST)[0]
    assert _pixels(one).tolist() == _pixels(two).tolist()
    batch = sd.txt2img("a red circle", deepcache_interval=3, batch_count=2, **{**FAST, "seed": 3})
    assert _pixels(batch[0]).tolist() == _pixels(one).tolist()


@pytest.mark.parametrize("kwargs, name", [({"tome_ratio": 0.8}, "tome_ratio"), ({"tome_ratio": -0.1}, "tome_ratio"),
                                          ({"deepcache_interval": 0}, "deepcache_interval"),
                                          ({"deepcache_interval": 2.5}, "deepcache_interval")])
def test_bad_speedup_values_fail_before_work(sd, kwargs, name):
    calls = []
    handle = sd.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(InvalidInputError, match=name):
            sd.txt2img("x", **kwargs, **FAST)
    finally:
        handle.remove()
    assert calls == []


def test_low_precision_unet_overflow_is_sampled_again_in_float32(sd, caplog):
    reference = sd.txt2img("a blue square", **FAST)[0]  # the float32 U-Net
    sd.unet.to(torch.bfloat16)

    def overflow_below_float32(module, args, output):
        return output if module.dtype == torch.float32 else output * float("inf")

    handle = sd.unet.register_forward_hook(overflow_below_float32)
    steps = []
    try:
        image = sd.txt2img("a blue square", callback=lambda s, t, x: steps.append(s), **FAST)[0]
    finally:
        handle.remove()
        dtype_after = sd.unet.dtype
        sd.unet.to(torch.float32)
    assert dtype_after == torch.bfloat16  # restored after the retry
    assert steps == list(range(1, FAST["steps"] + 1))  # progress counted once
    assert "float32" in caplog.text
    # bf16 -> fp32 is exact, so the retry computed what a float32 U-Net with those weights computes
    with torch.no_grad():
        sd.unet.to(torch.bfloat16).to(torch.float32)
    rounded = sd.txt2img("a blue square", **FAST)[0]
    randomize(sd)  # restore the module-scoped fixture's exact weights
    assert _pixels(image).tolist() == _pixels(rounded).tolist()
    assert _psnr(image, reference) > 20


def test_channels_last_runtime_gives_the_same_image(sd):
    plain = sd.txt2img("a green star", **FAST)[0]
    before = sd.runtime
    sd.runtime = dataclasses.replace(before, channels_last=True)
    try:
        assert sd.unet.input_memory_format == torch.channels_last
        nhwc = sd.txt2img("a green star", **FAST)[0]
    finally:
        sd.runtime = before
    assert sd.unet.input_memory_format == torch.contiguous_format
    assert np.abs(_pixels(nhwc) - _pixels(plain)).max() <= 2  # same maths, another summation order


def test_lowvram_gives_the_same_image_with_one_network_resident(sd, tmp_path):
    path = sd.save(tmp_path / "tiny.safetensors")
    normal = kuas.load(path, dtype=torch.float32)
    low = kuas.load(path, dtype=torch.float32, lowvram=True)
    a = normal.txt2img("a large red circle", **FAST)[0]
    b = low.txt2img("a large red circle", **FAST)[0]
    assert _pixels(a).tolist() == _pixels(b).tolist()
    resident = {n: not next(m.parameters()).is_meta for n, m in low.modules().items()}
    assert resident == {"unet": False, "vae": True, "text_encoder": False}  # the VAE decoded last


def test_vae_tiling_engages_above_the_runtimes_threshold(sd):
    from types import SimpleNamespace

    from kuas.pipelines.common import decode_latents
    from kuas.runtime import RuntimePolicy

    calls = []
    handle = sd.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape[-2:])))
    z = torch.randn(1, 4, 80, 80, generator=torch.Generator().manual_seed(0))  # 640x640 pixels
    try:
        with torch.no_grad():
            for pixels, tiles in ((1024 * 1024, 1), (512 * 512, 4)):  # above 512^2: 64-latent tiles
                calls.clear()
                model = SimpleNamespace(vae=sd.vae, vae_scale=sd.vae_scale,
                                        runtime=RuntimePolicy(vae_tile_pixels=pixels))
                decode_latents(model, z)
                assert len(calls) == tiles, (pixels, calls)
    finally:
        handle.remove()

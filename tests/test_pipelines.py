"""Pipelines: seeds and batches, variation seeds, inpainting / outpainting keep what they must, img2img
strength 0, input validation before any work, every sampler, callbacks and cancellation, hires fix,
seamless and VAE tiling, NaN handling, infotext round trip, other families."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import randomize
from PIL import Image

import kuas
from kuas.errors import InvalidInputError, KuasError
from kuas.images.infotext import infotext_to_request, parse_infotext
from kuas.pipelines import common
from kuas.pipelines.common import (
    ImageNoise,
    decode_latents,
    default_size,
    image_seeds,
    seamless_tiling,
    slerp,
)
from kuas.pipelines.inpaint import blur_mask, crop_region, expand_region
from kuas.pipelines.outpaint import padded_extents
from kuas.pipelines.types import MAX_PIXELS, MAX_SIDE, Txt2ImgRequest
from kuas.sampling.registry import sampler_names
from kuas.sampling.samplers import SamplingInterrupted

TE = {"width": 64, "layers": 2, "heads": 2, "mlp_width": 128}
# Two U-Net levels (attention on the second), one res block per level: every pipeline path, little CPU.
# (tests/test_pipeline_parity.py uses the full SD1 layout.)
TINY = {
    "unet": {
        "model_channels": 32,
        "channel_mult": (1, 2),
        "attention_resolutions": (2,),
        "num_res_blocks": 1,
        "transformer_depth": (0, 1),
        "num_heads": -1,
        "num_head_channels": 8,
    },
    "vae": {"ch": 32, "num_res_blocks": 1},
    "text_encoder": TE,
}
S = 64  # image side in the tests
FAST = {"width": S, "height": S, "steps": 3, "watermark": False}




@pytest.fixture(scope="module")
def sd():
    return randomize(kuas.create("sd1", **TINY))


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    y, x = np.mgrid[0:S, 0:S] / S
    rgb = np.stack([x, y, 0.5 + 0.3 * np.sin(6 * x)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


class CallCounter:
    """Counts forward calls of the model's networks (forward pre-hooks), to prove nothing ran."""

    def __init__(self, sd: kuas.StableDiffusion):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in sd.modules().values()]

    def _hook(self, module, args):
        self.calls += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _final_latents(sd, prompt, **kwargs) -> tuple[list[Image.Image], torch.Tensor]:
    """Images and the last step's x0 (the final latents for Euler-type samplers, which end at sigma 0)."""
    seen = []
    images = sd.txt2img(prompt, callback=lambda step, total, x0: seen.append(x0.clone()), **kwargs)
    return images, seen[-1]


# -- seeds ---------------------------------------------------------------------------------------------------
def test_same_request_gives_identical_bytes(sd):
    a = sd.txt2img("a red circle", seed=42, **FAST)[0]
    b = sd.txt2img("a red circle", seed=42, **FAST)[0]
    c = sd.txt2img("a red circle", seed=43, **FAST)[0]
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert _arr(a).std() > 5  # a picture, not a flat field


def test_batch_image_i_equals_seed_plus_i_alone(sd):
    """Euler a (ancestral noise every step): each image has its own random stream."""
    kwargs = {**FAST, "sampler": "Euler a"}
    batch, batch_x0 = _final_latents(sd, "a cat", seed=100, batch_size=4, **kwargs)
    for i in (0, 3):
        alone, alone_x0 = _final_latents(sd, "a cat", seed=100 + i, **kwargs)
        # batched and single float32 convolutions differ in the last bits: 1e-5 of the latents' range
        # (a random U-Net's latents reach |x| ~ 100)
        assert (batch_x0[i] - alone_x0[0]).abs().max() <= 1e-5 * alone_x0.abs().max()
        assert np.abs(_arr(batch[i]) - _arr(alone[0])).max() <= 1
        assert f"Seed: {100 + i}," in batch[i].info["parameters"]
    # batch_count runs the same images in separate calls
    counted = sd.txt2img("a cat", seed=100, batch_size=2, batch_count=2, **kwargs)
    assert np.abs(_arr(counted[3]) - _arr(batch[3])).max() <= 1


def test_initial_noise_is_the_documented_cpu_draw():
    noise = ImageNoise([7, 8]).first((4, 8, 8))
    for i, seed in enumerate((7, 8)):
        expected = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(noise[i], expected)


def test_random_seed_is_reported_and_reproduces(sd):
    image = sd.txt2img("a dog", seed=-1, **FAST)[0]
    fields = parse_infotext(image.info["parameters"]).fields
    seed = int(fields["Seed"])
    assert 0 <= seed < 2**32
    assert sd.txt2img("a dog", seed=seed, **FAST)[0].tobytes() == image.tobytes()


def test_variation_seed_strength_zero_and_one(sd):
    kwargs = {**FAST, "sampler": "Euler"}  # deterministic: only the initial noise differs
    base = sd.txt2img("a tree", seed=5, **kwargs)[0]
    other = sd.txt2img("a tree", seed=9, **kwargs)[0]
    zero = sd.txt2img("a tree", seed=5, subseed=9, subseed_strength=0.0, **kwargs)[0]
    one = sd.txt2img("a tree", seed=5, subseed=9, subseed_strength=1.0, **kwargs)[0]
    half = sd.txt2img("a tree", seed=5, subseed=9, subseed_strength=0.5, **kwargs)[0]
    assert zero.tobytes() == base.tobytes()
    assert np.abs(_arr(one) - _arr(other)).max() <= 1
    assert half.tobytes() not in (base.tobytes(), other.tobytes())
    fields = parse_infotext(half.info["parameters"]).fields
    assert fields["Variation seed"] == "9" and fields["Variation seed strength"] == "0.5"
    assert "Variation seed" not in parse_infotext(zero.info["parameters"]).fields


def test_variation_batch_shares_the_seed_and_counts_up_subseeds():
    assert image_seeds(10, 50, 0.0, 3) == ([10, 11, 12], [50, 51, 52])
    assert image_seeds(10, 50, 0.3, 3) == ([10, 10, 10], [50, 51, 52])


def test_slerp_ends_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-6)
    mid = slerp(0.5, a, b)
    # spherical: the midpoint keeps the vectors' length (a straight line would shrink it by ~sqrt(2))
    ratio = mid.norm(dim=1) / ((a.norm(dim=1) + b.norm(dim=1)) / 2)
    assert ratio.mean() > 0.95


# -- img2img -------------------------------------------------------------------------------------------------
def test_img2img_strength_zero_returns_the_input(sd, picture):
    counter = CallCounter(sd)
    try:
        out = sd.img2img("x", picture, strength=0.0, seed=1, steps=10, watermark=False)
    finally:
        counter.remove()
    assert counter.calls == 0
    assert out[0].tobytes() == picture.tobytes()
    assert "Denoising strength: 0," in out[0].info["parameters"]


def test_img2img_runs_the_last_steps_and_resizes(sd, picture):
    totals = []
    out = sd.img2img(
        "x",
        picture,
        strength=0.5,
        steps=8,
        seed=1,
        width=48,
        height=32,
        watermark=False,
        callback=lambda step, total, x0: totals.append((step, total)),
    )
    assert totals == [(1, 4), (2, 4), (3, 4), (4, 4)]  # int(8 * 0.5) steps
    assert out[0].size == (48, 32)
    low = sd.img2img("x", picture, strength=0.1, steps=10, seed=1, watermark=False)[0]
    high = sd.img2img("x", picture, strength=0.9, steps=10, seed=1, watermark=False)[0]
    # more strength, further from the input's VAE round trip (the random test VAE does not reproduce it)
    with torch.no_grad():
        latents = common.encode_images(sd, common.images_to_tensor([picture]))
        round_trip = _arr(common.tensor_to_images(decode_latents(sd, latents))[0])
    near, far = np.abs(_arr(low) - round_trip).mean(), np.abs(_arr(high) - round_trip).mean()
    assert near < 0.5 * far, (near, far)


def test_img2img_one_init_image_per_batch_item(sd, picture):
    other = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = sd.img2img("x", [picture, other], strength=0.0, batch_size=2, batch_count=2, watermark=False)
    assert [im.tobytes() for im in out] == [picture.tobytes(), other.tobytes()] * 2
    with pytest.raises(InvalidInputError, match="init images"):
        sd.img2img("x", [picture, other, picture], batch_size=2)


def test_resize_modes():
    from kuas.pipelines.common import resize_image

    wide = Image.new("RGB", (40, 20), (200, 10, 10))
    wide.paste((10, 200, 10), (0, 0, 40, 1))  # a green top row
    assert resize_image(wide, 20, 20, "just resize").size == (20, 20)
    cropped = resize_image(wide, 20, 20, "crop and resize")
    assert cropped.size == (20, 20)
    filled = np.asarray(resize_image(wide, 20, 20, "resize and fill"))
    # the picture (resized to 20x10) sits in rows 5..14; the bands above and below repeat its edge rows
    assert filled.shape == (20, 20, 3)
    assert np.array_equal(filled[5:15], np.asarray(wide.resize((20, 10), Image.Resampling.LANCZOS)))
    assert (filled[:5] == filled[5]).all() and (filled[15:] == filled[14]).all()
    assert filled[5, 10, 1] > filled[14, 10, 1]  # the green top row stayed on top


# -- inpainting / outpainting --------------------------------------------------------------------------------
def _mask(box=(20, 16, 44, 40)) -> Image.Image:
    mask = Image.new("L", (S, S), 0)
    mask.paste(255, box)
    return mask


@pytest.mark.parametrize("fill", ["original", "fill", "latent noise", "latent nothing"])
def test_inpaint_keeps_unmasked_pixels_exactly(sd, picture, fill):
    mask = _mask()
    out = sd.inpaint(
        "a hat", picture, mask, seed=3, steps=4, mask_blur=4, inpainting_fill=fill, watermark=False
    )[0]
    assert out.size == picture.size
    overlay = np.minimum(255, 2 * np.asarray(blur_mask(mask, 4), dtype=np.int32))
    keep = overlay == 0
    assert keep.sum() > 0.5 * S * S
    assert np.array_equal(_arr(out)[keep], _arr(picture)[keep])
    inside = np.asarray(mask) > 0
    assert np.abs(_arr(out)[inside] - _arr(picture)[inside]).mean() > 3  # the masked area was repainted
    assert "Mask blur: 4" in out.info["parameters"]


def test_inpaint_only_masked_pastes_back_into_the_full_picture(sd, picture):
    mask = _mask((40, 40, 52, 56))
    out = sd.inpaint(
        "a hat",
        picture,
        mask,
        seed=3,
        steps=4,
        mask_blur=2,
        inpaint_full_res=True,
        inpaint_full_res_padding=4,
        width=32,
        height=32,
        watermark=False,
    )[0]
    assert out.size == picture.size  # the working size is 32x32, the result the input's size
    keep = np.asarray(blur_mask(mask, 2)) == 0
    assert np.array_equal(_arr(out)[keep], _arr(picture)[keep])
    assert np.abs(_arr(out) - _arr(picture))[np.asarray(mask) > 0].mean() > 3
    assert "Inpaint area: Only masked" in out.info["parameters"]


def test_inpaint_invert_mask_and_mask_of_another_size(sd, picture, caplog):
    small = _mask().resize((32, 32), Image.Resampling.NEAREST)
    inverted = Image.eval(small, lambda v: 255 - v)
    with caplog.at_level(logging.INFO):
        a = sd.inpaint("a hat", picture, small, seed=4, steps=3, mask_blur=0, watermark=False)[0]
    assert any("resized" in r.getMessage() for r in caplog.records)
    b = sd.inpaint(
        "a hat", picture, inverted, invert_mask=True, seed=4, steps=3, mask_blur=0, watermark=False
    )[0]
    assert a.tobytes() == b.tobytes()


def test_inpaint_with_the_watermark_changes_kept_pixels_only_slightly(sd):
    big = Image.new("RGB", (128, 128), (120, 90, 60))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 64, 64))
    marked = sd.inpaint("x", big, mask, seed=1, steps=2, mask_blur=0)[0]
    from kuas.images.watermark import detect_watermark

    assert detect_watermark(marked).found
    keep = np.asarray(mask) == 0
    change = np.abs(_arr(marked) - _arr(big))[keep]
    assert (
        0 < change.mean() < 3
    )  # the mark moves blue/green values a little, so exactness needs watermark=False


def test_outpaint_keeps_the_original_region_exactly(sd, picture):
    out = sd.outpaint(
        "a wide view", picture, left=16, right=5, top=0, bottom=8, seed=2, steps=4, watermark=False
    )[0]
    left, right, top, bottom = padded_extents(S, S, 16, 5, 0, 8)
    assert (left, right, top, bottom) == (16, 8, 0, 8)  # 64 + 16 + 5 = 85 -> 88: 3 more on the right
    assert padded_extents(S, S, 5, 0, 3, 0) == (8, 0, 8, 0)  # only left / top extended: they grow
    assert out.size == (S + 24, S + 8)
    region = _arr(out)[top : top + S, left : left + S]
    assert np.array_equal(region, _arr(picture))
    new = _arr(out)[:, :left]
    stretched = np.repeat(_arr(picture)[:, :1], left, axis=1)
    assert np.abs(new[:S] - stretched).mean() > 3  # the new area is generated, not the stretched border
    assert "Outpaint: " in out.info["parameters"]


def test_crop_and_expand_region():
    mask = np.zeros((100, 200), np.uint8)
    mask[40:50, 10:30] = 255
    assert crop_region(mask, 0) == (10, 40, 30, 50)
    assert crop_region(mask, 15) == (0, 25, 45, 65)
    # to a 1:1 working size the 20x10 box grows to 20x20 around its centre
    assert expand_region((10, 40, 30, 50), 64, 64, 200, 100) == (10, 35, 30, 55)
    # growing past the border shifts the box inside
    assert expand_region((0, 0, 10, 40), 64, 64, 200, 100) == (0, 0, 40, 40)


def test_blur_mask_is_the_documented_gaussian():
    mask = Image.new("L", (41, 41), 0)
    mask.putpixel((20, 20), 255)
    blurred = np.asarray(blur_mask(mask, 3), dtype=np.float64)
    half = int(2.5 * 3 + 0.5)
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / 3) ** 2)
    taps /= taps.sum()
    expected = 255 * np.outer(taps, taps)
    assert np.abs(blurred[20 - half : 21 + half, 20 - half : 21 + half] - expected).max() <= 0.5
    assert blurred[20, 20 + half + 1] == 0  # nothing outside the window
    assert blur_mask(mask, 0).tobytes() == mask.tobytes()


# -- validation ----------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"width": 60}, "multiple of 8"),
    ({"height": 0}, "positive"),
    ({"width": -8}, "positive"),
    ({"width": MAX_SIDE + 8}, "limit"),
    ({"width": MAX_SIDE, "height": MAX_SIDE}, str(MAX_PIXELS)),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"cfg_scale": float("nan")}, "cfg_scale"),
    ({"sampler": "Eulr a"}, "DPM++ 2M"),
    ({"scheduler": "Karas"}, "Karras"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_count": 0}, "batch_count"),
    ({"seed": -5}, "seed"),
    ({"subseed_strength": 1.5}, "subseed_strength"),
    ({"prompt": ["a", "b", "c"], "batch_size": 2}, "batch_size=3"),
    ({"enable_hr": True, "hr_upscaler": "ESRGAN"}, "Latent"),
    ({"enable_hr": True, "hr_denoising_strength": 0.01}, "no sampling step"),
    ({"guidance_rescale": 2.0}, "guidance_rescale"),
    ({"clip_skip": 5}, "clip_skip"),
    ({"noise": torch.zeros(1, 4, 4, 4)}, "noise must be"),
]


@pytest.mark.parametrize(("change", "words"), BAD_REQUESTS)
def test_bad_txt2img_input_fails_before_any_work(sd, change, words):
    kwargs = {"prompt": "x", "width": S, "height": S, "steps": 2, "seed": 1, **change}
    prompt = kwargs.pop("prompt")
    counter = CallCounter(sd)
    try:
        with pytest.raises(InvalidInputError, match=None) as info:
            sd.txt2img(prompt, **kwargs)
    finally:
        counter.remove()
    assert counter.calls == 0
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"strength": 1.5}, "strength"),
        ({"strength": -0.1}, "strength"),
        ({"strength": 0.01}, "no sampling step"),
    ],
)
def test_bad_strength_fails_before_any_work(sd, picture, change, words):
    counter = CallCounter(sd)
    try:
        with pytest.raises(InvalidInputError) as info:
            sd.img2img("x", picture, steps=20, **change)
        with pytest.raises(InvalidInputError):
            sd.inpaint("x", picture, _mask(), steps=20, **change)
    finally:
        counter.remove()
    assert counter.calls == 0
    assert words in str(info.value)


def test_all_black_mask_and_bad_outpaint_fail_before_any_work(sd, picture):
    counter = CallCounter(sd)
    try:
        with pytest.raises(InvalidInputError, match="all black"):
            sd.inpaint("x", picture, Image.new("L", (S, S), 0))
        with pytest.raises(InvalidInputError, match="all black"):  # white mask inverted: nothing to repaint
            sd.inpaint("x", picture, Image.new("L", (S, S), 255), invert_mask=True)
        with pytest.raises(InvalidInputError, match="at least one of"):
            sd.outpaint("x", picture)
        with pytest.raises(InvalidInputError, match="left"):
            sd.outpaint("x", picture, left=-8)
        with pytest.raises(InvalidInputError, match="inpainting_fill"):
            sd.inpaint("x", picture, _mask(), inpainting_fill="lama")
        with pytest.raises(InvalidInputError, match="strength 0"):
            sd.inpaint("x", picture, _mask(), strength=0.0)
    finally:
        counter.remove()
    assert counter.calls == 0


def test_unknown_sampler_message_lists_valid_names(sd):
    with pytest.raises(InvalidInputError) as info:
        sd.txt2img("x", sampler="Euler z", **FAST)
    for name in sampler_names():
        assert name in str(info.value)


# -- samplers, callbacks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sampler_names())
def test_every_sampler_runs_through_txt2img(sd, name):
    seen = []
    image = sd.txt2img(
        "a red circle",
        sampler=name,
        seed=1,
        width=32,
        height=32,
        steps=2,
        watermark=False,
        callback=lambda step, total, x0: seen.append(bool(torch.isfinite(x0).all())),
    )[0]
    assert seen and all(seen)
    assert image.size == (32, 32) and _arr(image).std() > 1
    assert f"Sampler: {name}," in image.info["parameters"]


def test_eta_reaches_the_sampler(sd):
    """Euler a with eta 0 adds no noise: exactly Euler's steps."""
    plain = sd.txt2img("x", sampler="Euler", seed=3, **FAST)[0]
    no_noise = sd.txt2img("x", sampler="Euler a", eta=0.0, seed=3, **FAST)[0]
    ancestral = sd.txt2img("x", sampler="Euler a", seed=3, **FAST)[0]
    assert no_noise.tobytes() == plain.tobytes() != ancestral.tobytes()
    assert "Eta: 0," in no_noise.info["parameters"]
    assert "Eta" not in sd.txt2img("x", sampler="Euler", eta=0.5, seed=3, **FAST)[0].info["parameters"]


def test_callback_reports_steps_and_can_cancel(sd):
    steps = []
    sd.txt2img("x", batch_count=2, callback=lambda step, total, x0: steps.append((step, total)), **FAST)
    assert steps == [(i, 6) for i in range(1, 7)]

    with pytest.raises(SamplingInterrupted) as info:
        sd.txt2img("x", callback=lambda step, total, x0: step < 2, **FAST)
    assert info.value.step == 1 and info.value.denoised is not None

    def stop(step, total, x0):
        raise SamplingInterrupted("user stop")

    with pytest.raises(SamplingInterrupted, match="user stop"):
        sd.txt2img("x", **FAST, callback=stop)


def test_progress_bar_option(sd, capsys):
    sd.txt2img("x", progress=True, **FAST)
    assert "3/3" in capsys.readouterr().err


# -- hires fix -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos"])
def test_hires_fix(sd, upscaler):
    totals = []
    image = sd.txt2img(
        "x",
        seed=1,
        width=32,
        height=32,
        steps=4,
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler=upscaler,
        hr_denoising_strength=0.5,
        watermark=False,
        callback=lambda step, total, x0: totals.append(total),
    )[0]
    assert image.size == (48, 48)
    assert set(totals) == {4 + 2} and len(totals) == 6  # 4 first-pass steps + int(4 * 0.5)
    fields = parse_infotext(image.info["parameters"]).fields
    assert fields["Size"] == "32x32" and fields["Hires upscale"] == "1.5"
    assert fields["Hires upscaler"] == upscaler and fields["Denoising strength"] == "0.5"


# -- tiling, VAE ---------------------------------------------------------------------------------------------
def test_seamless_tiling_makes_the_networks_shift_equivariant_and_is_restored(sd):
    g = torch.Generator().manual_seed(0)
    x, ctx, t = (
        torch.randn(1, 4, 16, 16, generator=g),
        torch.randn(1, 77, 64, generator=g),
        torch.tensor([500.0]),
    )
    z = torch.randn(1, 4, 6, 5, generator=g)

    def unet_gap() -> float:
        a = sd.unet(torch.roll(x, (8, 8), (2, 3)), t, context=ctx)
        return float((a - torch.roll(sd.unet(x, t, context=ctx), (8, 8), (2, 3))).abs().max())

    def vae_gap() -> float:
        a = sd.vae.decode(torch.roll(z, (1, 2), (2, 3)))
        return float((a - torch.roll(sd.vae.decode(z), (8, 16), (2, 3))).abs().max())

    with torch.no_grad():
        with seamless_tiling(sd.unet, sd.vae):
            assert unet_gap() < 1e-4 and vae_gap() < 1e-4
        assert unet_gap() > 0.01 and vae_gap() > 0.01
    modes = {m.padding_mode for m in sd.modules()["unet"].modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}
    image = sd.txt2img("x", tiling=True, seed=1, **FAST)[0]
    assert "Tiling: True" in image.info["parameters"]
    assert {m.padding_mode for m in sd.vae.modules() if isinstance(m, torch.nn.Conv2d)} == {"zeros"}


class _PointwiseVAE:
    """A stand-in decoder that is purely local (nearest upsampling of 3 latent channels), so tiled and
    whole decoding must agree exactly wherever the tiles are put."""

    class config:
        downsample_factor = 8
        out_ch = 3

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")


def test_tiled_decode_places_and_blends_tiles_exactly():
    z = torch.randn(2, 4, 37, 50, generator=torch.Generator().manual_seed(0))
    whole = _PointwiseVAE().decode(z)
    tiled = common._decode_tiled(_PointwiseVAE(), z, tile=16, overlap=6)
    assert torch.allclose(tiled, whole, atol=1e-6)


def test_tiled_decode_of_the_real_vae_is_close(sd):
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = decode_latents(sd, z, tiled=False)
        assert torch.equal(decode_latents(sd, z, tiled=True), whole)  # one tile covers it: identical
        tiled = decode_latents(sd, z, tiled=True, tile=16, overlap=8)
    # each tile's GroupNorm sees only the tile, so values differ a little, but tiles are in place
    assert (tiled - whole).abs().mean() < 0.3 * whole.std()
    image = sd.txt2img("x", seed=1, vae_tiling=True, **FAST)[0]
    assert image.size == (S, S)


def test_vae_nan_in_low_precision_retries_in_float32(sd):
    # decode_latents needs only the VAE and its factor: a bfloat16 copy of the test model's
    model = SimpleNamespace(vae=copy.deepcopy(sd.vae).to(torch.bfloat16), vae_scale=sd.vae_scale)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def poison_low_precision(module, args, output):
        return output if output.dtype == torch.float32 else output * float("nan")

    handle = model.vae.decoder.register_forward_hook(poison_low_precision)
    try:
        with torch.no_grad():
            out = decode_latents(model, z)
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    assert model.vae.dtype == torch.bfloat16  # restored
    model.vae.to(torch.float32)
    with torch.no_grad():
        assert torch.allclose(out, decode_latents(model, z), atol=1e-5)
    handle = model.vae.decoder.register_forward_hook(lambda m, a, o: o * float("nan"))
    try:
        with pytest.raises(KuasError, match="even in float32"):
            decode_latents(model, z)
    finally:
        handle.remove()


def test_unet_nan_is_a_clear_error(sd):
    handle = sd.unet.register_forward_hook(lambda m, a, o: o * float("nan"))
    try:
        with pytest.raises(KuasError, match="NaN/Inf") as info:
            sd.txt2img("x", seed=1, **FAST)
    finally:
        handle.remove()
    assert "float32" in str(info.value)


# -- infotext, prompts, defaults, other families -------------------------------------------------------------
def test_infotext_round_trip_regenerates_the_image(sd):
    first = sd.txt2img(
        "a blue (square)",
        negative_prompt="ugly, blurry",
        seed=77,
        sampler="DPM++ 2M",
        scheduler="Karras",
        cfg_scale=5.5,
        clip_skip=2,
        **FAST,
    )[0]
    request = infotext_to_request(first.info["parameters"])
    prompt = request.pop("prompt")
    assert request["clip_skip"] == 2 and request["scheduler"] == "Karras" and request["cfg_scale"] == 5.5
    again = sd.txt2img(prompt, watermark=False, **request)[0]
    assert again.tobytes() == first.tobytes()


def test_prompt_list_gives_each_image_its_prompt(sd):
    images = sd.txt2img(["a cat", "a dog"], negative_prompt=["", "blurry"], seed=20, batch_size=2, **FAST)
    assert images[0].info["parameters"].startswith("a cat\nSteps")
    assert images[1].info["parameters"].startswith("a dog\nNegative prompt: blurry\n")
    alone = sd.txt2img("a dog", negative_prompt="blurry", seed=21, **FAST)[0]
    assert np.abs(_arr(alone) - _arr(images[1])).max() <= 1


def test_clip_skip_and_guidance_rescale_change_the_image(sd):
    base = sd.txt2img("x y z", seed=1, **FAST)[0]
    assert sd.txt2img("x y z", seed=1, clip_skip=2, **FAST)[0].tobytes() != base.tobytes()
    rescaled = sd.txt2img("x y z", seed=1, guidance_rescale=0.7, **FAST)[0]
    assert rescaled.tobytes() != base.tobytes()
    assert sd.txt2img("x y z", seed=1, cfg_scale=1.0, **FAST)[0].tobytes() != base.tobytes()


def test_default_size_follows_the_model(sd):
    assert default_size(sd) == (512, 512)
    sd.metadata["modelspec.resolution"] = "64x48"
    try:
        assert default_size(sd) == (64, 48)
        assert sd.txt2img("x", steps=1, seed=1, watermark=False)[0].size == (64, 48)
    finally:
        del sd.metadata["modelspec.resolution"]


def test_watermark_is_applied_unless_disabled(sd):
    from kuas.images.watermark import detect_watermark

    kwargs = {**FAST, "width": 128, "height": 128, "steps": 1}
    kwargs.pop("watermark")
    assert detect_watermark(sd.txt2img("x", seed=1, **kwargs)[0]).found
    assert not detect_watermark(sd.txt2img("x", seed=1, watermark=False, **kwargs)[0]).found


@pytest.mark.parametrize("family", ["sdxl", "sd2-v", "sd1-inpaint"])
def test_other_families_generate(family):
    kwargs = dict(TINY)
    if family == "sdxl":
        kwargs["text_encoder_2"] = {**TE, "projection_dim": 64}
    model = randomize(kuas.create(family, **kwargs))
    image = model.txt2img("a lighthouse", seed=1, width=32, height=32, steps=2, watermark=False)[0]
    assert image.size == (32, 32) and _arr(image).std() > 1
    if family == "sd1-inpaint":
        picture = Image.new("RGB", (32, 32), (30, 60, 90))
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (8, 8, 24, 24))
        out = model.inpaint("x", picture, mask, strength=1.0, seed=1, steps=2, mask_blur=0, watermark=False)[
            0
        ]
        keep = np.asarray(mask) == 0
        assert np.array_equal(_arr(out)[keep], _arr(picture)[keep])
    if family == "sdxl":  # the size embedding in y depends on the size asked for
        cond_a, _ = common.text_conditioning(model, ["x"], None, clip_skip=1, width=32, height=32)
        cond_b, _ = common.text_conditioning(model, ["x"], None, clip_skip=1, width=64, height=32)
        assert cond_a["y"].shape == (1, model.unet.config.adm_in_channels)
        assert not torch.equal(cond_a["y"], cond_b["y"])


def test_noise_schedule_zero_terminal_snr(sd, picture):
    """A1111's "Noise schedule for sampling": a zero-terminal-SNR model samples on its own schedule unless told
    otherwise; the choice reaches the infotext ("Noise Schedule") and comes back from it."""
    zt_model = copy.copy(sd)
    zt_model.zero_terminal_snr = True
    default = sd.txt2img("a red ball", seed=3, **FAST)[0]
    forced = sd.txt2img("a red ball", seed=3, noise_schedule="Zero Terminal SNR", **FAST)[0]
    own = zt_model.txt2img("a red ball", seed=3, **FAST)[0]
    back = zt_model.txt2img("a red ball", seed=3, noise_schedule="Default", **FAST)[0]
    assert np.array_equal(np.asarray(forced), np.asarray(own))
    assert np.array_equal(np.asarray(default), np.asarray(back))
    assert not np.array_equal(np.asarray(default), np.asarray(own))
    assert "Noise Schedule" not in default.info["parameters"] and "Noise Schedule" not in back.info["parameters"]
    assert parse_infotext(own.info["parameters"]).fields["Noise Schedule"] == "Zero Terminal SNR"
    request = infotext_to_request(forced.info["parameters"])
    assert request["noise_schedule"] == "Zero Terminal SNR"
    # the first step starts from the rescaled schedule's largest sigma (about 4518.76 instead of 14.61)
    seen = []
    zt_model.txt2img("a red ball", seed=3, callback=lambda i, n, x: seen.append(float(x.abs().max())), **FAST)
    assert len(seen) == FAST["steps"] and all(np.isfinite(seen))
    spec, key = Txt2ImgRequest(**FAST).sampler_spec()
    assert float(common.sampling_sigmas(zt_model, spec, key, 3)[0]) == pytest.approx(4518.76, abs=0.05)
    assert float(common.sampling_sigmas(zt_model, spec, key, 3, noise_schedule="Default")[0]) == pytest.approx(
        14.6146, abs=1e-3)
    img = zt_model.img2img("a red ball", picture, seed=3, strength=0.5, **FAST)[0]
    assert parse_infotext(img.info["parameters"]).fields["Noise Schedule"] == "Zero Terminal SNR"
    with pytest.raises(InvalidInputError, match="noise_schedule must be one of"):
        sd.txt2img("a red ball", noise_schedule="zsnr", **FAST)

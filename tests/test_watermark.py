"""The dwtDct invisible watermark: compatibility with the `invisible-watermark` library both ways."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from kuas.errors import InvalidInputError
from kuas.images.watermark import (
    WATERMARK_MESSAGE,
    apply_watermark,
    decode_watermark_bits,
    detect_watermark,
    message_bits,
)
from kuas.world import render, sample_scene

imwatermark = pytest.importorskip("imwatermark", reason="test extra: pip install invisible-watermark")
cv2 = pytest.importorskip("cv2")


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def library_encode(image: Image.Image) -> Image.Image:
    """What CompVis' SD1 txt2img.py does: encode the BGR array with dwtDct and the SD1 message."""
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK_MESSAGE)
    return Image.fromarray(encoder.encode(_bgr(image), "dwtDct")[:, :, ::-1].copy())


def library_decode(image: Image.Image) -> bytes:
    return imwatermark.WatermarkDecoder("bytes", 136).decode(_bgr(image), "dwtDct")


def library_bits(image: Image.Image) -> np.ndarray:
    from imwatermark.maxDct import EmbedMaxDct

    return np.asarray(EmbedMaxDct(watermarks=[], wmLen=136).decode(_bgr(image)), dtype=np.uint8)


def psnr(a: Image.Image, b: Image.Image) -> float:
    d = np.asarray(a.convert("RGB"), np.float64) - np.asarray(b.convert("RGB"), np.float64)
    return float(10 * np.log10(255**2 / max((d**2).mean(), 1e-12)))


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    circle = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(circle).ellipse((100, 100, 400, 400), fill=(200, 30, 30))
    return {
        "world0": render(sample_scene(0), size=512),  # the built-in world kuas' small model learns
        "world3": render(sample_scene(3), size=512),
        "noise": noise,  # saturated noise: the library's uint8 wrap-around shows here
        "smooth": noise.filter(ImageFilter.GaussianBlur(8)),
        "grey": Image.new("RGB", (512, 512), (128, 128, 128)),
        "white": Image.new("RGB", (512, 512), (255, 255, 255)),
        "circle": circle,
        "blue": Image.new("RGB", (512, 512), (0, 0, 255)),
    }


IMAGES = _images()


def test_message_bits():
    bits = message_bits()
    assert len(bits) == 136 and np.packbits(bits).tobytes() == b"StableDiffusionV1"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_kuas_mark_is_read_by_the_library(name):
    image = IMAGES[name]
    marked = apply_watermark(image)
    assert library_decode(marked) == WATERMARK_MESSAGE
    result = detect_watermark(marked)
    assert (result.found, result.bits_matching, result.total, result.method) == (True, 136, 136, "dwtDct")
    assert psnr(image, marked) > 33.0  # measured 33.1 (pure blue) to 43.2 dB


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_kuas_decoder_matches_the_library_decoder_bit_for_bit(name):
    image = IMAGES[name]
    for candidate in (image, library_encode(image), apply_watermark(image)):
        assert np.array_equal(decode_watermark_bits(candidate, 136), library_bits(candidate))


@pytest.mark.parametrize("name", ["noise", "smooth", "grey"])  # synthetic: independent of the world renderer
def test_library_mark_is_found_by_kuas(name):
    marked = library_encode(IMAGES[name])
    assert library_decode(marked) == WATERMARK_MESSAGE
    assert detect_watermark(marked).found and detect_watermark(marked).bits_matching == 136


def test_library_fails_where_kuas_succeeds():
    # Measured: the library's own mark does not read back on flat or saturated pictures (half the bits).
    for name in ("white", "blue", "circle"):
        assert detect_watermark(library_encode(IMAGES[name])).bits_matching < 100
        assert detect_watermark(apply_watermark(IMAGES[name])).bits_matching == 136


def test_no_wraparound_on_saturated_pixels():
    image = IMAGES["noise"]
    assert psnr(image, library_encode(image)) < 20  # the library's float -> uint8 wrap (measured 15 dB)
    marked = np.asarray(apply_watermark(image), np.int64)
    diff = np.abs(marked - np.asarray(image, np.int64))
    assert diff[..., 0].max() == 0  # red is never touched
    assert diff.max() < 100  # no wrap-around (a wrap jumps by ~255)
    assert psnr(image, apply_watermark(image)) > 40


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_unmarked_images_are_reported_unmarked(name):
    result = detect_watermark(IMAGES[name])
    assert not result.found and result.bits_matching <= 80


def test_small_images():
    small = render(sample_scene(7), size=128)
    marked = apply_watermark(small)
    assert detect_watermark(marked).bits_matching == 136 and not detect_watermark(small).found
    with pytest.raises(RuntimeError, match="too small"):  # the reference library refuses < 256x256
        library_decode(marked)
    tiny = render(sample_scene(7), size=64)  # 64 blocks < 136 bits: left unchanged
    assert apply_watermark(tiny) is tiny
    assert detect_watermark(tiny) == detect_watermark(tiny).__class__(False, 0, 136, "dwtDct")


def test_alpha_info_and_odd_sizes_are_kept():
    image = IMAGES["world0"].resize((520, 600)).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((520, 600)))
    image.info["parameters"] = "a prompt\nSteps: 1, Sampler: Euler, Seed: 1"
    marked = apply_watermark(image)
    assert marked.mode == "RGBA" and marked.size == (520, 600)
    assert np.array_equal(np.asarray(marked.getchannel("A")), np.asarray(image.getchannel("A")))
    assert marked.info["parameters"] == image.info["parameters"]
    assert detect_watermark(marked).bits_matching == 136
    assert library_decode(marked.convert("RGB")) == WATERMARK_MESSAGE


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="PIL image"):
        apply_watermark(np.zeros((512, 512, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="empty"):
        apply_watermark(IMAGES["grey"], message=b"")

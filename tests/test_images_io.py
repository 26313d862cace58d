"""Image loading (modes, EXIF, bad files, bombs), masks, atomic PNG saving with infotext, numbering."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kuas.errors import InvalidInputError
from kuas.images.io import (
    check_writable_dir,
    load_image,
    load_mask,
    next_output_path,
    read_infotext,
    save_numbered_png,
    save_png,
)


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def px(image: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(image.getpixel(xy))


def noise(w=64, h=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


# -- modes ------------------------------------------------------------------------------------------------
def test_rgba_is_composited_on_white():
    a = np.zeros((2, 3, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    a[0, 1] = (255, 0, 0, 255)  # opaque red
    a[0, 2] = (0, 0, 255, 128)  # half blue over white
    a[1, :] = (10, 20, 30, 255)
    img = load_image(encode(Image.fromarray(a, "RGBA")))
    assert img.mode == "RGB" and img.size == (3, 2)
    assert px(img, (0, 0)) == (255, 255, 255)
    assert px(img, (1, 0)) == (255, 0, 0)
    got = np.array(px(img, (2, 0)))
    want = np.array([255 * 127 / 255, 255 * 127 / 255, 255])  # 0*a + 255*(1-a), a = 128/255
    assert np.abs(got - want).max() <= 1
    assert px(img, (0, 1)) == (10, 20, 30)


def test_la_and_palette_with_transparency():
    la = Image.fromarray(np.array([[[100, 0], [100, 255]]], np.uint8), "LA")
    img = load_image(encode(la))
    assert (px(img, (0, 0)), px(img, (1, 0))) == ((255, 255, 255), (100, 100, 100))

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 200, 0, 50, 60, 70] + [0] * 762)
    pal.putdata([0, 1])
    for fmt in ("PNG", "GIF"):
        data = encode(pal, fmt, transparency=0)
        img = load_image(data)
        assert (px(img, (0, 0)), px(img, (1, 0))) == ((255, 255, 255), (50, 60, 70)), fmt
    assert px(load_image(encode(pal))) == (0, 200, 0)  # no transparency: the palette colour


def test_16_bit_grey_is_scaled_not_clipped():
    a = np.array([[0, 257 * 100, 65535, 300]], np.uint16)
    sixteen = Image.fromarray(a)
    assert sixteen.mode == "I;16"
    img = load_image(encode(sixteen))
    assert [px(img, (i, 0))[0] for i in range(4)] == [0, 100, 255, 1]  # 300/257 -> 1, not clipped to 255
    assert px(img, (2, 0)) == (255, 255, 255)


def test_float_tiff_one_bit_and_grey():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    img = load_image(encode(f, "TIFF"))
    assert [px(img, (i, 0))[0] for i in range(3)] == [0, 128, 255]
    f255 = Image.fromarray(np.array([[0.0, 100.4, 300.0]], np.float32), "F")  # 0..255 data, clipped
    assert [px(load_image(encode(f255, "TIFF")), (i, 0))[0] for i in range(3)] == [0, 100, 255]

    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    img = load_image(encode(bits))
    assert (px(img, (0, 0)), px(img, (1, 0))) == ((0, 0, 0), (255, 255, 255))
    assert px(load_image(encode(Image.new("L", (1, 1), 77)))) == (77, 77, 77)


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red ink
    img = load_image(encode(cmyk, "JPEG", quality=95))
    assert img.mode == "RGB"
    assert np.abs(np.array(px(img, (8, 8))) - [255, 0, 0]).max() <= 8


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert px(load_image(buf.getvalue())) == (255, 0, 0)


def test_pil_image_and_path_sources(tmp_path):
    image = noise(8, 4)
    path = tmp_path / "x.png"
    image.save(path)
    for source in (image, path, str(path), encode(image), bytearray(encode(image))):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(image))


# -- EXIF orientation -------------------------------------------------------------------------------------
def oriented_jpeg(orientation: int) -> bytes:
    """40x20 grey picture with a red top-left quadrant, stored as-is with an EXIF Orientation tag."""
    img = Image.new("RGB", (40, 20), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize(
    "orientation,size,red_at",
    [
        (1, (40, 20), (5, 5)),
        (3, (40, 20), (35, 15)),  # rotated 180: red ends bottom right
        (6, (20, 40), (15, 5)),  # rotated 90 clockwise: red ends top right
        (8, (20, 40), (5, 35)),  # rotated 90 counter-clockwise: red ends bottom left
    ],
)
def test_exif_orientation_applied_to_image_and_mask(orientation, size, red_at):
    data = oriented_jpeg(orientation)
    img = load_image(data)
    assert img.size == size
    r, g, b = px(img, red_at)
    assert r > 200 and g < 60 and b < 60
    mask = load_mask(data)  # the same file as a mask: same orientation, so it stays aligned
    assert mask.size == size
    assert np.abs(np.asarray(mask, np.int16) - np.asarray(img.convert("L"), np.int16)).max() == 0


# -- bad files ---------------------------------------------------------------------------------------------
GOOD_PNG = encode(noise())
GOOD_JPEG = encode(noise(), "JPEG")


@pytest.mark.parametrize(
    "data,message",
    [
        (GOOD_PNG[: len(GOOD_PNG) // 2], "truncated"),
        (GOOD_JPEG[: len(GOOD_JPEG) // 2], "truncated"),
        (GOOD_PNG[:200] + bytes([GOOD_PNG[200] ^ 0xFF]) + GOOD_PNG[201:], "corrupt"),  # damaged IDAT data
        (GOOD_PNG[:20] + bytes([GOOD_PNG[20] ^ 1]) + GOOD_PNG[21:], "starts like a PNG file but its header"),
        (png_header_only(0, 0), "starts like a PNG file"),  # a 0x0 image
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
        (np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8).tobytes(), "not an image"),
        (b"", "empty"),
    ],
)
def test_bad_bytes_give_clear_errors(data, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        load_image(data, what="init image")
    assert str(info.value).startswith("init image")


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    page = tmp_path / "page.jpg"
    page.write_text("<html><body>404</body></html>")
    for path, message in (
        (empty, "empty"),
        (page, "HTML"),
        (tmp_path / "missing.png", "no such file"),
        (tmp_path, "folder"),
    ):
        with pytest.raises(InvalidInputError, match=message) as info:
            load_image(path)
        assert repr(str(path)) in str(info.value)


def test_unsupported_formats_are_not_decoded():
    ico = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "ICO")  # Pillow reads ICO, kuas does not
    with pytest.raises(InvalidInputError, match="not an image kuas can read"):
        load_image(ico)


def test_pixel_budget_is_checked_before_decoding():
    # A truncated 300x300 file: the budget error comes first, so nothing was decoded.
    big = encode(noise(300, 300))
    with pytest.raises(InvalidInputError, match="above the budget"):
        load_image(big[: len(big) // 2], max_pixels=256 * 256)
    assert load_image(big, max_pixels=300 * 300).size == (300, 300)
    # A header claiming 100000x100000 pixels (a bomb) is refused at once.
    with pytest.raises(InvalidInputError, match="too many pixels|above the budget"):
        load_image(png_header_only(100_000, 100_000))
    with pytest.raises(InvalidInputError, match="above the budget"):
        load_image(png_header_only(9000, 9000))  # 81M pixels: under Pillow's guard, over kuas' budget


# -- masks -------------------------------------------------------------------------------------------------
def test_mask_from_rgb_luminance_and_resize(caplog):
    rgb = Image.new("RGB", (8, 8), (0, 0, 0))
    rgb.paste((255, 255, 255), (0, 0, 4, 8))
    mask = load_mask(encode(rgb))
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 255
    assert mask.getpixel((7, 0)) == 0
    with caplog.at_level("INFO", logger="kuas.images.io"):
        resized = load_mask(encode(rgb), (16, 8))
    assert resized.size == (16, 8) and resized.getpixel((0, 0)) == 255 and resized.getpixel((15, 0)) == 0
    assert "resized to 16x8" in caplog.text and "stretched" in caplog.text


def test_mask_from_alpha_only_and_opaque_rgba():
    a = np.zeros((4, 4, 4), np.uint8)  # black everywhere, painted in alpha only
    a[:2, :, 3] = 255
    mask = load_mask(encode(Image.fromarray(a, "RGBA")))
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((0, 3)) == 0
    opaque_black = Image.new("RGBA", (4, 4), (0, 0, 0, 255))  # opaque: luminance (nothing to repaint)
    assert load_mask(encode(opaque_black)).getextrema() == (0, 0)
    b = np.zeros((1, 2, 4), np.uint8)  # white picture, right half transparent -> black there
    b[0, 0] = (255, 255, 255, 255)
    b[0, 1] = (200, 200, 200, 0)
    mask = load_mask(encode(Image.fromarray(b, "RGBA")))
    assert (mask.getpixel((0, 0)), mask.getpixel((1, 0))) == (255, 0)


# -- saving ------------------------------------------------------------------------------------------------
INFOTEXT = "a cat, (sitting:1.2)\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"


def test_save_png_writes_parameters_like_a1111(tmp_path):
    image = noise(16, 8)
    path = save_png(image, tmp_path / "sub" / "out.png", parameters=INFOTEXT)
    assert path == tmp_path / "sub" / "out.png"
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.info["parameters"] == INFOTEXT
        assert np.array_equal(np.asarray(saved), np.asarray(image))
    assert b"tEXtparameters\x00" + INFOTEXT.encode("latin-1") in path.read_bytes()  # a tEXt chunk
    assert read_infotext(path) == INFOTEXT
    unicode_text = "猫 🐱\nSteps: 1, Sampler: Euler, Seed: 2"
    save_png(image, path, parameters=unicode_text)  # not Latin-1: iTXt, still read by Pillow
    assert b"iTXtparameters" in path.read_bytes() and read_infotext(path) == unicode_text
    save_png(image, path)
    assert read_infotext(path) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.png"]  # no temporary files left


def test_read_infotext_from_jpeg_exif_user_comment():
    exif = Image.Exif()
    text = "a dog\nSteps: 5, Sampler: DDIM, Seed: 3 — ü"
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")  # what A1111 writes
    assert read_infotext(encode(noise(8, 8), "JPEG", exif=exif)) == text
    assert read_infotext(GOOD_JPEG) is None


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    save_png(noise(8, 8, seed=1), target, parameters="old")
    before = target.read_bytes()

    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        fp.truncate(fp.tell() // 2)  # half of the PNG written, then the disk "fails"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_png(noise(64, 64), target, parameters="new")
    with pytest.raises(OSError):
        save_png(noise(64, 64), tmp_path / "fresh.png")
    monkeypatch.undo()
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no fresh.png, no temporary files


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidInputError, match="not writable|exists as a file"):
        check_writable_dir(blocker)
    with pytest.raises(InvalidInputError, match="not writable"):
        check_writable_dir(blocker / "sub")
    with pytest.raises(InvalidInputError, match="not writable"):
        save_png(noise(4, 4), blocker / "out.png")
    assert check_writable_dir(tmp_path / "new" / "dir").is_dir()
    assert not [p for p in (tmp_path / "new" / "dir").iterdir()]  # the probe file is gone


def test_numbering_like_a1111_and_never_overwriting(tmp_path):
    assert next_output_path(tmp_path / "none", 5) == tmp_path / "none" / "00000-5.png"
    for name in ("00003-1.png", "00010-2.png", "foo.png", "grid-0099.png", ".00050-x.png.tmp"):
        (tmp_path / name).write_bytes(b"x")
    assert next_output_path(tmp_path, 42) == tmp_path / "00011-42.png"
    assert next_output_path(tmp_path) == tmp_path / "00011.png"
    first = save_numbered_png(noise(4, 4), tmp_path, seed=7, parameters="p")
    assert first.name == "00011-7.png"
    # another writer takes the next name between the lookup and the write: kuas moves on, no overwrite
    (tmp_path / "00012-7.png").write_bytes(b"other")
    with pytest.raises(FileExistsError):
        save_png(noise(4, 4), tmp_path / "00012-7.png", overwrite=False)
    assert (tmp_path / "00012-7.png").read_bytes() == b"other"
    second = save_numbered_png(noise(4, 4), tmp_path, seed=7)
    assert second.name == "00013-7.png"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and not p.name.startswith(".00050")]

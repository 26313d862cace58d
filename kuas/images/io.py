"""Reading user images and masks safely, and writing PNGs that carry their generation parameters.

Reading (`load_image`, `load_mask`):
* only PNG, JPEG, WEBP, BMP, GIF (first frame) and TIFF are decoded (Pillow's other decoders, some with
  known decompression-bomb bugs, are never reached);
* the pixel count is checked against a budget before any pixel is decoded (default 8192 x 8192 pixels),
  and files above 256 MiB are refused before they are read;
* the EXIF orientation is applied (`ImageOps.exif_transpose`), to images and masks alike, so they stay
  aligned;
* transparency is composited on white (a transparent init image reads as a white page); palette, grey,
  16-bit (``I;16``: value / 257), 32-bit integer (``I``, taken as 16-bit), float (``F``: 0..1 when all
  values lie there, else 0..255), CMYK and 1-bit images become 8-bit RGB;
* a missing, empty, truncated, corrupt or non-image file raises `InvalidInputError` naming the file and
  the problem. Truncated files are never half-loaded (Pillow's global LOAD_TRUNCATED_IMAGES is not
  touched).

Writing (`save_png`, `next_output_path`, `save_numbered_png`): PNGs with the infotext in a ``parameters``
text chunk (tEXt when Latin-1 can hold it, else iTXt, as A1111 writes it), written to a temporary file in
the same folder, synced and renamed, so a crash never leaves a partial PNG; numbered like A1111's outputs
(``00000-<seed>.png``), never overwriting an existing file.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from kuas.errors import InvalidInputError

log = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FORMATS",
    "ALPHA_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "check_writable_dir",
    "load_image",
    "load_mask",
    "load_stored_pixels",
    "next_output_path",
    "read_infotext",
    "save_numbered_png",
    "save_png",
]

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 8192 * 8192
MAX_FILE_BYTES = 256 * 1024 * 1024
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
PARAMETERS_KEY = "parameters"  # A1111's PNG text chunk

_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


# -- opening -----------------------------------------------------------------------------------------------
def _describe(source: ImageSource, what: str) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"{what} (given as {len(source)} bytes)"
    if isinstance(source, Image.Image):
        return f"{what} (a {source.mode} image in memory)"
    return f"{what} {os.fspath(source)!r}"


def _read_bytes(source: str | os.PathLike, label: str) -> bytes:
    path = Path(os.fspath(source))
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidInputError(f"{label}: no such file; check the path") from None
    except OSError as e:
        raise InvalidInputError(f"{label}: cannot be read ({e.strerror or e})") from None
    if path.is_dir():
        raise InvalidInputError(f"{label}: is a folder, not an image file")
    if size > MAX_FILE_BYTES:
        raise InvalidInputError(
            f"{label}: is {size / 2**20:.0f} MiB, above the {MAX_FILE_BYTES // 2**20} MiB "
            f"limit for images; shrink or convert it first"
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidInputError(f"{label}: cannot be read ({e.strerror or e})") from None


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _not_an_image(data: bytes, label: str) -> InvalidInputError:
    head = data[:512].lstrip().lower()
    claimed = next((name for sig, name in _SIGNATURES if data.startswith(sig)), None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        claimed = "WEBP"
    if not data:
        problem = "is empty (0 bytes)"
    elif claimed:
        return InvalidInputError(
            f"{label}: starts like a {claimed} file but its header is corrupt; re-export or re-download it"
        )
    elif head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")) or b"<svg" in head:
        problem = "is HTML/XML/SVG text, not a raster image (was a web page saved instead of the picture?)"
    else:
        problem = "is not an image kuas can read"
    return InvalidInputError(f"{label}: {problem}; use a PNG, JPEG, WEBP, BMP, GIF or TIFF file")


def _open_checked(
    source: ImageSource, what: str, max_pixels: int, *, upright: bool = True
) -> tuple[Image.Image, str]:
    """A fully decoded image from `source` (after the format and pixel-budget checks), turned upright per
    its EXIF orientation unless `upright` is False, and the label that names it in messages."""
    label = _describe(source, what)
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            data = _read_bytes(source, label)
        else:
            raise InvalidInputError(
                f"{what}: expected a file path, bytes or a PIL image, got {type(source).__name__}"
            )
        if not data:
            raise _not_an_image(data, label)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            except UnidentifiedImageError:
                raise _not_an_image(data, label) from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise InvalidInputError(f"{label}: has too many pixels to open safely ({e})") from None
            except _DECODE_ERRORS as e:
                raise InvalidInputError(f"{label}: is corrupt or unsupported ({e})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"{label}: has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInputError(
            f"{label}: is {width}x{height} = {width * height:,} pixels, above the budget "
            f"of {max_pixels:,}; downscale it first (or raise max_pixels)"
        )
    if getattr(image, "is_animated", False):
        image.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image.load()
        except _DECODE_ERRORS as e:
            problem = "is truncated (the file ends early)" if "truncated" in str(e) else f"is corrupt ({e})"
            raise InvalidInputError(f"{label}: {problem}; re-export or re-download it") from None
    if not upright:
        return image, label
    try:
        oriented = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as e:  # a malformed EXIF block must not lose the picture
        log.warning("%s: EXIF orientation ignored (%s)", label, e)
        oriented = image
    return (oriented if oriented is not None else image), label


# -- mode conversion ---------------------------------------------------------------------------------------
def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """An "I;16*", "I" or "F" image as 8-bit "L" (16-bit scaled by 1/257; float 0..1 or 0..255)."""
    if image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
    else:  # integer modes: 16-bit samples
        a = np.asarray(image, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgba_or_rgb(image: Image.Image, label: str) -> Image.Image:
    """The image as "RGBA" when it has any transparency, else "RGB", at 8 bits per channel."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit_grey(image)
    if image.mode == "1":
        image = image.convert("L")
    try:
        return image.convert("RGBA" if _has_alpha(image) else "RGB")
    except ValueError as e:
        raise InvalidInputError(
            f"{label}: Pillow mode {image.mode!r} is not supported ({e}); save it as RGB"
        ) from None


def _flatten(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(
    source: ImageSource, *, what: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open `source` (path, bytes or PIL image) as an 8-bit RGB image, safely (see the module docstring).

    `what` names the image in error messages ("init image", "mask"...). Transparent areas become white.
    """
    image = _to_rgba_or_rgb(*_open_checked(source, what, max_pixels))
    return _flatten(image) if image.mode == "RGBA" else image


def load_stored_pixels(
    source: ImageSource, *, what: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """The RGB pixels exactly as stored in the file, for pixel-exact analysis (watermark detection): the
    same safety checks as `load_image`, but no EXIF rotation and alpha dropped rather than composited."""
    image, label = _open_checked(source, what, max_pixels, upright=False)
    image = _to_rgba_or_rgb(image, label)
    return image.convert("RGB")


def load_mask(
    source: ImageSource,
    size: tuple[int, int] | None = None,
    *,
    what: str = "mask",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open an inpainting mask as 8-bit "L" (white = repaint), resized to `size` (width, height) if given.

    * no transparency (or a fully opaque alpha channel): the luminance of the picture;
    * transparency over a single colour (a mask painted only in the alpha channel): the alpha channel;
    * transparency over a picture: the luminance composited on black (transparent = keep).
    A mask of another size is resized bilinearly (stretched if the aspect ratio differs), with a log note.
    """
    image = _to_rgba_or_rgb(*_open_checked(source, what, max_pixels))
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        image = image.convert("RGB")
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        colours = image.convert("RGB").getextrema()
        if all(lo == hi for lo, hi in colours):
            mask = alpha
        else:
            black = Image.new("RGBA", image.size, (0, 0, 0, 255))
            mask = Image.alpha_composite(black, image).convert("L")
    else:
        mask = image.convert("L")
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size[0] <= 0 or size[1] <= 0:
            raise InvalidInputError(f"mask size must be positive, got {size}")
        if mask.size != size:
            note = (
                " (aspect ratio differs: stretched)" if mask.width * size[1] != mask.height * size[0] else ""
            )
            log.info("%s is %dx%d, resized to %dx%d%s", what, mask.width, mask.height, size[0], size[1], note)
            mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


# -- parameters --------------------------------------------------------------------------------------------
def _decode_user_comment(raw: bytes | str) -> str | None:
    """EXIF UserComment: an 8-byte charset prefix, then the text (A1111 writes "UNICODE" + UTF-16 BE)."""
    if isinstance(raw, str):
        return raw or None
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            text = body.decode("utf-16")
        else:  # no byte-order mark: big-endian per the standard, little-endian if it looks like it
            little = len(body) > 1 and body[0] != 0 and body[1] == 0
            text = body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    elif prefix.startswith(b"ASCII"):
        text = body.decode("latin-1")
    else:
        text = raw.decode("utf-8", errors="replace")
    text = text.rstrip("\x00")
    return text or None


def read_infotext(source: ImageSource, *, what: str = "image") -> str | None:
    """The A1111 generation parameters stored in an image: the PNG ``parameters`` text chunk, or the EXIF
    UserComment of a JPEG/WEBP (where A1111 puts them); None when there are none."""
    image, _ = _open_checked(source, what, DEFAULT_MAX_PIXELS, upright=False)
    text = image.info.get(PARAMETERS_KEY)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text:
        return str(text)
    try:
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    except _DECODE_ERRORS:
        comment = None
    return _decode_user_comment(comment) if comment else None


# -- writing -----------------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform (Windows); the file itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _place_without_clobbering(tmp_name: str, path: Path) -> None:
    """Move a finished temporary file to `path` unless `path` exists (FileExistsError)."""
    try:
        os.link(tmp_name, path)  # atomic and fails if `path` exists, even with another process racing
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: check, then rename (a tiny race window)
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp_name, path)
        return
    os.unlink(tmp_name)


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove a file can be written there; InvalidInputError otherwise."""
    path = Path(os.fspath(folder))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kuas-write-test-", delete=True):
            pass
    except FileExistsError:
        raise InvalidInputError(
            f"output folder {str(path)!r} exists as a file; choose another folder"
        ) from None
    except OSError as e:
        raise InvalidInputError(
            f"output folder {str(path)!r} is not writable ({e.strerror or e}); choose "
            f"another folder or fix its permissions"
        ) from None
    return path


def save_png(
    image: Image.Image,
    path: str | os.PathLike,
    *,
    parameters: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `image` as a PNG at `path` with `parameters` (the infotext) in a ``parameters`` text chunk.

    The data goes to a temporary file in the same folder, is synced, then renamed into place: readers never
    see a partial PNG and a failure leaves nothing behind. With ``overwrite=False`` an existing file is
    never replaced (FileExistsError; `save_numbered_png` then takes the next number).
    """
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"save_png expects a PIL image, got {type(image).__name__}")
    path = Path(os.fspath(path))
    folder = path.parent
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, str(parameters))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise InvalidInputError(
            f"cannot write {str(path)!r}: its folder is not writable ({e.strerror or e}); "
            f"choose another folder or fix its permissions"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            _place_without_clobbering(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return path


_NUMBERED = re.compile(r"^(\d+)")


def next_output_path(outdir: str | os.PathLike, seed: int | None = None, *, suffix: str = ".png") -> Path:
    """The next free A1111-style name in `outdir`: ``NNNNN-<seed>.png``, NNNNN one above the highest
    number any file there starts with (00000 in an empty folder)."""
    folder = Path(os.fspath(outdir))
    highest = -1
    if folder.is_dir():
        for entry in os.scandir(folder):
            m = _NUMBERED.match(entry.name)
            if m and not entry.name.startswith("."):
                highest = max(highest, int(m.group(1)))
    name = f"{highest + 1:05d}" + (f"-{seed}" if seed is not None else "")
    return folder / f"{name}{suffix}"


def save_numbered_png(
    image: Image.Image, outdir: str | os.PathLike, *, seed: int | None = None, parameters: str | None = None
) -> Path:
    """Save under `next_output_path`, taking the following number if another writer took it meanwhile."""
    for _ in range(1000):
        path = next_output_path(outdir, seed)
        try:
            return save_png(image, path, parameters=parameters, overwrite=False)
        except FileExistsError:
            continue
    raise InvalidInputError(f"could not find a free file name in {os.fspath(outdir)!r}")

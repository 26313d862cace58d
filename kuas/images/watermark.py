"""The invisible watermark of the reference Stable Diffusion scripts, readable by `invisible-watermark`.

CompVis' SD1 ``scripts/txt2img.py`` marks every image with the library ``invisible-watermark`` (method
``dwtDct``, message ``b"StableDiffusionV1"``: 17 bytes = 136 bits). kuas writes and reads the same mark in
numpy only. The scheme, as the library defines it:

1. Convert the picture to YUV with OpenCV's 8-bit rule and take the U (blue-difference) channel, cropped to
   a multiple of 4 pixels. The library's scales are (Y 0, U 36), so only U carries the mark.
2. One-level Haar transform of U: its low band LL is (a + b + c + d) / 2 over each 2x2 pixel square.
3. Cut LL into 4x4 blocks in raster order; block n carries bit n mod 136.
4. In each block take the coefficient of largest magnitude other than the block's first one. Bit 0 puts it
   at 9 (a quarter step) inside its step of 36, bit 1 at 27 (three quarters). Reading: the coefficient's
   remainder modulo 36 above 18 votes 1; a bit is 1 when more than 127/255 of its blocks vote 1.

(Despite the name, the library's ``dwtDct`` method applies no DCT: it edits the LL coefficients.)

How kuas writes it (the library's decoder reads it; kuas' decoder is the library's, bit for bit):

* Only the changed LL coefficients go back into pixels (the library re-assembles U from all four Haar
  bands with the horizontal and vertical details swapped, which alters chroma detail it did not mean to).
* For each block kuas picks the level of its maximum that costs least: coefficients above the level come
  down to it, the largest rises to it if none reaches it, and those within 6 below it that would read the
  wrong bit move out of the way. Whichever coefficient a decoder then picks, even after rounding, reads
  the right bit. The library moves only the largest coefficient, so on flat pictures (a plain background
  gives every coefficient the same value) the decoder picks another one: measured at 512x512, the
  library's mark does not read back on plain white, pure blue, a circle on white or one of kuas' world
  renders, while kuas' mark reads back exactly on all of them and on noise, blurred noise and grey.
* U is changed by moving blue, and green against it so that luminance stays put (blue alone where green
  is at its limit), rounded and clipped to 0..255. The library writes its float result into uint8 without
  clipping, so saturated pixels wrap around (15 dB PSNR on random noise; kuas: 43 dB).

Like the library's, the mark does not survive JPEG (quality 95 already leaves half the bits wrong on
kuas' world renders) or resizing: it proves origin only for losslessly saved files.

Image sizes. The library refuses pictures of fewer than 256x256 pixels. kuas still marks a smaller picture
when it has at least one block per bit (LL blocks = (height // 8) * (width // 8) >= 136, e.g. 128x128
has 256), with exactly the same scheme: kuas' detector reads it, the reference library will not (it refuses
the size). Smaller pictures (64x64) are returned unchanged, with a debug log. The mark is never applied to
an upscaled copy: that would change every pixel.

Detection reports how many of the 136 bits match; ``found`` needs at least 90% (123 bits: an unmarked
picture whose decoded bits were coin flips would get there with probability 6e-24; measured on unmarked
pictures: 66 to 69).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kuas.errors import InvalidInputError

log = logging.getLogger(__name__)

__all__ = [
    "METHOD",
    "REFERENCE_MIN_PIXELS",
    "WATERMARK_MESSAGE",
    "WatermarkResult",
    "apply_watermark",
    "decode_watermark_bits",
    "detect_watermark",
    "message_bits",
    "watermark_capacity",
]

WATERMARK_MESSAGE = b"StableDiffusionV1"  # what CompVis' SD1 scripts embed
METHOD = "dwtDct"
REFERENCE_MIN_PIXELS = 256 * 256  # below this the reference library refuses to encode or decode
FOUND_FRACTION = 0.9

_SCALE = 36.0  # the library's default scale of the U channel
_BLOCK = 4  # LL block side
_ARGMAX_MARGIN = 6.0  # coefficients this close below a block's maximum might be read instead of it
_ZONE_MARGIN = 4.0  # kuas keeps read coefficients this far inside their bit's half of the step
_CENTRE_PULL = 8.0  # weight of a level's distance from its step centre in the choice of level
_HAAR = 0.7071067811865476  # the Haar filter tap, 1/sqrt(2) as a double

# OpenCV's 8-bit BGR -> YUV: 14-bit fixed point versions of Y = .299 R + .587 G + .114 B and
# U = .492 (B - Y) + 128, with Y rounded first. Reading U exactly like this makes kuas' decoder agree
# with the library's bit for bit.
_FIX_SHIFT = 14
_FIX_HALF = 1 << (_FIX_SHIFT - 1)
_R2Y, _G2Y, _B2Y, _B2U = 4899, 9617, 1868, 8061
# U = .492 (.886 B - .299 R - .587 G) + 128: moving blue by dB and green by -dB * .114 / .587 keeps Y and
# moves U by .492 dB; blue alone moves U by .492 * .886 dB.
_U_PER_B = 0.492
_B_SHARE = 0.886
_G2Y_F = 0.587
_G_PER_B = 0.114 / 0.587


@dataclass(frozen=True)
class WatermarkResult:
    """What `detect_watermark` found: bits of the expected message read back, out of `total`."""

    found: bool
    bits_matching: int
    total: int
    method: str = METHOD


def message_bits(message: bytes = WATERMARK_MESSAGE) -> np.ndarray:
    """The message as bits, most significant bit of each byte first (the library's order)."""
    if not message:
        raise InvalidInputError("the watermark message must not be empty")
    return np.unpackbits(np.frombuffer(bytes(message), dtype=np.uint8))


def watermark_capacity(width: int, height: int) -> int:
    """Number of 4x4 LL blocks (one bit each) in a picture of this size."""
    return (height // 8) * (width // 8)


# -- the transform ---------------------------------------------------------------------------------------
def _u_channel(rgb: np.ndarray) -> np.ndarray:
    """U of an (H, W, 3) uint8 RGB array, computed exactly as OpenCV's 8-bit COLOR_BGR2YUV does."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    y = (r * _R2Y + g * _G2Y + b * _B2Y + _FIX_HALF) >> _FIX_SHIFT
    u = ((b - y) * _B2U + (128 << _FIX_SHIFT) + _FIX_HALF) >> _FIX_SHIFT
    return np.clip(u, 0, 255).astype(np.float64)


def _pair_sum(x: np.ndarray) -> np.ndarray:
    """Sum over each 2x2 square of an (H, W) array with even H, W -> (H/2, W/2)."""
    return x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]


def _haar_ll(u: np.ndarray) -> np.ndarray:
    """The Haar low band, (a + b + c + d) / 2 per 2x2 square, rounded the way PyWavelets computes it
    (filter 1/sqrt(2) down the columns, then along the rows). A coefficient exactly on a reading boundary
    (18 modulo 36 is common: LL is a multiple of 0.5) then falls on the same side as in the library."""
    c = _HAAR
    top, bottom = u[0::2], u[1::2]
    col = top * c + bottom * c
    return col[:, 0::2] * c + col[:, 1::2] * c


def _blocks(ll: np.ndarray) -> tuple[np.ndarray, int, int]:
    """LL cut into 4x4 blocks in raster order: (N, 16) plus the block grid's rows and columns."""
    rows, cols = ll.shape[0] // _BLOCK, ll.shape[1] // _BLOCK
    cut = ll[: rows * _BLOCK, : cols * _BLOCK]
    blocks = cut.reshape(rows, _BLOCK, cols, _BLOCK).transpose(0, 2, 1, 3).reshape(rows * cols, _BLOCK**2)
    return blocks, rows, cols


def _unblocks(blocks: np.ndarray, rows: int, cols: int, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=blocks.dtype)
    grid = blocks.reshape(rows, cols, _BLOCK, _BLOCK).transpose(0, 2, 1, 3)
    out[: rows * _BLOCK, : cols * _BLOCK] = grid.reshape(rows * _BLOCK, cols * _BLOCK)
    return out


def _cropped(rgb: np.ndarray) -> tuple[int, int]:
    return rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4


def _carrier(blocks: np.ndarray) -> np.ndarray:
    """Index in each block of the coefficient that carries the bit: largest magnitude, first one excluded."""
    return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


# -- reading ---------------------------------------------------------------------------------------------
def _rgb_array(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"expected a PIL image, got {type(image).__name__}")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_watermark_bits(image: Image.Image, n_bits: int) -> np.ndarray | None:
    """The `n_bits` bits a dwtDct decoder reads from `image` (None if it has fewer blocks than bits)."""
    rgb = _rgb_array(image)
    if watermark_capacity(rgb.shape[1], rgb.shape[0]) < n_bits:
        return None
    h, w = _cropped(rgb)
    ll = _haar_ll(_u_channel(rgb[:h, :w]))
    blocks, _, _ = _blocks(ll)
    values = np.abs(blocks[np.arange(len(blocks)), _carrier(blocks)])
    votes = (values % _SCALE > 0.5 * _SCALE).astype(np.float64)
    which = np.arange(len(blocks)) % n_bits
    share = np.bincount(which, weights=votes, minlength=n_bits) / np.bincount(which, minlength=n_bits)
    return (share * 255 > 127).astype(np.uint8)  # the library's comparison, kept to the bit


def detect_watermark(image: Image.Image, *, message: bytes = WATERMARK_MESSAGE) -> WatermarkResult:
    """Read the dwtDct mark and compare it with `message` (found: at least 90% of the bits match)."""
    expected = message_bits(message)
    bits = decode_watermark_bits(image, len(expected))
    if bits is None:
        return WatermarkResult(False, 0, len(expected))
    matching = int((bits == expected).sum())
    return WatermarkResult(matching >= int(np.ceil(FOUND_FRACTION * len(expected))), matching, len(expected))


# -- writing ---------------------------------------------------------------------------------------------
def _u_room(b: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far U of each pixel can rise / fall within 0..255: blue moves, green moves against it to hold
    luminance while it can, then blue alone finishes (a small luminance change)."""
    up = _U_PER_B * (_B_SHARE * (255.0 - b) + _G2Y_F * np.minimum(g, _G_PER_B * (255.0 - b)))
    down = _U_PER_B * (_B_SHARE * b + _G2Y_F * np.minimum(255.0 - g, _G_PER_B * b))
    return up, down


def _pixel_change(delta_u: np.ndarray, b: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blue and green changes that move U by `delta_u` (within the room `_u_room` gives)."""
    steady_b = delta_u / _U_PER_B  # blue change if green can hold luminance
    g_room = np.where(delta_u >= 0, g, 255.0 - g)
    delta_g = -np.sign(delta_u) * np.minimum(g_room, _G_PER_B * np.abs(steady_b))
    delta_b = (steady_b + _G2Y_F * delta_g) / _B_SHARE
    return delta_b, delta_g


def _candidate_levels(top: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels the block maximum may take for its bit, (N, C), and each one's distance from its step's
    centre (9 or 27): the centres of neighbouring steps, and the point of each step's safe zone nearest to
    the current maximum (cheap on flat areas, closer to a reading boundary)."""
    low = np.where(bits == 1, _SCALE / 2, 0.0)[:, None]  # the zone of the bit inside a step
    centre = low + _SCALE / 4
    period = np.floor(top / _SCALE)[:, None] + np.array([-1.0, 0.0, 1.0])[None, :]
    base = period * _SCALE
    nearest = np.clip(top[:, None], base + low + _ZONE_MARGIN, base + low + _SCALE / 2 - _ZONE_MARGIN)
    levels = np.concatenate([base + centre, nearest], axis=1)
    off_centre = np.concatenate([np.zeros_like(base), nearest - (base + centre)], axis=1)
    return levels, off_centre


def _embed_blocks(
    blocks: np.ndarray, room_up: np.ndarray, room_down: np.ndarray, bits: np.ndarray
) -> tuple[np.ndarray, int]:
    """LL changes, (N, 16), that make every block read as its bit (bit n mod len(bits) for block n).

    For a candidate level q of the block's maximum: coefficients above q come down to q; coefficients
    within 6 below q that would read the wrong bit go to q or to q - 6 (whichever is nearer); if nothing
    reaches q the largest coefficient rises to it. Whichever coefficient a decoder then picks, even after
    rounding noise, reads the right bit. Of the reachable candidates the cheapest wins (squared change,
    plus a pull towards the step centre that keeps single-coefficient blocks at the library's levels).
    Also returns the count of blocks with no reachable candidate (left unchanged)."""
    n = len(blocks)
    block_bits = bits[np.arange(n) % len(bits)]
    values = blocks[:, None, :]  # (N, 1, 16); U is never negative, so magnitudes are the values
    usable = np.ones(blocks.shape[1], dtype=bool)
    usable[0] = False  # the first coefficient is never read
    top = blocks[:, usable].max(axis=1)
    levels, off_centre = _candidate_levels(top, block_bits)
    q = levels[:, :, None]  # (N, C, 1)

    low = np.where(block_bits == 1, _SCALE / 2, 0.0)[:, None, None]
    rem = np.mod(values, _SCALE) - low
    reads_right = (rem >= _ZONE_MARGIN) & (rem <= _SCALE / 2 - _ZONE_MARGIN)
    window = (values > q - _ARGMAX_MARGIN) & (values <= q)
    fix = window & ~reads_right
    nearer_top = (q - values) <= (values - (q - _ARGMAX_MARGIN))
    target = np.where(values > q, q, values)
    target = np.where(fix, np.where(nearer_top, q, q - _ARGMAX_MARGIN), target)
    target = np.where(usable[None, None, :], target, values)
    # Nothing at q yet: the largest usable coefficient rises to it.
    first_top = np.argmax(np.where(usable, blocks, -np.inf), axis=1)
    reached = (np.where(usable, target, -np.inf) >= q - 1e-9).any(axis=2)
    rise = np.zeros_like(target, dtype=bool)
    rise[np.arange(n), :, first_top] = True
    target = np.where(rise & ~reached[:, :, None], q, target)

    change = target - values
    feasible = ((change <= room_up[:, None, :] + 1e-9) & (-change <= room_down[:, None, :] + 1e-9)).all(
        axis=2
    )
    cost = (change**2).sum(axis=2) + _CENTRE_PULL * off_centre**2
    cost = np.where(feasible, cost, np.inf)
    best = np.argmin(cost, axis=1)
    stuck = ~np.isfinite(cost[np.arange(n), best])
    delta = change[np.arange(n), best]
    delta[stuck] = 0.0
    return delta, int(stuck.sum())


def apply_watermark(image: Image.Image, *, message: bytes = WATERMARK_MESSAGE) -> Image.Image:
    """`image` carrying the dwtDct mark of `message` (default: SD1's "StableDiffusionV1").

    Returns a new RGB (or RGBA: alpha is kept) image with the same `.info`; a picture too small to hold
    one block per bit is returned unchanged (debug log). See the module docstring for the sizes the
    reference library can read.
    """
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"apply_watermark expects a PIL image, got {type(image).__name__}")
    bits = message_bits(message)
    width, height = image.size
    capacity = watermark_capacity(width, height)
    if capacity < len(bits):
        log.debug(
            "image %dx%d has %d watermark blocks, fewer than the %d bits: left unmarked",
            width,
            height,
            capacity,
            len(bits),
        )
        return image
    if width * height < REFERENCE_MIN_PIXELS:
        log.debug(
            "image %dx%d is marked for kuas' detector; the reference library refuses images under 256x256",
            width,
            height,
        )

    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else None
    rgb = _rgb_array(image)
    h, w = _cropped(rgb)
    region = rgb[:h, :w].astype(np.float64)
    b, g = region[..., 2], region[..., 1]
    up, down = _u_room(b, g)
    ll = _haar_ll(_u_channel(rgb[:h, :w]))
    blocks, rows, cols = _blocks(ll)
    room_up, _, _ = _blocks(_pair_sum(up) / 2)
    room_down, _, _ = _blocks(_pair_sum(down) / 2)
    delta_blocks, stuck = _embed_blocks(blocks, room_up, room_down, bits)
    if stuck:
        log.debug("watermark: %d of %d blocks left unchanged: no reachable level", stuck, len(blocks))
    delta_ll = _unblocks(delta_blocks, rows, cols, ll.shape)

    # Spread each LL change over its 2x2 pixels in proportion to each pixel's room: LL = (sum of U) / 2.
    delta_px = np.repeat(np.repeat(delta_ll, 2, 0), 2, 1)
    room = np.where(delta_px >= 0, up, down)
    room_sum = np.repeat(np.repeat(_pair_sum(room), 2, 0), 2, 1)
    share = np.divide(room, room_sum, out=np.zeros_like(room), where=room_sum > 0)
    delta_b, delta_g = _pixel_change(2 * delta_px * share, b, g)
    out = rgb.copy()
    out[:h, :w, 2] = np.clip(np.rint(b + delta_b), 0, 255).astype(np.uint8)
    out[:h, :w, 1] = np.clip(np.rint(g + delta_g), 0, 255).astype(np.uint8)

    marked = Image.fromarray(out, "RGB")
    if alpha is not None:
        marked.putalpha(alpha)
    marked.info.update(image.info)
    return marked

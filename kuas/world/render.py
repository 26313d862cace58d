"""Rendering scenes to images and to the control maps ControlNet and depth2img train on.

Images are drawn at `SUPERSAMPLE` times the target size with Pillow and box-downscaled, which gives
anti-aliased but crisp edges; the result depends only on the scene and the size (deterministic bytes).
Gradient backgrounds run vertically from 25% lighter (top) to 25% darker (bottom) than the colour.

The maps share the scene's geometry:
  * `render_segmentation`: a palette ("P") image whose pixel values are 0 for background and i + 1
    for `scene.objects[i]` (the object covering most of the pixel, occlusion included).
  * `render_depth`: 8-bit grey, background 0 and objects brighter the nearer they are (drawing order).
  * `render_edges`: white 1-px lines on black where the segmentation label changes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from kuas.errors import InvalidInputError
from kuas.world.scene import GRADIENT_AMOUNT, PALETTE, Obj, Scene

SUPERSAMPLE = 4
DEPTH_FRONT = 255  # depth value of the frontmost layer
DEPTH_STEP = 48  # each layer further back is this much darker

# Colours of segmentation labels 0..(len-1) when viewed as an image (label 0, background, is black).
_SEG_COLORS = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
]


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise InvalidInputError(f"render size must be an integer >= 16, got {size!r}")
    return int(size)


def background_array(scene: Scene, size: int) -> np.ndarray:
    """The background alone as a float (size, size, 3) sRGB array in 0..255 (a plain colour or the
    vertical gradient sampled at pixel centres)."""
    color = np.asarray(PALETTE[scene.background], dtype=np.float64)
    if scene.background_style == "plain":
        return np.broadcast_to(color, (size, size, 3)).copy()
    if scene.background_style != "gradient":
        raise InvalidInputError(f"unknown background style {scene.background_style!r}; use plain or gradient")
    top = color + (255.0 - color) * GRADIENT_AMOUNT
    bottom = color * (1.0 - GRADIENT_AMOUNT)
    t = (np.arange(size) + 0.5) / size
    col = top[None, :] * (1 - t[:, None]) + bottom[None, :] * t[:, None]
    return np.broadcast_to(col[:, None, :], (size, size, 3)).copy()


def _background_image(scene: Scene, size: int) -> Image.Image:
    color = PALETTE[scene.background]
    if scene.background_style == "plain":
        return Image.new("RGB", (size, size), color)
    # A one-pixel-wide column resized with NEAREST keeps the per-row values exactly.
    column = background_array(scene, size)[:, :1, :]
    return Image.fromarray(np.round(column).astype(np.uint8), "RGB").resize((size, size), Image.NEAREST)


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, size: int, fill) -> None:
    if obj.shape == "circle":
        cx, cy = obj.center[0] * size - 0.5, obj.center[1] * size - 0.5
        r = obj.radius * size
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pts = obj.outline(size) - 0.5  # pixel k covers [k, k+1): its centre is k + 0.5
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=fill)


def _ordered(scene: Scene) -> list[tuple[int, Obj]]:
    """Objects with their scene index, back to front (stable for equal depths)."""
    return sorted(enumerate(scene.objects), key=lambda t: t[1].depth)


def render(scene: Scene, size: int = 128) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels, anti-aliased by 4x supersampling."""
    size = _check_size(size)
    big = size * SUPERSAMPLE
    img = _background_image(scene, big)
    draw = ImageDraw.Draw(img)
    for _, obj in _ordered(scene):
        _draw_object(draw, obj, big, PALETTE[obj.color])
    return img.reduce(SUPERSAMPLE)


def segmentation_labels(scene: Scene, size: int = 128) -> np.ndarray:
    """(size, size) uint8 labels: 0 background, i + 1 where `scene.objects[i]` covers most of the pixel."""
    size = _check_size(size)
    big = size * SUPERSAMPLE
    lab = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(lab)
    for i, obj in _ordered(scene):
        _draw_object(draw, obj, big, i + 1)
    # Count each label's subpixels per output pixel in one pass (bincount over pixel * k + label); argmax
    # then takes the most common label, the lowest one on a tie.
    k = len(scene.objects) + 1
    sub = SUPERSAMPLE * SUPERSAMPLE
    blocks = np.asarray(lab).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).transpose(0, 2, 1, 3).reshape(-1, sub)
    keys = blocks + (np.arange(size * size, dtype=np.int64) * k)[:, None]
    counts = np.bincount(keys.ravel(), minlength=size * size * k).reshape(size, size, k)
    return counts.argmax(axis=2).astype(np.uint8)


def render_segmentation(scene: Scene, size: int = 128) -> Image.Image:
    """Segmentation as a palette image: `np.asarray(img)` gives the labels (0 = background)."""
    labels = segmentation_labels(scene, size)
    img = Image.fromarray(labels, "P")
    flat = [v for i in range(256) for v in _SEG_COLORS[i % len(_SEG_COLORS)]]
    img.putpalette(flat)
    return img


def render_depth(scene: Scene, size: int = 128) -> Image.Image:
    """Depth as an 8-bit grey image, nearer = brighter: background 0, the frontmost object 255 and
    each layer behind it `DEPTH_STEP` darker."""
    labels = segmentation_labels(scene, size)
    depths = [o.depth for o in scene.objects]
    front = max(depths, default=0)
    lut = np.zeros(256, dtype=np.uint8)
    for i, d in enumerate(depths):
        lut[i + 1] = max(1, DEPTH_FRONT - DEPTH_STEP * (front - d))
    return Image.fromarray(lut[labels], "L")


def render_edges(scene: Scene, size: int = 128) -> Image.Image:
    """Object outlines as white (255) 1-px lines on black: pixels whose right or lower neighbour has
    a different segmentation label."""
    labels = segmentation_labels(scene, size)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return Image.fromarray(np.where(edge, 255, 0).astype(np.uint8), "L")

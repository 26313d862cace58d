"""Outpainting: extend a picture by some pixels on any side and let the model continue it.

    images = outpaint(sd, "a wide beach", "photo.png", left=128, right=128, seed=3)

1. The canvas grows by left / right / top / bottom pixels (each side grown further, by at most 7 pixels,
   so that the canvas is a multiple of 8; right / bottom first).
2. The new area starts as the picture's border pixels stretched outwards, then gets `fill`: "fill"
   (A1111's blur fill, as its "Poor man's outpainting"), "edge" (the stretched pixels as they are),
   "latent noise" or "latent nothing".
3. The repaint mask is the new area plus an `overlap` strip of the original along each extended side,
   blurred by `mask_blur`: the model redraws across the seam so that the new part continues the old one.
4. Inpainting runs on the whole canvas (see `kuas.pipelines.inpaint`); at the end the original picture is
   pasted back over its region exactly, so only the new area changes (with watermark=False, bit for bit).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from torch import Tensor

from kuas.errors import InvalidInputError
from kuas.images.io import load_image
from kuas.pipelines.common import StepCallback
from kuas.pipelines.inpaint import run_inpaint
from kuas.pipelines.types import OutpaintRequest, check_size
from kuas.prompts.parser import EmbeddingRegistry

if TYPE_CHECKING:  # pragma: no cover
    from kuas.stable_diffusion import StableDiffusion

__all__ = ["extend_canvas", "outpaint", "padded_extents"]


def padded_extents(
    width: int, height: int, left: int, right: int, top: int, bottom: int, multiple: int = 8
) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) grown so that the canvas is a multiple of `multiple` on both sides: the
    missing pixels go to the right (bottom) unless only the left (top) was extended."""
    extra_x = -(width + left + right) % multiple
    extra_y = -(height + top + bottom) % multiple
    if right or not left:
        right += extra_x
    else:
        left += extra_x
    if bottom or not top:
        bottom += extra_y
    else:
        top += extra_y
    return left, right, top, bottom


def extend_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int
) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(canvas with the border pixels stretched over the new area, mask of the new area (255),
    mask of the new area only for the final paste)."""
    pixels = np.asarray(image.convert("RGB"))
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    new_area = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    new_area[top : top + image.height, left : left + image.width] = 0
    new_area_image = Image.fromarray(new_area, "L")
    return Image.fromarray(canvas, "RGB"), new_area_image, new_area_image.copy()


def _repaint_mask(
    new_area: Image.Image, box: tuple[int, int, int, int], sides: dict[str, int], overlap: int
) -> Image.Image:
    """The new area plus an `overlap`-pixel strip of the original along every extended side."""
    mask = np.asarray(new_area).copy()
    x1, y1, x2, y2 = box
    if overlap:
        if sides["left"]:
            mask[y1:y2, x1 : x1 + overlap] = 255
        if sides["right"]:
            mask[y1:y2, max(x1, x2 - overlap) : x2] = 255
        if sides["top"]:
            mask[y1 : y1 + overlap, x1:x2] = 255
        if sides["bottom"]:
            mask[max(y1, y2 - overlap) : y2, x1:x2] = 255
    return Image.fromarray(mask, "L")


def outpaint(
    sd: StableDiffusion,
    prompt: str | list[str],
    image: Any,
    *,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    fill: str = "fill",
    overlap: int = 8,
    mask_blur: int = 4,
    strength: float = 0.8,
    latent_blend: bool = True,
    negative_prompt: str | list[str] = "",
    steps: int = 20,
    cfg_scale: float = 7.0,
    sampler: str = "Euler a",
    scheduler: str = "Automatic",
    seed: int = -1,
    batch_size: int = 1,
    batch_count: int = 1,
    subseed: int = -1,
    subseed_strength: float = 0.0,
    clip_skip: int = 1,
    guidance_rescale: float = 0.0,
    skip_early_cfg: float = 0.0,
    eta: float | None = None,
    vae_tiling: bool | None = None,
    emphasis: str = "Original",
    noise_schedule: str | None = None,
    tome_ratio: float = 0.0,
    deepcache_interval: int = 1,
    embeddings: EmbeddingRegistry | None = None,
    noise: Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    watermark: bool = True,
) -> list[Image.Image]:
    """Extend `image` (path, bytes or PIL image) by left / right / top / bottom pixels; the output is the
    whole canvas (a multiple of 8 on each side). Other arguments (prompt language, `emphasis`, `embeddings`)
    as `inpaint` and the module docstring."""
    init = load_image(image, what="image to outpaint")
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"{name} must be a whole number of pixels >= 0, got {value!r}")
    left, right, top, bottom = padded_extents(init.width, init.height, left, right, top, bottom, sd.vae_scale)
    width, height = init.width + left + right, init.height + top + bottom
    check_size(width, height, what="outpainted canvas", multiple=sd.vae_scale)
    canvas, new_area, keep_mask = extend_canvas(init, left, right, top, bottom)
    box = (left, top, left + init.width, top + init.height)
    request = OutpaintRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        cfg_scale=cfg_scale,
        sampler=sampler,
        scheduler=scheduler,
        seed=seed,
        subseed=subseed,
        subseed_strength=subseed_strength,
        batch_size=batch_size,
        batch_count=batch_count,
        clip_skip=clip_skip,
        guidance_rescale=guidance_rescale,
        skip_early_cfg=skip_early_cfg,
        eta=eta,
        vae_tiling=vae_tiling,
        watermark=watermark,
        strength=strength,
        mask_blur=mask_blur,
        latent_blend=latent_blend,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        overlap=overlap,
        inpainting_fill=fill,
        emphasis=emphasis,
        noise_schedule=noise_schedule,
        tome_ratio=tome_ratio,
        deepcache_interval=deepcache_interval,
    )
    grown = {"left": left, "right": right, "top": top, "bottom": bottom}
    request = dataclasses.replace(request, mask=_repaint_mask(new_area, box, grown, request.overlap))
    inpaint_fill = "original" if request.inpainting_fill == "edge" else request.inpainting_fill
    extra = {"Outpaint": f"left {left} right {right} top {top} bottom {bottom}"}
    return run_inpaint(
        sd,
        request,
        canvas,
        request.mask,
        overlay_mask=keep_mask,
        fill=inpaint_fill,
        extra_fields=extra,
        noise=noise,
        callback=callback,
        progress=progress,
        embeddings=embeddings,
    )

"""Inpainting: repaint the white part of a mask, keep the rest of the picture exactly.

    images = inpaint(sd, "a red hat", "photo.png", "mask.png", strength=0.75, mask_blur=4)

How (A1111's img2img-with-mask, step by step):

1. The mask (white = repaint; `invert_mask` flips it) is blurred by a Gaussian of `mask_blur` pixels.
2. "Whole picture": picture and mask are resized to width x height. "Only masked" (`inpaint_full_res`): the
   box around the mask, grown by `inpaint_full_res_padding` and to the working aspect ratio, is cut out and
   resized to width x height, so the masked area gets the model's full resolution.
3. Masked content (`inpainting_fill`): "original" keeps the picture under the mask as the starting point,
   "fill" replaces it by colours blurred in from around it, "latent noise" / "latent nothing" replace its
   latents by noise / zeros.
4. Sampling is img2img from those latents. A 9-channel inpainting model also sees cat([mask, VAE(masked
   picture)]) as extra input channels. With `latent_blend` (default, as A1111 does for every model) the
   prediction outside the mask is replaced by the original latents each step, so a plain 4-channel model
   inpaints too.
5. The result is decoded, pasted back (for "only masked", scaled to the box), and composited over the
   original through the blurred mask (doubled for "whole picture", as A1111's overlay): where the blurred
   mask is 0 the original pixels come back unchanged. The invisible watermark (on by default; pictures
   smaller than about 96x96 are left unmarked) then changes some blue/green values slightly: pass
   watermark=False for outputs whose kept pixels must equal the input's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from kuas.errors import InvalidInputError
from kuas.images.infotext import format_infotext
from kuas.images.io import load_image, load_mask
from kuas.pipelines.common import (
    Progress,
    PromptNotes,
    StepCallback,
    batch_noise,
    batches,
    check_noise,
    check_request_for_model,
    decode_latents,
    default_size,
    encode_images,
    finish_images,
    image_seeds,
    images_to_tensor,
    img2img_sigmas,
    infotext_fields,
    inpainting_concat,
    latent_shape,
    resize_image,
    sample_batch,
    sampling_sigmas,
    seamless_tiling,
    tensor_to_images,
)
from kuas.pipelines.img2img import image_size_default
from kuas.pipelines.types import InpaintRequest
from kuas.prompts.parser import EmbeddingRegistry

if TYPE_CHECKING:  # pragma: no cover
    from kuas.stable_diffusion import StableDiffusion

__all__ = ["blur_fill", "blur_mask", "crop_region", "expand_region", "inpaint", "run_inpaint"]


# -- mask and picture preparation ---------------------------------------------------------------------------
def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """Gaussian blur with standard deviation `radius` pixels over a window of 2 * int(2.5 * radius + 0.5) + 1
    (A1111's window), mirrored at the borders; radius 0 returns the mask unchanged."""
    if radius <= 0:
        return mask.copy()
    half = int(2.5 * radius + 0.5)
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / radius) ** 2)
    taps /= taps.sum()
    out = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        mode = "reflect" if out.shape[axis] > 1 else "edge"
        padded = np.pad(out, pad, mode=mode)
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, weight in enumerate(taps):
            acc += weight * (padded[:, k : k + n] if axis == 1 else padded[k : k + n, :])
        out = acc
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def crop_region(mask: np.ndarray, padding: int = 0) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the smallest box holding every non-zero mask pixel, grown by `padding` and clipped
    to the picture."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise InvalidInputError("the mask is all black: nothing to repaint")
    h, w = mask.shape
    return (
        max(int(xs.min()) - padding, 0),
        max(int(ys.min()) - padding, 0),
        min(int(xs.max()) + 1 + padding, w),
        min(int(ys.max()) + 1 + padding, h),
    )


def _grow(lo: int, hi: int, target: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) around its centre to `target` long, shifted (then clipped) to fit in [0, limit)."""
    extra = target - (hi - lo)
    lo -= extra // 2
    hi += extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def expand_region(
    region: tuple[int, int, int, int], width: int, height: int, image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """Grow a crop box to the working aspect ratio width / height, inside the picture (as A1111's
    "only masked"), so that scaling it to width x height does not distort it."""
    x1, y1, x2, y2 = region
    box_ratio = (x2 - x1) / (y2 - y1)
    ratio = width / height
    if box_ratio > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio), image_width)
    return x1, y1, x2, y2


def blur_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area gets the colours around it, by compositing ever sharper blurs of the
    unmasked picture (radii 256, 64, 16, 4, 2, 0) on top of each other."""
    kept = image.convert("RGBA")
    kept.putalpha(ImageOps.invert(mask.convert("L")))
    premultiplied = kept.convert("RGBa")  # blur colour weighted by how much of it is kept
    canvas = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            canvas.alpha_composite(layer)
    return canvas.convert("RGB")


def composite(
    base: Image.Image,
    generated: Image.Image,
    overlay_mask: Image.Image,
    box: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """`generated` over `base` through `overlay_mask` (255 = generated, 0 = base exactly); with `box`, the
    generated picture is first scaled into that box of `base` (crop-and-resize, as A1111 pastes back)."""
    if box is not None:
        x1, y1, x2, y2 = box
        canvas = base.copy()
        canvas.paste(resize_image(generated, x2 - x1, y2 - y1, "crop and resize"), (x1, y1))
        generated = canvas
    a = np.asarray(base.convert("RGB"), dtype=np.float32)
    b = np.asarray(generated.convert("RGB"), dtype=np.float32)
    m = np.asarray(overlay_mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    out = np.clip(np.rint(a + (b - a) * m), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


@dataclass
class _Prepared:
    """The picture as the sampler sees it and how to put the result back."""

    work_image: Image.Image  # width x height, masked content filled
    work_mask: Image.Image  # width x height, blurred, L
    base: Image.Image  # what the result is composited over (the original, or its resized copy)
    overlay_mask: Image.Image  # base-sized, 255 = take the generated pixel
    box: tuple[int, int, int, int] | None  # "only masked": where the work area sits in base


def prepare(
    request: InpaintRequest,
    image: Image.Image,
    mask: Image.Image,
    overlay_mask: Image.Image | None = None,
    fill: str | None = None,
) -> _Prepared:
    """Blur, crop or resize, fill: steps 1-3 of the module docstring (`fill` overrides the request's)."""
    w, h = request.width, request.height
    blurred = blur_mask(mask, request.mask_blur)
    if request.inpaint_full_res:
        box = crop_region(np.asarray(blurred), request.inpaint_full_res_padding)
        box = expand_region(box, w, h, image.width, image.height)
        work_mask = resize_image(blurred.crop(box), w, h, "resize and fill")
        work_image = resize_image(image.crop(box), w, h, "resize and fill")
        base, overlay = image, blurred
    else:
        box = None
        work_mask = resize_image(blurred, w, h, request.resize_mode)
        work_image = resize_image(image, w, h, request.resize_mode)
        base = work_image
        overlay = work_mask.point(lambda v: min(255, 2 * v))  # A1111 doubles the blurred mask here
    if overlay_mask is not None:
        if overlay_mask.size != base.size:
            raise InvalidInputError(f"overlay mask {overlay_mask.size} must match the picture {base.size}")
        overlay = overlay_mask
    if (fill or request.inpainting_fill) != "original":
        work_image = blur_fill(work_image, work_mask)
    return _Prepared(work_image, work_mask, base, overlay, box)


def _latent_mask(work_mask: Image.Image, shape: tuple[int, ...]) -> Tensor:
    """The blend mask at latent size: the blurred mask resized (bicubic) and rounded to 0 / 1, (1, 1, h, w)."""
    small = work_mask.resize((shape[2], shape[1]), Image.Resampling.BICUBIC)
    values = np.rint(np.asarray(small, dtype=np.float32) / 255.0)
    return torch.from_numpy(values)[None, None]


# -- pipeline -----------------------------------------------------------------------------------------------
def inpaint(
    sd: StableDiffusion,
    prompt: str | list[str],
    image: Any,
    mask: Any,
    *,
    negative_prompt: str | list[str] = "",
    strength: float = 0.75,
    mask_blur: int = 4,
    inpainting_fill: str | int = "original",
    inpaint_full_res: bool = False,
    inpaint_full_res_padding: int = 32,
    invert_mask: bool = False,
    latent_blend: bool = True,
    resize_mode: str | int = "just resize",
    steps: int = 20,
    cfg_scale: float = 7.0,
    sampler: str = "Euler a",
    scheduler: str = "Automatic",
    seed: int = -1,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
    batch_count: int = 1,
    subseed: int = -1,
    subseed_strength: float = 0.0,
    clip_skip: int = 1,
    guidance_rescale: float = 0.0,
    skip_early_cfg: float = 0.0,
    eta: float | None = None,
    tiling: bool = False,
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
    """Repaint the white area of `mask` in `image` (paths, bytes or PIL images; a mask of another size is
    resized to the image's, with a log note).

    width / height: the working size; default the image's size rounded down to a multiple of 8, or for
    "only masked" the model's native size. The output has the working size, except for "only masked",
    where it has the input's size. Other arguments (prompt language, `emphasis`, `embeddings`) as `img2img`
    and the module docstring.
    """
    init = load_image(image, what="init image")
    mask_image = load_mask(mask, size=init.size, what="mask")
    if not isinstance(invert_mask, bool):
        raise InvalidInputError(f"invert_mask must be True or False, got {invert_mask!r}")
    if invert_mask:
        mask_image = ImageOps.invert(mask_image)
    if inpaint_full_res is True:
        default_w, default_h = default_size(sd)
    else:
        default_w, default_h = image_size_default(init, sd.vae_scale)
    request = InpaintRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=default_w if width is None else width,
        height=default_h if height is None else height,
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
        tiling=tiling,
        vae_tiling=vae_tiling,
        watermark=watermark,
        strength=strength,
        resize_mode=resize_mode,
        mask=mask_image,
        mask_blur=mask_blur,
        inpainting_fill=inpainting_fill,
        inpaint_full_res=inpaint_full_res,
        inpaint_full_res_padding=inpaint_full_res_padding,
        latent_blend=latent_blend,
        emphasis=emphasis,
        noise_schedule=noise_schedule,
        tome_ratio=tome_ratio,
        deepcache_interval=deepcache_interval,
    )
    return run_inpaint(
        sd,
        request,
        init,
        mask_image,
        noise=noise,
        callback=callback,
        progress=progress,
        embeddings=embeddings,
    )


def run_inpaint(
    sd: StableDiffusion,
    request: InpaintRequest,
    image: Image.Image,
    mask: Image.Image,
    *,
    overlay_mask: Image.Image | None = None,
    fill: str | None = None,
    extra_fields: dict[str, Any] | None = None,
    noise: Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    embeddings: EmbeddingRegistry | None = None,
) -> list[Image.Image]:
    """Inpainting for a validated request, an RGB picture and its L mask (same size, white = repaint).

    overlay_mask: replaces the blurred mask in the final composite (outpainting keeps its original region
    exactly this way). fill: the masked-content mode, when the request's names another kind of fill.
    """
    check_request_for_model(sd, request, embeddings)
    if image.size != mask.size:
        raise InvalidInputError(f"picture {image.size} and mask {mask.size} must have the same size")
    fill = fill or request.inpainting_fill
    spec, schedule_key = request.sampler_spec()
    shape = latent_shape(sd, request.width, request.height)
    user_noise = check_noise(noise, request.image_count, shape)
    seeds, subseeds = image_seeds(
        request.seed, request.subseed, request.subseed_strength, request.image_count
    )
    prepared = prepare(request, image, mask, overlay_mask, fill)
    full = sampling_sigmas(sd, spec, schedule_key, request.steps, noise_schedule=request.noise_schedule)
    sigmas = img2img_sigmas(full, request.steps, request.strength)
    extra = {
        "Denoising strength": float(request.strength),
        "Mask blur": request.mask_blur,
        "Inpaint area": "Only masked" if request.inpaint_full_res else None,
        "Masked area padding": request.inpaint_full_res_padding if request.inpaint_full_res else None,
        **(extra_fields or {}),
    }
    tracker = Progress((len(sigmas) - 1) * request.batch_count, callback, progress)
    notes = PromptNotes(request.image_count)
    images: list[Image.Image] = []
    texts: list[str] = []
    try:
        with torch.no_grad(), seamless_tiling(sd.unet, sd.vae, enabled=request.tiling):
            pixels = images_to_tensor([prepared.work_image])
            init_latent = encode_images(sd, pixels)
            latent_mask = _latent_mask(prepared.work_mask, shape).to(init_latent)
            c_concat = None
            if sd.family.is_inpainting:
                binary = np.rint(np.asarray(prepared.work_mask, dtype=np.float32) / 255.0)
                c_concat = inpainting_concat(sd, pixels, torch.from_numpy(binary)[None, None], shape[1:], 1)
            for batch in batches(request, seeds, subseeds):
                rng, x_noise = batch_noise(request, batch, shape, user_noise)
                init = init_latent.expand(batch.size, -1, -1, -1)
                if fill == "latent noise":  # A1111 uses the image's own seeded noise here
                    init = init * (1 - latent_mask) + x_noise.to(init) * latent_mask
                elif fill == "latent nothing":
                    init = init * (1 - latent_mask)
                start = None if request.strength == 1.0 else init
                blend = (init, latent_mask) if request.latent_blend else None
                cc = None if c_concat is None else c_concat.expand(batch.size, -1, -1, -1)
                latents = sample_batch(
                    sd,
                    request,
                    batch,
                    spec=spec,
                    sigmas=sigmas,
                    rng=rng,
                    noise=x_noise,
                    width=request.width,
                    height=request.height,
                    init_latent=start,
                    c_concat=cc,
                    blend=blend,
                    progress=tracker,
                    embeddings=embeddings,
                    notes=notes,
                )
                for generated in tensor_to_images(decode_latents(sd, latents, tiled=request.decode_tiling)):
                    images.append(composite(prepared.base, generated, prepared.overlay_mask, prepared.box))
                for i in range(batch.size):
                    fields = infotext_fields(
                        sd,
                        request,
                        seed=batch.seeds[i],
                        subseed=batch.subseeds[i],
                        spec=spec,
                        schedule_key=schedule_key,
                        extra=extra,
                    )
                    texts.append(format_infotext(batch.prompts[i], batch.negative_prompts[i], fields))
    finally:
        tracker.close()
    return finish_images(images, texts, watermark=request.watermark, notes=notes)

"""img2img: repaint a picture guided by a prompt; `strength` says how much of it may change.

    images = img2img(sd, "a watercolour", "photo.png", strength=0.6, steps=30, seed=7)

strength s with n steps runs the last int(n * s) steps of the n-step schedule, starting from the picture's
latents plus noise at that step's sigma (diffusers' count; A1111 runs one step more). strength 1 starts
from pure noise (diffusers' convention; A1111 still adds the picture's latents, about 1/sigma_max = 7% of
the start); strength 0 runs nothing and returns the input resized to width x height, pixel for pixel
(no VAE round trip).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from kuas.errors import InvalidInputError
from kuas.images.infotext import format_infotext
from kuas.images.io import load_image
from kuas.pipelines.common import (
    Progress,
    PromptNotes,
    StepCallback,
    batch_noise,
    batches,
    check_noise,
    check_request_for_model,
    decode_latents,
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
from kuas.pipelines.types import Img2ImgRequest
from kuas.prompts.parser import EmbeddingRegistry

if TYPE_CHECKING:  # pragma: no cover
    from kuas.stable_diffusion import StableDiffusion

__all__ = ["image_size_default", "img2img", "load_init_images"]


def load_init_images(image: Any, batch_size: int) -> list[Image.Image]:
    """One init image (path, bytes or PIL image) for every batch item, or a list of batch_size of them."""
    if isinstance(image, (list, tuple)):
        if len(image) not in (1, batch_size):
            raise InvalidInputError(
                f"got {len(image)} init images for batch_size={batch_size}: pass one image "
                f"or exactly batch_size of them"
            )
        loaded = [load_image(im, what=f"init image {i + 1}") for i, im in enumerate(image)]
        if len({im.size for im in loaded}) > 1:
            raise InvalidInputError(
                f"init images have different sizes {[im.size for im in loaded]}; pass "
                f"images of one size (or resize them first)"
            )
        return loaded
    return [load_image(image, what="init image")]


def image_size_default(image: Image.Image, multiple: int) -> tuple[int, int]:
    """The image's size rounded down to a multiple of the VAE factor (at least one block)."""
    return (
        max(multiple, image.width // multiple * multiple),
        max(multiple, image.height // multiple * multiple),
    )


def img2img(
    sd: StableDiffusion,
    prompt: str | list[str],
    image: Any,
    *,
    negative_prompt: str | list[str] = "",
    strength: float = 0.75,
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
    """Repaint `image` (path, bytes, PIL image, or a list of batch_size of them) at width x height (default:
    the image's size rounded down to a multiple of 8), resized by `resize_mode` ("just resize", "crop and
    resize", "resize and fill" or 0 / 1 / 2). Other arguments (prompt language, `emphasis`, `embeddings`)
    as `txt2img`; prompt schedules ([a:b:when]) are written for `steps` and, as in A1111, count from 0 on
    the first step that runs."""
    init_images = load_init_images(image, batch_size)
    default_w, default_h = image_size_default(init_images[0], sd.vae_scale)
    request = Img2ImgRequest(
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
        emphasis=emphasis,
        noise_schedule=noise_schedule,
        tome_ratio=tome_ratio,
        deepcache_interval=deepcache_interval,
    )
    return run_img2img(
        sd, request, init_images, noise=noise, callback=callback, progress=progress, embeddings=embeddings
    )


def run_img2img(
    sd: StableDiffusion,
    request: Img2ImgRequest,
    init_images: Sequence[Image.Image],
    *,
    noise: Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    embeddings: EmbeddingRegistry | None = None,
) -> list[Image.Image]:
    """img2img for a validated request and loaded RGB init images (one, or one per batch item)."""
    check_request_for_model(sd, request, embeddings)
    spec, schedule_key = request.sampler_spec()
    shape = latent_shape(sd, request.width, request.height)
    user_noise = check_noise(noise, request.image_count, shape)
    seeds, subseeds = image_seeds(
        request.seed, request.subseed, request.subseed_strength, request.image_count
    )
    resized = [resize_image(im, request.width, request.height, request.resize_mode) for im in init_images]
    extra = {"Denoising strength": float(request.strength)}
    if request.strength == 0:
        return _unchanged(sd, request, resized, seeds, subseeds, spec, schedule_key, extra)

    full = sampling_sigmas(sd, spec, schedule_key, request.steps, noise_schedule=request.noise_schedule)
    sigmas = img2img_sigmas(full, request.steps, request.strength)
    tracker = Progress((len(sigmas) - 1) * request.batch_count, callback, progress)
    notes = PromptNotes(request.image_count)
    images: list[Image.Image] = []
    texts: list[str] = []
    try:
        with torch.no_grad(), seamless_tiling(sd.unet, sd.vae, enabled=request.tiling):
            init_latents = encode_images(sd, images_to_tensor(resized))
            for batch in batches(request, seeds, subseeds):
                rng, x_noise = batch_noise(request, batch, shape, user_noise)
                init = init_latents.expand(batch.size, -1, -1, -1)
                c_concat = None
                if sd.family.is_inpainting:  # no mask: the whole picture may change (A1111)
                    c_concat = inpainting_concat(sd, None, None, (shape[1], shape[2]), batch.size)
                start = None if request.strength == 1.0 else init
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
                    c_concat=c_concat,
                    progress=tracker,
                    embeddings=embeddings,
                    notes=notes,
                )
                images += tensor_to_images(decode_latents(sd, latents, tiled=request.decode_tiling))
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


def _unchanged(sd, request, resized, seeds, subseeds, spec, schedule_key, extra) -> list[Image.Image]:
    """strength 0: every image is its (resized) input, unchanged (its prompt's extra-network tags are still
    reported as not applied)."""
    images, texts = [], []
    prompts, negatives = request.prompts_for("prompt"), request.prompts_for("negative_prompt")
    notes = PromptNotes(request.image_count)
    for i in range(request.image_count):
        notes.add_unsampled(i, prompts[i])
        images.append(resized[i % request.batch_size % len(resized)].copy())
        fields = infotext_fields(
            sd, request, seed=seeds[i], subseed=subseeds[i], spec=spec, schedule_key=schedule_key, extra=extra
        )
        texts.append(format_infotext(prompts[i], negatives[i], fields))
    return finish_images(images, texts, watermark=request.watermark, notes=notes)

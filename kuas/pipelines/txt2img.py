"""txt2img: prompts to pictures, with A1111's controls (seeds, variation seeds, hires fix, tiling, CLIP skip).

images = txt2img(sd, "a red circle", steps=20, sampler="DPM++ 2M", scheduler="Karras", seed=1)
images[0].info["parameters"]   # the A1111 infotext: prompt, then "Steps: 20, Sampler: DPM++ 2M, ..."
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kuas.images.infotext import format_infotext
from kuas.pipelines.common import (
    Batch,
    ImageNoise,
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
    sample_batch,
    sampling_sigmas,
    seamless_tiling,
    tensor_to_images,
)
from kuas.pipelines.types import HR_UPSCALERS, Txt2ImgRequest
from kuas.prompts.parser import EmbeddingRegistry
from kuas.sampling.registry import SamplerSpec

if TYPE_CHECKING:  # pragma: no cover
    from kuas.stable_diffusion import StableDiffusion

__all__ = ["txt2img"]


def txt2img(
    sd: StableDiffusion,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] = "",
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
    enable_hr: bool = False,
    hr_scale: float = 2.0,
    hr_second_pass_steps: int = 0,
    hr_denoising_strength: float = 0.7,
    hr_upscaler: str = "Latent",
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
    """Generate batch_size * batch_count images; each carries its A1111 infotext in ``.info["parameters"]``.

    width / height default to the model's native size (ModelSpec resolution, else the family's). seed -1
    draws a random seed, written to the infotext. With `enable_hr` a second img2img pass runs at
    `hr_scale` times the size (`hr_upscaler`: "Latent" modes resize the latents, "Lanczos" / "Nearest"
    resize decoded pixels) for the last int(steps2 * hr_denoising_strength) of steps2 =
    hr_second_pass_steps or steps. `noise`: initial noise (images, C, height / 8, width / 8) instead of the
    seeded draw (like diffusers' `latents=`). `callback(step, total, x0)` returning False (or raising
    `SamplingInterrupted`) stops sampling; `SamplingInterrupted` then reaches the caller.

    Prompts and negative prompts are read in A1111's prompt language (weights, any length, BREAK,
    [a:b:when], [a|b], AND, `<lora:...>` tags); `emphasis` is A1111's setting ("Original", "No norm",
    "Ignore", "None"), `embeddings` a `kuas.prompts.EmbeddingRegistry` whose names the prompts may use.
    What could not be honoured (extra networks kuas cannot load yet, malformed syntax) is logged and listed
    in each image's ``.info["kuas_notes"]`` (see `kuas.pipelines.common`).

    Opt-in speedups with a small quality cost (`kuas.speedups`; written to the infotext when on):
    `tome_ratio` merges that fraction of the full-resolution tokens before self-attention (ToMe; 0.3-0.5
    is useful), `deepcache_interval` N runs the whole U-Net only every N-th step and reuses its deep
    features in between (DeepCache; 2-3 is useful). How the model runs (dtype, layout, threads, lowvram)
    is `sd.runtime`, chosen at load.
    """
    native_w, native_h = default_size(sd)
    request = Txt2ImgRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=native_w if width is None else width,
        height=native_h if height is None else height,
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
        enable_hr=enable_hr,
        hr_scale=hr_scale,
        hr_second_pass_steps=hr_second_pass_steps,
        hr_denoising_strength=hr_denoising_strength,
        hr_upscaler=hr_upscaler,
        emphasis=emphasis,
        noise_schedule=noise_schedule,
        tome_ratio=tome_ratio,
        deepcache_interval=deepcache_interval,
    )
    return run_txt2img(sd, request, noise=noise, callback=callback, progress=progress, embeddings=embeddings)


def run_txt2img(
    sd: StableDiffusion,
    request: Txt2ImgRequest,
    *,
    noise: Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    embeddings: EmbeddingRegistry | None = None,
) -> list[Image.Image]:
    """txt2img for a validated request."""
    check_request_for_model(sd, request, embeddings)
    spec, schedule_key = request.sampler_spec()
    shape = latent_shape(sd, request.width, request.height)
    user_noise = check_noise(noise, request.image_count, shape)
    seeds, subseeds = image_seeds(
        request.seed, request.subseed, request.subseed_strength, request.image_count
    )
    sigmas = sampling_sigmas(sd, spec, schedule_key, request.steps, noise_schedule=request.noise_schedule)
    hr_sigmas = None
    if request.enable_hr:
        hr_sigmas = img2img_sigmas(
            sampling_sigmas(sd, spec, schedule_key, request.hr_steps, noise_schedule=request.noise_schedule),
            request.hr_steps,
            request.hr_denoising_strength,
        )
    steps_per_batch = len(sigmas) - 1 + (0 if hr_sigmas is None else len(hr_sigmas) - 1)
    tracker = Progress(steps_per_batch * request.batch_count, callback, progress)
    extra = _hires_fields(request)
    notes = PromptNotes(request.image_count)
    images: list[Image.Image] = []
    texts: list[str] = []
    try:
        with torch.no_grad(), seamless_tiling(sd.unet, sd.vae, enabled=request.tiling):
            for batch in batches(request, seeds, subseeds):
                rng, x_noise = batch_noise(request, batch, shape, user_noise)
                c_concat = _whole_image_concat(sd, shape, batch.size)
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
                    c_concat=c_concat,
                    progress=tracker,
                    embeddings=embeddings,
                    notes=notes,
                )
                if hr_sigmas is not None:
                    latents = _hires_pass(
                        sd, request, batch, latents, spec, hr_sigmas, tracker, embeddings, notes
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


def _whole_image_concat(sd: StableDiffusion, shape: tuple[int, ...], batch: int) -> Tensor | None:
    """An inpainting model used for txt2img repaints everything: mask ones, masked image empty (A1111)."""
    if not sd.family.is_inpainting:
        return None
    return inpainting_concat(sd, None, None, (shape[1], shape[2]), batch)


def _hires_fields(request: Txt2ImgRequest) -> dict[str, Any]:
    if not request.enable_hr:
        return {}
    return {
        "Denoising strength": float(request.hr_denoising_strength),
        "Hires upscale": float(request.hr_scale),
        "Hires steps": request.hr_second_pass_steps or None,
        "Hires upscaler": request.hr_upscaler,
    }


def _hires_pass(
    sd: StableDiffusion,
    request: Txt2ImgRequest,
    batch: Batch,
    latents: Tensor,
    spec: SamplerSpec,
    sigmas: Tensor,
    tracker: Progress,
    embeddings: EmbeddingRegistry | None,
    notes: PromptNotes,
) -> Tensor:
    """A1111's hires fix: upscale the first pass (latents, or decoded pixels), then img2img at the new size
    with fresh noise from the same seeds, conditioned with the hires-pass prompt schedules."""
    width, height = request.hr_size
    shape = latent_shape(sd, width, height)
    mode = HR_UPSCALERS[request.hr_upscaler]
    if mode is not None:
        interp, antialias = mode
        latents = F.interpolate(latents.float(), size=shape[1:], mode=interp, antialias=antialias)
    else:
        resample = Image.Resampling.LANCZOS if request.hr_upscaler == "Lanczos" else Image.Resampling.NEAREST
        small = tensor_to_images(decode_latents(sd, latents, tiled=request.decode_tiling))
        latents = encode_images(sd, images_to_tensor([im.resize((width, height), resample) for im in small]))
    rng = ImageNoise(batch.seeds, batch.subseeds, request.subseed_strength)
    return sample_batch(
        sd,
        request,
        batch,
        spec=spec,
        sigmas=sigmas,
        rng=rng,
        noise=rng.first(shape),
        width=width,
        height=height,
        init_latent=latents,
        c_concat=_whole_image_concat(sd, shape, batch.size),
        progress=tracker,
        embeddings=embeddings,
        hires_steps=request.hr_steps,
        notes=notes,
    )

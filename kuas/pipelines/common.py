"""The steps every generation pipeline shares: seeds and noise, conditioning, the denoiser stack, sigmas,
VAE encode/decode (tiled when large, float32 retry on NaN), seamless tiling, progress and cancellation,
PIL conversion, infotext and watermark.

Seeds (A1111's rules, with its CPU random source):

* image i of a request uses seed + i; with a variation strength > 0 every image keeps `seed` and the
  variation seeds count up instead (subseed + i);
* image i's initial noise is ``torch.randn((C, H // 8, W // 8), generator=torch.Generator("cpu")
  .manual_seed(seed_i))``, drawn on the CPU whatever the device, then moved; the same generator then
  feeds the ancestral / SDE noise of that image, so an image never depends on its place in a batch;
* a variation seed mixes in a second noise by A1111's slerp (`slerp`).

Prompts (`guided_denoiser`, used by every pass of every pipeline):

* every prompt and negative prompt is read in A1111's prompt language (`kuas.prompts`): emphasis
  ``(x:1.3)`` under the request's `emphasis` mode, any length in 75-token chunks, ``BREAK``, editing
  ``[a:b:when]``, alternation ``[a|b]``, ``AND`` with weights, and textual-inversion names from the
  pipeline's `embeddings` registry; a plain prompt gives exactly what plain 77-token encoding gave;
* schedules are written for the request's `steps` and count from 0 on the first step a pass runs (img2img
  and inpainting run the tail of the schedule, as A1111); the hires-fix pass uses A1111's hires schedules
  (`hires_steps`: integer steps count on from the first pass, fractions above 1 cover the second pass);
* extra-network tags (``<lora:name:0.8>``, ``<hypernet:...>``) are removed from the prompt before
  encoding; kuas cannot apply them yet, so each one is logged as a warning and listed in the image's
  ``info["kuas_notes"]`` (`PromptNotes`), with the parser's other fallbacks. The infotext keeps the prompt
  exactly as given, tags and line breaks included (A1111 does the same). Negative prompts keep tags as
  text, as in A1111;
* an empty negative prompt: SD 1.x / 2.x encode "" (A1111, diffusers); SDXL (base and refiner) uses zeros
  for its text context and pooled vector, as A1111 does (and diffusers' SDXL base), while its size
  embedding in ``y`` still describes the image;
* SDXL's ``y``: original and target size = the pass's size, crop (0, 0) (`size_conditioning`); the
  refiner's aesthetic score is 6 for the prompt and 2.5 for the negative prompt;
* an inpainting model's ``c_concat`` goes to every guidance row (each AND part and the negative prompt).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from kuas.errors import InvalidInputError, KuasError
from kuas.pipelines.types import Request
from kuas.prompts.conditioning import PromptBatch
from kuas.prompts.guidance import REFINER_NEGATIVE_AESTHETIC_SCORE, PromptGuidedDenoiser, prompt_denoiser
from kuas.prompts.parser import EmbeddingRegistry, ExtraNetworkRequest, extract_extra_networks
from kuas.sampling.denoisers import EpsDenoiser, LCMDenoiser, VDenoiser
from kuas.sampling.registry import SCHEDULES, SamplerSpec, sample, sigmas_for
from kuas.sampling.samplers import BrownianNoiseSampler, SamplingInterrupted, StepInfo
from kuas.sampling.schedules import DiscreteSchedule

if TYPE_CHECKING:  # pragma: no cover
    from kuas.stable_diffusion import StableDiffusion

log = logging.getLogger(__name__)

__all__ = [
    "VAE_TILE_AUTO_PIXELS",
    "ImageNoise",
    "LatentBlend",
    "NonFiniteError",
    "Progress",
    "PromptNotes",
    "StepCallback",
    "UNetFunction",
    "build_denoiser",
    "check_embeddings",
    "check_request_for_model",
    "decode_latents",
    "default_size",
    "encode_images",
    "extra_network_note",
    "finish_images",
    "guided_denoiser",
    "image_seeds",
    "images_to_tensor",
    "img2img_sigmas",
    "infotext_fields",
    "inpainting_concat",
    "random_seed",
    "resize_image",
    "run_sampler",
    "sampling_sigmas",
    "seamless_tiling",
    "size_conditioning",
    "slerp",
    "tensor_to_images",
    "text_conditioning",
    "unet_in_float32",
]

StepCallback = Callable[[int, int, Tensor], Any]
"""``callback(step, total, latents)``: step counts from 1 over the whole request (every batch and pass),
latents is the current x0 prediction (what a preview shows). Returning False stops; so does raising
`kuas.sampling.samplers.SamplingInterrupted`."""

VAE_TILE_AUTO_PIXELS = 2048 * 2048  # decode in tiles automatically above this many output pixels
VAE_TILE_LATENT = 64  # tile side in latent pixels (512 image pixels for SD)
VAE_TILE_OVERLAP = 16  # overlap between neighbouring tiles in latent pixels, blended linearly


# -- seeds and noise ----------------------------------------------------------------------------------------
def random_seed() -> int:
    """A fresh seed for seed = -1, in A1111's range (0 .. 2**32 - 2)."""
    return secrets.randbelow(2**32 - 1)


def image_seeds(seed: int, subseed: int, subseed_strength: float, count: int) -> tuple[list[int], list[int]]:
    """(seeds, variation seeds) of `count` images, -1 replaced by a random seed (A1111's rule: seed + i,
    unless a variation strength is set, then every image shares the seed and the subseeds count up)."""
    seed = random_seed() if seed == -1 else int(seed)
    subseed = random_seed() if subseed == -1 else int(subseed)
    seeds = [seed + (i if subseed_strength == 0 else 0) for i in range(count)]
    return seeds, [subseed + i for i in range(count)]


def slerp(t: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation from `low` (t = 0) to `high` (t = 1), as A1111 mixes variation noise.

    A1111 treats each (C, H, W) noise as C * W vectors along H (it normalises along dim 1), so kuas does the
    same to reproduce its variation images; nearly parallel vectors fall back to a straight line.
    """
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(dim=1, keepdim=True)
    if float(dot.mean()) > 0.9995:
        return (1.0 - t) * low + t * high
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    return torch.sin((1.0 - t) * omega) / sin_omega * low + torch.sin(t * omega) / sin_omega * high


class ImageNoise:
    """One CPU random stream per image: the first draw is the initial noise (mixed with the variation
    noise), later draws feed the sampler's ancestral / SDE noise."""

    def __init__(
        self, seeds: Sequence[int], subseeds: Sequence[int] | None = None, subseed_strength: float = 0.0
    ):
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def first(self, shape: Sequence[int]) -> Tensor:
        """(B, *shape) float32 initial noise on the CPU."""
        out = []
        for i, g in enumerate(self.generators):
            noise = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
            if self.subseeds is not None and self.subseed_strength != 0:
                sub_g = torch.Generator("cpu").manual_seed(self.subseeds[i])
                sub = torch.randn(tuple(shape), generator=sub_g, dtype=torch.float32)
                noise = slerp(self.subseed_strength, noise, sub)
            out.append(noise)
        return torch.stack(out)

    def next(self, shape: Sequence[int]) -> Tensor:
        """(B, *shape) float32 fresh noise on the CPU, continuing each image's stream."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        )

    def sampler_noise(self, like: Tensor, prefetch: int = 0) -> Callable[[float, float], Tensor]:
        """A sampler `noise_sampler(sigma, sigma_next)` continuing these streams, on `like`'s device.

        prefetch: on an accelerator, draw that many noises up front and move them in one transfer, so the
        sampling loop does no host-to-device copy (the values and their order are the same).
        """
        ready: list[Tensor] = []
        if prefetch > 0 and like.device.type != "cpu":
            drawn = torch.stack([self.next(like.shape[1:]) for _ in range(prefetch)])
            ready = list(drawn.to(like.device, like.dtype).unbind(0))
            ready.reverse()

        def draw(sigma: float, sigma_next: float) -> Tensor:
            if ready:
                return ready.pop()
            return self.next(like.shape[1:]).to(like.device, like.dtype)

        return draw


# -- model checks and defaults ------------------------------------------------------------------------------
def default_size(sd: StableDiffusion) -> tuple[int, int]:
    """(width, height) the model was made for: ModelSpec `modelspec.resolution` ("WxH") when the file says,
    else the family's resolution (512 SD1, 768 SD2-v, 1024 SDXL)."""
    text = (sd.metadata or {}).get("modelspec.resolution", "")
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        f = sd.vae_scale
        return max(f, int(parts[0]) // f * f), max(f, int(parts[1]) // f * f)
    return sd.family.resolution, sd.family.resolution


def check_request_for_model(
    sd: StableDiffusion, request: Request, embeddings: EmbeddingRegistry | None = None
) -> None:
    """Checks that need the model: sizes fit its VAE factor, the text encoders have `clip_skip` layers,
    the family is one the pipelines can drive, `embeddings` is a registry."""
    check_embeddings(embeddings)
    if sd.family.is_depth:
        raise InvalidInputError(
            f"{sd.family.name} models are conditioned on a depth map, which kuas' pipelines "
            f"do not compute yet; use a plain or inpainting model"
        )
    factor = sd.vae_scale
    for name in ("width", "height"):
        value = getattr(request, name)
        if value % factor:
            raise InvalidInputError(
                f"{name} must be a multiple of {factor} for this model's VAE, got {value}"
            )
    for slot in sd.slots:
        sd.text_layer(slot, request.clip_skip)


# -- conditioning -------------------------------------------------------------------------------------------
# Every pipeline pass conditions the U-Net through `guided_denoiser`, the one place that turns a request's
# prompts into conditioning. See the module docstring's "Prompts" section for the rules it follows.
def check_embeddings(embeddings: EmbeddingRegistry | None) -> None:
    """`embeddings` must be a `kuas.prompts.EmbeddingRegistry` or None (checked before any work starts)."""
    if embeddings is not None and not isinstance(embeddings, EmbeddingRegistry):
        raise InvalidInputError(
            f"embeddings must be a kuas.prompts.EmbeddingRegistry (or None), got {type(embeddings).__name__}; "
            f"register textual-inversion vectors with EmbeddingRegistry().add(name, vectors)"
        )


def size_conditioning(sd: StableDiffusion, width: int, height: int) -> dict[str, Any] | None:
    """SDXL's size conditioning of a pass at width x height: original and target size (height, width), crop
    (0, 0), as A1111 sets them (its default crop options); None for families without it. The refiner's
    aesthetic score is left to `prompt_denoiser` (6 for the prompt, 2.5 for the negative prompt, A1111's
    defaults)."""
    if not sd.family.vector_conditioning:
        return None
    size = (height, width)
    return {"original_size": size, "target_size": size, "crop_top_left": (0, 0)}


def guided_denoiser(
    sd: StableDiffusion,
    request: Request,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    *,
    sigmas: Tensor,
    width: int,
    height: int,
    embeddings: EmbeddingRegistry | None = None,
    hires_steps: int | None = None,
    c_concat: Tensor | None = None,
) -> PromptGuidedDenoiser:
    """The eps/v model denoiser (by `sd.prediction`) under classifier-free guidance over A1111 prompts.

    `sigmas` are those the sampler runs (the shortened tail for img2img and the hires pass: the prompt
    schedules count from 0 on their first step). Schedules are written for `request.steps`; `hires_steps`
    gives the hires-fix pass's schedules (A1111's rule, see `kuas.prompts.prompt_schedule`). `c_concat`
    (B, 5, h, w), an inpainting model's extra input, goes to both guidance sides. With cfg_scale 1 the
    negative prompts are not encoded.
    """
    base_cls = VDenoiser if sd.prediction == "v" else EpsDenoiser
    inner = base_cls(UNetFunction(sd.unet), sampling_schedule(sd, request.noise_schedule))
    extras = None if c_concat is None else {"c_concat": c_concat}
    return prompt_denoiser(
        sd,
        inner,
        list(prompts),
        list(negative_prompts),
        steps=request.steps,
        cfg_scale=request.cfg_scale,
        sigmas=sigmas,
        clip_skip=request.clip_skip,
        guidance_rescale=request.guidance_rescale,
        skip_early_cfg=request.skip_early_cfg,
        emphasis=request.emphasis,
        embeddings=embeddings,
        hires_steps=hires_steps,
        cond_kwargs=extras,
        uncond_kwargs=extras,
        size_conditioning=size_conditioning(sd, width, height),
    )


def text_conditioning(
    sd: StableDiffusion,
    prompts: list[str],
    negative_prompts: list[str] | None,
    *,
    clip_skip: int,
    width: int,
    height: int,
    emphasis: str = "Original",
    embeddings: EmbeddingRegistry | None = None,
    steps: int = 1,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(cond, uncond) keyword dicts of what the U-Net gets at the first sampling step, for inspection:
    ``context`` and, for SDXL, ``y`` (pooled text and the pixel size), built as `guided_denoiser` builds
    them. cond has one row per prompt (the first AND part of each); uncond is None when `negative_prompts`
    is None."""
    batch = PromptBatch.build(
        sd, prompts, negative_prompts, steps, clip_skip=clip_skip, emphasis=emphasis, embeddings=embeddings
    )
    step = batch.at_step(0)
    first_rows = [parts[0][0] for parts in step.cond_parts]
    sizes = size_conditioning(sd, width, height)

    def side(context: Tensor, pooled: Tensor | None, negative: bool) -> dict[str, Tensor]:
        out = {"context": context}
        if sizes is not None and pooled is not None:
            kwargs = dict(sizes)
            if sd.family.refiner and negative:
                kwargs["aesthetic_score"] = REFINER_NEGATIVE_AESTHETIC_SCORE
            out["y"] = sd.vector_conditioning(pooled, **kwargs)
        return out

    cond_pooled = None if step.cond_pooled is None else step.cond_pooled[first_rows]
    cond = side(step.cond_context[first_rows], cond_pooled, False)
    uncond = None
    if step.uncond_context is not None:
        uncond = side(step.uncond_context, step.uncond_pooled, True)
    return cond, uncond


def extra_network_note(network: ExtraNetworkRequest) -> str:
    """What kuas tells the user about an extra-network tag it cannot apply (it has no LoRA / hypernetwork
    loader yet): the tag as written and that it was left out."""
    tag = f"<{network.kind}:{':'.join(network.items)}>"
    kind = {"lora": "LoRA", "lyco": "LyCORIS", "hypernet": "hypernetwork"}.get(network.kind, network.kind)
    return (
        f"extra network {tag} not applied: kuas cannot load {kind} networks yet; the tag was removed from "
        f"the prompt before encoding and the image was made without it"
    )


class PromptNotes:
    """Per-image notes about what the prompt language could not honour: extra networks kuas cannot apply,
    parser fallbacks on malformed prompts, embeddings that do not fit the model. Each distinct note is
    logged once per request as a warning; `finish_images` stores each image's notes in
    ``image.info["kuas_notes"]``."""

    def __init__(self, count: int):
        self.images: list[dict[str, None]] = [{} for _ in range(count)]
        self._logged: set[str] = set()

    def add(self, index: int, notes: Sequence[str]) -> None:
        for note in notes:
            self.images[index][note] = None
            if note not in self._logged:
                self._logged.add(note)
                log.warning("prompt: %s", note)

    def add_batch(self, start: int, batch: PromptBatch) -> None:
        """The notes of a sampled batch whose first image is image `start` of the request. Notes tied to
        one prompt go to its image; the others (negative prompts, embeddings) to every image of the batch."""
        own = [list(parsed.notes) for parsed in batch.parsed]
        shared = [note for note in batch.notes if not any(note in notes for notes in own)]
        for i, parsed in enumerate(batch.parsed):
            self.add(start + i, [extra_network_note(n) for n in batch.extra_networks[i]] + own[i] + shared)

    def add_unsampled(self, index: int, prompt: str) -> None:
        """An image made without sampling (img2img strength 0): its prompt's extra-network tags only."""
        _, networks = extract_extra_networks(prompt)
        self.add(index, [extra_network_note(n) for n in networks])

    def for_image(self, index: int) -> tuple[str, ...]:
        return tuple(self.images[index])


def inpainting_concat(
    sd: StableDiffusion,
    pixels: Tensor | None,
    mask: Tensor | None,
    latent_hw: tuple[int, int],
    batch: int,
) -> Tensor:
    """The extra U-Net input of a 9-channel inpainting model: cat([mask, VAE(masked image)]) at latent size.

    `pixels` (B or 1, 3, H, W) in [-1, 1] and `mask` (1, 1, H, W), 1 = repaint, already binary. The masked
    image is `pixels * (1 - mask)` (masked pixels 0, i.e. mid-grey), as A1111's `inpainting_image_conditioning`
    and diffusers' inpaint pipeline build it; the mask is resized to the latent grid by nearest neighbour.
    Without pixels (txt2img) the whole image is masked: mask ones, image zeros.
    """
    h, w = latent_hw
    f = sd.vae_scale
    if pixels is None:
        pixels = torch.zeros(1, 3, h * f, w * f)
        mask = torch.ones(1, 1, h * f, w * f)
    if mask is None:
        mask = torch.ones(1, 1, *pixels.shape[-2:])
    masked = pixels * (1.0 - mask.to(pixels))
    latents = encode_images(sd, masked)
    small = F.interpolate(mask.to(torch.float32), size=(h, w), mode="nearest")
    concat = torch.cat([small.to(latents), latents], dim=1)
    return concat.expand(batch, -1, -1, -1) if concat.shape[0] == 1 else concat


# -- denoisers ----------------------------------------------------------------------------------------------
class UNetFunction:
    """The U-Net as a denoiser's model function; ``c_concat`` (inpainting mask + masked-image latents) is
    joined to the scaled input's channels, after it, as the reference models were trained."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
        c_concat: Tensor | None = None,
    ) -> Tensor:
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(device=x.device, dtype=x.dtype)], dim=1)
        # the runtime's activation layout (channels_last on CPUs with bf16 and on CUDA): converting the
        # input once makes every convolution and norm after it run NHWC
        layout = getattr(self.unet, "input_memory_format", torch.contiguous_format)
        if layout != torch.contiguous_format:
            x = x.contiguous(memory_format=layout)
        return self.unet(x, t, context=context, y=y)


class LatentBlend:
    """Keep the original outside the mask (A1111's inpainting on any model): the x0 prediction becomes
    ``init * (1 - mask) + mask * x0`` each step, so the sampler's latent stays the noised original there."""

    def __init__(self, inner: Callable[..., Tensor], init_latent: Tensor, mask: Tensor):
        self.inner = inner
        self.init_latent = init_latent
        self.mask = mask

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        denoised = self.inner(x, sigma, **cond)
        return self.init_latent * (1 - self.mask) + self.mask * denoised


def build_denoiser(
    spec: SamplerSpec,
    guided: PromptGuidedDenoiser,
    *,
    blend: tuple[Tensor, Tensor] | None = None,
) -> Callable[..., Tensor]:
    """What the sampler calls: the prompt-guided denoiser (`guided_denoiser`) -> LCM boundary condition when
    the sampler wants it -> latent blend for inpainting (`blend` = (init latent, mask))."""
    denoiser: Any = guided
    if spec.lcm:
        denoiser = LCMDenoiser(denoiser)
    if blend is not None:
        denoiser = LatentBlend(denoiser, *blend)
    return denoiser


# -- sigmas -------------------------------------------------------------------------------------------------
def zero_terminal_snr(sd: StableDiffusion, noise_schedule: str | None = None) -> bool:
    """Whether sampling runs on the zero-terminal-SNR schedule: as `noise_schedule` ("Default" or "Zero
    Terminal SNR", A1111's setting) says, else (None) as the model was trained."""
    if noise_schedule is None:
        return sd.zero_terminal_snr
    return noise_schedule == "Zero Terminal SNR"


def sampling_schedule(sd: StableDiffusion, noise_schedule: str | None = None) -> DiscreteSchedule:
    """The discrete noise schedule sampling runs on: SD's, or SD's rescaled to zero terminal SNR."""
    return DiscreteSchedule.sd(zero_terminal_snr=zero_terminal_snr(sd, noise_schedule))


def sampling_sigmas(sd: StableDiffusion, spec: SamplerSpec, schedule_key: str, steps: int, *,
                    noise_schedule: str | None = None) -> Tensor:
    """The sigmas of `steps` steps of this sampler and schedule type, ending at 0 (`noise_schedule` as in
    `sampling_schedule`)."""
    return sigmas_for(spec, schedule_key, steps, sampling_schedule(sd, noise_schedule), sdxl=sd.family.is_sdxl)


def img2img_sigmas(sigmas: Tensor, steps: int, strength: float) -> Tensor:
    """The tail of `sigmas` that img2img runs: the last int(steps * strength) steps.

    This is diffusers' count (A1111 runs one step more: int(strength * steps) + 1 with strength capped at
    0.999); the noise is added at the first sigma of the tail.
    """
    n = min(int(steps * strength), len(sigmas) - 1)
    if n < 1:
        raise InvalidInputError(f"strength {strength} with {steps} steps runs no sampling step; raise either")
    return sigmas[-(n + 1) :]


# -- progress, cancellation, NaN checks ---------------------------------------------------------------------
class Progress:
    """Counts sampling steps over a whole request, calls the user's callback, shows a tqdm bar, and stops
    on a non-finite prediction (a U-Net overflow) or on request."""

    def __init__(self, total: int, callback: StepCallback | None = None, show: bool = False):
        self.total = int(total)
        self.done = 0
        self.callback = callback
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="kuas", unit="step")

    def __call__(self, info: StepInfo) -> None:
        if not torch.isfinite(info.denoised).all():
            raise NonFiniteError(
                f"the U-Net produced NaN/Inf values at sampling step {info.i + 1} (sigma {info.sigma:.4g}); with "
                f"float16 weights this is usually an overflow: load the model with dtype=torch.float32 or "
                f"torch.bfloat16"
            )
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None and self.callback(self.done, self.total, info.denoised) is False:
            raise SamplingInterrupted(
                "sampling stopped: the callback returned False", step=info.i, x=info.x, denoised=info.denoised
            )

    def rewind(self, done: int) -> None:
        """Go back to `done` steps (a batch is sampled again after a float32 retry)."""
        self.done = int(done)
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class NonFiniteError(KuasError):
    """A network produced NaN/Inf values (in low precision: an overflow; the pipelines retry in float32)."""


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


def run_sampler(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    spec: SamplerSpec,
    noise: ImageNoise,
    *,
    eta: float | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Run `spec` from `x` (noisy latents at sigmas[0]) to sigmas[-1] with per-image noise streams."""
    kwargs: dict[str, Any] = {"disable": True}
    if progress is not None:
        kwargs["callback"] = progress
    if spec.stochastic and _accepts(spec.function, "noise_sampler"):
        if spec.brownian_noise:
            positive = [float(s) for s in sigmas if s > 0]
            lo, hi = min(positive), max(positive)
            kwargs["noise_sampler"] = BrownianNoiseSampler(
                x, lo, hi if hi > lo else lo * 2, seeds=noise.seeds
            )
        else:
            kwargs["noise_sampler"] = noise.sampler_noise(x, prefetch=len(sigmas) - 1)
    if eta is not None:
        if _accepts(spec.function, "eta"):
            kwargs["eta"] = eta
        else:
            log.warning("sampler %s has no eta; eta=%s ignored", spec.name, eta)
    return sample(denoiser, x, sigmas.to(x.device), spec, **kwargs)


# -- VAE ----------------------------------------------------------------------------------------------------
def _vae_call(sd: StableDiffusion, fn: Callable[[], Tensor], what: str) -> Tensor:
    """Run a VAE computation; on NaN/Inf in low precision, run it again with the VAE in float32 (restored
    after), as A1111 does for VAEs that overflow in float16."""
    using = getattr(sd, "using", None)  # lowvram residency (a bare VAE holder has none)
    with using("vae") if using is not None else contextlib.nullcontext():
        return _checked_vae_call(sd, fn, what)


def _checked_vae_call(sd: StableDiffusion, fn: Callable[[], Tensor], what: str) -> Tensor:
    out = fn()
    if torch.isfinite(out).all():
        return out
    vae = sd.vae
    if vae.dtype != torch.float32:
        dtype = vae.dtype
        log.warning("VAE %s gave NaN/Inf in %s; retrying in float32", what, dtype)
        vae.to(torch.float32)
        try:
            out = fn()
        finally:
            vae.to(dtype)
        if torch.isfinite(out).all():
            return out
    raise KuasError(
        f"the VAE {what} produced NaN/Inf values even in float32; the VAE weights may be broken: "
        f"try another VAE (kuas.load(..., vae=path))"
    )


def _layout(sd: StableDiffusion) -> torch.memory_format:
    """The runtime's activation layout (a bare VAE holder without a runtime: contiguous)."""
    runtime = getattr(sd, "runtime", None)
    return runtime.memory_format if runtime is not None else torch.contiguous_format


def encode_images(sd: StableDiffusion, pixels: Tensor) -> Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (float32, on the model's device).

    kuas takes the posterior mean (A1111 and diffusers draw a sample; the SD VAE's posterior std is tiny,
    and the mean keeps img2img independent of the random streams).
    """

    def run() -> Tensor:
        vae = sd.vae
        x = pixels.to(device=vae.device, dtype=vae.dtype).contiguous(memory_format=_layout(sd))
        return vae.encode(x).mean.float()

    return _vae_call(sd, run, "encode") * sd.vae.scale_factor


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(length: int, fade_in: int, fade_out: int) -> Tensor:
    """Weights along one tile side: linear ramps where a neighbour overlaps, 1 elsewhere (never 0)."""
    w = torch.ones(length)
    if fade_in:
        w[:fade_in] = torch.arange(1, fade_in + 1) / (fade_in + 1)
    if fade_out:
        w[length - fade_out :] = torch.minimum(
            w[length - fade_out :], torch.arange(fade_out, 0, -1) / (fade_out + 1)
        )
    return w


def _decode_tiled(vae: nn.Module, z: Tensor, tile: int, overlap: int) -> Tensor:
    """Decode overlapping latent tiles and blend them with linear ramps over the overlaps (each tile's
    GroupNorm sees only its tile, so tiles differ slightly; the blend hides the seams)."""
    f = vae.config.downsample_factor
    b, _, h, w = z.shape
    out = torch.zeros(b, vae.config.out_ch, h * f, w * f, dtype=torch.float32)
    weight = torch.zeros(1, 1, h * f, w * f)
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
    for iy, y in enumerate(ys):
        top = ys[iy - 1] + th - y if iy > 0 else 0
        bottom = y + th - ys[iy + 1] if iy + 1 < len(ys) else 0
        wy = _ramp(th * f, top * f, bottom * f)
        for ix, x in enumerate(xs):
            left = xs[ix - 1] + tw - x if ix > 0 else 0
            right = x + tw - xs[ix + 1] if ix + 1 < len(xs) else 0
            wx = _ramp(tw * f, left * f, right * f)
            piece = vae.decode(z[:, :, y : y + th, x : x + tw]).float().cpu()
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * f : (y + th) * f, x * f : (x + tw) * f] += piece * mask
            weight[:, :, y * f : (y + th) * f, x * f : (x + tw) * f] += mask
    return out / weight


def decode_latents(
    sd: StableDiffusion,
    latents: Tensor,
    *,
    tiled: bool | None = None,
    tile: int = VAE_TILE_LATENT,
    overlap: int = VAE_TILE_OVERLAP,
) -> Tensor:
    """Scaled latents -> images (B, 3, H, W) float32 in [0, 1] on the CPU.

    tiled: True / False, or None to tile only above the runtime's `vae_tile_pixels` output pixels
        (`VAE_TILE_AUTO_PIXELS` by default; lower with lowvram).
    """
    vae = sd.vae
    f = sd.vae_scale
    if tiled is None:
        runtime = getattr(sd, "runtime", None)
        limit = runtime.vae_tile_pixels if runtime is not None else VAE_TILE_AUTO_PIXELS
        tiled = latents.shape[-2] * latents.shape[-1] * f * f > limit
    if tiled and overlap >= tile:
        raise InvalidInputError(f"VAE tile overlap {overlap} must be smaller than the tile {tile}")

    def run() -> Tensor:
        z = (latents / vae.scale_factor).to(device=vae.device, dtype=vae.dtype)
        z = z.contiguous(memory_format=_layout(sd))
        if tiled:
            return _decode_tiled(vae, z, tile, overlap)
        return vae.decode(z).float().cpu()

    images = _vae_call(sd, run, "decode")
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


# -- seamless tiling ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def seamless_tiling(*modules: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Circular padding in every padded Conv2d of `modules` for the duration of the block (A1111's
    "Tiling"): images wrap around and tile seamlessly. Only the instances' `padding_mode` changes; it is
    restored on exit, even on error."""
    changed: list[tuple[nn.Conv2d, str]] = []
    if enabled:
        for module in modules:
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d) and not isinstance(conv.padding, str) and any(conv.padding):
                    changed.append((conv, conv.padding_mode))
                    conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in changed:
            conv.padding_mode = mode


# -- images -------------------------------------------------------------------------------------------------
def images_to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """RGB PIL images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2.0 - 1.0


def tensor_to_images(pixels: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> RGB PIL images (rounded to the nearest 8-bit value)."""
    arrays = (pixels.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in arrays]


def resize_image(
    image: Image.Image,
    width: int,
    height: int,
    mode: str = "just resize",
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """A1111's resize modes: "just resize" (stretch), "crop and resize" (cover, centre crop), "resize and
    fill" (fit inside, then stretch the border rows / columns of the picture over the empty bands)."""
    if image.size == (width, height):
        return image.copy()
    if mode == "just resize":
        return image.resize((width, height), resample)
    src_ratio, dst_ratio = image.width / image.height, width / height
    if mode == "crop and resize":
        if dst_ratio > src_ratio:  # wider target: match width, crop height
            w, h = width, max(1, round(image.height * width / image.width))
        else:
            w, h = max(1, round(image.width * height / image.height)), height
        resized = image.resize((w, h), resample)
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    if mode != "resize and fill":
        raise InvalidInputError(f"unknown resize mode {mode!r}")
    if dst_ratio < src_ratio:  # narrower target: match width, bands above and below
        w, h = width, max(1, round(image.height * width / image.width))
    else:
        w, h = max(1, round(image.width * height / image.height)), height
    resized = image.resize((w, h), resample)
    canvas = Image.new(image.mode, (width, height))
    x0, y0 = (width - w) // 2, (height - h) // 2
    canvas.paste(resized, (x0, y0))
    if y0 > 0:
        canvas.paste(resized.crop((0, 0, w, 1)).resize((w, y0)), (x0, 0))
    if height - y0 - h > 0:
        canvas.paste(resized.crop((0, h - 1, w, h)).resize((w, height - y0 - h)), (x0, y0 + h))
    if x0 > 0:
        canvas.paste(resized.crop((0, 0, 1, h)).resize((x0, h)), (0, y0))
    if width - x0 - w > 0:
        canvas.paste(resized.crop((w - 1, 0, w, h)).resize((width - x0 - w, h)), (x0 + w, y0))
    return canvas


# -- output -------------------------------------------------------------------------------------------------
def infotext_fields(
    sd: StableDiffusion,
    request: Request,
    *,
    seed: int,
    subseed: int,
    spec: SamplerSpec,
    schedule_key: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A1111's infotext fields for one image (names and values as A1111 writes them; None = left out)."""
    varied = request.subseed_strength > 0
    fields: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": spec.name,
        "Schedule type": SCHEDULES[schedule_key].label,
        "CFG scale": float(request.cfg_scale),
        "Seed": seed,
        "Size": (request.width, request.height),
        "Model hash": sd.model_hash,
        "Model": sd.name,
        "Variation seed": subseed if varied else None,
        "Variation seed strength": float(request.subseed_strength) if varied else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "Tiling": True if request.tiling else None,
        "Eta": float(request.eta) if request.eta is not None and _accepts(spec.function, "eta") else None,
        "Guidance rescale": float(request.guidance_rescale) if request.guidance_rescale > 0 else None,
        "Skip Early CFG": float(request.skip_early_cfg) if request.skip_early_cfg > 0 else None,
        "Emphasis": request.emphasis if request.emphasis != "Original" else None,  # as A1111 writes it
        # A1111 writes its setting when it rescales; kuas whenever the schedule used is not SD's own
        "Noise Schedule": "Zero Terminal SNR" if zero_terminal_snr(sd, request.noise_schedule) else None,
        "Token merging ratio": float(request.tome_ratio) if request.tome_ratio > 0 else None,  # A1111's name
        "DeepCache interval": request.deepcache_interval if request.deepcache_interval > 1 else None,
    }
    fields.update(extra or {})
    from kuas import __version__

    fields["Version"] = f"kuas {__version__}"
    return fields


def finish_images(
    images: Sequence[Image.Image],
    infotexts: Sequence[str],
    *,
    watermark: bool,
    notes: PromptNotes | None = None,
) -> list[Image.Image]:
    """Apply the invisible watermark (unless `watermark` is False) and attach each image's infotext as
    ``image.info["parameters"]`` (what PNG savers write to A1111's ``parameters`` chunk) and its prompt
    notes as ``image.info["kuas_notes"]``, a tuple of sentences (empty when the prompts were used in full;
    not written to files)."""
    from kuas.images.watermark import apply_watermark

    out = []
    for i, (image, text) in enumerate(zip(images, infotexts, strict=True)):
        if watermark:
            image = apply_watermark(image)
        image.info["parameters"] = text
        image.info["kuas_notes"] = () if notes is None else notes.for_image(i)
        out.append(image)
    return out


@dataclass
class Batch:
    """The images of one sampler call: their index range, prompts and seeds."""

    start: int
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    subseeds: list[int]

    @property
    def size(self) -> int:
        return len(self.prompts)


def batches(request: Request, seeds: list[int], subseeds: list[int]) -> list[Batch]:
    """Split a request's images into batch_count batches of batch_size."""
    prompts, negatives = request.prompts_for("prompt"), request.prompts_for("negative_prompt")
    n = request.batch_size
    return [
        Batch(i, prompts[i : i + n], negatives[i : i + n], seeds[i : i + n], subseeds[i : i + n])
        for i in range(0, request.image_count, n)
    ]


def check_noise(noise: Tensor | None, count: int, shape: tuple[int, ...]) -> Tensor | None:
    """User-given initial noise (like diffusers' `latents=`): (images, C, h, w), finite."""
    if noise is None:
        return None
    if not isinstance(noise, Tensor) or tuple(noise.shape) != (count, *shape):
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise InvalidInputError(
            f"noise must be a tensor of shape {(count, *shape)} (images, latent channels, "
            f"height / 8, width / 8), got {got}"
        )
    if not torch.isfinite(noise).all():
        raise InvalidInputError("noise contains NaN or Inf values")
    return noise.detach().to(torch.float32, copy=True).cpu()


def latent_shape(sd: StableDiffusion, width: int, height: int) -> tuple[int, int, int]:
    f = sd.vae_scale
    return (sd.latent_channels, height // f, width // f)


def batch_noise(
    request: Request, batch: Batch, shape: tuple[int, ...], user_noise: Tensor | None = None
) -> tuple[ImageNoise, Tensor]:
    """(the batch's random streams, its initial noise (B, *shape) on the CPU); `user_noise` holds every
    image's noise and replaces the drawn one (the streams still advance, so sampler noise is unchanged)."""
    rng = ImageNoise(batch.seeds, batch.subseeds, request.subseed_strength)
    noise = rng.first(shape)
    if user_noise is not None:
        noise = user_noise[batch.start : batch.start + batch.size]
    return rng, noise


def sample_batch(
    sd: StableDiffusion,
    request: Request,
    batch: Batch,
    *,
    spec: SamplerSpec,
    sigmas: Tensor,
    rng: ImageNoise,
    noise: Tensor,
    width: int,
    height: int,
    init_latent: Tensor | None = None,
    c_concat: Tensor | None = None,
    blend: tuple[Tensor, Tensor] | None = None,
    progress: Progress | None = None,
    embeddings: EmbeddingRegistry | None = None,
    hires_steps: int | None = None,
    notes: PromptNotes | None = None,
) -> Tensor:
    """Condition on the batch's prompts (`guided_denoiser`), build the denoiser and sample one batch.

    Without `init_latent` (txt2img, or strength 1) sampling starts from pure noise ``noise * sigmas[0]``;
    with it from ``init_latent + noise * sigmas[0]``. `blend` = (original latents, mask at latent size,
    1 = repaint) keeps the original outside the mask during sampling (`LatentBlend`) and in the result.
    `hires_steps`: this is a hires-fix pass of that many steps. `notes` collects what the prompts could
    not do (per image).
    """
    device = sd.device
    with sd.using("text"):  # lowvram: only the text encoders while the prompts are encoded
        guided = guided_denoiser(
            sd,
            request,
            batch.prompts,
            batch.negative_prompts,
            sigmas=sigmas,
            width=width,
            height=height,
            embeddings=embeddings,
            hires_steps=hires_steps,
            c_concat=c_concat,
        )
    if notes is not None:
        notes.add_batch(batch.start, guided.batch)
    x = noise.to(device) * sigmas[0]
    if init_latent is not None:
        x = x + init_latent.to(device)
    if blend is not None:
        blend = (blend[0].to(device), blend[1].to(device))
    denoiser = build_denoiser(spec, guided, blend=blend)
    done = progress.done if progress is not None else 0
    try:
        latents = _sample_with_speedups(sd, request, denoiser, x, sigmas, spec, rng, progress)
    except NonFiniteError:
        if sd.unet.dtype == torch.float32:
            raise
        # a low-precision overflow: sample the batch again from the same noise with a float32 U-Net
        log.warning("the U-Net overflowed in %s; sampling this batch again in float32", sd.unet.dtype)
        retry_rng = ImageNoise(rng.seeds, rng.subseeds, rng.subseed_strength)
        retry_rng.first(tuple(noise.shape[1:]))  # the initial draw, as the first attempt made it
        if progress is not None:
            progress.rewind(done)
        with unet_in_float32(sd):
            latents = _sample_with_speedups(sd, request, denoiser, x, sigmas, spec, retry_rng, progress)
    if blend is not None:
        original, mask = blend
        latents = original * (1 - mask) + mask * latents
    return latents


def _sample_with_speedups(
    sd: StableDiffusion,
    request: Request,
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    spec: SamplerSpec,
    rng: ImageNoise,
    progress: Progress | None,
) -> Tensor:
    """One sampling run with the U-Net resident and the request's opt-in speedups attached (a fresh step
    cache per run); non-finite latents raise `NonFiniteError`."""
    from kuas.speedups import step_caching, token_merging

    with sd.using("unet"), token_merging(sd.unet, request.tome_ratio), step_caching(
        sd.unet, request.deepcache_interval
    ):
        latents = run_sampler(denoiser, x, sigmas, spec, rng, eta=request.eta, progress=progress)
    if not torch.isfinite(latents).all():
        raise NonFiniteError("sampling produced NaN/Inf latents")
    return latents


@contextlib.contextmanager
def unet_in_float32(sd: StableDiffusion) -> Iterator[None]:
    """The U-Net in float32 for the block, back in its dtype after (bf16/fp16 -> fp32 -> back is exact)."""
    dtype = sd.unet.dtype
    sd.unet.to(torch.float32)
    try:
        yield
    finally:
        sd.unet.to(dtype)

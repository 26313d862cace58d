"""Classifier-free guidance with A1111 prompts: per-step conditioning (prompt editing, alternation) and AND.

``PromptGuidedDenoiser`` wraps an inner denoiser (``kuas.sampling.denoisers``) the way A1111's CFG denoiser
does: at each call it finds the sampler step from sigma, takes every image's conditioning for that step
from a ``PromptBatch``, evaluates all AND parts of all images and the negative prompts in ONE batch of the
inner model (cond rows first, image by image, then one uncond row per image) and combines

    x0_i = uncond_i + sum_k (cond_ik - uncond_i) * (weight_k * cfg_scale)

(A1111's ``combine_denoised``). With ``cfg_scale == 1`` the negative prompts are not evaluated; as in
A1111 the first AND part then stands in for them, so a plain prompt returns its conditional prediction.
Guidance rescale is ``kuas.sampling.guidance.rescale_guidance`` against the conditional prediction (for an
image with several AND parts, their combination at scale 1). ``skip_early_cfg`` (A1111's "Ignore negative
prompt during early sampling", infotext ``Skip Early CFG``) turns guidance off, as at ``cfg_scale == 1``,
on the sampler steps ``i`` with ``i / steps <= skip_early_cfg`` (0 = off): the guidance-interval idea of
Kynkaanniemi et al. 2024, where guidance at the highest noise levels pushes layouts (how many objects,
where) away from the unconditional model's without making them more faithful. A plain prompt (one part,
weight 1, at most 75 tokens, no syntax) gives exactly what ``CFGDenoiser`` gives with ``sd.encode_prompt``.

Step index (A1111 counts denoiser calls; kuas counts sampler steps, from sigma): call ``i`` of a sampling
run over ``sigmas`` (the list the sampler gets, ending in 0) is step ``i`` when its sigma lies in
``(sigmas[i + 1], sigmas[i]]`` (relative tolerance 1e-5); a sigma above ``sigmas[0]`` is step 0. So the
first evaluation of step i and the intermediate evaluations of second-order samplers (DPM2 midpoints,
DPM++ 2S / SDE stages) all use step i; Heun's correction, evaluated at exactly ``sigmas[i + 1]``, uses step
i + 1, the step whose noise level it evaluates. The rule is stateless, so one denoiser can be called again
(retries, previews) without drifting. For first-order samplers this is A1111's counter exactly. For its
second-order samplers A1111 instead builds the schedule over ``2 * steps`` calls and advances per call,
so a switch at a fraction (``[a:b:0.5]``) lands at the same point and a switch at an integer step ``5``
lands at call 5 (sampler step 2.5) there, at sampler step 5 here. Churned sigmas (``s_churn > 0``) above
``sigmas[i - 1]`` count as step i - 1. img2img: pass the shortened sigmas; as in A1111 the count starts at
0 on the first step that runs.

Usage (what a pipeline does)::

    from kuas.prompts.guidance import prompt_denoiser

    denoiser = prompt_denoiser(
        sd, EpsDenoiser(sd.unet, schedule), ["a [cat:dog:0.5] AND a hat :0.7"], [""],
        steps=20, cfg_scale=7.0, sigmas=sigmas, clip_skip=1, guidance_rescale=0.0,
        size_conditioning=dict(original_size=(1024, 1024), target_size=(1024, 1024)),  # SDXL only
        cond_kwargs={"c_concat": image_cond},  # per-image extras (inpainting), optional
    )
    latents = sample_euler(denoiser, noise * sigmas[0], sigmas)
    denoiser.batch.extra_networks, denoiser.batch.notes   # LoRA tags to apply, fallbacks to report
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kuas.errors import InvalidInputError
from kuas.prompts.conditioning import COMMA_BACKTRACK, PromptBatch, StepConditioning
from kuas.prompts.parser import EmbeddingRegistry
from kuas.sampling.denoisers import Denoiser, batch_sigma
from kuas.sampling.guidance import rescale_guidance

if TYPE_CHECKING:
    from kuas.stable_diffusion import StableDiffusion

__all__ = ["PromptGuidedDenoiser", "prompt_denoiser", "step_index"]

STEP_RTOL = 1e-5
REFINER_NEGATIVE_AESTHETIC_SCORE = 2.5  # A1111's default "sdxl_refiner_low_aesthetic_score"

VectorFn = Callable[[Tensor], Tensor]


def _sigma_list(sigmas: Tensor | Sequence[float]) -> list[float]:
    values = sigmas.detach().cpu().tolist() if torch.is_tensor(sigmas) else [float(s) for s in sigmas]
    if len(values) < 2:
        raise InvalidInputError(f"sigmas must hold at least 2 values (start and end), got {len(values)}")
    if any(b > a for a, b in itertools.pairwise(values)):
        raise InvalidInputError("sigmas must not increase; pass the sigmas the sampler gets")
    return values


def step_index(sigma: float, sigmas: Tensor | Sequence[float]) -> int:
    """The 0-based sampler step of an evaluation at ``sigma``: ``i`` for sigma in ``(sigmas[i+1], sigmas[i]]``.

    See the module docstring for why and how this differs from A1111's call counter.
    """
    values = _sigma_list(sigmas)
    return _StepFinder(values)(float(sigma))


class _StepFinder:
    def __init__(self, sigmas: list[float]):
        self.steps = len(sigmas) - 1
        # Ascending keys: step j covers sigma <= sigmas[j] * (1 + rtol).
        self.keys = [-s * (1.0 + STEP_RTOL) for s in sigmas[: self.steps]]

    def __call__(self, sigma: float) -> int:
        return max(0, bisect.bisect_right(self.keys, -sigma) - 1)


def _take_rows(value: Any, rows: Tensor, name: str) -> Any:
    """Per-image extras, repeated for the rows of the U-Net batch: tensors by their first dim."""
    if value is None:
        return None
    if torch.is_tensor(value):
        return value[rows.to(value.device)]
    if isinstance(value, (list, tuple)):
        return type(value)(_take_rows(v, rows, name) for v in value)
    raise InvalidInputError(
        f"conditioning extra {name!r} must be a per-image tensor (batch first), a list of them or None, "
        f"got {type(value).__name__}"
    )


def _cat(a: Any, b: Any) -> Any:
    if a is None:
        return None
    if torch.is_tensor(a):
        return torch.cat([a, b.to(a.device)])
    return type(a)(_cat(x, y) for x, y in zip(a, b))


def _same_shape(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape[1:] == b.shape[1:]
    return len(a) == len(b) and all(_same_shape(x, y) for x, y in zip(a, b))


class PromptGuidedDenoiser:
    """CFG over a ``PromptBatch``: per-step conditioning, AND parts and negatives in one inner call.

    ``inner(x, sigma, context=..., y=..., **kwargs)`` is the model denoiser. ``sigmas``: the sampler's
    sigmas (for the step index). ``cond_kwargs`` / ``uncond_kwargs``: per-image extras (tensors with the
    image batch first, e.g. inpainting's ``c_concat``, ``y`` when not built from pooled) for the two sides;
    ``uncond_kwargs`` defaults to ``cond_kwargs``. ``vector`` / ``negative_vector``: SDXL, maps pooled
    ``(N, P)`` to ``y`` for each side (``negative_vector`` defaults to ``vector``). Keyword arguments given
    at call time (the sampler's ``extra_args``) reach the inner denoiser unchanged.
    """

    def __init__(
        self,
        inner: Denoiser,
        batch: PromptBatch,
        cfg_scale: float,
        *,
        sigmas: Tensor | Sequence[float],
        guidance_rescale: float = 0.0,
        skip_early_cfg: float = 0.0,
        cond_kwargs: Mapping[str, Any] | None = None,
        uncond_kwargs: Mapping[str, Any] | None = None,
        vector: VectorFn | None = None,
        negative_vector: VectorFn | None = None,
    ):
        if not isinstance(batch, PromptBatch):
            raise InvalidInputError(f"batch must be a PromptBatch, got {type(batch).__name__}")
        cfg_scale = float(cfg_scale)
        if not math.isfinite(cfg_scale):
            raise InvalidInputError(f"cfg_scale must be a finite number, got {cfg_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise InvalidInputError(f"guidance rescale must be between 0 and 1, got {guidance_rescale}")
        skip_early_cfg = float(skip_early_cfg)
        if not 0.0 <= skip_early_cfg <= 1.0:
            raise InvalidInputError(
                f"skip early CFG must be a fraction of the steps between 0 (off) and 1, got {skip_early_cfg}"
            )
        if cfg_scale != 1.0 and not batch.has_uncond:
            raise InvalidInputError(
                f"cfg_scale {cfg_scale} needs negative prompts: build the PromptBatch with negative_prompts "
                '("" for none) or use cfg_scale=1'
            )
        cond_kwargs = dict(cond_kwargs or {})
        uncond_kwargs = dict(cond_kwargs if uncond_kwargs is None else uncond_kwargs)
        if set(cond_kwargs) != set(uncond_kwargs):
            raise InvalidInputError(
                f"cond_kwargs and uncond_kwargs must carry the same keys, got {sorted(cond_kwargs)} and "
                f"{sorted(uncond_kwargs)}"
            )
        for reserved in ("context",):
            if reserved in cond_kwargs:
                raise InvalidInputError(f"{reserved!r} comes from the prompts; remove it from cond_kwargs")
        if vector is not None and "y" in cond_kwargs:
            raise InvalidInputError(
                "pass either vector (y built from the pooled text) or a 'y' in cond_kwargs"
            )
        self.inner = inner
        self.batch = batch
        self.scale = cfg_scale
        self.rescale = float(guidance_rescale)
        self.skip_early_cfg = skip_early_cfg
        self.cond_kwargs = cond_kwargs
        self.uncond_kwargs = uncond_kwargs
        self.vector = vector
        self.negative_vector = negative_vector or vector
        self.sigmas = _sigma_list(sigmas)
        self._find_step = _StepFinder(self.sigmas)

    @property
    def schedule(self):
        return getattr(self.inner, "schedule", None)

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min  # type: ignore[attr-defined]

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max  # type: ignore[attr-defined]

    def steps_for(self, sigma: Tensor) -> list[int]:
        """The sampler step of each image for a (batch,) sigma."""
        return [self._find_step(float(s)) for s in sigma.detach().cpu().tolist()]

    def _unguided(self, step: int) -> bool:
        """Whether sampler step `step` runs without guidance (``skip_early_cfg``)."""
        return self.skip_early_cfg > 0 and step / max(self._find_step.steps, 1) <= self.skip_early_cfg

    def conditioning(self, sigma: Tensor) -> StepConditioning:
        """What the U-Net gets at this sigma (for inspection and tests)."""
        return self.batch.at_step(self.steps_for(sigma))

    def _side(
        self,
        context: Tensor,
        pooled: Tensor | None,
        rows: Tensor,
        extras: Mapping[str, Any],
        vector: VectorFn | None,
        device: torch.device,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"context": context.to(device)}
        if vector is not None and pooled is not None:
            kwargs["y"] = vector(pooled).to(device)
        for name, value in extras.items():
            kwargs[name] = _take_rows(value, rows, name)
        return kwargs

    def __call__(self, x: Tensor, sigma: Tensor | float, **extra: Any) -> Tensor:
        sigma = batch_sigma(x, sigma)
        images = x.shape[0]
        if images != len(self.batch):
            raise InvalidInputError(
                f"the latents hold {images} images but the prompt batch has {len(self.batch)} prompts"
            )
        step_indices = self.steps_for(sigma)
        step = self.batch.at_step(step_indices)
        unguided = [self._unguided(i) for i in step_indices]
        cond_rows = torch.tensor(
            [image for image, parts in enumerate(step.cond_parts) for _ in parts], dtype=torch.long
        )
        n_cond = cond_rows.shape[0]
        cond = self._side(
            step.cond_context, step.cond_pooled, cond_rows, self.cond_kwargs, self.vector, x.device
        )
        x_cond, sigma_cond = x[cond_rows.to(x.device)], sigma[cond_rows.to(sigma.device)]
        single = n_cond == images  # every image has exactly one AND part

        if self.scale == 1.0 or all(unguided):
            out = self.inner(x_cond, sigma_cond, **cond, **extra)
            return out if single else self._unguided_combination(out, step)

        image_rows = torch.arange(images)
        uncond = self._side(
            step.uncond_context,
            step.uncond_pooled,
            image_rows,
            self.uncond_kwargs,  # type: ignore[arg-type]
            self.negative_vector,
            x.device,
        )
        if all(_same_shape(cond[key], uncond[key]) for key in cond):
            merged = {key: _cat(cond[key], uncond[key]) for key in cond}
            out = self.inner(torch.cat([x_cond, x]), torch.cat([sigma_cond, sigma]), **merged, **extra)
            x0_cond, x0_uncond = out[:n_cond], out[n_cond:]
        else:  # prompt and negative prompt of different lengths without padding: two calls (A1111's default)
            x0_cond = self.inner(x_cond, sigma_cond, **cond, **extra)
            x0_uncond = self.inner(x, sigma, **uncond, **extra)
        guided = self._combine(x0_cond, x0_uncond, step, self.scale)
        if any(unguided):  # images of one batch at different steps (not from the built-in samplers)
            plain = self._unguided_combination(x0_cond, step)
            mask = torch.tensor(unguided, device=guided.device).view(-1, *[1] * (guided.ndim - 1))
            guided = torch.where(mask, plain, guided)
        if self.rescale == 0.0:
            return guided
        if single:
            reference = x0_cond
        else:
            reference = torch.stack(
                [
                    x0_cond[parts[0][0]]
                    if len(parts) == 1
                    else self._combine_one(x0_cond, x0_uncond[i], parts, 1.0)
                    for i, parts in enumerate(step.cond_parts)
                ]
            )
        return rescale_guidance(guided, reference, self.rescale)

    @staticmethod
    def _combine_one(
        x0_cond: Tensor, uncond: Tensor, parts: Sequence[tuple[int, float]], scale: float
    ) -> Tensor:
        result = uncond
        for row, weight in parts:
            result = result + (x0_cond[row] - uncond) * (weight * scale)
        return result

    def _unguided_combination(self, x0_cond: Tensor, step: StepConditioning) -> Tensor:
        """Each image's AND parts at scale 1, its first part standing in for the negative prompt (A1111)."""
        first_rows = torch.tensor([parts[0][0] for parts in step.cond_parts], device=x0_cond.device)
        return self._combine(x0_cond, x0_cond[first_rows], step, 1.0)

    def _combine(self, x0_cond: Tensor, x0_uncond: Tensor, step: StepConditioning, scale: float) -> Tensor:
        if len(step.cond_parts) == x0_cond.shape[0] and all(
            len(p) == 1 and p[0][1] == 1.0 for p in step.cond_parts
        ):
            return x0_uncond + (x0_cond - x0_uncond) * scale  # the plain-prompt case, in one tensor op
        return torch.stack(
            [
                self._combine_one(x0_cond, x0_uncond[i], parts, scale)
                for i, parts in enumerate(step.cond_parts)
            ]
        )


def prompt_denoiser(
    sd: StableDiffusion,
    inner: Denoiser,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None,
    *,
    steps: int,
    cfg_scale: float,
    sigmas: Tensor | Sequence[float],
    clip_skip: int = 1,
    guidance_rescale: float = 0.0,
    skip_early_cfg: float = 0.0,
    emphasis: str = "Original",
    embeddings: EmbeddingRegistry | None = None,
    hires_steps: int | None = None,
    cond_kwargs: Mapping[str, Any] | None = None,
    uncond_kwargs: Mapping[str, Any] | None = None,
    size_conditioning: Mapping[str, Any] | None = None,
    negative_size_conditioning: Mapping[str, Any] | None = None,
    pad_cond_uncond: bool = True,
    comma_backtrack: int = COMMA_BACKTRACK,
    zero_empty_negative: bool | None = None,
) -> PromptGuidedDenoiser:
    """Parse, encode and wrap in one call: the denoiser a pipeline hands to its sampler.

    ``steps`` is the step count the prompt schedules are written for (the sampler's steps; img2img: the
    full count, as A1111). ``negative_prompts`` None means "" for every image; with ``cfg_scale == 1`` they
    are not encoded at all. SDXL needs ``size_conditioning``: keyword arguments of
    ``sd.vector_conditioning`` (``original_size``, ``target_size``, optional ``crop_top_left``,
    ``aesthetic_score``) that turn each pooled vector into ``y``; ``negative_size_conditioning`` defaults to
    it (for the refiner with ``aesthetic_score`` 2.5, A1111's default for negatives). The other arguments
    are ``PromptBatch.build``'s and ``PromptGuidedDenoiser``'s. ``denoiser.batch`` has the extra-network
    tags and notes.
    """
    if negative_prompts is None:
        negative_prompts = ""
    batch = PromptBatch.build(
        sd,
        prompts,
        None if float(cfg_scale) == 1.0 else negative_prompts,
        steps,
        clip_skip=clip_skip,
        emphasis=emphasis,
        embeddings=embeddings,
        hires_steps=hires_steps,
        comma_backtrack=comma_backtrack,
        pad_cond_uncond=pad_cond_uncond,
        zero_empty_negative=zero_empty_negative,
    )
    vector = negative_vector = None
    if sd.family.vector_conditioning:
        if size_conditioning is None:
            raise InvalidInputError(
                "SDXL models need size_conditioning=dict(original_size=(H, W), target_size=(H, W)) "
                "to build y from the pooled text"
            )
        positive = dict(size_conditioning)
        negative = dict(positive if negative_size_conditioning is None else negative_size_conditioning)
        if sd.family.refiner and negative_size_conditioning is None:
            negative["aesthetic_score"] = REFINER_NEGATIVE_AESTHETIC_SCORE
        positive.setdefault("target_size", positive.get("original_size"))
        negative.setdefault("target_size", negative.get("original_size"))

        def vector(pooled: Tensor) -> Tensor:
            return sd.vector_conditioning(pooled, **positive)

        def negative_vector(pooled: Tensor) -> Tensor:
            return sd.vector_conditioning(pooled, **negative)

    return PromptGuidedDenoiser(
        inner,
        batch,
        cfg_scale,
        sigmas=sigmas,
        guidance_rescale=guidance_rescale,
        skip_early_cfg=skip_early_cfg,
        cond_kwargs=cond_kwargs,
        uncond_kwargs=uncond_kwargs,
        vector=vector,
        negative_vector=negative_vector,
    )

"""Generation requests: frozen dataclasses that check every argument before any work starts.

A pipeline first turns its keyword arguments into one of these; a bad value raises `InvalidInputError`
naming the argument, what is wrong and how to fix it, before a prompt is encoded or a tensor allocated.
Checks that need the model (its VAE factor, text-encoder depth for clip skip) live in
`kuas.pipelines.common.check_request_for_model`.

Limits (generous for the hardware of 2025, small enough to stop a typo from asking for terabytes):

* width and height: multiples of 8, at most `MAX_SIDE` (4096) each and `MAX_PIXELS` (4096 x 2048) together;
* steps: 1 to `MAX_STEPS` (1000, the number of training timesteps);
* batch_size: 1 to `MAX_BATCH_SIZE` (64) images per sampler call; batch_count: 1 to `MAX_BATCH_COUNT` (1000)
  calls;
* seeds: -1 (random, drawn once per request and written to each image's infotext) or 0 .. 2**63 - 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from kuas.errors import InvalidInputError
from kuas.prompts.conditioning import EMPHASIS_MODES
from kuas.sampling.registry import SamplerSpec, resolve_sampler
from kuas.sampling.schedules import NOISE_SCHEDULES

__all__ = [
    "FILL_MODES",
    "HR_UPSCALERS",
    "MAX_BATCH_COUNT",
    "MAX_BATCH_SIZE",
    "MAX_PIXELS",
    "MAX_SIDE",
    "MAX_STEPS",
    "OUTPAINT_FILLS",
    "RESIZE_MODES",
    "SEED_LIMIT",
    "Img2ImgRequest",
    "InpaintRequest",
    "OutpaintRequest",
    "Request",
    "Txt2ImgRequest",
    "validate_mask",
]

MAX_SIDE = 4096
MAX_PIXELS = 4096 * 2048
MAX_STEPS = 1000
MAX_BATCH_SIZE = 64
MAX_BATCH_COUNT = 1000
SEED_LIMIT = 2**63  # seeds (and seed + image index) stay below this
SIZE_MULTIPLE = 8  # the VAE factor of every Stable Diffusion model
MAX_TOME_RATIO = 0.75  # token merging keeps one token of each 2x2 cell

# A1111's img2img resize modes: 0 just resize, 1 crop and resize, 2 resize and fill.
RESIZE_MODES: tuple[str, ...] = ("just resize", "crop and resize", "resize and fill")
# A1111's "Masked content" (inpainting_fill 0..3).
FILL_MODES: tuple[str, ...] = ("fill", "original", "latent noise", "latent nothing")
# Hires-fix upscalers: A1111's latent modes (name -> torch interpolate mode, antialias) and two pixel ones.
# Outpainting's fill of the new area: A1111's blur fill, stretched edge pixels, or latent noise / zeros.
OUTPAINT_FILLS: tuple[str, ...] = ("fill", "edge", "latent noise", "latent nothing")
HR_UPSCALERS: dict[str, tuple[str, bool] | None] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
    "Lanczos": None,
    "Nearest": None,
}


# -- small checks -------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, lo: int, hi: int, fix: str = "") -> int:
    if not _is_int(value):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidInputError(f"{name} must be between {lo} and {hi}, got {value}{fix}")
    return int(value)


def _check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidInputError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def check_size(width: Any, height: Any, what: str = "image", multiple: int = SIZE_MULTIPLE) -> None:
    """Width and height positive, multiples of `multiple`, within `MAX_SIDE` and `MAX_PIXELS`."""
    for name, value in (("width", width), ("height", height)):
        if not _is_int(value):
            raise InvalidInputError(f"{what} {name} must be an integer number of pixels, got {value!r}")
        if value <= 0:
            raise InvalidInputError(f"{what} {name} must be positive, got {value}")
        if value > MAX_SIDE:
            raise InvalidInputError(
                f"{what} {name} {value} is above the limit of {MAX_SIDE} pixels; generate "
                f"smaller and upscale (hires fix) instead"
            )
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise InvalidInputError(
                f"{what} {name} must be a multiple of {multiple} (the VAE works on "
                f"{multiple}x{multiple} blocks), got {value}; use {lower} or "
                f"{lower + multiple}"
            )
    if width * height > MAX_PIXELS:
        raise InvalidInputError(
            f"{what} size {width}x{height} is {width * height} pixels, above the limit of "
            f"{MAX_PIXELS} ({MAX_SIDE}x{MAX_PIXELS // MAX_SIDE}); generate smaller and "
            f"upscale instead"
        )


def check_strength(name: str, strength: Any, steps: int, *, allow_zero: bool) -> float:
    """Strength in [0, 1] that leaves at least one step to run (int(steps * strength) >= 1)."""
    strength = _check_float(name, strength, 0.0, 1.0)
    if strength == 0.0 and allow_zero:
        return strength
    if int(steps * strength) < 1:
        need = math.ceil(1 / strength) if strength > 0 else None
        fix = f"raise steps to {need} or more, or" if need and need <= MAX_STEPS else ""
        raise InvalidInputError(
            f"{name} {strength} with {steps} steps runs no sampling step (int({steps} * {strength}) = 0); "
            f"{fix} raise {name} to at least {1 / steps:.3g}"
        )
    return strength


def _prompt_list(name: str, value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise InvalidInputError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def validate_mask(mask: Image.Image) -> None:
    """An inpainting mask (white = repaint) must mark at least one pixel; an all-black mask has nothing
    to repaint."""
    if not isinstance(mask, Image.Image):
        raise InvalidInputError(f"the mask must be a PIL image, got {type(mask).__name__}")
    _, hi = mask.convert("L").getextrema()
    if hi == 0:
        raise InvalidInputError(
            "the mask is all black: nothing to repaint. Paint the area to change in white (or pass "
            "invert_mask=True if your mask marks the area to keep)"
        )


# -- requests -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What every pipeline needs: prompts, size, sampler, guidance, seeds, batching and output options.

    `prompt` / `negative_prompt` are one string for every image, or a list with one entry per batch item
    (length batch_size, reused in every batch) or per image (length batch_size * batch_count); both are
    read in A1111's prompt language. `emphasis` is A1111's setting of that name (one of
    `kuas.prompts.conditioning.EMPHASIS_MODES`: "Original", "No norm", "Ignore", "None").
    `noise_schedule` is A1111's "Noise schedule for sampling": "Default" or "Zero Terminal SNR" (for models
    trained on it); None samples on the schedule the model file names.
    `tome_ratio` (token merging, 0 = off, up to 0.75) and `deepcache_interval` (step caching: the whole U-Net
    every N-th call, 1 = off) are the opt-in speedups of `kuas.speedups`, attached for each sampling run.
    """

    prompt: str | tuple[str, ...] = ""
    negative_prompt: str | tuple[str, ...] = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    scheduler: str = "Automatic"
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    skip_early_cfg: float = 0.0
    eta: float | None = None
    tiling: bool = False
    vae_tiling: bool | None = None
    watermark: bool = True
    emphasis: str = "Original"
    noise_schedule: str | None = None
    tome_ratio: float = 0.0
    deepcache_interval: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _prompt_list("prompt", self.prompt))
        object.__setattr__(self, "negative_prompt", _prompt_list("negative_prompt", self.negative_prompt))
        check_size(self.width, self.height)
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_float("cfg_scale", self.cfg_scale)
        self.sampler_spec()  # raises with the list of valid sampler / schedule names
        for name in ("seed", "subseed"):
            value = getattr(self, name)
            if not _is_int(value) or not (value == -1 or 0 <= value < SEED_LIMIT):
                raise InvalidInputError(
                    f"{name} must be -1 (random) or an integer from 0 to {SEED_LIMIT - 1}, got {value!r}"
                )
        _check_float("subseed_strength", self.subseed_strength, 0.0, 1.0)
        _check_int(
            "batch_size",
            self.batch_size,
            1,
            MAX_BATCH_SIZE,
            "; use batch_count for more images (batches run one after the other)",
        )
        _check_int("batch_count", self.batch_count, 1, MAX_BATCH_COUNT)
        if self.seed != -1 and self.seed + self.image_count > SEED_LIMIT:
            raise InvalidInputError(
                f"seed {self.seed} + {self.image_count} images passes {SEED_LIMIT}; use a smaller seed"
            )
        _check_int("clip_skip", self.clip_skip, 1, 48)
        _check_float("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _check_float("skip_early_cfg", self.skip_early_cfg, 0.0, 1.0)
        if self.eta is not None:
            _check_float("eta", self.eta, 0.0)
        for name in ("tiling", "watermark"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.vae_tiling is not None and not isinstance(self.vae_tiling, bool):
            raise InvalidInputError(
                f"vae_tiling must be True, False or None (automatic), got {self.vae_tiling!r}"
            )
        if self.noise_schedule is not None and self.noise_schedule not in NOISE_SCHEDULES:
            raise InvalidInputError(
                f"noise_schedule must be one of {', '.join(repr(m) for m in NOISE_SCHEDULES)} or None (the "
                f"model's own), got {self.noise_schedule!r}"
            )
        if self.emphasis not in EMPHASIS_MODES:
            raise InvalidInputError(
                f"emphasis must be one of {', '.join(repr(m) for m in EMPHASIS_MODES)}, got {self.emphasis!r}"
            )
        for name in ("prompt", "negative_prompt"):
            self.prompts_for(name)  # list lengths must fit the batch
        _check_float("tome_ratio", self.tome_ratio, 0.0, MAX_TOME_RATIO)
        _check_int("deepcache_interval", self.deepcache_interval, 1, MAX_STEPS, " (1 = no step caching)")

    @property
    def image_count(self) -> int:
        return self.batch_size * self.batch_count

    @property
    def decode_tiling(self) -> bool | None:
        """VAE tiling for decoding: as asked, else automatic (None), except with seamless `tiling`, whose
        wrap-around a tiled decode would break (then off unless asked for)."""
        if self.vae_tiling is None and self.tiling:
            return False
        return self.vae_tiling

    def sampler_spec(self) -> tuple[SamplerSpec, str]:
        """(sampler spec, schedule key) of `sampler` and `scheduler`."""
        return resolve_sampler(self.sampler, self.scheduler)

    def prompts_for(self, name: str = "prompt") -> list[str]:
        """One prompt (or negative prompt) per image, in image order."""
        value = getattr(self, name)
        n = self.image_count
        if isinstance(value, str):
            return [value] * n
        if len(value) == n:
            return list(value)
        if len(value) == self.batch_size:
            return list(value) * self.batch_count
        raise InvalidInputError(
            f"got {len(value)} {name}s for batch_size={self.batch_size} and batch_count={self.batch_count}: "
            f"pass one string, {self.batch_size} (one per batch item) or {n} (one per image); to give each of "
            f"{len(value)} prompts its own image, set batch_size={len(value)}"
        )


@dataclass(frozen=True)
class Txt2ImgRequest(Request):
    """txt2img, with A1111's hires fix: a second img2img pass at `hr_scale` times the size."""

    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_second_pass_steps: int = 0
    hr_denoising_strength: float = 0.7
    hr_upscaler: str = "Latent"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.enable_hr, bool):
            raise InvalidInputError(f"enable_hr must be True or False, got {self.enable_hr!r}")
        if not self.enable_hr:
            return
        _check_float("hr_scale", self.hr_scale, 1.0, float(MAX_SIDE))
        _check_int("hr_second_pass_steps", self.hr_second_pass_steps, 0, MAX_STEPS, " (0 = same as steps)")
        if self.hr_upscaler not in HR_UPSCALERS:
            raise InvalidInputError(
                f"unknown hr_upscaler {self.hr_upscaler!r}; valid: {', '.join(HR_UPSCALERS)}"
            )
        check_strength("hr_denoising_strength", self.hr_denoising_strength, self.hr_steps, allow_zero=False)
        check_size(*self.hr_size, what="hires fix target")

    @property
    def hr_steps(self) -> int:
        return self.hr_second_pass_steps or self.steps

    @property
    def hr_size(self) -> tuple[int, int]:
        """(width, height) of the second pass: int(size * hr_scale), rounded down to a multiple of 8 as the
        latent upscale does in A1111."""
        return (
            int(self.width * self.hr_scale) // SIZE_MULTIPLE * SIZE_MULTIPLE,
            int(self.height * self.hr_scale) // SIZE_MULTIPLE * SIZE_MULTIPLE,
        )


def _resize_mode(value: Any) -> str:
    if _is_int(value) and 0 <= value < len(RESIZE_MODES):
        return RESIZE_MODES[int(value)]
    if isinstance(value, str) and value.strip().lower() in RESIZE_MODES:
        return value.strip().lower()
    raise InvalidInputError(
        f"unknown resize_mode {value!r}; valid: "
        + ", ".join(f"{i} or {name!r}" for i, name in enumerate(RESIZE_MODES))
    )


@dataclass(frozen=True)
class Img2ImgRequest(Request):
    """img2img: `strength` (A1111's denoising strength) runs the last int(steps * strength) steps.

    strength 0 runs nothing and returns the input; `resize_mode` is a name of `RESIZE_MODES` or its index.
    """

    strength: float = 0.75
    resize_mode: str = "just resize"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_strength("strength", self.strength, self.steps, allow_zero=self.allow_zero_strength)
        object.__setattr__(self, "resize_mode", _resize_mode(self.resize_mode))

    @property
    def allow_zero_strength(self) -> bool:
        return True


def _fill_mode(value: Any, name: str, modes: tuple[str, ...]) -> str:
    if _is_int(value) and 0 <= value < len(modes):
        return modes[int(value)]
    if isinstance(value, str) and value.strip().lower() in modes:
        return value.strip().lower()
    raise InvalidInputError(
        f"unknown {name} {value!r}; valid: " + ", ".join(f"{i} or {m!r}" for i, m in enumerate(modes))
    )


@dataclass(frozen=True)
class InpaintRequest(Img2ImgRequest):
    """Inpainting: `mask` (L, white = repaint, already inverted if asked) plus A1111's inpaint options."""

    fill_modes: ClassVar[tuple[str, ...]] = FILL_MODES

    mask: Image.Image | None = dataclasses.field(default=None, compare=False, repr=False)
    mask_blur: int = 4
    inpainting_fill: str = "original"
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    latent_blend: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("mask_blur", self.mask_blur, 0, 256)
        object.__setattr__(
            self, "inpainting_fill", _fill_mode(self.inpainting_fill, "inpainting_fill", self.fill_modes)
        )
        for name in ("inpaint_full_res", "latent_blend"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("inpaint_full_res_padding", self.inpaint_full_res_padding, 0, MAX_SIDE)
        if self.mask is not None:
            validate_mask(self.mask)

    @property
    def allow_zero_strength(self) -> bool:
        return False  # repainting nothing is not inpainting


@dataclass(frozen=True)
class OutpaintRequest(InpaintRequest):
    """Outpainting: extend the canvas by left/right/top/bottom pixels and inpaint the new area.

    `overlap`: how far (pixels) the repainted area reaches into the original picture so that the new part
    joins it smoothly; the original pixels are pasted back exactly afterwards.
    """

    fill_modes: ClassVar[tuple[str, ...]] = OUTPAINT_FILLS

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    overlap: int = 8
    inpainting_fill: str = "fill"

    def __post_init__(self) -> None:
        for name in ("left", "right", "top", "bottom"):
            _check_int(name, getattr(self, name), 0, MAX_SIDE)
        if not (self.left or self.right or self.top or self.bottom):
            raise InvalidInputError(
                "outpaint needs at least one of left, right, top, bottom > 0 (pixels to add)"
            )
        _check_int("overlap", self.overlap, 0, MAX_SIDE)
        super().__post_init__()

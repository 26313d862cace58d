"""Model families: what a checkpoint is, read from its keys and shapes, matched against a registry.

A family fixes everything the weights alone do not say: which text encoders feed the U-Net and how
(layer, final norm, padding), the latent scale factor, the native resolution and the prediction type.
Sizes are free: a tiny model in the SD1 layout is family "sd1" like the 860M-parameter original, so
kuas' own small models load through the same code as the official ones.

Detection looks at structure only: which text encoders are present (by key prefix), the U-Net's input
channels (4 plain, 9 inpainting, 5 depth) and whether it takes SDXL's vector conditioning `y`. Exactly
one registry entry must match, except that SD 2.x eps and v-prediction models have identical weights:
for those the prediction type comes from an explicit argument, a sidecar `.yaml`, the file's ModelSpec
metadata, then a logged guess (see `kuas.checkpoints.loading.resolve_prediction`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from kuas.errors import CheckpointError
from kuas.models.clip import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, CLIPTextConfig
from kuas.models.unet import (
    SD1_INPAINT_UNET,
    SD1_UNET,
    SD2_DEPTH_UNET,
    SD2_INPAINT_UNET,
    SD2_UNET,
    SDXL_REFINER_UNET,
    SDXL_UNET,
    UNetConfig,
)
from kuas.models.vae import SD_VAE, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and how its output conditions the U-Net.

    kind: "clip" (OpenAI CLIP, transformers key layout) or "openclip" (open_clip layout).
    prefix: where its keys live in a single-file checkpoint.
    layer / final_norm: which hidden state feeds the U-Net (see `kuas.models.clip`).
    pad_with: "eos" (OpenAI tokenizer convention) or "zero" (open_clip).
    pooled: whether its pooled, projected output is part of SDXL's vector conditioning.
    name: the component name on `StableDiffusion` and in diffusers folders.
    """

    kind: str
    prefix: str
    layer: int
    final_norm: bool
    pad_with: str
    pooled: bool
    name: str
    config: CLIPTextConfig


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # ModelSpec `modelspec.architecture`
    text_encoders: tuple[TextEncoderSpec, ...]
    in_channels: int
    vector_conditioning: bool  # SDXL's `y` (pooled text + size embeddings)
    prediction: str  # "eps" or "v"
    latent_scale: float
    resolution: int
    unet: UNetConfig  # the full-size reference config, used by `kuas.create`
    vae: VAEConfig = SD_VAE
    refiner: bool = False

    @property
    def is_inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def is_depth(self) -> bool:
        return self.in_channels == 5

    @property
    def is_sdxl(self) -> bool:
        return self.vector_conditioning

    def signature(self) -> tuple:
        """The facts detection can read from weights; eps/v twins share one."""
        return (tuple((t.kind, t.prefix) for t in self.text_encoders), self.in_channels, self.vector_conditioning)


_SD1_TE = TextEncoderSpec("clip", "cond_stage_model.transformer.", -1, True, "eos", False, "text_encoder", CLIP_L)
_SD2_TE = TextEncoderSpec("openclip", "cond_stage_model.model.", -2, True, "zero", False, "text_encoder", OPENCLIP_H)
_XL_TE1 = TextEncoderSpec("clip", "conditioner.embedders.0.transformer.", -2, False, "eos", False, "text_encoder", CLIP_L)
_XL_TE2 = TextEncoderSpec(
    "openclip", "conditioner.embedders.1.model.", -2, False, "zero", True, "text_encoder_2", OPENCLIP_BIGG
)
_XL_REFINER_TE = TextEncoderSpec(
    "openclip", "conditioner.embedders.0.model.", -2, False, "zero", True, "text_encoder_2", OPENCLIP_BIGG
)
_XL_INPAINT_UNET = dataclasses.replace(SDXL_UNET, in_channels=9)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("sd1", "stable-diffusion-v1", (_SD1_TE,), 4, False, "eps", 0.18215, 512, SD1_UNET),
        Family("sd1-inpaint", "stable-diffusion-v1-inpainting", (_SD1_TE,), 9, False, "eps", 0.18215, 512,
               SD1_INPAINT_UNET),
        Family("sd2", "stable-diffusion-v2-512", (_SD2_TE,), 4, False, "eps", 0.18215, 512, SD2_UNET),
        Family("sd2-v", "stable-diffusion-v2-768-v", (_SD2_TE,), 4, False, "v", 0.18215, 768, SD2_UNET),
        Family("sd2-inpaint", "stable-diffusion-v2-inpainting", (_SD2_TE,), 9, False, "eps", 0.18215, 512,
               SD2_INPAINT_UNET),
        Family("sd2-depth", "stable-diffusion-v2-depth", (_SD2_TE,), 5, False, "eps", 0.18215, 512, SD2_DEPTH_UNET),
        Family("sdxl", "stable-diffusion-xl-v1-base", (_XL_TE1, _XL_TE2), 4, True, "eps", 0.13025, 1024, SDXL_UNET),
        Family("sdxl-inpaint", "stable-diffusion-xl-v1-inpainting", (_XL_TE1, _XL_TE2), 9, True, "eps", 0.13025,
               1024, _XL_INPAINT_UNET),
        Family("sdxl-refiner", "stable-diffusion-xl-v1-refiner", (_XL_REFINER_TE,), 4, True, "eps", 0.13025, 1024,
               SDXL_REFINER_UNET, refiner=True),
    ]
}

# Families whose weights cannot be told apart: the prediction type decides (eps first).
PREDICTION_TWINS = {"sd2": {"eps": "sd2", "v": "sd2-v"}}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(None, f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_by_architecture(architecture: str) -> Family | None:
    for f in FAMILIES.values():
        if f.architecture == architecture:
            return f
    return None


def detect_family(keys: Iterable[str], unet_in_channels: int, path: str | None = None) -> list[Family]:
    """Families whose structure matches a checkpoint's keys.

    Returns the single matching family, or eps/v twins (same weights) for the caller to resolve.
    Raises CheckpointError naming what was found when nothing or several unrelated entries match.
    """
    keys = list(keys)
    prefixes = {p for f in FAMILIES.values() for t in f.text_encoders for p in [t.prefix]}
    present = {p for p in prefixes if any(k.startswith(p) for k in keys)}
    # SDXL base's second encoder prefix also starts with "conditioner.embedders.": compare exact sets.
    has_y = any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys)
    found = []
    for f in FAMILIES.values():
        wanted = {t.prefix for t in f.text_encoders}
        if wanted == present and f.in_channels == unet_in_channels and f.vector_conditioning == has_y:
            found.append(f)
    if not found:
        what = ", ".join(sorted(present)) or "no known text encoder"
        raise CheckpointError(
            path,
            f"not a Stable Diffusion checkpoint kuas knows: text encoders found: {what}; U-Net input channels "
            f"{unet_in_channels}; SDXL vector conditioning {'yes' if has_y else 'no'}. Known families: "
            f"{', '.join(FAMILIES)} (an 8-channel U-Net is InstructPix2Pix, which kuas does not support yet)",
        )
    sigs = {f.signature() for f in found}
    if len(sigs) > 1:  # the registry itself is ambiguous: a bug, caught by a test
        raise CheckpointError(path, f"ambiguous family: {', '.join(f.name for f in found)}")
    return found

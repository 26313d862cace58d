"""Reading a Stable Diffusion checkpoint into what building the model needs, without building it.

`read_checkpoint(path)` returns a `CheckpointContents`: every weight under its official single-file
key (a diffusers folder goes through the key table first), the metadata, and what the source says about
configs, text-encoder layers and the prediction type. `analyse(contents)` then decides the family,
the prediction type (with where that came from) and each network's config. `kuas.load` builds and
fills the networks from an `Analysis`; `kuas info` prints one (from a header-only read: no weights).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kuas.checkpoints.families import (
    PREDICTION_TWINS,
    UNET_PREFIX,
    VAE_PREFIX,
    Family,
    detect_family,
    get_family,
)
from kuas.checkpoints.metadata import KUAS_CONFIG_KEY, prediction_from_metadata
from kuas.checkpoints.state_dict import V_PRED_MARKER_KEY, ZTSNR_MARKER_KEY
from kuas.errors import CheckpointError
from kuas.models.clip import CLIPTextConfig, infer_clip_config, infer_openclip_config
from kuas.models.unet import UNetConfig, infer_unet_config
from kuas.models.vae import VAEConfig, infer_vae_config

log = logging.getLogger(__name__)


@dataclass
class CheckpointContents:
    """Weights under official single-file keys plus what the source says beyond its tensors."""

    path: str
    format: str  # "safetensors", "torch-zip", "diffusers-folder"
    weights: Mapping[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)  # "unet"/"vae"/text encoder name -> config
    latent_scale: float | None = None
    text_layers: dict[str, tuple[int, bool]] = field(default_factory=dict)  # overrides of the family's
    prediction: str | None = None  # what the source itself says, if anything
    prediction_source: str = ""
    has_ema: bool = False
    zero_terminal_snr: bool = False  # trained on (so to be sampled on) the zero-terminal-SNR schedule


@dataclass
class Analysis:
    contents: CheckpointContents
    family: Family
    prediction: str
    prediction_source: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: dict[str, CLIPTextConfig]

    @property
    def latent_scale(self) -> float:
        return self.contents.latent_scale or self.family.latent_scale


def read_checkpoint(path: str | os.PathLike, *, header_only: bool = False) -> CheckpointContents:
    """All weights of a single file or diffusers folder under official keys (zero-copy where possible).

    With `header_only` a safetensors file gives `meta` tensors (shapes and dtypes only, nothing read).
    """
    from kuas.checkpoints.formats import detect_format

    fmt = detect_format(path)
    if fmt == "diffusers-folder":
        return _read_diffusers(path)
    return _read_single_file(path, fmt, header_only=header_only)


def _read_single_file(path, fmt: str, *, header_only: bool) -> CheckpointContents:
    from kuas.checkpoints.safetensors_io import read_safetensors_header
    from kuas.checkpoints.state_dict import ema_state_dict, read_state_dict

    if header_only and fmt == "safetensors":
        entries, metadata = read_safetensors_header(path)
        raw: Mapping[str, Tensor] = {k: torch.empty(e.shape, dtype=e.torch_dtype, device="meta")
                                     for k, e in entries.items()}
    else:
        raw = read_state_dict(path)
        metadata = dict(raw.metadata)
    has_ema = any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in raw)
    weights = ema_state_dict(raw) if has_ema and not header_only else raw
    contents = CheckpointContents(os.fspath(path), fmt, weights, dict(metadata), has_ema=has_ema)
    if V_PRED_MARKER_KEY in weights:
        contents.prediction, contents.prediction_source = "v", f"{V_PRED_MARKER_KEY!r} marker key"
    contents.zero_terminal_snr = ZTSNR_MARKER_KEY in weights
    text = metadata.get(KUAS_CONFIG_KEY)
    if text:  # kuas' own files: the exact configs (heads and norm groups are not in the shapes)
        try:
            kc = json.loads(text)
            contents.configs["unet"] = UNetConfig.from_dict(kc["unet"])
            contents.configs["vae"] = VAEConfig.from_dict(kc["vae"])
            for name, te in kc.get("text_encoders", {}).items():
                contents.configs[name] = CLIPTextConfig.from_dict(te["config"])
                contents.text_layers[name] = (int(te["layer"]), bool(te["final_norm"]))
            contents.latent_scale = float(kc["latent_scale"]) if kc.get("latent_scale") else None
            if kc.get("prediction") in ("eps", "v"):
                contents.prediction, contents.prediction_source = kc["prediction"], "kuas metadata"
            contents.zero_terminal_snr = contents.zero_terminal_snr or bool(kc.get("zero_terminal_snr", False))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(path, f"has a malformed {KUAS_CONFIG_KEY} metadata entry ({e}); re-save it "
                                        f"with kuas or remove that entry") from None
    return contents


def _read_diffusers(path) -> CheckpointContents:
    """A diffusers folder as official-layout tensors (through the explicit key table) plus configs."""
    from kuas.checkpoints.diffusers_keys import read_diffusers_folder

    folder = read_diffusers_folder(path)
    comps = folder.components
    contents = CheckpointContents(os.fspath(path), "diffusers-folder", {})
    contents.prediction = "v" if folder.prediction_type == "v_prediction" else "eps"
    contents.prediction_source = "scheduler_config.json"
    contents.zero_terminal_snr = bool((folder.scheduler_config or {}).get("rescale_betas_zero_snr", False))
    te1, te2 = comps.get("text_encoder"), comps.get("text_encoder_2")
    if te1 and te2:
        prefixes = {"text_encoder": "conditioner.embedders.0.transformer.",
                    "text_encoder_2": "conditioner.embedders.1.model."}
    elif te2:  # SDXL refiner: only the OpenCLIP bigG encoder
        prefixes = {"text_encoder_2": "conditioner.embedders.0.model."}
    elif te1 and te1.extras.get("layout") == "openclip":
        prefixes = {"text_encoder": "cond_stage_model.model."}
    else:
        prefixes = {"text_encoder": "cond_stage_model.transformer."}
    weights: dict[str, Tensor] = {}
    for name, comp in comps.items():
        prefix = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}.get(name) or prefixes[name]
        weights.update({prefix + k: v for k, v in comp.tensors.items()})
        contents.configs[name] = comp.config
        if comp.extras.get("last_layer_is_penultimate"):  # SD2: diffusers dropped OpenCLIP's last layer
            contents.text_layers[name] = (-1, True)
    if "vae" in comps and comps["vae"].extras.get("scaling_factor"):
        contents.latent_scale = float(comps["vae"].extras["scaling_factor"])
    for note in folder.notes:
        log.info("%s: %s", path, note)
    contents.weights = weights
    return contents


def sidecar_prediction(path: str | os.PathLike) -> str | None:
    """`parameterization: "v"` in a `.yaml` next to the checkpoint (the reference configs' convention)."""
    p = Path(path)
    for yaml_path in (p.with_suffix(".yaml"), p.with_suffix(".yml")):
        if yaml_path.is_file() and yaml_path.stat().st_size < 1_000_000:
            text = yaml_path.read_text(errors="replace")
            m = re.search(r"^\s*parameterization\s*:\s*[\"']?(\w+)", text, re.MULTILINE)
            if m:
                return "v" if m.group(1).lower() in ("v", "v_prediction") else "eps"
            return "eps"  # a reference yaml without the key means eps
    return None


def guess_prediction(weights: Mapping[str, Tensor]) -> str:
    """SD 2.x v-models' last output block norm biases are far from zero (an observed weight statistic,
    used by ComfyUI too). A guess, logged as such by the caller."""
    t = weights.get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
    if t is not None and t.device.type != "meta" and float(t.float().std(unbiased=False)) > 0.09:
        return "v"
    return "eps"


def analyse(contents: CheckpointContents, *, prediction: str | None = None) -> Analysis:
    """Family, prediction type and network configs of a checkpoint."""
    path, weights = contents.path, contents.weights
    probe = UNET_PREFIX + "input_blocks.0.0.weight"
    if probe not in weights:
        raise CheckpointError(path, f"has no Stable Diffusion U-Net (no {probe!r}); is it a VAE, LoRA, "
                                    f"embedding or another kind of model?")
    candidates = detect_family(weights.keys(), int(weights[probe].shape[1]), path=path)
    # eps/v twins: explicit argument, sidecar yaml, ModelSpec metadata, the source's own word, a guess
    pred, source = prediction, "argument"
    if pred is None and len(candidates) > 1:
        pred, source = sidecar_prediction(path), "sidecar yaml"
        if pred is None:
            pred, source = prediction_from_metadata(contents.metadata), "ModelSpec metadata"
        if pred is None and contents.prediction:
            pred, source = contents.prediction, contents.prediction_source
        if pred is None:
            pred, source = guess_prediction(weights), "guess"
            log.warning("%s: SD 2.x weights do not say whether they predict eps or v; guessing %r. Pass "
                        "prediction='eps' or 'v' (CLI: --prediction) if images look wrong.", path, pred)
    if len(candidates) > 1:
        fam = get_family(PREDICTION_TWINS[candidates[0].name][pred])
    else:
        fam = candidates[0]
        if pred is None:
            pred, source = contents.prediction, contents.prediction_source
        if pred is None:
            pred, source = prediction_from_metadata(contents.metadata), "ModelSpec metadata"
        if pred is None:
            pred, source = fam.prediction, f"family {fam.name}"
    unet = contents.configs.get("unet") or infer_unet_config(weights, UNET_PREFIX)
    vae = contents.configs.get("vae") or infer_vae_config(weights, VAE_PREFIX)
    tes = {}
    for spec in fam.text_encoders:
        infer = infer_clip_config if spec.kind == "clip" else infer_openclip_config
        tes[spec.name] = contents.configs.get(spec.name) or infer(weights, spec.prefix)
    check_leftovers(contents, fam)
    return Analysis(contents, fam, pred, source, unet, vae, tes)


def check_leftovers(contents: CheckpointContents, family: Family) -> None:
    """Keys that belong to no network of the family and are not known harmless extras are an error."""
    from kuas.checkpoints.state_dict import DEFAULT_ALLOWED_EXTRA, describe_keys

    prefixes = (UNET_PREFIX, VAE_PREFIX, *(s.prefix for s in family.text_encoders))
    stray = [k for k in contents.weights if not k.startswith(prefixes)
             and not any(fnmatchcase(k, p) or fnmatchcase(k.split(".", 1)[-1], p) for p in DEFAULT_ALLOWED_EXTRA)]
    if stray:
        raise CheckpointError(contents.path, "has keys that belong to no part of the model: "
                                             + "; ".join(describe_keys("unexpected", stray)))

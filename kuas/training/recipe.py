"""Training recipes: one JSON file that says everything about a model trained from scratch.

A recipe names the family (the single-file layout the result is saved in), the prediction type, the
network configs, the data and, per stage, the loop settings. `kuas train --recipe builtin` uses the
recipe that produced the weights shipped inside kuas; `kuas train --recipe my.json` any other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kuas.errors import InvalidInputError
from kuas.training.loop import LoopConfig

STAGES = ("vae", "text", "unet")

# The settings each stage reads besides "loop" (kuas.training.stages). A recipe naming anything else is
# refused, so a misspelt option cannot silently train with the default.
STAGE_OPTIONS = {
    "vae": ("crop", "loss", "data_echo", "gradient_checkpointing"),
    "text": ("cell_targets", "context_tokens"),
    "unet": ("cfg_dropout", "min_snr_gamma", "snr_offset", "timestep_importance", "input_perturbation",
             "text_lr_scale", "text_freeze_steps", "text_attribute_weight", "gradient_checkpointing", "channels_last",
             "eval_every", "eval_n", "latent_cache", "latent_cache_precision", "kind_weights"),
}

# The data settings each data kind reads (kuas.training.data.make_source), refused otherwise likewise.
DATA_OPTIONS = {
    "world": ("size", "seed", "canonical_prob", "kind_weights", "count_layout"),
    "folder": ("path", "size", "seed"),
}


@dataclass
class Recipe:
    name: str
    family: str = "sd1"
    prediction: str = "v"
    # train on SD's schedule rescaled to zero terminal SNR (Lin et al. 2024; v-prediction only): the model
    # then learns what to draw from pure noise, and its file tells samplers to use that schedule
    zero_terminal_snr: bool = False
    resolution: int = 128
    seed: int = 0
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "world"})
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    sample_prompts: list[str] = field(default_factory=list)
    sample: dict[str, Any] = field(default_factory=dict)  # steps, cfg_scale, sampler for grids/evaluation
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.zero_terminal_snr, bool):
            raise InvalidInputError(f"recipe {self.name!r}: 'zero_terminal_snr' must be true or false")
        if self.zero_terminal_snr and self.prediction != "v":
            raise InvalidInputError(
                f"recipe {self.name!r}: zero_terminal_snr needs \"prediction\": \"v\" (at zero SNR an eps "
                f"model's target tells nothing about the image)")
        if not isinstance(self.data, dict) or self.data.get("kind", "world") not in DATA_OPTIONS:
            raise InvalidInputError(
                f"recipe {self.name!r}: 'data' must be an object whose \"kind\" is one of {', '.join(DATA_OPTIONS)}")
        known = DATA_OPTIONS[self.data.get("kind", "world")]
        unknown = sorted(set(self.data) - {"kind", *known})
        if unknown:
            raise InvalidInputError(
                f"recipe {self.name!r}, data: unknown setting(s) {', '.join(map(repr, unknown))}; known: kind, "
                f"{', '.join(known)}")
        if self.data.get("kind") == "folder" and not self.data.get("path"):
            raise InvalidInputError(f"recipe {self.name!r}, data: a \"folder\" source needs \"path\" (the folder of "
                                    f"images and same-name .txt captions)")
        if not isinstance(self.stages, dict):
            raise InvalidInputError(f"recipe {self.name!r}: 'stages' must be an object with keys among {STAGES}")
        for stage, spec in self.stages.items():
            if stage not in STAGE_OPTIONS:
                raise InvalidInputError(f"recipe {self.name!r}: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
            if not isinstance(spec, dict):
                raise InvalidInputError(f"recipe {self.name!r}, stage {stage!r}: settings must be an object")
            unknown = sorted(set(spec) - {"loop", *STAGE_OPTIONS[stage]})
            if unknown:
                raise InvalidInputError(
                    f"recipe {self.name!r}, stage {stage!r}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                    f"known: loop, {', '.join(STAGE_OPTIONS[stage])}")

    def loop(self, stage: str) -> LoopConfig:
        spec = dict(self.stages.get(stage, {}).get("loop", {}))
        spec.setdefault("seed", self.seed)
        if "betas" in spec:
            spec["betas"] = tuple(spec["betas"])
        try:
            return LoopConfig(**spec)
        except TypeError as e:
            raise InvalidInputError(f"recipe {self.name!r}, stage {stage!r}: bad loop settings ({e})") from None

    def stage_options(self, stage: str) -> dict[str, Any]:
        return {k: v for k, v in self.stages.get(stage, {}).items() if k != "loop"}

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A shipped recipe by name ("builtin") or a recipe JSON file."""
    p = Path(name_or_path)
    if p.is_file():
        text = p.read_text()
    elif p.suffix == ".json":
        raise InvalidInputError(f"{p}: recipe file not found")
    else:
        try:
            text = resources.files("kuas.training.recipes").joinpath(f"{name_or_path}.json").read_text()
        except FileNotFoundError:
            raise InvalidInputError(f"no shipped recipe named {name_or_path!r}; pass a recipe .json file") from None
    try:
        data = json.loads(text)
        return Recipe(**data)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(f"{name_or_path}: not a valid recipe ({e})") from None

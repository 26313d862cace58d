"""ModelSpec metadata (Stability AI's `modelspec.*` safetensors header keys) for what kuas saves.

Reference: the Stability-AI/ModelSpec README (spec 1.0.0). kuas writes the MUST keys
(`sai_model_spec`, `architecture`, `implementation`, `title`), the date, resolution and prediction type;
inpainting and depth models, which the spec's listing does not name, get architecture ids in its style
("stable-diffusion-v1-inpainting").
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from kuas.checkpoints.families import Family, family_by_architecture

MODELSPEC_VERSION = "1.0.0"
KUAS_CONFIG_KEY = "kuas.config"  # kuas' own description of the networks (JSON): heads, norm groups, layers
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # the key layout kuas writes
_PREDICTION_NAMES = {"eps": "epsilon", "v": "v"}


def modelspec_metadata(family: Family, *, prediction: str, title: str, resolution: int) -> dict[str, str]:
    arch = family.architecture
    if family.name in ("sd2", "sd2-v"):  # the spec names SD2 by its prediction type
        arch = "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": arch,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": _PREDICTION_NAMES[prediction],
    }


def prediction_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """'eps' / 'v' from `modelspec.prediction_type` or the architecture id, None when absent."""
    value = metadata.get("modelspec.prediction_type", "").strip().lower()
    if value in ("epsilon", "eps"):
        return "eps"
    if value in ("v", "v_prediction", "v-prediction"):
        return "v"
    fam = family_by_architecture(metadata.get("modelspec.architecture", ""))
    if fam is not None and fam.name in ("sd2", "sd2-v"):
        return fam.prediction
    return None

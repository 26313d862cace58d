"""`kuas info`: what a checkpoint is, from its header alone (no weights are read for safetensors)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

from kuas.checkpoints.families import UNET_PREFIX, VAE_PREFIX

log = logging.getLogger(__name__)


def describe(path: str | os.PathLike, *, prediction: str | None = None) -> dict[str, Any]:
    """A JSON-ready description: format, family, prediction (and its source), configs, dtypes,
    parameter counts per network, metadata."""
    from kuas.checkpoints.loading import read_checkpoint

    return describe_contents(read_checkpoint(path, header_only=True), prediction=prediction)


def describe_contents(contents, *, prediction: str | None = None) -> dict[str, Any]:
    """`describe` for already-read `CheckpointContents` (e.g. a state dict of meta tensors)."""
    from kuas.checkpoints.loading import analyse

    path = contents.path
    logger = logging.getLogger("kuas.checkpoints.loading")
    level = logger.level
    logger.setLevel(logging.ERROR)  # a missing eps/v statement is reported below, not warned about
    try:
        a = analyse(contents, prediction=prediction)
    finally:
        logger.setLevel(level)
    weights = contents.weights
    groups = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, **{s.name: s.prefix for s in a.family.text_encoders}}
    params = {name: sum(t.numel() for k, t in weights.items() if k.startswith(prefix)) for name, prefix in groups.items()}
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in weights.values())
    size = os.path.getsize(path) if os.path.isfile(path) else sum(
        f.stat().st_size for f in os.scandir(path) if f.is_file()) if os.path.isdir(path) else None
    pred = a.prediction if a.prediction_source != "guess" else None
    return {
        "path": os.fspath(path),
        "format": contents.format,
        "file_bytes": size,
        "family": a.family.name,
        "architecture": a.family.architecture,
        "prediction": pred or "not stated (SD 2.x eps and v weights look alike: pass --prediction)",
        "prediction_source": a.prediction_source if pred else None,
        "noise_schedule": "Zero Terminal SNR" if contents.zero_terminal_snr else "Default",
        "resolution": _resolution(contents.metadata) or a.family.resolution,
        "latent_scale": a.latent_scale,
        "ema_weights": contents.has_ema,
        "dtypes": dict(dtypes),
        "parameters": {**params, "total": sum(params.values())},
        "unet": a.unet.to_dict(),
        "vae": a.vae.to_dict(),
        "text_encoders": {n: c.to_dict() for n, c in a.text_encoders.items()},
        "metadata": dict(contents.metadata),
    }


def format_description(d: dict[str, Any]) -> str:
    """The description as aligned text for the terminal."""
    lines = [
        f"path          {d['path']}",
        f"format        {d['format']}" + (f" ({d['file_bytes'] / 1e6:.1f} MB)" if d.get("file_bytes") else ""),
        f"family        {d['family']} ({d['architecture']}, native {d['resolution']}x{d['resolution']})",
        f"prediction    {d['prediction']}" + (f"  [from {d['prediction_source']}]" if d.get("prediction_source") else ""),
        f"schedule      {d['noise_schedule']}",
        f"dtypes        {', '.join(f'{k} x{v}' for k, v in d['dtypes'].items())}",
        f"EMA weights   {'yes (used)' if d['ema_weights'] else 'no'}",
        f"latent scale  {d['latent_scale']}",
        "parameters    " + ", ".join(f"{k} {v:,}" for k, v in d["parameters"].items()),
    ]
    u = d["unet"]
    lines.append(
        f"unet          model_channels {u['model_channels']}, channel_mult {u['channel_mult']}, "
        f"res blocks {u['num_res_blocks']}, attention {u['attention_resolutions']}, depth {u['transformer_depth']}, "
        f"context {u['context_dim']}, in {u['in_channels']}" + (f", adm {u['adm_in_channels']}" if u.get("adm_in_channels") else "")
    )
    v = d["vae"]
    lines.append(f"vae           ch {v['ch']}, ch_mult {v['ch_mult']}, res blocks {v['num_res_blocks']}, latent {v['embed_dim']}")
    for name, t in d["text_encoders"].items():
        lines.append(f"{name:<13} width {t['width']}, layers {t['layers']}, heads {t['heads']}, {t['activation']}"
                     + (f", projection {t['projection_dim']}" if t.get("projection_dim") else ""))
    if d["metadata"]:
        lines.append("metadata")
        for k, v in sorted(d["metadata"].items()):
            v = " ".join(v.split())
            lines.append(f"  {k}: {v if len(v) <= 200 else v[:200] + f'... ({len(v)} chars)'}")
    return "\n".join(lines)


def _resolution(metadata: dict[str, str]) -> int | None:
    try:
        return int(metadata.get("modelspec.resolution", "").lower().split("x")[0])
    except ValueError:
        return None

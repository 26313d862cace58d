"""State dicts: read one from any accepted file, pick EMA weights, and load it into a module strictly.

Strict means a checkpoint either fits the module exactly or nothing is loaded: missing keys, unexpected keys
and shape mismatches are reported together, grouped by key prefix, in one `CheckpointError`. Only the
known-harmless extras of `DEFAULT_ALLOWED_EXTRA` (schedule buffers, EMA copies, position ids...) are ignored.
kuas never loads partially (A1111's ``strict=False`` hides a wrong model family behind garbage images).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from kuas.checkpoints.formats import StateDict, detect_format
from kuas.checkpoints.pickle_io import load_pickle
from kuas.checkpoints.safetensors_io import read_converted, read_safetensors
from kuas.errors import CheckpointError

__all__ = [
    "DEFAULT_ALLOWED_EXTRA",
    "DIFFUSERS_COMPONENTS",
    "V_PRED_MARKER_KEY",
    "ZTSNR_MARKER_KEY",
    "SkipMetaInit",
    "ema_state_dict",
    "load_into",
    "read_diffusers_folder_files",
    "read_state_dict",
    "unwrap_state_dict",
]

log = logging.getLogger(__name__)

# Empty marker tensors some community single files carry at the top level (ComfyUI reads both): "v_pred",
# the model predicts v; "ztsnr", it was trained on the zero-terminal-SNR schedule and must be sampled on it.
V_PRED_MARKER_KEY = "v_pred"
ZTSNR_MARKER_KEY = "ztsnr"

# Keys a checkpoint may carry that no kuas module has, matched (fnmatch) against the key after `prefix` is
# stripped. Everything else that does not fit is an error.
DEFAULT_ALLOWED_EXTRA: tuple[str, ...] = (
    # what the model is, as marker keys (read by `kuas.checkpoints.loading`)
    V_PRED_MARKER_KEY,
    ZTSNR_MARKER_KEY,
    # LDM's EMA copy of the U-Net (`model_ema.<name without dots>`) plus its decay/update counters; ignored
    # when the non-EMA weights are loaded (use `ema_state_dict` to load the EMA ones instead).
    "model_ema.*",
    # CLIP's constant position-id buffer (`...embeddings.position_ids`), absent from newer transformers.
    "*.position_ids",
    # OpenCLIP's contrastive temperature: unused for conditioning.
    "logit_scale",
    # LDM `DDPM.register_schedule` buffers: the noise schedule, which kuas recomputes.
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    # Training-only DDPM/LDM tensors: loss weights (persistent in older latent-diffusion code), the learned
    # log-variance (`learn_logvar`), and sgm's DiscreteDenoiser sigma table (SDXL).
    "lvlb_weights",
    "logvar",
    "denoiser.sigmas",
    # A VAE trained with LDM's LPIPS/discriminator loss keeps it under `first_stage_model.loss.*`.
    "loss.*",
)

# Sub-folders of a diffusers pipeline that hold weights kuas reads, and the file stems each one uses.
DIFFUSERS_COMPONENTS: Mapping[str, tuple[str, str]] = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}

_MAX_JSON_BYTES = 64 * 1024 * 1024


# ------------------------------------------------------------------------------------------------------
# Reading


def _has_tensors(obj: object) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def unwrap_state_dict(
    obj: Any, path: str | os.PathLike | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of an unpickled checkpoint and its top-level scalars (as metadata strings).

    Lightning/LDM checkpoints keep the weights under ``"state_dict"``; some training scripts use
    ``"model"`` or ``"module"``, taken when it is the only dict of tensors and the top level has none.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a pickled {type(obj).__name__}, not a dict of tensors")
    metadata = {
        k: str(v) for k, v in obj.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))
    }
    chosen: Mapping[Any, Any] = obj
    if _has_tensors(obj.get("state_dict")):
        chosen = obj["state_dict"]
    elif not _has_tensors(obj):
        wrapped = [k for k in ("model", "module") if _has_tensors(obj.get(k))]
        if len(wrapped) == 1:
            chosen = obj[wrapped[0]]
    tensors: dict[str, Tensor] = {}
    skipped = 0
    for k, v in chosen.items():
        if isinstance(k, str) and isinstance(v, Tensor):
            tensors[k] = v.detach() if isinstance(v, nn.Parameter) else v
        else:
            skipped += 1
    if not tensors:
        keys = ", ".join(repr(k)[:40] for k in list(obj)[:10])
        raise CheckpointError(
            path,
            f"contains no tensors at the top level or under 'state_dict'/'model'/'module' "
            f"(top-level keys: {keys}); is it an embedding or training state? Use load_pickle",
        )
    if skipped:
        log.debug("%s: skipped %d non-tensor entries of the state dict", path, skipped)
    return tensors, metadata


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """The tensors of a safetensors file or torch zip checkpoint, decided by content, never running code."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        if not os.fspath(path).lower().endswith(".safetensors"):
            log.info("%s is a safetensors file despite its name; reading it as safetensors", path)
        return read_safetensors(path)
    if fmt == "torch-zip":
        tensors, metadata = unwrap_state_dict(load_pickle(path), path)
        return StateDict(tensors, path=path, format="torch-zip", metadata=metadata)
    raise CheckpointError(path, "is a diffusers folder; read it with read_diffusers_folder_files(folder)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise CheckpointError(path, f"is larger than {_MAX_JSON_BYTES} bytes; not a config file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(
            path, f"is not a readable JSON file ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "must hold a JSON object")
    return data


def _read_sharded(index: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Merge the shards named by a ``*.index.json`` weight map (shard names must be plain file names)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(index, "has no valid 'weight_map' of tensor name -> shard file")
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if Path(shard).name != shard or shard in (".", "..") or "\\" in shard:
            raise CheckpointError(index, f"names shard {shard!r}, which is not a file in the same folder")
        part = read_state_dict(index.parent / shard)
        for k in part:
            if k in tensors:
                raise CheckpointError(index.parent / shard, f"repeats tensor {k!r} from another shard")
            tensors[k] = part[k]
        metadata.update(part.metadata)
    return tensors, metadata


def _candidates(stems: tuple[str, str], variant: str | None) -> list[str]:
    """File names to try, best first: the asked-for precision (default full) before the other, and within
    one precision safetensors before ``.bin``, single files before shard indexes."""
    st, pt = stems

    def names(tag: str | None) -> list[str]:
        t = f".{tag}" if tag else ""
        return [
            f"{st}{t}.safetensors",
            f"{st}{t}.safetensors.index.json",
            f"{pt}{t}.bin",
            f"{pt}{t}.bin.index.json",
        ]

    order = [variant, None] if variant else [None, "fp16"]
    return [n for tag in order for n in names(tag)]


def read_diffusers_folder_files(
    folder: str | os.PathLike, *, variant: str | None = None
) -> dict[str, StateDict]:
    """The weights and ``config.json`` of each component (unet, vae, text_encoder, text_encoder_2) present.

    For each component the first existing file wins: safetensors before ``.bin``, full precision before the
    ``fp16`` variant, unless `variant` (e.g. ``"fp16"``) asks for that variant first. Sharded weights
    (``*.index.json``) are merged. Each `StateDict` carries the component's config in ``.config``.
    """
    root = Path(folder)
    if detect_format(root) != "diffusers-folder":
        raise CheckpointError(root, "is not a diffusers folder")
    out: dict[str, StateDict] = {}
    for component, stems in DIFFUSERS_COMPONENTS.items():
        sub = root / component
        if not sub.is_dir():
            continue
        names = _candidates(stems, variant)
        found = next((sub / n for n in names if (sub / n).is_file()), None)
        if found is None:
            raise CheckpointError(sub, f"has no weights file; looked for {', '.join(names[:4])} and variants")
        if found.name.endswith(".index.json"):
            tensors, metadata = _read_sharded(found)
            sd = StateDict(tensors, path=found, format="diffusers-sharded", metadata=metadata)
        else:
            sd = read_state_dict(found)
        config = _read_json(sub / "config.json") if (sub / "config.json").is_file() else None
        out[component] = StateDict(sd, path=sd.path, format=sd.format, metadata=sd.metadata, config=config)
        log.debug("%s: %s from %s", root, component, found.name)
    if not out:
        raise CheckpointError(root, f"has none of the component folders {', '.join(DIFFUSERS_COMPONENTS)}")
    return out


# ------------------------------------------------------------------------------------------------------
# EMA


def ema_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """`state_dict` with every ``model.*`` weight replaced by its EMA copy when the checkpoint has one.

    LDM's ``LitEma`` stores the EMA of parameter ``model.<name>`` as ``model_ema.<name with the dots
    removed>`` (e.g. ``model.diffusion_model.input_blocks.0.0.weight`` ->
    ``model_ema.diffusion_modelinput_blocks00weight``). The ``model_ema.*`` keys are dropped from the
    result; without them the input comes back unchanged. EMA weights are what the authors evaluate, so
    kuas uses them when present.
    """
    ema = {
        k[len("model_ema.") :]: k
        for k in state_dict
        if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")
    }
    path = getattr(state_dict, "path", None)
    fmt = getattr(state_dict, "format", "memory")
    metadata = getattr(state_dict, "metadata", None)
    spans = getattr(state_dict, "file_spans", None) or {}
    if not ema:
        if isinstance(state_dict, StateDict):
            return state_dict
        return StateDict(state_dict, path=path, format=fmt, metadata=metadata)
    owner: dict[str, str] = {}
    out: dict[str, Tensor] = {}
    out_spans = {}  # where each kept tensor's bytes are in the file: the EMA copy's span for swapped keys
    for key, value in state_dict.items():
        if key.startswith("model_ema."):
            continue
        source = key
        flat = key[len("model.") :].replace(".", "") if key.startswith("model.") else None
        if flat is not None and flat in ema:
            if flat in owner:
                raise CheckpointError(path, f"EMA key {ema[flat]!r} matches both {owner[flat]!r} and {key!r}")
            owner[flat] = key
            source = ema[flat]
            value = state_dict[source]
        out[key] = value
        if source in spans:
            out_spans[key] = spans[source]
    unused = len(ema) - len(owner)
    log.info(
        "%s: using EMA weights for %d tensors%s",
        path,
        len(owner),
        f" ({unused} EMA tensors matched no model weight)" if unused else "",
    )
    return StateDict(out, path=path, format=fmt, metadata=metadata, file_spans=out_spans)


# ------------------------------------------------------------------------------------------------------
# Building modules to load into

# In-place initialisers (the nn.init entry points and the Tensor methods they end in).
_INITIALISERS = frozenset({
    nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.constant_, nn.init.ones_,
    nn.init.zeros_, nn.init.eye_, nn.init.dirac_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
    nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.orthogonal_, nn.init.sparse_,
    Tensor.uniform_, Tensor.normal_, Tensor.fill_, Tensor.zero_, Tensor.random_, Tensor.bernoulli_,
    Tensor.exponential_, Tensor.log_normal_, Tensor.cauchy_, Tensor.geometric_,
})


class SkipMetaInit(TorchFunctionMode):
    """Within it, initialisers called on ``meta`` tensors return at once (they have no data to fill).

    Build modules on the meta device inside it before `load_into(..., assign=True)`. Without it their
    constructors still "initialise" the meta parameters, and torch runs a meta ``normal_`` (nn.Embedding's
    init) through its Python reference implementation, whose first call imports ``torch._dynamo``:
    ~1.5 s and ~70 MB (measured on 2 vCPUs) in a load that has nothing to compute. Everything else runs
    unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            # nn.init passes its tensor by keyword, Tensor methods as `self`
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------------------
# Strict loading


def _group_of(key: str) -> str:
    """The prefix a key is reported under: up to its first numeric component, else its first component."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1]) + ".*"
    return parts[0] + ".*" if len(parts) > 1 else key


def describe_keys(kind: str, keys: Iterable[str], max_groups: int = 12) -> list[str]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_group_of(key), []).append(key)
    parts = []
    for group, members in list(groups.items())[:max_groups]:
        if len(members) == 1:
            parts.append(f"{kind} 1 key {members[0]}")
        else:
            parts.append(f"{kind} {len(members)} keys under {group}")
    if len(groups) > max_groups:
        rest = sum(len(m) for m in list(groups.values())[max_groups:])
        parts.append(f"{kind} {rest} more keys in {len(groups) - max_groups} other groups")
    return parts


def _wanted(
    t: Tensor, target: Tensor, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    """The dtype and device the module wants for checkpoint tensor `t` loaded into `target`."""
    if target.is_floating_point() and t.is_floating_point():
        want_dtype = dtype or target.dtype
    else:
        want_dtype = target.dtype
    want_device = (
        torch.device(device)
        if device is not None
        else (t.device if target.device.type == "meta" else target.device)
    )
    return want_dtype, want_device


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    prefix: str = "",
    path: str | os.PathLike | None = None,
    allowed_extra: Iterable[str] = DEFAULT_ALLOWED_EXTRA,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    assign: bool = True,
    read_from_file: bool = False,
) -> None:
    """Load the keys of `state_dict` under `prefix` into `module`, all of them or nothing.

    Keys outside `prefix` belong to other components and are ignored. Inside it, every key of the module
    must be present with the same shape and every extra key must match an `allowed_extra` pattern, or a
    `CheckpointError` lists what is missing/unexpected/mismatched by prefix. Floating tensors take `dtype`
    (default: the module's) and `device` (default: the module's, or the tensor's for a ``meta`` module).
    With ``assign=True`` (works on modules built on the ``meta`` device) tensors whose dtype and device
    already match become the parameters themselves, e.g. zero-copy views of a memory-mapped file.
    With ``read_from_file=True`` tensors that change dtype or device are read from the state dict's file
    with plain reads (`read_converted`) rather than through its memory map, so the file's pages do not
    stay in this process's memory next to the converted copies (peak ~1x instead of ~1.5x for fp16 ->
    fp32); use it only on a state dict that nobody wrote into since it was read.
    """
    path = path if path is not None else getattr(state_dict, "path", None)
    patterns = tuple(allowed_extra)
    expected = module.state_dict(keep_vars=True)
    provided = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    missing = [k for k in expected if k not in provided]
    unexpected = [k for k in provided if k not in expected and not any(fnmatchcase(k, p) for p in patterns)]
    mismatched = [
        (k, tuple(provided[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in provided and tuple(provided[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = describe_keys("missing", missing) + describe_keys("unexpected", unexpected)
        for k, got, want in mismatched[:12]:
            parts.append(f"shape mismatch for {k}: checkpoint {got} vs model {want}")
        if len(mismatched) > 12:
            parts.append(f"{len(mismatched) - 12} more shape mismatches")
        where = f" under prefix {prefix!r}" if prefix else ""
        raise CheckpointError(
            path,
            f"does not fit {type(module).__name__}{where}: "
            + "; ".join(parts)
            + ". Is it the right model family/config and prefix? kuas never loads partially.",
        )

    wanted = {k: _wanted(provided[k], target, dtype, device) for k, target in expected.items()}
    from_file: dict[str, Tensor] = {}
    if read_from_file:
        groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for k, want in wanted.items():
            groups.setdefault(want, []).append(prefix + k)
        for (want_dtype, want_device), keys in groups.items():
            got = read_converted(state_dict, keys, dtype=want_dtype, device=want_device)
            from_file.update((k[len(prefix) :], v) for k, v in got.items())
    converted = {
        k: from_file.get(k, provided[k]).to(device=want_device, dtype=want_dtype)
        for k, (want_dtype, want_device) in wanted.items()
    }
    module.load_state_dict(converted, strict=True, assign=assign)

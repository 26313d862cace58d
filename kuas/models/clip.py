"""The CLIP text encoders of Stable Diffusion, in two key layouts.

- `CLIPTextModel`: OpenAI CLIP (ViT-L/14 text tower for SD 1.x and SDXL's first encoder) in the
  transformers layout the official files use, e.g. `text_model.encoder.layers.0.self_attn.q_proj.weight`
  (prefix `cond_stage_model.transformer.` or `conditioner.embedders.0.transformer.` stripped).
- `OpenCLIPTextModel`: OpenCLIP (ViT-H/14 for SD 2.x, ViT-bigG/14 for SDXL's second encoder) in the
  open_clip layout, e.g. `transformer.resblocks.0.attn.in_proj_weight` (prefix `cond_stage_model.model.`
  or `conditioner.embedders.1.model.` stripped).

Both are the same pre-LayerNorm causal transformer; they differ in key names, activation (quick_gelu
vs gelu) and projection. Which layer each family feeds the U-Net:

| family   | call                                             |
|----------|--------------------------------------------------|
| SD 1.x   | `layer=-1` (A1111 "CLIP skip N" = `layer=-N`), final norm on |
| SD 2.x   | `layer=-2`, final norm on                        |
| SDXL te1 | `layer=-2`, `final_norm=False`                   |
| SDXL te2 | `layer=-2`, `final_norm=False`, `return_pooled=True` (pooled = final-normed last layer at EOS @ projection) |

The files also carry harmless extras that are deliberately not parameters or buffers here:
`text_model.embeddings.position_ids` (CLIP) and `logit_scale` (OpenCLIP); a loader drops them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kuas.errors import CheckpointError, InvalidInputError

__all__ = [
    "CLIP_IGNORED_KEYS",
    "CLIP_L",
    "OPENCLIP_BIGG",
    "OPENCLIP_H",
    "OPENCLIP_IGNORED_KEYS",
    "CLIPTextConfig",
    "CLIPTextModel",
    "OpenCLIPTextModel",
    "TextEncoderOutput",
    "infer_clip_config",
    "infer_openclip_config",
]

CLIP_IGNORED_KEYS = ("text_model.embeddings.position_ids",)
"""Keys of official CLIP files that carry no weights (a constant position index)."""

OPENCLIP_IGNORED_KEYS = ("logit_scale",)
"""Keys of official OpenCLIP files used only by the image-text contrastive head."""

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text transformer. `projection_dim=None`: the model has no `text_projection`."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    context_length: int = 77
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    projection_dim: int | None = None
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "width", "layers", "heads", "context_length", "mlp_width"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"CLIPTextConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise InvalidInputError(f"CLIPTextConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.activation not in _ACTIVATIONS:
            raise InvalidInputError(f"CLIPTextConfig.activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise InvalidInputError(f"CLIPTextConfig.projection_dim must be positive or None, got {self.projection_dim}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CLIPTextConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown CLIPTextConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)


CLIP_L = CLIPTextConfig()
"""OpenAI CLIP ViT-L/14 text tower: SD 1.x and SDXL's first text encoder (123,060,480 parameters)."""

OPENCLIP_H = CLIPTextConfig(width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", projection_dim=1024)
"""OpenCLIP ViT-H/14 text tower: SD 2.x."""

OPENCLIP_BIGG = CLIPTextConfig(width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280)
"""OpenCLIP ViT-bigG/14 text tower: SDXL's second text encoder."""


class TextEncoderOutput(NamedTuple):
    hidden: Tensor
    """[B, T, width]: the requested layer's output (final-normed if asked)."""
    pooled: Tensor | None
    """[B, projection_dim or width]: the EOS feature of the final-normed last layer, projected when the
    model has a projection; None unless `return_pooled=True`."""


def _activation(name: str, x: Tensor) -> Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """[B, T, W] q/k/v -> [B, T, W], multi-head causal self-attention (scale 1/sqrt(head_dim))."""
    b, t, w = q.shape

    def split(x: Tensor) -> Tensor:
        return x.view(b, t, heads, w // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    return out.transpose(1, 2).reshape(b, t, w)


# ---- transformers layout (OpenAI CLIP) -------------------------------------------------------------


class _HFAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width, **dd)
        self.k_proj = nn.Linear(cfg.width, cfg.width, **dd)
        self.v_proj = nn.Linear(cfg.width, cfg.width, **dd)
        self.out_proj = nn.Linear(cfg.width, cfg.width, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(_causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class _HFMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width, **dd)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_activation(self.activation, self.fc1(x)))


class _HFLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.self_attn = _HFAttention(cfg, dd)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **dd)
        self.mlp = _HFMLP(cfg, dd)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _HFEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, **dd)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width, **dd)


class _HFEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.layers = nn.ModuleList(_HFLayer(cfg, dd) for _ in range(cfg.layers))


class _HFTextTransformer(nn.Module):
    """The `text_model.` level of the transformers layout."""

    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.embeddings = _HFEmbeddings(cfg, dd)
        self.encoder = _HFEncoder(cfg, dd)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **dd)


# ---- open_clip layout -------------------------------------------------------------------------------


class _OpenCLIPAttention(nn.Module):
    """Packed q/k/v projection as in `nn.MultiheadAttention` (rows: q, then k, then v)."""

    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width, **dd))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width, **dd))
        self.out_proj = nn.Linear(cfg.width, cfg.width, **dd)
        if self.in_proj_weight.device.type != "meta":
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.activation = cfg.activation
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width, **dd)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(_activation(self.activation, self.c_fc(x)))


class _OpenCLIPBlock(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **dd)
        self.attn = _OpenCLIPAttention(cfg, dd)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **dd)
        self.mlp = _OpenCLIPMLP(cfg, dd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, dd: dict):
        super().__init__()
        self.resblocks = nn.ModuleList(_OpenCLIPBlock(cfg, dd) for _ in range(cfg.layers))


# ---- shared forward -----------------------------------------------------------------------------------


class _TextEncoder(nn.Module):
    """Forward logic shared by both layouts; subclasses build the modules and name the pieces."""

    config: CLIPTextConfig

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False

    # Subclasses provide these views onto their modules.
    def _token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def _position_table(self) -> Tensor:
        raise NotImplementedError

    def _blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def _final_norm(self) -> nn.LayerNorm:
        raise NotImplementedError

    def _project(self, pooled: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self._token_embedding().weight.dtype

    @property
    def device(self) -> torch.device:
        return self._token_embedding().weight.device

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer layer in the backward pass (training only) to save memory."""
        self.gradient_checkpointing = bool(enabled)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token ids [B, T] -> token embeddings [B, T, width] (no positions yet).

        Ids outside the vocabulary raise instead of indexing out of range. Edit the result (e.g. put
        textual-inversion vectors in place of placeholder tokens) and pass it as `inputs_embeds`.
        """
        ids = self._check_ids(input_ids)
        return self._token_embedding()(ids)

    def _check_ids(self, input_ids: Tensor) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise InvalidInputError(f"input_ids must be a [batch, tokens] tensor, got {shape}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise InvalidInputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        vocab = self.config.vocab_size
        if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            lo, hi = int(input_ids.min()), int(input_ids.max())
            raise InvalidInputError(
                f"token ids must lie in [0, {vocab}) for this text encoder, got values from {lo} to {hi}; "
                "tokens added for textual inversion go in through inputs_embeds, not as new ids"
            )
        self._check_length(input_ids.shape[1])
        return input_ids.to(self.device)

    def _check_length(self, tokens: int) -> None:
        if not 1 <= tokens <= self.config.context_length:
            raise InvalidInputError(
                f"text encoder takes 1 to {self.config.context_length} tokens per sequence, got {tokens}; "
                "split longer prompts into chunks"
            )

    def _resolve_layer(self, layer: int) -> int:
        n = self.config.layers
        if not isinstance(layer, int) or not -n <= layer < n:
            raise InvalidInputError(
                f"layer must be an int in [{-n}, {n - 1}] for this {n}-layer text encoder "
                f"(-1 = last, -2 = penultimate), got {layer!r}"
            )
        return layer % n

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        layer: int = -1,
        final_norm: bool = True,
        return_pooled: bool = False,
        inputs_embeds: Tensor | None = None,
        eos_positions: Tensor | None = None,
    ) -> TextEncoderOutput:
        """Encode token ids [B, T] (T <= context_length).

        `layer` picks the transformer layer whose output is returned (0-based; negative counts from the
        end: -1 last, -2 penultimate); `final_norm` applies the final LayerNorm to it. Layers after it are
        skipped unless `return_pooled`, which also runs them to produce the pooled EOS feature.

        `inputs_embeds` [B, T, width] replaces the token embedding lookup (positions are still added);
        the EOS position for pooling is then `eos_positions` [B] or, if absent, `input_ids.argmax(-1)`
        (CLIP's EOS id 49407 is the largest id).
        """
        index = self._resolve_layer(layer)
        if inputs_embeds is None:
            if input_ids is None:
                raise InvalidInputError("pass input_ids or inputs_embeds")
            x = self.embed_tokens(input_ids)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.width:
                raise InvalidInputError(
                    f"inputs_embeds must be [batch, tokens, {self.config.width}], got {tuple(inputs_embeds.shape)}"
                )
            self._check_length(inputs_embeds.shape[1])
            x = inputs_embeds.to(device=self.device, dtype=self.dtype)
            if input_ids is not None:
                input_ids = self._check_ids(input_ids)
                if input_ids.shape != x.shape[:2]:
                    raise InvalidInputError(
                        f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(x.shape)} disagree in size"
                    )
        x = x + self._position_table()[: x.shape[1]]

        eos = None
        if return_pooled:
            if eos_positions is not None:
                eos = torch.as_tensor(eos_positions, device=x.device).long().reshape(-1)
            elif input_ids is not None:
                eos = input_ids.argmax(dim=-1)
            else:
                raise InvalidInputError("return_pooled with inputs_embeds needs input_ids or eos_positions")
            if eos.shape[0] != x.shape[0]:
                raise InvalidInputError(f"need one EOS position per sequence, got {eos.shape[0]} for {x.shape[0]}")

        blocks = self._blocks()
        last = len(blocks) - 1 if return_pooled else index
        hidden = x
        for i in range(last + 1):
            x = self._run_block(blocks[i], x)
            if i == index:
                hidden = x
        norm = self._final_norm()
        out = norm(hidden) if final_norm else hidden

        pooled = None
        if eos is not None:
            normed_last = out if (final_norm and index == len(blocks) - 1) else norm(x)
            pooled = self._project(normed_last[torch.arange(x.shape[0], device=x.device), eos])
        return TextEncoderOutput(out, pooled)


class CLIPTextModel(_TextEncoder):
    """OpenAI CLIP text tower in the transformers key layout (`text_model.…`).

    With `config.projection_dim` set, it also has `text_projection.weight` [proj, width] (a bias-free
    Linear, as transformers' CLIPTextModelWithProjection stores it); SD's own files have none.
    """

    def __init__(
        self, config: CLIPTextConfig = CLIP_L, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__(config)
        dd = {"device": device, "dtype": dtype}
        self.text_model = _HFTextTransformer(config, dd)
        self.text_projection = (
            nn.Linear(config.width, config.projection_dim, bias=False, **dd) if config.projection_dim else None
        )
        if self.text_model.final_layer_norm.weight.device.type != "meta":  # CLIP's initial embedding scales
            nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
            nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)

    def _token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def _position_table(self) -> Tensor:
        return self.text_model.embeddings.position_embedding.weight

    def _blocks(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    def _final_norm(self) -> nn.LayerNorm:
        return self.text_model.final_layer_norm

    def _project(self, pooled: Tensor) -> Tensor:
        return pooled if self.text_projection is None else self.text_projection(pooled)


class OpenCLIPTextModel(_TextEncoder):
    """OpenCLIP text tower in the open_clip key layout (`transformer.resblocks.…`).

    `text_projection` is a [width, proj] matrix applied as `x @ P`.
    """

    def __init__(
        self, config: CLIPTextConfig = OPENCLIP_H, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__(config)
        dd = {"device": device, "dtype": dtype}
        self.token_embedding = nn.Embedding(config.vocab_size, config.width, **dd)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width, **dd))
        self.transformer = _OpenCLIPTransformer(config, dd)
        self.ln_final = nn.LayerNorm(config.width, eps=config.layer_norm_eps, **dd)
        if config.projection_dim:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim, **dd))
        else:
            self.text_projection = None
        if self.positional_embedding.device.type != "meta":  # open_clip's initial values
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            if self.text_projection is not None:
                nn.init.normal_(self.text_projection, std=config.width**-0.5)

    def _token_embedding(self) -> nn.Embedding:
        return self.token_embedding

    def _position_table(self) -> Tensor:
        return self.positional_embedding

    def _blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def _final_norm(self) -> nn.LayerNorm:
        return self.ln_final

    def _project(self, pooled: Tensor) -> Tensor:
        return pooled if self.text_projection is None else pooled @ self.text_projection


# ---- config inference ---------------------------------------------------------------------------------


def _shape_getter(state_dict: Mapping[str, Tensor], prefix: str, what: str):
    def shape(key: str) -> tuple[int, ...]:
        tensor = state_dict.get(prefix + key)
        if tensor is None:
            raise CheckpointError(None, f"{what} weights lack '{prefix + key}'; is the prefix {prefix!r} right?")
        return tuple(tensor.shape)

    return shape


def _count(state_dict: Mapping[str, Tensor], prefix: str, pattern: str) -> int:
    regex = re.compile(re.escape(prefix) + pattern)
    found = {int(m.group(1)) for k in state_dict if (m := regex.match(k))}
    if found != set(range(len(found))):
        raise CheckpointError(None, f"layer indices under {prefix!r} are not contiguous: {sorted(found)}")
    return len(found)


def _finish(values: dict[str, Any], overrides: Mapping[str, Any]) -> CLIPTextConfig:
    known = {f.name for f in dataclasses.fields(CLIPTextConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidInputError(f"unknown CLIPTextConfig fields {unknown}; valid fields are {sorted(known)}")
    values.update(overrides)
    if "heads" not in overrides:
        values["heads"] = values["width"] // 64  # every released CLIP text tower uses 64-wide heads
    return CLIPTextConfig(**values)


def infer_clip_config(state_dict: Mapping[str, Tensor], prefix: str = "", **overrides: Any) -> CLIPTextConfig:
    """CLIPTextConfig of a transformers-layout text tower (`{prefix}text_model.…`), from shapes.

    Heads are `width // 64` and the activation is quick_gelu (OpenAI CLIP) unless overridden.
    """
    shape = _shape_getter(state_dict, prefix, "CLIP text encoder")
    vocab, width = shape("text_model.embeddings.token_embedding.weight")
    layers = _count(state_dict, prefix, r"text_model\.encoder\.layers\.(\d+)\.")
    if layers == 0:
        raise CheckpointError(None, f"no 'text_model.encoder.layers.N' keys under prefix {prefix!r}")
    proj = state_dict.get(prefix + "text_projection.weight")
    values = {
        "vocab_size": vocab,
        "width": width,
        "layers": layers,
        "context_length": shape("text_model.embeddings.position_embedding.weight")[0],
        "mlp_width": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "activation": "quick_gelu",
        "projection_dim": None if proj is None else int(proj.shape[0]),
    }
    return _finish(values, overrides)


def infer_openclip_config(state_dict: Mapping[str, Tensor], prefix: str = "", **overrides: Any) -> CLIPTextConfig:
    """CLIPTextConfig of an open_clip-layout text tower (`{prefix}transformer.resblocks.…`), from shapes.

    Heads are `width // 64` and the activation is gelu unless overridden.
    """
    shape = _shape_getter(state_dict, prefix, "OpenCLIP text encoder")
    vocab, width = shape("token_embedding.weight")
    layers = _count(state_dict, prefix, r"transformer\.resblocks\.(\d+)\.")
    if layers == 0:
        raise CheckpointError(None, f"no 'transformer.resblocks.N' keys under prefix {prefix!r}")
    proj = state_dict.get(prefix + "text_projection")
    values = {
        "vocab_size": vocab,
        "width": width,
        "layers": layers,
        "context_length": shape("positional_embedding")[0],
        "mlp_width": shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
        "activation": "gelu",
        "projection_dim": None if proj is None else int(proj.shape[1]),
    }
    return _finish(values, overrides)

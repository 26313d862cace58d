"""The diffusers key table: tensor names of diffusers folders <-> kuas' native (single-file) names.

kuas' networks use the official single-file parameter names (`kuas.models`). A diffusers folder stores the
same weights under other names, sometimes in another shape. This module builds, from a component's
structure (levels, res blocks, attentions, transformer depth, layers), one explicit table of `KeyPair`
rows ``(diffusers names, native name, transform)`` and runs it in either direction. Nothing is renamed by
string replacement, so a key the table does not list, or a listed key the file lacks, is an error that
names them.

Transforms (the only ways the two layouts differ besides names):

- ``IDENTITY``: same tensor.
- ``LINEAR_TO_CONV``: diffusers' VAE attention projections are Linear ``[C, C]``; the LDM VAE uses 1x1
  convs ``[C, C, 1, 1]``.
- ``CONCAT_QKV``: transformers' separate ``q_proj``/``k_proj``/``v_proj`` (weights ``[W, W]``, biases
  ``[W]``) are open_clip's packed ``in_proj_weight`` ``[3W, W]`` / ``in_proj_bias`` ``[3W]``, rows q, k, v.
- ``TRANSPOSE``: transformers' ``text_projection.weight`` ``[P, W]`` (a Linear) is open_clip's
  ``text_projection`` ``[W, P]`` (applied as ``x @ P``).

Components and the native class each becomes:

| diffusers folder                                   | native class        | layout     |
|----------------------------------------------------|---------------------|------------|
| ``unet`` (UNet2DConditionModel)                     | `UNetModel`         | ``unet``   |
| ``vae`` (AutoencoderKL)                             | `AutoencoderKL`     | ``vae``    |
| ``text_encoder`` SD 1.x / SDXL te1 (CLIP ViT-L)     | `CLIPTextModel`     | ``clip``   |
| ``text_encoder`` SD 2.x (OpenCLIP-H, 23 layers)     | `OpenCLIPTextModel` | ``openclip`` |
| ``text_encoder_2`` SDXL (OpenCLIP-bigG + projection) | `OpenCLIPTextModel` | ``openclip`` |

A text encoder's layout is the caller's choice or else follows its ``hidden_act``: OpenAI CLIP uses
``quick_gelu``, OpenCLIP ``gelu``.

Facts about diffusers' configs this relies on (diffusers 0.2x-0.4x):

- UNet ``attention_head_dim`` is, for historical reasons, the number of heads per level, not their width
  (``num_attention_heads``, when set, means the same and wins); the middle block uses the last level's.
- UNet ``transformer_layers_per_block[-1]`` is also the middle block's depth; up blocks reuse the down
  depths reversed unless ``reverse_transformer_layers_per_block`` says otherwise.
- UNet resnets use ``norm_eps`` (1e-5 in SD); transformer and VAE GroupNorms use a fixed 1e-6, as LDM.
- SDXL's vector conditioning is ``addition_embed_type="text_time"`` (``add_embedding.*``); other
  ``sequential`` LDM models become ``class_embed_type="projection"`` (``class_embedding.linear_*``); an int
  ``num_classes`` is ``num_class_embeds`` (``class_embedding.weight``).
- diffusers' SD 2.x text encoder is a transformers ``CLIPTextModel`` with 23 of OpenCLIP-H's 24 layers and
  no projection: its last layer is the original's penultimate one.
- transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` level; ``...WithProjection`` keeps it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kuas.checkpoints.state_dict import read_diffusers_folder_files
from kuas.errors import CheckpointError, InvalidInputError, KuasError
from kuas.models.clip import CLIPTextConfig, CLIPTextModel, OpenCLIPTextModel
from kuas.models.unet import UNetConfig, UNetModel
from kuas.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "COMPONENTS",
    "ConvertedComponent",
    "DiffusersFolder",
    "KeyPair",
    "Transform",
    "diffusers_config_from_native",
    "diffusers_to_native",
    "native_to_diffusers",
    "read_diffusers_folder",
    "text_encoder_key_table",
    "unet_key_table",
    "vae_key_table",
]

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
"""The diffusers sub-folders whose weights kuas reads."""

NativeConfig = UNetConfig | VAEConfig | CLIPTextConfig

_TEXT_LAYOUTS = ("clip", "openclip")
_MAX_JSON_BYTES = 16 * 1024 * 1024


# ------------------------------------------------------------------------------------------------------
# The table


class Transform(enum.Enum):
    """How the diffusers tensor(s) of one table row become the native tensor (see the module doc)."""

    IDENTITY = "identity"
    LINEAR_TO_CONV = "linear [C, C] <-> 1x1 conv [C, C, 1, 1]"
    CONCAT_QKV = "q, k, v <-> packed in_proj"
    TRANSPOSE = "transpose [P, W] <-> [W, P]"


@dataclass(frozen=True)
class KeyPair:
    """One row of the key table: the diffusers tensor(s) that make one native tensor, and how."""

    diffusers: tuple[str, ...]
    native: str
    transform: Transform = Transform.IDENTITY

    def to_native(self, parts: Sequence[Tensor]) -> Tensor:
        """Apply the transform to the diffusers tensors (in `diffusers` order)."""
        t = self.transform
        if t is Transform.IDENTITY:
            return parts[0]
        if t is Transform.LINEAR_TO_CONV:
            w = parts[0]
            if w.ndim == 2:
                return w.reshape(w.shape[0], w.shape[1], 1, 1)
            if w.ndim == 4 and tuple(w.shape[2:]) == (1, 1):  # some tools already store the conv shape
                return w
            raise ValueError(f"expected a [C, C] linear weight, got shape {tuple(w.shape)}")
        if t is Transform.CONCAT_QKV:
            shapes = {tuple(p.shape) for p in parts}
            if len(parts) != 3 or len(shapes) != 1:
                raise ValueError(f"q, k, v must have one shape, got {[tuple(p.shape) for p in parts]}")
            return torch.cat(list(parts), dim=0)
        if t is Transform.TRANSPOSE:
            if parts[0].ndim != 2:
                raise ValueError(f"expected a 2-d projection, got shape {tuple(parts[0].shape)}")
            return parts[0].t().contiguous()
        raise AssertionError(t)

    def to_diffusers(self, tensor: Tensor) -> tuple[Tensor, ...]:
        """The inverse of `to_native`: the diffusers tensors, in `diffusers` order."""
        t = self.transform
        if t is Transform.IDENTITY:
            return (tensor,)
        if t is Transform.LINEAR_TO_CONV:
            if tensor.ndim != 4 or tuple(tensor.shape[2:]) != (1, 1):
                raise ValueError(f"expected a [C, C, 1, 1] conv weight, got shape {tuple(tensor.shape)}")
            return (tensor.reshape(tensor.shape[0], tensor.shape[1]),)
        if t is Transform.CONCAT_QKV:
            if tensor.shape[0] % 3:
                raise ValueError(f"a packed q/k/v tensor needs 3*W rows, got shape {tuple(tensor.shape)}")
            return tuple(tensor.chunk(3, dim=0))
        if t is Transform.TRANSPOSE:
            if tensor.ndim != 2:
                raise ValueError(f"expected a 2-d projection, got shape {tuple(tensor.shape)}")
            return (tensor.t().contiguous(),)
        raise AssertionError(t)


class _Table:
    """Collects `KeyPair` rows; each helper adds the rows of one kind of sub-module."""

    def __init__(self) -> None:
        self.pairs: list[KeyPair] = []

    def add(
        self, diffusers: str | tuple[str, ...], native: str, transform: Transform = Transform.IDENTITY
    ) -> None:
        names = (diffusers,) if isinstance(diffusers, str) else diffusers
        self.pairs.append(KeyPair(names, native, transform))

    def params(self, diffusers: str, native: str, names: Iterable[str] = ("weight", "bias")) -> None:
        """Same-shaped parameters of one layer (a conv, linear or norm): ``{d}.weight <-> {n}.weight``..."""
        for name in names:
            self.add(f"{diffusers}.{name}", f"{native}.{name}")

    def finish(self) -> list[KeyPair]:
        seen_d: set[str] = set()
        seen_n: set[str] = set()
        for pair in self.pairs:
            if pair.native in seen_n or seen_d.intersection(pair.diffusers):
                raise KuasError(f"internal error: the key table repeats {pair}")
            seen_n.add(pair.native)
            seen_d.update(pair.diffusers)
        return list(self.pairs)


# ---- U-Net


def _unet_resblock(table: _Table, d: str, n: str, has_shortcut: bool) -> None:
    """diffusers ResnetBlock2D <-> LDM ResBlock."""
    table.params(f"{d}.norm1", f"{n}.in_layers.0")
    table.params(f"{d}.conv1", f"{n}.in_layers.2")
    table.params(f"{d}.time_emb_proj", f"{n}.emb_layers.1")
    table.params(f"{d}.norm2", f"{n}.out_layers.0")
    table.params(f"{d}.conv2", f"{n}.out_layers.3")
    if has_shortcut:
        table.params(f"{d}.conv_shortcut", f"{n}.skip_connection")


def _unet_transformer(table: _Table, d: str, n: str, depth: int) -> None:
    """diffusers Transformer2DModel <-> LDM SpatialTransformer: the inner names are the same."""
    table.params(f"{d}.norm", f"{n}.norm")
    table.params(f"{d}.proj_in", f"{n}.proj_in")
    for i in range(depth):
        block_d, block_n = f"{d}.transformer_blocks.{i}", f"{n}.transformer_blocks.{i}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):  # bias-free in both
                table.params(f"{block_d}.{attn}.{proj}", f"{block_n}.{attn}.{proj}", ("weight",))
            table.params(f"{block_d}.{attn}.to_out.0", f"{block_n}.{attn}.to_out.0")
        for norm in ("norm1", "norm2", "norm3"):
            table.params(f"{block_d}.{norm}", f"{block_n}.{norm}")
        table.params(f"{block_d}.ff.net.0.proj", f"{block_n}.ff.net.0.proj")
        table.params(f"{block_d}.ff.net.2", f"{block_n}.ff.net.2")
    table.params(f"{d}.proj_out", f"{n}.proj_out")


def _check_unet_has_diffusers_layout(config: UNetConfig) -> None:
    """diffusers' middle block always has a transformer, as deep as the last level's setting."""
    if config.transformer_depth_middle < 1:
        raise InvalidInputError(
            "a U-Net without a middle transformer (transformer_depth_middle=0) has no "
            "diffusers UNet2DConditionModel layout"
        )
    last = config.transformer_depth[-1]
    if last and last != config.transformer_depth_middle:
        raise InvalidInputError(
            f"diffusers takes the middle block's depth from the last level: transformer_depth_middle="
            f"{config.transformer_depth_middle} differs from the last level's {last}, so this U-Net has no "
            f"diffusers layout"
        )


def unet_key_table(config: UNetConfig, *, vector_embedding: str = "add_embedding") -> list[KeyPair]:
    """The table of a U-Net of this shape.

    `vector_embedding` names the diffusers module that holds LDM's ``label_emb`` MLP when
    ``num_classes="sequential"``: ``"add_embedding"`` (SDXL's text_time) or ``"class_embedding"``
    (``class_embed_type="projection"``).
    """
    if vector_embedding not in ("add_embedding", "class_embedding"):
        raise InvalidInputError(
            f"vector_embedding must be 'add_embedding' or 'class_embedding', got {vector_embedding!r}"
        )
    _check_unet_has_diffusers_layout(config)
    table = _Table()
    mc = config.model_channels
    table.params("conv_in", "input_blocks.0.0")
    table.params("time_embedding.linear_1", "time_embed.0")
    table.params("time_embedding.linear_2", "time_embed.2")
    if config.num_classes == "sequential":
        table.params(f"{vector_embedding}.linear_1", "label_emb.0.0")
        table.params(f"{vector_embedding}.linear_2", "label_emb.0.2")
    elif config.num_classes is not None:
        table.params("class_embedding", "label_emb", ("weight",))

    res = config.res_blocks_per_level()
    depth = config.transformer_depth
    skips = list(config.skip_channels())
    k, ch = 1, mc
    for level, mult in enumerate(config.channel_mult):
        for j in range(res[level]):
            d, n = f"down_blocks.{level}", f"input_blocks.{k}"
            _unet_resblock(table, f"{d}.resnets.{j}", f"{n}.0", has_shortcut=ch != mc * mult)
            ch = mc * mult
            if depth[level]:
                _unet_transformer(table, f"{d}.attentions.{j}", f"{n}.1", depth[level])
            k += 1
        if level != config.num_levels - 1:
            table.params(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{k}.0.op")
            k += 1

    _unet_resblock(table, "mid_block.resnets.0", "middle_block.0", has_shortcut=False)
    _unet_transformer(table, "mid_block.attentions.0", "middle_block.1", config.transformer_depth_middle)
    _unet_resblock(table, "mid_block.resnets.1", "middle_block.2", has_shortcut=False)

    k = 0
    for i, level in enumerate(reversed(range(config.num_levels))):
        out = mc * config.channel_mult[level]
        for j in range(res[level] + 1):
            d, n = f"up_blocks.{i}", f"output_blocks.{k}"
            in_ch = ch + skips.pop()
            _unet_resblock(table, f"{d}.resnets.{j}", f"{n}.0", has_shortcut=in_ch != out)
            ch = out
            position = 1
            if depth[level]:
                _unet_transformer(table, f"{d}.attentions.{j}", f"{n}.1", depth[level])
                position = 2
            if level > 0 and j == res[level]:
                table.params(f"{d}.upsamplers.0.conv", f"{n}.{position}.conv")
            k += 1
    table.params("conv_norm_out", "out.0")
    table.params("conv_out", "out.2")
    return table.finish()


# ---- VAE


def _vae_resblock(table: _Table, d: str, n: str, has_shortcut: bool) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        table.params(f"{d}.{name}", f"{n}.{name}")
    if has_shortcut:
        table.params(f"{d}.conv_shortcut", f"{n}.nin_shortcut")


def _vae_attention(table: _Table, d: str, n: str, legacy_names: bool) -> None:
    """diffusers' VAE Attention (Linear projections) <-> LDM AttnBlock (1x1 convs)."""
    table.params(f"{d}.group_norm", f"{n}.norm")
    names = (
        (("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out"))
        if legacy_names
        else (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
    )
    for dname, nname in names:
        table.add(f"{d}.{dname}.weight", f"{n}.{nname}.weight", Transform.LINEAR_TO_CONV)
        table.add(f"{d}.{dname}.bias", f"{n}.{nname}.bias")


def _vae_mid(table: _Table, d: str, n: str, legacy_names: bool) -> None:
    _vae_resblock(table, f"{d}.resnets.0", f"{n}.block_1", has_shortcut=False)
    _vae_attention(table, f"{d}.attentions.0", f"{n}.attn_1", legacy_names)
    _vae_resblock(table, f"{d}.resnets.1", f"{n}.block_2", has_shortcut=False)


def vae_key_table(config: VAEConfig, *, legacy_attention_names: bool = False) -> list[KeyPair]:
    """The table of an LDM KL autoencoder of this shape.

    `legacy_attention_names`: the diffusers side uses the pre-0.14 names ``query/key/value/proj_attn``
    instead of ``to_q/to_k/to_v/to_out.0`` for the mid-block attention.
    """
    if config.attn_resolutions:
        raise InvalidInputError(
            f"VAEConfig.attn_resolutions={config.attn_resolutions}: diffusers' AutoencoderKL has attention "
            f"only in the middle blocks, so this VAE has no diffusers layout"
        )
    table = _Table()
    levels = len(config.ch_mult)
    widths = [config.ch * m for m in config.ch_mult]

    table.params("encoder.conv_in", "encoder.conv_in")
    ch = config.ch
    for level in range(levels):
        for j in range(config.num_res_blocks):
            _vae_resblock(
                table,
                f"encoder.down_blocks.{level}.resnets.{j}",
                f"encoder.down.{level}.block.{j}",
                has_shortcut=ch != widths[level],
            )
            ch = widths[level]
        if level != levels - 1:
            table.params(
                f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv"
            )
    _vae_mid(table, "encoder.mid_block", "encoder.mid", legacy_attention_names)
    table.params("encoder.conv_norm_out", "encoder.norm_out")
    table.params("encoder.conv_out", "encoder.conv_out")
    table.params("quant_conv", "quant_conv")
    table.params("post_quant_conv", "post_quant_conv")

    table.params("decoder.conv_in", "decoder.conv_in")
    _vae_mid(table, "decoder.mid_block", "decoder.mid", legacy_attention_names)
    ch = widths[-1]
    for i, level in enumerate(reversed(range(levels))):  # diffusers counts from the lowest resolution
        for j in range(config.num_res_blocks + 1):
            _vae_resblock(
                table,
                f"decoder.up_blocks.{i}.resnets.{j}",
                f"decoder.up.{level}.block.{j}",
                has_shortcut=ch != widths[level],
            )
            ch = widths[level]
        if level != 0:
            table.params(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    table.params("decoder.conv_norm_out", "decoder.norm_out")
    table.params("decoder.conv_out", "decoder.conv_out")
    return table.finish()


# ---- text encoders


def text_encoder_key_table(
    config: CLIPTextConfig, layout: str, *, diffusers_prefix: str = "text_model."
) -> list[KeyPair]:
    """The table of a transformers CLIP text model, as native `CLIPTextModel` (``layout="clip"``: the same
    names) or `OpenCLIPTextModel` (``layout="openclip"``).

    `diffusers_prefix` is ``"text_model."`` or ``""`` (transformers 5 saves `CLIPTextModel` without that
    level). A projection (``config.projection_dim``) is transformers' ``text_projection.weight``.
    """
    if layout not in _TEXT_LAYOUTS:
        raise InvalidInputError(f"text encoder layout must be one of {_TEXT_LAYOUTS}, got {layout!r}")
    if diffusers_prefix not in ("text_model.", ""):
        raise InvalidInputError(f"diffusers_prefix must be 'text_model.' or '', got {diffusers_prefix!r}")
    table = _Table()
    p = diffusers_prefix
    if layout == "clip":
        table.params(f"{p}embeddings.token_embedding", "text_model.embeddings.token_embedding", ("weight",))
        table.params(
            f"{p}embeddings.position_embedding", "text_model.embeddings.position_embedding", ("weight",)
        )
        for i in range(config.layers):
            d, n = f"{p}encoder.layers.{i}", f"text_model.encoder.layers.{i}"
            for sub in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "layer_norm1",
                "mlp.fc1",
                "mlp.fc2",
                "layer_norm2",
            ):
                table.params(f"{d}.{sub}", f"{n}.{sub}")
        table.params(f"{p}final_layer_norm", "text_model.final_layer_norm")
        if config.projection_dim:
            table.add("text_projection.weight", "text_projection.weight")
        return table.finish()

    table.add(f"{p}embeddings.token_embedding.weight", "token_embedding.weight")
    table.add(f"{p}embeddings.position_embedding.weight", "positional_embedding")
    for i in range(config.layers):
        d, n = f"{p}encoder.layers.{i}", f"transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            qkv = tuple(f"{d}.self_attn.{x}_proj.{kind}" for x in ("q", "k", "v"))
            table.add(qkv, f"{n}.attn.in_proj_{kind}", Transform.CONCAT_QKV)
        table.params(f"{d}.self_attn.out_proj", f"{n}.attn.out_proj")
        table.params(f"{d}.layer_norm1", f"{n}.ln_1")
        table.params(f"{d}.mlp.fc1", f"{n}.mlp.c_fc")
        table.params(f"{d}.mlp.fc2", f"{n}.mlp.c_proj")
        table.params(f"{d}.layer_norm2", f"{n}.ln_2")
    table.params(f"{p}final_layer_norm", "ln_final")
    if config.projection_dim:
        table.add("text_projection.weight", "text_projection", Transform.TRANSPOSE)
    return table.finish()


# ------------------------------------------------------------------------------------------------------
# Configs: diffusers config.json -> kuas config (+ the table variant, extras and notes)


@dataclass
class _Spec:
    """What one diffusers component is, in kuas terms, and which table variant its file uses."""

    config: NativeConfig
    model_class: type[nn.Module]
    layout: str
    table_options: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _ConfigReader:
    """Reads fields of one config.json with the library's defaults, raising errors that name the file."""

    def __init__(
        self, component: str, data: Mapping[str, Any], defaults: Mapping[str, Any], path: str | None
    ):
        if not isinstance(data, Mapping):
            raise CheckpointError(
                path, f"the {component} config must be a JSON object, got {type(data).__name__}"
            )
        self.component = component
        self.data = data
        self.defaults = defaults
        self.path = path

    def get(self, key: str) -> Any:
        return self.data.get(key, self.defaults.get(key))

    def problem(self, text: str) -> CheckpointError:
        return CheckpointError(self.path, f"{self.component} config.json: {text}")

    def require(self, key: str, accepted: Sequence[Any], what: str) -> None:
        """`key` (when present) must have one of the `accepted` values, else the model is a variant kuas
        does not implement."""
        if key not in self.data:
            return
        value = self.data[key]
        if isinstance(value, list) and key == "only_cross_attention":
            value = any(value)
        if value not in accepted:
            raise self.problem(
                f"{key}={value!r} selects {what}, which kuas does not implement "
                f"(supported: {', '.join(repr(a) for a in accepted)})"
            )

    def int_list(self, key: str, length: int) -> list[int]:
        value = self.get(key)
        if isinstance(value, bool) or value is None:
            raise self.problem(f"{key} must be an int or a list of {length} ints, got {value!r}")
        if isinstance(value, int):
            return [value] * length
        if not isinstance(value, (list, tuple)) or len(value) != length:
            raise self.problem(f"{key} must be an int or a list of {length} ints, got {value!r}")
        out = []
        for v in value:
            if isinstance(v, (list, tuple)) and v and all(x == v[0] for x in v):  # per-layer, uniform
                v = v[0]
            if not isinstance(v, int) or isinstance(v, bool):
                raise self.problem(
                    f"{key} must hold one int per level (kuas needs the same value for every "
                    f"layer of a level), got {value!r}"
                )
            out.append(v)
        return out


# UNet2DConditionModel.__init__ defaults, used for fields an (older, hand-written) config.json omits.
_UNET_DEFAULTS: Mapping[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "dropout": 0.0,
}

# Fields that select U-Net variants kuas does not implement: (accepted values, what another value means).
_UNET_REQUIRED: Mapping[str, tuple[tuple[Any, ...], str]] = {
    "_class_name": (("UNet2DConditionModel",), "another model class"),
    "center_input_sample": ((False,), "input centring"),
    "flip_sin_to_cos": ((True,), "a sin-first timestep embedding"),
    "freq_shift": ((0,), "a shifted timestep embedding"),
    "mid_block_type": (("UNetMidBlock2DCrossAttn",), "another middle block"),
    "only_cross_attention": ((False,), "cross-attention-only transformers"),
    "mid_block_only_cross_attention": ((None, False), "a cross-attention-only middle block"),
    "downsample_padding": ((1,), "another downsampling padding"),
    "mid_block_scale_factor": ((1, 1.0), "a scaled middle block"),
    "act_fn": (("silu",), "another activation"),
    "norm_eps": ((1e-5,), "another GroupNorm epsilon"),
    "encoder_hid_dim": ((None,), "a projection of the text embeddings"),
    "encoder_hid_dim_type": ((None,), "a projection of the text embeddings"),
    "dual_cross_attention": ((False,), "dual cross-attention"),
    "class_embed_type": ((None, "projection"), "another class embedding"),
    "addition_embed_type": ((None, "text_time"), "another added embedding"),
    "resnet_time_scale_shift": (("default",), "scale-shift time conditioning"),
    "resnet_skip_time_act": ((False,), "another resnet time path"),
    "resnet_out_scale_factor": ((1, 1.0), "scaled resnet outputs"),
    "time_embedding_type": (("positional",), "another timestep embedding"),
    "time_embedding_act_fn": ((None,), "an activated time embedding"),
    "timestep_post_act": ((None,), "an activated time embedding"),
    "time_cond_proj_dim": ((None,), "a guidance-scale embedding (LCM-distilled U-Net)"),
    "conv_in_kernel": ((3,), "another conv_in kernel"),
    "conv_out_kernel": ((3,), "another conv_out kernel"),
    "attention_type": (("default",), "gated (GLIGEN) attention"),
    "class_embeddings_concat": ((False,), "concatenated class embeddings"),
    "cross_attention_norm": ((None,), "normalised cross-attention"),
}


def _unet_spec(data: Mapping[str, Any], path: str | None) -> _Spec:
    cfg = _ConfigReader("unet", data, _UNET_DEFAULTS, path)
    for key, (accepted, what) in _UNET_REQUIRED.items():
        cfg.require(key, accepted, what)

    if not isinstance(cfg.get("block_out_channels"), (list, tuple)):
        raise cfg.problem(f"block_out_channels must be a list, got {cfg.get('block_out_channels')!r}")
    widths = cfg.int_list("block_out_channels", len(cfg.get("block_out_channels")))
    levels = len(widths)
    down, up = list(cfg.get("down_block_types") or []), list(cfg.get("up_block_types") or [])
    if not levels or len(down) != levels or len(up) != levels:
        raise cfg.problem(
            f"block_out_channels ({levels}), down_block_types ({len(down)}) and up_block_types "
            f"({len(up)}) must have one entry per level"
        )
    cross = []
    for level, (d, u) in enumerate(zip(down, reversed(up))):
        if d not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise cfg.problem(
                f"down block {level} is {d!r}; kuas implements CrossAttnDownBlock2D and DownBlock2D"
            )
        expected_up = "CrossAttnUpBlock2D" if d == "CrossAttnDownBlock2D" else "UpBlock2D"
        if u != expected_up:
            raise cfg.problem(
                f"up_block_types {up} do not mirror down_block_types {down} (level {level} "
                f"needs {expected_up}); kuas builds both halves alike"
            )
        cross.append(d == "CrossAttnDownBlock2D")

    mc = widths[0]
    if any(w % mc for w in widths):
        raise cfg.problem(f"block_out_channels {widths} are not multiples of the first one")
    res_blocks = cfg.int_list("layers_per_block", levels)
    depths = cfg.int_list("transformer_layers_per_block", levels)
    middle_depth = depths[-1]
    if middle_depth < 1:
        raise cfg.problem("the middle block has no transformer layer (transformer_layers_per_block[-1] < 1)")
    reverse_depths = data.get("reverse_transformer_layers_per_block")
    if reverse_depths is not None:
        expected = [depths[lv] for lv in reversed(range(levels))]
        got = _ConfigReader("unet", {"r": reverse_depths}, {}, path).int_list("r", levels)
        if any(g != e for g, e, c in zip(got, expected, reversed(cross)) if c):
            raise cfg.problem(
                f"reverse_transformer_layers_per_block={reverse_depths} differs from the down "
                f"blocks' depths reversed; kuas builds both halves alike"
            )

    context_dims = set(cfg.int_list("cross_attention_dim", levels))
    if len(context_dims) != 1:
        raise cfg.problem(f"cross_attention_dim {cfg.get('cross_attention_dim')} differs between levels")
    heads_key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
    heads = cfg.int_list(heads_key, levels)  # despite its name, attention_head_dim counts heads
    units = [(widths[lv], heads[lv]) for lv in range(levels) if cross[lv]] + [(widths[-1], heads[-1])]
    for width, h in units:
        if h < 1 or width % h:
            raise cfg.problem(f"{heads_key}={cfg.get(heads_key)}: {h} heads do not divide {width} channels")
    counts = {h for _, h in units}
    dims = {w // h for w, h in units}
    linear = bool(cfg.get("use_linear_projection"))
    if len(counts) == 1 and (len(dims) > 1 or not linear):
        head_kwargs: dict[str, int] = {"num_heads": counts.pop(), "num_head_channels": -1}
    elif len(dims) == 1:
        head_kwargs = {"num_heads": -1, "num_head_channels": dims.pop()}
    else:
        raise cfg.problem(
            f"{heads_key}={cfg.get(heads_key)} gives neither one head count nor one head width "
            f"for every transformer; kuas' UNetConfig needs one of the two"
        )

    extras: dict[str, Any] = {
        "sample_size": cfg.get("sample_size"),
        "upcast_attention": bool(cfg.get("upcast_attention")),
    }
    options: dict[str, Any] = {}
    notes: list[str] = []
    num_classes: int | str | None = None
    adm = None
    class_type, add_type = cfg.get("class_embed_type"), cfg.get("addition_embed_type")
    if class_type and add_type:
        raise cfg.problem("class_embed_type and addition_embed_type are both set; kuas supports one")
    if class_type == "projection" or add_type == "text_time":
        num_classes = "sequential"
        adm = cfg.get("projection_class_embeddings_input_dim")
        if not isinstance(adm, int) or adm < 1:
            raise cfg.problem(
                f"{'class_embed_type' if class_type else 'addition_embed_type'} needs "
                f"projection_class_embeddings_input_dim, got {adm!r}"
            )
        options["vector_embedding"] = "class_embedding" if class_type else "add_embedding"
        extras["vector_conditioning"] = class_type or add_type
        if add_type == "text_time":
            extras["addition_time_embed_dim"] = cfg.get("addition_time_embed_dim")
            if extras["addition_time_embed_dim"] != 256:
                notes.append(
                    f"addition_time_embed_dim={extras['addition_time_embed_dim']}: build the vector "
                    f"conditioning with that embed_dim (SDXL uses 256)"
                )
    elif cfg.get("num_class_embeds") is not None:
        num_classes = int(cfg.get("num_class_embeds"))
        extras["vector_conditioning"] = "class_ids"
    time_dim = cfg.get("time_embedding_dim")
    if time_dim is not None and time_dim != 4 * mc:
        raise cfg.problem(f"time_embedding_dim={time_dim}; kuas uses 4 x block_out_channels[0] = {4 * mc}")

    try:
        config = UNetConfig(
            in_channels=cfg.get("in_channels"),
            out_channels=cfg.get("out_channels"),
            model_channels=mc,
            attention_resolutions=tuple(2**lv for lv in range(levels) if cross[lv]),
            num_res_blocks=tuple(res_blocks),
            channel_mult=tuple(w // mc for w in widths),
            transformer_depth=tuple(d if c else 0 for d, c in zip(depths, cross)),
            transformer_depth_middle=middle_depth,
            context_dim=context_dims.pop(),
            use_linear_in_transformer=linear,
            num_classes=num_classes,
            adm_in_channels=adm,
            dropout=float(cfg.get("dropout") or 0.0),
            norm_num_groups=cfg.get("norm_num_groups"),
            **head_kwargs,
        )
    except (InvalidInputError, TypeError, ValueError) as exc:
        raise cfg.problem(f"does not describe a U-Net kuas can build: {exc}") from None
    return _Spec(config, UNetModel, "unet", options, extras, notes)


_VAE_DEFAULTS: Mapping[str, Any] = {  # AutoencoderKL.__init__ defaults
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

_VAE_REQUIRED: Mapping[str, tuple[tuple[Any, ...], str]] = {
    "_class_name": (("AutoencoderKL",), "another autoencoder class"),
    "act_fn": (("silu",), "another activation"),
    "use_quant_conv": ((True,), "a VAE without quant_conv"),
    "use_post_quant_conv": ((True,), "a VAE without post_quant_conv"),
    "mid_block_add_attention": ((True,), "a VAE without middle attention"),
}


def _vae_spec(data: Mapping[str, Any], path: str | None) -> _Spec:
    cfg = _ConfigReader("vae", data, _VAE_DEFAULTS, path)
    for key, (accepted, what) in _VAE_REQUIRED.items():
        cfg.require(key, accepted, what)
    if not isinstance(cfg.get("block_out_channels"), (list, tuple)):
        raise cfg.problem(f"block_out_channels must be a list, got {cfg.get('block_out_channels')!r}")
    widths = cfg.int_list("block_out_channels", len(cfg.get("block_out_channels")))
    down, up = list(cfg.get("down_block_types") or []), list(cfg.get("up_block_types") or [])
    if not widths or down != ["DownEncoderBlock2D"] * len(widths) or up != ["UpDecoderBlock2D"] * len(widths):
        raise cfg.problem(
            f"kuas reads VAEs made of DownEncoderBlock2D / UpDecoderBlock2D, one per entry of "
            f"block_out_channels; got down {down}, up {up}, block_out_channels {widths}"
        )
    ch = widths[0]
    if any(w % ch for w in widths):
        raise cfg.problem(f"block_out_channels {widths} are not multiples of the first one")
    latent = cfg.get("latent_channels")
    try:
        config = VAEConfig(
            embed_dim=latent,
            z_channels=latent,
            in_channels=cfg.get("in_channels"),
            out_ch=cfg.get("out_channels"),
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=cfg.get("layers_per_block"),
            norm_num_groups=cfg.get("norm_num_groups"),
        )
    except (InvalidInputError, TypeError, ValueError) as exc:
        raise cfg.problem(f"does not describe a VAE kuas can build: {exc}") from None
    extras = {
        key: cfg.get(key)
        for key in (
            "scaling_factor",
            "shift_factor",
            "latents_mean",
            "latents_std",
            "force_upcast",
            "sample_size",
        )
    }
    notes = []
    if extras["shift_factor"] not in (None, 0, 0.0):
        notes.append(
            f"the VAE config has shift_factor={extras['shift_factor']}: latents are "
            f"(z - shift) * scale, not the SD convention z * scale"
        )
    return _Spec(config, AutoencoderKL, "vae", {}, extras, notes)


_TEXT_DEFAULTS: Mapping[str, Any] = {  # transformers CLIPTextConfig defaults
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}
_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def _text_spec(
    component: str, data: Mapping[str, Any], keys: Iterable[str], layout: str | None, path: str | None
) -> _Spec:
    cfg = _ConfigReader(component, data, _TEXT_DEFAULTS, path)
    if "text_config" in data and "hidden_size" not in data:
        raise cfg.problem(
            "holds a full CLIPModel config (text_config + vision_config); a diffusers text "
            "encoder is a CLIPTextModel or CLIPTextModelWithProjection"
        )
    cfg.require("model_type", ("clip_text_model",), "another text model")
    key_set = set(keys)
    architectures = data.get("architectures")
    if architectures:
        unknown = [a for a in architectures if a not in _TEXT_CLASSES]
        if unknown or len(architectures) != 1:
            raise cfg.problem(f"architectures={architectures}; kuas reads {' or '.join(_TEXT_CLASSES)}")
        has_projection = architectures[0] == "CLIPTextModelWithProjection"
    else:
        has_projection = "text_projection.weight" in key_set
    act = cfg.get("hidden_act")
    if act not in ("quick_gelu", "gelu"):
        raise cfg.problem(
            f"hidden_act={act!r}; CLIP text encoders use 'quick_gelu' (OpenAI) or 'gelu' (OpenCLIP)"
        )
    if layout is None:
        layout = "clip" if act == "quick_gelu" else "openclip"
    elif layout not in _TEXT_LAYOUTS:
        raise InvalidInputError(f"text encoder layout must be one of {_TEXT_LAYOUTS}, got {layout!r}")
    try:
        config = CLIPTextConfig(
            vocab_size=cfg.get("vocab_size"),
            width=cfg.get("hidden_size"),
            layers=cfg.get("num_hidden_layers"),
            heads=cfg.get("num_attention_heads"),
            context_length=cfg.get("max_position_embeddings"),
            mlp_width=cfg.get("intermediate_size"),
            activation=act,
            projection_dim=cfg.get("projection_dim") if has_projection else None,
            layer_norm_eps=float(cfg.get("layer_norm_eps")),
        )
    except (InvalidInputError, TypeError, ValueError) as exc:
        raise cfg.problem(f"does not describe a text encoder kuas can build: {exc}") from None

    # transformers 5 writes CLIPTextModel without the `text_model.` level; older files and
    # CLIPTextModelWithProjection have it.
    prefix = "text_model." if any(k.startswith("text_model.") for k in key_set) or not key_set else ""
    extras: dict[str, Any] = {"layout": layout, "last_layer_is_penultimate": False}
    notes: list[str] = []
    if layout == "openclip" and not has_projection and config.width == 1024 and config.layers == 23:
        extras["last_layer_is_penultimate"] = True
        notes.append(
            "SD2's diffusers text encoder has 23 of OpenCLIP-H's 24 layers and no text_projection: "
            "its last layer is the original's penultimate one, so condition on layer=-1 (with the "
            "final norm) where the single-file model uses layer=-2"
        )
    model_class: type[nn.Module] = CLIPTextModel if layout == "clip" else OpenCLIPTextModel
    return _Spec(config, model_class, layout, {"diffusers_prefix": prefix}, extras, notes)


def _spec(
    component: str, config: Mapping[str, Any], keys: Iterable[str], layout: str | None, path: str | None
) -> _Spec:
    if component == "unet":
        return _unet_spec(config, path)
    if component == "vae":
        spec = _vae_spec(config, path)
        legacy = any(".attentions.0.query." in k or ".attentions.0.proj_attn." in k for k in keys)
        spec.table_options["legacy_attention_names"] = legacy
        if legacy:
            spec.notes.append("the VAE uses diffusers' old attention names (query/key/value/proj_attn)")
        return spec
    if component in ("text_encoder", "text_encoder_2"):
        return _text_spec(component, config, keys, layout, path)
    raise InvalidInputError(f"unknown diffusers component {component!r}; kuas reads {', '.join(COMPONENTS)}")


def _table_for(spec: _Spec) -> list[KeyPair]:
    if spec.layout == "unet":
        return unet_key_table(spec.config, **spec.table_options)  # type: ignore[arg-type]
    if spec.layout == "vae":
        return vae_key_table(spec.config, **spec.table_options)  # type: ignore[arg-type]
    return text_encoder_key_table(spec.config, spec.layout, **spec.table_options)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------
# Error messages


def _group_of(key: str) -> str:
    """Report keys by the module two index levels deep (``down_blocks.1.attentions.0.*``)."""
    parts = key.split(".")
    numeric = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
    if len(numeric) >= 2:
        cut = numeric[1] + 1
    elif numeric:
        cut = numeric[0] + 1
    else:
        cut = len(parts) - 1
    return key if cut == 0 else ".".join(parts[:cut]) + ".*"


def _describe(kind: str, keys: Sequence[str], max_groups: int = 10) -> str:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_group_of(key), []).append(key)
    parts = []
    for group, members in list(groups.items())[:max_groups]:
        if len(members) == 1:
            parts.append(members[0])
        else:
            parts.append(f"{group} ({len(members)} keys, e.g. {members[0]})")
    if len(groups) > max_groups:
        parts.append(
            f"and {sum(len(m) for m in list(groups.values())[max_groups:])} more keys in "
            f"{len(groups) - max_groups} other groups"
        )
    return f"{len(keys)} {kind} key{'s' if len(keys) != 1 else ''}: " + ", ".join(parts)


def _check_keys(
    have: Iterable[str],
    wanted: Sequence[str],
    ignored: Iterable[str],
    side: str,
    component: str,
    path: str | None,
    hint: str,
) -> list[str]:
    """Raise unless `have` is exactly `wanted` plus known-harmless `ignored` keys; return the ignored ones."""
    have = list(have)
    wanted_set, have_set, ignored_set = set(wanted), set(have), set(ignored)
    unknown = [k for k in have if k not in wanted_set and k not in ignored_set]
    missing = [k for k in wanted if k not in have_set]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(_describe("unknown", unknown) + " (not in the key table)")
        if missing:
            parts.append(_describe("missing", missing) + " (in the table, absent from the weights)")
        raise CheckpointError(
            path, f"the {side} {component} weights do not match the key table: {'; '.join(parts)}. {hint}"
        )
    return [k for k in have if k in ignored_set]


def _check_shapes(spec: _Spec, tensors: Mapping[str, Tensor], component: str, path: str | None) -> None:
    """The converted tensors must have the shapes of the native model this config builds (meta: free)."""
    model = spec.model_class(spec.config, device="meta")  # type: ignore[call-arg]
    expected = model.state_dict()
    if set(expected) != set(tensors):
        raise KuasError(
            f"internal error: the {component} key table does not cover {type(model).__name__} "
            f"({len(set(expected) ^ set(tensors))} names differ)"
        )
    bad = [
        (k, tuple(tensors[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if bad:
        shown = "; ".join(f"{k}: weights {got} vs config {want}" for k, got, want in bad[:8])
        more = f"; and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise CheckpointError(
            path,
            f"the {component} weights do not have the shapes its config.json describes "
            f"({len(bad)} mismatches: {shown}{more}); is config.json the one saved with "
            f"these weights?",
        )


# ------------------------------------------------------------------------------------------------------
# Conversion


@dataclass(frozen=True)
class ConvertedComponent:
    """One diffusers component under kuas' native names, ready for ``model_class(config)``.

    `extras` holds config.json values that are not part of the network's shape (VAE ``scaling_factor``,
    U-Net ``sample_size``, text encoder ``layout``...); `notes` says what a loader must know.
    """

    component: str
    tensors: dict[str, Tensor]
    config: NativeConfig
    model_class: type[nn.Module]
    extras: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _diffusers_extras(spec: _Spec) -> list[str]:
    """diffusers-side keys that carry no weights and are dropped."""
    if spec.layout in _TEXT_LAYOUTS:
        return [f"{spec.table_options['diffusers_prefix']}embeddings.position_ids"]
    return []


def diffusers_to_native(
    component: str,
    tensors: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    layout: str | None = None,
    path: str | os.PathLike | None = None,
) -> ConvertedComponent:
    """Rename (and reshape/pack/transpose) a diffusers component's tensors to kuas' native names.

    `component`: "unet", "vae", "text_encoder" or "text_encoder_2"; `config`: its ``config.json``.
    `layout` ("clip" / "openclip") overrides the text-encoder family otherwise read from ``hidden_act``.
    Every tensor must be in the key table built from the config and every table entry must be present
    (the constant ``position_ids`` buffer of old transformers files is the one key dropped), else a
    `CheckpointError` lists the keys. Tensors are not copied except where packing or transposing needs it.
    """
    where = os.fspath(path) if path is not None else getattr(tensors, "path", None)
    spec = _spec(component, config, tensors.keys(), layout, where)
    pairs = _table_for(spec)
    dropped = _check_keys(
        tensors.keys(),
        [n for p in pairs for n in p.diffusers],
        _diffusers_extras(spec),
        "diffusers",
        component,
        where,
        "Is config.json the one saved with these weights? (block_out_channels, layers_per_block, "
        "transformer_layers_per_block, num_hidden_layers... decide the table)",
    )
    out: dict[str, Tensor] = {}
    for pair in pairs:
        try:
            out[pair.native] = pair.to_native([tensors[n] for n in pair.diffusers])
        except ValueError as exc:
            raise CheckpointError(where, f"{component} {', '.join(pair.diffusers)}: {exc}") from None
    _check_shapes(spec, out, component, where)
    notes = list(spec.notes)
    if dropped:
        notes.append(f"dropped {', '.join(dropped)} (a constant index buffer, not a weight)")
    return ConvertedComponent(component, out, spec.config, spec.model_class, dict(spec.extras), tuple(notes))


def _native_spec(
    component: str, config: NativeConfig | Mapping[str, Any], keys: Iterable[str], layout: str | None
) -> _Spec:
    """The table variant for writing `config` (a kuas config, or a diffusers config.json to follow)."""
    if isinstance(config, Mapping):
        return _spec(component, config, (), layout, None)
    if component == "unet" and isinstance(config, UNetConfig):
        # diffusers' own rule (from_single_file): SDXL-like context widths get SDXL's text_time embedding.
        options = {
            "vector_embedding": "add_embedding" if config.context_dim in (2048, 1280) else "class_embedding"
        }
        return _Spec(config, UNetModel, "unet", options)
    if component == "vae" and isinstance(config, VAEConfig):
        return _Spec(config, AutoencoderKL, "vae")
    if component in ("text_encoder", "text_encoder_2") and isinstance(config, CLIPTextConfig):
        if layout is None:
            layout = "clip" if any(k.startswith("text_model.") for k in keys) else "openclip"
        if layout not in _TEXT_LAYOUTS:
            raise InvalidInputError(f"text encoder layout must be one of {_TEXT_LAYOUTS}, got {layout!r}")
        model_class = CLIPTextModel if layout == "clip" else OpenCLIPTextModel
        return _Spec(config, model_class, layout, {"diffusers_prefix": "text_model."})
    if component not in COMPONENTS:
        raise InvalidInputError(
            f"unknown diffusers component {component!r}; kuas writes {', '.join(COMPONENTS)}"
        )
    raise InvalidInputError(
        f"{component} needs a diffusers config dict or a matching kuas config, got {type(config).__name__}"
    )


def _penultimate_as_last(config: CLIPTextConfig) -> CLIPTextConfig:
    if config.layers < 2:
        raise InvalidInputError("penultimate_as_last needs a text encoder with at least 2 layers")
    return dataclasses.replace(config, layers=config.layers - 1, projection_dim=None)


def native_to_diffusers(
    component: str,
    tensors: Mapping[str, Tensor],
    config: NativeConfig | Mapping[str, Any],
    *,
    layout: str | None = None,
    penultimate_as_last: bool = False,
) -> dict[str, Tensor]:
    """The inverse of `diffusers_to_native`: native tensors under diffusers' names and shapes.

    `config` is the kuas config of the tensors (then the table variant follows diffusers' conventions:
    SDXL-like U-Nets get ``add_embedding``, text encoders get the ``text_model.`` level, the layout comes
    from the keys) or a diffusers config.json to match. ``penultimate_as_last=True`` writes an OpenCLIP
    encoder the way diffusers stores SD 2.x's: without its last layer and projection (those native
    tensors are accepted and left out).
    """
    native_keys = list(tensors.keys())
    spec = _native_spec(component, config, native_keys, layout)
    ignored: list[str] = (
        ["text_model.embeddings.position_ids", "logit_scale"] if spec.layout in _TEXT_LAYOUTS else []
    )
    if penultimate_as_last:
        if spec.layout != "openclip" or isinstance(config, Mapping):
            raise InvalidInputError(
                "penultimate_as_last applies to an OpenCLIP text encoder given with its kuas "
                "CLIPTextConfig (all layers)"
            )
        full = spec.config
        assert isinstance(full, CLIPTextConfig)
        last = f"transformer.resblocks.{full.layers - 1}."
        ignored += [k for k in native_keys if k.startswith(last) or k == "text_projection"]
        spec = dataclasses.replace(spec, config=_penultimate_as_last(full))
    pairs = _table_for(spec)
    _check_keys(
        native_keys,
        [p.native for p in pairs],
        ignored,
        "native",
        component,
        None,
        "Do the tensors and the config describe the same model?",
    )
    out: dict[str, Tensor] = {}
    for pair in pairs:
        try:
            parts = pair.to_diffusers(tensors[pair.native])
        except ValueError as exc:
            raise CheckpointError(None, f"{component} {pair.native}: {exc}") from None
        out.update(zip(pair.diffusers, parts))
    return out


def diffusers_config_from_native(
    component: str,
    config: NativeConfig,
    *,
    layout: str | None = None,
    penultimate_as_last: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """A diffusers ``config.json`` dict for a kuas config (for writing a diffusers folder).

    Text encoders need `layout` ("clip" for `CLIPTextModel`, "openclip" for `OpenCLIPTextModel`);
    ``penultimate_as_last`` describes SD 2.x's diffusers text encoder (one layer less, no projection).
    `overrides` (e.g. ``sample_size``, ``scaling_factor``) are set last. Raises `InvalidInputError` for
    shapes diffusers cannot build.
    """
    if component == "unet" and isinstance(config, UNetConfig):
        out = _unet_diffusers_config(config)
    elif component == "vae" and isinstance(config, VAEConfig):
        out = _vae_diffusers_config(config)
    elif component in ("text_encoder", "text_encoder_2") and isinstance(config, CLIPTextConfig):
        if layout not in _TEXT_LAYOUTS:
            raise InvalidInputError(f"text encoders need layout='clip' or 'openclip', got {layout!r}")
        if penultimate_as_last:
            config = _penultimate_as_last(config)
        out = _text_diffusers_config(config, layout)
    else:
        raise InvalidInputError(f"cannot write a {component!r} config from a {type(config).__name__}")
    out.update(overrides)
    return out


def _unet_diffusers_config(config: UNetConfig) -> dict[str, Any]:
    _check_unet_has_diffusers_layout(config)
    widths = [config.model_channels * m for m in config.channel_mult]
    cross = [d > 0 for d in config.transformer_depth]
    heads = []
    for width in widths:  # levels without attention ignore their entry; any valid count will do there
        try:
            heads.append(config.attention_heads(width)[0])
        except InvalidInputError:
            heads.append(1)
    depths = [d if d > 0 else config.transformer_depth_middle for d in config.transformer_depth]
    res = config.res_blocks_per_level()
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": widths,
        "layers_per_block": res[0] if len(set(res)) == 1 else list(res),
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        "attention_head_dim": config.num_heads if config.num_heads > 0 else heads,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_in_transformer,
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "dropout": config.dropout,
    }
    if config.num_classes == "sequential":
        if config.context_dim in (2048, 1280):
            out.update(addition_embed_type="text_time", addition_time_embed_dim=256)
        else:
            out["class_embed_type"] = "projection"
        out["projection_class_embeddings_input_dim"] = config.adm_in_channels
    elif config.num_classes is not None:
        out["num_class_embeds"] = config.num_classes
    return out


def _vae_diffusers_config(config: VAEConfig) -> dict[str, Any]:
    if config.attn_resolutions or config.embed_dim != config.z_channels or not config.double_z:
        raise InvalidInputError(
            "diffusers' AutoencoderKL needs attention only in the middle blocks, "
            "embed_dim == z_channels and double_z"
        )
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_num_groups,
    }


def _text_diffusers_config(config: CLIPTextConfig, layout: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": ["CLIPTextModelWithProjection" if config.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "max_position_embeddings": config.context_length,
        "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }
    if config.projection_dim:
        out["projection_dim"] = config.projection_dim
    return out


# ------------------------------------------------------------------------------------------------------
# Folders


@dataclass(frozen=True)
class DiffusersFolder:
    """A diffusers pipeline folder read into kuas' native names.

    `components` maps "unet"/"vae"/"text_encoder"/"text_encoder_2" (those the folder has) to their
    converted tensors and configs; `prediction_type` is "epsilon" or "v_prediction" (from
    ``scheduler/scheduler_config.json``, "epsilon" when the folder has none); `scheduler_config` is that
    file as read (beta schedule, timestep spacing...), or None.
    """

    path: str
    pipeline_class: str | None
    components: dict[str, ConvertedComponent]
    prediction_type: str
    scheduler_config: dict[str, Any] | None
    notes: tuple[str, ...] = ()


_EXPECTED_CLASSES: Mapping[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": _TEXT_CLASSES,
    "text_encoder_2": _TEXT_CLASSES,
}
_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise CheckpointError(path, f"is larger than {_MAX_JSON_BYTES} bytes; not a config file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            path, f"is not a readable JSON file ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "must hold a JSON object")
    return data


def _listed_components(index: Mapping[str, Any], root: Path) -> list[str]:
    """Weight components that model_index.json names (``[library, class]`` with a class), checked."""
    listed = []
    for component in COMPONENTS:
        entry = index.get(component)
        if entry is None or (isinstance(entry, list) and entry[-1:] == [None]):
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise CheckpointError(
                root / "model_index.json", f"entry {component!r} must be [library, class], got {entry!r}"
            )
        if entry[1] not in _EXPECTED_CLASSES[component]:
            raise CheckpointError(
                root / "model_index.json",
                f"{component} is a {entry[0]}.{entry[1]}; kuas reads "
                f"{' or '.join(_EXPECTED_CLASSES[component])} there",
            )
        listed.append(component)
    return listed


def read_diffusers_folder(folder: str | os.PathLike, *, variant: str | None = None) -> DiffusersFolder:
    """Read a diffusers pipeline folder: each weight component under native names, and the prediction type.

    Weights are read by kuas' safe readers (memory-mapped safetensors; ``.bin`` through the restricted
    unpickler), preferring ``.safetensors`` over ``.bin`` and full precision over the ``fp16`` variant
    unless `variant` (e.g. ``"fp16"``) is asked for. When ``model_index.json`` exists, exactly the
    components it lists are read.
    """
    root = Path(folder)
    notes: list[str] = []
    index_path = root / "model_index.json"
    index = _read_json(index_path) if index_path.is_file() else None
    files = read_diffusers_folder_files(root, variant=variant)
    wanted = _listed_components(index, root) if index is not None else [c for c in COMPONENTS if c in files]
    for component in wanted:
        if component not in files:
            raise CheckpointError(
                root,
                f"model_index.json lists {component} but the folder has no {component}/ "
                f"with weights; the download is incomplete",
            )
    for component in files:
        if component not in wanted:
            notes.append(f"ignored {component}/: model_index.json does not list it")
    if "unet" not in wanted:
        notes.append("the folder has no unet")

    components: dict[str, ConvertedComponent] = {}
    for component in wanted:
        sd = files[component]
        if sd.config is None:
            raise CheckpointError(
                root / component, "has weights but no config.json, which kuas needs to build the model"
            )
        components[component] = diffusers_to_native(component, sd, sd.config, path=sd.path)

    scheduler_config = None
    prediction_type = "epsilon"
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    if scheduler_path.is_file():
        scheduler_config = _read_json(scheduler_path)
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if prediction_type not in _PREDICTION_TYPES:
            raise CheckpointError(
                scheduler_path,
                f"prediction_type={prediction_type!r}; kuas samples models that "
                f"predict {' or '.join(_PREDICTION_TYPES)}",
            )
    else:
        notes.append("no scheduler/scheduler_config.json: assuming prediction_type 'epsilon'")
    pipeline_class = index.get("_class_name") if index is not None else None
    log.debug("%s: read %s (%s, %s)", root, ", ".join(components), pipeline_class, prediction_type)
    return DiffusersFolder(
        os.fspath(root),
        pipeline_class if isinstance(pipeline_class, str) else None,
        components,
        prediction_type,
        scheduler_config,
        tuple(notes),
    )

"""The Stable Diffusion U-Net (SD 1.x, 2.x, SDXL base/refiner, inpainting, depth and tiny models).

Parameter paths are the original single-file keys after stripping ``model.diffusion_model.``:
``unet.input_blocks[1][1].proj_in.weight`` is ``model.diffusion_model.input_blocks.1.1.proj_in.weight``.

Layout (``L`` = ``len(channel_mult)``, ``N`` = res blocks per level)::

    input_blocks.0            conv_in
    input_blocks.k            [ResBlock, SpatialTransformer?]   N per level
                              [Downsample (.0.op)]              between levels
    middle_block              [ResBlock, SpatialTransformer, ResBlock]
    output_blocks.k           [ResBlock, SpatialTransformer?, Upsample (.conv)?]  N+1 per level, deepest first
    out                       GroupNorm, SiLU, conv_out

The time embedding is sinusoidal (cos half first, ``max_period`` 10000) followed by ``time_embed``; SDXL adds
``label_emb(y)`` where ``y`` is the pooled text embedding concatenated with sinusoidal embeddings of the
size/crop conditioning (see `sdxl_vector_conditioning`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from kuas.errors import CheckpointError, InvalidInputError

__all__ = [
    "SD1_INPAINT_UNET",
    "SD1_UNET",
    "SD2_DEPTH_UNET",
    "SD2_INPAINT_UNET",
    "SD2_UNET",
    "SDXL_REFINER_UNET",
    "SDXL_UNET",
    "UNetConfig",
    "UNetModel",
    "infer_unet_config",
    "sdxl_vector_conditioning",
    "timestep_embedding",
]

# Attention whose score matrix (batch * heads * queries * keys elements) would exceed this many bytes runs in
# slices of query rows (`sliced_attention`); fused SDPA kernels never reach it at SD sizes.
ATTENTION_SLICE_BYTES = 1 << 30

# Keys of the reference yaml `unet_config.params` that describe training/runtime choices, not the weights.
_IGNORED_YAML_KEYS = frozenset(
    {"image_size", "use_checkpoint", "use_fp16", "legacy", "spatial_transformer_attn_type", "conv_resample",
     "dims", "num_heads_upsample", "use_new_attention_order"}
)
# Reference yaml switches kuas does not implement, with the value that kuas' architecture corresponds to.
_REQUIRED_YAML_VALUES = {
    "use_spatial_transformer": True,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "n_embed": None,
}


# ----------------------------------------------------------------------------------------------------------
# Config


def _as_int_tuple(value: int | Sequence[int], length: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * length
    values = tuple(int(v) for v in value)
    if len(values) != length:
        raise InvalidInputError(
            f"UNetConfig.{name} has {len(values)} entries but channel_mult has {length} levels; "
            f"give one value per level or a single int"
        )
    return values


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a U-Net; field names follow the reference yaml ``unet_config.params``.

    The config is stored in a canonical form so that equal networks compare equal (and `infer_unet_config`
    returns exactly the preset): ``attention_resolutions`` is a sorted-descending tuple of the levels'
    down factors (``2**level``) that have a transformer; ``transformer_depth`` is a per-level tuple with 0
    at levels without attention; ``transformer_depth_middle`` defaults to the last level's depth as in sgm;
    ``num_res_blocks`` is an int when uniform; ``context_dim`` is one int; ``num_heads`` is -1 when
    ``num_head_channels`` is set (it then wins, as in the original).

    ``num_classes``: None, ``"sequential"`` (SDXL: ``label_emb`` is an MLP on ``y`` of ``adm_in_channels``) or
    an int (class-conditional: ``label_emb`` is an embedding table, ``y`` holds class ids).
    ``norm_num_groups`` is a kuas extra (the originals always use 32) so tiny models can be narrow.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int | tuple[int, ...] = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    context_dim: int | Sequence[int] = 768
    use_linear_in_transformer: bool = False
    num_classes: int | str | None = None
    adm_in_channels: int | None = None
    dropout: float = 0.0
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        mult = tuple(int(m) for m in self.channel_mult)
        if not mult or any(m <= 0 for m in mult):
            raise InvalidInputError(
                f"UNetConfig.channel_mult must be positive ints, got {self.channel_mult!r}"
            )
        put("channel_mult", mult)
        levels = len(mult)
        for name in ("in_channels", "out_channels", "model_channels", "norm_num_groups"):
            if int(getattr(self, name)) <= 0:
                raise InvalidInputError(f"UNetConfig.{name} must be positive, got {getattr(self, name)!r}")
            put(name, int(getattr(self, name)))

        res = _as_int_tuple(self.num_res_blocks, levels, "num_res_blocks")
        if any(r <= 0 for r in res):
            raise InvalidInputError(
                f"UNetConfig.num_res_blocks must be >= 1 per level, got {self.num_res_blocks!r}"
            )
        put("num_res_blocks", res[0] if len(set(res)) == 1 else res)

        raw_depth = _as_int_tuple(self.transformer_depth, levels, "transformer_depth")
        middle = raw_depth[-1]
        if self.transformer_depth_middle is not None:
            middle = int(self.transformer_depth_middle)
        if middle < 0 or any(d < 0 for d in raw_depth):
            raise InvalidInputError("UNetConfig.transformer_depth values must be >= 0")
        attn = {int(r) for r in self.attention_resolutions}
        depth = tuple(d if (2**level) in attn else 0 for level, d in enumerate(raw_depth))
        put("transformer_depth", depth)
        put("transformer_depth_middle", middle)
        with_attention = (2**level for level, d in enumerate(depth) if d > 0)
        put("attention_resolutions", tuple(sorted(with_attention, reverse=True)))

        ctx = self.context_dim
        if ctx is None:
            raise InvalidInputError(
                "UNetConfig.context_dim is required (the text-embedding width: 768 SD1, 1024 SD2, 2048 SDXL)"
            )
        if not isinstance(ctx, int):
            dims = {int(c) for c in ctx}
            if len(dims) != 1:
                raise InvalidInputError(
                    f"UNetConfig.context_dim must be one width for all levels, got {ctx!r}"
                )
            ctx = dims.pop()
        put("context_dim", int(ctx))
        put("use_linear_in_transformer", bool(self.use_linear_in_transformer))

        if self.num_head_channels is None:
            put("num_head_channels", -1)
        if self.num_heads is None:
            put("num_heads", -1)
        put("num_heads", int(self.num_heads))
        put("num_head_channels", int(self.num_head_channels))
        if self.num_head_channels > 0:
            put("num_heads", -1)
        elif self.num_heads <= 0:
            raise InvalidInputError(
                "UNetConfig needs num_heads > 0 or num_head_channels > 0 "
                "(SD1: num_heads=8; SD2/SDXL: num_head_channels=64)"
            )
        widths = [self.model_channels * m for m in mult]
        for w in widths:
            if w % self.norm_num_groups:
                raise InvalidInputError(
                    f"UNetConfig.norm_num_groups={self.norm_num_groups} does not divide the channel count "
                    f"{w}; choose model_channels a multiple of norm_num_groups"
                )
        for level in range(levels):
            if depth[level] > 0 or (level == levels - 1 and middle > 0):
                self.attention_heads(widths[level])

        if self.num_classes == "sequential":
            if not self.adm_in_channels or self.adm_in_channels <= 0:
                raise InvalidInputError(
                    'UNetConfig.num_classes="sequential" needs adm_in_channels (2816 for SDXL)'
                )
            put("adm_in_channels", int(self.adm_in_channels))
        elif self.num_classes is not None:
            if isinstance(self.num_classes, str) or int(self.num_classes) <= 0:
                raise InvalidInputError(
                    'UNetConfig.num_classes must be None, "sequential" or a positive int, '
                    f"got {self.num_classes!r}"
                )
            put("num_classes", int(self.num_classes))
        put("dropout", float(self.dropout))

    # -- derived quantities -------------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    def res_blocks_per_level(self) -> tuple[int, ...]:
        """`num_res_blocks` expanded to one entry per level."""
        return _as_int_tuple(self.num_res_blocks, self.num_levels, "num_res_blocks")

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer on `channels` channels, by the original rule."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise InvalidInputError(
                    f"UNetConfig.num_head_channels={self.num_head_channels} does not divide "
                    f"{channels} channels"
                )
            return channels // self.num_head_channels, self.num_head_channels
        if channels % self.num_heads:
            raise InvalidInputError(
                f"UNetConfig.num_heads={self.num_heads} does not divide {channels} channels"
            )
        return self.num_heads, channels // self.num_heads

    def skip_channels(self) -> tuple[int, ...]:
        """Channels of each input block's output (the skips; also the ControlNet residual widths, plus the
        middle block's width ``model_channels * channel_mult[-1]``)."""
        chans = [self.model_channels]
        for level, mult in enumerate(self.channel_mult):
            chans += [self.model_channels * mult] * self.res_blocks_per_level()[level]
            if level != self.num_levels - 1:
                chans.append(self.model_channels * mult)
        return tuple(chans)

    # -- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples as lists), e.g. for a safetensors metadata string."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        """Inverse of `to_dict`; also accepts a reference yaml ``unet_config.params`` dict.

        Runtime-only yaml keys (use_checkpoint, use_fp16, image_size, legacy...) are ignored; switches that
        select an architecture kuas does not implement raise `InvalidInputError`.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _IGNORED_YAML_KEYS:
                continue
            elif key in _REQUIRED_YAML_VALUES:
                truthy = any(value) if isinstance(value, (list, tuple)) else bool(value)
                if truthy != bool(_REQUIRED_YAML_VALUES[key]):
                    raise InvalidInputError(
                        f"U-Net option {key}={value!r} is not supported by kuas "
                        f"(only {_REQUIRED_YAML_VALUES[key]!r})"
                    )
            else:
                raise InvalidInputError(f"unknown U-Net config field {key!r}; known fields: {sorted(names)}")
        return cls(**kwargs)


SD1_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1), num_res_blocks=2,
    channel_mult=(1, 2, 4, 4), num_heads=8, transformer_depth=1, context_dim=768,
    use_linear_in_transformer=False,
)
SD1_INPAINT_UNET = dataclasses.replace(SD1_UNET, in_channels=9)
SD2_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1), num_res_blocks=2,
    channel_mult=(1, 2, 4, 4), num_heads=-1, num_head_channels=64, transformer_depth=1, context_dim=1024,
    use_linear_in_transformer=True,
)
SD2_INPAINT_UNET = dataclasses.replace(SD2_UNET, in_channels=9)
SD2_DEPTH_UNET = dataclasses.replace(SD2_UNET, in_channels=5)
SDXL_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=(4, 2), num_res_blocks=2,
    channel_mult=(1, 2, 4), num_heads=-1, num_head_channels=64, transformer_depth=(1, 2, 10),
    context_dim=2048, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816,
)
SDXL_REFINER_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=384, attention_resolutions=(4, 2), num_res_blocks=2,
    channel_mult=(1, 2, 4, 4), num_heads=-1, num_head_channels=64, transformer_depth=4, context_dim=1280,
    use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2560,
)


# ----------------------------------------------------------------------------------------------------------
# Embeddings


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32: ``[cos(t*f), sin(t*f)]``, f = max_period**(-i/half).

    Timesteps may be fractional (continuous-time samplers).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.reshape(-1, 1).to(torch.float32) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _pairs(value: Any, batch: int, device: torch.device, name: str) -> Tensor:
    """(h, w)-like value (tuple, or tensor (2,) / (B, 2)) -> float32 tensor (B, 2)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 1:
        t = t[None].expand(batch, -1)
    if t.ndim != 2 or t.shape[1] != 2 or t.shape[0] != batch:
        raise InvalidInputError(f"{name} must be a pair (h, w) / (top, left) or a ({batch}, 2) tensor, "
                                f"got shape {tuple(t.shape)}")
    return t


def sdxl_vector_conditioning(
    pooled: Tensor,
    original_size: Any,
    crop_top_left: Any = (0, 0),
    target_size: Any = None,
    *,
    aesthetic_score: Any = None,
    embed_dim: int = 256,
) -> Tensor:
    """SDXL's ``y``: cat(pooled, emb(orig_h), emb(orig_w), emb(crop_top), emb(crop_left), then either
    emb(target_h), emb(target_w) (base, adm 2816) or emb(aesthetic_score) (refiner, adm 2560)).

    Each emb is the 256-wide sinusoidal `timestep_embedding`, the order of sgm's ConcatTimestepEmbedderND
    conditioners (original_size_as_tuple, crop_coords_top_left, target_size_as_tuple | aesthetic_score),
    equal to diffusers' ``add_time_ids`` = (orig_h, orig_w, top, left, target_h, target_w). Sizes are pixel
    sizes as pairs or (B, 2) tensors. Returns (B, pooled_dim + n*256) in pooled's dtype.
    """
    if (target_size is None) == (aesthetic_score is None):
        raise InvalidInputError(
            "sdxl_vector_conditioning needs exactly one of target_size (SDXL base) "
            "or aesthetic_score (refiner)"
        )
    batch, device = pooled.shape[0], pooled.device
    values = [_pairs(original_size, batch, device, "original_size"),
              _pairs(crop_top_left, batch, device, "crop_top_left")]
    if target_size is not None:
        values.append(_pairs(target_size, batch, device, "target_size"))
    else:
        score = torch.as_tensor(aesthetic_score, dtype=torch.float32, device=device).reshape(-1, 1)
        values.append(score.expand(batch, 1) if score.shape[0] == 1 else score)
    ids = torch.cat(values, dim=1)  # (B, n)
    emb = timestep_embedding(ids.reshape(-1), embed_dim).reshape(batch, -1)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (as the original) so fp16/bf16 activations keep sane statistics.

    On the CPU torch's kernel takes bf16/fp16 input with float32 weights and accumulates in float32 itself,
    which gives the same values as an explicit upcast without two activation-sized copies (2.5x faster
    here); elsewhere the input is upcast explicitly.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        if x.device.type == "cpu":
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class SiLU(nn.SiLU):
    """SiLU that overwrites its input when no gradient is recorded; used only right after a GroupNorm,
    whose fresh output nobody else holds (saves one activation-sized buffer per use at inference)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x, inplace=not torch.is_grad_enabled())


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-dropout-conv(zero init), + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, groups: int,
                 **fk: Any):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels, eps=1e-5, **fk), SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1, **fk),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **fk))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels, eps=1e-5, **fk), SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, **fk),
        )
        _zero_(self.out_layers[3])
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1, **fk)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key ``op``)."""

    def __init__(self, channels: int, **fk: Any):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1, **fk)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x (or to the next skip's size, so odd latent sizes work) then a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, **fk: Any):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, **fk)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, query_dim) over context (B, M, context_dim), or over x itself."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dropout: float,
                 **fk: Any):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False, **fk)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **fk)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **fk)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, **fk), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = sliced_attention(q, k, v)  # scale 1/sqrt(dim_head), as the original
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def sliced_attention(q: Tensor, k: Tensor, v: Tensor, max_score_bytes: int | None = None) -> Tensor:
    """SDPA over (B, heads, N, d) tensors, in slices of query rows when the full score matrix would exceed
    `max_score_bytes` (default `ATTENTION_SLICE_BYTES`).

    Fused kernels (flash / memory-efficient, CPU and CUDA) never hold the scores, but the math fallback
    does: a 1024x1024 SD1 image has 16384 tokens at the top level, i.e. 8.6 GB of fp16 scores per call.
    Query rows are independent, so slicing them gives the same result exactly.
    """
    budget = ATTENTION_SLICE_BYTES if max_score_bytes is None else max_score_bytes
    b, heads, n, _ = q.shape
    score_bytes = b * heads * n * k.shape[2] * q.element_size()
    if score_bytes <= budget or n == 1:
        return F.scaled_dot_product_attention(q, k, v)
    rows = max(1, n * budget // score_bytes)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + rows], k, v) for i in range(0, n, rows)],
                     dim=2)


class GEGLU(nn.Module):
    """Linear to 2*inner, then value * gelu(gate) (key ``proj``)."""

    def __init__(self, dim: int, inner: int, **fk: Any):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2, **fk)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x width (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, dropout: float, **fk: Any):
        super().__init__()
        self.net = nn.Sequential(
            GEGLU(dim, dim * 4, **fk), nn.Dropout(dropout), nn.Linear(dim * 4, dim, **fk)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text context, then GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float, **fk: Any):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, dropout, **fk)
        self.ff = FeedForward(dim, dropout, **fk)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, **fk)
        self.norm1 = nn.LayerNorm(dim, **fk)
        self.norm2 = nn.LayerNorm(dim, **fk)
        self.norm3 = nn.LayerNorm(dim, **fk)

        # Token merging (`kuas.speedups.tome`): while attached, an object whose ``plan(x, hw)`` returns
        # merge/unmerge functions (or None to skip) for the self-attention; None = the plain block.
        self.token_merge: Any = None

    def forward(self, x: Tensor, context: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        plan = None if self.token_merge is None or hw is None else self.token_merge.plan(x, hw)
        if plan is None:
            x = x + self.attn1(self.norm1(x))
        else:
            x = x + plan.unmerge(self.attn1(plan.merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in (1x1 conv for SD1, linear for SD2/XL), transformer blocks on the h*w tokens,
    proj_out (zero init), plus the input."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, dropout: float,
                 use_linear: bool, groups: int, **fk: Any):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.level = 0  # the U-Net level (0 = full latent resolution); set by UNetModel
        self.norm = GroupNorm32(groups, channels, eps=1e-6, **fk)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner, **fk)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1, **fk)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, **fk) for _ in range(depth)
        )
        if use_linear:
            self.proj_out: nn.Module = nn.Linear(inner, channels, **fk)
        else:
            self.proj_out = nn.Conv2d(inner, channels, 1, **fk)
        _zero_(self.proj_out)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        # (B, C, H, W) -> (B, H*W, C); free when x is channels_last.
        hidden = hidden.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, (h, w))
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return hidden + x


class TimestepBlock(nn.Sequential):
    """One ``input_blocks.k`` / ``middle_block`` / ``output_blocks.k`` entry: routes the time embedding to
    ResBlocks, the context to transformers and the skip's size to the Upsample."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None,
                size: Sequence[int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def _zero_(module: nn.Module) -> None:
    """Zero a module's parameters (the original's ``zero_module``): residual branches start as identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


# ----------------------------------------------------------------------------------------------------------
# The network


class UNetModel(nn.Module):
    """The latent-diffusion U-Net; parameter paths equal the original keys (prefix stripped).

    Set ``gradient_checkpointing = True`` to recompute each block in the backward pass (training).
    Construct on ``device="meta"`` to get the key set / shapes of a full-size model at no cost.
    """

    def __init__(self, config: UNetConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        # Step caching (`kuas.speedups.deepcache`): while attached, an object with ``branch`` (shallow input
        # blocks kept after conv_in), ``fetch(key) -> Tensor | None`` (a deep feature to reuse this call)
        # and ``store(key, feature)``; None = every call runs the whole network.
        self.step_cache: Any = None
        # The activation layout callers should feed (`kuas.pipelines.common.UNetFunction` converts its input
        # once); set from the runtime policy by `StableDiffusion`. Weights keep their loaded layout.
        self.input_memory_format = torch.contiguous_format
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        mc, groups, drop = config.model_channels, config.norm_num_groups, config.dropout
        emb_dim = mc * 4

        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim, **fk), nn.SiLU(), nn.Linear(emb_dim, emb_dim, **fk)
        )
        self.label_emb: nn.Module | None = None
        if config.num_classes == "sequential":
            assert config.adm_in_channels is not None
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, emb_dim, **fk), nn.SiLU(), nn.Linear(emb_dim, emb_dim, **fk)
            ))
        elif config.num_classes is not None:
            self.label_emb = nn.Embedding(int(config.num_classes), emb_dim, **fk)

        def transformer(ch: int, depth: int, level: int) -> SpatialTransformer:
            heads, dim_head = config.attention_heads(ch)
            st = SpatialTransformer(ch, heads, dim_head, depth, config.context_dim, drop,
                                    config.use_linear_in_transformer, groups, **fk)
            st.level = level
            return st

        res_per_level = config.res_blocks_per_level()
        conv_in = nn.Conv2d(config.in_channels, mc, 3, padding=1, **fk)
        self.input_blocks = nn.ModuleList([TimestepBlock(conv_in)])
        skip_chans = [mc]
        ch = mc
        for level, mult in enumerate(config.channel_mult):
            for _ in range(res_per_level[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult, drop, groups, **fk)]
                ch = mc * mult
                if config.transformer_depth[level] > 0:
                    layers.append(transformer(ch, config.transformer_depth[level], level))
                self.input_blocks.append(TimestepBlock(*layers))
                skip_chans.append(ch)
            if level != config.num_levels - 1:
                self.input_blocks.append(TimestepBlock(Downsample(ch, **fk)))
                skip_chans.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, emb_dim, ch, drop, groups, **fk)]
        if config.transformer_depth_middle > 0:
            middle.append(transformer(ch, config.transformer_depth_middle, config.num_levels - 1))
        middle.append(ResBlock(ch, emb_dim, ch, drop, groups, **fk))
        self.middle_block = TimestepBlock(*middle)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(config.num_levels)):
            mult = config.channel_mult[level]
            for i in range(res_per_level[level] + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mc * mult, drop, groups, **fk)]
                ch = mc * mult
                if config.transformer_depth[level] > 0:
                    layers.append(transformer(ch, config.transformer_depth[level], level))
                if level > 0 and i == res_per_level[level]:
                    layers.append(Upsample(ch, **fk))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch, eps=1e-5, **fk), SiLU(),
            nn.Conv2d(mc, config.out_channels, 3, padding=1, **fk),
        )
        _zero_(self.out[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def _run(self, block: TimestepBlock, h: Tensor, emb: Tensor, context: Tensor | None,
             size: Sequence[int] | None = None) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpoint(block, h, emb, context, size, use_reentrant=False)
        return block(h, emb, context, size)

    def forward(self, x: Tensor, timesteps: Tensor | float, context: Tensor | None = None,
                y: Tensor | None = None, control: Sequence[Tensor | None] | None = None) -> Tensor:
        """Predict the model output (eps or v) for latents ``x`` (B, C, H, W) at ``timesteps`` (B,) or scalar.

        ``context``: text embeddings (B, tokens, context_dim). ``y``: SDXL vector conditioning
        (B, adm_in_channels) or class ids. ``control``: ControlNet residuals, one per input block output
        (in input-block order) then one for the middle block; entries may be None. Inputs are cast to the
        model's dtype and the result back to ``x.dtype``.
        """
        cfg = self.config
        dtype = self.dtype
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise InvalidInputError(
                f"U-Net input must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise InvalidInputError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype))

        if self.label_emb is not None:
            if y is None:
                raise InvalidInputError(
                    "this U-Net needs y (SDXL: build it with kuas.models.unet.sdxl_vector_conditioning)"
                )
            if cfg.num_classes == "sequential":
                if y.shape != (batch, cfg.adm_in_channels):
                    raise InvalidInputError(
                        f"y must be ({batch}, {cfg.adm_in_channels}), got {tuple(y.shape)}"
                    )
                emb = emb + self.label_emb(y.to(dtype))
            else:
                emb = emb + self.label_emb(y.long())
        elif y is not None:
            raise InvalidInputError(
                "y was given but this U-Net has no vector/class conditioning (num_classes=None)"
            )

        if context is None:
            raise InvalidInputError(f"context (B, tokens, {cfg.context_dim}) is required")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != cfg.context_dim:
            raise InvalidInputError(
                f"context must be ({batch}, tokens, {cfg.context_dim}), got {tuple(context.shape)}"
            )
        context = context.to(dtype)

        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise InvalidInputError(
                f"control must hold {len(self.input_blocks) + 1} residuals (one per input block + middle), "
                f"got {len(control)}"
            )

        h = x.to(dtype)
        cache, key, deep = self.step_cache, None, None
        if cache is not None:  # reuse the deep part's output: run only the shallow blocks around it
            key = (tuple(x.shape), tuple(context.shape), None if y is None else tuple(y.shape))
            deep = cache.fetch(key)
        shallow = len(self.input_blocks) if deep is None else cache.branch + 1
        skips: list[Tensor] = []
        for block in self.input_blocks[:shallow]:
            h = self._run(block, h, emb, context)
            skips.append(h)
        start = len(self.output_blocks) - shallow  # the first output block whose skip is computed
        if deep is None:
            h = self._run(self.middle_block, h, emb, context)
            if control is not None and control[-1] is not None:
                h = h + control[-1].to(dtype)
            start = 0
        else:
            h = deep
        for index in range(start, len(self.output_blocks)):
            if cache is not None and deep is None and index == len(self.output_blocks) - cache.branch - 1:
                cache.store(key, h)
            skip = skips.pop()
            if control is not None and control[len(skips)] is not None:
                skip = skip + control[len(skips)].to(dtype)
            h = torch.cat([h, skip], dim=1)
            h = self._run(self.output_blocks[index], h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Config inference from a state dict


def _transformer_depth(keys: set[str], base: str) -> int:
    depth = 0
    while f"{base}.transformer_blocks.{depth}.norm1.weight" in keys:
        depth += 1
    return depth


def infer_unet_config(state_dict: Mapping[str, Any], prefix: str = "", **overrides: Any) -> UNetConfig:
    """Rebuild a `UNetConfig` from tensor shapes alone (works on ``meta`` tensors).

    Heads are not visible in shapes: SD1-style nets (context 768, conv proj_in) get ``num_heads=8``, all
    others ``num_head_channels=64``. ``overrides`` (e.g. from kuas metadata: norm_num_groups, num_heads,
    dropout) win; giving one of num_heads / num_head_channels clears the other.
    """
    path = None
    keys = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}

    def shape(key: str) -> tuple[int, ...]:
        if key not in keys:
            raise CheckpointError(path, f"U-Net key {prefix + key!r} is missing; is the prefix {prefix!r} "
                                        f"right (single-file checkpoints use 'model.diffusion_model.')?")
        return tuple(state_dict[prefix + key].shape)

    conv_in = shape("input_blocks.0.0.weight")
    model_channels, in_channels = conv_in[0], conv_in[1]
    out_channels = shape("out.2.weight")[0]

    res_blocks: list[int] = [0]
    mults: list[int] = []
    depths: list[set[int]] = [set()]
    context_dims: set[int] = set()
    linear_flags: set[bool] = set()
    i = 1
    while True:
        base = f"input_blocks.{i}"
        if f"{base}.0.op.weight" in keys:
            res_blocks.append(0)
            depths.append(set())
        elif f"{base}.0.in_layers.2.weight" in keys:
            out_ch = shape(f"{base}.0.in_layers.2.weight")[0]
            if out_ch % model_channels:
                raise CheckpointError(path, f"{prefix}{base} has {out_ch} channels, not a multiple of "
                                            f"model_channels={model_channels}; not a supported U-Net")
            if res_blocks[-1] == 0:
                mults.append(out_ch // model_channels)
            res_blocks[-1] += 1
            depth = _transformer_depth(keys, f"{base}.1")
            depths[-1].add(depth)
            if depth:
                context_dims.add(shape(f"{base}.1.transformer_blocks.0.attn2.to_k.weight")[1])
                linear_flags.add(len(shape(f"{base}.1.proj_in.weight")) == 2)
        else:
            break
        i += 1
    if len(mults) != len(res_blocks) or 0 in res_blocks:
        raise CheckpointError(path, f"cannot read the U-Net levels from {prefix}input_blocks.*; the file "
                                    f"may be truncated or of an unsupported architecture")
    if any(len(d) != 1 for d in depths):
        raise CheckpointError(path, "U-Net levels mix blocks with and without (or of different depth) "
                                    "transformers; this variant is not supported")
    level_depth = tuple(d.pop() for d in depths)

    middle_depth = _transformer_depth(keys, "middle_block.1")
    if middle_depth:
        context_dims.add(shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1])
        linear_flags.add(len(shape("middle_block.1.proj_in.weight")) == 2)
    elif "middle_block.1.in_layers.2.weight" not in keys:
        raise CheckpointError(path, f"U-Net key {prefix}middle_block.1.* is missing")
    if len(context_dims) > 1 or len(linear_flags) > 1:
        raise CheckpointError(path, f"U-Net transformers disagree on context width {sorted(context_dims)} "
                                    f"or on linear/conv projections; not supported")
    context_dim = context_dims.pop() if context_dims else 768
    linear = linear_flags.pop() if linear_flags else False

    num_classes: int | str | None = None
    adm_in_channels = None
    if "label_emb.0.0.weight" in keys:
        num_classes, adm_in_channels = "sequential", shape("label_emb.0.0.weight")[1]
    elif "label_emb.weight" in keys:
        num_classes = shape("label_emb.weight")[0]

    kwargs: dict[str, Any] = dict(
        in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        attention_resolutions=tuple(2**lv for lv, d in enumerate(level_depth) if d > 0),
        num_res_blocks=tuple(res_blocks), channel_mult=tuple(mults), transformer_depth=level_depth,
        transformer_depth_middle=middle_depth, context_dim=context_dim, use_linear_in_transformer=linear,
        num_classes=num_classes, adm_in_channels=adm_in_channels,
    )
    if context_dim == 768 and not linear:
        kwargs.update(num_heads=8, num_head_channels=-1)
    else:
        kwargs.update(num_heads=-1, num_head_channels=64)
    if "num_heads" in overrides and "num_head_channels" not in overrides:
        kwargs["num_head_channels"] = -1
    if "num_head_channels" in overrides and "num_heads" not in overrides:
        kwargs["num_heads"] = -1
    kwargs.update(overrides)
    try:
        return UNetConfig(**kwargs)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"{exc} (while inferring the U-Net config; heads and GroupNorm groups are not visible in the "
            f"weights: pass num_heads= / num_head_channels= / norm_num_groups= as overrides)"
        ) from exc

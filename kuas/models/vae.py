"""The Stable Diffusion VAE: LDM's `AutoencoderKL` in plain PyTorch.

Parameter paths are the official single-file keys with `first_stage_model.` stripped, e.g.
`encoder.down.0.block.0.norm1.weight`, `encoder.mid.attn_1.q.weight` (a 1x1 conv, [C, C, 1, 1]),
`decoder.up.3.block.2.nin_shortcut.weight`, `quant_conv.weight`. SD 1.x, 2.x and SDXL share the
architecture (`SD_VAE`); only the latent scale factor differs (0.18215 vs 0.13025), which the caller sets.

Facts this follows (CompVis `ldm/modules/diffusionmodules/model.py`, `ldm/models/autoencoder.py`):
- GroupNorm(32 groups, eps 1e-6) + SiLU before every 3x3 conv; a 1x1 `nin_shortcut` when channels change.
- Downsampling pads right/bottom by one pixel, then a stride-2 3x3 conv without padding.
- Upsampling is nearest-neighbour x2 followed by a 3x3 conv.
- The decoder's `up` list is indexed by resolution level (`up.0` is the full-resolution level, run last),
  and each decoder level has `num_res_blocks + 1` blocks.
- The encoder predicts mean and log-variance (clamped to [-30, 20]) of a diagonal Gaussian.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kuas.errors import CheckpointError, InvalidInputError

__all__ = [
    "SD_VAE",
    "AutoencoderKL",
    "DiagonalGaussian",
    "VAEConfig",
    "infer_vae_config",
]

_GROUPNORM_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an LDM KL autoencoder; field names follow the yaml `ddconfig` plus `embed_dim`.

    `norm_num_groups` is a kuas extra (the official models always use 32) so tiny test models can be
    narrower than 32 channels.
    """

    embed_dim: int = 4
    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        for name in ("embed_dim", "z_channels", "resolution", "in_channels", "out_ch", "ch", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"VAEConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise InvalidInputError(f"VAEConfig.ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        if self.num_res_blocks < 1:
            raise InvalidInputError(f"VAEConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout}")
        for width in {self.ch * m for m in self.ch_mult}:
            if width % self.norm_num_groups:
                raise InvalidInputError(
                    f"VAEConfig: channel count {width} (ch={self.ch} x ch_mult) is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}; pick ch as a multiple of norm_num_groups"
                )

    @property
    def downsample_factor(self) -> int:
        """How many image pixels one latent pixel covers along each side (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/yaml-friendly dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["ch_mult"] = list(self.ch_mult)
        out["attn_resolutions"] = list(self.attn_resolutions)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VAEConfig:
        """Build from `to_dict()` output or from a yaml `ddconfig` (plus `embed_dim`).

        The yaml key `attn_type` is accepted when it names plain attention ("vanilla",
        "vanilla-xformers": the same math); other unknown keys are an error so typos do not pass silently.
        """
        data = dict(data)
        attn_type = data.pop("attn_type", "vanilla")
        if attn_type not in ("vanilla", "vanilla-xformers"):
            raise InvalidInputError(f"VAE attn_type {attn_type!r} is not supported; kuas implements 'vanilla'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown VAEConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)


SD_VAE = VAEConfig()
"""The VAE of SD 1.x, SD 2.x and SDXL (83,653,863 parameters)."""


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: Tensor):
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise InvalidInputError(f"expected moments [B, 2*C, H, W], got shape {tuple(moments.shape)}")
        mean, logvar = moments.chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise; the noise is drawn in fp32 on the generator's device, so a seed gives the
        same latents whatever the model's device or dtype."""
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to N(0, 1), summed over C, H, W: one value per batch item."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def _silu(x: Tensor) -> Tensor:
    """SiLU, in place when no gradient will be needed (saves one activation-sized buffer)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a (1x1-projected) skip."""

    def __init__(
        self, in_channels: int, out_channels: int, *, groups: int, dropout: float, device=None, dtype=None
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_GROUPNORM_EPS, **dd)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, **dd)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_GROUPNORM_EPS, **dd)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, **dd)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, **dd) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(self.dropout(_silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip)  # h is a fresh conv output: adding in place is safe under autograd too


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, channels: int, *, groups: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.GroupNorm(groups, channels, eps=_GROUPNORM_EPS, **dd)
        self.q = nn.Conv2d(channels, channels, 1, **dd)
        self.k = nn.Conv2d(channels, channels, 1, **dd)
        self.v = nn.Conv2d(channels, channels, 1, **dd)
        self.proj_out = nn.Conv2d(channels, channels, 1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]
            return t.reshape(b, c, hgt * wid).transpose(1, 2).unsqueeze(1)

        # SDPA's default scale 1/sqrt(C) is the reference's scale for this single head of width C
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    """Halve H and W: pad one pixel on the right and bottom, then a stride-2 3x3 conv (no padding)."""

    def __init__(self, channels: int, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels: int, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block.N` resnets, optional `attn.N` after each, optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _MidBlock(nn.Module):
    """`mid.block_1`, `mid.attn_1`, `mid.block_2`: the lowest-resolution stage of both halves."""

    def __init__(self, channels: int, *, groups: int, dropout: float, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.block_1 = ResnetBlock(channels, channels, groups=groups, dropout=dropout, **dd)
        self.attn_1 = AttnBlock(channels, groups=groups, **dd)
        self.block_2 = ResnetBlock(channels, channels, groups=groups, dropout=dropout, **dd)


class _CheckpointedStack(nn.Module):
    """Shared by Encoder and Decoder: runs sub-blocks, optionally with gradient checkpointing."""

    gradient_checkpointing: bool = False

    def _run(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


class Encoder(_CheckpointedStack):
    """Image [B, in_channels, H, W] -> moments [B, 2*z_channels, H/f, W/f] (f = 2**(levels-1))."""

    def __init__(self, config: VAEConfig, *, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        cfg = config
        g, p = cfg.norm_num_groups, cfg.dropout
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, **dd)
        self.down = nn.ModuleList()
        in_mult = (1,) + cfg.ch_mult
        res = cfg.resolution
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            block_in = cfg.ch * in_mult[level]
            block_out = cfg.ch * mult
            stage = _Level()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, groups=g, dropout=p, **dd))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups=g, **dd))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in, **dd)
                res //= 2
            self.down.append(stage)
        self.mid = _MidBlock(block_in, groups=g, dropout=p, **dd)
        self.norm_out = nn.GroupNorm(g, block_in, eps=_GROUPNORM_EPS, **dd)
        out_channels = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = self._run(block, h)
                if len(stage.attn):
                    h = self._run(stage.attn[i], h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        return self.conv_out(_silu(self.norm_out(h)))


class Decoder(_CheckpointedStack):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]."""

    def __init__(self, config: VAEConfig, *, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        cfg = config
        g, p = cfg.norm_num_groups, cfg.dropout
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1, **dd)
        self.mid = _MidBlock(block_in, groups=g, dropout=p, **dd)
        # Built lowest resolution first (the order they run), stored by level index: up[0] = full size.
        stages: list[_Level] = []
        for level in reversed(range(levels)):
            block_out = cfg.ch * cfg.ch_mult[level]
            stage = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, groups=g, dropout=p, **dd))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups=g, **dd))
            if level != 0:
                stage.upsample = Upsample(block_in, **dd)
                res *= 2
            stages.append(stage)
        self.up = nn.ModuleList(reversed(stages))
        self.norm_out = nn.GroupNorm(g, block_in, eps=_GROUPNORM_EPS, **dd)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1, **dd)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = self._run(block, h)
                if len(stage.attn):
                    h = self._run(stage.attn[i], h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder that maps images in [-1, 1] to SD latents and back.

    `encode` returns the posterior over UNscaled latents; multiply a sample by `scale_factor` before
    handing it to the U-Net, and divide by it before `decode`.
    """

    def __init__(
        self,
        config: VAEConfig,
        *,
        scale_factor: float = 0.18215,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not config.double_z:
            raise InvalidInputError("AutoencoderKL needs double_z=True (the encoder predicts mean and logvar)")
        self.config = config
        self.scale_factor = float(scale_factor)
        dd = {"device": device, "dtype": dtype}
        self.encoder = Encoder(config, **dd)
        self.decoder = Decoder(config, **dd)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1, **dd)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1, **dd)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (training only) to save memory."""
        self.encoder.gradient_checkpointing = bool(enabled)
        self.decoder.gradient_checkpointing = bool(enabled)

    def _check(self, x: Tensor, channels: int, what: str) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InvalidInputError(f"VAE {what} must be a [B, {channels}, H, W] tensor, got {shape}")
        if not x.is_floating_point():
            raise InvalidInputError(f"VAE {what} must be floating point, got {x.dtype}")
        return x.to(device=self.device, dtype=self.dtype)

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images [B, C, H, W] in [-1, 1] -> posterior over latents [B, embed_dim, H/8, W/8] (SD).

        The input is cast to the model's device and dtype.
        """
        x = self._check(images, self.config.in_channels, "images")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, latents: Tensor) -> Tensor:
        """UNscaled latents [B, embed_dim, h, w] -> images [B, out_ch, 8h, 8w] in about [-1, 1]."""
        z = self._check(latents, self.config.embed_dim, "latents")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, images: Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (the training-time round trip)."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


_LEVEL_RE = re.compile(r"^encoder\.down\.(\d+)\.")
_BLOCK_RE = re.compile(r"^encoder\.down\.0\.block\.(\d+)\.")


def infer_vae_config(state_dict: Mapping[str, Tensor], prefix: str = "", **overrides: Any) -> VAEConfig:
    """Read a `VAEConfig` off the tensor shapes under `prefix` (works on meta tensors).

    Shapes fix every field except `resolution` (only used to place `attn_resolutions`), `dropout` and
    `norm_num_groups`; those take the SD defaults unless given in `overrides`. Any field may be
    overridden.
    """
    known = {f.name for f in dataclasses.fields(VAEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidInputError(f"unknown VAEConfig fields {unknown}; valid fields are {sorted(known)}")

    def shape(key: str) -> tuple[int, ...]:
        tensor = state_dict.get(prefix + key)
        if tensor is None:
            raise CheckpointError(
                None, f"VAE weights lack '{prefix + key}'; is the prefix {prefix!r} right and is this an LDM VAE?"
            )
        return tuple(tensor.shape)

    keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    levels = sorted({int(m.group(1)) for k in keys if (m := _LEVEL_RE.match(k))})
    blocks = sorted({int(m.group(1)) for k in keys if (m := _BLOCK_RE.match(k))})
    if not levels or levels != list(range(len(levels))) or not blocks:
        raise CheckpointError(None, f"no 'encoder.down.N.block.M' keys under prefix {prefix!r}: not an LDM VAE")

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    enc_out = shape("encoder.conv_out.weight")[0]
    z_channels = shape("decoder.conv_in.weight")[1]
    embed_dim = shape("post_quant_conv.weight")[1]
    resolution = int(overrides.get("resolution", VAEConfig.resolution))
    attn_resolutions = tuple(
        resolution // 2**i for i in levels if f"{prefix}encoder.down.{i}.attn.0.q.weight" in state_dict
    )
    values: dict[str, Any] = {
        "embed_dim": embed_dim,
        "double_z": enc_out == 2 * z_channels,
        "z_channels": z_channels,
        "resolution": resolution,
        "in_channels": in_channels,
        "out_ch": shape("decoder.conv_out.weight")[0],
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": len(blocks),
        "attn_resolutions": attn_resolutions,
    }
    if shape("quant_conv.weight")[0] != 2 * embed_dim:
        raise CheckpointError(None, f"VAE quant_conv outputs {shape('quant_conv.weight')[0]} channels, "
                                    f"expected 2 x embed_dim = {2 * embed_dim}: not an LDM KL autoencoder")
    values.update(overrides)
    if "norm_num_groups" not in overrides and any((ch * m) % VAEConfig.norm_num_groups for m in ch_mult):
        raise CheckpointError(
            None,
            f"VAE widths {[ch * m for m in ch_mult]} do not split into the usual 32 GroupNorm groups; "
            "the group count is not stored in the weights: pass norm_num_groups=<the training value>",
        )
    return VAEConfig(**values)

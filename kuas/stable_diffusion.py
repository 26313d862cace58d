"""`StableDiffusion`: the loaded networks of one model, and `kuas.load` / `kuas.create`.

A `StableDiffusion` holds a U-Net, a VAE, the family's text encoder(s) and the tokenizer, and knows
how the family turns prompts into U-Net conditioning. Generation (txt2img, img2img, ...) lives in
`kuas.pipelines`; the methods here are thin entry points to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kuas.checkpoints.families import UNET_PREFIX, VAE_PREFIX, Family, TextEncoderSpec, get_family
from kuas.checkpoints.metadata import KUAS_CONFIG_KEY
from kuas.checkpoints.state_dict import ZTSNR_MARKER_KEY

DEFAULTS_KEY = "kuas.defaults"  # metadata: recommended generation settings (JSON)
from kuas.errors import InvalidInputError
from kuas.models.clip import CLIPTextConfig, CLIPTextModel, OpenCLIPTextModel
from kuas.models.unet import UNetConfig, UNetModel, sdxl_vector_conditioning
from kuas.models.vae import AutoencoderKL, VAEConfig
from kuas.runtime import RuntimePolicy
from kuas.sampling.schedules import DiscreteSchedule

log = logging.getLogger(__name__)



@dataclass
class Conditioning:
    """What the U-Net is conditioned on for a batch of prompts.

    context: (B, 77 * chunks, context_dim) cross-attention input.
    pooled: SDXL's pooled text embedding (B, 1280), else None.
    y: SDXL's vector conditioning (B, 2816): pooled + size embeddings for the model's native size
        (pipelines rebuild it for the requested size with `StableDiffusion.vector_conditioning`).
    """

    context: Tensor
    pooled: Tensor | None = None
    y: Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]


@dataclass(frozen=True)
class TextEncoderSlot:
    """A loaded text encoder's place in the family: which layer feeds the U-Net, padding, pooling."""

    spec: TextEncoderSpec
    layer: int
    final_norm: bool


class StableDiffusion:
    """A Stable Diffusion model: networks plus what the family says about using them."""

    # generation settings a model file may recommend (metadata `kuas.defaults`)
    DEFAULT_SETTINGS = (
        "steps", "cfg_scale", "sampler", "scheduler", "clip_skip", "guidance_rescale", "skip_early_cfg", "eta"
    )

    def __init__(
        self,
        family: Family,
        unet: UNetModel,
        vae: AutoencoderKL,
        text_encoders: Mapping[str, nn.Module],
        *,
        prediction: str | None = None,
        zero_terminal_snr: bool = False,
        text_layers: Mapping[str, tuple[int, bool]] | None = None,
        path: str | os.PathLike | None = None,
        metadata: Mapping[str, str] | None = None,
        runtime: RuntimePolicy | None = None,
    ):
        from kuas.tokenizer import CLIPTokenizer

        self.family = family
        self.unet = unet
        self.vae = vae
        self.text_encoders = dict(text_encoders)
        self.tokenizer = CLIPTokenizer.default()
        self.prediction = prediction or family.prediction
        if self.prediction not in ("eps", "v"):
            raise InvalidInputError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")
        # trained on the zero-terminal-SNR schedule (Lin et al. 2024): it must be sampled on it too
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.slots: list[TextEncoderSlot] = []
        for spec in family.text_encoders:
            layer, final_norm = (text_layers or {}).get(spec.name, (spec.layer, spec.final_norm))
            self.slots.append(TextEncoderSlot(spec, layer, final_norm))
        self.path = None if path is None else os.fspath(path)
        self.metadata = dict(metadata or {})
        self._hash: str | None = None
        if runtime is None:  # describe the networks as they are
            runtime = RuntimePolicy(next(unet.parameters()).device, unet.dtype, self.text_encoder.dtype,
                                    vae.dtype, reason="as built")
        self.runtime = runtime  # (the setter also tells the U-Net which activation layout to expect)
        # lowvram on the CPU: how to read a released network back from its file (set by `kuas.load`)
        self._reloaders: dict[str, Callable[[nn.Module], None]] = {}

    # -- components -----------------------------------------------------------------------------------
    @property
    def runtime(self) -> RuntimePolicy:
        """How the networks run (`kuas.runtime.RuntimePolicy`): chosen by `kuas.load`, kept by `to()`."""
        return self._runtime

    @runtime.setter
    def runtime(self, policy: RuntimePolicy) -> None:
        self._runtime = policy
        self.unet.input_memory_format = policy.memory_format

    @property
    def text_encoder(self) -> nn.Module:
        return self.text_encoders[self.family.text_encoders[0].name]

    @property
    def text_encoder_2(self) -> nn.Module | None:
        return self.text_encoders.get("text_encoder_2")

    @property
    def device(self) -> torch.device:
        """Where the networks compute (`runtime.device`; with lowvram a network may sit elsewhere between
        uses)."""
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_scale(self) -> float:
        return self.vae.scale_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.embed_dim

    @property
    def vae_scale(self) -> int:
        """Pixels per latent pixel (8 for every official model)."""
        return self.vae.config.downsample_factor

    @property
    def schedule(self) -> DiscreteSchedule:
        """The noise schedule the model was trained on: SD's, or SD's rescaled to zero terminal SNR."""
        return DiscreteSchedule.sd(zero_terminal_snr=self.zero_terminal_snr)

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        """Move every network (and the runtime policy with them) to `device` / `dtype`."""
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        if dtype is not None:
            self.runtime = self.runtime.with_dtype(dtype, device)
        elif device is not None:
            self.runtime = dataclasses.replace(self.runtime, device=torch.device(device))
        return self

    # -- residency (lowvram) --------------------------------------------------------------------------
    def network(self, name: str) -> nn.Module:
        """A network by name: "unet", "vae", "text" (every text encoder's first) or a text encoder's name."""
        if name == "unet":
            return self.unet
        if name == "vae":
            return self.vae
        if name == "text":
            return self.text_encoder
        if name in self.text_encoders:
            return self.text_encoders[name]
        raise InvalidInputError(f"unknown network {name!r}; use 'unet', 'vae', 'text' or {sorted(self.text_encoders)}")

    def _network_names(self, names: tuple[str, ...]) -> set[str]:
        out = set()
        for name in names:
            if name == "text":
                out.update(self.text_encoders)
            else:
                self.network(name)
                out.add(name)
        return out

    @contextlib.contextmanager
    def using(self, *names: str) -> Iterator[None]:
        """Make the named networks ready on `runtime.device` for the block.

        Without `runtime.lowvram` this does nothing. With it, every other network leaves: on CUDA it moves
        to the CPU, on the CPU it is released (its parameters become meta tensors) and read back from its
        file the next time it is used. So only the active network (text encoders, U-Net, VAE in turn)
        occupies the memory that matters.
        """
        wanted = self._network_names(names)
        if not self.runtime.lowvram:
            yield
            return
        everything = {"unet": self.unet, "vae": self.vae, **self.text_encoders}
        for name, module in everything.items():
            if name not in wanted:
                self._offload(name, module)
        for name in wanted:
            self._bring(name, everything[name])
        yield

    def _offload(self, name: str, module: nn.Module) -> None:
        param = next(module.parameters())
        if self.runtime.device.type != "cpu":
            if param.device.type != "cpu" and not param.is_meta:
                module.to("cpu")
        elif name in self._reloaders and not param.is_meta:
            module.to_empty(device="meta")
            log.debug("lowvram: released %s", name)

    def _bring(self, name: str, module: nn.Module) -> None:
        param = next(module.parameters())
        if param.is_meta:
            self._reloaders[name](module)
            log.debug("lowvram: read %s back from its file", name)
        elif param.device != self.runtime.device:
            module.to(self.runtime.device)

    def eval(self) -> StableDiffusion:
        for m in self.modules().values():
            m.eval().requires_grad_(False)
        return self

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M" for n, m in self.modules().items())
        return f"StableDiffusion(family={self.family.name!r}, prediction={self.prediction!r}, {counts})"

    @property
    def model_hash(self) -> str | None:
        """First 10 hex digits of the file's sha256 (A1111's "Model hash"), None for an unsaved model."""
        if self._hash is None and self.path and os.path.isfile(self.path):
            from kuas.fileio import sha256_file

            self._hash = sha256_file(self.path)[:10]
        return self._hash

    @property
    def resolution(self) -> int:
        """The native image size: ModelSpec `modelspec.resolution` ("WxH") when present, else the family's."""
        text = self.metadata.get("modelspec.resolution", "")
        try:
            return int(text.lower().split("x")[0])
        except ValueError:
            return self.family.resolution

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else self.metadata.get("modelspec.title", self.family.name)

    # -- prompts --------------------------------------------------------------------------------------
    def text_layer(self, slot: TextEncoderSlot, clip_skip: int = 1) -> int:
        """The hidden layer a slot feeds the U-Net; A1111's "Clip skip" N moves it N - 1 layers earlier."""
        if clip_skip < 1:
            raise InvalidInputError(f"clip_skip must be 1 (no skip) or more, not {clip_skip}")
        layer = slot.layer - (clip_skip - 1)
        n = self.text_encoders[slot.spec.name].config.layers
        if not -n <= layer < n:
            raise InvalidInputError(f"clip_skip {clip_skip} is too large for a {n}-layer text encoder")
        return layer

    @torch.no_grad()
    def encode_tokens(
        self, tokens: Mapping[str, Tensor], *, clip_skip: int = 1
    ) -> Conditioning:
        """Encode token ids (one (B, 77) tensor per text encoder name) into U-Net conditioning."""
        with self.using("text"):
            return self._encode_tokens(tokens, clip_skip)

    def _encode_tokens(self, tokens: Mapping[str, Tensor], clip_skip: int) -> Conditioning:
        hidden, pooled = [], None
        for slot in self.slots:
            te = self.text_encoders[slot.spec.name]
            ids = tokens[slot.spec.name].to(te.device if hasattr(te, "device") else self.device)
            out = te(ids, layer=self.text_layer(slot, clip_skip), final_norm=slot.final_norm,
                     return_pooled=slot.spec.pooled)
            hidden.append(out.hidden)
            if slot.spec.pooled:
                pooled = out.pooled
        context = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
        y = None
        if pooled is not None and self.family.vector_conditioning:
            size = (self.resolution, self.resolution)
            y = self.vector_conditioning(pooled, original_size=size, target_size=size)
        return Conditioning(context, pooled, y)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """Token ids per text encoder (77 tokens, truncated; the prompt language lifts the limit)."""
        return {s.spec.name: self.tokenizer(prompts, pad_with=s.spec.pad_with) for s in self.slots}

    def encode_prompt(self, prompts: str | list[str], *, clip_skip: int = 1) -> Conditioning:
        """U-Net conditioning for plain prompts (no weighting syntax)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.encode_tokens(self.tokenize(prompts), clip_skip=clip_skip)

    def vector_conditioning(
        self, pooled: Tensor, *, original_size: tuple[int, int], target_size: tuple[int, int],
        crop_top_left: tuple[int, int] = (0, 0), aesthetic_score: float = 6.0,
    ) -> Tensor | None:
        """SDXL's `y` (pooled text + size/crop embeddings); None for families without it."""
        if not self.family.vector_conditioning:
            return None
        if self.family.refiner:
            return sdxl_vector_conditioning(pooled, original_size, crop_top_left, aesthetic_score=aesthetic_score)
        return sdxl_vector_conditioning(pooled, original_size, crop_top_left, target_size)

    # -- saving ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """All weights under their official single-file keys."""
        out: dict[str, Tensor] = {}
        for k, v in self.unet.state_dict().items():
            out[UNET_PREFIX + k] = v
        for k, v in self.vae.state_dict().items():
            out[VAE_PREFIX + k] = v
        for slot in self.slots:
            for k, v in self.text_encoders[slot.spec.name].state_dict().items():
                out[slot.spec.prefix + k] = v
        return out

    def kuas_config(self) -> dict[str, Any]:
        """What kuas needs besides the shapes to rebuild the networks exactly (stored in metadata)."""
        return {
            "family": self.family.name,
            "prediction": self.prediction,
            **({"zero_terminal_snr": True} if self.zero_terminal_snr else {}),
            "latent_scale": self.vae.scale_factor,
            "unet": self.unet.config.to_dict(),
            "vae": self.vae.config.to_dict(),
            "text_encoders": {
                s.spec.name: {
                    "config": self.text_encoders[s.spec.name].config.to_dict(),
                    "layer": s.layer,
                    "final_norm": s.final_norm,
                }
                for s in self.slots
            },
        }

    def save(
        self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None
    ) -> Path:
        """Write one safetensors file in the official layout, with ModelSpec metadata and kuas' config."""
        from kuas.checkpoints.metadata import modelspec_metadata
        from kuas.checkpoints.safetensors_io import save_safetensors

        tensors = self.state_dict()
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        if self.zero_terminal_snr:  # the marker key other tools (ComfyUI, A1111 forks) look for
            tensors[ZTSNR_MARKER_KEY] = torch.zeros(0)
        meta = modelspec_metadata(
            self.family, prediction=self.prediction, title=Path(path).stem, resolution=self.resolution
        )
        meta[KUAS_CONFIG_KEY] = json.dumps(self.kuas_config(), sort_keys=True)
        meta.update(metadata or {})
        save_safetensors(path, tensors, meta)
        self.path, self._hash = os.fspath(path), None
        return Path(path)

    # -- generation (kuas.pipelines) ------------------------------------------------------------------
    @property
    def defaults(self) -> dict[str, Any]:
        """Generation settings the model's author recommends (metadata `kuas.defaults`, JSON), used by
        txt2img & co. for every setting the caller leaves out (e.g. the built-in model's guidance scale)."""
        try:
            value = json.loads(self.metadata.get(DEFAULTS_KEY, "{}"))
        except ValueError:
            return {}
        return {k: v for k, v in value.items() if k in self.DEFAULT_SETTINGS} if isinstance(value, dict) else {}

    def txt2img(self, prompt: str | list[str], **kwargs: Any):
        from kuas.pipelines.txt2img import txt2img

        return txt2img(self, prompt, **{**self.defaults, **kwargs})

    def img2img(self, prompt: str | list[str], image: Any, **kwargs: Any):
        from kuas.pipelines.img2img import img2img

        return img2img(self, prompt, image, **{**self.defaults, **kwargs})

    def inpaint(self, prompt: str | list[str], image: Any, mask: Any, **kwargs: Any):
        from kuas.pipelines.inpaint import inpaint

        return inpaint(self, prompt, image, mask, **{**self.defaults, **kwargs})

    def outpaint(self, prompt: str | list[str], image: Any, **kwargs: Any):
        from kuas.pipelines.outpaint import outpaint

        return outpaint(self, prompt, image, **{**self.defaults, **kwargs})


# -- construction -------------------------------------------------------------------------------------
def build_text_encoder(spec: TextEncoderSpec, config: CLIPTextConfig, **factory: Any) -> nn.Module:
    cls = CLIPTextModel if spec.kind == "clip" else OpenCLIPTextModel
    return cls(config, **factory)


def _as_config(cls, value: Any, base: Any) -> Any:
    if value is None:
        return base
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return dataclasses.replace(base, **value)
    raise InvalidInputError(f"expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def create(
    family: str,
    *,
    seed: int = 0,
    unet: UNetConfig | Mapping[str, Any] | None = None,
    vae: VAEConfig | Mapping[str, Any] | None = None,
    text_encoder: CLIPTextConfig | Mapping[str, Any] | None = None,
    text_encoder_2: CLIPTextConfig | Mapping[str, Any] | None = None,
    prediction: str | None = None,
    zero_terminal_snr: bool = False,
    latent_scale: float | None = None,
    resolution: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> StableDiffusion:
    """A randomly initialised model of `family` ("sd1", "sd2-v", "sdxl", ...) at any size.

    Each network's config defaults to the family's full-size one; pass a config or a dict of fields to
    change (e.g. `unet={"model_channels": 32}`). The U-Net's `context_dim` follows the text encoder
    width(s) unless given. Initialisation is seeded and leaves the global RNG untouched.
    """
    fam = get_family(family)
    te_overrides = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    te_configs = {s.name: _as_config(CLIPTextConfig, te_overrides.get(s.name), s.config) for s in fam.text_encoders}
    if isinstance(unet, Mapping) and "channel_mult" in unet:
        # per-level fields of the full-size preset do not fit another number of levels: use their scalar
        # form unless given (depth per level then follows attention_resolutions)
        base = fam.unet
        unet = {"transformer_depth": max(base.transformer_depth), "transformer_depth_middle": None,
                "num_res_blocks": base.num_res_blocks if isinstance(base.num_res_blocks, int)
                else max(base.num_res_blocks), **unet}
    unet_cfg = _as_config(UNetConfig, unet, fam.unet)
    given = set(unet) if isinstance(unet, Mapping) else {"context_dim", "adm_in_channels"} if unet else set()
    if "context_dim" not in given:  # cross-attention width follows the text encoder(s)
        unet_cfg = dataclasses.replace(unet_cfg, context_dim=sum(c.width for c in te_configs.values()))
    if fam.vector_conditioning and "adm_in_channels" not in given:  # pooled text + 256 per size number
        pooled = next(c.projection_dim or c.width for s, c in zip(fam.text_encoders, te_configs.values())
                      if s.pooled)
        unet_cfg = dataclasses.replace(unet_cfg, adm_in_channels=pooled + (5 if fam.refiner else 6) * 256)
    vae_cfg = _as_config(VAEConfig, vae, fam.vae)
    factory = {"device": device, "dtype": dtype}
    with torch.random.fork_rng(devices=[]):  # each network from its own seed: changing one config
        torch.manual_seed(seed)                   # does not change another's initial weights
        unet_model = UNetModel(unet_cfg, **factory)
        torch.manual_seed(seed + 1)
        vae_model = AutoencoderKL(vae_cfg, scale_factor=latent_scale or fam.latent_scale, **factory)
        encoders = {}
        for i, s in enumerate(fam.text_encoders):
            torch.manual_seed(seed + 2 + i)
            encoders[s.name] = build_text_encoder(s, te_configs[s.name], **factory)
    metadata = {"modelspec.resolution": f"{resolution}x{resolution}"} if resolution else None
    sd = StableDiffusion(fam, unet_model, vae_model, encoders, prediction=prediction,
                         zero_terminal_snr=zero_terminal_snr, metadata=metadata)
    return sd.eval()


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    vae: str | os.PathLike | None = None,
    prediction: str | None = None,
    runtime: RuntimePolicy | None = None,
    threads: int | None = None,
    lowvram: bool = False,
    compile: bool = False,
) -> StableDiffusion:
    """Load a `.safetensors` / `.ckpt` single file or a diffusers folder, never running code from it.

    How the model runs is decided here, once (`kuas.runtime.choose_policy`, kept as `sd.runtime`):
    dtype: one compute dtype for every network; default None picks the fastest that keeps quality for
        this machine (CPU with AVX512-BF16/AMX: bf16 U-Net and text encoder, fp32 VAE; other CPUs: fp32;
        CUDA: fp16). Weights already in the compute dtype stay zero-copy views of the file's map.
    threads: torch intra-op threads (default: one per physical core, unless OMP_NUM_THREADS /
        MKL_NUM_THREADS / KUAS_THREADS is set); set once here, never at import.
    lowvram: keep only the network in use on the device / in memory (`StableDiffusion.using`).
    compile: run the U-Net through `torch.compile` (the first generation compiles, minutes on a CPU).
    runtime: a ready `RuntimePolicy` instead of the four arguments above and `device`.
    vae: a separate VAE file (single-file VAE, full checkpoint or diffusers `vae/` weights) that replaces
        the model's own.
    prediction: "eps" or "v"; needed only for SD 2.x files whose metadata does not say (otherwise it is
        read from a sidecar `.yaml`, the ModelSpec metadata, or guessed with a log message).
    """
    from kuas.checkpoints.loading import analyse, read_checkpoint
    from kuas.checkpoints.state_dict import SkipMetaInit, load_into
    from kuas.runtime import choose_policy

    if prediction is not None and prediction not in ("eps", "v"):
        raise InvalidInputError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    a = analyse(read_checkpoint(path), prediction=prediction)
    if runtime is None:
        runtime = choose_policy(device, dtype, family=a.family.name, threads=threads, lowvram=lowvram,
                                compile=compile)
    runtime.apply_threads()
    weights = a.contents.weights
    with SkipMetaInit():  # empty shells: the weights come next
        unet = UNetModel(a.unet, device="meta")
        vae_model = AutoencoderKL(a.vae, scale_factor=a.latent_scale, device="meta")
        encoders = {s.name: build_text_encoder(s, a.text_encoders[s.name], device="meta")
                    for s in a.family.text_encoders}
    # lowvram: networks start where they wait (CPU) and reach the device when used
    home = torch.device("cpu") if runtime.lowvram else runtime.device
    # weights is ours alone (nobody wrote into it): tensors that change dtype/device are read from the
    # file rather than through its map, so peak memory stays ~1x the loaded weights
    fill = {"path": path, "device": home, "read_from_file": True}
    load_into(unet, weights, prefix=UNET_PREFIX, dtype=runtime.unet_dtype, **fill)
    load_into(vae_model, weights, prefix=VAE_PREFIX, dtype=runtime.vae_dtype, **fill)
    for spec in a.family.text_encoders:
        load_into(encoders[spec.name], weights, prefix=spec.prefix, dtype=runtime.text_dtype, **fill)
    log.debug("%s: family %s, prediction %s (%s); runtime %s", path, a.family.name, a.prediction,
              a.prediction_source, runtime.describe())
    sd = StableDiffusion(a.family, unet, vae_model, encoders, prediction=a.prediction,
                         zero_terminal_snr=a.contents.zero_terminal_snr, text_layers=a.contents.text_layers, path=path if os.path.isfile(path) else None,
                         metadata=a.contents.metadata, runtime=runtime)
    if vae is not None:
        sd.vae = load_vae(vae, dtype=runtime.vae_dtype, device=home, scale_factor=sd.vae.scale_factor)
    if runtime.lowvram and runtime.device.type == "cpu":
        sources = {"unet": (path, UNET_PREFIX, runtime.unet_dtype)}
        if vae is None:
            sources["vae"] = (path, VAE_PREFIX, runtime.vae_dtype)
        sources.update({s.name: (path, s.prefix, runtime.text_dtype) for s in a.family.text_encoders})
        sd._reloaders = {name: _file_reloader(*source, runtime.memory_format)
                         for name, source in sources.items()}
    if runtime.channels_last:  # NHWC convolution weights: no per-call reorder for NHWC activations
        sd.unet.to(memory_format=torch.channels_last)
        sd.vae.to(memory_format=torch.channels_last)
    if runtime.compile:
        sd.unet.compile(mode="reduce-overhead" if runtime.device.type == "cuda" else None)
    return sd.eval()


def _file_reloader(
    path: str | os.PathLike, prefix: str, dtype: torch.dtype, memory_format: torch.memory_format
) -> Callable[[nn.Module], None]:
    """A function that reads a released (meta) network's weights back from `path` (lowvram on the CPU)."""

    def reload(module: nn.Module) -> None:
        from kuas.checkpoints.loading import read_checkpoint
        from kuas.checkpoints.state_dict import load_into

        weights = read_checkpoint(path).weights  # the same keys (EMA swapped in) as the first load
        load_into(module, weights, prefix=prefix, path=path, dtype=dtype, device="cpu", read_from_file=True)
        module.to(memory_format=memory_format).eval().requires_grad_(False)

    return reload


def load_vae(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    scale_factor: float = 0.18215,
) -> AutoencoderKL:
    """A VAE from its own file: a VAE-only single file (with or without `first_stage_model.`), a full
    checkpoint (its VAE is taken) or diffusers `vae/` weights."""
    from kuas.checkpoints.state_dict import SkipMetaInit, load_into
    from kuas.models.vae import infer_vae_config

    weights, prefix, cfg = _vae_weights(path)
    cfg = cfg or infer_vae_config(weights, prefix)
    with SkipMetaInit():
        vae = AutoencoderKL(cfg, scale_factor=scale_factor, device="meta")
    load_into(vae, weights, prefix=prefix, path=path, dtype=dtype, device=device, read_from_file=True)
    return vae.eval()


def vae_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The VAE tensors of a model or VAE file (any layout `load_vae` reads), with the official VAE keys
    (`encoder.conv_in.weight`, ...): for a caller that knows the config, which shapes alone do not give."""
    weights, prefix, _ = _vae_weights(path)
    return {k[len(prefix):]: weights[k] for k in weights if k.startswith(prefix)}


def _vae_weights(path: str | os.PathLike):
    """(tensors, key prefix of the VAE's tensors, config where the layout gives one) of a VAE's file."""
    from kuas.checkpoints.state_dict import read_state_dict

    weights = read_state_dict(path)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in weights) else ""
    if not prefix and "decoder.conv_in.weight" not in weights:
        from kuas.checkpoints.diffusers_keys import diffusers_to_native

        converted = diffusers_to_native("vae", weights, None)
        return converted.tensors, "", converted.config
    return weights, prefix, None

"""How kuas runs a loaded model: device, compute dtype per network, memory format, threads, memory savers.

A `RuntimePolicy` is chosen once per load (`choose_policy`, called by `kuas.load`) and travels with the
model (`StableDiffusion.runtime`); the pipelines read it, nothing else holds it. Choosing probes the device
(CPU instruction sets, CUDA capability), so it happens lazily at load time, never at import.

Defaults (what "fast by default without visible quality loss" means per machine):

* CPU with AVX512-BF16 or AMX: U-Net and VAE in bfloat16 (oneDNN runs bf16 matmuls and convolutions at
  ~4x the float32 rate here; bf16 keeps float32's exponent range, so nothing overflows; a bf16 VAE decode
  differs from float32 by ~50 dB PSNR in 8-bit pixels, i.e. not visibly), the text encoder in float32
  (it runs once per prompt and is bound by small elementwise ops, so bf16 saves nothing there but would
  perturb every image), channels_last activations and convolution weights (oneDNN's native layout: no
  reorders around each convolution).
* other CPUs: float32 everywhere, contiguous layout (channels_last gives nothing there).
* CUDA: float16 networks (bfloat16 VAE on GPUs that have it, since the SDXL VAE overflows float16; other
  VAEs fall back to float32 on a NaN), channels_last, SDPA (flash / memory-efficient kernels).

Everything numeric that must stay in float32 stays there whatever the policy: GroupNorm statistics, the
attention softmax (SDPA accumulates in float32), the sampler's latents and the classifier-free guidance
arithmetic. Non-finite U-Net or VAE outputs in low precision are retried in float32 by the pipelines.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kuas.errors import InvalidInputError

log = logging.getLogger(__name__)

__all__ = [
    "NETWORKS",
    "RuntimePolicy",
    "choose_policy",
    "cpu_has_fast_bf16",
    "physical_cores",
]

NETWORKS = ("unet", "text", "vae")
# Decode in VAE tiles above this many output pixels (the decoder's activations at 2048x2048 are ~8 GB in
# float32); lowvram lowers it so a 1024x1024 decode also stays small.
VAE_TILE_PIXELS = 2048 * 2048
VAE_TILE_PIXELS_LOWVRAM = 1024 * 1024
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class RuntimePolicy:
    """Where and how a model computes; chosen once per load and passed explicitly.

    device: where the networks compute.
    unet_dtype / text_dtype / vae_dtype: each network's compute (and storage) dtype.
    channels_last: run convolutions on NHWC activations (the U-Net input and the VAE latents are converted
        once per call) with NHWC convolution weights (converted at load: these are copies even when the
        file's dtype is the compute dtype; linear and norm weights stay zero-copy views of the file).
    threads: intra-op threads torch should use, or None to leave torch's setting alone.
    lowvram: keep only the network in use on the compute device (CUDA) or in memory (CPU: the others are
        released and re-read from their file when needed).
    compile: run the U-Net through `torch.compile` (first call compiles: minutes on a CPU).
    vae_tile_pixels: decode in overlapping tiles above this many output pixels.
    reason: why these choices (for logs and benchmark tables).
    """

    device: torch.device | str = "cpu"
    unet_dtype: torch.dtype = torch.float32
    text_dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    channels_last: bool = False
    threads: int | None = None
    lowvram: bool = False
    compile: bool = False
    vae_tile_pixels: int = VAE_TILE_PIXELS
    reason: str = "explicit"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        for name in ("unet_dtype", "text_dtype", "vae_dtype"):
            object.__setattr__(self, name, as_dtype(getattr(self, name), name))
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InvalidInputError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.vae_tile_pixels < 64 * 64:
            raise InvalidInputError(f"vae_tile_pixels must be at least 4096, got {self.vae_tile_pixels}")

    def dtype_of(self, network: str) -> torch.dtype:
        """Compute dtype of "unet", "text" or "vae"."""
        if network not in NETWORKS:
            raise InvalidInputError(f"network must be one of {NETWORKS}, got {network!r}")
        return getattr(self, f"{network}_dtype")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def with_dtype(self, dtype: torch.dtype, device: torch.device | str | None = None) -> RuntimePolicy:
        """The same policy after `StableDiffusion.to(device, dtype)` moved every network."""
        device = self.device if device is None else torch.device(device)
        return dataclasses.replace(self, device=device, unet_dtype=dtype, text_dtype=dtype, vae_dtype=dtype)

    def describe(self) -> str:
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        parts = [f"{self.device}", f"unet {names.get(self.unet_dtype, self.unet_dtype)}",
                 f"text {names.get(self.text_dtype, self.text_dtype)}",
                 f"vae {names.get(self.vae_dtype, self.vae_dtype)}",
                 "channels_last" if self.channels_last else "contiguous"]
        if self.threads:
            parts.append(f"{self.threads} threads")
        if self.lowvram:
            parts.append("lowvram")
        if self.compile:
            parts.append("compiled")
        return ", ".join(parts) + f" ({self.reason})"

    def apply_threads(self) -> None:
        """Set torch's intra-op thread count to `threads` (once per load; a no-op when None or already)."""
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


def as_dtype(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """A torch float dtype from a dtype or a name ("bf16", "float16", ...)."""
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPES:
        dtype = _DTYPES[value.lower().removeprefix("torch.")]
    else:
        raise InvalidInputError(f"{what} must be float32, float16 or bfloat16, got {value!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidInputError(f"{what} must be float32, float16 or bfloat16, got {dtype}")
    return dtype


# -- probing the machine (only when a policy is chosen) -------------------------------------------------
def _cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_fast_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 dot products natively (x86 AVX512-BF16 or AMX-BF16), i.e. when
    oneDNN's bf16 kernels beat float32. Emulated bf16 (plain AVX2/AVX-512) is slower than float32."""
    flags = _cpu_flags(cpuinfo)
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # non-Linux x86: ask torch
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def physical_cores() -> int:
    """CPU cores this process may use, counting SMT siblings once (what torch's threads should be)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
            cores.add(siblings.strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _explicit_threads() -> bool:
    """The user already chose torch's thread count through the environment."""
    return any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KUAS_THREADS"))


def choose_policy(
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    family: str | None = None,
    threads: int | None = None,
    lowvram: bool = False,
    compile: bool = False,
    vae_dtype: torch.dtype | str | None = None,
    channels_last: bool | None = None,
    cpuinfo: str | os.PathLike = "/proc/cpuinfo",
) -> RuntimePolicy:
    """The fastest policy for this machine that keeps quality (see the module docstring).

    dtype: an explicit compute dtype for every network (as `kuas.load(dtype=...)` always meant); None
        picks per network. vae_dtype overrides the VAE's alone. threads: an explicit intra-op thread
        count; None sets one thread per physical core unless OMP_NUM_THREADS / MKL_NUM_THREADS /
        KUAS_THREADS is set (then torch's own setting stands). family: the model family ("sdxl" picks a
        VAE dtype that does not overflow).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    if threads is None and not _explicit_threads() and device.type == "cpu":
        threads = physical_cores()
    if threads is None and os.environ.get("KUAS_THREADS"):
        try:
            threads = int(os.environ["KUAS_THREADS"])
        except ValueError:
            raise InvalidInputError(f"KUAS_THREADS must be an integer, got {os.environ['KUAS_THREADS']!r}")
    if dtype is not None:
        d = as_dtype(dtype)
        fast_layout = d != torch.float32 if channels_last is None else channels_last
        policy = RuntimePolicy(device, d, d, d if vae_dtype is None else vae_dtype, fast_layout, threads,
                               lowvram, compile, reason=f"explicit dtype {d}")
    elif device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        vae = torch.bfloat16 if (family or "").startswith("sdxl") and bf16_ok else torch.float16
        if (family or "").startswith("sdxl") and not bf16_ok:
            vae = torch.float32
        policy = RuntimePolicy(device, torch.float16, torch.float16, vae if vae_dtype is None else vae_dtype,
                               True if channels_last is None else channels_last, threads, lowvram, compile,
                               reason="CUDA: float16 with SDPA")
    elif device.type == "cpu" and cpu_has_fast_bf16(cpuinfo):
        policy = RuntimePolicy(device, torch.bfloat16, torch.float32,
                               torch.bfloat16 if vae_dtype is None else vae_dtype,
                               True if channels_last is None else channels_last, threads, lowvram, compile,
                               reason="CPU with native bf16 (AVX512-BF16/AMX)")
    else:
        policy = RuntimePolicy(device, torch.float32, torch.float32,
                               torch.float32 if vae_dtype is None else vae_dtype,
                               bool(channels_last), threads, lowvram, compile,
                               reason=f"{device.type}: float32 (no native bf16)")
    if lowvram:
        policy = dataclasses.replace(policy, vae_tile_pixels=min(policy.vae_tile_pixels, VAE_TILE_PIXELS_LOWVRAM))
    log.debug("runtime policy: %s", policy.describe())
    return policy

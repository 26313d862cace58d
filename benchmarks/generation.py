"""Child-process jobs of the generation benchmarks (`txt2img.py`, `compare.py`): one image per system.

Each job loads the model, generates one image with the given prompt, size, steps, sampler and seed, and
returns its own phase timings; `common.run_in_subprocess` adds the child's peak RSS. The phases:

- `load_s`: from the load call to a ready model (not part of the image time).
- `image_s`: the generation call, prompt to PIL image (text encoding, every step, VAE decode).
- `text_s`: time inside the text encoder(s) during the call (forward hooks; sd.cpp: its own log).
- `step_s`: per sampling step, from the step callbacks' timestamps (U-Net call plus the sampler's
  arithmetic); `unet_step_s` is their median without the first step (which also pays one-off setup:
  oneDNN primitive creation, compilation).
- `vae_s`: time inside the VAE decoder (hooks; sd.cpp: its log).

Images are saved as PNG when `save` is given (the quality comparison reads them back).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import common  # noqa: F401  (makes `benchmarks/` importable the same way in every child)


def _no_sync() -> None:
    pass


def _syncer(device: str):
    """A function that waits for the device's queued work (CUDA launches are asynchronous)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return _no_sync


class _Timer:
    """Accumulates the wall time spent inside modules' forward calls (pre/post hooks)."""

    def __init__(self, modules: list[Any], sync: Any = _no_sync):
        self.sync = sync
        self.total = 0.0
        self.calls = 0
        self._depth = 0
        self._start: float | None = None
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        if self._start is None:
            self.sync()
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output):
        self._depth -= 1
        if self._depth == 0 and self._start is not None:
            self.sync()
            self.total += time.perf_counter() - self._start
            self.calls += 1
            self._start = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _step_summary(stamps: list[float], start: float) -> dict[str, Any]:
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    later = times[1:] or times
    return {"step_s": times, "unet_step_s": statistics.median(later) if later else float("nan")}


def _save(image: Any, save: str | None) -> None:
    if save:
        image.save(save)


# ------------------------------------------------------------------------------------------------------
# kuas


def kuas_job(
    path: str, prompt: str, negative_prompt: str, width: int, height: int, steps: int, sampler: str,
    cfg_scale: float, seed: int, dtype: str | None = None, tome_ratio: float = 0.0, deepcache_interval: int = 1,
    compile: bool = False, lowvram: bool = False, save: str | None = None, warmup: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """kuas.load + txt2img. `warmup` first generates once with 2 steps (reported apart: compile time)."""
    import torch

    import kuas

    sync = _syncer(device)
    t0 = time.perf_counter()
    sd = kuas.load(path, dtype=None if dtype is None else getattr(torch, dtype), lowvram=lowvram,
                   compile=compile, device=device)
    load_s = time.perf_counter() - t0
    kwargs = {"negative_prompt": negative_prompt, "width": width, "height": height, "sampler": sampler,
              "cfg_scale": cfg_scale, "seed": seed, "watermark": False}
    speed = {}
    if tome_ratio:
        speed["tome_ratio"] = tome_ratio
    if deepcache_interval > 1:
        speed["deepcache_interval"] = deepcache_interval
    out: dict[str, Any] = {"load_s": load_s, "runtime": sd.runtime.describe()}
    if warmup:
        w0 = time.perf_counter()
        sd.txt2img(prompt, steps=2, **kwargs, **speed)
        out["warmup_s"] = time.perf_counter() - w0

    text = _Timer(list(sd.text_encoders.values()), sync)
    vae = _Timer([sd.vae.decoder], sync)
    stamps: list[float] = []

    def on_step(step: int, total: int, latents: Any) -> None:
        sync()
        stamps.append(time.perf_counter())

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = sd.txt2img(prompt, steps=steps, callback=on_step, **kwargs, **speed)
    out["image_s"] = time.perf_counter() - start
    out.update(_step_summary(stamps, start), text_s=text.total, vae_s=vae.total)
    if device.startswith("cuda"):
        out["peak_vram"] = torch.cuda.max_memory_allocated()
    _save(images[0], save)
    return out


# ------------------------------------------------------------------------------------------------------
# diffusers


def diffusers_job(
    path: str, config_dir: str, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
    sampler: str, cfg_scale: float, seed: int, dtype: str | None = None, save: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """diffusers' StableDiffusionPipeline.from_single_file (offline) with its usual settings: fp32 on a CPU
    (its default), fp16 on CUDA; SDPA attention either way."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    sync = _syncer(device)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        path, config=config_dir, local_files_only=True, torch_dtype=getattr(torch, dtype),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    schedulers = {"Euler a": EulerAncestralDiscreteScheduler, "Euler": EulerDiscreteScheduler}
    pipe.scheduler = schedulers[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    load_s = time.perf_counter() - t0

    text = _Timer([pipe.text_encoder], sync)
    vae = _Timer([pipe.vae.decoder], sync)
    stamps: list[float] = []

    def on_step(p, step, timestep, kwargs):
        sync()
        stamps.append(time.perf_counter())
        return kwargs

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        image = pipe(prompt, negative_prompt=negative_prompt, width=width, height=height,
                     num_inference_steps=steps, guidance_scale=cfg_scale,
                     generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step).images[0]
    out = {"load_s": load_s, "image_s": time.perf_counter() - start, "runtime": f"diffusers {dtype}, SDPA",
           "text_s": text.total, "vae_s": vae.total}
    if device.startswith("cuda"):
        out["peak_vram"] = torch.cuda.max_memory_allocated()
    out.update(_step_summary(stamps, start))
    _save(image, save)
    return out


# ------------------------------------------------------------------------------------------------------
# stable-diffusion.cpp (stable-diffusion-cpp-python, a benchmark-only dependency)

_SDCPP_SAMPLERS = {"Euler a": "euler_a", "Euler": "euler"}


def sdcpp_job(
    path: str, wtype: str, threads: int, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
    sampler: str, cfg_scale: float, seed: int, save: str | None = None,
) -> dict[str, Any]:
    """stable-diffusion.cpp through its Python bindings: weights converted to `wtype` (f16, q8_0) at load."""
    import ctypes
    import re

    import stable_diffusion_cpp as sdc
    from stable_diffusion_cpp import StableDiffusion

    lines: list[str] = []

    @sdc.sd_log_callback
    def capture(level: int, text: bytes, data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    t0 = time.perf_counter()
    model = StableDiffusion(model_path=path, wtype=wtype, n_threads=threads, verbose=True)
    sdc.sd_set_log_callback(capture, ctypes.c_void_p(0))  # after the constructor, which installs its own
    load_s = time.perf_counter() - t0
    stamps: list[float] = []

    def on_step(step: int, total: int, seconds: float) -> None:
        stamps.append(time.perf_counter())

    lines.clear()
    start = time.perf_counter()
    images = model.generate_image(prompt, negative_prompt=negative_prompt, width=width, height=height,
                                  cfg_scale=cfg_scale, sample_method=_SDCPP_SAMPLERS[sampler], sample_steps=steps,
                                  seed=seed, progress_callback=on_step)
    image_s = time.perf_counter() - start
    log = "".join(lines)

    def phase(name: str) -> float:
        m = re.search(rf"{name} completed, taking ([\d.]+) ?(ms|s)", log)
        if not m:
            return float("nan")
        return float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)

    out = {"load_s": load_s, "image_s": image_s, "runtime": f"stable-diffusion.cpp {wtype}, {threads} threads",
           "text_s": phase("get_learned_condition"), "vae_s": phase("decode_first_stage")}
    # the bindings' progress callback also fires for the VAE tiles and the text stage: keep sampling's
    out.update(_step_summary(stamps[-steps:], stamps[-steps - 1] if len(stamps) > steps else start))
    out["log_tail"] = log[-1500:]
    _save(images[0], save)
    return out


# ------------------------------------------------------------------------------------------------------
# The machine's matmul peak and the U-Net's FLOPs


def matmul_peak_job(n: int = 4096, repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Best-of-`repeats` GFLOP/s of an n x n x n torch.matmul in fp32 and bf16 (and fp16 on CUDA), with
    this process's threads."""
    import torch

    sync = _syncer(device)
    out = {}
    kinds = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    if device.startswith("cuda"):
        kinds.append(("fp16", torch.float16))
    for name, dtype in kinds:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best / 1e9
    out["threads"] = torch.get_num_threads()
    return out


def unet_flops(width: int, height: int, batch: int = 2) -> float:
    """FLOPs of one SD 1.5 U-Net call on `batch` latents of width x height pixels (meta tensors: free)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kuas.checkpoints.state_dict import SkipMetaInit
    from kuas.models.unet import SD1_UNET, UNetModel

    with SkipMetaInit():
        unet = UNetModel(SD1_UNET, device="meta")
    x = torch.empty(batch, 4, height // 8, width // 8, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.zeros(batch, device="meta"), context=torch.empty(batch, 77, 768, device="meta"))
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------------
# Quality of the opt-in speedups and of the default dtype (on a trained model)


def quality_job(
    path: str, prompts: list[str], seeds: list[int], size: int, steps: int, sampler: str, cfg_scale: float,
    settings: dict[str, dict[str, Any]], outdir: str,
) -> dict[str, Any]:
    """Generate every prompt x seed under each setting ({name: {"dtype": ..., "tome_ratio": ...,
    "deepcache_interval": ...}}) and save `outdir/<name>-<i>.png`; one load per dtype."""
    import os

    import torch

    import kuas

    models: dict[Any, Any] = {}
    out: dict[str, Any] = {}
    for name, setting in settings.items():
        setting = dict(setting)
        dtype = setting.pop("dtype", None)
        if dtype not in models:
            models[dtype] = kuas.load(path, dtype=None if dtype is None else getattr(torch, dtype))
            models[dtype].txt2img(prompts[0], width=size, height=size, steps=2, sampler=sampler,
                                  cfg_scale=cfg_scale, seed=0, watermark=False)  # warm-up, untimed
        sd = models[dtype]
        start = time.perf_counter()
        index = 0
        for prompt in prompts:
            for seed in seeds:
                image = sd.txt2img(prompt, width=size, height=size, steps=steps, sampler=sampler,
                                   cfg_scale=cfg_scale, seed=seed, watermark=False, **setting)[0]
                image.save(os.path.join(outdir, f"{name}-{index}.png"))
                index += 1
        out[name] = {"seconds": time.perf_counter() - start, "images": index, "runtime": sd.runtime.describe()}
    return out


def profile_job(path: str, size: int, top: int = 15) -> dict[str, Any]:
    """Where one CFG U-Net call of kuas (default settings) spends its time: torch.profiler's top operators
    by self time, and a coarse split (convolutions, matmuls, attention, norms, elementwise, copies)."""
    import torch

    import kuas

    sd = kuas.load(path)
    unet = sd.unet
    x = torch.randn(2, 4, size // 8, size // 8).contiguous(memory_format=unet.input_memory_format)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768)
    with torch.no_grad():
        unet(x, t, context=ctx)  # warm-up (oneDNN primitives)
        start = time.perf_counter()
        unet(x, t, context=ctx)
        plain_s = time.perf_counter() - start
        with torch.profiler.profile() as prof:
            unet(x, t, context=ctx)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"convolution": ("conv",), "matmul (linear layers)": ("addmm", "aten::mm", "bmm", "matmul"),
              "attention (SDPA)": ("attention",), "norms": ("norm",), "copies / layout": ("copy", "clone", "cat"),
              "elementwise": ("add", "mul", "silu", "gelu", "sigmoid", "div")}
    split = {g: 0.0 for g in groups}
    split["other"] = 0.0
    for e in events:
        for g, keys in groups.items():
            if any(k in e.key for k in keys):
                split[g] += e.self_cpu_time_total
                break
        else:
            split["other"] += e.self_cpu_time_total
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "runtime": sd.runtime.describe(), "call_s": plain_s,
        "split": {g: v / total for g, v in split.items()},
        "ops": [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total, e.count) for e in ops],
    }

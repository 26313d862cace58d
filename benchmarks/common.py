"""Shared fixtures and measuring tools of the kuas benchmarks.

- `cached_sd15_checkpoint()`: a full-size random SD 1.5 checkpoint (official single-file layout, fp16
  safetensors, ~2.1 GB), generated once into the benchmark cache (outside git) and reused.
- `diffusers_sd15_config_dir()`: a local diffusers config folder for SD 1.5 (configs and tokenizer files,
  no weights) so that diffusers' single-file loading runs offline.
- `run_in_subprocess()`: run `module:function(**kwargs)` of the benchmarks folder in a fresh Python process
  and measure its wall time and peak resident memory (VmHWM of the child itself).
- `page_cache_fraction()` / `evict_from_page_cache()` / `warm_page_cache()`: see and control whether a
  file's pages are in the OS page cache (no root needed).
- `markdown_table()`, `median()`, `ratio()`: report helpers.

The cache lives in `$KUAS_BENCH_CACHE` (default `~/.cache/kuas-bench`).

Running this file with `--child` is the subprocess side of `run_in_subprocess` (not meant for people).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import json
import logging
import math
import mmap
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

SD15_FILE_NAME = "sd15-random-fp16.safetensors"
# Written into the file's metadata: a file without this exact value is regenerated, so a change of
# recipe never silently reuses an old file.
SD15_RECIPE = "kuas.create('sd1', seed=0, dtype=float16) -> save; v1"
SD15_RECIPE_KEY = "kuas.bench.recipe"
_RESULT_MARKER = "KUAS_BENCH_RESULT "

GB = 1e9


# ------------------------------------------------------------------------------------------------------
# The cache and the shared checkpoint


def cache_dir() -> Path:
    """The benchmark cache folder (`$KUAS_BENCH_CACHE`, default `~/.cache/kuas-bench`), created if needed."""
    root = Path(os.environ.get("KUAS_BENCH_CACHE") or Path.home() / ".cache" / "kuas-bench").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def checkpoint_is_complete(path: Path, recipe: str = SD15_RECIPE) -> bool:
    """True when `path` is a whole, valid safetensors file made by `recipe`.

    kuas' header check proves the tensors tile the data section up to the file's last byte, so a
    truncated or half-copied file fails here; the recipe tag catches files made another way.
    """
    from kuas.checkpoints.safetensors_io import read_safetensors_header
    from kuas.errors import CheckpointError

    if not path.is_file():
        return False
    try:
        entries, metadata = read_safetensors_header(path)
    except CheckpointError as e:
        log.warning("%s", e)
        return False
    return bool(entries) and metadata.get(SD15_RECIPE_KEY) == recipe


def _generate_sd15(path: str) -> dict[str, Any]:
    """Child side: create the random SD 1.5 model directly in fp16 (peak ~1x the file, not 3x), save it."""
    import torch

    import kuas

    t0 = time.perf_counter()
    sd = kuas.create("sd1", seed=0, dtype=torch.float16)
    created = time.perf_counter() - t0
    sd.save(path, dtype=torch.float16, metadata={SD15_RECIPE_KEY: SD15_RECIPE})
    params = sum(p.numel() for m in sd.modules().values() for p in m.parameters())
    return {"create_s": created, "save_s": time.perf_counter() - t0 - created, "parameters": params}


def cached_sd15_checkpoint(*, regenerate: bool = False) -> Path:
    """The full-size random SD 1.5 checkpoint (fp16 safetensors, official keys), generated once.

    Made by `kuas.create("sd1", seed=0, dtype=torch.float16)` + `save`: the networks are initialised in
    fp16 directly, so generating needs about the file's size in memory. It is built in a subprocess (the
    caller's memory stays small) and written atomically; later calls only check its header.
    """
    path = cache_dir() / SD15_FILE_NAME
    if not regenerate and checkpoint_is_complete(path):
        return path
    log.warning("generating %s (full-size random SD 1.5, ~2.1 GB; once)", path)
    m = run_in_subprocess("common", "_generate_sd15", {"path": str(path)}, threads=None)
    log.warning("generated in %.1f s (peak RSS %.2f GB)", m.wall_s, m.peak_rss / GB)
    if not checkpoint_is_complete(path):
        raise RuntimeError(f"generating {path} did not produce a complete checkpoint")
    return path


_SD15_CONFIG_VERSION = "1"
# SD 1.5's networks as diffusers configures them (the values of the v1-5 diffusers repo's config files,
# which follow from the reference v1-inference.yaml).
_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
_SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def diffusers_sd15_config_dir() -> Path:
    """A diffusers pipeline folder for SD 1.5 with configs and tokenizer files but no weights.

    Passed as `config=` to `StableDiffusionPipeline.from_single_file(..., local_files_only=True)` it lets
    diffusers load a single file with no hub access. The tokenizer files are written from kuas' packaged
    CLIP vocabulary (the same ids and merges as OpenAI's). Needs diffusers and transformers.
    """
    from importlib.resources import files

    import transformers

    from kuas.tokenizer import CLIPTokenizer
    from kuas.tokenizer.clip import VOCAB_RESOURCE, read_merges

    root = cache_dir() / "sd15-diffusers-config"
    done = root / ".complete"  # holds the version of the recipe below; another version is rebuilt
    if done.is_file() and done.read_text().strip() == _SD15_CONFIG_VERSION:
        return root
    for sub in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(_SD15_MODEL_INDEX, indent=1))
    (root / "unet" / "config.json").write_text(json.dumps(_SD15_UNET, indent=1))
    (root / "vae" / "config.json").write_text(json.dumps(_SD15_VAE, indent=1))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SD15_SCHEDULER, indent=1))
    text_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    text_config.save_pretrained(root / "text_encoder")
    tok = CLIPTokenizer.default()
    vocab = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    merges = list(read_merges(files("kuas.tokenizer") / VOCAB_RESOURCE))
    hf_tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    hf_tok.save_pretrained(root / "tokenizer")
    done.write_text(_SD15_CONFIG_VERSION + "\n")
    return root


# ------------------------------------------------------------------------------------------------------
# Page cache (Linux; no root needed)


def page_cache_fraction(path: str | os.PathLike) -> float | None:
    """Fraction of `path`'s pages in the OS page cache (mincore on a read-only map); None if unknown."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        addr = _map_address(m)
        vec = (ctypes.c_ubyte * pages)()
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            return None
        resident = sum(b & 1 for b in vec)
    return resident / pages


def _map_address(m: mmap.mmap) -> int:
    """The start address of a read-only mmap (ctypes cannot take a buffer of a read-only map directly)."""
    buf = memoryview(m)
    try:
        import numpy as np

        return int(np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0])
    finally:
        buf.release()


def evict_from_page_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to drop `path`'s clean cached pages (posix_fadvise DONTNEED): a cold next read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_page_cache(path: str | os.PathLike, block: int = 16 << 20) -> float:
    """Read the whole file once (discarding the data) so every reader sees it cached; returns seconds."""
    t0 = time.perf_counter()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------
# Running and measuring one job in a fresh process


@dataclass
class Measurement:
    """One subprocess run: wall time of the whole call, peak RSS of the child, and what it returned."""

    wall_s: float
    peak_rss: int  # bytes: the child's own VmHWM (or ru_maxrss where /proc is missing)
    values: dict[str, Any] = field(default_factory=dict)


def _peak_rss_self() -> int:
    """This process's peak resident set in bytes.

    VmHWM counts from this process's own exec; getrusage's ru_maxrss can include the RSS of the parent
    that forked it, so it is only the fallback (macOS reports bytes, Linux KiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss() -> int:
    """This process's resident set now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_in_subprocess(
    module: str,
    function: str,
    kwargs: dict[str, Any] | None = None,
    *,
    threads: int | None = 1,
    env: dict[str, str] | None = None,
    timeout: float | None = 3600,
) -> Measurement:
    """Run `benchmarks/<module>.py`'s `function(**kwargs)` in a fresh interpreter and measure it.

    The function must return a JSON-serialisable dict (its own phase timings, checksums...). `threads`
    sets torch's (and OpenMP's) thread count in the child; None keeps the defaults. The child's stderr is
    shown only when it fails.
    """
    child_env = dict(os.environ)
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    child_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCH_DIR), str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    if threads is not None:
        child_env["OMP_NUM_THREADS"] = child_env["MKL_NUM_THREADS"] = str(threads)
    child_env.update(env or {})
    spec = json.dumps({"module": module, "function": function, "kwargs": kwargs or {}, "threads": threads})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout, check=False)
    outer = time.perf_counter() - t0
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            result = json.loads(line[len(_RESULT_MARKER):])
    if proc.returncode != 0 or result is None:
        raise RuntimeError(
            f"benchmark child {module}.{function} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    values = dict(result["values"])
    values["process_s"] = outer  # including interpreter start and imports
    return Measurement(wall_s=result["wall_s"], peak_rss=result["peak_rss"], values=values)


def _child_main(spec_text: str) -> None:
    spec = json.loads(spec_text)
    if spec.get("threads") is not None:
        import torch

        torch.set_num_threads(int(spec["threads"]))
    func: Callable[..., dict[str, Any]] = getattr(importlib.import_module(spec["module"]), spec["function"])
    t0 = time.perf_counter()
    values = func(**spec["kwargs"])
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "peak_rss": _peak_rss_self(), "values": values or {}}
    sys.stdout.write(_RESULT_MARKER + json.dumps(out) + "\n")
    sys.stdout.flush()


def touch_parameters(modules: Sequence[Any], chunk: int = 1 << 20) -> tuple[float, int, int]:
    """Read every parameter's bytes (so lazily mapped pages are resident and counted) and checksum them.

    Returns (float64 sum of all elements, number of elements, bytes). Chunks keep the temporaries of the
    float64 sum small (8 MB), so the checksum itself does not inflate peak memory.
    """
    import torch

    total, numel, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                flat = p.detach().reshape(-1)
                for piece in flat.split(chunk):
                    total += float(piece.sum(dtype=torch.float64))
                numel += p.numel()
                nbytes += p.numel() * p.element_size()
    return total, numel, nbytes


# ------------------------------------------------------------------------------------------------------
# Reporting


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(value: float, reference: float) -> str:
    """`value / reference` as "1.23x" ("-" when there is no reference)."""
    if not reference or math.isnan(reference) or math.isnan(value):
        return "-"
    return f"{value / reference:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are right-aligned, everything else left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_looks_numeric(r[i]) for r in cells) for i in range(len(headers))]

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(
            s.rjust(w) if num else s.ljust(w) for s, w, num in zip(items, widths, numeric)
        ) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                         for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def _looks_numeric(text: str) -> bool:
    t = text.rstrip("x%").strip()
    try:
        float(t)
    except ValueError:
        return t == "-"
    return True


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        print(cached_sd15_checkpoint())

"""The performance comparison: kuas (default settings and each opt-in speedup), diffusers (its CPU
defaults) and stable-diffusion.cpp (f16 and q8_0) on the same full-size random SD 1.5 file, prompt, size,
steps, sampler (Euler a) and seed; every system in its own fresh process with the same thread count.

    python benchmarks/compare.py                          # 512x512 and 256x256, 20 steps, every system
    python benchmarks/compare.py --quick                  # 256x256, 4 steps
    python benchmarks/compare.py --sizes 512 --systems kuas,diffusers,sdcpp-f16
    python benchmarks/compare.py --quality-model PATH     # also: quality of bf16 / ToMe / DeepCache
    python benchmarks/compare.py --profile 512            # where one kuas U-Net call spends its time

Per size it prints seconds per image, per sampling step, in the text encoder and in the VAE decoder and
the peak RSS, each with its ratio to diffusers, and the U-Net's achieved GFLOP/s against this machine's
matmul peak of the system's compute dtype (measured in the run with a large fp32 and bf16 torch.matmul).
stable-diffusion.cpp comes from the `stable-diffusion-cpp-python` bindings (a benchmark-only dependency:
`pip install stable-diffusion-cpp-python`, compiles ~5 min); without it those rows are skipped.

Quality (`--quality-model`, default `kuas/assets/builtin.safetensors` when present): a trained model's
images under kuas' default settings against kuas in float32, and under ToMe / DeepCache / both against
kuas' exact (default-settings) output: PSNR and SSIM over prompts x seeds. Speed comes from the random
SD 1.5 rows; quality needs a trained model, since a random model's images are noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
import generation
import txt2img

REPO = Path(__file__).resolve().parent.parent
BUILTIN = REPO / "kuas" / "assets" / "builtin.safetensors"
TOME_RATIO = 0.5
DEEPCACHE_INTERVAL = 3

# name -> (job, extra kwargs, label)
SYSTEMS: dict[str, tuple[str, dict[str, Any], str]] = {
    "kuas": ("kuas_job", {}, "kuas (default)"),
    "kuas-fp32": ("kuas_job", {"dtype": "float32"}, "kuas fp32"),
    "kuas-compile": ("kuas_job", {"compile": True, "warmup": True}, "kuas + torch.compile"),
    "kuas-tome": ("kuas_job", {"tome_ratio": TOME_RATIO}, f"kuas + ToMe {TOME_RATIO}"),
    "kuas-deepcache": ("kuas_job", {"deepcache_interval": DEEPCACHE_INTERVAL},
                       f"kuas + DeepCache {DEEPCACHE_INTERVAL}"),
    "kuas-tome-deepcache": ("kuas_job", {"tome_ratio": TOME_RATIO, "deepcache_interval": DEEPCACHE_INTERVAL},
                            f"kuas + ToMe {TOME_RATIO} + DeepCache {DEEPCACHE_INTERVAL}"),
    "kuas-lowvram": ("kuas_job", {"lowvram": True}, "kuas --lowvram"),
    "diffusers": ("diffusers_job", {}, "diffusers (default: fp32, SDPA)"),
    "sdcpp-f16": ("sdcpp_job", {"wtype": "f16"}, "stable-diffusion.cpp f16"),
    "sdcpp-q8_0": ("sdcpp_job", {"wtype": "q8_0"}, "stable-diffusion.cpp q8_0"),
}
EXACT_FLOPS = {"kuas", "kuas-fp32", "kuas-compile", "kuas-lowvram", "diffusers", "sdcpp-f16", "sdcpp-q8_0"}

QUALITY_PROMPTS = [
    "a large red circle on the left, on a yellow background",
    "a small blue star at the top, on a white background",
    "a large green triangle in the center, on a black background",
    "two large orange squares on a green background",
]
QUALITY_SETTINGS = {
    "fp32": {"dtype": "float32"},
    "default": {},
    "tome": {"tome_ratio": TOME_RATIO},
    "deepcache": {"deepcache_interval": DEEPCACHE_INTERVAL},
    "both": {"tome_ratio": TOME_RATIO, "deepcache_interval": DEEPCACHE_INTERVAL},
}


# ------------------------------------------------------------------------------------------------------
# Running


def run_size(path: str, size: int, steps: int, seed: int, systems: list[str], threads: int,
             config_dir: str, device: str = "cpu") -> dict[str, common.Measurement]:
    results: dict[str, common.Measurement] = {}
    base = txt2img.job_kwargs(path, size, steps, seed)
    for name in systems:
        job, extra, label = SYSTEMS[name]
        kwargs = {**base, **extra}
        if device != "cpu":
            kwargs["device"] = device
        if job == "diffusers_job":
            kwargs["config_dir"] = config_dir
        if job == "sdcpp_job":
            kwargs["threads"] = threads
        common.warm_page_cache(path)
        try:
            m = common.run_in_subprocess("generation", job, kwargs, threads=threads, timeout=4 * 3600)
        except RuntimeError as e:
            print(f"  {label}: FAILED\n{str(e)[-1500:]}", flush=True)
            continue
        m.values.pop("log_tail", None)
        results[name] = m
        v = m.values
        vram = f", peak VRAM {v['peak_vram'] / common.GB:.2f} GB" if "peak_vram" in v else ""
        print(f"  {size}px {label}: {v['image_s']:.1f} s/image, {v['unet_step_s']:.2f} s/step, "
              f"peak RSS {m.peak_rss / common.GB:.2f} GB{vram} ({v['runtime']})", flush=True)
    return results


def peak_of(name: str, m: common.Measurement, peaks: dict[str, float]) -> tuple[str, float]:
    """The matmul peak that applies to a system: that of its U-Net's compute dtype (fp32 by default)."""
    runtime = m.values.get("runtime", "")
    for kind in ("bf16", "fp16"):
        if (f"unet {kind}" in runtime or ("diffusers float16" in runtime and kind == "fp16")) and kind in peaks:
            return kind, peaks[kind]
    return "fp32", peaks["fp32"]


def size_table(size: int, results: dict[str, common.Measurement], peaks: dict[str, float]) -> str:
    ref = results.get("diffusers")
    flops = generation.unet_flops(size, size)
    rows = []
    gpu = any("peak_vram" in m.values for m in results.values())
    for name, m in results.items():
        cells = txt2img.row(SYSTEMS[name][2], m, ref)
        gflops = flops / m.values["unet_step_s"] / 1e9
        kind, peak = peak_of(name, m, peaks)
        mark = "" if name in EXACT_FLOPS else "*"
        cells += [f"{gflops:.0f}{mark}", f"{100 * gflops / peak:.0f}% {kind}"]
        if "warmup_s" in m.values:
            cells.append(f"{m.values['warmup_s']:.0f}")
        else:
            cells.append("-")
        if gpu:
            vram = m.values.get("peak_vram")
            cells.append("-" if vram is None else f"{vram / common.GB:.2f}")
        rows.append(cells)
    headers = txt2img.HEADERS + ["U-Net GFLOP/s", "of matmul peak", "warm-up s"] + (["peak VRAM GB"] if gpu else [])
    return common.markdown_table(headers, rows)


def check_targets(size: int, results: dict[str, common.Measurement], peaks: dict[str, float],
                  quality: dict[str, dict[str, float]] | None) -> list[tuple[str, str, bool | None]]:
    """(target, measured, passed) for the Performance issue's targets at this size."""
    out: list[tuple[str, str, bool | None]] = []
    k, d = results.get("kuas"), results.get("diffusers")
    if k and d:
        r = d.values["image_s"] / k.values["image_s"]
        out.append(("kuas default >= 2.0x faster than diffusers' default", f"{r:.2f}x", r >= 2.0))
        rss = k.peak_rss / d.peak_rss
        out.append(("kuas peak RSS <= 0.6x diffusers'", f"{rss:.2f}x", rss <= 0.6))
    s = results.get("sdcpp-f16")
    if k and s:
        r = s.values["image_s"] / k.values["image_s"]
        out.append(("kuas default >= 1.2x faster than stable-diffusion.cpp f16", f"{r:.2f}x", r >= 1.2))
    if k:
        kind, peak = peak_of("kuas", k, peaks)
        frac = generation.unet_flops(size, size) / k.values["unet_step_s"] / 1e9 / peak
        out.append((f"U-Net step >= 50% of the {kind} matmul peak", f"{100 * frac:.0f}%", frac >= 0.5))
    b = results.get("kuas-tome-deepcache")
    if b and d:
        r = d.values["image_s"] / b.values["image_s"]
        out.append(("ToMe + DeepCache >= 3.5x faster than diffusers' default", f"{r:.2f}x", r >= 3.5))
    if quality:
        q = quality.get("default")
        if q:
            out.append(("kuas default vs kuas fp32 PSNR >= 30 dB (trained model)", f"{q['psnr']:.1f} dB",
                        q["psnr"] >= 30))
        q = quality.get("both")
        if q:
            out.append(("ToMe + DeepCache vs exact PSNR >= 25 dB (trained model)", f"{q['psnr']:.1f} dB",
                        q["psnr"] >= 25))
    return out


# ------------------------------------------------------------------------------------------------------
# Quality


def _image(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a, b) -> float:
    """Mean SSIM of two RGB images in [0, 255] (Gaussian window 11, sigma 1.5; per channel, averaged)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(a).permute(2, 0, 1)[:, None]
    y = torch.from_numpy(b).permute(2, 0, 1)[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return F.conv2d(t, window)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def run_quality(model: str, threads: int, seeds: list[int]) -> tuple[dict[str, dict[str, float]], dict]:
    """PSNR / SSIM of each setting against its reference: default vs fp32; speedups vs default."""
    from kuas.checkpoints.loading import analyse, read_checkpoint

    contents = read_checkpoint(model, header_only=True)
    recipe = json.loads(contents.metadata.get("kuas.recipe", "{}") or "{}")
    size = int(recipe.get("resolution") or analyse(contents).family.resolution)
    sample = recipe.get("sample", {})
    steps, cfg = int(sample.get("steps", 20)), float(sample.get("cfg_scale", 7.0))
    with tempfile.TemporaryDirectory() as outdir:
        m = common.run_in_subprocess("generation", "quality_job", {
            "path": model, "prompts": QUALITY_PROMPTS, "seeds": seeds, "size": size, "steps": steps,
            "sampler": "Euler a", "cfg_scale": cfg, "settings": QUALITY_SETTINGS, "outdir": outdir,
        }, threads=threads, timeout=4 * 3600)
        count = len(QUALITY_PROMPTS) * len(seeds)
        refs = {"default": "fp32", "tome": "default", "deepcache": "default", "both": "default"}
        scores: dict[str, dict[str, float]] = {}
        for name, ref in refs.items():
            pairs = [(_image(Path(outdir) / f"{name}-{i}.png"), _image(Path(outdir) / f"{ref}-{i}.png"))
                     for i in range(count)]
            scores[name] = {
                "psnr": sum(min(psnr(a, b), 99.0) for a, b in pairs) / count,
                "min_psnr": min(psnr(a, b) for a, b in pairs),
                "ssim": sum(ssim(a, b) for a, b in pairs) / count,
                "seconds": m.values[name]["seconds"],
                "ref_seconds": m.values[ref]["seconds"],
            }
    info = {"size": size, "steps": steps, "cfg": cfg, "images": count,
            "runtime": m.values["default"]["runtime"]}
    return scores, info


def quality_table(scores: dict[str, dict[str, float]]) -> str:
    labels = {"default": ("kuas default (bf16 where fast)", "kuas fp32"),
              "tome": (f"ToMe {TOME_RATIO}", "kuas default"),
              "deepcache": (f"DeepCache {DEEPCACHE_INTERVAL}", "kuas default"),
              "both": (f"ToMe {TOME_RATIO} + DeepCache {DEEPCACHE_INTERVAL}", "kuas default")}
    rows = []
    for name, s in scores.items():
        label, ref = labels[name]
        rows.append([label, ref, f"{s['psnr']:.1f}", f"{s['min_psnr']:.1f}", f"{s['ssim']:.3f}",
                     f"{s['ref_seconds'] / s['seconds']:.2f}x"])
    return common.markdown_table(["setting", "against", "PSNR dB", "min PSNR dB", "SSIM", "speed-up here"], rows)


# ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, and 256x256 unless --sizes is given")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides (default 512 256)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 20, --quick 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for every system (torch and stable-diffusion.cpp alike; default all CPUs)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    parser.add_argument("--quality-model", help="a trained model for the quality section (default: the "
                        "built-in model when installed)")
    parser.add_argument("--quality-seeds", type=int, default=2, help="seeds per quality prompt")
    parser.add_argument("--quality-only", action="store_true", help="skip the speed tables")
    parser.add_argument("--profile", type=int, metavar="SIZE", help="profile one kuas U-Net call at SIZE and exit")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA: kuas and diffusers in "
                        "fp16, no stable-diffusion.cpp; peak VRAM is reported too)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = str(common.cached_sd15_checkpoint())

    if args.profile:
        p = common.run_in_subprocess("generation", "profile_job", {"path": path, "size": args.profile},
                                     threads=args.threads).values
        print(f"one CFG U-Net call at {args.profile}x{args.profile}: {p['call_s']:.2f} s ({p['runtime']})")
        print(common.markdown_table(["group", "share of self time"],
                                    [[g, f"{100 * v:.1f}%"] for g, v in p["split"].items()]))
        print(common.markdown_table(["operator", "self s", "share", "calls"],
                                    [[k, f"{s:.3f}", f"{100 * f:.1f}%", n] for k, s, f, n in p["ops"]]))
        return 0

    sizes = args.sizes or ([256] if args.quick else [512, 256])
    steps = args.steps or (4 if args.quick else 20)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    if args.device != "cpu":
        systems = [s for s in systems if not s.startswith("sdcpp")]  # the bindings' CPU build is what we test
    if importlib.util.find_spec("stable_diffusion_cpp") is None and any(s.startswith("sdcpp") for s in systems):
        print("stable-diffusion-cpp-python is not installed: skipping stable-diffusion.cpp "
              "(pip install stable-diffusion-cpp-python)")
        systems = [s for s in systems if not s.startswith("sdcpp")]

    report: dict[str, Any] = {"threads": args.threads, "steps": steps, "sizes": {}}
    quality = None
    model = args.quality_model or (str(BUILTIN) if BUILTIN.is_file() else None)
    if model:
        print(f"quality on {model} ...", flush=True)
        quality, qinfo = run_quality(model, args.threads, list(range(1, args.quality_seeds + 1)))
        report["quality"] = {"scores": quality, **qinfo}
    else:
        print("no trained model for the quality section: the built-in model is not installed yet; pass "
              "--quality-model PATH (e.g. a partially trained `kuas train` run's model)")

    if not args.quality_only:
        peaks = common.run_in_subprocess("generation", "matmul_peak_job", {"device": args.device},
                                         threads=args.threads).values
        report["matmul_peak_gflops"] = peaks
        print(f"matmul peak ({args.device}, {args.threads} threads, 4096^3): "
              + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items() if k in ("fp32", "bf16", "fp16")), flush=True)
        config_dir = str(common.diffusers_sd15_config_dir())
        tables = {}
        for size in sizes:
            results = run_size(path, size, steps, args.seed, systems, args.threads, config_dir, args.device)
            tables[size] = results
            report["sizes"][size] = {n: {"peak_rss": m.peak_rss, **m.values} for n, m in results.items()}

    print()
    import torch

    print(f"torch {torch.__version__}, {args.threads} thread(s), {steps} steps Euler a, CFG 7, seed {args.seed}, "
          f"one image per system, each in a fresh process")
    if not args.quality_only:
        for size, results in tables.items():
            print(f"\n### {size}x{size}\n")
            print(size_table(size, results, peaks))
        print("\nspeed = diffusers' time / this row's; RSS ratio = this row's peak RSS / diffusers'; s/step = "
              "median sampling step after the first; GFLOP/s = the SD 1.5 U-Net's FLOPs per CFG call "
              "(torch's FLOP counter) / s/step (* = ToMe / DeepCache skip part of them: effective rate); "
              "warm-up = a 2-step generation before the timed one (torch.compile compiles there).")
    if quality:
        print(f"\n### Quality ({qinfo['images']} images, {qinfo['size']}x{qinfo['size']}, {qinfo['steps']} steps "
              f"Euler a, CFG {qinfo['cfg']}; {qinfo['runtime']})\n")
        print(quality_table(quality))
    print()
    ok = True
    for size in (max(tables) if not args.quality_only and tables else None,):
        checks = check_targets(size, tables[size], peaks, quality) if size else check_targets(0, {}, {}, quality)
        for target, measured, passed in checks:
            ok &= bool(passed)
            print(f"target {target}{f' at {size}x{size}' if size else ''}: {measured} -> "
                  f"{'PASS' if passed else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

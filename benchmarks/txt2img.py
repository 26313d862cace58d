"""txt2img benchmark: one 512x512 image, 20 steps of Euler a, kuas (default settings) vs diffusers (its
CPU defaults: fp32, SDPA) on the same full-size random SD 1.5 file, prompt and seed.

    python benchmarks/txt2img.py             # 512x512, 20 steps
    python benchmarks/txt2img.py --quick     # 256x256, 4 steps (for iterating)

Each system runs in its own fresh process, one after the other, with the same torch thread count; the
table gives seconds per image, per sampling step (U-Net), in the text encoder and in the VAE decoder, and
the child's peak RSS (loading included), each with its ratio to diffusers. Targets: kuas at least as fast
as diffusers per image, and no more memory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import common

PROMPT = "a photograph of an astronaut riding a horse on mars, highly detailed"
NEGATIVE = "blurry, low quality"


def job_kwargs(path: str, size: int, steps: int, seed: int) -> dict[str, Any]:
    return {"path": path, "prompt": PROMPT, "negative_prompt": NEGATIVE, "width": size, "height": size,
            "steps": steps, "sampler": "Euler a", "cfg_scale": 7.0, "seed": seed}


def row(label: str, m: common.Measurement, ref: common.Measurement | None) -> list[str]:
    """One table row: times and their speed-up over `ref` (ref's time / this one's), RSS and its ratio."""
    v = m.values

    def speed(key: str) -> str:
        return "-" if ref is None or ref is m else common.ratio(ref.values[key], v[key])

    rss = "-" if ref is None or ref is m else common.ratio(m.peak_rss, ref.peak_rss)
    return [label, f"{v['image_s']:.1f}", speed("image_s"), f"{v['unet_step_s']:.2f}", speed("unet_step_s"),
            f"{v['text_s']:.2f}", speed("text_s"), f"{v['vae_s']:.2f}", speed("vae_s"),
            f"{m.peak_rss / common.GB:.2f}", rss]


HEADERS = ["system", "s/image", "speed", "s/step", "speed", "text s", "speed", "VAE s", "speed",
           "peak RSS GB", "RSS ratio"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256x256 and 4 steps instead of 512x512 and 20")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512, --quick 256)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 20, --quick 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads in every child (the same for both; default: all CPUs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = args.size or (256 if args.quick else 512)
    steps = args.steps or (4 if args.quick else 20)

    path = str(common.cached_sd15_checkpoint())
    config_dir = str(common.diffusers_sd15_config_dir())
    common.warm_page_cache(path)
    base = job_kwargs(path, size, steps, args.seed)
    print(f"{size}x{size}, {steps} steps Euler a, CFG 7, {args.threads} thread(s), one image per system", flush=True)
    kuas_m = common.run_in_subprocess("generation", "kuas_job", base, threads=args.threads)
    print(f"  kuas: {kuas_m.values['image_s']:.1f} s/image ({kuas_m.values['runtime']})", flush=True)
    common.warm_page_cache(path)
    diff_m = common.run_in_subprocess("generation", "diffusers_job", {**base, "config_dir": config_dir},
                                      threads=args.threads)
    print(f"  diffusers: {diff_m.values['image_s']:.1f} s/image", flush=True)

    print()
    print(common.markdown_table(HEADERS, [row("kuas (default)", kuas_m, diff_m),
                                          row("diffusers (default)", diff_m, diff_m)]))
    print(f"kuas runtime: {kuas_m.values['runtime']}; diffusers: {diff_m.values['runtime']}. "
          "speed = diffusers' time / this row's; s/step = median sampling step after the first; peak RSS = "
          "the child's VmHWM (loading included).")
    k, d = kuas_m.values, diff_m.values
    fast = k["image_s"] <= d["image_s"]
    small = kuas_m.peak_rss <= diff_m.peak_rss
    print(f"target kuas at least as fast as diffusers: {k['image_s']:.1f} s vs {d['image_s']:.1f} s "
          f"({d['image_s'] / k['image_s']:.2f}x) -> {'PASS' if fast else 'FAIL'}")
    print(f"target kuas no more memory than diffusers: {kuas_m.peak_rss / common.GB:.2f} GB vs "
          f"{diff_m.peak_rss / common.GB:.2f} GB ({kuas_m.peak_rss / diff_m.peak_rss:.2f}x) -> "
          f"{'PASS' if small else 'FAIL'}")
    return 0 if fast and small else 1


if __name__ == "__main__":
    sys.exit(main())

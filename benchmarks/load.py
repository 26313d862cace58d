"""Loading benchmark: a full-size random SD 1.5 checkpoint (fp16 safetensors), kuas vs diffusers.

    python benchmarks/load.py            # 3 runs per case, medians
    python benchmarks/load.py --quick    # 1 run per case

Each case runs in its own fresh Python process, one after another, repeats interleaved: kuas.load into
fp16 (zero-copy from the memory map) and into fp32 (the CPU default), and diffusers'
`StableDiffusionPipeline.from_single_file` (offline, from a local config folder) into fp32 and fp16. The
time is from the load call to a usable model whose every parameter has been read once (a checksum, which
also makes lazily mapped pages resident so that peak RSS counts them honestly); imports are timed apart.
Peak RSS is the child process's VmHWM. "weights" is the size of the loaded parameters in the loaded dtype.

Targets: kuas' peak RSS <= 1.2x the weights' size in memory, and kuas loads at least as fast as diffusers
in the same dtype. The file is read through before every run so that every case sees it in the page cache
(`--cold` evicts it from the cache before every run instead; no root needed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import common

RSS_TARGET = 1.2  # peak RSS / weights' size in memory
DTYPES = {"fp16": "float16", "fp32": "float32"}


# ------------------------------------------------------------------------------------------------------
# Child-process jobs (run through common.run_in_subprocess)


def _finish(t_start: float, rss_before: int, modules: list[Any]) -> dict[str, Any]:
    t_loaded = time.perf_counter()
    checksum, numel, nbytes = common.touch_parameters(modules)
    t_done = time.perf_counter()
    return {
        "load_s": t_loaded - t_start,
        "touch_s": t_done - t_loaded,
        "ready_s": t_done - t_start,
        "rss_before": rss_before,
        "checksum": checksum,
        "numel": numel,
        "weight_bytes": nbytes,
    }


def kuas_job(path: str, dtype: str) -> dict[str, Any]:
    """kuas.load(path, dtype=...) then read every parameter."""
    t0 = time.perf_counter()
    import torch

    import kuas

    import_s = time.perf_counter() - t0
    rss_before = common.current_rss()
    start = time.perf_counter()
    sd = kuas.load(path, dtype=getattr(torch, dtype))
    out = _finish(start, rss_before, list(sd.modules().values()))
    out["import_s"] = import_s
    return out


def diffusers_job(path: str, dtype: str, config_dir: str) -> dict[str, Any]:
    """diffusers' StableDiffusionPipeline.from_single_file, offline, then read every parameter."""
    t0 = time.perf_counter()
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    import_s = time.perf_counter() - t0
    rss_before = common.current_rss()
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        path, config=config_dir, local_files_only=True, torch_dtype=getattr(torch, dtype),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = _finish(start, rss_before, [pipe.unet, pipe.vae, pipe.text_encoder])
    out["import_s"] = import_s
    out["loaded_dtype"] = str(pipe.unet.dtype)
    return out


# ------------------------------------------------------------------------------------------------------
# The benchmark


CASES = [  # (system, dtype name, job, label)
    ("kuas", "fp16", "kuas_job", "kuas.load"),
    ("kuas", "fp32", "kuas_job", "kuas.load"),
    ("diffusers", "fp16", "diffusers_job", "diffusers from_single_file"),
    ("diffusers", "fp32", "diffusers_job", "diffusers from_single_file"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run per case instead of --repeats")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every child (same for all)")
    parser.add_argument("--cold", action="store_true",
                        help="evict the file from the page cache before each run (default: warm cache)")
    parser.add_argument("--skip-diffusers", action="store_true", help="measure kuas only (no speed ratio)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    repeats = 1 if args.quick else max(1, args.repeats)

    path = common.cached_sd15_checkpoint()
    file_gb = path.stat().st_size / common.GB
    cases = [c for c in CASES if not (args.skip_diffusers and c[0] == "diffusers")]
    config_dir = None if args.skip_diffusers else str(common.diffusers_sd15_config_dir())
    if not args.cold:
        warm_s = common.warm_page_cache(path)
        print(f"warm-up read of {path} ({file_gb:.2f} GB): {warm_s:.1f} s")

    runs: dict[tuple[str, str], list[common.Measurement]] = {(s, d): [] for s, d, _, _ in cases}
    cached_before: list[float] = []
    for rep in range(repeats):
        for system, dname, job, _ in cases:
            if args.cold:
                common.evict_from_page_cache(path)
            else:  # other jobs may have pushed some pages out since the last run
                common.warm_page_cache(path)
            frac = common.page_cache_fraction(path)
            if frac is not None:
                cached_before.append(frac)
            kwargs: dict[str, Any] = {"path": str(path), "dtype": DTYPES[dname]}
            if system == "diffusers":
                kwargs["config_dir"] = config_dir
            m = common.run_in_subprocess("load", job, kwargs, threads=args.threads)
            runs[(system, dname)].append(m)
            v = m.values
            print(f"  run {rep + 1}/{repeats} {system:9s} {dname}: ready {v['ready_s']:.2f} s "
                  f"(load {v['load_s']:.2f} + touch {v['touch_s']:.2f}), import {v['import_s']:.2f} s, "
                  f"peak RSS {m.peak_rss / common.GB:.2f} GB"
                  + (f", page cache {frac:.0%}" if frac is not None else ""), flush=True)

    summary: dict[tuple[str, str], dict[str, float]] = {}
    for key, ms in runs.items():
        summary[key] = {
            "ready_s": common.median([m.values["ready_s"] for m in ms]),
            "load_s": common.median([m.values["load_s"] for m in ms]),
            "import_s": common.median([m.values["import_s"] for m in ms]),
            "peak_rss": common.median([m.peak_rss for m in ms]),
            "rss_before": common.median([m.values["rss_before"] for m in ms]),
            "weights": ms[0].values["weight_bytes"],
            "checksum": ms[0].values["checksum"],
        }

    rows = []
    for system, dname, _, label in cases:
        s = summary[(system, dname)]
        peer = summary.get(("diffusers", dname))
        speed = common.ratio(peer["ready_s"], s["ready_s"]) if peer and system != "diffusers" else "-"
        rows.append([
            label, dname, f"{s['ready_s']:.2f}", f"{s['load_s']:.2f}", f"{s['import_s']:.2f}",
            f"{s['peak_rss'] / common.GB:.2f}", f"{s['rss_before'] / common.GB:.2f}",
            f"{s['weights'] / common.GB:.2f}", f"{s['peak_rss'] / s['weights']:.2f}", speed,
        ])
    headers = ["system", "dtype", "ready s", "load s", "import s", "peak RSS GB", "RSS before GB",
               "weights GB", "RSS / weights", "speed vs diffusers"]
    print()
    print(f"File: {path.name}, {file_gb:.2f} GB fp16 safetensors; median of {repeats} run(s) per case; "
          f"{args.threads} torch thread(s); page cache {'evicted before each run' if args.cold else 'warm'}"
          + (f" (file {min(cached_before):.0%}-{max(cached_before):.0%} cached before the runs)"
             if cached_before else ""))
    print(common.markdown_table(headers, rows))
    print("ready s = from the load call until every parameter has been read once (a checksum); load s = "
          "the call alone; import s = importing the library first (torch was imported before, in both; kuas "
          "imports its submodules inside load); RSS before = after the imports; peak RSS = the child's "
          "VmHWM; speed = diffusers' ready s / this row's (same dtype).")

    print()
    ok = True
    for dname in ("fp16", "fp32"):
        k = summary.get(("kuas", dname))
        if k is None:
            continue
        rss_ratio = k["peak_rss"] / k["weights"]
        passed = rss_ratio <= RSS_TARGET
        ok &= passed
        print(f"target kuas {dname} peak RSS <= {RSS_TARGET}x weights: {rss_ratio:.2f}x "
              f"-> {'PASS' if passed else 'FAIL'}")
        peer = summary.get(("diffusers", dname))
        if peer is not None:
            passed = k["ready_s"] <= peer["ready_s"]
            ok &= passed
            print(f"target kuas {dname} loads at least as fast as diffusers: {k['ready_s']:.2f} s vs "
                  f"{peer['ready_s']:.2f} s ({peer['ready_s'] / k['ready_s']:.2f}x) -> "
                  f"{'PASS' if passed else 'FAIL'}")
            rel = abs(k["checksum"] - peer["checksum"]) / max(abs(peer["checksum"]), 1e-12)
            same = rel < 1e-6 and k["weights"] == peer["weights"]
            print(f"  same weights as diffusers ({dname}): parameter sums {k['checksum']:.6g} vs "
                  f"{peer['checksum']:.6g}, {k['weights'] / 1e9:.3f} vs {peer['weights'] / 1e9:.3f} GB "
                  f"-> {'yes' if same else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

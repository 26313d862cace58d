"""The built-in model against its targets: prompt adherence, speed, size and training time.

    python benchmarks/builtin_model.py                 # 500 prompts per set (takes a while)
    python benchmarks/builtin_model.py --n 50 --quick  # a quick look

Adherence: canonical captions of world scenes (held-out colour-shape pairs never seen in training, and
seen ones; single-object, two-object and counting scenes), generated with the model's default settings
and scored by kuas' pixel-analysis evaluator against the scenes' exact ground truth.
Speed: one image at the model's native size, 20 steps, batch 1, from prompt text to a PNG on disk, with
the model already loaded (median of several), and the whole `kuas txt2img` command (process start,
import, load, generate, save) for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {
    "heldout-single all-correct": 0.90,
    "heldout-pair all-correct": 0.70,
    "count all-correct": 0.70,
    "background / colour accuracy": 0.97,
    "seconds per image": 1.0,
    "weights MB": 25.0,
    "training hours": 2.5,
}

# The sample sheet (seed 0 each): four prompts of seen colour-shape combinations (the README's first) and
# four of held-out ones (green triangle, purple star, orange square, black circle: never in training).
SAMPLE_PROMPTS = [
    "a large red circle on the left and a small blue star at the top, on a yellow background",
    "a large green triangle in the center, on a black background",
    "a small purple star in the bottom right corner, on a white background",
    "three small yellow hearts, on a blue background",
    "a small yellow star in the top left corner, on a red background",
    "two large orange squares, on a green background",
    "a large blue square at the bottom and a small red triangle at the top, on a white background",
    "four small black circles, on an orange background",
]


def _training_hours(run_dir: Path | None) -> tuple[float | None, dict[str, float]]:
    """Hours of training (every stage's loop over all sittings, plus encoding the latent cache), and seconds
    per stage."""
    if run_dir is None:
        return None, {}
    from kuas.training.stages import training_seconds

    per_stage = training_seconds(run_dir)
    total = sum(per_stage.values())
    return (total / 3600 if total else None), per_stage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "kuas" / "assets" / "builtin.safetensors"))
    ap.add_argument("--n", type=int, default=500, help="prompts per set (default 500)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the model's recommended scale")
    ap.add_argument("--sampler", default=None, help="default: the model's recommended sampler")
    ap.add_argument("--scheduler", default=None, help="noise schedule, e.g. Karras (default: the sampler's)")
    ap.add_argument("--skip-early-cfg", type=float, default=None,
                    help="no guidance on this first fraction of the steps (default: the model's recommendation)")
    ap.add_argument("--run-dir", default=None, help="training run directory, to report the training time")
    ap.add_argument("--out", default="outputs/builtin-benchmark", help="reports and grids")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: one per physical core)")
    ap.add_argument("--quick", action="store_true", help="skip the CLI timing")
    args = ap.parse_args()

    import kuas
    from kuas.images.io import save_png
    from kuas.training.evaluation import evaluate_adherence, format_table

    sd = kuas.load(args.model, threads=args.threads)  # None: one thread per physical core
    size = sd.resolution
    settings = {"steps": args.steps}
    if args.cfg_scale is not None:
        settings["cfg_scale"] = args.cfg_scale
    if args.sampler is not None:
        settings["sampler"] = args.sampler
    if args.scheduler is not None:
        settings["scheduler"] = args.scheduler
    if args.skip_early_cfg is not None:
        settings["skip_early_cfg"] = args.skip_early_cfg

    def generate(prompts, seed):
        return sd.txt2img(prompts, seed=seed, batch_size=len(prompts), width=size, height=size, **settings)

    # speed: one image, text to PNG, model loaded
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(7):
            t0 = time.perf_counter()
            img = sd.txt2img("a large red circle on the left and a small blue star at the top, on a yellow background",
                             seed=i, width=size, height=size, **settings)[0]
            save_png(img, Path(tmp) / f"{i}.png", parameters=img.info.get("parameters"))
            times.append(time.perf_counter() - t0)
        per_image = statistics.median(times[1:])
        cli = None
        if not args.quick:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "kuas", "txt2img", "a small green triangle in the center",
                            "--model", args.model, "--outdir", tmp, "--seed", "1"], check=True,
                           capture_output=True)
            cli = time.perf_counter() - t0

    # the README's sample sheet: fixed prompts, seed 0 each, scored with check marks
    from kuas.world.evaluate import evaluate

    samples = [sd.txt2img(p, seed=0, width=size, height=size, **settings)[0] for p in SAMPLE_PROMPTS]
    evaluate(samples, SAMPLE_PROMPTS, Path(args.out) / "samples", names=SAMPLE_PROMPTS)

    results = evaluate_adherence(generate, args.n, batch=16, out_dir=args.out, progress=True)
    mb = Path(args.model).stat().st_size / 1e6
    hours, stage_seconds = _training_hours(Path(args.run_dir)) if args.run_dir else (None, {})
    count = [r for k, r in results.items() if k.endswith("count")]
    count_acc = statistics.mean(r["all_correct"] for r in count) if count else None
    bg_col = min(min(r["background"], r["color"]) for r in results.values())

    shown = {**sd.defaults, **settings}
    print(f"\nmodel {args.model} ({mb:.1f} MB), {size}x{size}, {shown}, {torch.get_num_threads()} threads\n")
    print(format_table(results))
    rows = [
        ("heldout-single all-correct", results["heldout-single"]["all_correct"], ">="),
        ("heldout-pair all-correct", results["heldout-pair"]["all_correct"], ">="),
        ("count all-correct", count_acc, ">="),
        ("background / colour accuracy", bg_col, ">="),
        ("seconds per image", per_image, "<="),
        ("weights MB", mb, "<="),
        ("training hours", hours, "<="),
    ]
    print("\n| target | measured | goal | holds |\n|---|---|---|---|")
    for name, value, op in rows:
        goal = TARGETS[name]
        ok = None if value is None else (value >= goal if op == ">=" else value <= goal)
        shown = "-" if value is None else f"{value:.3f}"
        print(f"| {name} | {shown} | {op} {goal} | {'-' if ok is None else 'yes' if ok else 'NO'} |")
    seen_ok = all(results[f"seen-{k}"]["all_correct"] >= results[f"heldout-{k}"]["all_correct"] - 0.02
                  for k in ("single", "pair"))
    print(f"\nseen combinations at least as good as held-out: {'yes' if seen_ok else 'NO'}")
    if stage_seconds:
        print("training seconds per stage (loop over all sittings + latent-cache encoding): "
              + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()))
    if cli is not None:
        print(f"whole `kuas txt2img` command (start, import, load, generate, save): {cli:.2f} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(
        {"results": results, "seconds_per_image": per_image, "cli_seconds": cli, "weights_mb": mb,
         "training_hours": hours, "training_seconds_per_stage": stage_seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

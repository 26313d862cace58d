"""How much of a world scene survives a VAE round trip: the ceiling a U-Net trained on its latents can reach.

    python benchmarks/vae_reconstruction.py kuas/assets/builtin.safetensors runs/exp/vae/weights.safetensors

For each VAE (a whole model file, or a run's `vae/weights.safetensors` stage file, whose recipe is the run's
`recipe.json`), the same seeded scenes of every prompt set of `benchmarks/builtin_model.py` (held-out and
seen colour-shape pairs; one object, two objects, counting) are rendered at the model's size, encoded
(latent mean), decoded and scored by kuas' pixel-analysis evaluator against their exact ground truth. The
renders themselves are scored too: the evaluator's own ceiling. Also printed: PSNR of the reconstructions
against the renders, and seconds per image for the round trip.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_vae(path: Path):
    """The VAE of a model file or of a run's VAE stage file, and the image size it was trained for."""
    import kuas

    if path.name != "weights.safetensors":
        sd = kuas.load(path, threads=torch.get_num_threads(), dtype=torch.float32)
        return sd.vae.eval(), sd.resolution
    from kuas.training.recipe import load_recipe
    from kuas.training.stages import _load_weights, build_model

    recipe_file = path.parent.parent / "recipe.json"
    if not recipe_file.is_file():
        raise SystemExit(f"{path} is a stage file but {recipe_file} (its run's recipe) is missing")
    recipe = load_recipe(str(recipe_file))
    sd = build_model(recipe)
    _load_weights(path.parent, "vae", sd.vae)
    return sd.vae.eval(), recipe.resolution


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list:
    from PIL import Image

    arr = ((x.float().clamp(-1, 1).permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def round_trip(vae, images, batch: int = 32) -> tuple[list, float, float]:
    """Reconstructions, their PSNR against `images` (dB, over all pixels) and seconds per image."""
    out, se, t = [], 0.0, 0.0
    for start in range(0, len(images), batch):
        x = to_tensor(images[start : start + batch])
        t0 = time.perf_counter()
        rec = vae.decode(vae.encode(x).mean).float().clamp(-1, 1)
        t += time.perf_counter() - t0
        rec = ((rec + 1) * 127.5).round() / 127.5 - 1.0  # what is scored: the 8-bit image
        se += float((rec - x).square().sum())
        out += to_images(rec)
    mse = se / (len(images) * images[0].size[0] * images[0].size[1] * 3)
    return out, 10 * math.log10(4.0 / max(mse, 1e-12)), t / len(images)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vaes", nargs="+", type=Path, help="model files or runs' vae/weights.safetensors")
    ap.add_argument("--n", type=int, default=192, help="scenes per set (default 192)")
    ap.add_argument("--seed", type=int, default=1234, help="prompt-set seed (the adherence benchmark's)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kuas.training.evaluation import SETS, prompt_sets
    from kuas.world import evaluate, render

    vaes = [(p, *load_vae(p)) for p in args.vaes]
    sizes = {size for _, _, size in vaes}
    if len(sizes) != 1:
        raise SystemExit(f"the VAEs were trained for different image sizes ({sorted(sizes)}); compare one size at a time")
    size = sizes.pop()
    scenes_by_set = prompt_sets(args.n, args.seed)
    columns = ["renders"] + [str(p) for p, _, _ in vaes]
    table = {name: [] for name, _, _ in SETS}
    psnr, speed = [], []
    renders = {name: [render(s, size) for s in scenes] for name, scenes in scenes_by_set.items()}
    for name, scenes in scenes_by_set.items():
        overall = evaluate(renders[name], scenes, None)["overall"]
        table[name].append((overall["all_correct"], overall["shape"]))
    for _, vae, _ in vaes:
        errors, seconds = [], []
        for name, scenes in scenes_by_set.items():
            recs, db, sec = round_trip(vae, renders[name])
            errors.append(db)
            seconds.append(sec)
            overall = evaluate(recs, scenes, None)["overall"]
            table[name].append((overall["all_correct"], overall["shape"]))
        psnr.append(sum(errors) / len(errors))
        speed.append(sum(seconds) / len(seconds))

    print(f"\n{args.n} scenes per set, {size}x{size}; all-correct / shape accuracy\n")
    for i, c in enumerate(columns):
        print(f"  [{i}] {c}")
    print("\n| set | " + " | ".join(f"[{i}]" for i in range(len(columns))) + " |")
    print("|---|" + "---|" * len(columns))
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(f"{a:.3f} / {s:.3f}" for a, s in cells) + " |")
    print("| PSNR dB (mean over sets) | - | " + " | ".join(f"{d:.2f}" for d in psnr) + " |")
    print("| seconds per image (round trip) | - | " + " | ".join(f"{s:.4f}" for s in speed) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

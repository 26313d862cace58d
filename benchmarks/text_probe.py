"""How readable a built-in text encoder's states are: a probe for two-object binding.

    python benchmarks/text_probe.py kuas/assets/builtin.safetensors runs/builtin/text/weights.safetensors

For each text encoder (a whole model file, or a run's `text/weights.safetensors` stage file, whose recipe
is the run's `recipe.json`), a fresh attention head (`kuas.training.attributes.AttributeHead`, the
"occupancy" layout) is trained for a few hundred steps on the frozen token states of two-object training
captions, then scored on held-out two-object captions: for each of the nine grid cells whether it is
occupied and, where it is, which shape, colour and size. A fresh reader that learns fast is what the U-Net's
cross-attention is when its training starts, so the encoders whose states read well here are the ones the
U-Net can bind with (the shipped model, builtin4 and builtin5 of docs/builtin-experiments.md rank the
same by this probe as by their two-object all-correct rates). The head, data order and held-out captions
are seeded: the same files give the same numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_text_model(path: Path):
    """A StableDiffusion whose text encoder holds `path`'s weights (model file or text-stage file)."""
    import kuas

    if path.name != "weights.safetensors":
        return kuas.load(path, threads=torch.get_num_threads())
    from kuas.training.recipe import load_recipe
    from kuas.training.stages import _load_weights, build_model

    recipe_file = path.parent.parent / "recipe.json"
    if not recipe_file.is_file():
        raise SystemExit(f"{path} is a stage file but {recipe_file} (its run's recipe) is missing")
    sd = build_model(load_recipe(str(recipe_file)))
    _load_weights(path.parent, "text_encoder", sd.text_encoder)
    return sd


def probe(sd, steps: int, batch: int, n_eval: int, seed: int = 0) -> dict[str, float]:
    """Accuracies of a fresh occupancy-layout head trained `steps` steps on frozen states."""
    from kuas.training.attributes import AttributeHead, scene_targets
    from kuas.world import WorldDataset

    slot = sd.slots[0]
    te = sd.text_encoder.eval()
    train = WorldDataset(split="train", seed=seed + 1, length=2**40, kind="pair")
    heldout = WorldDataset(split="heldout", seed=seed + 2, length=2**40, kind="pair")

    @torch.no_grad()
    def encode(dataset, start: int, n: int):
        scenes, captions = zip(*(dataset.sample(i) for i in range(start, start + n)))
        tokens = sd.tokenizer(list(captions), pad_with=slot.spec.pad_with)
        states = te(tokens, layer=slot.layer, final_norm=slot.final_norm).hidden.float()
        return states, scene_targets(list(scenes), "occupancy")

    torch.manual_seed(seed)
    head = AttributeHead(te.config.width, layout="occupancy")
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for step in range(steps):
        states, targets = encode(train, step * batch, batch)
        loss, _ = head.loss(states, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()

    states, targets = encode(heldout, 0, n_eval)
    with torch.no_grad():
        logits = head(states)
    occupied = targets["cell_occupied"] == 1
    out = {"occupancy": (logits["cell_occupied"].argmax(-1) == targets["cell_occupied"]).float().mean().item()}
    for name in ("shape", "color", "size"):
        pred = logits[f"cell_{name}"].argmax(-1)[occupied]
        out[name] = (pred == targets[f"cell_{name}"][occupied]).float().mean().item()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="model files or runs' text/weights.safetensors")
    ap.add_argument("--steps", type=int, default=400, help="probe training steps (default 400)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=1024, help="held-out two-object captions scored (default 1024)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for path in args.models:
        acc = probe(load_text_model(path), args.steps, args.batch, args.n)
        rows.append((str(path), acc))
        print(f"{path}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    print(f"\nheld-out two-object captions, {args.n} scored; fresh head trained {args.steps} steps x {args.batch}\n")
    print("| text encoder | occupied cell | shape | colour | size |\n|---|---|---|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc['occupancy']:.3f} | {acc['shape']:.3f} | {acc['color']:.3f} | {acc['size']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

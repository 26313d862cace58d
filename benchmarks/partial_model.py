"""Assemble a loadable model from a `kuas train` run that has not finished (for the quality comparison of
`compare.py` before the built-in model ships).

    python benchmarks/partial_model.py RUN_DIR OUT.safetensors

Each network takes its stage's finished weights (`<stage>/weights.safetensors`) when present, else the
EMA weights of the stage's newest checkpoint; networks of a stage that has not started keep their random
initialisation (the command says which). The file records the recipe (`kuas.recipe`, whose sampling
settings compare.py uses) and what was partial (`kuas.partial`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = {"vae": ("vae",), "text": ("text_encoder",), "unet": ("unet", "text_encoder")}


def assemble(run_dir: Path, out: Path) -> tuple[Path, list[str]]:
    """Write the run's current model to `out`; returns (out, notes on where each network came from)."""
    import torch

    from kuas.checkpoints.safetensors_io import read_safetensors
    from kuas.training.recipe import load_recipe
    from kuas.training.stages import build_model
    from kuas.training.state import latest_checkpoint, load_checkpoint

    recipe = load_recipe(run_dir / "recipe.json")
    sd = build_model(recipe)
    modules = {"vae": sd.vae, "text_encoder": sd.text_encoder, "unet": sd.unet}
    notes: list[str] = []
    for stage, names in STAGES.items():
        stage_dir = run_dir / stage
        finished = stage_dir / "weights.safetensors"
        if finished.is_file():
            weights = read_safetensors(finished)
            for name in names:
                prefix = name + "."
                own = {k[len(prefix):]: v.clone() for k, v in weights.items() if k.startswith(prefix)}
                if own:
                    modules[name].load_state_dict(own)
                    notes.append(f"{name}: {stage} stage finished")
            continue
        checkpoint = latest_checkpoint(stage_dir) if stage_dir.is_dir() else None
        if checkpoint is None:
            notes.append(f"{stage} stage not started")
            continue
        state = load_checkpoint(checkpoint)
        for name in names:
            ema = state.get("ema", {}).get(name)
            if ema is not None:
                modules[name].load_state_dict(ema["shadow"], strict=False)
                notes.append(f"{name}: EMA at step {state['step']} of the {stage} stage ({checkpoint.name})")
    scale_file = run_dir / "unet" / "latent_scale.json"
    if scale_file.is_file():
        sd.vae.scale_factor = float(json.loads(scale_file.read_text())["latent_scale"])
    sd.save(out, dtype=torch.float16, metadata={"kuas.recipe": recipe.to_json(), "kuas.partial": "; ".join(notes)})
    return out, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out, notes = assemble(args.run_dir, args.out)
    for note in notes:
        print(note)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

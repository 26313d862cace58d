"""`kuas train`: train a Stable Diffusion model from scratch (resumable, data parallel with torchrun)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from scratch from a recipe (stages: vae, text, unet); resumes where it stopped",
        description="Train from a recipe. Stop it at any time (Ctrl-C, SIGTERM, even kill -9) and run the same "
        "command again to continue from the last complete checkpoint. For several processes or machines, "
        "launch with torchrun (gloo on CPU, nccl on GPU).",
    )
    p.add_argument("--recipe", default="builtin", help="a shipped recipe name or a recipe .json (default: builtin)")
    p.add_argument("--out", default="runs/builtin", help="run directory (checkpoints, samples, logs, model)")
    p.add_argument("--stages", default="vae,text,unet", help="comma-separated stages to run (default: all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
    p.add_argument("--data", default=None, help="train on a folder of images with same-name .txt captions")
    p.add_argument("--vae-from", default=None, metavar="MODEL",
                   help="take the VAE stage from this model file (its VAE must have the recipe's shapes) instead of "
                   "training it; e.g. kuas/assets/builtin.safetensors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kuas.training.distributed import barrier, exit_rank, init_distributed, shutdown_distributed
    from kuas.training.recipe import load_recipe
    from kuas.training.stages import run_all, take_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = load_recipe(args.recipe)
    if args.data:
        recipe.data = {"kind": "folder", "path": args.data}
    dist = init_distributed(device)
    if args.vae_from:  # one process writes the stage; the others wait for it before looking for a VAE
        if dist.is_main:
            take_vae(recipe, args.out, args.vae_from)
        barrier(dist)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    out = run_all(recipe, args.out, device=device, dist=dist, progress=not args.no_progress, stages=stages)
    shutdown_distributed(dist)  # only after success: a failed rank must not wait for the others in a barrier
    if out and dist.is_main:
        print(out)
    if dist.enabled:
        exit_rank(0)  # skips the interpreter teardown, where gloo's threads can abort the process
    return 0

"""One training step of the built-in recipe's networks, in each memory layout and precision kuas offers.

    python benchmarks/training_step.py             # U-Net and VAE steps, one thread, 12 rounds
    python benchmarks/training_step.py --compile   # also torch.compile'd U-Net steps (compiling takes minutes)

What the training loop runs per rank: the U-Net stage's forward + backward through the denoising objective
(batch 32 = the recipe's 64 over two ranks, 16x16 latents, 77-token context), and the VAE stage's
autoencoder loss on 64-pixel crops (batch 16). The variants are timed in turns, round after round, so
that a busy machine slows them alike; the table gives each one's median and its ratio to the recipe's
current setting (the first row of each network). The optimizer step is left out: it is the same for
every variant (fused AdamW, about 0.025 s of a U-Net step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _unet_case(recipe, layout: torch.memory_format, precision: str, compiled: bool, batch: int):
    from kuas.models.unet import UNetConfig, UNetModel
    from kuas.sampling.schedules import sd_alphas_cumprod
    from kuas.training.objectives import DenoisingObjective

    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(**{**recipe.unet, "context_dim": recipe.text_encoder["width"]}))
    unet.to(memory_format=layout).train()
    opts = recipe.stage_options("unet")
    objective = DenoisingObjective(sd_alphas_cumprod(), prediction=recipe.prediction,
                                   min_snr_gamma=opts.get("min_snr_gamma", 5.0))
    model = torch.compile(unet) if compiled else unet
    side = recipe.resolution // 8
    x0 = torch.randn(batch, 4, side, side).contiguous(memory_format=layout)
    context = torch.randn(batch, 77, recipe.text_encoder["width"])
    seeds = list(range(batch))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = objective.loss(model, x0, {"context": context}, seeds)
        loss.backward()
        unet.zero_grad(set_to_none=True)

    return step


def _vae_case(recipe, layout: torch.memory_format, precision: str, batch: int):
    from kuas.models.vae import AutoencoderKL, VAEConfig
    from kuas.training.objectives import AutoencoderObjective

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(**recipe.vae)).to(memory_format=layout).train()
    opts = recipe.stage_options("vae")
    objective = AutoencoderObjective(**opts.get("loss", {}))
    crop = int(opts.get("crop", 0)) or recipe.resolution
    images = (torch.rand(batch, 3, crop, crop) * 2 - 1).contiguous(memory_format=layout)
    foreground = (torch.rand(batch, 1, crop, crop) > 0.8).float()
    seeds = list(range(batch))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = objective.loss(vae, images, seeds, foreground)
        loss.backward()
        vae.zero_grad(set_to_none=True)

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="builtin")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the recipe runs 1 per rank)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd U-Net steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kuas.training.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    nhwc, nchw = torch.channels_last, torch.contiguous_format
    u_batch = recipe.stages["unet"]["loop"]["batch_size"] // 2
    v_batch = recipe.stages["vae"]["loop"]["batch_size"] // 2
    vae_precision = recipe.stages["vae"]["loop"].get("precision", "fp32")
    cases = {  # first of each network: what the recipe runs today
        ("U-Net", "fp32 NCHW"): _unet_case(recipe, nchw, "fp32", False, u_batch),
        ("U-Net", "fp32 NHWC"): _unet_case(recipe, nhwc, "fp32", False, u_batch),
        ("U-Net", "bf16 NHWC"): _unet_case(recipe, nhwc, "bf16", False, u_batch),
        ("VAE", f"{vae_precision} NCHW"): _vae_case(recipe, nchw, vae_precision, v_batch),
        ("VAE", f"{vae_precision} NHWC"): _vae_case(recipe, nhwc, vae_precision, v_batch),
    }
    if args.compile:
        cases[("U-Net", "fp32 NCHW compiled")] = _unet_case(recipe, nchw, "fp32", True, u_batch)
        cases[("U-Net", "fp32 NHWC compiled")] = _unet_case(recipe, nhwc, "fp32", True, u_batch)
    for name, step in cases.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        print(f"warm-up {name[0]} {name[1]}: {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, step in cases.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    print(f"\nrecipe {recipe.name}: U-Net batch {u_batch}, VAE batch {v_batch} (per rank), "
          f"{args.threads} thread(s), median of {args.rounds} rounds\n")
    print("| network | variant | s / step | vs first row |\n|---|---|---|---|")
    base: dict[str, float] = {}
    for (net, variant), ts in times.items():
        med = statistics.median(ts)
        base.setdefault(net, med)
        print(f"| {net} | {variant} | {med:.3f} | {med / base[net]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

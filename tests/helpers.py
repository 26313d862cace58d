"""Shared test helpers (importable from any test module: pytest puts `tests/` on sys.path)."""

from __future__ import annotations

import math

import torch

import kuas


def randomize(sd: kuas.StableDiffusion, seed: int = 1) -> kuas.StableDiffusion:
    """Non-trivial weights everywhere: kuas zero-initialises output layers (eps would be 0), and A1111's
    emphasis mean needs non-zero final LayerNorm biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in sd.modules().values():
            for name, p in module.named_parameters():
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
                elif name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return sd

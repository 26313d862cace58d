"""Token merging for Stable Diffusion (ToMe for SD; Bolya & Hoffman, "Token Merging for Fast Stable
Diffusion", CVPR-W 2023), written for kuas' U-Net.

What it does, per transformer block at the merged levels and per call:

1. the image tokens are split into destinations (one per 2x2 cell of the token grid, at a position drawn
   at random per call when the batch is even, else the cell's top-left) and sources (the rest);
2. each source finds its most similar destination (cosine similarity of the block's input tokens); the
   `ratio * N` sources with the highest similarity are merged: their destination becomes the mean of
   itself and the sources merged into it;
3. self-attention runs on the N - r remaining tokens; its output is copied back to all N positions
   (a merged source takes its destination's output).

As in the paper's defaults only self-attention is merged (cross-attention and the MLP see every token)
and only at the highest-resolution attention level (`max_downsample=1`; the full latent resolution in
SD 1.x / 2.x), where attention costs most. Both directions
are one index map: ``index[b, n]`` is the merged slot of original token n, so merging is a mean-scatter
and unmerging a gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kuas.errors import InvalidInputError

__all__ = ["MergePlan", "TokenMerging", "bipartite_merge_plan", "token_merging"]


@dataclass
class MergePlan:
    """Merging of one call: `index` (B, N) maps each original token to its slot among `size` merged ones."""

    index: Tensor
    size: int

    def merge(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, size, C): each slot is the mean of the tokens mapped to it."""
        b, _, c = x.shape
        out = x.new_zeros(b, self.size, c)
        return out.scatter_reduce_(1, self.index[..., None].expand(-1, -1, c), x, "mean", include_self=False)

    def unmerge(self, y: Tensor) -> Tensor:
        """(B, size, C) -> (B, N, C): every original token takes its slot's value."""
        return y.gather(1, self.index[..., None].expand(-1, -1, y.shape[-1]))


def bipartite_merge_plan(
    metric: Tensor, hw: tuple[int, int], remove: int, *, stride: int = 2, generator: torch.Generator | None = None
) -> MergePlan | None:
    """The merge plan that removes `remove` of the (B, h*w, C) tokens of `metric` (None when nothing is
    removed). Destinations: one per `stride` x `stride` cell (random with `generator`, else top-left)."""
    b, n, _ = metric.shape
    h, w = hw
    if h * w != n:
        raise InvalidInputError(f"token merging: {n} tokens do not form a {h}x{w} grid")
    gh, gw = h // stride, w // stride
    if remove <= 0 or gh == 0 or gw == 0:
        return None
    cells = stride * stride
    if generator is not None:
        choice = torch.randint(cells, (gh, gw), generator=generator)
    else:
        choice = torch.zeros(gh, gw, dtype=torch.long)
    rows = torch.arange(gh)[:, None] * stride + choice // stride
    cols = torch.arange(gw)[None, :] * stride + choice % stride
    dst = (rows * w + cols).reshape(-1).to(metric.device)
    is_dst = torch.zeros(n, dtype=torch.bool, device=metric.device)
    is_dst[dst] = True
    src = (~is_dst).nonzero().squeeze(1)
    remove = min(remove, src.numel())

    with torch.no_grad():
        unit = F.normalize(metric, dim=-1)
        similarity = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, sources, destinations)
        best, partner = similarity.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :remove], order[:, remove:]
    n_kept, n_dst = kept.shape[1], dst.numel()
    index = torch.empty(b, n, dtype=torch.long, device=metric.device)
    index[:, dst] = torch.arange(n_kept, n_kept + n_dst, device=metric.device)
    index.scatter_(1, src[kept], torch.arange(n_kept, device=metric.device).expand(b, -1))
    index.scatter_(1, src[merged], n_kept + partner.gather(1, merged))
    return MergePlan(index, n_kept + n_dst)


class TokenMerging:
    """What a transformer block consults while token merging is attached (`token_merging`)."""

    def __init__(self, ratio: float, *, stride: int = 2, random: bool = True, seed: int = 0):
        if not 0.0 <= ratio < 1.0 - 1.0 / (stride * stride) + 1e-9:
            raise InvalidInputError(
                f"token merging ratio must be between 0 and {1 - 1 / (stride * stride):.2f} (a {stride}x{stride} "
                f"cell keeps one token), got {ratio}; 0.3-0.5 is the useful range"
            )
        if stride < 2:
            raise InvalidInputError(f"token merging stride must be 2 or more, got {stride}")
        self.ratio = float(ratio)
        self.stride = int(stride)
        self.random = bool(random)
        self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def plan(self, x: Tensor, hw: tuple[int, int]) -> MergePlan | None:
        """The merging of this call (x: the block's input tokens, (B, h*w, C)); None merges nothing."""
        # the same destinations for every batch row; random only when cond and uncond share the batch
        generator = self.generator if self.random and x.shape[0] % 2 == 0 else None
        return bipartite_merge_plan(x, hw, int(x.shape[1] * self.ratio), stride=self.stride, generator=generator)


def _blocks(unet: nn.Module, max_downsample: int) -> list[nn.Module]:
    """Transformer blocks at most `max_downsample` below the highest-resolution level that has attention
    (the full latent resolution in every official model; one level down in kuas' built-in model)."""
    from kuas.models.unet import SpatialTransformer

    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    if not transformers:
        return []
    top = min(st.level for st in transformers)
    return [block for st in transformers if 2 ** (st.level - top) <= max_downsample
            for block in st.transformer_blocks]


@contextlib.contextmanager
def token_merging(
    model: Any, ratio: float, *, max_downsample: int = 1, stride: int = 2, random: bool = True, seed: int = 0
) -> Iterator[TokenMerging | None]:
    """Merge `ratio` of the tokens before self-attention in the U-Net's blocks at down factors up to
    `max_downsample`, counted from the highest-resolution level with attention (1: that level only, the
    full latent resolution of SD 1.x / 2.x; tomesd's default) for the duration of the block.

    model: a `StableDiffusion` or its U-Net. ratio 0 does nothing. The blocks' previous state is restored
    exactly on exit, even on error; the merging draws its random destinations from its own generator
    (`seed`), never from torch's global one.
    """
    unet = getattr(model, "unet", model)
    if max_downsample not in (1, 2, 4, 8):
        raise InvalidInputError(f"token merging max_downsample must be 1, 2, 4 or 8, got {max_downsample}")
    merger = TokenMerging(ratio, stride=stride, random=random, seed=seed) if ratio > 0 else None
    if merger is None:
        yield None
        return
    blocks = _blocks(unet, max_downsample)
    previous = [block.token_merge for block in blocks]
    try:
        for block in blocks:
            block.token_merge = merger
        yield merger
    finally:
        for block, before in zip(blocks, previous):
            block.token_merge = before

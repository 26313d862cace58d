"""Caption-to-scene supervision for pre-training a text encoder on the procedural world.

A diffusion loss teaches a text encoder slowly: its gradient reaches the tokens only through the U-Net's
cross-attention, noisily. The world's captions have exact meanings, so kuas first trains the text
encoder to *say* what a caption means: from its token states, a small attention head must read the
background, the scene kind and count, and for each of the nine grid cells which object (shape, colour,
size) the caption puts there. Attention pooling over the token states with one learned query per cell
is the same operation the U-Net's cross-attention performs, so the states the head can read are the
states the U-Net can read. The head is discarded afterwards; the text encoder keeps the standard CLIP
architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kuas.errors import InvalidInputError
from kuas.world import COLORS, KINDS, SHAPES, SIZES
from kuas.world.scene import BACKGROUND_STYLES

IGNORE = -100
N_CELLS = 9
# (name, number of classes) of each target.
_GLOBAL_TARGETS = [("background", len(COLORS)), ("style", len(BACKGROUND_STYLES)), ("kind", len(KINDS)),
                   ("count", 4), ("count_shape", len(SHAPES)), ("count_color", len(COLORS)),
                   ("count_size", len(SIZES))]
# Two layouts of the per-cell targets (recipe option `stages.text.cell_targets`):
# - "shape_or_empty" (the shipped model's): the shape target has an extra class 0, "empty cell". The empty
#   majority (about 85% of cells) dominates it: 14% shape accuracy on occupied cells after 1,000 steps.
# - "occupancy": occupancy is its own target and shape is asked only where an object is (94% after 1,500
#   steps). A full run with it (and a 1,500-step text stage) drew single objects better but bound objects
#   to positions worse in two-object scenes (53% vs 65% all-correct), so it is not the default.
CELL_TARGET_LAYOUTS = {
    "shape_or_empty": [("shape", len(SHAPES) + 1), ("color", len(COLORS)), ("size", len(SIZES))],
    "occupancy": [("occupied", 2), ("shape", len(SHAPES)), ("color", len(COLORS)), ("size", len(SIZES))],
}
DEFAULT_CELL_TARGETS = "shape_or_empty"


def _cell_targets(layout: str) -> list[tuple[str, int]]:
    if layout not in CELL_TARGET_LAYOUTS:
        raise InvalidInputError(f"unknown cell target layout {layout!r} (recipe stages.text.cell_targets): "
                                f"use one of {sorted(CELL_TARGET_LAYOUTS)}")
    return CELL_TARGET_LAYOUTS[layout]


def scene_targets(scenes: list, layout: str = DEFAULT_CELL_TARGETS) -> dict[str, Tensor]:
    """Class indices per target for a batch of scenes (IGNORE where a caption does not say)."""
    b = len(scenes)
    g = {name: torch.full((b,), IGNORE, dtype=torch.long) for name, _ in _GLOBAL_TARGETS}
    c = {name: torch.full((b, N_CELLS), IGNORE, dtype=torch.long) for name, _ in _cell_targets(layout)}
    occupancy = "occupied" in c
    for i, s in enumerate(scenes):
        g["background"][i] = COLORS.index(s.background)
        g["style"][i] = BACKGROUND_STYLES.index(s.background_style)
        g["kind"][i] = KINDS.index(s.kind)
        if s.kind == "count":  # positions of counted objects are not in the caption
            o = s.objects[0]
            g["count"][i] = len(s.objects) - 1
            g["count_shape"][i] = SHAPES.index(o.shape)
            g["count_color"][i] = COLORS.index(o.color)
            g["count_size"][i] = SIZES.index(o.size)
            continue
        c["occupied" if occupancy else "shape"][i] = 0  # every cell is empty unless an object is there
        for o in s.objects:
            r, col = o.cell
            k = 3 * r + col
            if occupancy:
                c["occupied"][i, k] = 1
            c["shape"][i, k] = SHAPES.index(o.shape) + (0 if occupancy else 1)
            c["color"][i, k] = COLORS.index(o.color)
            c["size"][i, k] = SIZES.index(o.size)
    return {**g, **{f"cell_{k}": v for k, v in c.items()}}


class AttributeHead(nn.Module):
    """Reads scene attributes from token states with one learned attention query per cell (+ 1 global)."""

    def __init__(self, width: int, heads: int = 4, layout: str = DEFAULT_CELL_TARGETS):
        super().__init__()
        self.layout = layout
        self.queries = nn.Parameter(torch.randn(N_CELLS + 1, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.global_out = nn.ModuleDict({n: nn.Linear(width, k) for n, k in _GLOBAL_TARGETS})
        self.cell_out = nn.ModuleDict({n: nn.Linear(width, k) for n, k in _cell_targets(layout)})

    def forward(self, states: Tensor) -> dict[str, Tensor]:
        q = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        pooled, _ = self.attn(q, states, states, need_weights=False)
        pooled = self.norm(pooled)
        out = {n: head(pooled[:, N_CELLS]) for n, head in self.global_out.items()}
        out.update({f"cell_{n}": head(pooled[:, :N_CELLS]) for n, head in self.cell_out.items()})
        return out

    def loss(self, states: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits = self(states)
        total = states.new_zeros(())
        accuracy = {}
        for name, y in targets.items():
            y = y.to(states.device)
            z = logits[name]
            flat_z, flat_y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
            if (flat_y != IGNORE).any():
                total = total + F.cross_entropy(flat_z.float(), flat_y, ignore_index=IGNORE)
                keep = flat_y != IGNORE
                accuracy[name] = (flat_z.argmax(-1)[keep] == flat_y[keep]).float().mean().item()
        return total, accuracy

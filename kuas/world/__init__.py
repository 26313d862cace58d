"""The procedural image-caption world the built-in model learns, and its evaluator.

    from kuas.world import sample_scene, render, canonical_caption, score
    scene = sample_scene(0)                  # flat shapes on a background, exact ground truth
    image = render(scene, size=128)          # PIL RGB image
    text = canonical_caption(scene)          # "a large red circle on the left, on a blue background"
    score(image, text)["all_correct"]        # True: the evaluator reads the image back

`WorldDataset` feeds training: item i is always the same (image, caption), so training can resume at a
data position. Modules: `scene` (sampling, held-out pairs), `render` (image and control maps),
`captions` (templates and parser), `evaluate` (pixel-analysis detector, scores, reports).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kuas.errors import InvalidInputError
from kuas.world.captions import canonical_caption, caption, parse_caption
from kuas.world.evaluate import Detection, analyse, detect, evaluate, score
from kuas.world.render import render, render_depth, render_edges, render_segmentation
from kuas.world.scene import (
    COLORS,
    COUNT_LAYOUTS,
    HELDOUT_PAIRS,
    KINDS,
    PALETTE,
    POSITION_NAMES,
    SHAPES,
    SIZES,
    SPLITS,
    Obj,
    ObjSpec,
    Scene,
    SceneSpec,
    check_count_layout,
    normalize_kind_weights,
    sample_scene,
)

__all__ = [
    "COLORS",
    "COUNT_LAYOUTS",
    "HELDOUT_PAIRS",
    "KINDS",
    "PALETTE",
    "POSITION_NAMES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Detection",
    "Obj",
    "ObjSpec",
    "Scene",
    "SceneSpec",
    "WorldDataset",
    "analyse",
    "canonical_caption",
    "caption",
    "detect",
    "evaluate",
    "normalize_kind_weights",
    "parse_caption",
    "render",
    "render_depth",
    "render_edges",
    "render_segmentation",
    "sample_scene",
    "score",
]


class WorldDataset:
    """Map-style dataset of (image tensor (3, size, size) in [-1, 1], caption) pairs.

    Item i depends only on (seed, i): its scene and caption come from a generator seeded with
    `[seed, i]`, so any position can be revisited or resumed. A share `canonical_prob` of captions is
    the canonical form, the rest are varied templates. `kind_weights` sets the shares of single, pair
    and counting scenes when `kind` is None; `count_layout` ("free" or "grid") where counted objects go.
    Works with `torch.utils.data.DataLoader`.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 128,
        seed: int = 0,
        length: int = 1_000_000,
        *,
        kind: str | None = None,
        canonical_prob: float = 0.5,
        kind_weights: tuple[float, float, float] | None = None,
        count_layout: str = "free",
    ):
        if split not in SPLITS:
            raise InvalidInputError(f"unknown split {split!r}; use 'train' or 'heldout'")
        if length < 1:
            raise InvalidInputError(f"dataset length must be >= 1, got {length}")
        if not 0.0 <= canonical_prob <= 1.0:
            raise InvalidInputError(f"canonical_prob must be in [0, 1], got {canonical_prob}")
        self.split, self.size, self.seed, self.length = split, int(size), int(seed), int(length)
        self.kind, self.canonical_prob = kind, canonical_prob
        self.kind_weights = normalize_kind_weights(kind_weights)
        self.count_layout = check_count_layout(count_layout)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[Scene, str]:
        """The scene and caption of item `index` (without rendering)."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a WorldDataset of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index])
        scene = sample_scene(rng, split=self.split, kind=self.kind, kind_weights=self.kind_weights,
                             count_layout=self.count_layout)
        text = canonical_caption(scene) if rng.random() < self.canonical_prob else caption(scene, rng)
        return scene, text

    def __getitem__(self, index: int) -> tuple[Any, str]:
        import torch

        scene, text = self.sample(index)
        pixels = np.asarray(render(scene, self.size), dtype=np.float32)
        image = torch.from_numpy(pixels).permute(2, 0, 1).div_(127.5).sub_(1.0)
        return image, text

"""Prompt adherence of a model trained on the procedural world: generate, detect, score.

The prompt sets are fixed by a seed: canonical captions of world scenes, split into held-out colour-shape
combinations (never seen in training) and seen ones, and into single-object, two-object and counting
scenes. Each image is scored by `kuas.world.evaluate` against its scene's exact ground truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kuas.world import canonical_caption, evaluate, sample_scene

# (name, split, scene kind) of each prompt set
SETS = (
    ("heldout-single", "heldout", "single"),
    ("heldout-pair", "heldout", "pair"),
    ("heldout-count", "heldout", "count"),
    ("seen-single", "train", "single"),
    ("seen-pair", "train", "pair"),
    ("seen-count", "train", "count"),
)


def prompt_sets(n: int, seed: int = 1234, sets: tuple = SETS) -> dict[str, list]:
    """`n` scenes per set, deterministic for `seed` (disjoint from training data streams)."""
    out = {}
    for k, (name, split, kind) in enumerate(sets):
        rng = np.random.default_rng([seed, k])
        out[name] = [sample_scene(rng, split=split, kind=kind) for _ in range(n)]
    return out


def evaluate_adherence(
    generate: Callable[[list[str], int], list],
    n: int,
    *,
    seed: int = 1234,
    batch: int = 8,
    out_dir: str | Path | None = None,
    sets: tuple = SETS,
    progress: bool = False,
) -> dict[str, Any]:
    """Score `generate(prompts, seed) -> images` on `n` prompts per set.

    Returns {set name: summary} with all-correct, background, colour, shape, size, position and count
    accuracies, plus the seconds per image. With `out_dir`, each set's report.json and grid.png.
    """
    results: dict[str, Any] = {}
    scenes_by_set = prompt_sets(n, seed, sets)
    for name, scenes in scenes_by_set.items():
        prompts = [canonical_caption(s) for s in scenes]
        images, t0 = [], time.time()
        it = range(0, len(prompts), batch)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=name)
        for start in it:
            images += generate(prompts[start : start + batch], seed + start)
        seconds = (time.time() - t0) / max(1, len(images))
        report = evaluate(images, scenes, None if out_dir is None else Path(out_dir) / name, names=prompts)
        results[name] = {**_summary(report), "seconds_per_image": round(seconds, 3)}
    return results


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    overall = report.get("overall", report)
    keys = ("n", "all_correct", "background", "color", "shape", "size", "position", "count")
    return {k: overall.get(k) for k in keys if k in overall}


def format_table(results: dict[str, Any]) -> str:
    cols = ("all_correct", "background", "color", "shape", "size", "position", "count")
    lines = ["| set | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, r in results.items():
        cells = [("-" if r.get(c) is None else f"{r[c]:.3f}") for c in cols]
        lines.append(f"| {name} | {r.get('n', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

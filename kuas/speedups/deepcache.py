"""Step caching for the U-Net (DeepCache; Ma, Fang & Wang, "DeepCache: Accelerating Diffusion Models for
Free", CVPR 2024), written for kuas' U-Net.

Between neighbouring sampling steps the U-Net's deep, low-resolution features barely change; its
shallow, full-resolution blocks carry the detail. So every `interval`-th call runs the whole network and
keeps the feature that enters the output block paired with the `branch`-th shallow input block; the calls
in between run only ``input_blocks[0 .. branch]`` and ``output_blocks[-(branch + 1):]``, taking the deep
part from the cache. branch 0 keeps just conv_in and the last output block (fastest); larger branches
keep more blocks (slower, closer to the exact result).

Calls are counted per input shape (latents, text context, vector conditioning), so the separate cond and
uncond calls of an unbatchable guidance step keep their own caches. A "step" here is one U-Net call:
samplers that call the model twice per step (Heun, DPM2) refresh twice as often in steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from typing import Any

from torch import Tensor

from kuas.errors import InvalidInputError

__all__ = ["StepCache", "step_caching"]


class StepCache:
    """The deep feature of the last full call per input shape, and when to refresh it."""

    def __init__(self, interval: int, branch: int = 0):
        if not isinstance(interval, int) or interval < 1:
            raise InvalidInputError(f"step caching interval must be an integer >= 1 (1 = off), got {interval!r}")
        if not isinstance(branch, int) or branch < 0:
            raise InvalidInputError(f"step caching branch must be an integer >= 0, got {branch!r}")
        self.interval = interval
        self.branch = branch
        self.calls: dict[Hashable, int] = {}
        self.features: dict[Hashable, Tensor] = {}
        self.full_calls = 0
        self.cached_calls = 0

    def fetch(self, key: Hashable) -> Tensor | None:
        """The cached deep feature if this call may reuse it, else None (the call runs in full)."""
        count = self.calls.get(key, 0)
        self.calls[key] = count + 1
        feature = self.features.get(key)
        if count % self.interval == 0 or feature is None:
            self.full_calls += 1
            return None
        self.cached_calls += 1
        return feature

    def store(self, key: Hashable, feature: Tensor) -> None:
        self.features[key] = feature


@contextlib.contextmanager
def step_caching(model: Any, interval: int, *, branch: int = 0) -> Iterator[StepCache | None]:
    """Run the whole U-Net only every `interval`-th call inside the block (1 = every call, no caching).

    model: a `StableDiffusion` or its U-Net. Each ``with`` starts an empty cache; the previous state is
    restored on exit, even on error. Use one ``with`` per sampling run (a new image must not reuse the
    last image's features).
    """
    unet = getattr(model, "unet", model)
    cache = StepCache(interval, branch)
    if branch + 1 >= len(unet.input_blocks):
        raise InvalidInputError(
            f"step caching branch {branch} leaves no deep part: this U-Net has {len(unet.input_blocks)} input "
            f"blocks, so the branch must be below {len(unet.input_blocks) - 1}"
        )
    if interval == 1:
        yield None
        return
    previous = unet.step_cache
    try:
        unet.step_cache = cache
        yield cache
    finally:
        unet.step_cache = previous

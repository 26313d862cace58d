"""Exponential moving average of a model's weights (the weights kuas ships and samples with)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """Keeps `shadow = decay * shadow + (1 - decay) * param` for every floating-point parameter.

    The effective decay warms up as `min(decay, (1 + n) / (10 + n))` after n updates, so early weights,
    which are far from the final ones, are forgotten quickly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v for k, v in self.shadow.items()}, strict=False)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (for sampling), restoring the trained ones after."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}

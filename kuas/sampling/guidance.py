"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper, with optional guidance rescale.

The conditional and unconditional predictions come from one batched call: ``x`` is repeated and each
conditioning tensor is concatenated ``[cond, uncond]`` along the batch. The conditioning is a plain dict of
tensors per side (``context``, ``y``, ``c_concat``, ControlNet residuals, ...): whatever keys a pipeline
puts there reach the model unchanged, so inpainting or ControlNet inputs need no change here.

Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16,
as diffusers' ``rescale_noise_cfg`` defines it) is applied to the guided **x0**, using per-sample standard
deviations over all non-batch dimensions:

    x0_rescaled = x0_cfg * std(x0_cond) / std(x0_cfg)
    x0 = rescale * x0_rescaled + (1 - rescale) * x0_cfg

kuas applies it in x0 space for every model type and sampler, so the same number means the same thing for eps
and v models. diffusers applies the same formula to the guided eps (or v) prediction instead; the guided x0
and eps differ by the affine map ``x0 = x - sigma * eps``, so the two are not identical when rescale > 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kuas.errors import InvalidInputError
from kuas.sampling.denoisers import Denoiser, batch_sigma

__all__ = ["CFGDenoiser", "rescale_guidance"]


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Pull the guided prediction's per-sample std back towards the conditional one's (Lin et al. 2023)."""
    if rescale == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


class CFGDenoiser:
    """``uncond + scale * (cond - uncond)`` of an inner denoiser's x0, the two evaluated in one batch.

    scale == 1 skips the unconditional pass entirely. When a conditioning tensor has a different shape on
    the two sides (e.g. prompts of 77 and 154 tokens) the two passes run separately instead.
    """

    def __init__(
        self,
        inner: Denoiser,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None,
        scale: float,
        rescale: float = 0.0,
    ):
        if not 0.0 <= rescale <= 1.0:
            raise InvalidInputError(f"guidance rescale must be between 0 and 1, got {rescale}")
        if scale != 1.0:
            if uncond is None:
                raise InvalidInputError(
                    f"guidance scale {scale} needs an unconditional (negative prompt) conditioning; pass uncond "
                    "or use scale=1"
                )
            if set(cond) != set(uncond):
                raise InvalidInputError(
                    f"cond and uncond must carry the same keys, got {sorted(cond)} and {sorted(uncond)}"
                )
        self.inner = inner
        self.cond = dict(cond)
        self.uncond = None if uncond is None else dict(uncond)
        self.scale = float(scale)
        self.rescale = float(rescale)

    @property
    def schedule(self):
        return getattr(self.inner, "schedule", None)

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min  # type: ignore[attr-defined]

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max  # type: ignore[attr-defined]

    def _batchable(self) -> bool:
        for key, c in self.cond.items():
            u = self.uncond[key]  # type: ignore[index]
            if torch.is_tensor(c) != torch.is_tensor(u):
                return False
            if torch.is_tensor(c) and c.shape[1:] != u.shape[1:]:
                return False
            if not torch.is_tensor(c) and c is not None:
                return False
        return True

    def __call__(self, x: Tensor, sigma: Tensor | float, **extra: Any) -> Tensor:
        sigma = batch_sigma(x, sigma)
        if self.scale == 1.0:
            return self.inner(x, sigma, **self.cond, **extra)
        if self._batchable():
            merged = {
                key: None if c is None else torch.cat([c, self.uncond[key].to(c.device)])  # type: ignore[index]
                for key, c in self.cond.items()
            }
            out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **merged, **extra)
            x0_cond, x0_uncond = out.chunk(2)
        else:
            x0_cond = self.inner(x, sigma, **self.cond, **extra)
            x0_uncond = self.inner(x, sigma, **self.uncond, **extra)  # type: ignore[arg-type]
        guided = x0_uncond + self.scale * (x0_cond - x0_uncond)
        return rescale_guidance(guided, x0_cond, self.rescale)

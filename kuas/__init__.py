"""kuas: Stable Diffusion in plain PyTorch.

    import kuas
    sd = kuas.load("v1-5-pruned-emaonly.safetensors")   # or kuas.create("sd1", ...) for random weights
    images = sd.txt2img("a red circle on a blue background", seed=1)

Importing kuas does no file I/O, no device probing and starts no threads; the heavy modules load on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from kuas.stable_diffusion import StableDiffusion  # noqa: F401


def load(path: Any, **kwargs: Any):
    """Load a checkpoint file or diffusers folder; see `kuas.stable_diffusion.load`."""
    from kuas.stable_diffusion import load as _load

    return _load(path, **kwargs)


def create(family: str, **kwargs: Any):
    """A randomly initialised model of any family and size; see `kuas.stable_diffusion.create`."""
    from kuas.stable_diffusion import create as _create

    return _create(family, **kwargs)


def __getattr__(name: str):
    if name == "StableDiffusion":
        from kuas.stable_diffusion import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'kuas' has no attribute {name!r}")

"""Opt-in speedups that trade a measured amount of quality for time, applied per call as context managers.

* `token_merging(unet, ratio)`: ToMe for SD (Bolya & Hoffman 2023): before each self-attention at the full
  latent resolution, the most similar tokens are averaged into their partners, attention runs on fewer
  tokens, and the result is copied back to every original token.
* `step_caching(unet, interval)`: DeepCache (Ma et al. 2023): the U-Net's deep features change slowly from
  step to step, so only every `interval`-th call runs the whole network; the calls between reuse the
  cached deep feature and run only the shallow blocks around it.

Both attach a small object to the network's modules for the duration of a ``with`` block and restore the
previous state exactly on exit (also on error); the weights are never touched.
"""

from __future__ import annotations

from kuas.speedups.deepcache import StepCache, step_caching
from kuas.speedups.tome import MergePlan, TokenMerging, token_merging

__all__ = ["MergePlan", "StepCache", "TokenMerging", "step_caching", "token_merging"]

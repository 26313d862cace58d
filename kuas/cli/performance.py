"""Performance options shared by the generation commands (txt2img, img2img, inpaint, outpaint).

`add_performance_options(parser)` adds them to a subcommand; `load_options(args)` gives the keyword
arguments for `kuas.load` (how the model runs: lowvram, torch.compile, threads) and
`pipeline_options(args)` those for the pipeline call (the opt-in speedups ToMe and DeepCache). Options
left out are left out of both dicts, so the library's defaults (and a model's recommended settings)
apply.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["SPEEDUP_KEYWORDS", "add_performance_options", "load_options", "pipeline_options"]

# The pipeline keywords of the opt-in speedups (recorded in the infotext, so --from-infotext restores them).
SPEEDUP_KEYWORDS = frozenset({"tome_ratio", "deepcache_interval"})


def add_performance_options(parser: argparse.ArgumentParser) -> None:
    """Add the "performance" option group to a generation subcommand."""
    group = parser.add_argument_group(
        "performance",
        "kuas picks the fastest precision and layout for this machine by itself (see `kuas.runtime`); "
        "these change speed, memory or (for --tome-ratio / --deepcache-interval) the image slightly",
    )
    group.add_argument("--tome-ratio", dest="tome_ratio", type=float, default=argparse.SUPPRESS, metavar="R",
                       help="token merging: merge this fraction of the full-resolution tokens before "
                       "self-attention (0.3-0.5 is useful; 0 = off)")
    group.add_argument("--deepcache-interval", dest="deepcache_interval", type=int, default=argparse.SUPPRESS,
                       metavar="N", help="step caching: run the whole U-Net every N-th step and reuse its deep "
                       "features in between (2-3 is useful; 1 = off)")
    group.add_argument("--lowvram", action="store_true", default=argparse.SUPPRESS,
                       help="keep only the network in use in memory / on the GPU (slower; re-reads the "
                       "others from the model file on a CPU)")
    group.add_argument("--compile", action="store_true", default=argparse.SUPPRESS,
                       help="run the U-Net through torch.compile (the first image compiles: minutes on a CPU)")
    group.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="CPU threads (default: one per physical core, or OMP_NUM_THREADS when set)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `kuas.load` from the parsed options (only those given)."""
    return {name: getattr(args, name) for name in ("lowvram", "compile", "threads") if hasattr(args, name)}


def pipeline_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for the pipeline call from the parsed options (only those given)."""
    return {name: getattr(args, name) for name in sorted(SPEEDUP_KEYWORDS) if hasattr(args, name)}

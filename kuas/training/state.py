"""Training checkpoints: written atomically, found again after any stop (including `kill -9`).

A run directory holds `checkpoint-<step>.pt` files. Each is written to a temporary name in the same
folder, flushed to disk and renamed, so a file with the final name is always complete; a crash leaves at
most a stray temporary file, which the next save removes. Reading goes through kuas' restricted unpickler
(`kuas.checkpoints.pickle_io`), so even a training state never runs code from a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from kuas.fileio import atomic_write

_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write `state` as checkpoint `step` atomically and keep only the newest `keep` checkpoints."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stray in d.glob(".checkpoint-*.pt.*.tmp"):  # left by a process killed mid-save
        stray.unlink(missing_ok=True)
    final = checkpoint_path(d, step)
    with atomic_write(final) as f:
        torch.save(state, f)
    for _, old in list_checkpoints(d)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (restricted unpickler: tensors and containers only)."""
    from kuas.checkpoints.pickle_io import load_pickle

    return load_pickle(path)

"""Data parallelism over several processes or machines, launched with `torchrun`.

kuas averages gradients itself with one flat all-reduce per step instead of wrapping modules in
DistributedDataParallel: the modules keep their own state-dict keys, and the arithmetic is the same on
one rank or many (each rank's loss is the mean over its equal share of the global batch).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group `torchrun` describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group (all ranks together). A worker should then end with `exit_rank`."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int = 0) -> NoReturn:
    """End a distributed worker process without the interpreter's teardown.

    After destroy_process_group, gloo's worker threads can still be alive (when something else in the
    process holds the group) and release the tensors of a finished all-reduce. Releasing a tensor that
    Python has seen needs the GIL; during interpreter finalization a thread that asks for the GIL is made
    to exit, and that unwinds through a noexcept destructor: std::terminate, "terminate called without an
    active exception", SIGABRT, and torchrun reports a failed rank (seen with gdb in about 1 run in 10 on
    a loaded machine). Every output of a run is written and closed before this is called, so the process
    flushes its streams and leaves at once.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Replace each gradient by its mean over ranks (one flat all-reduce)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def broadcast_from_main(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Overwrite each tensor (in place) with rank 0's, so that every rank starts from the same weights.

    Ranks that build their modules alike still differ wherever something was initialised from a process's
    own random state (torch seeds each process differently); averaged gradients would then update
    different weights on each rank. DistributedDataParallel does the same broadcast when it wraps a module.
    """
    if not info.enabled:
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True if `flag` is set on any rank (so every rank stops at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()

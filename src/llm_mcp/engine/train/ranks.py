"""Which rank this process is in a training across processes, and the few collectives the engine's callbacks need.

A single-process run is rank 0 of 1. The launcher (torch.distributed.run, or Ray Train) sets RANK and WORLD_SIZE;
the process group itself is started by accelerate when the trainer is built.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """The rank that writes checkpoints, the final adapter and the answer (every rank trains)."""
    return rank() == 0


def _group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if _group():
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: ranks must stop at the same step, or the others would wait for
    the stopped one in their next collective."""
    if not _group():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

"""The thin distributed layer: this process's rank, its share of the work, sums across ranks.

Everything is a no-op in a single process (no process group), so the measurements run
unchanged with or without ``torchrun``. Setting up the process group is the commands' job
(:func:`landscape.commands.common.process_group`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def my_share(items: Iterable) -> Iterator:
    """The items this rank processes: every ``world``-th, starting at ``rank`` (all of
    them in a single process). Sums over shares are combined with :func:`all_reduce_sum`."""
    rank, world = rank_and_world()
    for i, item in enumerate(items):
        if i % world == rank:
            yield item


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum ``tensors`` in place across ranks (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        for t in tensors:
            torch.distributed.all_reduce(t)
    return tensors


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()

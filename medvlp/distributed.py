"""Gather helpers for contrastive losses under DDP (no-ops on one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: Tensor, with_grad: bool = True) -> Tensor:
    """All-gather ``x`` ``[B, ...]`` from every rank into ``[world * B, ...]`` (rank order).

    With ``with_grad`` the gradient flows back to every rank's slice (``torch.distributed.nn``);
    otherwise the local slice keeps its gradient and the others are constants.
    """
    rank, size = world()
    if size == 1:
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)

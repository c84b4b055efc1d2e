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


def gather_rows(x: Tensor, with_grad: bool = False) -> tuple[Tensor, int]:
    """All-gather ``x`` ``[n_rank, ...]`` whose row count differs per rank: each rank pads its rows to
    the largest count, the padded tensors are gathered, and the valid rows are kept (rank order).

    Returns:
        ``(rows of every rank [sum n, ...], offset of this rank's rows)``. With ``with_grad`` the
        gradient flows back to every rank's rows; otherwise only this rank's rows carry a gradient
        (the others are constants: the "plain gather" of CLIP-style losses).
    """
    rank, size = world()
    if size == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    longest = max(max(sizes), 1)
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])]) if x.shape[0] < longest else x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous())
        parts[rank] = padded
    rows = torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)
    return rows, sum(sizes[:rank])


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over every rank (``x`` itself on one process); no gradient."""
    if world()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def wrap_policy(names: list[str]):
    """An FSDP auto-wrap policy: every module whose class name is in ``names`` becomes its own unit."""
    wanted = set(names)

    def policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or type(module).__name__ in wanted

    return policy


def shard_modules(model: torch.nn.Module, names: list[str], mesh) -> int:
    """FSDP2 (``fully_shard``) on every submodule whose class name is in ``names`` (innermost first), then on
    ``model`` itself; returns the number of units sharded below the root. A class's ``fsdp_forward_methods``
    (e.g. a LightningModule's ``training_step``, an LLM wrapper's ``generate``) gather its parameters as
    ``forward`` does."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    wanted = set(names)
    units = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
    inner = {id(x) for m in units for x in m.modules() if x is not m}
    for m in [*sorted(units, key=lambda m: id(m) in inner, reverse=True), model]:  # nested units before their parents
        fully_shard(m, mesh=mesh)
        # methods other than forward that use the unit's parameters gather them too (FSDP2 hooks forward only)
        for name in getattr(type(m), "fsdp_forward_methods", ()):
            register_fsdp_forward_method(m, name)
    return len(units)

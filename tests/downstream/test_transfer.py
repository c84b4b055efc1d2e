"""The Lightning transfer loop: validation outputs of several processes come back in the split's order."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from medvlp.downstream import transfer as T


@pytest.mark.parametrize(("n", "world"), [(7, 2), (9, 4), (4, 2), (1, 3)])
def test_gather_in_order_undoes_the_distributed_sampler(monkeypatch, n, world):
    """Each rank's items as Lightning's non-shuffling distributed sampler hands them out (padded by
    repeating the first items): gathered, they are the split once, in order."""
    parts = [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    assert sum(len(p) for p in parts) >= n  # padded when n is not a multiple of world
    monkeypatch.setattr(T, "world", lambda: (0, world))
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), parts))
    assert T.gather_in_order(parts[0], n) == list(range(n))


def test_one_process_keeps_its_items():
    assert T.gather_in_order(["a", "b"], 2) == ["a", "b"]

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


def test_patience_counts_after_min_steps_and_a_given_max_epochs_is_a_hard_bound(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from medvlp.downstream.transfer import TransferModule, fit_transfer, min_steps_epochs

    assert min_steps_epochs(500, 1, 10, 50) == 510 and min_steps_epochs(500, 100, 10, 50) == 50
    assert min_steps_epochs(0, 1, 10, 50) == 50
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    train, val = DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x, y), batch_size=8)

    def make():
        def loss(m, b):
            return torch.nn.functional.mse_loss(m(b[0]), b[1])

        return TransferModule(torch.nn.Linear(3, 1), loss, lambda m, b: [float(loss(m, b))], lambda items: 1.0,
                              lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)  # a constant score: never improves

    history, _ = fit_transfer(make(), train, val, tmp_path / "a", mode="min", patience=1, max_epochs=2, min_steps=10)
    assert history["steps"] >= 10 and history["epochs"] == 6  # 2 steps an epoch: 5 epochs to step 10, then patience 1
    history, _ = fit_transfer(make(), train, val, tmp_path / "b", mode="min", patience=1, max_epochs=2, min_steps=10,
                              extend_epochs=False)
    assert history["epochs"] == 2 and history["steps"] == 4  # max_epochs given: not raised, and no stop before step 10

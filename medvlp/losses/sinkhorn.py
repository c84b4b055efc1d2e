"""Sinkhorn-Knopp soft assignment of samples to prototypes (SwAV / MGCA "codes").

Reference: Caron et al. 2020 (SwAV, arXiv 2006.09882), Algorithm 1; MGCA (Wang et al. 2022,
arXiv 2210.06044) uses it unchanged for its cross-modal prototype alignment, with
``epsilon = 0.05`` and 3 iterations (``HKU-MedAI/MGCA: mgca/models/mgca/mgca_module.py``,
``MGCA.sinkhorn`` / ``MGCA.distributed_sinkhorn``).

The transport plan ``Q`` (``K`` prototypes x ``N`` samples of the whole batch) is scaled alternately
so that

* every prototype row sums to ``1 / K`` (equipartition: each prototype takes the same share of the
  batch), and
* every sample column sums to ``1 / N``,

and the returned codes are the columns rescaled to sum to 1 (one distribution over the prototypes per
sample). After a finite number of iterations the column constraint holds exactly (it is applied
last) and the prototype marginal only approximately: with 3 iterations the prototype sums of the
``[N, K]`` codes are within about 1 % of ``N / K`` for random inputs.

Under DDP with ``distributed=True`` the batch is the union of every rank's samples: the total and the
prototype (row) sums are all-reduced, the sample (column) sums are local, and ``N`` is the global
batch size. MGCA's official runs never took that path (spec quirk Q7: codes balanced per GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from medvlp.distributed import world


def _all_reduce(x: Tensor, op=None) -> Tensor:
    """In-place all-reduce of ``x`` (sum unless ``op`` is given); returns ``x``."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op)
    return x


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, n_iters: int = 3, distributed: bool = False) -> Tensor:
    """Codes ``[N, K]`` from prototype scores ``[N, K]`` by Sinkhorn-Knopp (no gradient).

    ``Q = exp(scores / epsilon)^T`` is normalised to total 1; then ``n_iters`` times: scale each
    prototype row to sum ``1 / K``, scale each sample column to sum ``1 / N``; finally every column is
    divided by its sum and the result transposed. A constant shift of ``scores`` (subtracting the
    maximum, for float safety at small ``epsilon``) does not change the result, since every step
    is invariant to a global scale of ``Q``.

    Args:
        scores: ``[N, K]`` similarities of ``N`` samples to ``K`` prototypes (MGCA: cosines in [-1, 1]).
        epsilon: entropic regularisation; smaller = harder (more one-hot) codes.
        n_iters: number of (row, column) scaling rounds (MGCA: 3).
        distributed: when a process group is initialised, balance the prototypes over the samples
            of every rank (all-reduce of the total and of the row sums). Ignored on one process.

    Returns:
        ``[N, K]`` float32 codes, every row summing to 1 (prototype marginal approximately uniform:
        column sums of the codes over the global batch ~ ``N_global / K``).
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects scores [N, K], got shape {tuple(scores.shape)}")
    if n_iters < 0 or epsilon <= 0:
        raise ValueError(f"sinkhorn_knopp needs n_iters >= 0 and epsilon > 0, got n_iters={n_iters}, epsilon={epsilon}")
    gather = distributed and world()[1] > 1
    s = scores.detach().float() / epsilon
    top = s.max()
    if gather:
        top = _all_reduce(top.clone(), dist.ReduceOp.MAX)
    q = torch.exp(s - top).T  # [K, N]
    n_prototypes, n_local = q.shape
    n_total = torch.tensor(float(n_local), device=q.device)
    total = q.sum()
    if gather:
        n_total = _all_reduce(n_total)
        total = _all_reduce(total)
    q /= total
    for _ in range(n_iters):
        row = q.sum(dim=1, keepdim=True)  # [K, 1]
        if gather:
            row = _all_reduce(row)
        q /= row * n_prototypes  # rows sum to 1 / K (over the global batch)
        q /= q.sum(dim=0, keepdim=True) * n_total  # columns sum to 1 / N
    return (q / q.sum(dim=0, keepdim=True)).T

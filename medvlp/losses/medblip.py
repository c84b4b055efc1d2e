"""MedBLIP's image-text losses (spec ``medblip.md`` §4): contrast of the best-matching query, and the
hard negatives of BLIP-2's image-text matching.

Similarity of image ``i`` and text ``j`` is the best of the image's query features,
``s(i, j) = max_q <z_iq, t_j>``; the text-to-image matrix is exactly the transpose (one einsum, no
``.squeeze()``: a batch of one works, unlike the official code, spec Q14). The contrastive term is
the symmetric cross-entropy with label smoothing (0.1 in the official code) in the local-loss form:
each process scores its rows against the gathered batch of every process, so that the mean over
processes equals the loss of the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.distributed import gather, world


def query_similarity(img: Tensor, txt: Tensor) -> Tensor:
    """``[B_img, B_txt]``: ``max_q <img[i, q], txt[j]>`` of query features ``img`` ``[B, Q, D]`` and text
    features ``txt`` ``[M, D]`` (both L2-normalised by the caller)."""
    return torch.einsum("bqd,md->bqm", img, txt).amax(dim=1)


def _soft_targets(pos: Tensor, smoothing: float) -> Tensor:
    """Rows of ``pos`` (bool ``[N, M]``, at least one True per row) as distributions with label smoothing:
    ``(1 - eps)`` spread over the positives, ``eps / M`` everywhere (PyTorch's ``label_smoothing``)."""
    p = pos.float()
    return (1 - smoothing) * p / p.sum(1, keepdim=True) + smoothing / pos.shape[1]


def query_itc(img: Tensor, txt: Tensor, temperature: Tensor | float, label_smoothing: float = 0.1,
              gather_distributed: bool = True, labels: Tensor | None = None) -> Tensor:
    """One ITC term: ``(CE(S / tau, diag) + CE(S^T / tau, diag)) / 2`` over the (global) batch.

    Args:
        img: ``[B, Q, D]`` normalised query features of this process's images.
        txt: ``[B, D]`` normalised features of the paired texts.
        temperature: ``tau`` (the logits are ``S / tau``).
        label_smoothing: ``eps``: the target puts ``1 - eps + eps / N`` on the pair, ``eps / N`` elsewhere.
        gather_distributed: negatives from every process (gathered with gradient).
        labels: ``[B]`` class ids (-100 = none): all pairs of one class are positives (a multi-positive
            soft target, ``itc_qa_positive=same_label``); None = the pair only (the official code, where
            identical QA strings of one class are negatives of each other, spec Q15).

    Returns:
        The scalar loss.
    """
    rank, size = world()
    b = img.shape[0]
    if gather_distributed and size > 1:
        all_img, all_txt, offset = gather(img), gather(txt), rank * b
        all_labels = gather(labels, with_grad=False) if labels is not None else None
    else:
        all_img, all_txt, offset, all_labels = img, txt, 0, labels
    i2t = query_similarity(img, all_txt) / temperature  # [B, N]
    t2i = query_similarity(all_img, txt).T / temperature  # [B, N]
    rows = torch.arange(b, device=img.device) + offset
    if labels is None:
        return (F.cross_entropy(i2t, rows, label_smoothing=label_smoothing)
                + F.cross_entropy(t2i, rows, label_smoothing=label_smoothing)) / 2
    known = (labels[:, None] >= 0) & (labels[:, None] == all_labels[None, :])
    pos = known | F.one_hot(rows, all_img.shape[0]).bool()
    target = _soft_targets(pos, label_smoothing)
    return (-(target * i2t.log_softmax(-1)).sum(-1).mean() - (target * t2i.log_softmax(-1)).sum(-1).mean()) / 2


def hard_negatives(sim: Tensor, temperature: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """BLIP-2's hard-negative sampling for image-text matching: for each row ``i`` of ``sim`` ``[B, M]``
    draw one column ``j != i`` with probability ``softmax_j(sim[i] / tau)`` over ``j != i``.

    The positive (column ``i``) has probability exactly zero, whatever its similarity; rows whose other
    weights underflow fall back to a uniform draw over the other columns. Needs ``M >= 2``.

    Returns:
        ``[B]`` int64 column indices.
    """
    b, m = sim.shape
    if m < 2:
        raise ValueError(f"image-text matching needs at least 2 samples per batch to draw negatives, got {m}.")
    logits = sim.detach().float() / float(temperature)
    eye = torch.zeros_like(logits, dtype=torch.bool)
    eye[torch.arange(b), torch.arange(b) % m] = True
    weights = logits.masked_fill(eye, float("-inf")).softmax(-1)
    weights = torch.where(torch.isfinite(weights) & (weights.sum(-1, keepdim=True) > 0), weights, (~eye).float())
    weights = weights.masked_fill(eye, 0.0)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


__all__ = ["hard_negatives", "query_itc", "query_similarity"]

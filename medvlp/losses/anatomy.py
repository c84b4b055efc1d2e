"""fVLM's per-anatomy contrastive loss with false-negative reduction (``specs/methods/fvlm.md`` §4).

For one anatomy, the samples of the global batch in which it is intact give unit vectors ``v_i``
(image, that anatomy) and ``t_i`` (its report text); ``S_ij = <v_i, t_j> / tau``. The targets
(§4.2, the released code):

    M_ij = 1 if i != j and ((normal_i and normal_j) or text_i == text_j)
    Y    = row-normalise(I + M)

so a normal sample's positives are itself and every other normal sample, an abnormal one's itself
and any sample with the byte-identical text. The loss (§4.3) is the soft-target InfoNCE of both
directions with the same ``Y``: ``L = (CE(S, Y) + CE(S^T, Y)) / 2``, each the mean over rows of
``-sum_j Y_ij log softmax_j``.

Texts are compared through 64-bit keys (:func:`text_keys`), so that the comparison crosses processes
as one tensor instead of pickled strings.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor


def text_keys(texts: list[str], device: torch.device | None = None) -> Tensor:
    """A 64-bit key per text (BLAKE2b of its UTF-8 bytes): equal texts, equal keys."""
    keys = [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little", signed=True) for t in texts]
    return torch.tensor(keys, dtype=torch.long, device=device)


def all_targets_equal(normal: list[bool], texts: list[str], normal_positives: bool = True,
                      duplicate_positives: bool = True) -> bool:
    """Whether :func:`fnr_targets` of these samples (no ``extra``) has every entry equal - no signal -, from
    host-side lists: every pair of samples is positive (one sample; all identical texts; all normal)."""
    return (len(normal) <= 1 or (duplicate_positives and len(set(texts)) == 1)
            or (normal_positives and all(normal)))


def fnr_targets(normal: Tensor, keys: Tensor, normal_positives: bool = True, duplicate_positives: bool = True,
                extra: Tensor | None = None) -> Tensor:
    """The target matrix ``Y`` ``[N, N]`` of one anatomy (rows sum to 1).

    Args:
        normal: ``[N]`` bool, True where the report calls the anatomy normal.
        keys: ``[N]`` int64 text keys (:func:`text_keys`); equal keys = identical texts.
        normal_positives: normal samples are positives of each other (fVLM's FNR for normals).
        duplicate_positives: samples with identical texts are positives of each other.
        extra: ``[N, N]`` non-negative soft positives added to ``I + M`` before the row normalisation
            (``momentum_text``: EMA text-text similarities between abnormal samples).
    """
    n = normal.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=normal.device)
    same = torch.zeros_like(eye)
    if normal_positives:
        same |= normal[:, None] & normal[None, :]
    if duplicate_positives:
        same |= keys[:, None] == keys[None, :]
    y = (eye | same).float()
    if extra is not None:
        y = y + extra.to(y.dtype)
    return y / y.sum(dim=1, keepdim=True)


def soft_target_clip(img: Tensor, txt: Tensor, temperature: Tensor | float, targets: Tensor,
                     targets_t2i: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric soft-target InfoNCE.

    Args:
        img, txt: ``[N, D]`` (L2-normalised) image / text embeddings of the same N samples.
        temperature: ``tau``; the logits are ``img @ txt.T / tau``.
        targets: ``[N, N]`` rows summing to 1 (image-to-text); ``targets_t2i`` the text-to-image ones
            (default: the same matrix, as fVLM uses).

    Returns:
        ``(loss, loss_i2t, loss_t2i)`` with ``loss = (loss_i2t + loss_t2i) / 2``.
    """
    logits = img @ txt.T / temperature
    t2i = targets if targets_t2i is None else targets_t2i
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t2i = -(t2i * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i


def anatomy_itc(v: Tensor, t: Tensor, normal: Tensor, keys: Tensor, temperature: Tensor | float, *,
                gather_distributed: bool = True, with_grad: bool = False, normal_positives: bool = True,
                duplicate_positives: bool = True, momentum_text: Tensor | None = None,
                peer: tuple[Tensor, Tensor, Tensor | float] | None = None, alpha: float = 0.5,
                abnormal_only: bool = False, uniform: bool | None = None) -> Tensor | None:
    """One anatomy's loss over the global batch (spec §4), or None when it contributes nothing here.

    Every process calls it for the same anatomies in the same order (it gathers), whatever its number of
    local samples ``n`` (0 included); the rows of all processes are padded to the largest ``n`` and
    gathered (:func:`~medvlp.distributed.gather_rows`), so every process computes the full ``N x N`` loss.

    Args:
        v, t: ``[n, D]`` unit image / text embeddings of this process's samples (grad-carrying).
        normal: ``[n]`` bool; keys: ``[n]`` int64 text keys (:func:`text_keys`).
        temperature: ``tau``.
        gather_distributed: build the problem over every process's samples.
        with_grad: the gathered rows of other processes carry gradients too (else only local rows do,
            the released code's plain gather).
        normal_positives, duplicate_positives: the FNR targets of :func:`fnr_targets`.
        momentum_text: ``[n, D]`` EMA text embeddings: soft positives between abnormal samples,
            ``softmax(T T^T / tau)``, added before the row normalisation.
        peer: ``(v', t', tau')`` a peer model's embeddings of the same samples (co-teaching): the targets
            become ``alpha Y + (1 - alpha) softmax(S')`` (``S'^T`` for text-to-image), on abnormal rows only
            with ``abnormal_only``.
        uniform: whether every target is equal, when the caller knows it from host-side data
            (:func:`all_targets_equal`); None: read from the targets (a host synchronisation).

    Returns:
        The soft-target InfoNCE (:func:`soft_target_clip`), or None with no local sample or when every
        target is equal (a single sample, or only normal ones): no signal.
    """
    from medvlp.distributed import gather_rows

    def everywhere(x: Tensor, grad: bool = False) -> Tensor:
        return gather_rows(x, with_grad=grad and with_grad)[0] if gather_distributed else x

    n = v.shape[0]
    v_all, t_all, normal_all, keys_all = everywhere(v, True), everywhere(t, True), everywhere(normal), everywhere(keys)
    extra = None
    if momentum_text is not None:
        m_all = everywhere(momentum_text)
        both = (~normal_all)[:, None] & (~normal_all)[None, :]
        tau = temperature.detach() if isinstance(temperature, Tensor) else temperature
        extra = torch.softmax(m_all @ m_all.T / tau, dim=1) * both
    soft = None
    if peer is not None:
        pv, pt, ptemp = peer
        soft = everywhere(pv) @ everywhere(pt).T / ptemp
    if n == 0:
        return None
    y = fnr_targets(normal_all, keys_all, normal_positives, duplicate_positives, extra)
    if uniform if uniform is not None else bool((y == y[0, 0]).all()):
        return None
    y_t2i = None
    if soft is not None:
        y_i2t = alpha * y + (1 - alpha) * torch.softmax(soft, dim=1)
        y_t2i = alpha * y + (1 - alpha) * torch.softmax(soft.T, dim=1)
        if abnormal_only:  # normal rows keep their FNR targets
            rows = (~normal_all)[:, None]
            y_i2t, y_t2i = torch.where(rows, y_i2t, y), torch.where(rows, y_t2i, y)
        y = y_i2t
    return soft_target_clip(v_all, t_all, temperature, y, y_t2i)[0]


__all__ = ["all_targets_equal", "anatomy_itc", "fnr_targets", "soft_target_clip", "text_keys"]

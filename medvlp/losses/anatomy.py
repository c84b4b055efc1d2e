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


__all__ = ["fnr_targets", "soft_target_clip", "text_keys"]

"""Dense (per-pixel) losses: soft Dice and BCE, and the two forms of G2D's pixel-alignment loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_dice(pred: Tensor, target: Tensor, smooth: float = 0.0, eps: float = 1e-6) -> Tensor:
    """Per-image soft Dice ``[B]``: ``(2 sum(p t) + smooth) / (sum p + sum t + smooth)`` over all
    channels and pixels of each image. ``pred`` and ``target`` are ``[B, ...]`` of equal shape.

    With ``smooth = 0`` an image whose prediction and target are both empty scores 1 (``eps``
    guards the division).
    """
    p = pred.float().flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(dim=1)
    denom = p.sum(dim=1) + t.sum(dim=1)
    if smooth > 0:
        return (2 * inter + smooth) / (denom + smooth)
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=eps), torch.ones_like(denom))


def dice_bce_loss(logits: Tensor, target: Tensor, form: str = "paper") -> tuple[Tensor, Tensor, Tensor]:
    """G2D's pixel-alignment loss between decoder ``logits`` and a (soft) pseudo mask ``target``.

    * ``form="paper"`` (Eq. 4): ``0.5 * (L_dice + L_bce)`` with ``L_dice = mean_i (1 - Dice_i)`` on
      sigmoid probabilities and ``L_bce`` the pixel-mean binary cross-entropy. Bounded in
      ``[0, 0.5 * (1 + L_bce)]``.
    * ``form="code"`` (the official ``bceDiceLoss``): ``(1 - mean_i Dice_i) + 0.2 * L_bce`` with Dice
      computed on the raw logits and smoothing 1e-5 - unbounded below (spec Q3); for parity runs.

    Returns:
        ``(loss, dice_term, bce_term)`` where ``dice_term = 1 - mean Dice``.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    if form == "paper":
        dice = 1 - soft_dice(torch.sigmoid(logits.float()), target).mean()
        return 0.5 * (dice + bce), dice, bce
    if form == "code":
        dice = 1 - soft_dice(logits.float(), target, smooth=1e-5).mean()
        return dice + 0.2 * bce, dice, bce
    raise ValueError(f"method.pa_form='{form}': expected 'paper' (0.5 (Dice + BCE) on probabilities) or 'code'.")


__all__ = ["soft_dice", "dice_bce_loss"]

"""Soft Dice and G2D's pixel-alignment loss (spec 5.2 and the sanity values of section 9)."""

from __future__ import annotations

import math

import pytest
import torch

from medvlp.losses.segmentation import dice_bce_loss, soft_dice


def test_soft_dice_by_hand():
    pred = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # image 0: 2*1 / (2 + 1) ; image 1: 2*1 / (2 + 2)
    assert torch.allclose(soft_dice(pred, target), torch.tensor([2 / 3, 0.5]))
    assert soft_dice(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 1.0  # both empty
    assert soft_dice(pred, target, smooth=1e-5)[0].item() == pytest.approx((2 + 1e-5) / (3 + 1e-5))


def test_paper_form_at_zero_logits_matches_the_spec_value():
    target = torch.zeros(4, 1, 64, 64)
    target[:, :, :24, :24] = 1  # 14 % foreground
    frac = float(target.mean())
    loss, dice, bce = dice_bce_loss(torch.zeros_like(target), target, "paper")
    assert bce.item() == pytest.approx(math.log(2), rel=1e-5)
    assert dice.item() == pytest.approx(1 - 2 * 0.5 * frac / (0.5 + frac), rel=1e-5)  # ~0.78
    assert loss.item() == pytest.approx(0.5 * (dice.item() + math.log(2)), rel=1e-5)  # ~0.74
    assert 0.72 < loss.item() < 0.76


def test_code_form_at_zero_logits_and_its_unbounded_dice():
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, :12, :12] = 1
    loss, dice, bce = dice_bce_loss(torch.zeros_like(target), target, "code")
    assert dice.item() == pytest.approx(1.0, abs=1e-4)  # Dice on zero logits = 0
    assert loss.item() == pytest.approx(1 + 0.2 * math.log(2), abs=1e-4)  # ~1.14
    # negative background logits push the code's Dice term below 0 (spec Q3) ...
    logits = torch.where(target > 0, torch.tensor(1.0), torch.tensor(-0.15))
    code, _, _ = dice_bce_loss(logits, target, "code")  # Dice = 2 * 144 / (144 - 0.15 * 880 + 144) > 1
    assert code.item() < 0
    # ... while the paper form stays in [0, 0.5 (1 + BCE)]
    for scale in (0.0, 1.0, 10.0, -10.0):
        paper, _, bce = dice_bce_loss(logits * scale, target, "paper")
        assert 0 <= paper.item() <= 0.5 * (1 + bce.item()) + 1e-6


def test_perfect_prediction_gives_near_zero_loss_and_soft_targets_work():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:5, 2:5] = 1
    loss, _, _ = dice_bce_loss((target * 2 - 1) * 30, target, "paper")
    assert loss.item() < 1e-3
    soft = target * 0.8
    loss.requires_grad_(False)
    logits = torch.zeros(1, 1, 8, 8, requires_grad=True)
    dice_bce_loss(logits, soft, "paper")[0].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_unknown_form():
    with pytest.raises(ValueError, match="pa_form"):
        dice_bce_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "mean")

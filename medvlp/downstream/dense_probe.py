"""Dense probing: how well do a frozen encoder's feature maps localise a finding?

* :func:`demo_mask_records` - the synthetic MIMIC-CXR world's ground-truth masks of a finding
  (``demo_truth/masks/<dicom_id>_<finding>.png``, drawn with the pixels) attached to the datamodule's
  records, so images and masks go through the same letterbox transform;
* :func:`dense_features` - chosen encoder stages, each upsampled to the finest of them and
  concatenated (a hypercolumn), computed frozen;
* :func:`linear_probe` - a 1x1 convolution trained on those features to predict the masks (Adam,
  full batch, 0.5 (Dice + BCE) on the feature grid), scored by the mean per-image Dice on held-out images that contain
  the finding;
* :func:`mask_dice` - per-image Dice of binary masks.

Used by the G2D tests (predicted pseudo masks vs the drawn consolidation, and G2D vs CLIP features)
and usable on any method whose image encoder is a timm CNN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.datamodules.base import DataError, Record

DEMO_MASK_FINDINGS = ("consolidation", "pneumothorax")


@dataclass(frozen=True)
class TruthMask:
    """Picklable mask reader: ``mask(h, w)`` -> uint8 {0, 1} ``[h, w]``; no file = an empty mask."""

    path: str

    def __call__(self, height: int, width: int) -> np.ndarray:
        from PIL import Image

        p = Path(self.path)
        if not p.is_file():
            return np.zeros((height, width), np.uint8)
        m = np.asarray(Image.open(p).convert("L")) > 127
        if m.shape != (height, width):
            raise DataError(f"Truth mask {p} is {m.shape}, its image {(height, width)}.")
        return m.astype(np.uint8)


def demo_mask_records(dm: Any, split: str, finding: str, positives_only: bool = False) -> list[Record]:
    """Records of ``split`` of a synthetic MIMIC-CXR datamodule with the drawn mask of ``finding``.

    Args:
        dm: a ``mimic_cxr`` datamodule on a synthetic root (``data.root=demo``), one image per record.
        split: ``train`` | ``validate`` | ``test``.
        finding: ``consolidation`` or ``pneumothorax``.
        positives_only: keep only the images in which the finding is drawn.
    """
    if finding not in DEMO_MASK_FINDINGS:
        raise ValueError(f"finding='{finding}': the synthetic world draws masks for {list(DEMO_MASK_FINDINGS)}.")
    root = Path(dm.cfg.root)
    folder = root / "demo_truth" / "masks"
    if not (root / "demo_truth" / "cxr_findings.csv").is_file():
        raise DataError(f"{root} is not a synthetic MIMIC-CXR world (no demo_truth/cxr_findings.csv); "
                        f"use data.root=demo with data=demo_cxr.")
    out = []
    for rec in dm.records(split):
        if not isinstance(rec.image_path, str):
            raise ValueError("demo_mask_records needs one image per record (data.images_per_study=all).")
        dicom_id = Path(rec.image_path).stem
        path = folder / f"{dicom_id}_{finding}.png"
        if positives_only and not path.is_file():
            continue
        out.append(dataclasses.replace(rec, mask=TruthMask(str(path))))
    return out


@torch.no_grad()
def load_images_and_masks(dm: Any, records: list[Record]) -> tuple[Tensor, Tensor]:
    """``(images [N, C, S, S], masks [N, S, S] float {0, 1})`` through the datamodule's eval transform."""
    images, masks = [], []
    for rec in records:
        sample = dm.load_sample(rec, train=False)
        images.append(sample["image"])
        masks.append(sample["mask"].float())
    return torch.stack(images), torch.stack(masks)


def mask_dice(pred: Tensor, truth: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-image Dice ``[N]`` of binary masks ``[N, H, W]``; both empty counts 1."""
    p, t = pred.float().flatten(1), truth.float().flatten(1)
    inter, denom = (p * t).sum(1), p.sum(1) + t.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=eps), torch.ones_like(denom))


@torch.no_grad()
def dense_features(encoder: Any, images: Tensor, stages: tuple[int, ...] = (1, 2, 3), batch_size: int = 64) -> Tensor:
    """Hypercolumn of a frozen timm CNN: the chosen ``stages`` (0 = the stride-2 stem, 1..4 = ResNet
    ``layer1``..``layer4``) upsampled (bilinear) to the finest of them and concatenated,
    ``[N, sum of channels, h, w]``."""
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            maps = encoder.pyramid(images[i : i + batch_size], max(stages) + 1)
            picked = [maps[k] for k in sorted(stages)]
            size = picked[0].shape[-2:]
            out.append(torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear",
                                                                                 align_corners=False) for m in picked], 1))
    finally:
        encoder.train(was_training)
    return torch.cat(out).float()


def linear_probe(train_feats: Tensor, train_masks: Tensor, test_feats: Tensor, test_masks: Tensor,
                 steps: int = 300, lr: float = 1e-2, seed: int = 0) -> dict[str, Any]:
    """Train a 1x1 convolution on frozen features to segment; score Dice on the test images with a finding.

    Features are standardised per channel with the training statistics. The probe is fitted on the
    feature grid against the masks area-averaged to that grid (soft targets, 0.5 (Dice + BCE), Adam,
    full batch); at test time its logits are upsampled bilinearly to the mask size and
    prediction = probability >= 0.5.

    Returns:
        ``{"dice": mean Dice over test images whose mask is not empty, "dice_all": over every test
        image, "n_test_positive": count, "train_loss": final loss}``.
    """
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = train_feats.shape
    # A 1x1 convolution is a linear map per pixel: fit it as [pixels, channels] @ [channels] (BLAS),
    # which is an order of magnitude faster on CPU than a one-output convolution.
    xtr = train_feats.permute(0, 2, 3, 1).reshape(-1, c)
    mean, std = xtr.mean(dim=0), xtr.std(dim=0).clamp(min=1e-6)
    xtr = (xtr - mean) / std
    weight = (torch.randn(c, generator=g) * 0.01).requires_grad_(True)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    target = F.adaptive_avg_pool2d(train_masks[:, None].float(), (h, w)).reshape(n, h * w)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        logits = (xtr @ weight + bias).reshape(n, h * w)
        prob = torch.sigmoid(logits)
        dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
        loss = 0.5 * (1 - dice.mean()) + 0.5 * F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = torch.nn.Conv2d(c, 1, kernel_size=1)
    with torch.no_grad():  # the fitted probe as the 1x1 convolution it is, on standardised features
        probe.weight.copy_((weight / std).view(1, c, 1, 1))
        probe.bias.copy_(bias - (weight * mean / std).sum())
    xte = test_feats
    with torch.no_grad():
        pred = torch.sigmoid(F.interpolate(probe(xte), size=test_masks.shape[-2:], mode="bilinear",
                                           align_corners=False))[:, 0] >= 0.5
    scores = mask_dice(pred, test_masks)
    positive = test_masks.flatten(1).sum(1) > 0
    return {"dice": float(scores[positive].mean()) if positive.any() else float("nan"), "dice_all": float(scores.mean()),
            "n_test_positive": int(positive.sum()), "train_loss": float(loss.detach())}


__all__ = ["TruthMask", "demo_mask_records", "load_images_and_masks", "mask_dice", "dense_features", "linear_probe"]

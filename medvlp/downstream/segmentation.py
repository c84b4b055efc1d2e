"""Segmentation transfer of a pretrained image encoder (MGCA's protocol, ``specs/methods/mgca.md`` §7.4).

* CNN encoders (timm): a segmentation_models_pytorch ``Unet`` whose encoder is the run's backbone
  (smp's own ResNets take torchvision / timm key names; any other timm CNN goes through smp's ``tu-``
  encoders), decoder channels 256 / 128 / 64 / 32 / 16 with batch norm, one output channel.
* ViT encoders: MGCA's SETR-naive decoder on the patch tokens - four [3x3 conv, BN, ReLU, x2 bilinear
  upsampling] stages (512 / 256 / 128 / 64 channels), a 3x3 conv to one channel, resized to the input.

``protocol=frozen`` (the papers' encoder transfer) trains the decoder only; ``finetune`` trains both.
Loss: ``10 * focal(gamma 2) - log(soft Dice)``, the soft Dice on sigmoid probabilities with smoothing
1 over the whole batch. AdamW lr 5e-4, betas (0.9, 0.999), weight decay 0.05, no schedule, batch 8
(SIIM) or 16 (RSNA), at most 50 epochs, early stopping on the validation loss (patience 10), the best
weights are tested. The SIIM training split is class-balanced as MGCA does: every positive image and
as many randomly drawn negatives (``balance=True``), before the label fraction applies.

Metric (MGCA): per image, prediction and truth binarised at 0.5; Dice = 2|P n T| / (|P| + |T|) when
the truth is not empty, else 1 for an empty prediction and 0 otherwise; the mean over the test images
(MGCA's code averages per-batch means, Q11: the same with equal batches).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.downstream.task import Task, transfer_title
from medvlp.downstream.transfer import TransferModule, fit_transfer
from medvlp.encoders.image2d import smp_encoder_name
from medvlp.registry import register_task

log = logging.getLogger(__name__)

PROTOCOLS = ("frozen", "finetune")


@dataclass
class SegmenterSettings:
    """Optimiser and stopping settings (defaults: MGCA's published scripts)."""

    lr: float = 5e-4
    batch_size: int = 8
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    max_epochs: int = 50
    patience: int = 10
    max_steps: int = 0  # > 0: stop after this many optimiser steps (quick runs)
    min_steps: int = 0  # patience counts only after this many optimiser steps
    focal_weight: float = 10.0
    decoder: str = "fresh"  # fresh: a new decoder | pretrained: the run's exported decoder (G2D's encoder-decoder transfer)
    bn: str = "eval"  # frozen encoder's batch norms: eval (pre-training statistics) | train (batch statistics, MGCA's code)


DECODERS = ("fresh", "pretrained")
BN_MODES = ("eval", "train")


def settings_for(**overrides: Any) -> SegmenterSettings:
    base = asdict(SegmenterSettings())
    unknown = [k for k in overrides if k not in base]
    if unknown:
        raise ValueError(f"Unknown segmentation setting(s) {unknown}; known: {sorted(base)}.")
    s = SegmenterSettings(**{**base, **{k: v for k, v in overrides.items() if v is not None}})
    if s.decoder not in DECODERS:
        raise ValueError(f"decoder='{s.decoder}' is not one of {DECODERS}.")
    if s.bn not in BN_MODES:
        raise ValueError(f"bn='{s.bn}' is not one of {BN_MODES}.")
    return s


# ---------------------------------------------------------------------------------------------- metric + loss
def dice_per_image(pred: Tensor, truth: Tensor) -> Tensor:
    """MGCA's Dice ``[N]`` of binarised masks ``[N, H, W]``: an empty truth scores 1 for an empty
    prediction and 0 otherwise."""
    p, t = (pred > 0.5).flatten(1).float(), (truth > 0.5).flatten(1).float()
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    empty_truth = t.sum(1) == 0
    dice = 2 * inter / total.clamp(min=1e-12)
    return torch.where(empty_truth, (p.sum(1) == 0).float(), dice)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Binary focal loss (mean over pixels): ``-(1 - p_t)^gamma log p_t``."""
    logp = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (-((1 - logp.exp()) ** gamma) * logp).mean()


def soft_dice_batch(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice of the whole batch on sigmoid probabilities, smoothing ``smooth`` (MGCA)."""
    p = logits.sigmoid().flatten()
    t = target.flatten()
    return (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def segmentation_loss(logits: Tensor, target: Tensor, focal_weight: float = 10.0) -> Tensor:
    """``focal_weight * focal(gamma 2) - log(soft Dice)`` (MGCA)."""
    return focal_weight * focal_loss(logits, target) - torch.log(soft_dice_batch(logits, target))


# ---------------------------------------------------------------------------------------------- models
class UnetSegmenter(nn.Module):
    """smp ``Unet`` over a pretrained timm CNN (its weights copied into smp's encoder)."""

    def __init__(self, encoder: nn.Module, in_channels: int, depth: int = 5,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        name, prefix = smp_encoder_name(encoder.cfg.model)
        self.unet = smp.Unet(encoder_name=name, encoder_weights=None, encoder_depth=depth, in_channels=in_channels,
                             classes=1, decoder_channels=list(decoder_channels)[:depth], decoder_use_norm="batchnorm")
        wanted = self.unet.state_dict()
        state = {prefix + k: v for k, v in encoder.model.state_dict().items() if prefix + k in wanted}
        expected = [k for k in wanted if k.startswith("encoder.")]
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(f"The encoder's weights do not fit smp.Unet('{name}'): e.g. {missing[:3]} are missing.")
        self.unet.load_state_dict(state, strict=False)
        self.encoder = self.unet.encoder
        # the pretrained encoder's memory order (channels-last CNNs): the same kernels, so the same numbers
        self.channels_last = bool(getattr(encoder, "channels_last", False))
        if self.channels_last:
            self.unet.encoder.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.unet(images)[:, 0]


class SETRNaiveSegmenter(nn.Module):
    """MGCA's ViT option: patch tokens -> 4 x [3x3 conv, BN, ReLU, x2 bilinear] -> 3x3 conv -> 1 channel."""

    def __init__(self, encoder: nn.Module, channels: tuple[int, ...] = (512, 256, 128, 64)) -> None:
        super().__init__()
        self.encoder = encoder
        layers: list[nn.Module] = []
        c = int(encoder.local_dim)
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            c = out
        layers.append(nn.Conv2d(c, 1, 3, padding=1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        feats = self.encoder(images)
        h, w = feats.grid
        x = feats.tokens.transpose(1, 2).reshape(images.shape[0], -1, h, w).float()
        out = self.decoder(x)
        return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def build_segmenter(method: Any, in_channels: int, decoder_channels: tuple[int, ...] | None = None,
                    decoder: str = "fresh") -> nn.Module:
    """The segmenter for the run's image encoder (a copy; the method is unchanged). ``decoder="pretrained"``
    rebuilds the U-Net the method exports (:meth:`~medvlp.methods.base.VLPMethod.export_decoder`: G2D's
    pixel-alignment decoder) with all its weights; its segmentation head too when it has one output."""
    if decoder == "pretrained":
        return pretrained_unet(method, in_channels, decoder_channels)
    encoder = copy.deepcopy(method.export_encoder().module)
    if getattr(encoder, "is_vit", False):
        return SETRNaiveSegmenter(encoder, tuple(decoder_channels or (512, 256, 128, 64)))
    if not hasattr(encoder, "model") or not hasattr(encoder, "cfg"):
        raise ValueError(f"Segmentation transfer needs a timm image encoder (CNN or ViT), got {type(encoder).__name__}.")
    return UnetSegmenter(encoder, in_channels, decoder_channels=tuple(decoder_channels or (256, 128, 64, 32, 16)))


def pretrained_unet(method: Any, in_channels: int, decoder_channels: tuple[int, ...] | None = None) -> UnetSegmenter:
    """:class:`UnetSegmenter` with the encoder, decoder (and, for one pre-training output, head) of the
    U-Net the method exports. Errors name what does not fit: no exported decoder, other channels."""
    export = method.export_decoder() if method.supports("export_decoder") else None
    if not export:
        raise ValueError(f"decoder=pretrained: the {method.cfg.name} run exports no pre-trained decoder (only methods "
                         f"that train one, e.g. G2D, do); use decoder=fresh.")
    if int(export["in_channels"]) != int(in_channels):
        raise ValueError(f"decoder=pretrained: the run's U-Net takes {export['in_channels']} input channel(s), the data has "
                         f"{in_channels}; set data.channels={export['in_channels']}.")
    if decoder_channels and [int(c) for c in decoder_channels] != list(export["decoder_channels"]):
        raise ValueError(f"decoder=pretrained keeps the run's decoder channels {list(export['decoder_channels'])}; "
                         f"decoder_channels={list(decoder_channels)} cannot be used with it.")
    encoder = copy.deepcopy(method.export_encoder().module)
    model = UnetSegmenter(encoder, in_channels, depth=int(export["encoder_depth"]),
                          decoder_channels=tuple(export["decoder_channels"]))
    state = dict(export["state_dict"])
    if int(export["classes"]) != 1:  # several pseudo-mask channels: a new one-channel head
        state = {k: v for k, v in state.items() if not k.startswith("segmentation_head.")}
    missing, unexpected = model.unet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.startswith("segmentation_head.") and int(export["classes"]) != 1)]
    if missing or unexpected:
        raise ValueError(f"decoder=pretrained: the exported U-Net does not fit (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    model.pretrained_decoder = True
    return model


# ---------------------------------------------------------------------------------------------- training
def balance_positives(records: list[Any], seed: int = 42) -> list[Any]:
    """Every record with a positive first label and as many randomly drawn negatives (MGCA's SIIM rule)."""
    pos = [r for r in records if r.labels is not None and float(r.labels[0]) > 0.5]
    neg = [r for r in records if not (r.labels is not None and float(r.labels[0]) > 0.5)]
    rng = np.random.default_rng(seed)
    keep = rng.choice(len(neg), size=min(len(pos), len(neg)), replace=False) if neg else []
    return pos + [neg[i] for i in sorted(keep)]


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict_masks(model: nn.Module, loader: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(probabilities, truths, images)`` of a split (CPU tensors)."""
    model.eval().to(device)
    probs, truths, images = [], [], []
    for batch in loader:
        with _autocast(device):
            logits = model(batch.images.to(device))
        probs.append(logits.float().sigmoid().cpu())
        truths.append(batch.masks.float())
        images.append(batch.images[:, 0].float())
    return torch.cat(probs), torch.cat(truths), torch.cat(images)


def run_segmentation(method: Any, dm: Any, protocol: str = "frozen", seed: int = 0, balance: bool = False,
                     device: torch.device | None = None, decoder_channels: tuple[int, ...] | None = None,
                     folder: Path | None = None, trainer_cfg: Any = None, **settings: Any) -> dict[str, Any] | None:
    """Train a decoder (and with ``finetune`` the encoder) on ``dm``'s masks; test Dice.

    Returns:
        A JSON-ready dict (Dice on all test images and on those with a finding, the settings, the
        training history) plus ``examples`` (images, truths, predictions of a few test images); None on
        the processes other than rank 0 of a DDP run. Training runs on a ``Trainer`` (``trainer_cfg``)
        and writes ``checkpoints/best.ckpt`` and ``metrics.csv`` into ``folder``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol '{protocol}' is not one of {PROTOCOLS}.")
    s = settings_for(**settings)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = build_segmenter(method, int(dm.cfg.channels), decoder_channels, s.decoder).to(device)
    if protocol == "frozen":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    if balance:
        dm._records["train"] = balance_positives(dm.records("train"))
    dm.cfg.batch_size = int(s.batch_size)
    start = time.perf_counter()

    def loss(m: nn.Module, batch: Any) -> Tensor:
        return segmentation_loss(m(batch.images).float(), batch.masks.float(), s.focal_weight)

    def val_items(m: nn.Module, batch: Any) -> list[tuple[Tensor, Tensor]]:
        probs = m(batch.images).float().sigmoid().cpu()
        return list(zip(probs, batch.masks.float().cpu(), strict=True))

    def val_loss(items: list[tuple[Tensor, Tensor]]) -> float:
        probs, truths = torch.stack([p for p, _ in items]), torch.stack([t for _, t in items])
        return float(segmentation_loss(torch.logit(probs.clamp(1e-6, 1 - 1e-6)), truths, s.focal_weight))

    module = TransferModule(model, loss, val_items, val_loss, s.lr, s.betas, s.weight_decay,
                            frozen=model.encoder if protocol == "frozen" and s.bn == "eval" else None)
    history, trainer = fit_transfer(module, dm.train_dataloader(), dm.val_dataloader(), folder, mode="min",
                                    patience=s.patience, max_epochs=s.max_epochs, max_steps=s.max_steps,
                                    trainer_cfg=trainer_cfg, seed=seed, min_steps=s.min_steps,
                                    extend_epochs=settings.get("max_epochs") is None)
    if not trainer.is_global_zero:
        return None
    probs, truths, images = predict_masks(model, dm.test_dataloader(), device)
    dice = dice_per_image(probs, truths)
    positive = truths.flatten(1).sum(1) > 0
    order = torch.argsort(positive.float(), descending=True)[:4]
    return {"task": "segmentation", "protocol": protocol, "fraction": float(dm.cfg.label_fraction), "seed": seed,
            "balanced": balance, "n_train": len(dm.records("train")), "n_test": len(dice),
            "n_test_positive": int(positive.sum()), "dice": float(dice.mean()),
            "dice_positive": float(dice[positive].mean()) if positive.any() else float("nan"),
            "decoder": type(model).__name__, "settings": asdict(s), "history": history, "seconds": time.perf_counter() - start,
            "examples": {"images": images[order], "truths": truths[order], "predictions": probs[order]}}



@register_task("segmentation")
class SegmentationTask(Task):
    """U-Net (CNN) or SETR (ViT) decoder on the image encoder (Dice)"""

    settings = ("lr", "batch_size", "weight_decay", "betas", "max_epochs", "patience", "max_steps", "min_steps", "decoder_channels",
                "decoder", "bn")

    def run(self, method: Any, dm: Any, protocol: str, seed: int, folder: Path, settings: dict[str, Any],
            trainer_cfg: Any = None) -> dict[str, Any] | None:
        from medvlp.downstream.plots import mask_overlays_png

        balanced = bool(dm.balance_segmentation)
        # MGCA balances SIIM first and draws the label fraction from the balanced images: a datamodule that
        # balances its train split itself (data.balance_train) has done so before its fraction was drawn
        by_data = bool(getattr(dm.cfg, "balance_train", False))
        settings = dict(settings)
        settings.setdefault("batch_size", 8 if balanced else 16)  # MGCA: 8 (SIIM), 16 (RSNA)
        res = run_segmentation(method, dm, protocol="frozen" if protocol == "linear" else protocol, seed=seed,
                               balance=balanced and not by_data, folder=folder, trainer_cfg=trainer_cfg, **settings)
        if res is None:
            return None
        res["balanced"] = balanced
        ex = res.pop("examples")
        mask_overlays_png(folder / "overlays.png", ex["images"], ex["truths"], ex["predictions"])
        truths = ex["truths"]
        ones = dice_per_image(torch.ones_like(truths), truths)
        positive = truths.flatten(1).sum(1) > 0
        res["baseline_all_ones_dice_positive"] = float(ones[positive].mean()) if positive.any() else float("nan")
        res["files"] = {"overlays": str(folder / "overlays.png")}
        return res

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        rows = [("all test images", f"{res['dice']:.3f}"),
                (f"images with a finding ({res['n_test_positive']})", f"{res['dice_positive']:.3f}"),
                ("all-ones mask, images with a finding", f"{res['baseline_all_ones_dice_positive']:.3f}")]
        return transfer_title(res), rows, ("Dice", "")


__all__ = ["PROTOCOLS", "SegmentationTask", "SegmenterSettings", "balance_positives", "build_segmenter", "dice_per_image", "focal_loss",
           "run_segmentation", "segmentation_loss", "soft_dice_batch"]

"""Detection transfer of a pretrained image encoder (RSNA pneumonia, Object-CXR foreign objects).

Detectors (``detector``):

* ``yolov3``: MGCA's detector (``specs/methods/mgca.md`` §7.3, which G2D reuses) - a YOLOv3 head on the
  encoder's stages at strides 8 / 16 / 32 (``layer2`` ... ``layer4`` of a ResNet), three anchors per
  map (YOLOv3's COCO anchors scaled by ``image_size / 416``), MGCA's YOLO loss (xy 2.5, wh 2.5,
  objectness 1, class 1, ignore IoU 0.5); ``medvlp.downstream.yolo`` has the details and the
  differences from the official code. CNN encoders only (a ViT has no stage outputs); the head's width
  is ``pyramid_channels`` (256: the official head, branches 512 / 256 / 128).
* ``fcos`` (default), ``retinanet``, ``faster_rcnn``: a torchvision detector over a feature pyramid
  built on the run's image backbone, for CNN and ViT encoders alike:

  * CNN encoders (timm): the stage outputs at strides 4 / 8 / 16 / 32 (``layer1`` ... ``layer4`` of a
    ResNet, as torchvision's ResNet-50-FPN taps them) go through a feature pyramid network with an
    extra max-pooled level at stride 64.
  * ViT encoders: the last block's patch-token map goes through ViTDet's simple feature pyramid -
    scales 4x and 2x by 2x2 transposed convolutions, 1x, and 0.5x by max pooling, each then
    [1x1 conv, LayerNorm, 3x3 conv, LayerNorm] - plus the pooled level.

  Every level has ``pyramid_channels`` (256) channels. ``fcos``: anchor-free, one location per pixel
  of each level; ``retinanet`` and ``faster_rcnn``: anchors of three sizes per level,
  ``2 * stride * 2^(k/3)`` pixels, aspect ratios 0.5 / 1 / 2. They are not the papers' head but work
  on any encoder; FCOS is the default because on the demo boxes it reaches in one epoch what RetinaNet
  does not in six, and Faster R-CNN's RoIAlign backward makes it about 4x slower per step on CPUs. The
  MGCA and G2D paper protocols use ``detector=yolov3``.

Images enter at the datamodule's size (no rescaling inside the detector) and already normalised. The
protocol follows MGCA's:

* ``protocol=frozen``: the encoder is frozen (eval mode, no gradients); the head (pyramid and
  detection heads, or the YOLOv3 head) trains. ``finetune`` trains the encoder as well.
* AdamW, betas (0.9, 0.999), weight decay 1e-6, no schedule; per label fraction as MGCA's scripts:
  1 % -> batch 8, lr 2e-4 (RSNA) / 2.5e-4 (Object-CXR); 10 % and 100 % -> batch 16, lr 5e-4. At most
  50 epochs, early stopping on the validation mAP (patience 10), the best weights are tested.
* No augmentation (the API turns ``data.augment`` off unless asked); NMS at IoU 0.5 (class-wise).

Metric: COCO mean average precision (torchmetrics, 101-point interpolation) averaged over the IoU
thresholds 0.40, 0.45, ..., 0.75. Two modes:

* ``standard`` (the headline ``map``): every test image; detections with a score of at least
  ``score_threshold`` (0.05; for ``yolov3`` the score is the objectness).
* ``mgca`` (``map_mgca``, quirk Q10): MGCA's evaluation - detections with a score of at least 0.5
  (MGCA's objectness threshold; NMS before or after this filter keeps the same detections),
  and only images with both such a detection and a true box (missed images and false alarms on
  images without a finding are not counted), which inflates mAP; use it to compare with the papers.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.downstream.task import Task, transfer_title
from medvlp.downstream.transfer import TransferModule, fit_transfer
from medvlp.registry import register_task

log = logging.getLogger(__name__)

PROTOCOLS = ("frozen", "finetune")
IOU_THRESHOLDS = tuple(round(0.40 + 0.05 * i, 2) for i in range(8))
MAP_MODES = ("standard", "mgca")
EXAMPLE_POOL = 64  # test images kept in memory to pick the overlay examples from
DETECTORS = ("fcos", "retinanet", "faster_rcnn", "yolov3")


@dataclass
class DetectorSettings:
    """Optimiser, stopping and inference settings (defaults: MGCA's 10 % / 100 % scripts)."""

    lr: float = 5e-4
    batch_size: int = 16
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    max_epochs: int = 50
    patience: int = 10
    max_steps: int = 0  # > 0: stop after this many optimiser steps (quick runs)
    min_steps: int = 0  # patience counts only after this many optimiser steps
    bn: str = "eval"  # frozen encoder's batch norms: eval (pre-training statistics) | train (batch statistics, MGCA's code)
    val_metric: str = "map"  # the validation score early stopping watches: map | map_mgca (MGCA's evaluation, as its code)
    score_threshold: float = 0.05  # detections kept for the standard mAP
    mgca_score_threshold: float = 0.5  # MGCA's objectness threshold (map_mgca)
    nms_iou: float = 0.5
    detections_per_image: int = 100
    detector: str = "fcos"  # fcos | retinanet | faster_rcnn | yolov3 (MGCA's head, CNN encoders)
    bf16: bool = True  # on CUDA: encoder + pyramid under bf16 autocast (heads and losses in fp32)
    pyramid_channels: int = 256  # width of every pyramid level (RPN and box head input); yolov3: the head's
    # width, branches 2x / 1x / 0.5x of it at strides 32 / 16 / 8 (256: MGCA's head, 512 / 256 / 128)
    box_head_dim: int = 1024  # width of the two-layer box head
    roi_samples: int = 512  # proposals sampled per training image for the box head
    rpn_proposals: int = 2000  # proposals kept after NMS per image in training (half at evaluation)

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            import difflib

            close = difflib.get_close_matches(str(self.detector), DETECTORS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"Unknown detection setting detector='{self.detector}'.{hint} Available: "
                             f"{', '.join(DETECTORS)} (yolov3: MGCA's YOLOv3 head, CNN encoders only).")
        if self.bn not in ("eval", "train"):
            raise ValueError(f"bn='{self.bn}' is not one of ('eval', 'train').")
        if self.val_metric not in ("map", "map_mgca"):
            raise ValueError(f"val_metric='{self.val_metric}' is not one of ('map', 'map_mgca').")


def settings_for(fraction: float = 1.0, data_name: str = "", **overrides: Any) -> DetectorSettings:
    """MGCA's per-fraction settings (1 %: batch 8 and lr 2e-4, 2.5e-4 for Object-CXR), then ``overrides``."""
    base = asdict(DetectorSettings())
    if fraction <= 0.01 + 1e-9:
        base.update(batch_size=8, lr=2.5e-4 if data_name == "object_cxr" else 2e-4)
    unknown = [k for k in overrides if k not in base]
    if unknown:
        raise ValueError(f"Unknown detection setting(s) {unknown}; known: {sorted(base)}.")
    return DetectorSettings(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


# ---------------------------------------------------------------------------------------------- metric
def detection_map(predictions: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], mode: str = "standard",
                  score_threshold: float = 0.0, iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
                  extended: bool = False) -> dict[str, Any]:
    """COCO mAP (torchmetrics, 101-point interpolation) averaged over ``iou_thresholds``.

    Args:
        predictions: per image ``{"boxes": [N, 4] xyxy, "scores": [N], "labels": [N]}``.
        targets: per image ``{"boxes": [M, 4] xyxy, "labels": [M]}``.
        mode: ``standard`` (every image) or ``mgca`` (only images with both a kept detection and a
            true box: MGCA's evaluation, quirk Q10).
        score_threshold: detections below it are dropped first.
        extended: also return the precision curves ``[T, 101]`` (class-averaged) for plots.

    Returns:
        ``{"map": float, "map_50": float, "n_images": int, "per_iou": {iou: AP}}`` (+ ``precision``);
        ``map`` is NaN when no image has a true box, and 0 when no image enters in ``mgca`` mode.
    """
    from torchmetrics.detection import MeanAveragePrecision

    if mode not in MAP_MODES:
        raise ValueError(f"mAP mode '{mode}' is not one of {MAP_MODES}.")
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images.")
    preds, truths = [], []
    for p, t in zip(predictions, targets, strict=True):
        keep = p["scores"] >= score_threshold
        kept = {"boxes": p["boxes"][keep].float(), "scores": p["scores"][keep].float(), "labels": p["labels"][keep].long()}
        truth = {"boxes": t["boxes"].float().reshape(-1, 4), "labels": t["labels"].long()}
        if mode == "mgca" and (len(kept["boxes"]) == 0 or len(truth["boxes"]) == 0):
            continue
        preds.append(kept)
        truths.append(truth)
    empty = {"map": float("nan"), "map_50": float("nan"), "n_images": len(preds), "per_iou": {}}
    if not any(len(t["boxes"]) for t in truths):
        return {**empty, "map": 0.0, "map_50": 0.0} if mode == "mgca" else empty
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=list(iou_thresholds),
                                  extended_summary=True, backend="pycocotools")
    metric.update(preds, truths)
    res = metric.compute()
    precision = res["precision"][:, :, :, 0, -1]  # [T, R, K] at area "all", max detections 100
    valid = precision > -1
    per_iou_curve = torch.where(valid, precision, torch.zeros_like(precision)).sum(2) / valid.sum(2).clamp(min=1)
    ap = per_iou_curve.mean(1)  # [T]
    out = {"map": float(res["map"]), "n_images": len(preds), "per_iou": {f"{t:.2f}": float(a) for t, a in zip(iou_thresholds, ap, strict=True)}}
    out["map_50"] = out["per_iou"].get("0.50", float("nan"))
    if extended:
        out["precision"] = per_iou_curve
    return out


# ---------------------------------------------------------------------------------------------- pyramids
def _backbone_autocast(images: Tensor, bf16: bool):
    """bf16 autocast for encoder + pyramid on CUDA; the detection heads, box decoding and losses run in
    fp32 (bf16 keeps 8 significant bits: box coordinates of a 1,024-pixel image would be off by 4 px)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and images.is_cuda)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet's)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def stage_indices(encoder: nn.Module, strides: tuple[int, ...]) -> list[int]:
    """Index in ``encoder.stages`` (timm's ``feature_info``) of the last stage at each of ``strides``
    (a ResNet: ``layer1`` ... ``layer4`` at 4 ... 32)."""
    stages = encoder.stages
    by_stride = {int(s["reduction"]): i for i, s in enumerate(stages)}  # the last stage of each stride
    missing = [s for s in strides if s not in by_stride]
    if missing:
        raise ValueError(f"{encoder.cfg.model} has no feature stage at stride(s) {missing}: "
                         f"{[(s['module'], s['reduction']) for s in stages]}.")
    return [by_stride[s] for s in strides]


class CNNPyramid(nn.Module):
    """Stages at strides 4-32 of a timm CNN + an FPN (+ max-pooled stride-64 level)."""

    def __init__(self, encoder: nn.Module, out_channels: int = 256, strides: tuple[int, ...] = (4, 8, 16, 32)) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.encoder = encoder
        stages = encoder.stages
        self.indices = stage_indices(encoder, strides)
        self.fpn = FeaturePyramidNetwork([int(stages[i]["num_chs"]) for i in self.indices], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.strides = (*strides, strides[-1] * 2)
        self.out_channels = out_channels
        self.train_encoder, self.bf16 = True, True

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        with _backbone_autocast(images, self.bf16):
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
                maps = self.encoder.pyramid(images, depth=max(self.indices) + 1)
            out = self.fpn(OrderedDict((str(k), maps[i]) for k, i in enumerate(self.indices)))
        return OrderedDict((k, v.float()) for k, v in out.items())


class ViTSimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid on the last patch-token map (scales 4, 2, 1, 0.5) + pooled level."""

    def __init__(self, encoder: nn.Module, out_channels: int = 256, scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)) -> None:
        super().__init__()
        self.encoder = encoder
        dim = int(encoder.local_dim)
        patch = int(encoder.model.patch_embed.patch_size[0])
        self.levels = nn.ModuleList()
        for scale in scales:
            if scale == 4.0:
                layers: list[nn.Module] = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                                           nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                c = dim // 4
            elif scale == 2.0:
                layers, c = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, c = [], dim
            elif scale == 0.5:
                layers, c = [nn.MaxPool2d(2, stride=2)], dim
            else:
                raise ValueError(f"simple feature pyramid scale {scale} is not one of 4, 2, 1, 0.5")
            layers += [nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.levels.append(nn.Sequential(*layers))
        self.strides = (*(int(patch / s) for s in scales), int(patch / scales[-1]) * 2)
        self.out_channels = out_channels
        self.train_encoder, self.bf16 = True, True

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        with _backbone_autocast(images, self.bf16):
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
                feats = self.encoder(images)
            h, w = feats.grid
            x = feats.tokens.transpose(1, 2).reshape(images.shape[0], -1, h, w)
            out = OrderedDict((str(k), level(x).float()) for k, level in enumerate(self.levels))
        out["pool"] = F.max_pool2d(out[str(len(self.levels) - 1)], 1, stride=2)
        return out


# ---------------------------------------------------------------------------------------------- detector
def build_detector(method: Any, in_channels: int, image_size: int, n_classes: int = 1,
                   settings: DetectorSettings | None = None) -> nn.Module:
    """The detector ``settings.detector`` on a copy of the run's image encoder (the method is unchanged):
    a torchvision detector over a feature pyramid (``fcos``, ``retinanet``, ``faster_rcnn``) or MGCA's
    YOLOv3 head on the encoder's stages (``yolov3``, ``medvlp.downstream.yolo.YOLODetector``). Every
    detector has ``backbone`` (with ``encoder``) and ``anchor_sizes``; class 0 is the background and
    dataset classes are 1..K."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    s = settings or DetectorSettings()
    if s.detector not in DETECTORS:
        raise ValueError(f"Unknown detection setting detector='{s.detector}'. Available: {', '.join(DETECTORS)}.")
    encoder = copy.deepcopy(method.export_encoder().module)
    if s.detector == "yolov3":
        from medvlp.downstream.yolo import build_yolov3

        return build_yolov3(encoder, n_classes, image_size, width=s.pyramid_channels, score_threshold=s.score_threshold,
                            nms_iou=s.nms_iou, detections_per_image=s.detections_per_image)
    if getattr(encoder, "is_vit", False) and hasattr(encoder, "model"):
        backbone: nn.Module = ViTSimplePyramid(encoder, s.pyramid_channels)
    elif hasattr(encoder, "pyramid"):
        backbone = CNNPyramid(encoder, s.pyramid_channels)
    else:
        raise ValueError(f"Detection transfer needs a 2D timm image encoder (CNN or ViT), got {type(encoder).__name__}.")
    common = dict(min_size=image_size, max_size=image_size, image_mean=[0.0] * in_channels, image_std=[1.0] * in_channels)
    if s.detector == "fcos":  # anchor-free: one location per pixel of each level, sized by its stride
        sizes = tuple((float(st),) for st in backbone.strides)
        anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((1.0,),) * len(sizes))
        model = FCOS(backbone, n_classes + 1, anchor_generator=anchors, score_thresh=s.score_threshold,
                     nms_thresh=s.nms_iou, detections_per_img=s.detections_per_image, **common)
    else:
        sizes = tuple(tuple(round(2 * st * 2 ** (k / 3), 1) for k in range(3)) for st in backbone.strides)
        anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
        if s.detector == "retinanet":
            model = RetinaNet(backbone, n_classes + 1, anchor_generator=anchors, score_thresh=s.score_threshold,
                              nms_thresh=s.nms_iou, detections_per_img=s.detections_per_image, **common)
        else:
            model = FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors,
                               box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2),
                               box_head=TwoMLPHead(s.pyramid_channels * 7 * 7, s.box_head_dim),
                               box_predictor=FastRCNNPredictor(s.box_head_dim, n_classes + 1),
                               box_score_thresh=s.score_threshold, box_nms_thresh=s.nms_iou,
                               box_detections_per_img=s.detections_per_image, box_batch_size_per_image=s.roi_samples,
                               rpn_pre_nms_top_n_train=s.rpn_proposals, rpn_post_nms_top_n_train=s.rpn_proposals,
                               rpn_pre_nms_top_n_test=s.rpn_proposals // 2, rpn_post_nms_top_n_test=s.rpn_proposals // 2,
                               **common)
    model.anchor_sizes = sizes
    return model


def _targets(batch: Any, device: torch.device) -> list[dict[str, Tensor]]:
    if batch.boxes is None:
        raise ValueError("The datamodule returns no boxes: set data.task=detection (RSNA, Object-CXR, NIH boxes).")
    return [{"boxes": b.float().reshape(-1, 4).to(device), "labels": (lab.long() + 1).to(device)}
            for b, lab in zip(batch.boxes, batch.box_labels, strict=True)]


def detection_step(model: nn.Module, batch: Any, device: torch.device) -> tuple[Tensor, dict[str, float]]:
    """The detector's summed losses of one batch (model in train mode) and each loss as a float."""
    losses = model(list(batch.images.to(device)), _targets(batch, device))
    total = sum(v.float() for v in losses.values())
    return total, {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def predict_boxes(model: nn.Module, loader: Any, device: torch.device,
                  keep_images: int = 0) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], list[Tensor]]:
    """``(predictions, targets, first images)`` of a split; labels back to 0-based classes (CPU)."""
    model.eval().to(device)
    preds, truths, images = [], [], []
    for batch in loader:
        out = model(list(batch.images.to(device)))
        for o in out:
            preds.append({"boxes": o["boxes"].float().cpu(), "scores": o["scores"].float().cpu(), "labels": o["labels"].cpu() - 1})
        truths += [{"boxes": b.float().reshape(-1, 4), "labels": lab.long()} for b, lab in zip(batch.boxes, batch.box_labels, strict=True)]
        if len(images) < keep_images:
            images += list(batch.images[:, 0].float())
    return preds, truths, images[:keep_images]


def mean_box_baseline(train_targets: list[Tensor], n_test: int, test_truths: list[dict[str, Tensor]],
                      score_threshold: float = 0.0) -> float:
    """mAP of predicting the mean training box, score 1, on every test image (a chance level)."""
    boxes = torch.cat([b.reshape(-1, 4) for b in train_targets]) if train_targets else torch.zeros(0, 4)
    if len(boxes) == 0:
        return float("nan")
    box = boxes.float().mean(0, keepdim=True)
    preds = [{"boxes": box, "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.long)} for _ in range(n_test)]
    return detection_map(preds, test_truths, "standard", score_threshold)["map"]


def run_detection(method: Any, dm: Any, protocol: str = "frozen", seed: int = 0, device: torch.device | None = None,
                  folder: Path | None = None, trainer_cfg: Any = None, **settings: Any) -> dict[str, Any] | None:
    """Train a detector (``settings["detector"]``) over the run's encoder on ``dm``'s boxes; test mAP.

    Returns:
        A JSON-ready dict (``map``, ``map_50``, ``map_mgca``, AP per IoU threshold, the mean-box
        baseline, the settings and the training history) plus ``examples`` (images, true and
        predicted boxes of a few test images) and ``precision`` (curves per IoU threshold); None on the
        processes other than rank 0 of a DDP run. Training runs on a ``Trainer`` (``trainer_cfg``) and
        writes ``checkpoints/best.ckpt`` and ``metrics.csv`` into ``folder``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol '{protocol}' is not one of {PROTOCOLS}.")
    s = settings_for(float(dm.cfg.label_fraction), str(dm.cfg.name), **settings)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = list(getattr(dm, "box_label_names", None) or ["finding"])
    torch.manual_seed(seed)
    model = build_detector(method, int(dm.cfg.channels), int(dm.cfg.image_size), len(names), s).to(device)
    model.backbone.bf16 = bool(s.bf16)
    frozen = protocol == "frozen"
    if frozen:
        model.backbone.train_encoder = False
        for p in model.backbone.encoder.parameters():
            p.requires_grad_(False)
    dm.cfg.batch_size = int(s.batch_size)
    start = time.perf_counter()
    train_boxes: list[Tensor] = []  # in network-input pixels, for the mean-box baseline (this process's share)
    last_losses: dict[str, float] = {}

    def loss(m: nn.Module, batch: Any) -> Tensor:
        total, parts = detection_step(m, batch, batch.images.device)
        last_losses.update(parts)
        if not math.isfinite(float(total.detach())):
            raise FloatingPointError(f"detection loss is {float(total.detach())} ({parts}); lower --lr.")
        return total

    def bookkeeping(module: Any, batch: Any, _loss: Tensor) -> None:
        if module.current_epoch == 0:
            train_boxes.extend(b.reshape(-1, 4).cpu() for b in batch.boxes or [])

    def val_items(m: nn.Module, batch: Any) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        preds = [{"boxes": o["boxes"].float().cpu(), "scores": o["scores"].float().cpu(), "labels": o["labels"].cpu() - 1}
                 for o in m(list(batch.images))]
        truths = [{"boxes": b.float().reshape(-1, 4).cpu(), "labels": lab.long().cpu()}
                  for b, lab in zip(batch.boxes, batch.box_labels, strict=True)]
        return list(zip(preds, truths, strict=True))

    def val_map(items: list[Any]) -> float:
        mode, threshold = ("mgca", s.mgca_score_threshold) if s.val_metric == "map_mgca" else ("standard", s.score_threshold)
        value = detection_map([p for p, _ in items], [t for _, t in items], mode, threshold)["map"]
        return 0.0 if math.isnan(value) else value

    module = TransferModule(model, loss, val_items, val_map, s.lr, s.betas, s.weight_decay,
                            frozen=model.backbone.encoder if frozen and s.bn == "eval" else None, monitor="val_map",
                            on_train_batch=bookkeeping)
    history, trainer = fit_transfer(module, dm.train_dataloader(), dm.val_dataloader(), folder, mode="max",
                                    patience=s.patience, max_epochs=s.max_epochs, max_steps=s.max_steps,
                                    trainer_cfg=trainer_cfg, seed=seed, min_steps=s.min_steps,
                                    extend_epochs=settings.get("max_epochs") is None)
    if not trainer.is_global_zero:
        return None
    history["last_losses"] = last_losses
    preds, truths, images = predict_boxes(model, dm.test_dataloader(), device, keep_images=EXAMPLE_POOL)
    standard = detection_map(preds, truths, "standard", s.score_threshold, extended=True)
    parity = detection_map(preds, truths, "mgca", s.mgca_score_threshold)
    baseline = mean_box_baseline(train_boxes, len(truths), truths)
    positive = [i for i, t in enumerate(truths) if len(t["boxes"])]
    pool = range(len(images))  # the overlay examples: images with a finding first, among the first EXAMPLE_POOL
    order = ([i for i in pool if i in set(positive)] + [i for i in pool if i not in set(positive)])[:4]
    return {"task": "detection", "protocol": protocol, "fraction": float(dm.cfg.label_fraction), "seed": seed,
            "detector": s.detector, "pyramid": type(model.backbone).__name__, "classes": names,
            "n_train": len(dm.records("train")), "n_test": len(truths), "n_test_positive": len(positive),
            "map": standard["map"], "map_50": standard["map_50"], "ap_per_iou": standard["per_iou"],
            "map_mgca": parity["map"], "map_mgca_images": parity["n_images"], "iou_thresholds": list(IOU_THRESHOLDS),
            "baseline_mean_box_map": baseline, "anchor_sizes": [list(a) for a in model.anchor_sizes],
            "settings": asdict(s), "history": history, "seconds": time.perf_counter() - start,
            "precision": standard.get("precision"),  # absent when no test image has a true box
            "examples": {"images": [images[i] for i in order], "truths": [truths[i]["boxes"] for i in order],
                         "predictions": [preds[i] for i in order]}}



@register_task("detection")
class DetectionTask(Task):
    """FCOS / RetinaNet / Faster R-CNN on a feature pyramid of the image encoder, or MGCA's YOLOv3 head (mAP)"""

    settings = ("lr", "batch_size", "weight_decay", "betas", "max_epochs", "patience", "max_steps", "min_steps", "detector",
                "pyramid_channels", "bn", "val_metric")

    def run(self, method: Any, dm: Any, protocol: str, seed: int, folder: Path, settings: dict[str, Any],
            trainer_cfg: Any = None) -> dict[str, Any] | None:
        from medvlp.downstream.plots import box_overlays_png, precision_recall_png

        res = run_detection(method, dm, protocol="frozen" if protocol == "linear" else protocol, seed=seed,
                            folder=folder, trainer_cfg=trainer_cfg, **settings)
        if res is None:
            return None
        ex, precision = res.pop("examples"), res.pop("precision", None)
        box_overlays_png(folder / "overlays.png", ex["images"], ex["truths"], ex["predictions"])
        res["files"] = {"overlays": str(folder / "overlays.png")}
        if precision is not None:
            precision_recall_png(folder / "precision_recall.png", precision, res["iou_thresholds"],
                                 title=f"{res['classes'][0] if len(res['classes']) == 1 else 'mean'}: mAP {res['map']:.3f}")
            res["files"]["precision_recall"] = str(folder / "precision_recall.png")
        return res

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        iou = res["iou_thresholds"]
        rows = [(f"mAP @ IoU {iou[0]:.2f}-{iou[-1]:.2f}, all test images", f"{res['map']:.3f}"),
                ("AP @ IoU 0.50", f"{res['map_50']:.3f}"),
                (f"MGCA's evaluation ({res['map_mgca_images']} images with a detection >= 0.5 and a true box)",
                 f"{res['map_mgca']:.3f}"),
                ("the mean training box on every image", f"{res['baseline_mean_box_map']:.3f}")]
        return transfer_title(res), rows, ("mAP", "")


__all__ = ["DETECTORS", "DetectionTask", "DetectorSettings", "IOU_THRESHOLDS", "PROTOCOLS", "build_detector", "detection_map", "mean_box_baseline",
           "predict_boxes", "run_detection", "settings_for", "stage_indices"]

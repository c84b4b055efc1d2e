"""MGCA's YOLOv3 detector (``detector=yolov3`` of the detection transfer, ``specs/methods/mgca.md`` §7.3).

Paper: MGCA, https://arxiv.org/abs/2210.06044 (detection protocol); head and loss from YOLOv3,
https://arxiv.org/abs/1804.02767, as MGCA's code builds them (``mgca/models/ssl_detector.py``,
``mgca/utils/yolo_loss.py``, ``mgca/utils/detection_utils.py``).

* Taps: the encoder's last stages at strides 8 / 16 / 32 (``layer2`` / ``layer3`` / ``layer4`` of a
  ResNet: 512 / 1024 / 2048 channels, 28 / 14 / 7 cells at 224 px for ResNet-50); the head takes the
  channels the encoder has (a demo ResNet has fewer).
* Head: three Darknet branches of conv-BN-LeakyReLU(0.1) blocks, coarsest first: five blocks
  alternating 1x1 (``c``) and 3x3 (``2c``) convolutions, a 3x3 block and a 1x1 output convolution with a
  bias; the fifth block's output goes through a 1x1 block (``c / 2``), a x2 nearest upsampling and is
  concatenated with the next finer tap. ``c`` = 512 / 256 / 128 at strides 32 / 16 / 8 (``width`` = 256).
  Each map has ``3 * (5 + K)`` channels, anchor-major: ``(x, y, w, h, objectness, K class scores)``.
* Anchors: YOLOv3's COCO anchors in pixels of a 416-px input, scaled by ``image_size / 416`` (224 / 416
  for MGCA); the three largest on the stride-32 map, the three smallest on the stride-8 map.
* Loss per map (summed over the maps): every true box is assigned, on every map, to the cell of its
  centre and to the map's anchor whose shape (width, height) overlaps it best; the map's anchors whose
  shape IoU with the box exceeds ``ignore_iou`` (0.5) are left out of the no-object term at that cell.
  Terms, each a mean over all cells and anchors of the batch (as ``nn.BCELoss`` / ``nn.MSELoss`` of the
  masked tensors): BCE of sigmoid(x), sigmoid(y) against the centre's offset in its cell; MSE of the raw
  w, h against ``log(box / anchor)``; objectness BCE, ``-log p`` at the assigned anchors plus
  ``0.5 * -log(1 - p)`` at the not-ignored ones; class BCE at the assigned anchors. Weights (``YoloLossWeights``):
  xy 2.5, wh 2.5, objectness 1, class 1.
* Inference: boxes ``((sigmoid(x) + i) * stride, (sigmoid(y) + j) * stride, anchor * exp(w), anchor *
  exp(h))``, score = objectness, label = the most likely class; detections with a score of at least the
  threshold (MGCA: 0.5) go through class-wise NMS at IoU 0.5. The detection task keeps detections down
  to its ``score_threshold`` (0.05) for its standard mAP; its ``mgca`` mAP mode keeps those >= 0.5,
  the official detections (NMS cannot let a lower score remove a higher one).

Settings (``medvlp.downstream.detection.DetectorSettings``): ``detector=yolov3``, ``pyramid_channels``
(the head's ``width``; 256 is MGCA's head), ``score_threshold``, ``nms_iou``, ``detections_per_image``,
``bf16``.

Differences from the official code (``mgca/utils/yolo_loss.py``, ``mgca/utils/detection_utils.py``):

* The BCE terms are computed from the logits (``binary_cross_entropy_with_logits``), the same values
  without ``nn.BCELoss``'s clamp of ``log`` at -100 (it only differs for saturated sigmoids in fp32).
* A box centre on the right or bottom image border goes to the last cell (the official code indexes
  past the grid); boxes with no width or height are skipped (the official code only skips all-zero
  padding rows and would regress towards ``log(1e-16)``).
* When two boxes fall on the same cell and anchor the last one's offsets win, as in the official
  loop; the one-hot class targets accumulate there as they do.
* NMS is torchvision's, on the official pixel-inclusive IoU (``+1`` on widths and heights), but it
  suppresses above rather than at the threshold; at most ``detections_per_image`` (100, COCO's
  evaluation limit) are kept per image.
* The decoded w, h logits are clipped at ``log(1000 / 16)`` (torchvision's box-coder clip), which
  only keeps an untrained head's boxes finite.
* The upsampling goes to the next tap's size (x2 for inputs that are multiples of 32, as the
  official ``nn.Upsample(scale_factor=2)``), so other input sizes work as well.
* The official head runs in fp32; here the encoder may run under bf16 autocast on CUDA
  (``settings.bf16``), the head, box decoding and loss always in fp32.

Kept from the official code (quirks): the anchor-shape IoU used for the assignment and the ignore rule
adds 1 to widths and heights (a pixel-inclusive IoU) although it is computed in cells of the map; the
ignore rule looks at anchor shapes, not predicted boxes (YOLOv3's paper ignores predictions that
overlap a box by more than 0.5); the assigned anchor stays in the no-object term unless its shape IoU
exceeds 0.5; every map gets every box (YOLOv3 assigns a box to one anchor among all nine).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.downstream.detection import _backbone_autocast, stage_indices

YOLO_STRIDES = (8, 16, 32)
ANCHOR_REFERENCE_SIZE = 416  # YOLOv3's COCO anchors are in pixels of a 416-px input
# YOLOv3's COCO anchors (width, height) in pixels of a 416-px input, by the stride of the map that uses them
YOLO_ANCHORS: dict[int, tuple[tuple[int, int], ...]] = {
    8: ((10, 13), (16, 30), (33, 23)),
    16: ((30, 61), (62, 45), (59, 119)),
    32: ((116, 90), (156, 198), (373, 326)),
}
WH_LOGIT_CLIP = math.log(1000.0 / 16)


def yolo_anchors(image_size: float = 224) -> dict[int, tuple[tuple[float, float], ...]]:
    """:data:`YOLO_ANCHORS` scaled to an ``image_size``-pixel input (``* image_size / 416``; MGCA: 224)."""
    scale = float(image_size) / ANCHOR_REFERENCE_SIZE
    return {stride: tuple((w * scale, h * scale) for w, h in pairs) for stride, pairs in YOLO_ANCHORS.items()}


@dataclass(frozen=True)
class YoloLossWeights:
    """Weights of the YOLO loss terms and the ignore threshold (MGCA's ``YOLOLoss``)."""

    xy: float = 2.5  # each of the x and y offset BCEs
    wh: float = 2.5  # each of the w and h MSEs
    objectness: float = 1.0
    classification: float = 1.0
    no_object: float = 0.5  # the no-object part of the objectness term (a constant in the official code)
    ignore_iou: float = 0.5  # anchors whose shape IoU with a box exceeds it leave the no-object term


# ---------------------------------------------------------------------------------------------- head
def conv_bn_leaky(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """Darknet's block: convolution (no bias, same padding), batch norm, LeakyReLU(0.1)."""
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(c_in, c_out, kernel, padding=(kernel - 1) // 2, bias=False)),
                                      ("bn", nn.BatchNorm2d(c_out)), ("act", nn.LeakyReLU(0.1))]))


class YOLOBranch(nn.Module):
    """One YOLOv3 output branch: 1x1 / 3x3 / 1x1 / 3x3 / 1x1 blocks (``width``, ``2 * width``), whose
    output is also returned for the next finer branch, then a 3x3 block and the 1x1 output convolution."""

    def __init__(self, in_channels: int, width: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_leaky(in_channels, width, 1), conv_bn_leaky(width, 2 * width, 3),
                                  conv_bn_leaky(2 * width, width, 1), conv_bn_leaky(width, 2 * width, 3),
                                  conv_bn_leaky(2 * width, width, 1))
        self.out = nn.Sequential(conv_bn_leaky(width, 2 * width, 3), nn.Conv2d(2 * width, out_channels, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        route = self.body(x)
        return self.out(route), route


class YOLOv3Head(nn.Module):
    """MGCA's YOLOv3 head over three taps at strides 8 / 16 / 32.

    Follows ``ModelMain`` of ``mgca/models/ssl_detector.py``: the stride-32 branch (width ``2 * width``)
    runs first; its route goes through a 1x1 block to ``width`` channels, is upsampled x2 (nearest) and
    concatenated with the stride-16 tap (upsampled channels first) as the stride-16 branch's input, and
    likewise from the stride-16 branch (width ``width``) through a 1x1 block to ``width / 2`` channels
    into the stride-8 branch (width ``width / 2``). ``width=256`` is the official head (branches 512 /
    256 / 128, lateral blocks 256 / 128).

    Args:
        in_channels: channels of the taps at strides 8, 16, 32 (ResNet-50: 512, 1024, 2048).
        n_classes: K; every map has ``n_anchors * (5 + K)`` channels (18 for one class).
        n_anchors: anchors per map (3).
        width: the stride-16 branch's width.
    """

    def __init__(self, in_channels: Sequence[int], n_classes: int = 1, n_anchors: int = 3, width: int = 256) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"The YOLOv3 head takes three taps (strides 8, 16, 32), got channels {list(in_channels)}.")
        if width < 2 or width % 2:
            raise ValueError(f"YOLOv3 head width {width} must be an even number >= 2 (256 is MGCA's head).")
        c8, c16, c32 = (int(c) for c in in_channels)
        n_out = n_anchors * (5 + n_classes)
        self.in_channels, self.n_classes, self.n_anchors, self.width = (c8, c16, c32), n_classes, n_anchors, width
        self.branch32 = YOLOBranch(c32, 2 * width, n_out)
        self.lateral16 = conv_bn_leaky(2 * width, width, 1)
        self.branch16 = YOLOBranch(c16 + width, width, n_out)
        self.lateral8 = conv_bn_leaky(width, width // 2, 1)
        self.branch8 = YOLOBranch(c8 + width // 2, width // 2, n_out)

    def forward(self, taps: Sequence[Tensor]) -> list[Tensor]:
        """Raw maps ``[B, A * (5 + K), H_s, W_s]`` for the strides 8, 16, 32 (finest first) from the taps
        ``[B, C_s, H_s, W_s]`` in the same order."""
        x8, x16, x32 = taps
        out32, route = self.branch32(x32)
        up = F.interpolate(self.lateral16(route), size=x16.shape[-2:], mode="nearest")
        out16, route = self.branch16(torch.cat([up, x16], 1))
        up = F.interpolate(self.lateral8(route), size=x8.shape[-2:], mode="nearest")
        out8, _ = self.branch8(torch.cat([up, x8], 1))
        return [out8, out16, out32]


# ---------------------------------------------------------------------------------------------- loss
@dataclass
class YoloTargets:
    """The targets of one map, each ``[B, A, H, W]`` (``cls``: ``[B, A, H, W, K]``)."""

    mask: Tensor  # 1 at the anchor and cell each box is assigned to
    no_object: Tensor  # 1 where the no-object term applies
    tx: Tensor  # centre offsets in the cell, in [0, 1)
    ty: Tensor
    tw: Tensor  # log(box / anchor)
    th: Tensor
    cls: Tensor  # one-hot classes at the assigned anchors


def anchor_shape_iou(box_wh: Tensor, anchor_wh: Tensor) -> Tensor:
    """IoU ``[M, A]`` of boxes ``[M, 2]`` and anchors ``[A, 2]`` (widths and heights, in cells) placed at
    the same corner, with the official code's ``+1`` on every side length."""
    inter = (torch.minimum(box_wh[:, None, 0], anchor_wh[None, :, 0]) + 1) * \
        (torch.minimum(box_wh[:, None, 1], anchor_wh[None, :, 1]) + 1)
    area_box = ((box_wh[:, 0] + 1) * (box_wh[:, 1] + 1))[:, None]
    area_anchor = ((anchor_wh[:, 0] + 1) * (anchor_wh[:, 1] + 1))[None, :]
    return inter / (area_box + area_anchor - inter + 1e-16)


def build_targets(targets: Sequence[dict[str, Tensor]], anchors: Sequence[tuple[float, float]], grid: tuple[int, int],
                  image_size: tuple[int, int], n_classes: int, ignore_iou: float = 0.5,
                  device: torch.device | None = None) -> YoloTargets:
    """The targets of one map (``mgca/utils/yolo_loss.py``, ``YOLOLoss.get_target``).

    Args:
        targets: per image ``{"boxes": [M, 4] xyxy pixels, "labels": [M] 0-based classes}``.
        anchors: the map's anchors ``(w, h)`` in pixels.
        grid: ``(H, W)`` cells of the map; image_size: ``(height, width)`` of the input in pixels.
    """
    bs, n_a = len(targets), len(anchors)
    (gh_cells, gw_cells), (img_h, img_w) = grid, image_size
    device = device or (targets[0]["boxes"].device if targets else torch.device("cpu"))
    shape = (bs, n_a, gh_cells, gw_cells)
    out = YoloTargets(mask=torch.zeros(shape, device=device), no_object=torch.ones(shape, device=device),
                      tx=torch.zeros(shape, device=device), ty=torch.zeros(shape, device=device),
                      tw=torch.zeros(shape, device=device), th=torch.zeros(shape, device=device),
                      cls=torch.zeros(*shape, n_classes, device=device))
    per_image = [t["boxes"].reshape(-1, 4).float().to(device) for t in targets]
    if not sum(len(b) for b in per_image):
        return out
    boxes = torch.cat(per_image)
    labels = torch.cat([t["labels"].reshape(-1).long().to(device) for t in targets])
    img = torch.repeat_interleave(torch.arange(bs, device=device), torch.tensor([len(b) for b in per_image], device=device))
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh > 0).all(1)
    img, boxes, labels, wh = img[keep], boxes[keep], labels[keep], wh[keep]
    if len(img) == 0:
        return out
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"YOLO targets: class labels must be in [0, {n_classes}), got {labels.unique().tolist()}.")
    cells = torch.tensor([gw_cells / img_w, gh_cells / img_h], device=device)  # pixels -> cells
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 * cells  # (gx, gy)
    size = wh * cells  # (gw, gh)
    col = centre[:, 0].long().clamp(0, gw_cells - 1)
    row = centre[:, 1].long().clamp(0, gh_cells - 1)
    anchor_cells = torch.tensor(anchors, dtype=torch.float32, device=device) * cells
    iou = anchor_shape_iou(size, anchor_cells)  # [M, A]
    best = iou.argmax(1)
    ignored = (iou > ignore_iou).nonzero()  # (box, anchor)
    if len(ignored):
        k, a = ignored[:, 0], ignored[:, 1]
        out.no_object[img[k], a, row[k], col[k]] = 0.0
    out.mask[img, best, row, col] = 1.0
    out.cls[img, best, row, col, labels] = 1.0
    # offsets: the last box of a cell and anchor wins (the official loop's order)
    last: dict[tuple[int, int, int, int], int] = {}
    for i, key in enumerate(zip(img.tolist(), best.tolist(), row.tolist(), col.tolist(), strict=True)):
        last[key] = i
    sel = torch.tensor(list(last.values()), device=device)
    at = (img[sel], best[sel], row[sel], col[sel])
    out.tx[at] = centre[sel, 0] - col[sel].float()
    out.ty[at] = centre[sel, 1] - row[sel].float()
    out.tw[at] = torch.log(size[sel, 0] / anchor_cells[best[sel], 0] + 1e-16)
    out.th[at] = torch.log(size[sel, 1] / anchor_cells[best[sel], 1] + 1e-16)
    return out


def split_prediction(raw: Tensor, n_anchors: int) -> Tensor:
    """A raw map ``[B, A * (5 + K), H, W]`` as ``[B, A, H, W, 5 + K]`` (anchor-major channels)."""
    b, c, h, w = raw.shape
    return raw.view(b, n_anchors, c // n_anchors, h, w).permute(0, 1, 3, 4, 2)


def yolo_map_loss(raw: Tensor, targets: Sequence[dict[str, Tensor]], anchors: Sequence[tuple[float, float]],
                  image_size: tuple[int, int], n_classes: int,
                  weights: YoloLossWeights = YoloLossWeights()) -> dict[str, Tensor]:
    """The weighted loss terms of one map (``YOLOLoss.forward`` with targets).

    Args:
        raw: the head's map ``[B, A * (5 + K), H, W]``.
        targets: per image ``{"boxes": [M, 4] xyxy pixels, "labels": [M] 0-based}``.
        anchors: the map's anchors in pixels; image_size: ``(height, width)``.

    Returns:
        ``{"xy", "wh", "objectness", "classification"}``: the weighted terms (their sum is the loss).
    """
    p = split_prediction(raw.float(), len(anchors))
    t = build_targets(targets, anchors, (int(raw.shape[2]), int(raw.shape[3])), image_size, n_classes,
                      weights.ignore_iou, device=raw.device)
    m = t.mask

    def bce(logit: Tensor, target: Tensor, where: Tensor) -> Tensor:
        return (F.binary_cross_entropy_with_logits(logit, target, reduction="none") * where).mean()

    loss_x = bce(p[..., 0], t.tx, m)
    loss_y = bce(p[..., 1], t.ty, m)
    loss_w = (m * (p[..., 2] - t.tw) ** 2).mean()
    loss_h = (m * (p[..., 3] - t.th) ** 2).mean()
    loss_obj = bce(p[..., 4], torch.ones_like(m), m) + weights.no_object * bce(p[..., 4], torch.zeros_like(m), t.no_object)
    loss_cls = bce(p[..., 5:], t.cls, m[..., None].expand_as(t.cls))
    return {"xy": weights.xy * (loss_x + loss_y), "wh": weights.wh * (loss_w + loss_h),
            "objectness": weights.objectness * loss_obj, "classification": weights.classification * loss_cls}


def yolo_loss(outputs: Sequence[Tensor], targets: Sequence[dict[str, Tensor]],
              anchors: Sequence[Sequence[tuple[float, float]]], image_size: tuple[int, int], n_classes: int,
              weights: YoloLossWeights = YoloLossWeights()) -> dict[str, Tensor]:
    """The YOLO loss terms summed over the maps (``outputs`` and ``anchors`` in the same order)."""
    total: dict[str, Tensor] = {}
    for raw, map_anchors in zip(outputs, anchors, strict=True):
        for k, v in yolo_map_loss(raw, targets, map_anchors, image_size, n_classes, weights).items():
            total[k] = total[k] + v if k in total else v
    return total


# ---------------------------------------------------------------------------------------------- inference
def decode(outputs: Sequence[Tensor], anchors: Sequence[Sequence[tuple[float, float]]],
           image_size: tuple[int, int]) -> Tensor:
    """Every anchor of every map as ``[B, N, 5 + K]``: ``(cx, cy, w, h)`` in pixels, objectness and class
    probabilities (``YOLOLoss.forward`` without targets), maps in the order given, anchor-major within a map."""
    img_h, img_w = image_size
    rows = []
    for raw, map_anchors in zip(outputs, anchors, strict=True):
        p = split_prediction(raw.float(), len(map_anchors))
        _, _, h, w, _ = p.shape
        stride_x, stride_y = img_w / w, img_h / h
        ys, xs = torch.meshgrid(torch.arange(h, device=raw.device, dtype=torch.float32),
                                torch.arange(w, device=raw.device, dtype=torch.float32), indexing="ij")
        anchor = torch.tensor(map_anchors, dtype=torch.float32, device=raw.device)[None, :, None, None]  # [1, A, 1, 1, 2]
        cx = (torch.sigmoid(p[..., 0]) + xs) * stride_x
        cy = (torch.sigmoid(p[..., 1]) + ys) * stride_y
        wh = torch.exp(p[..., 2:4].clamp(max=WH_LOGIT_CLIP)) * anchor
        box = torch.cat([cx[..., None], cy[..., None], wh, torch.sigmoid(p[..., 4:])], -1)
        rows.append(box.reshape(p.shape[0], -1, p.shape[-1]))
    return torch.cat(rows, 1)


def postprocess(decoded: Tensor, conf_threshold: float = 0.5, nms_iou: float = 0.5,
                max_detections: int = 100) -> list[dict[str, Tensor]]:
    """Detections per image ``{"boxes": [N, 4] xyxy pixels, "scores": [N] objectness, "labels": [N]
    0-based}``: objectness >= ``conf_threshold`` (MGCA: 0.5), class-wise NMS at ``nms_iou`` (the official
    pixel-inclusive IoU: ``+1`` on widths and heights), best first."""
    from torchvision.ops import batched_nms

    out = []
    for det in decoded:
        det = det[det[:, 4] >= conf_threshold]
        boxes = torch.cat([det[:, :2] - det[:, 2:4] / 2, det[:, :2] + det[:, 2:4] / 2], 1)
        scores = det[:, 4]
        labels = det[:, 5:].argmax(1) if det.shape[1] > 5 else torch.zeros(len(det), dtype=torch.long, device=det.device)
        inclusive = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)  # the official pixel-inclusive IoU
        keep = batched_nms(inclusive, scores, labels, nms_iou)[:max_detections]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


# ---------------------------------------------------------------------------------------------- detector
class StageTaps(nn.Module):
    """The encoder's last stages at ``strides`` (a ResNet's ``layer2`` ... ``layer4``), finest first, in fp32."""

    def __init__(self, encoder: nn.Module, strides: tuple[int, ...] = YOLO_STRIDES) -> None:
        super().__init__()
        self.encoder = encoder
        self.indices = stage_indices(encoder, strides)
        self.channels = tuple(int(encoder.stages[i]["num_chs"]) for i in self.indices)
        self.strides = tuple(strides)
        self.train_encoder, self.bf16 = True, True

    def forward(self, images: Tensor) -> list[Tensor]:
        with _backbone_autocast(images, self.bf16):
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
                maps = self.encoder.pyramid(images, depth=max(self.indices) + 1)
        return [maps[i].float() for i in self.indices]


class YOLODetector(nn.Module):
    """Encoder taps + :class:`YOLOv3Head`, with the torchvision detectors' interface.

    Train mode: ``model(images, targets)`` -> ``{"xy", "wh", "objectness", "classification"}`` (weighted
    terms summed over the maps); eval mode: ``model(images)`` -> per image ``{"boxes": [N, 4] xyxy
    pixels, "scores": [N], "labels": [N]}``. ``images``: a list of ``[C, H, W]`` of one size or a batch
    ``[B, C, H, W]``, normalised; ``targets``: per image ``{"boxes": [M, 4] xyxy pixels, "labels": [M]}``.
    Labels are 1..K in and out (0 is the background of the torchvision detectors).

    Args:
        backbone: the taps at strides 8 / 16 / 32 (:class:`StageTaps`).
        n_classes: K.
        image_size: the input size the anchors are scaled to (``yolo_anchors``).
        width: the head's width (:class:`YOLOv3Head`; 256 is MGCA's).
        score_threshold: the objectness kept at inference (MGCA: 0.5; the detection task keeps 0.05 for
            its standard mAP and applies 0.5 in its ``mgca`` mAP mode).
        nms_iou, detections_per_image: NMS IoU (0.5) and the most detections kept per image.
    """

    def __init__(self, backbone: StageTaps, n_classes: int = 1, image_size: int = 224, width: int = 256,
                 weights: YoloLossWeights | None = None, score_threshold: float = 0.5, nms_iou: float = 0.5,
                 detections_per_image: int = 100) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_classes = int(n_classes)
        self.head = YOLOv3Head(backbone.channels, self.n_classes, 3, width)
        by_stride = yolo_anchors(image_size)
        self.anchor_sizes = tuple(by_stride[s] for s in backbone.strides)  # per map, finest first
        self.weights = weights or YoloLossWeights()
        self.score_threshold, self.nms_iou, self.detections_per_image = score_threshold, nms_iou, detections_per_image

    def forward(self, images: Sequence[Tensor] | Tensor,
                targets: Sequence[dict[str, Tensor]] | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        x = torch.stack(list(images)) if not isinstance(images, Tensor) else images
        if self.training and targets is None:
            raise ValueError("YOLODetector in train mode needs targets (model(images, targets)); call model.eval() to predict.")
        taps = self.backbone(x)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        with torch.autocast(x.device.type, enabled=False):
            outputs = self.head(taps)
            if self.training:
                zero_based = [{"boxes": t["boxes"], "labels": t["labels"].long() - 1} for t in targets or []]
                return yolo_loss(outputs, zero_based, self.anchor_sizes, size, self.n_classes, self.weights)
            found = postprocess(decode(outputs, self.anchor_sizes, size), self.score_threshold, self.nms_iou,
                                self.detections_per_image)
        return [{**d, "labels": d["labels"] + 1} for d in found]


def build_yolov3(encoder: nn.Module, n_classes: int = 1, image_size: int = 224, width: int = 256,
                 score_threshold: float = 0.5, nms_iou: float = 0.5, detections_per_image: int = 100) -> YOLODetector:
    """A :class:`YOLODetector` on ``encoder``'s stage taps; a clear error for encoders without stages."""
    if getattr(encoder, "is_vit", False) or not hasattr(encoder, "pyramid"):
        name = getattr(getattr(encoder, "cfg", None), "model", type(encoder).__name__)
        raise ValueError(f"detector=yolov3 needs a CNN encoder with stage outputs at strides 8 / 16 / 32 (a ResNet's "
                         f"layer2-4); this run's image encoder '{name}' has none (a ViT). Use detector=fcos, retinanet "
                         f"or faster_rcnn, which build a feature pyramid on a ViT.")
    return YOLODetector(StageTaps(encoder), n_classes, image_size, width, score_threshold=score_threshold,
                        nms_iou=nms_iou, detections_per_image=detections_per_image)


__all__ = ["ANCHOR_REFERENCE_SIZE", "StageTaps", "YOLOBranch", "YOLODetector", "YOLOv3Head", "YOLO_ANCHORS", "YOLO_STRIDES",
           "YoloLossWeights", "YoloTargets", "anchor_shape_iou", "build_targets", "build_yolov3", "decode", "postprocess",
           "yolo_anchors", "yolo_loss", "yolo_map_loss"]

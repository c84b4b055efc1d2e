"""Small PNG plots drawn with Pillow (no plotting library needed): ROC and precision-recall curves, mask
and box overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvlp.downstream.metrics import roc_curve

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _axes(size: int, margin: int, title: str, xlabel: str, legend_width: int = 220):
    """A white canvas with a unit square frame, tick labels and a title; ``xy`` maps [0, 1]^2 to pixels."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size + 2 * margin + legend_width, size + 2 * margin), "white")
    d = ImageDraw.Draw(img)

    def xy(x: float, y: float) -> tuple[float, float]:
        return margin + x * size, margin + (1 - y) * size

    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for t in (0.25, 0.5, 0.75):
        d.text((xy(t, 0)[0] - 8, margin + size + 4), f"{t:.2f}", fill="black")
        d.text((4, xy(0, t)[1] - 6), f"{t:.2f}", fill="black")
    d.text((margin + size / 2 - 60, margin + size + 20), xlabel, fill="black")
    d.text((margin, 8), title, fill="black")
    return img, d, xy


def roc_png(path: str | Path, scores: np.ndarray, labels: np.ndarray, names: list[str], aucs: dict[str, float],
            title: str = "") -> Path:
    """ROC curves of every label on one chart (``scores`` / ``labels`` ``[N, K]``; -1 = unknown label)."""
    size, margin = 420, 40
    img, d, xy = _axes(size, margin, title or "ROC", "false positive rate")
    d.line([xy(0, 0), xy(1, 1)], fill=(200, 200, 200))
    lab = np.asarray(labels, dtype=np.float64)
    lab[lab < 0] = np.nan
    for i, name in enumerate(names):
        fpr, tpr = roc_curve(np.asarray(scores)[:, i], lab[:, i])
        colour = COLOURS[i % len(COLOURS)]
        d.line([xy(a, b) for a, b in zip(fpr, tpr, strict=True)], fill=colour, width=2)
        auc = aucs.get(name, float("nan"))
        d.text((margin * 2 + size, margin + 16 * i), f"{name[:22]}  {auc:.3f}", fill=colour)
    img.save(path)
    return Path(path)


def precision_recall_png(path: str | Path, precision: Any, iou_thresholds: list[float], title: str = "") -> Path:
    """Interpolated precision over the 101 COCO recall points, one curve per IoU threshold
    (``precision`` ``[T, 101]``), with each curve's AP in the legend."""
    size, margin = 420, 40
    img, d, xy = _axes(size, margin, title or "precision-recall", "recall")
    prec = np.asarray(precision, dtype=np.float64)
    recall = np.linspace(0, 1, prec.shape[1])
    for i, (curve, iou) in enumerate(zip(prec, iou_thresholds, strict=True)):
        colour = COLOURS[i % len(COLOURS)]
        d.line([xy(r, max(p, 0.0)) for r, p in zip(recall, curve, strict=True)], fill=colour, width=2)
        d.text((margin * 2 + size, margin + 16 * i), f"IoU {iou:.2f}  AP {float(np.clip(curve, 0, None).mean()):.3f}", fill=colour)
    img.save(path)
    return Path(path)


def mask_overlays_png(path: str | Path, images: Any, truths: Any, predictions: Any, threshold: float = 0.5) -> Path:
    """One row per example: the image, the true mask (green) and the predicted mask (red) over it."""
    from PIL import Image

    rows = []
    for img, t, p in zip(images, truths, predictions, strict=True):
        g = np.asarray(img, dtype=np.float32)
        g = ((g - g.min()) / max(float(g.max() - g.min()), 1e-6) * 255).astype(np.uint8)
        base = np.stack([g] * 3, axis=-1)
        true = base.copy()
        true[np.asarray(t) > 0.5] = (0.5 * true[np.asarray(t) > 0.5] + [0, 127, 0]).astype(np.uint8)
        pred = base.copy()
        pred[np.asarray(p) > threshold] = (0.5 * pred[np.asarray(p) > threshold] + [127, 0, 0]).astype(np.uint8)
        rows.append(np.concatenate([base, true, pred], axis=1))
    if not rows:
        raise ValueError("no examples to draw")
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 256 // grid.shape[1] * 3)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return Path(path)


def box_overlays_png(path: str | Path, images: Any, truths: Any, predictions: Any, threshold: float = 0.5,
                     scale: int = 0) -> Path:
    """One tile per example: the image with its true boxes (green) and the predicted boxes with a score
    of at least ``threshold`` (red, the score beside each)."""
    from PIL import Image, ImageDraw

    tiles = []
    for img, t, p in zip(images, truths, predictions, strict=True):
        g = np.asarray(img, dtype=np.float32)
        g = ((g - g.min()) / max(float(g.max() - g.min()), 1e-6) * 255).astype(np.uint8)
        k = scale or max(1, 256 // max(g.shape))
        tile = Image.fromarray(g).convert("RGB").resize((g.shape[1] * k, g.shape[0] * k), Image.NEAREST)
        d = ImageDraw.Draw(tile)
        for box in np.asarray(t, dtype=np.float32).reshape(-1, 4):
            d.rectangle([float(v) * k for v in box], outline=(0, 200, 0), width=2)
        boxes, scores = np.asarray(p["boxes"], dtype=np.float32).reshape(-1, 4), np.asarray(p["scores"], dtype=np.float32)
        for box, score in zip(boxes, scores, strict=True):
            if score >= threshold:
                d.rectangle([float(v) * k for v in box], outline=(220, 0, 0), width=2)
                d.text((float(box[0]) * k + 2, float(box[1]) * k + 2), f"{score:.2f}", fill=(220, 0, 0))
        tiles.append(tile)
    if not tiles:
        raise ValueError("no examples to draw")
    out = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        out.paste(tile, (x, 0))
        x += tile.width
    out.save(path)
    return Path(path)


__all__ = ["box_overlays_png", "mask_overlays_png", "precision_recall_png", "roc_png"]

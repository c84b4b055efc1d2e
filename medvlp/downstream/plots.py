"""Small PNG plots drawn with Pillow (no plotting library needed): ROC curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvlp.downstream.metrics import roc_curve

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def roc_png(path: str | Path, scores: np.ndarray, labels: np.ndarray, names: list[str], aucs: dict[str, float],
            title: str = "") -> Path:
    """ROC curves of every label on one chart (``scores`` / ``labels`` ``[N, K]``; -1 = unknown label)."""
    from PIL import Image, ImageDraw

    size, margin = 420, 40
    img = Image.new("RGB", (size + 2 * margin + 220, size + 2 * margin), "white")
    d = ImageDraw.Draw(img)

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * size, margin + (1 - tpr) * size

    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(200, 200, 200))
    for t in (0.25, 0.5, 0.75):
        d.text((xy(t, 0)[0] - 8, margin + size + 4), f"{t:.2f}", fill="black")
        d.text((4, xy(0, t)[1] - 6), f"{t:.2f}", fill="black")
    d.text((margin + size / 2 - 60, margin + size + 20), "false positive rate", fill="black")
    d.text((margin, 8), title or "ROC", fill="black")
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


__all__ = ["mask_overlays_png", "roc_png"]

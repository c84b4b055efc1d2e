"""Metrics with exact, dependency-free definitions (checked against hand-computed values)."""

from __future__ import annotations

import numpy as np


def _known(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Scores and boolean targets of the items whose target is known (not NaN), and the class counts."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    keep = ~np.isnan(targets)
    scores, targets = scores[keep], targets[keep] > 0.5
    return scores, targets, int(targets.sum()), int((~targets).sum())


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half). NaN targets are ignored.

    Returns NaN when only one class is present.
    """
    scores, targets, n_pos, n_neg = _known(scores, targets)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < len(sorted_scores):
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[targets].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of ``pred`` equal to ``target`` (class indices); NaN for no items."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    return float((pred == target).mean()) if len(pred) else float("nan")


def roc_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(false positive rates, true positive rates)`` over every threshold, from (0, 0) to (1, 1)
    (NaN targets ignored; ties move both rates at once)."""
    scores, targets, n_pos, n_neg = _known(scores, targets)
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of every distinct score
    tps, fps = np.cumsum(t)[last], np.cumsum(~t)[last]
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def youden_like_threshold(probs: np.ndarray, targets: np.ndarray, grid: int = 100, strict: bool = False) -> float:
    """The threshold in ``linspace(0, 1, grid)`` closest to the ROC's ideal corner: the minimum of
    ``sqrt((1 - TPR)^2 + FPR^2)`` (fVLM / HLIP, chosen on the evaluated set itself).

    ``strict=False``: positive iff ``p >= t``, the first threshold on ties; ``strict=True`` (fVLM's
    ``calc_metrics.py``): positive iff ``p > t``, the last threshold on ties (``<=`` while scanning up)."""
    probs, targets = np.asarray(probs, np.float64), np.asarray(targets, np.float64)
    keep = ~np.isnan(targets)
    probs, y = probs[keep], targets[keep] > 0.5
    best, best_t = np.inf, 0.5 if not strict else 0.0
    for t in np.linspace(0.0, 1.0, grid):
        pred = probs > t if strict else probs >= t
        tpr = (pred & y).sum() / max(int(y.sum()), 1)
        fpr = (pred & ~y).sum() / max(int((~y).sum()), 1)
        d = float(np.hypot(1.0 - tpr, fpr))
        if d < best - 1e-12 or (strict and d <= best):
            best, best_t = d, float(t)
    return best_t


def binary_report(pred: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the positive class (``f1``, scikit-learn's default binary F1),
    and the support-weighted F1 over both classes (``average="weighted"``), for 0/1 predictions; NaN
    targets ignored."""
    pred, targets = np.asarray(pred).astype(bool), np.asarray(targets, np.float64)
    keep = ~np.isnan(targets)
    pred, y = pred[keep], targets[keep] > 0.5

    def f1(p: np.ndarray, t: np.ndarray) -> float:
        tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0

    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    weighted = (n_pos * f1(pred, y) + n_neg * f1(~pred, ~y)) / max(n_pos + n_neg, 1)
    return {"accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": f1(pred, y), "f1_weighted": float(weighted)}


def recall_at_k(sim: np.ndarray, query_ids: list[str], gallery_ids: list[str], ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose top-k gallery items include one with the same id.

    Args:
        sim: ``[Q, G]`` scores, higher = more similar.
        query_ids / gallery_ids: the study id of each query row / gallery column.
    """
    sim = np.asarray(sim)
    gallery = np.asarray(gallery_ids)
    match = np.asarray(query_ids)[:, None] == gallery[None, :]
    order = np.argsort(-sim, axis=1, kind="mergesort")
    ranked_match = np.take_along_axis(match, order, axis=1)
    return {k: float(ranked_match[:, :k].any(axis=1).mean()) for k in ks}

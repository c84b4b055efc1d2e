"""Classification transfer of a pretrained image encoder: linear probe and full fine-tuning.

Any run directory of any registered method: the image backbone alone (``method.image_encoder``, no
projection heads) gives the feature - the pooled [CLS] / global-average feature - and one
``Linear(feature, K)`` head is trained on a labelled datamodule (``configs/data/*``), on ``fraction``
of its training split (the shared label-fraction files, so every method sees the same images).

* ``linear`` (MGCA's protocol, ``specs/methods/mgca.md`` §7.2): backbone frozen in eval mode; AdamW
  lr 5e-4, betas (0.9, 0.999), weight decay 1e-6, no schedule, batch 48, at most 50 epochs, early
  stopping on the validation loss (patience 10), the best-validation head is tested. The frozen
  features are computed once per split (no train-time augmentation of the images).
* ``finetune`` (G2D's ChestX-ray14 protocol, ``g2d.md`` §7.6): backbone and head trained; AdamW lr
  1e-4, batch 64, at most 50 epochs, the same early stopping; train-time augmentation of the
  datamodule.

Tasks: multi-label (CheXpert, ChestX-ray14, RSNA's single "Pneumonia" label: one sigmoid per label,
BCE) or multi-class (``multiclass`` datamodules such as COVIDx: softmax cross-entropy). Metrics:
AUROC per label and their mean; multi-class adds top-1 accuracy (COVIDx's headline) and one-vs-rest
AUROC per class. Labels that are unknown (NaN) are left out of the loss and the metrics.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from medvlp.downstream.metrics import accuracy, auroc
from medvlp.downstream.task import Task, task_defaults, transfer_title
from medvlp.downstream.transfer import TransferModule, fit_transfer
from medvlp.registry import register_task

log = logging.getLogger(__name__)

PROTOCOLS = ("linear", "finetune")


@dataclass
class ClassifierSettings:
    """Optimiser and stopping settings of one protocol; the papers' values per protocol are in
    ``configs/downstream/classification.yaml`` (``settings``)."""

    lr: float
    batch_size: int
    weight_decay: float
    betas: tuple[float, float]
    max_epochs: int
    patience: int  # epochs without a lower validation loss before stopping
    max_steps: int = 0  # > 0: stop after this many optimiser steps (quick runs)


def settings_for(protocol: str, **overrides: Any) -> ClassifierSettings:
    """The protocol's settings from ``configs/downstream/classification.yaml``, then ``overrides``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol '{protocol}' is not one of {PROTOCOLS}.")
    base = {"max_steps": 0, **task_defaults("classification").settings.get(protocol, {})}
    known = [f.name for f in fields(ClassifierSettings)]
    unknown = [k for k in [*base, *overrides] if k not in known]
    if unknown:
        raise ValueError(f"Unknown classifier setting(s) {unknown}; known: {sorted(known)}.")
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    missing = [k for k in known if k not in merged]
    if missing:
        raise ValueError(f"configs/downstream/classification.yaml gives protocol '{protocol}' no {missing}.")
    merged["betas"] = tuple(float(b) for b in merged["betas"])
    return ClassifierSettings(**merged)


def classification_loss(logits: Tensor, labels: Tensor, multiclass: bool) -> Tensor:
    """Mean BCE over the known (non-NaN) labels, or softmax CE on the one-hot class."""
    if multiclass:
        return F.cross_entropy(logits, labels.argmax(dim=1))
    known = ~torch.isnan(labels)
    if not known.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], labels[known])


def scores_and_metrics(logits: np.ndarray, labels: np.ndarray, names: list[str], multiclass: bool) -> dict[str, Any]:
    """AUROC per label (one-vs-rest for classes) and mean; top-1 accuracy for multi-class."""
    probs = _softmax(logits) if multiclass else 1.0 / (1.0 + np.exp(-logits))
    per = {n: auroc(probs[:, i], labels[:, i]) for i, n in enumerate(names)}
    valid = [v for v in per.values() if not math.isnan(v)]
    out: dict[str, Any] = {"auroc": per, "mean_auroc": float(np.mean(valid)) if valid else float("nan")}
    if multiclass:
        out["accuracy"] = accuracy(logits.argmax(axis=1), labels.argmax(axis=1))
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Classifier(nn.Module):
    """The pretrained image backbone + one linear head on its pooled feature."""

    def __init__(self, encoder: nn.Module, n_out: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.out_dim), n_out)

    def features(self, images: Tensor) -> Tensor:
        return self.encoder(images).pooled.float()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@torch.no_grad()
def extract_features(model: Classifier, loader: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """Frozen features and labels of a whole split."""
    model.encoder.eval()
    feats, labels = [], []
    for batch in loader:
        with _autocast(device):
            feats.append(model.features(batch.images.to(device)).float().cpu())
        labels.append(batch.labels)
    return torch.cat(feats), torch.cat(labels)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _val_items(model: nn.Module, batch: Any) -> list[tuple[Tensor, Tensor]]:
    x, y = batch if isinstance(batch, list | tuple) else (batch.images, batch.labels)
    logits = model(x).float().cpu()
    return list(zip(logits, y.float().cpu(), strict=True))


def _val_loss(multiclass: bool) -> Callable[[list[tuple[Tensor, Tensor]]], float]:
    def score(items: list[tuple[Tensor, Tensor]]) -> float:
        logits, labels = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
        return float(classification_loss(logits, labels, multiclass))

    return score


def train_linear(model: Classifier, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], multiclass: bool,
                 s: ClassifierSettings, seed: int, folder: Path | None = None, trainer_cfg: Any = None) -> tuple[dict[str, Any], Any]:
    """Fit the head on cached features with early stopping on the validation loss (a ``Trainer``); keeps the
    best head. Returns ``(history, trainer)``."""
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(*train), batch_size=s.batch_size, shuffle=True, generator=g)
    val_loader = DataLoader(TensorDataset(*val), batch_size=max(len(val[0]), 1))

    def loss(head: nn.Module, batch: Any) -> Tensor:
        return classification_loss(head(batch[0]).float(), batch[1], multiclass)

    module = TransferModule(model.head, loss, _val_items, _val_loss(multiclass), s.lr, s.betas, s.weight_decay)
    return fit_transfer(module, train_loader, val_loader, folder, mode="min", patience=s.patience,
                        max_epochs=s.max_epochs, max_steps=s.max_steps, trainer_cfg=trainer_cfg, seed=seed)


def train_finetune(model: Classifier, dm: Any, multiclass: bool, s: ClassifierSettings, seed: int,
                   folder: Path | None = None, trainer_cfg: Any = None) -> tuple[dict[str, Any], Any]:
    """Train backbone + head on the datamodule's (augmented) training loader, early stopping on the
    validation loss (a ``Trainer``); keeps the best weights. Returns ``(history, trainer)``."""
    dm.cfg.batch_size = int(s.batch_size)

    def loss(m: nn.Module, batch: Any) -> Tensor:
        return classification_loss(m(batch.images).float(), batch.labels, multiclass)

    module = TransferModule(model, loss, _val_items, _val_loss(multiclass), s.lr, s.betas, s.weight_decay)
    return fit_transfer(module, dm.train_dataloader(), dm.val_dataloader(), folder, mode="min", patience=s.patience,
                        max_epochs=s.max_epochs, max_steps=s.max_steps, trainer_cfg=trainer_cfg, seed=seed)


@torch.no_grad()
def predict(model: Classifier, loader: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval().to(device)
    logits, labels = [], []
    for batch in loader:
        with _autocast(device):
            logits.append(model(batch.images.to(device)).float().cpu())
        labels.append(batch.labels)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate_loss(model: Classifier, loader: Any, multiclass: bool, device: torch.device) -> float:
    logits, labels = predict(model, loader, device)
    return float(classification_loss(torch.from_numpy(logits), torch.from_numpy(labels), multiclass))


def run_classification(method: Any, dm: Any, protocol: str = "linear", seed: int = 0,
                       device: torch.device | None = None, folder: Path | None = None, trainer_cfg: Any = None,
                       **settings: Any) -> dict[str, Any] | None:
    """Train a head (and, for ``finetune``, the backbone) on ``dm`` and test it.

    Args:
        method: a pretrained ``VLPMethod`` (its ``image_encoder`` is copied; the method is unchanged).
        dm: a labelled datamodule (its ``cfg.label_fraction`` picks the training subset).
        protocol: ``linear`` or ``finetune``.
        seed: seed of the head's initialisation and of the batch order.
        folder: where the training writes ``checkpoints/best.ckpt`` and ``metrics.csv`` (None: nowhere kept).
        trainer_cfg: the ``trainer.*`` section (devices, strategy, precision); None = one device.
        settings: overrides of :class:`ClassifierSettings` (lr, batch_size, max_epochs, patience, ...).

    Returns:
        A JSON-ready dict: metrics on the test split, the settings, the training history and the
        test logits / labels (for plots); None on the processes other than rank 0 of a DDP run.
    """
    s = settings_for(protocol, **settings)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = list(dm.label_names)
    if not names:
        raise ValueError(f"{type(dm).__name__} has no labels to classify.")
    multiclass = bool(getattr(dm, "multiclass", False))
    torch.manual_seed(seed)
    encoder = copy.deepcopy(method.export_encoder().module)
    model = Classifier(encoder, len(names)).to(device)
    start = time.perf_counter()
    if protocol == "linear":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        train = extract_features(model, dm.eval_dataloader("train"), device)
        val = extract_features(model, dm.val_dataloader(), device)
        history, trainer = train_linear(model, train, val, multiclass, s, seed, folder, trainer_cfg)
        n_train = len(train[0])
    else:
        history, trainer = train_finetune(model, dm, multiclass, s, seed, folder, trainer_cfg)
        n_train = len(dm.records("train"))
    if not trainer.is_global_zero:
        return None
    logits, labels = predict(model, dm.test_dataloader(), device)
    metrics = scores_and_metrics(logits, labels, names, multiclass)
    return {"task": "classification", "protocol": protocol, "multiclass": multiclass, "labels": names,
            "fraction": float(dm.cfg.label_fraction), "seed": seed, "n_train": n_train, "n_test": len(labels),
            "settings": asdict(s), "history": history, "seconds": time.perf_counter() - start, **metrics,
            "test_logits": logits.tolist(), "test_labels": np.nan_to_num(labels, nan=-1).tolist()}



@register_task("classification")
class ClassificationTask(Task):
    """linear probe / fine-tuning of the image encoder (AUROC, accuracy)"""

    settings = ("lr", "batch_size", "max_epochs", "patience", "max_steps")

    def run(self, method: Any, dm: Any, protocol: str, seed: int, folder: Path, settings: dict[str, Any],
            trainer_cfg: Any = None) -> dict[str, Any] | None:
        from medvlp.downstream.plots import roc_png

        res = run_classification(method, dm, protocol="linear" if protocol == "frozen" else protocol, seed=seed,
                                 folder=folder, trainer_cfg=trainer_cfg, **settings)
        if res is None:
            return None
        logits = np.asarray(res.pop("test_logits"))
        labels = np.asarray(res.pop("test_labels"))
        roc_png(folder / "roc.png", logits, labels, res["labels"], res["auroc"],
                title=f"{method.cfg.name} -> {dm.cfg.name}, {protocol}, {res['fraction']:g} of the labels")
        np.savez_compressed(folder / "test_predictions.npz", logits=logits, labels=labels)
        res["files"] = {"roc": str(folder / "roc.png"), "predictions": str(folder / "test_predictions.npz")}
        return res

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        rows = [(lab, f"{auc:.3f}") for lab, auc in res["auroc"].items()]
        rows.append(("mean", f"{res['mean_auroc']:.3f}"))
        if "accuracy" in res:
            rows.append(("accuracy", f"{res['accuracy']:.3f}"))
        return transfer_title(res), rows, ("label", "AUROC")


__all__ = ["ClassificationTask", "ClassifierSettings", "PROTOCOLS", "classification_loss", "run_classification", "scores_and_metrics",
           "settings_for"]

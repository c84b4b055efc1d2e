"""Classification transfer of a pretrained image encoder: linear probe and full fine-tuning.

Any run directory of any registered method: the image backbone alone (``method.image_encoder``, no
projection heads) gives the feature - the pooled [CLS] / global-average feature - and one
``Linear(feature, K)`` head is trained on a labelled datamodule (``configs/data/*``), on ``fraction``
of its training split (the shared label-fraction files, so every method sees the same images).

* ``linear`` (MGCA's protocol, ``specs/methods/mgca.md`` §7.2): backbone frozen in eval mode; AdamW
  lr 5e-4, betas (0.9, 0.999), weight decay 1e-6, no schedule, batch 48, at most 50 epochs, early
  stopping on the validation loss (patience 10), the best-validation head is tested. The frozen
  features are computed once per split (no train-time augmentation of the images); with
  ``augment=true`` the head trains on the datamodule's augmented training images instead, the frozen
  encoder (eval mode, no gradient) running at every step, as MGCA's code does (its random 224 crops of
  the 256 letterbox: ``data.crop_from=256``).
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

from medvlp.distributed import all_reduce_sum, world
from medvlp.downstream.metrics import accuracy, auroc
from medvlp.downstream.task import Task, task_defaults, transfer_title
from medvlp.downstream.transfer import TransferModule, fit_transfer
from medvlp.registry import register_task

log = logging.getLogger(__name__)

PROTOCOLS = ("linear", "finetune")
PROBES = ("adamw", "lbfgs")
LBFGS_GRID = tuple(10.0**e for e in range(-6, 7))  # CLIP's initial sweep of the inverse L2 strength C


@dataclass
class ClassifierSettings:
    """Optimiser and stopping settings of one protocol; the papers' values per protocol are in
    ``configs/downstream/classification.yaml`` (``settings``)."""

    lr: float
    batch_size: int
    weight_decay: float
    betas: tuple[float, float]
    max_epochs: int
    patience: int  # validation checks (one per epoch) without a lower validation loss before stopping
    max_steps: int = 0  # > 0: stop after this many optimiser steps (quick runs)
    min_steps: int = 0  # patience counts only after this many optimiser steps (0: from the first epoch, the papers' rule)
    epochs_given: bool = False  # max_epochs was set by the caller: a hard bound that min_steps does not raise
    standardize: bool = False  # linear, adamw: the head trains on z-scored features (train statistics), folded back after
    probe: str = "adamw"  # linear: adamw (the papers' mini-batch head) | lbfgs (CLIP's full-batch logistic regression)
    lbfgs_max_iter: int = 1000  # lbfgs: iterations per fit (scikit-learn's LogisticRegression(max_iter=1000) in CLIP)
    augment: bool = False  # linear, adamw: train the head on augmented images through the frozen encoder (every step)


def settings_for(protocol: str, **overrides: Any) -> ClassifierSettings:
    """The protocol's settings from ``configs/downstream/classification.yaml``, then ``overrides``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol '{protocol}' is not one of {PROTOCOLS}.")
    from dataclasses import MISSING

    optional = {f.name: f.default for f in fields(ClassifierSettings) if f.default is not MISSING}
    base = {**optional, **task_defaults("classification").settings.get(protocol, {})}
    known = [f.name for f in fields(ClassifierSettings)]
    unknown = [k for k in [*base, *overrides] if k not in known]
    if unknown:
        raise ValueError(f"Unknown classifier setting(s) {unknown}; known: {sorted(known)}.")
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    merged["epochs_given"] = overrides.get("max_epochs") is not None
    if merged.get("augment") and overrides.get("standardize") is None:
        merged["standardize"] = False  # features are not fixed: nothing to z-score once
    missing = [k for k in known if k not in merged]
    if missing:
        raise ValueError(f"configs/downstream/classification.yaml gives protocol '{protocol}' no {missing}.")
    merged["betas"] = tuple(float(b) for b in merged["betas"])
    if merged["probe"] not in PROBES:
        raise ValueError(f"probe='{merged['probe']}' is not one of {PROBES} (adamw: the papers' linear head; lbfgs: CLIP's).")
    if merged["probe"] == "lbfgs" and protocol != "linear":
        raise ValueError("probe=lbfgs fits a logistic regression on frozen features: it needs protocol linear / frozen.")
    if merged["augment"] and (protocol != "linear" or merged["probe"] != "adamw" or merged["standardize"]):
        raise ValueError("augment=true trains the linear head on augmented images: it needs protocol linear, probe=adamw "
                         "and standardize=false (fine-tuning always uses the datamodule's augmentation).")
    for key in ("min_steps", "max_steps", "patience", "lbfgs_max_iter"):
        if int(merged[key]) < 0:
            raise ValueError(f"{key} must be >= 0, got {merged[key]}.")
    return ClassifierSettings(**merged)


def classification_loss(logits: Tensor, labels: Tensor, multiclass: bool, global_mean: bool = False) -> Tensor:
    """Mean BCE over the known (non-NaN) labels, or softmax CE on the one-hot class (no host sync).

    ``global_mean`` (training under DDP): the mean over the known labels of every process's batch - this
    process's sum times the world size over the all-reduced count - so that DDP's averaged gradient is the
    gradient of the global batch (processes whose batches hold different numbers of known labels would
    otherwise weight them unequally). One process: the plain mean either way."""
    if multiclass:
        return F.cross_entropy(logits, labels.argmax(dim=1))
    known = ~torch.isnan(labels)
    total = F.binary_cross_entropy_with_logits(logits, labels.nan_to_num(), weight=known.to(logits.dtype),
                                               reduction="sum")
    count = known.sum().to(logits.dtype)
    _, size = world()
    if global_mean and size > 1:
        return total * size / all_reduce_sum(count).clamp_min(1)
    return total / count.clamp_min(1)  # 0 when no label is known


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
    best head. Returns ``(history, trainer)``.

    The order of epoch ``e`` is a function of ``(seed, e)`` alone and DDP splits it between the processes
    (:class:`~medvlp.resume.EpochSampler`): a step of W processes on ``batch_size`` features each trains on
    the same features as one process on ``W * batch_size``, and reaches the same head."""
    from medvlp.resume import EpochSampler

    sampler = EpochSampler(len(train[0]), seed=seed, keyed=False)
    train_loader = DataLoader(TensorDataset(*train), batch_size=s.batch_size, sampler=sampler)
    val_loader = DataLoader(TensorDataset(*val), batch_size=max(len(val[0]), 1))

    def loss(head: nn.Module, batch: Any) -> Tensor:
        return classification_loss(head(batch[0]).float(), batch[1], multiclass, global_mean=True)

    module = TransferModule(model.head, loss, _val_items, _val_loss(multiclass), s.lr, s.betas, s.weight_decay)
    return fit_transfer(module, train_loader, val_loader, folder, mode="min", patience=s.patience,
                        max_epochs=s.max_epochs, max_steps=s.max_steps, trainer_cfg=trainer_cfg, seed=seed,
                        min_steps=s.min_steps, extend_epochs=not s.epochs_given)


def _logistic_objective(head: nn.Linear, x: Tensor, y: Tensor, multiclass: bool, c: float) -> Tensor:
    """scikit-learn's L2 logistic regression objective per output, divided by its number of known
    labels: ``mean loss + |w|^2 / (2 C n)`` (the bias is not penalised). Multi-label: one independent
    binary problem per column over its known (non-NaN) rows; multi-class: the multinomial loss."""
    logits = head(x)
    if multiclass:
        return F.cross_entropy(logits, y.argmax(dim=1)) + head.weight.square().sum() / (2 * c * len(x))
    known = ~torch.isnan(y)
    n = known.sum(0).clamp_min(1)
    bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none") * known
    return (bce.sum(0) / n).sum() + (head.weight.square().sum(1) / (2 * c * n)).sum()


def fit_logistic(x: Tensor, y: Tensor, multiclass: bool, c: float, max_iter: int = 1000,
                 init: nn.Linear | None = None) -> nn.Linear:
    """Full-batch L-BFGS (strong Wolfe line search) on :func:`_logistic_objective`; ``init`` warm-starts."""
    head = nn.Linear(x.shape[1], y.shape[1]).to(x.device, x.dtype)
    with torch.no_grad():
        if init is None:
            head.weight.zero_()
            head.bias.zero_()
        else:
            head.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=int(max_iter), tolerance_grad=1e-6,
                            tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _logistic_objective(head, x, y, multiclass, c)
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _probe_score(head: nn.Linear, x: Tensor, y: Tensor, multiclass: bool) -> tuple[float, float]:
    """``(-loss, headline)`` of a head on a split: its validation loss (a proper score: small validation
    splits saturate AUROC, so it decides), then the mean AUROC (accuracy for exclusive classes)."""
    with torch.no_grad():
        logits = head(x)
        loss = float(classification_loss(logits, y, multiclass))
    m = scores_and_metrics(logits.double().cpu().numpy(), y.double().cpu().numpy(), [str(i) for i in range(y.shape[1])], multiclass)
    value = m["accuracy"] if multiclass else m["mean_auroc"]
    return -loss, (float("-inf") if math.isnan(value) else float(value))


def train_lbfgs(model: Classifier, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], multiclass: bool,
                s: ClassifierSettings) -> dict[str, Any]:
    """CLIP's linear probe: an L2-regularised logistic regression fitted full-batch by L-BFGS on the
    frozen training features for each inverse strength ``C`` of :data:`LBFGS_GRID` (1e-6 ... 1e6), then
    refined around the best by halving the step in log10(C) twice; ``C`` is chosen on the validation
    split by its loss (CLIP chooses by the validation metric; on small validation splits AUROC saturates
    and ties, the loss does not). The chosen fit becomes ``model.head``. Returns the history."""
    device = model.head.weight.device
    threads = torch.get_num_threads()
    if device.type == "cpu" and train[0].numel() < 2**22:  # thousands of tiny steps: threads only wait on each other
        torch.set_num_threads(1)
    try:
        return _train_lbfgs(model, train, val, multiclass, s, device)
    finally:
        torch.set_num_threads(threads)


def _train_lbfgs(model: Classifier, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], multiclass: bool,
                 s: ClassifierSettings, device: torch.device) -> dict[str, Any]:
    x, y = train[0].to(device, torch.float64 if device.type == "cpu" else torch.float32), train[1].to(device)
    xv, yv = val[0].to(device, x.dtype), val[1].to(device)
    y, yv = y.to(x.dtype), yv.to(x.dtype)
    tried: dict[float, tuple[tuple[float, float], nn.Linear]] = {}
    warm: nn.Linear | None = None

    def attempt(log_c: float) -> None:
        nonlocal warm
        key = round(log_c, 6)
        if key not in tried:
            warm = fit_logistic(x, y, multiclass, 10.0**key, s.lbfgs_max_iter, init=warm)
            tried[key] = (_probe_score(warm, xv, yv, multiclass), warm)

    for c in LBFGS_GRID:
        attempt(math.log10(c))
    step = 1.0
    for _ in range(2):
        step /= 2
        best = max(tried, key=lambda k: (tried[k][0], -k))
        attempt(best - step)
        attempt(best + step)
    best = max(tried, key=lambda k: (tried[k][0], -k))
    head = tried[best][1]
    with torch.no_grad():
        model.head.weight.copy_(head.weight.to(model.head.weight.dtype))
        model.head.bias.copy_(head.bias.to(model.head.bias.dtype))
    return {"epochs": 0, "steps": 0, "solver": "lbfgs", "C": 10.0**best, "best_val_loss": -tried[best][0][0],
            "val_loss_by_log10_C": {f"{k:g}": -tried[k][0][0] for k in sorted(tried)},
            "val_score_by_log10_C": {f"{k:g}": tried[k][0][1] for k in sorted(tried)}}


@torch.no_grad()
def fold_standardization(head: nn.Linear, mean: Tensor, std: Tensor) -> None:
    """A head trained on ``(x - mean) / std`` rewritten to act on ``x``: ``W / std``, ``b - (W / std) mean``."""
    w = head.weight / std
    head.bias.sub_(w @ mean)
    head.weight.copy_(w)


def train_finetune(model: Classifier, dm: Any, multiclass: bool, s: ClassifierSettings, seed: int,
                   folder: Path | None = None, trainer_cfg: Any = None, frozen: nn.Module | None = None
                   ) -> tuple[dict[str, Any], Any]:
    """Train backbone + head (or, with the backbone's parameters frozen and ``frozen`` = the backbone kept in
    eval mode, the head alone) on the datamodule's (augmented) training loader, early stopping on the
    validation loss (a ``Trainer``); keeps the best weights. Returns ``(history, trainer)``."""
    dm.cfg.batch_size = int(s.batch_size)

    def loss(m: nn.Module, batch: Any) -> Tensor:
        return classification_loss(m(batch.images).float(), batch.labels, multiclass, global_mean=True)

    module = TransferModule(model, loss, _val_items, _val_loss(multiclass), s.lr, s.betas, s.weight_decay, frozen=frozen)
    return fit_transfer(module, dm.train_dataloader(), dm.val_dataloader(), folder, mode="min", patience=s.patience,
                        max_epochs=s.max_epochs, max_steps=s.max_steps, trainer_cfg=trainer_cfg, seed=seed,
                        min_steps=s.min_steps, extend_epochs=not s.epochs_given)


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
    if protocol == "linear" and s.augment:
        history, trainer = train_finetune(model, dm, multiclass, s, seed, folder, trainer_cfg, frozen=model.encoder)
        n_train = len(dm.records("train"))
    elif protocol == "linear":
        train = extract_features(model, dm.eval_dataloader("train"), device)
        val = extract_features(model, dm.val_dataloader(), device)
        if s.probe == "lbfgs":
            history, trainer = train_lbfgs(model, train, val, multiclass, s), None
        elif s.standardize:
            mean, std = train[0].mean(0), train[0].std(0).clamp_min(1e-6)
            z = lambda f: ((f[0] - mean) / std, f[1])  # noqa: E731
            history, trainer = train_linear(model, z(train), z(val), multiclass, s, seed, folder, trainer_cfg)
            fold_standardization(model.head, mean.to(device), std.to(device))
        else:
            history, trainer = train_linear(model, train, val, multiclass, s, seed, folder, trainer_cfg)
        n_train = len(train[0])
    else:
        history, trainer = train_finetune(model, dm, multiclass, s, seed, folder, trainer_cfg)
        n_train = len(dm.records("train"))
    if not (trainer.is_global_zero if trainer is not None else world()[0] == 0):
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

    settings = ("lr", "batch_size", "weight_decay", "betas", "max_epochs", "patience", "max_steps", "min_steps", "probe",
                "lbfgs_max_iter", "standardize", "augment")

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

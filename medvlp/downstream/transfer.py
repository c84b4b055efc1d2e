"""Transfer training on Lightning: one LightningModule and one ``Trainer`` for every transfer task.

A task gives a model (a head, or a decoder / detector over a copy of the pretrained encoder), its
training loss, its per-item validation outputs and a validation score over the whole split;
:func:`fit_transfer` trains it with a ``Trainer`` built from the ``trainer.*`` config (devices,
strategy, precision, progress bar, determinism), AdamW, Lightning's ``EarlyStopping`` on the score,
``ModelCheckpoint`` keeping the best weights (``<folder>/checkpoints/best.ckpt``) and a CSV log
(``<folder>/metrics.csv``), then loads the best weights back. Under DDP the training loader is
sharded by Lightning, and the validation outputs of every process are gathered back into the
split's order (the distributed sampler's padding dropped), so the score is the one-process score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from medvlp.distributed import world

log = logging.getLogger(__name__)


def gather_in_order(items: list[Any], n: int) -> list[Any]:
    """Per-item outputs of a split evaluated under a non-shuffling distributed sampler, from every
    process, back in the split's order: rank ``r`` holds items ``r, r + W, r + 2W, ...`` (padded at the
    end by repeating the first ones), so item ``k`` of rank ``r`` is item ``k * W + r``; the padding
    (positions ``>= n``) is dropped. One process: ``items`` unchanged."""
    _, size = world()
    if size == 1:
        return items
    parts: list[list[Any]] = [[] for _ in range(size)]
    torch.distributed.all_gather_object(parts, items)
    ordered = [parts[r][k] for k in range(max(len(p) for p in parts)) for r in range(size) if k < len(parts[r])]
    return ordered[:n]


class TransferModule(L.LightningModule):
    """A transfer model trained by a ``Trainer``.

    Args:
        model: the module to train (its frozen parts have ``requires_grad=False``).
        train_loss: ``(model, batch) -> scalar`` loss of a training batch.
        val_items: ``(model, batch) -> list`` one output per item of a validation batch (on the CPU).
        val_score: ``(items of the whole split) -> float`` the monitored score.
        lr, betas, weight_decay: AdamW over the trainable parameters (no schedule).
        frozen: a sub-module kept in eval mode while training (a frozen encoder keeps its batch-norm
            statistics), or None.
        monitor: the logged name of the score (``val_loss``, ``val_map``, ...).
        on_train_batch: optional ``(module, batch, loss)`` hook after each training loss (bookkeeping).
    """

    def __init__(self, model: nn.Module, train_loss: Callable[[nn.Module, Any], Tensor],
                 val_items: Callable[[nn.Module, Any], list[Any]], val_score: Callable[[list[Any]], float],
                 lr: float, betas: Sequence[float], weight_decay: float, frozen: nn.Module | None = None,
                 monitor: str = "val_loss", on_train_batch: Callable[[Any, Any, Tensor], None] | None = None) -> None:
        super().__init__()
        self.model = model
        self.train_loss, self.val_items, self.val_score = train_loss, val_items, val_score
        self.lr, self.betas, self.weight_decay = float(lr), tuple(float(b) for b in betas), float(weight_decay)
        self.frozen, self.monitor, self.on_train_batch = frozen, monitor, on_train_batch
        self.scores: list[float] = []
        self._items: list[Any] = []
        self.val_size = 0

    def forward(self, *args: Any) -> Any:
        return self.model(*args)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.frozen is not None:
            self.frozen.eval()  # frozen: batch-norm statistics stay those of pre-training

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.train_loss(self.model, batch)
        if self.on_train_batch is not None:
            self.on_train_batch(self, batch, loss)
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=_batch_size(batch))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._items = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self._items.extend(self.val_items(self.model, batch))

    def on_validation_epoch_end(self) -> None:
        items = gather_in_order(self._items, self.val_size or len(self._items))
        self._items = []
        score = float(self.val_score(items)) if items else float("nan")
        if not self.trainer.sanity_checking:
            self.scores.append(score)
        self.log(self.monitor, score, prog_bar=True, sync_dist=True)  # the same value on every process (gathered)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The transfer model has no trainable parameter.")
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, list | tuple):
        return len(batch[0])
    return len(batch)


def trainer_args(trainer_cfg: Any) -> dict[str, Any]:
    """The ``trainer.*`` settings a transfer run takes from the run config (the length comes from the task)."""
    t = trainer_cfg
    if t is None:
        return {}
    return {"accelerator": t.accelerator, "devices": t.devices, "num_nodes": t.num_nodes, "strategy": t.strategy,
            "precision": t.precision, "enable_progress_bar": t.enable_progress_bar, "deterministic": t.deterministic,
            "gradient_clip_val": t.gradient_clip_val or None}


def min_steps_epochs(min_steps: int, steps_per_epoch: int, patience: int, max_epochs: int) -> int:
    """The epoch bound of a run that must make ``min_steps`` optimiser steps and then may wait
    ``patience`` validation checks: ``max_epochs``, raised as far as that needs."""
    if min_steps <= 0 or steps_per_epoch <= 0:
        return int(max_epochs)
    return max(int(max_epochs), math.ceil(min_steps / steps_per_epoch) + int(patience))


class StopAfterMinSteps:
    """Early stopping that starts counting after ``min_steps`` optimiser steps: the validation checks
    before it neither stop the run nor use up its patience (the best weights are still kept from
    every check). Built lazily so Lightning is imported only when training."""

    @staticmethod
    def make(min_steps: int, **kwargs: Any) -> Any:
        from lightning.pytorch.callbacks import EarlyStopping

        class _Stop(EarlyStopping):
            def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
                if trainer.global_step < min_steps:
                    return
                super()._run_early_stopping_check(trainer)

        return _Stop(**kwargs)


def fit_transfer(module: TransferModule, train_loader: Any, val_loader: Any, folder: Path | None, *, mode: str,
                 patience: int, max_epochs: int, max_steps: int = 0, trainer_cfg: Any = None,
                 seed: int = 0, min_steps: int = 0, extend_epochs: bool = True) -> tuple[dict[str, Any], L.Trainer]:
    """Train ``module`` with early stopping on its score; load the best weights back.

    Args:
        mode: ``min`` (a loss) or ``max`` (e.g. mAP).
        patience: validation checks (one per epoch) without a better score before stopping, counted
            from the first check after ``min_steps`` optimiser steps.
        max_epochs, max_steps: the length (``max_steps`` > 0 stops after that many optimiser steps).
            ``min_steps`` > 0 raises ``max_epochs`` to ``ceil(min_steps / steps per epoch) + patience``
            when that is larger, so a small label fraction (a few steps per epoch) still trains - unless
            ``extend_epochs`` is False (the user gave ``max_epochs``: a hard bound).
        trainer_cfg: the ``trainer.*`` section (devices, strategy, precision, ...); None = one CPU / GPU.
        folder: where ``checkpoints/best.ckpt`` and ``metrics.csv`` go (None: a temporary folder).

    Returns:
        ``(history, trainer)``; the history has ``epochs``, ``steps``, ``best_<monitor>`` and the
        score of every epoch.
    """
    import tempfile

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    if mode not in ("min", "max"):
        raise ValueError(f"mode '{mode}' is not 'min' or 'max'.")
    L.seed_everything(seed, workers=True, verbose=False)
    tmp = None
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
    module.val_size = len(val_loader.dataset)
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:  # an iterable without a length
        steps_per_epoch = 0
    if extend_epochs:
        max_epochs = min_steps_epochs(int(min_steps), steps_per_epoch, int(patience), int(max_epochs))
    ckpt = ModelCheckpoint(dirpath=Path(folder) / "checkpoints", filename="best", monitor=module.monitor, mode=mode,
                           save_top_k=1, save_weights_only=True, enable_version_counter=False)
    stop = StopAfterMinSteps.make(int(min_steps), monitor=module.monitor, mode=mode, patience=int(patience), min_delta=1e-6,
                                  check_on_train_epoch_end=False, check_finite=False)
    args = {"accelerator": "auto", "devices": 1, **trainer_args(trainer_cfg)}
    trainer = L.Trainer(max_epochs=int(max_epochs), max_steps=int(max_steps) if max_steps else -1, callbacks=[ckpt, stop],
                        logger=CSVLogger(folder, name="", version=""), num_sanity_val_steps=0, log_every_n_steps=1,
                        enable_model_summary=False, default_root_dir=folder, **args)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    best = ckpt.best_model_path
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    if tmp is not None:
        tmp.cleanup()
    scores = module.scores
    best_score = ckpt.best_model_score
    history = {"epochs": len(scores), "steps": int(trainer.global_step), f"best_{module.monitor}":
               float(best_score) if best_score is not None else float("nan"), module.monitor: scores}
    return history, trainer


__all__ = ["StopAfterMinSteps", "TransferModule", "fit_transfer", "gather_in_order", "min_steps_epochs", "trainer_args"]

"""The record of dropped / skipped items: ``dm.dropped``, ``dropped.csv`` and the DroppedItems callback."""

from __future__ import annotations

import logging
import pickle
from types import SimpleNamespace

import torch
from conftest import CTVolume, truncate, write_ct_rate

from medvlp.batch import ImageTextBatch
from medvlp.datamodules.ct_rate import CTRateConfig, CTRateDataModule
from medvlp.datamodules.dropped import DroppedItems, read_dropped
from medvlp.methods.base import VLPMethod


def _tokenizer(texts, padding=None, truncation=None, max_length=8, return_tensors=None):
    n = len(texts)
    return {"input_ids": torch.zeros(n, max_length, dtype=torch.long), "attention_mask": torch.ones(n, max_length, dtype=torch.long)}


def test_callback_in_a_lightning_fit_lists_build_and_load_time_drops(tmp_path, caplog):
    import lightning.pytorch as pl

    vols = [CTVolume("train_1_a_1"), CTVolume("train_2_a_1"), CTVolume("train_3_a_1", findings="", impressions=""),
            CTVolume("train_4_a_1"), CTVolume("valid_1_a_1")]
    write_ct_rate(tmp_path / "c", vols)
    truncate(tmp_path / "c/dataset/train/train_2/train_2_a/train_2_a_1.nii.gz")
    dm = CTRateDataModule(CTRateConfig(root=str(tmp_path / "c"), spacing=[5.0, 1.6, 1.6], size=[8, 16, 16],
                                       val_fraction=0.0, on_error="skip", batch_size=2, eval_batch_size=2,
                                       use_preprocessed="false"), _tokenizer)

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: ImageTextBatch, batch_idx: int):
            return (self.w * batch.images.mean()).sum() + self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = DroppedItems(dm, tmp_path / "run")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="medvlp.datamodules.dropped"):
        trainer.fit(Probe(), train_dataloaders=dm.eval_dataloader("train"))
    rows = read_dropped(tmp_path / "run" / "dropped.csv")
    assert [(r.split, r.study_id) for r in rows] == [("train", "train_3_a_1"), ("train", "train_2_a")]
    assert "no usable impressions+findings text" in rows[0].reason and "is truncated" in rows[1].reason
    assert "2 stud(ies) left out" in caplog.text and "dropped.csv" in caplog.text
    assert dm.dropped_summary()["count"] == 2
    fresh = DroppedItems(CTRateDataModule(CTRateConfig(root=str(tmp_path / "c"))), tmp_path / "run")
    assert type(pickle.loads(pickle.dumps(fresh))) is DroppedItems  # a module-level class (spawned workers, DDP)


def test_method_counts_skipped_ids_once_per_epoch():
    method = SimpleNamespace(_skipped=0, _skipped_ids=[])
    for ids in (["a"], ["a", "b"], []):
        VLPMethod._count_skipped(method, SimpleNamespace(skipped=len(ids), skipped_ids=ids))
    assert method._skipped == 3 and method._skipped_ids == ["a", "b"]

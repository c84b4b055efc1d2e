"""Exact resumption of a pre-training run.

A run killed at any step and continued with ``medvlp fit --resume`` ends with the weights and the
per-step losses of the uninterrupted run (bit-identical on CPU with ``trainer.deterministic=true``).
Three things make that so:

* :class:`EpochSampler`: the order of an epoch is a function of ``(data.seed, epoch)`` alone, and
  a resumed epoch skips the batches the checkpoint had already trained on. Under DDP it also
  splits the epoch between ranks (it is a ``DistributedSampler``, so Lightning keeps it).
* :class:`SeededItems`: every item's random draws (augmentation, report sampling, the pick of one
  reconstruction) come from a generator seeded by ``(data.seed, epoch, index)``, not from the
  process-wide generator. They are therefore the same whichever worker loads the item, and loading
  ahead (Lightning and the DataLoader both prefetch) does not move the model's random stream.
* :class:`ExactResume`: a callback that stores the sampler position and every random generator
  (torch CPU / CUDA, numpy, ``random``) in each checkpoint and restores them right before the first
  batch after the resume.

:class:`ResumableCSVLogger` keeps the loss history across a resume: ``metrics.csv`` continues,
the rows of the steps the resumed run trains again are replaced by its own, nothing else is lost.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)

STATE_KEY = "medvlp_resume"  # where a checkpoint keeps the sampler position and the random generators


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's random draws: fixed by ``(seed, epoch, index)``, spread over 63 bits."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(DistributedSampler):
    """Indices of a training epoch, as ``(index, item seed)`` pairs for :class:`SeededItems` (``keyed``) or
    plain indices.

    The permutation of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``seed + e``
    (``DistributedSampler``'s rule). Under DDP the epoch is padded to a multiple of the world size
    and rank ``r`` takes every ``world``-th index from ``r`` on; the world is read when an epoch
    starts, so one sampler serves one process or several.

    :meth:`resume` makes the next iteration of a given epoch start after the items a checkpoint had
    already consumed.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, keyed: bool = True) -> None:  # noqa: D107
        # no super().__init__: DistributedSampler's constructor asks torch.distributed for the world, which may
        # not exist yet.
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.keyed = bool(keyed)
        self.epoch = 0
        self._skip = 0  # items of this rank to skip when self.epoch is next iterated

    @staticmethod
    def _world() -> tuple[int, int]:
        from medvlp.distributed import world

        return world()

    def __len__(self) -> int:
        _, size = self._world()
        return -(-self.n // size)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._skip = 0

    def resume(self, epoch: int, items: int) -> None:
        """The next iteration of ``epoch`` starts after its first ``items`` (of this rank)."""
        self.epoch, self._skip = int(epoch), int(items)

    def order(self, epoch: int) -> list[int]:
        """The indices this rank visits in ``epoch``, in order (without any skip)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + int(epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        rank, size = self._world()
        if size > 1:
            total = len(self) * size
            order = (order * (total // max(self.n, 1) + 1))[:total]
            order = order[rank::size]
        return order

    def __iter__(self):
        epoch, skip = self.epoch, self._skip
        self._skip = 0  # taken by this iteration (the body runs on the first next(), after set_epoch)
        for index in self.order(epoch)[skip:]:
            yield (index, item_seed(self.seed, epoch, index)) if self.keyed else index


class SeededItems:
    """A dataset read with ``(index, seed)`` keys: the item's random draws (torch, numpy and ``random``)
    come from ``seed``; torch's generator, which the model draws from, is left as it was."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # records, dm, ... of the wrapped dataset (not its __getitems__)
        if name in ("dataset", "__getitems__") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self._read(key, lambda index: self.dataset[index])

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch of items (the DataLoader's fetcher calls this when the wrapped dataset reads batches)."""
        many = getattr(self.dataset, "__getitems__", None)
        if many is None:
            return [self[key] for key in keys]
        return [self._read(key, lambda index: many([index])[0]) for key in keys]

    @staticmethod
    def _read(key: tuple[int, int], read: Any) -> Any:
        index, seed = key
        # numpy's and random's global generators are re-seeded per item and left so (saving and restoring
        # numpy's costs more than reading a small image); torch's, which the model draws from, is restored.
        random.seed(seed)
        np.random.seed(seed % 2**32)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed costs 200 us
            return read(index)


# --------------------------------------------------------------------------- random generators
def rng_state() -> dict[str, Any]:
    """Every random generator of this process, as tensors and plain values (``weights_only``-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunCheckpoints(Callback):
    """``checkpoints/step<N>.ckpt`` every ``every_n_steps`` optimiser steps (0: at the end of every epoch),
    and ``last.ckpt`` when training ends.

    A checkpoint is written once its step is completely done, its validation and logging included:
    right before the next batch trains (or when training ends). A run killed at any moment and resumed
    from it therefore repeats no validation and loses no logged row. The newest ``keep`` step
    checkpoints are kept (older ones are removed once a newer one is written), so a damaged newest file
    still leaves one to fall back to.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int = 0, keep: int = 2) -> None:
        self.dirpath = Path(dirpath)
        self.every = int(every_n_steps)
        self.keep = max(1, int(keep))
        self._due = False
        self._before_batch = False
        self._saved_step = -1
        self._step_at_start = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_step = trainer.global_step  # a resumed run does not write its checkpoint again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # only after an optimiser step (with gradient accumulation, the batches between steps keep the step)
        stepped = trainer.global_step != self._step_at_start
        if self.every and stepped and trainer.global_step % self.every == 0 and trainer.global_step != self._saved_step:
            self._due = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.every:
            self._due = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step
        if self._due:
            self._before_batch = True
            try:
                self._save(trainer)
            finally:
                self._before_batch = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._before_batch and not trainer.fit_loop.epoch_loop._should_accumulate():
            # Lightning counts a checkpoint taken before a batch as one taken inside the previous batch and,
            # on restart, adds the logging step of that batch unless it would accumulate (the test it makes
            # then, on these same counters, is the one above): take it off here, so that the resumed run
            # logs its first batch at the step the uninterrupted run logs it.
            loop = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
            loop["_batches_that_stepped"] = int(loop["_batches_that_stepped"]) - 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._due:
            self._save(trainer)
        _save_full(trainer, self.dirpath / "last.ckpt")

    def _save(self, trainer) -> None:
        self._due = False
        step = trainer.global_step
        if step == self._saved_step:
            return
        _save_full(trainer, self.dirpath / f"step{step}.ckpt")
        self._saved_step = step
        if trainer.is_global_zero:
            steps = sorted((int(p.stem[4:]), p) for p in self.dirpath.glob("step*.ckpt") if p.stem[4:].isdigit())
            for _, old in steps[: -self.keep]:
                old.unlink(missing_ok=True)


def _save_full(trainer, path: Path) -> None:
    """A checkpoint with everything a resume needs: weights, optimiser, schedulers, loops and callbacks
    (Lightning's ``save_checkpoint`` flag for that is ``weights_only``; what it reads back is still loaded
    with ``torch.load(weights_only=True)``)."""
    only_weights = False
    trainer.save_checkpoint(path, weights_only=only_weights)


class ExactResume(Callback):
    """Saves the sampler position and the random generators with every checkpoint; restores them on resume.

    The position counts the batches trained in the current epoch (a checkpoint taken after the
    last one points at the start of the next epoch). The generators are restored right before the
    first batch after the resume: between that moment and the checkpoint, the uninterrupted run draws
    nothing from them (validation runs in eval mode and loading draws from per-item seeds).
    """

    def __init__(self, sampler: EpochSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.done = 0  # batches trained in the current epoch
        self._pending: dict[str, Any] | None = None
        self._sums: dict[str, list[Any]] | None = None  # epoch accumulations of the checkpoint, added after one batch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.done = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.done += 1
        if self._sums is not None:
            _add_epoch_sums(trainer, self._sums)
            self._sums = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        epoch, done = trainer.current_epoch, self.done
        if done >= trainer.num_training_batches:
            epoch, done = epoch + 1, 0
        # every process's generators and sums (the file is written by rank 0 alone; each rank takes its own)
        per_rank = _gather({"rng": rng_state(), "epoch_sums": _epoch_sums(trainer) if done else {}})
        checkpoint[STATE_KEY] = {"epoch": int(epoch), "batches": int(done), "ranks": per_rank}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is None:
            log.warning("the checkpoint holds no data position or random state (written by an older medvlp): "
                        "the run continues, but not exactly as the uninterrupted one would")
            return
        from medvlp.distributed import world

        rank, size = world()
        ranks = state["ranks"]
        if len(ranks) != size:
            log.warning("the checkpoint was written by %d process(es) and the run continues on %d: each process "
                        "takes the random state of rank %s", len(ranks), size, "0" if len(ranks) < size else "r")
        mine = ranks[rank] if rank < len(ranks) else ranks[0]
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)
        self.done = int(state["batches"])
        self._pending = mine["rng"]
        self._sums = mine.get("epoch_sums") or None


def _gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` on one process)."""
    import torch.distributed as dist

    from medvlp.distributed import world

    _, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return [_to_cpu(o) for o in out]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _epoch_sums(trainer) -> dict[str, list[Any]]:
    """The running epoch accumulations of the values logged in training (``on_epoch=True``): what the
    epoch means (``train/loss_epoch``, ...) of a resumed epoch need from the batches before the checkpoint."""
    out: dict[str, list[Any]] = {}
    for key, metric in trainer.fit_loop.epoch_loop._results.items():
        meta = getattr(metric, "meta", None)
        if meta is None or not meta.on_epoch or not getattr(metric, "is_tensor", False):
            continue
        count = metric.cumulated_batch_size.clone() if meta.is_mean_reduction else torch.tensor(0)
        out[key] = [metric.value.detach().clone(), count]
    return out


def _add_epoch_sums(trainer, sums: dict[str, list[Any]]) -> None:
    """Fold the checkpoint's accumulations into the resumed epoch's (after its first batch): the same sums,
    in the same order of additions, as the uninterrupted epoch."""
    results = trainer.fit_loop.epoch_loop._results
    for key, (value, count) in sums.items():
        metric = results.get(key)
        if metric is None:
            log.warning("the resumed epoch has not logged %s yet; its epoch value covers the batches after the resume", key)
            continue
        meta = metric.meta
        value = value.to(metric.value.device)
        if meta.is_mean_reduction:
            metric.value = value + metric.value
            metric.cumulated_batch_size = count.to(metric.cumulated_batch_size.device) + metric.cumulated_batch_size
        elif meta.is_sum_reduction:
            metric.value = value + metric.value
        elif meta.is_max_reduction or meta.is_min_reduction:
            metric.value = meta.reduce_fx(value, metric.value)


# --------------------------------------------------------------------------- loss history
class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued instead of deleted, and a new
    column rewrites the file atomically (a kill at that moment loses nothing)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        _write_rows(path, fieldnames, rows)


class ResumableCSVLogger(CSVLogger):
    """``<run>/metrics.csv``, written after every logged step (a kill loses nothing), continued on resume."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        super().__init__(run_dir, name="", version="", flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def rewind_metrics(path: str | os.PathLike, step: int) -> int:
    """Prepare ``metrics.csv`` for a run resumed at global step ``step``: the rows of steps ``>= step``
    (trained again, and logged again, by the resumed run) move to ``metrics.after-step<step>.csv``
    beside it. Returns how many rows moved."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    keep: list[dict[str, str]] = []
    moved: list[dict[str, str]] = []
    for row in rows:
        (keep if row.get("step", "") in ("", None) or int(float(row["step"])) < step else moved).append(row)
    if not moved:
        return 0
    _write_rows(path.with_name(f"{path.stem}.after-step{step}.csv"), fields, moved)
    _write_rows(path, fields, keep)
    return len(moved)


def _write_rows(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    """A CSV file with ``fields`` and ``rows``, written atomically (complete or not at all)."""
    import io

    from medvlp.cache import write_atomic

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)  # \r\n, as Lightning writes the rows it appends
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


__all__ = ["EpochSampler", "SeededItems", "ExactResume", "RunCheckpoints", "ResumableCSVLogger", "rewind_metrics", "item_seed",
           "rng_state", "set_rng_state", "STATE_KEY"]

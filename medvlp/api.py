"""Library entry points behind the CLI: fit, load a run back, zero-shot, retrieval.

The CLI only parses arguments and calls these, so the library and the CLI behave identically.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medvlp import config as C
from medvlp.cache import write_atomic
from medvlp.datamodules.base import DEMO_ROOT, DataRootError
from medvlp.registry import DATAMODULES, METHODS

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
TEXT_DIR = "text_encoder"
CKPT_DIR = "checkpoints"


# --------------------------------------------------------------------------- data
def resolve_data_root(cfg: DictConfig) -> None:
    """Replace ``data.root=demo`` by the generated synthetic dataset; check the root's layout."""
    dm_cls = DATAMODULES.get(cfg.data.name)
    if cfg.data.root == DEMO_ROOT:
        if not getattr(dm_cls, "demo_kind", ""):
            raise DataRootError(f"data.root=demo: the {cfg.data.name} datamodule has no synthetic demo version.")
        from medvlp.datamodules.demo import ensure_demo

        cfg.data.root = str(ensure_demo(dm_cls.demo_kind, size=cfg.data.demo_size, seed=0))
    if OmegaConf.is_missing(cfg.data, "root"):
        raise DataRootError(dm_cls.root_message("???", "is not set"))
    dm_cls.check_root(cfg.data)


def build_datamodule(cfg: DictConfig, tokenizer: Any = None):
    return DATAMODULES.get(cfg.data.name)(cfg.data, tokenizer=tokenizer)


# --------------------------------------------------------------------------- runs
def _run_info(cfg: DictConfig) -> dict[str, Any]:
    import lightning
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": sys.argv,
        "git_commit": commit,
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "transformers": transformers.__version__},
    }


def new_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run.name or f"{cfg.method.name}-{Path(str(cfg.data.root)).name or cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.out_dir) / name
    if (run_dir / CONFIG_NAME).exists():
        raise C.ConfigError(f"Run directory {run_dir} already holds a run; resume it with `medvlp fit --resume {run_dir}` or set run.name.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.resolve()


def build_method(cfg: DictConfig):
    return METHODS.get(cfg.method.name)(cfg.method, cfg.optim)


def _trainer(cfg: DictConfig, run_dir: Path):
    import lightning as L
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    class FinalCheckpoint(Callback):
        """Writes ``last.ckpt`` when training ends, whatever the checkpoint interval."""

        def on_train_end(self, trainer, pl_module) -> None:
            trainer.save_checkpoint(run_dir / CKPT_DIR / "last.ckpt")

    # The run directory already holds config.yaml; the CSV logger appends to metrics.csv on resume.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    t = cfg.trainer
    every = t.checkpoint_every_n_steps or None
    ckpt = ModelCheckpoint(
        dirpath=run_dir / CKPT_DIR,
        filename="step{step}",
        auto_insert_metric_name=False,
        save_last=True,
        every_n_train_steps=every,
        every_n_epochs=None if every else 1,
        save_top_k=1,
    )
    loggers = [CSVLogger(run_dir, name="", version=""), TensorBoardLogger(run_dir, name="tb", version="")]
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=loggers,
        callbacks=[ckpt, FinalCheckpoint(), LearningRateMonitor(logging_interval="step")],
    )


def fit(cfg: DictConfig, resume: str | Path | None = None) -> Path:
    """Train ``cfg`` (or continue the run in ``resume``); returns the run directory."""
    import lightning as L
    import torch

    if resume is not None:
        run_dir = Path(resume).resolve()
        ckpt_path = latest_checkpoint(run_dir)
    else:
        resolve_data_root(cfg)
        C.resolve(cfg)
        run_dir = new_run_dir(cfg)
        ckpt_path = None
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    method = build_method(cfg)
    if cfg.trainer.compile:
        method.image_encoder = torch.compile(method.image_encoder)
    dm = build_datamodule(cfg, tokenizer=method.tokenizer)
    if resume is None:
        C.save(cfg, run_dir / CONFIG_NAME)
        method.text_encoder.save_pretrained_parts(run_dir / TEXT_DIR)
        (run_dir / "run_info.json").write_text(json.dumps(_run_info(cfg), indent=2))
    trainer = _trainer(cfg, run_dir)
    trainer.fit(method, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader(), ckpt_path=ckpt_path)
    return run_dir


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of the run (a file cut short by a kill is passed over)."""
    import zipfile

    ckdir = Path(run_dir) / CKPT_DIR
    for cand in sorted(ckdir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if zipfile.is_zipfile(cand):  # torch.save writes a zip archive; a truncated one is not
            return cand
        log.warning("skipping incomplete checkpoint %s", cand)
    raise FileNotFoundError(f"No checkpoint in {ckdir}: the run stopped before its first checkpoint; start it again.")


def load_config(run_dir: str | Path) -> DictConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_NAME}).")
    return C.compose(config_file=str(run_dir / CONFIG_NAME))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None):
    """Rebuild a trained method from its run directory alone (no hub access); returns (method, cfg)."""
    import torch

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    offline = cfg.copy()
    offline.method.text_encoder.model = str(run_dir / TEXT_DIR)
    offline.method.text_encoder.tokenizer = ""
    offline.method.text_encoder.pretrained = False
    offline.method.image_encoder.pretrained = False
    if "inflate_from" in offline.method.image_encoder:
        offline.method.image_encoder.inflate_from = ""  # weights come from the checkpoint
    method = build_method(offline)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors and plain containers only: no code runs
    method.load_state_dict(state["state_dict"])
    method.eval()
    return method, cfg


def evaluate(run_dir: str | Path, tasks: tuple[str, ...] = ("zeroshot", "retrieval"), split: str = "test",
             data_overrides: list[str] | None = None, data: str = "") -> dict[str, Any]:
    """Evaluation tasks (zero-shot AUROC, retrieval recall, ...) of a run on a split of its dataset, or,
    with ``data``, of another dataset (``configs/data/<data>.yaml`` + ``data_overrides``) read at the
    run's image size, channels and text length."""
    method, cfg = load_run(run_dir)
    if data:
        overrides = [*(data_overrides or []), f"data.max_length={cfg.data.max_length}"]
        _, cfg = downstream_datamodule(cfg, data, overrides, 1.0, method.tokenizer, task=None)
    elif data_overrides:
        cfg = OmegaConf.merge(cfg, C.parse_overrides(data_overrides))
    out = evaluate_method(method, cfg, tasks, split)
    out["run"] = str(run_dir)
    return out


def evaluate_method(method, cfg: DictConfig, tasks: tuple[str, ...] = ("zeroshot", "retrieval"),
                    split: str = "test") -> dict[str, Any]:
    """Evaluate an in-memory method on ``split`` of the dataset in ``cfg.data`` with evaluation tasks
    (registered tasks with ``transfer: false``); each task's result is under its name."""
    from medvlp.downstream.embed import extract
    from medvlp.downstream.task import get_task

    chosen = [get_task(t) for t in tasks]
    for task in chosen:
        if task.transfer:
            raise C.ConfigError(f"{task.name} is a transfer task; run it with medvlp downstream --task {task.name}.")
    resolve_data_root(cfg)
    dm = build_datamodule(cfg, tokenizer=method.tokenizer)
    emb = extract(method, dm.eval_dataloader(split))
    out: dict[str, Any] = {"split": split, "n": len(emb.study_ids)}
    for task in chosen:
        out[task.name] = task.evaluate(method, dm, emb, cfg)
    return out


# --------------------------------------------------------------------------- downstream transfer
def downstream_datamodule(run_cfg: DictConfig, data: str, overrides: list[str], fraction: float, tokenizer: Any,
                          task: str | None = "classification"):
    """The labelled datamodule of a transfer task: ``configs/data/<data>.yaml`` + ``overrides``, with the
    pretraining run's ``image_size`` / ``channels`` (what its encoder expects), ``data.task`` = the
    transfer task for datasets with several target kinds (RSNA, SIIM) and the task's own ``data``
    defaults (``configs/downstream/<task>.yaml``), each unless overridden (``task=None``: neither)."""
    from medvlp.downstream.task import get_task

    dot = C.parse_overrides(overrides)
    cfg = C.compose(data=data, overrides=overrides, sections=("data",))
    given = set(dot.get("data", {}) or {})
    for key in ("image_size", "channels"):
        if key in cfg.data and key in run_cfg.data and key not in given:
            cfg.data[key] = run_cfg.data[key]
    if task is not None and "task" in cfg.data and "task" not in given:
        cfg.data.task = task
    for key, value in (get_task(task).data_defaults(given) if task is not None else {}).items():
        if key in cfg.data:
            cfg.data[key] = value
    cfg.data.label_fraction = float(fraction)
    resolve_data_root(cfg)
    C.resolve(cfg)
    return build_datamodule(cfg, tokenizer=tokenizer), cfg


def downstream(task: str, data: str, run_dir: str | Path, fraction: float = 1.0, protocol: str = "",
               seed: int = 0, overrides: list[str] | None = None, out: str | Path | None = None,
               **settings: Any) -> dict[str, Any]:
    """Transfer a run's image encoder to a labelled task and write ``result.json`` (+ plots).

    Args:
        task: a registered transfer task (``medvlp list tasks``: classification, segmentation, detection).
        data: a ``configs/data`` name with labels (e.g. ``demo_chexpert``, ``chexpert``, ``covidx``).
        run_dir: a pre-training run directory (any method).
        fraction: fraction of the training labels (the shared label-fraction files).
        protocol: ``linear`` / ``frozen`` (frozen encoder) or ``finetune``; "" = the task's default.
        seed: seed of the head and batch order.
        overrides: ``data.*`` and ``trainer.*`` overrides (``trainer.devices=2 trainer.strategy=ddp``,
            ``trainer.precision=bf16-mixed``); the length of training comes from the task's settings.
        out: output folder (default ``<run_dir>/downstream/<task>-<data>-<protocol>-f<fraction>-s<seed>``).
        settings: the task's settings (``Task.settings``: lr, batch_size, max_epochs, patience, max_steps, ...).
    """
    from medvlp.downstream.task import get_task

    t = get_task(task)
    if not t.transfer:
        raise C.ConfigError(f"{task} evaluates a run as it is: use medvlp {task} --run RUN (not medvlp downstream).")
    protocol = t.check_protocol(protocol)
    unknown = sorted(set(settings) - set(t.settings))
    if unknown:
        raise C.ConfigError(f"{task} takes no setting(s) {unknown}; its settings: {', '.join(t.settings)}.")
    if not 0 < float(fraction) <= 1:
        raise C.ConfigError(f"fraction={fraction}: label fractions are in (0, 1], e.g. 0.01, 0.1 or 1.")
    method, run_cfg = load_run(run_dir)
    dm, cfg = downstream_datamodule(run_cfg, data, list(overrides or []), fraction, method.tokenizer, task)
    folder = Path(out) if out else Path(run_dir) / "downstream" / f"{task}-{data}-{protocol}-f{fraction:g}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    res = t.run(method, dm, protocol, seed, folder, settings, trainer_cfg=cfg.trainer)
    if res is None:  # another process of a multi-process run: rank 0 writes the result
        return {}
    res.update({"run": str(run_dir), "method": run_cfg.method.name, "data": data, "data_name": cfg.data.name})
    res.setdefault("files", {})["result"] = str(folder / "result.json")
    write_atomic(folder / "result.json", json.dumps(res, indent=2))  # a killed run leaves no partial result
    return res


__all__ = ["fit", "load_run", "evaluate", "evaluate_method", "downstream", "resolve_data_root"]

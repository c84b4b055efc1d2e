"""Library entry points behind the CLI: fit, load a run back, zero-shot, retrieval.

The CLI only parses arguments and calls these, so the library and the CLI behave identically.
"""

from __future__ import annotations

import json
import logging
import os
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
from medvlp.checkpoints import CKPT_DIR, latest_checkpoint  # noqa: F401 - part of this module's API
from medvlp.datamodules.base import DEMO_ROOT, DataRootError
from medvlp.registry import DATAMODULES, METHODS

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
TEXT_DIR = "text_encoder"


# --------------------------------------------------------------------------- data
def resolve_data_root(cfg: DictConfig) -> None:
    """Replace ``data.root=demo`` by the generated synthetic dataset; check the root's layout."""
    dm_cls = DATAMODULES.get(cfg.data.name)
    if OmegaConf.is_missing(cfg.data, "root"):
        raise DataRootError(dm_cls.root_message("", "is not set"))
    if cfg.data.root == DEMO_ROOT:
        if not getattr(dm_cls, "demo_kind", ""):
            raise DataRootError(f"data.root=demo: the {cfg.data.name} datamodule has no synthetic demo version.")
        from medvlp.datamodules.demo import ensure_demo

        cfg.data.root = str(ensure_demo(dm_cls.demo_kind, size=cfg.data.demo_size, seed=0))
    dm_cls.check_root(cfg.data)


def build_datamodule(cfg: DictConfig, tokenizer: Any = None):
    return DATAMODULES.get(cfg.data.name)(cfg.data, tokenizer=tokenizer)


# --------------------------------------------------------------------------- runs
def run_info(cfg: DictConfig) -> dict[str, Any]:
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


RUN_DIR_ENV = "MEDVLP_RUN_DIR"  # set by the first process of a run for the processes Lightning launches for it


def _process_role() -> str:
    """``"first"`` for the process that owns the run directory (global rank 0, or no launcher), ``"launched"``
    for a process Lightning's launcher started for a run of this machine (it inherits the directory in
    ``$MEDVLP_RUN_DIR``), ``"other"`` for a further process started by an external launcher (torchrun,
    SLURM, a second node)."""
    local = os.environ.get("LOCAL_RANK", "")
    if os.environ.get(RUN_DIR_ENV) and local.isdigit() and int(local) > 0:
        return "launched"
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return "first" if int(os.environ[var]) == 0 else "other"
    for var in ("NODE_RANK", "GROUP_RANK"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return "other"
    return "first" if not local.isdigit() or int(local) == 0 else "other"


def is_first_process() -> bool:
    """True in the process that owns the run (global rank 0, or the only one)."""
    return _process_role() == "first"


def _lock_run(run_dir: Path):
    """Hold ``<run>/.lock`` while this process trains the run (the kernel releases it when the process
    ends, however it ends): a second ``fit --resume`` of a run still training stops with a clear error."""
    import fcntl

    fh = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held until the run ends
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise C.ConfigError(f"Run {run_dir} is being trained by {owner}; wait for it to end (or stop it) "
                            f"before continuing it.") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"process {os.getpid()} on {platform.node()}\n")
    fh.flush()
    return fh


def _claim_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write ``config.yaml`` into ``run_dir`` only if the directory holds no run yet (atomic: the file
    appears complete or not at all, and of two processes claiming the directory one wins)."""
    tmp = run_dir / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    C.save(cfg, tmp)
    taken = C.ConfigError(f"Run directory {run_dir} already holds a run; resume it with "
                          f"`medvlp fit --resume {run_dir}` or choose another run.name.")
    try:
        os.link(tmp, run_dir / CONFIG_NAME)
    except FileExistsError:
        raise taken from None
    except OSError:  # a file system without hard links: exclusive creation, then the content
        try:
            with open(run_dir / CONFIG_NAME, "x", encoding="utf-8") as fh:
                fh.write(tmp.read_text(encoding="utf-8"))
        except FileExistsError:
            raise taken from None
    finally:
        tmp.unlink(missing_ok=True)


def new_run_dir(cfg: DictConfig) -> Path:
    """Create the run directory and write its ``config.yaml``, atomically.

    Without ``run.name`` the directory is ``<method>-<data>-<time>`` made with ``mkdir`` (no
    ``exist_ok``); a name already taken, e.g. by a run started in the same second, gets ``-1``,
    ``-2``, ... With ``run.name`` the directory may exist (prepared by a sweep, say) as long as it
    holds no run; otherwise it is a ConfigError.
    """
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.run.name:
        run_dir = out / cfg.run.name
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        stem = f"{cfg.method.name}-{Path(str(cfg.data.root)).name or cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        for i in range(10_000):
            run_dir = out / (stem if i == 0 else f"{stem}-{i}")
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - ten thousand runs in one second
            raise C.ConfigError(f"Could not create a run directory under {out}: every name {stem}-N is taken.")
    _claim_config(cfg, run_dir)
    return run_dir.resolve()


def _wait_for_run_dir(cfg: DictConfig, timeout: float = 600.0) -> Path:
    """The run directory as another process (global rank 0) creates it: ``<out_dir>/<run.name>``."""
    if not cfg.run.name:
        raise C.ConfigError("This process was started by an external launcher (torchrun, SLURM) as one of several: "
                            "set run.name so that every process finds the run directory that rank 0 creates.")
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    deadline = time.monotonic() + timeout
    while not (run_dir / CONFIG_NAME).is_file():
        if time.monotonic() > deadline:
            raise C.ConfigError(f"Rank 0 did not create {run_dir / CONFIG_NAME} within {timeout:.0f} s.")
        time.sleep(0.5)
    return run_dir.resolve()


def build_method(cfg: DictConfig):
    return METHODS.get(cfg.method.name)(cfg.method, cfg.optim)


def _trainer(cfg: DictConfig, run_dir: Path, callbacks: list[Any], resumed_step: int | None = None):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger

    from medvlp.resume import ResumableCSVLogger, RunCheckpoints

    # The batches already trained in a resumed epoch are skipped by the EpochSampler (medvlp.resume).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    t = cfg.trainer
    ckpt = RunCheckpoints(run_dir / CKPT_DIR, every_n_steps=t.checkpoint_every_n_steps, keep=t.keep_checkpoints)
    # TensorBoard drops the events of steps the resumed run logs again (purge_step); its files stay.
    tb = TensorBoardLogger(run_dir, name="tb", version="", **({"purge_step": resumed_step} if resumed_step is not None else {}))
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(t),
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
        logger=[ResumableCSVLogger(run_dir), tb],
        enable_checkpointing=False,  # RunCheckpoints writes them
        callbacks=[*callbacks, ckpt, LearningRateMonitor(logging_interval="step")],
        plugins=_cluster_plugins(),
    )


def _cluster_plugins() -> list[Any]:
    """Under a SLURM batch job: Lightning's SLURM environment (ranks and main address from SLURM's
    variables) without its auto-requeue, whose SIGUSR1 handler writes a checkpoint in the middle of a step
    (not resumable exactly, and collective calls from a signal handler can hang). A preempted or requeued
    job continues from the run's step checkpoints with ``medvlp fit --resume``
    (``examples/slurm/fit_multinode.sbatch``)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def _strategy(t: DictConfig) -> Any:
    """``trainer.strategy`` as Lightning takes it; ``fsdp`` and ``model_parallel`` shard the module classes named
    in ``trainer.fsdp_wrap`` as their own units (:func:`medvlp.distributed.wrap_policy`, :meth:`VLPMethod.configure_model`)."""
    if t.strategy == "fsdp" and list(t.fsdp_wrap):
        from lightning.pytorch.strategies import FSDPStrategy

        from medvlp.distributed import wrap_policy

        # frozen and trainable parameters share units: FSDP keeps the original parameters
        return FSDPStrategy(auto_wrap_policy=wrap_policy(list(t.fsdp_wrap)), sharding_strategy=t.fsdp_sharding,
                            use_orig_params=True)
    if t.strategy == "model_parallel":
        import torch
        from lightning.pytorch.strategies import ModelParallelStrategy

        # one data-parallel dimension over every process (FSDP2); checkpoints are whole files, as load_run reads them
        devices = int(t.devices) if str(t.devices).isdigit() else (torch.cuda.device_count() or 1)
        return ModelParallelStrategy(data_parallel_size=devices * int(t.num_nodes), tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    return t.strategy


def check_trainer_choices(cfg: DictConfig) -> None:
    """``trainer.precision`` / ``accelerator`` / ``strategy`` are among the values this Lightning accepts
    (checked before anything is built or written; the lists come from Lightning itself)."""
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    precisions = [str(v) for lit in get_args(_PRECISION_INPUT) for v in get_args(lit)]
    choices = {"precision": precisions,
               "accelerator": ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())],
               "strategy": ["auto", "model_parallel", *StrategyRegistry.available_strategies()]}
    for key, allowed in choices.items():
        value = str(cfg.trainer[key])
        if value not in allowed:
            raise C.ConfigError(f"Config key 'trainer.{key}' = {value!r} is not one of {', '.join(allowed)}.")


def _resume_point(run_dir: Path) -> tuple[str | None, int]:
    """``(checkpoint path or None, the step the resumed run logs first)``: the newest checkpoint that
    reads back (broken ones are passed over and named); none at all restarts the run from step 0."""
    from medvlp.checkpoints import NoCheckpointError, load_latest

    try:
        path, state = load_latest(run_dir)
    except NoCheckpointError as err:
        log.warning("%s Starting it again from step 0 with its saved config.", err)
        return None, 0
    step = int(state.get("global_step", 0))  # the resumed run logs its first batch at this step
    log.info("continuing %s from %s (step %d)", run_dir, path.name, step)
    return str(path), step


def _record_resume(run_dir: Path, ckpt_path: str | None, step: int) -> None:
    info_path = run_dir / "run_info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        info = {}
    info.setdefault("resumed", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": sys.argv,
                                           "checkpoint": ckpt_path, "step": step})
    write_atomic(info_path, json.dumps(info, indent=2))


def fit(cfg: DictConfig, resume: str | Path | None = None) -> Path:
    """Train ``cfg`` (or continue the run in ``resume``); returns the run directory.

    Only the first process of a run (global rank 0) creates the run directory and writes into it;
    the processes a multi-device run launches use the same directory. A resumed run continues
    exactly where the checkpoint left off (:mod:`medvlp.resume`) and keeps the loss history.
    """
    import lightning as L
    import torch

    from medvlp.resume import ExactResume, rewind_metrics

    role = _process_role()
    primary = role == "first"
    ckpt_path, resumed_step = None, 0
    if resume is not None:
        run_dir = Path(resume).resolve()
        cfg = load_config(run_dir) if cfg is None else cfg
        ckpt_path, resumed_step = _resume_point(run_dir)
    else:
        resolve_data_root(cfg)
        C.resolve(cfg)
    check_trainer_choices(cfg)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    method = build_method(cfg)
    method.shard_classes = list(cfg.trainer.fsdp_wrap)
    if cfg.trainer.compile:  # both encoders (their other methods stay reachable through the compiled wrapper)
        method.image_encoder = torch.compile(method.image_encoder)
        method.text_encoder = torch.compile(method.text_encoder)
    dm = build_datamodule(cfg, tokenizer=method.tokenizer)
    train_loader = dm.resumable_train_dataloader()  # reads the records: bad data fails before the run directory exists
    val_loader = dm.val_dataloader()
    lock = None
    if resume is not None:
        if primary:
            lock = _lock_run(run_dir)
            rewind_metrics(run_dir / "metrics.csv", resumed_step)
            if not (run_dir / TEXT_DIR).is_dir():
                save_text_encoder(method, run_dir)
            _record_resume(run_dir, ckpt_path, resumed_step)
    elif role == "launched":
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif role == "other":
        run_dir = _wait_for_run_dir(cfg)
    else:
        run_dir = new_run_dir(cfg)
        lock = _lock_run(run_dir)
        save_text_encoder(method, run_dir)
        write_atomic(run_dir / "run_info.json", json.dumps(run_info(cfg), indent=2))
    from medvlp.datamodules.dropped import DroppedItems

    callbacks = [ExactResume(train_loader.sampler, batch_size=int(cfg.data.batch_size)), DroppedItems(dm, run_dir)]
    trainer = _trainer(cfg, run_dir, callbacks, resumed_step=resumed_step if resume is not None else None)
    before = os.environ.get(RUN_DIR_ENV)
    if primary:
        os.environ[RUN_DIR_ENV] = str(run_dir)  # for the processes the Trainer launches (they inherit it)
    try:
        trainer.fit(method, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path,
                    weights_only=True)
    finally:
        if primary:
            if before is None:
                os.environ.pop(RUN_DIR_ENV, None)
            else:
                os.environ[RUN_DIR_ENV] = before
        if lock is not None:
            lock.close()
    return run_dir


def save_text_encoder(method: Any, run_dir: Path) -> None:
    """``<run>/text_encoder`` and the method's other :meth:`~medvlp.methods.base.VLPMethod.pretrained_parts`
    (``<run>/<name>``): each written beside it, then renamed into place (complete or absent)."""
    import shutil

    for name, part in {TEXT_DIR: method.text_encoder, **method.pretrained_parts()}.items():
        tmp = run_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a write cut short
        part.save_pretrained_parts(tmp)
        shutil.rmtree(run_dir / name, ignore_errors=True)
        os.replace(tmp, run_dir / name)


def load_config(run_dir: str | Path) -> DictConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_NAME}).")
    return C.compose(config_file=str(run_dir / CONFIG_NAME))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None):
    """Rebuild a trained method from its run directory alone (no hub access); returns (method, cfg)."""
    from medvlp.checkpoints import load_latest, read_checkpoint

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    offline = cfg.copy()
    offline.method.text_encoder.model = str(run_dir / TEXT_DIR)
    offline.method.text_encoder.tokenizer = ""
    offline.method.text_encoder.pretrained = False
    offline.method.image_encoder.pretrained = False
    if "inflate_from" in offline.method.image_encoder:
        offline.method.image_encoder.inflate_from = ""  # weights come from the checkpoint
    if offline.method.image_encoder.get("trunk_checkpoint"):
        offline.method.image_encoder.trunk_checkpoint = ""
    METHODS.get(offline.method.name).offline_config(offline, run_dir, cfg)
    method = build_method(offline)
    # tensors and plain containers only: a checkpoint that would run code is refused, a broken one named
    if checkpoint:
        state = read_checkpoint(checkpoint)
    else:
        _, state = load_latest(run_dir)
    weights = state["state_dict"]
    if any("._orig_mod." in k for k in weights):  # trained with trainer.compile=true
        weights = {k.replace("._orig_mod.", "."): v for k, v in weights.items()}
    method.load_state_dict(weights)
    method.eval()
    return method, cfg


def evaluate(run_dir: str | Path, tasks: tuple[str, ...] = ("zeroshot", "retrieval"), split: str = "test",
             data_overrides: list[str] | None = None, data: str = "", protocol: str = "") -> dict[str, Any]:
    """Evaluation tasks (zero-shot AUROC, retrieval recall, ...) of a run on a split of its dataset, or,
    with ``data``, of another dataset (``configs/data/<data>.yaml`` + ``data_overrides``) read at the
    run's image size, channels and text length (and, for one task, with that task's ``data`` defaults).
    ``protocol`` names a paper's preset (``configs/protocol``) whose ``data.*`` for the first task (its
    prompts, input size, threshold split) apply under ``data_overrides``."""
    from medvlp.downstream.protocols import resolve

    method, cfg = load_run(run_dir)
    preset: dict[str, Any] = {}
    if protocol:
        name = C.compose(data=data, overrides=list(data_overrides or []), sections=("data",)).data.name if data else cfg.data.name
        preset = resolve(protocol, tasks[0], str(name), 1.0).data
    if data:
        overrides = [*(data_overrides or []), f"data.max_length={cfg.data.max_length}"]
        _, cfg = downstream_datamodule(cfg, data, overrides, 1.0, method.tokenizer, task=tasks[0] if len(tasks) == 1 else None,
                                       preset_data=preset)
    else:
        given = set(C.parse_overrides(list(data_overrides or [])).get("data", {}) or {})
        extra = {k: v for k, v in preset.items() if k not in given}
        if data_overrides or extra:
            cfg = OmegaConf.merge(cfg, {"data": extra}, C.parse_overrides(list(data_overrides or [])))
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
    emb.split = split
    out: dict[str, Any] = {"split": split, "n": len(emb.study_ids)}
    for task in chosen:
        out[task.name] = task.evaluate(method, dm, emb, cfg)
    out["dropped"] = dm.dropped_summary()  # studies left out while reading the split (listed in the log)
    return out


def vqa(run_dir: str | Path, study: str = "", questions: tuple[str, ...] | list[str] = (), split: str = "test",
        references: str | Path = "", data_overrides: list[str] | None = None) -> dict[str, Any]:
    """Answers of a generative run (MedBLIP) to questions about one study, and / or its scores on a file of
    reference answers.

    Args:
        run_dir: a run directory of a method that can ``generate``.
        study: the study: its id (``ADNI-test:3``) or its image path (as the list writes it, or absolute).
        questions: free-text questions about ``study`` (each answered from the volume and its EHR prompt).
        split: where the study is looked up (test, val or train).
        references: a CSV ``image,question,answer``: every row whose study is in ``split`` is answered and
            scored (exact match, token-F1).
        data_overrides: ``data.*`` overrides (e.g. ``data.root=/other/copy``).

    Returns:
        ``{"answers": [{"question", "answer"}], "vqa": scores}`` (each key when asked for).
    """
    from medvlp.downstream.generative import answer_questions, evaluate_references, read_references

    if bool(study) != bool(questions):
        raise C.ConfigError("Name a study and at least one question together (--study ID --question TEXT).")
    if not study and not references:
        raise C.ConfigError("Nothing to answer: give --study and --question, or --answers FILE of reference answers.")
    method, cfg = load_run(run_dir)
    if not method.supports("generate"):
        raise C.ConfigError(f"{cfg.method.name} does not generate text; VQA needs a generative run (e.g. --method medblip).")
    if data_overrides:
        cfg = OmegaConf.merge(cfg, C.parse_overrides(data_overrides))
    resolve_data_root(cfg)
    dm = build_datamodule(cfg, tokenizer=method.tokenizer)
    out: dict[str, Any] = {"run": str(run_dir), "split": split}
    if study:
        index = dm.study_index(split)
        if study not in index:
            known = [k for k in index if ":" in k][:3]
            raise C.ConfigError(f"No study '{study}' in the {split} split of {cfg.data.name} (data.root={cfg.data.root}); "
                                f"name a study id (e.g. {', '.join(known)}) or an image path, or choose --split.")
        batch = dm.collate([dm.dataset(split).load(index[study])])
        answers = answer_questions(method, batch, [str(q) for q in questions])
        out["study"] = study
        out["answers"] = [{"question": str(q), "answer": a} for q, a in zip(questions, answers, strict=True)]
    if references:
        out["vqa"] = evaluate_references(method, dm, read_references(references), split)
    return out


# --------------------------------------------------------------------------- downstream transfer
def downstream_datamodule(run_cfg: DictConfig, data: str, overrides: list[str], fraction: float, tokenizer: Any,
                          task: str | None = "classification", preset_data: dict[str, Any] | None = None):
    """The labelled datamodule of a transfer task: ``configs/data/<data>.yaml`` + ``overrides``, with the
    pretraining run's ``image_size`` / ``channels`` (what its encoder expects), ``data.task`` = the
    transfer task for datasets with several target kinds (RSNA, SIIM) and the task's own ``data``
    defaults (``configs/downstream/<task>.yaml``), each unless overridden (``task=None``: neither).
    ``preset_data`` (a protocol preset's ``data.*``, e.g. G2D's 224 px) wins over the run's and the
    task's values, the user's ``overrides`` over everything."""
    from medvlp.downstream.task import get_task

    dot = C.parse_overrides(overrides)
    cfg = C.compose(data=data, overrides=overrides, sections=("data",))
    given = set(dot.get("data", {}) or {})
    for key in ("image_size", "channels"):
        if key in cfg.data and key in run_cfg.data and key not in given:
            cfg.data[key] = run_cfg.data[key]
    if task is not None and "task" in cfg.data and "task" not in given and get_task(task).transfer:
        cfg.data.task = task
    for key, value in (get_task(task).data_defaults(given) if task is not None else {}).items():
        if key in cfg.data:
            cfg.data[key] = value
    unknown = sorted(k for k in (preset_data or {}) if k not in cfg.data)
    if unknown:
        raise C.ConfigError(f"The protocol preset sets data.{unknown[0]}, which {data} ({cfg.data.name}) does not have.")
    for key, value in (preset_data or {}).items():
        if key not in given:
            cfg.data[key] = value
    cfg.data.label_fraction = float(fraction)
    resolve_data_root(cfg)
    C.resolve(cfg)
    return build_datamodule(cfg, tokenizer=tokenizer), cfg


def downstream_plan(task: str, data: str, fraction: float, protocol: str, overrides: list[str] | None,
                    settings: dict[str, Any]) -> tuple[str, str, dict[str, Any], dict[str, Any], str]:
    """``(mode, preset, preset data, settings, headline metric)`` of a transfer run: ``protocol`` is a mode
    (``linear`` / ``frozen`` / ``finetune``) or a paper preset (``configs/protocol/<name>.yaml``), with
    ``settings["mode"]`` then choosing the mode; the preset's settings sit under the user's."""
    from medvlp.downstream.protocols import is_protocol, resolve

    settings = dict(settings)
    mode = str(settings.pop("mode", "") or "")
    if not is_protocol(protocol):
        return mode or protocol, "", {}, settings, ""
    name = C.compose(data=data, overrides=list(overrides or []), sections=("data",)).data.name
    r = resolve(protocol, task, str(name), float(fraction), mode)
    return r.mode, protocol, r.data, {**r.settings, **settings}, r.metric


def downstream(task: str, data: str, run_dir: str | Path, fraction: float = 1.0, protocol: str = "",
               seed: int = 0, overrides: list[str] | None = None, out: str | Path | None = None,
               **settings: Any) -> dict[str, Any]:
    """Transfer a run's image encoder to a labelled task and write ``result.json`` (+ plots).

    Args:
        task: a registered transfer task (``medvlp list tasks``: classification, segmentation, detection).
        data: a ``configs/data`` name with labels (e.g. ``demo_chexpert``, ``chexpert``, ``covidx``).
        run_dir: a pre-training run directory (any method).
        fraction: fraction of the training labels (the shared label-fraction files).
        protocol: a mode - ``linear`` / ``frozen`` (frozen encoder) or ``finetune`` - or a paper's preset
            (``mgca``, ``g2d``, ...: ``configs/protocol``, its settings under the ones given here; the
            setting ``mode`` then picks the mode); "" = the task's default mode and settings.
        seed: seed of the head and batch order.
        overrides: ``data.*`` and ``trainer.*`` overrides (``trainer.devices=2 trainer.strategy=ddp``,
            ``trainer.precision=bf16-mixed``); the length of training comes from the task's settings.
        out: output folder (default ``<run_dir>/downstream/<task>-<data>-[<preset>-]<mode>-f<fraction>-s<seed>``).
        settings: the task's settings (``Task.settings``: lr, batch_size, max_epochs, patience, max_steps, ...).
    """
    from medvlp.downstream.task import get_task

    t = get_task(task)
    if not t.transfer:
        raise C.ConfigError(f"{task} evaluates a run as it is: use medvlp {task} --run RUN (not medvlp downstream).")
    if not 0 < float(fraction) <= 1:
        raise C.ConfigError(f"fraction={fraction}: label fractions are in (0, 1], e.g. 0.01, 0.1 or 1.")
    mode, preset, preset_data, settings, metric = downstream_plan(task, data, fraction, protocol, overrides, settings)
    mode = t.check_protocol(mode)
    unknown = sorted(set(settings) - set(t.settings))
    if unknown:
        raise C.ConfigError(f"{task} takes no setting(s) {unknown}; its settings: {', '.join(t.settings)}.")
    method, run_cfg = load_run(run_dir)
    dm, cfg = downstream_datamodule(run_cfg, data, list(overrides or []), fraction, method.tokenizer, task, preset_data)
    label = f"{preset}-{mode}" if preset else mode
    folder = Path(out) if out else Path(run_dir) / "downstream" / f"{task}-{data}-{label}-f{fraction:g}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    res = t.run(method, dm, mode, seed, folder, settings, trainer_cfg=cfg.trainer)
    if res is None:  # another process of a multi-process run: rank 0 writes the result
        return {}
    res.update({"run": str(run_dir), "method": run_cfg.method.name, "data": data, "data_name": cfg.data.name,
                "preset": preset, "image_size": cfg.data.get("image_size")})
    if metric:
        res["headline"] = metric
    if dm.dropped:
        dm.write_dropped(folder / "dropped.csv")  # every study left out, by id and reason
    res["dropped"] = dm.dropped_summary()
    res.setdefault("files", {})["result"] = str(folder / "result.json")
    write_atomic(folder / "result.json", json.dumps(res, indent=2))  # a killed run leaves no partial result
    return res


__all__ = ["fit", "load_run", "evaluate", "evaluate_method", "downstream", "resolve_data_root"]

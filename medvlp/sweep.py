"""Benchmark sweep: methods x downstream tasks x label fractions x seeds, resumable, one summary.

``python -m medvlp.sweep --methods clip mgca --tasks classification segmentation --fractions 0.1 1``
(``make sweep``) pre-trains each method once where no finished run exists (``<runs>/<method>/``),
transfers its image encoder to every task x fraction x seed (:func:`medvlp.api.downstream`), evaluates
zero-shot / retrieval tasks on the run itself, and writes into ``<out>/``:

* ``summary.csv`` - one row per combination (method, task, data, protocol, fraction, seed, metric,
  value, seconds, status, result path, error);
* ``summary.md`` - methods as rows, one column per task x fraction, ``mean ± std (n)`` over the seeds;
* ``summary.png`` - the same numbers as grouped bars (one group per column, one bar per method).

Resumable at any point. A pre-training run is finished when its marker ``pretrain_done.json`` exists
(written after :func:`medvlp.api.fit` returns); a run without it continues from its last complete
checkpoint, or starts again when it has none. A combination is done when its
``<runs>/<method>/downstream/<task>-<data>-<protocol>-f<F>-s<seed>/result.json`` exists and parses (a
file cut short by a kill does not), so a sweep started again computes only what is missing. A
combination that fails is logged, marked ``failed`` in the summary and retried by the next sweep; the
others go on, and the sweep exits non-zero at the end.

A task is ``name[:data[:protocol]]`` (``classification``, ``classification:demo_covidx``,
``segmentation:demo_rsna:finetune``, ``detection:demo_object_cxr``, ``zeroshot``, ``retrieval``);
each task's default data, protocol and headline metric come from its registered task object
(``configs/downstream/<task>.yaml``). Without ``--roots``
everything runs on the synthetic demo world (``data.root=demo``); ``--roots chexpert=/data/chexpert``
passes ``data.root`` to every task on ``chexpert`` and makes it the default data of classification
(in place of its demo copy), and ``--pretrain-data mimic_cxr --pretrain-root /data/mimic`` pre-trains
on the real download.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp import config as C
from medvlp.cache import write_atomic
from medvlp.downstream.task import get_task, task_defaults
from medvlp.registry import METHODS, did_you_mean
from medvlp.registry import TASKS as TASK_REGISTRY

log = logging.getLogger("medvlp.sweep")  # also when run as python -m medvlp.sweep (__main__)

REQUEST = "sweep_request.json"  # what the sweep asked of a pre-training run (written before fit starts)
DONE = "pretrain_done.json"  # written after fit returns: the pre-training run is finished
RESULT = "result.json"
DEFAULT_DATA = "demo_cxr"  # pre-training data of a method config that names none (as `medvlp fit`)

HELP = "pre-train methods and evaluate them on tasks x label fractions x seeds (resumable); summary table and chart"
DESCRIPTION = (
    "Pre-train every method once (where no finished run exists under --runs), transfer it to every task x "
    "label fraction x seed, evaluate zero-shot / retrieval tasks on the run itself, and write summary.csv, "
    "summary.md (methods as rows, mean ± std over seeds) and summary.png under --out. Resumable: finished "
    "runs and combinations are skipped, an interrupted pre-training run continues from its last checkpoint. "
    "Runs on the synthetic demo world unless --roots / --pretrain-root name real datasets."
)
EXAMPLES = """examples:
  python -m medvlp.sweep                                    clip, mgca x classification, segmentation x 10 %, 100 %
  python -m medvlp.sweep --methods clip mgca g2d --tasks classification zeroshot --fractions 0.01 0.1 1 --seeds 0 1 2
  python -m medvlp.sweep --tasks classification:demo_covidx segmentation:demo_rsna retrieval
  python -m medvlp.sweep --tasks classification segmentation --roots chexpert=/data/chexpert \\
      siim_pneumothorax=/data/siim --pretrain-data mimic_cxr --pretrain-root /data/mimic-cxr-jpg/2.0.0
  python -m medvlp.sweep --dry-run                          list the combinations and what is done
"""


class SweepFailed(ValueError):
    """Some combinations failed; the summary marks them. A ``ValueError`` so that the command line
    reports it as a one-line error with a non-zero exit status."""


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskSpec:
    """One ``--tasks`` item, defaults filled in (``data`` ``""`` = each method's pre-training data)."""

    task: str
    data: str
    protocol: str


def parse_task(spec: str, roots: dict[str, str] | None = None) -> TaskSpec:
    """``name[:data[:protocol]]`` -> :class:`TaskSpec` with the defaults of :data:`TASKS`."""
    parts = [p.strip() for p in spec.split(":")]
    name = parts[0].lower()
    names = TASK_REGISTRY.names()
    if name not in names or len(parts) > 3:
        what = f"Unknown task '{parts[0]}'.{did_you_mean(name, names)}" if name not in names else "Too many ':' parts."
        raise C.ConfigError(f"--tasks {spec}: {what} A task is name[:data[:protocol]] with name one of "
                            f"{', '.join(names)} (e.g. classification:demo_covidx, segmentation:demo_rsna:finetune).")
    task = get_task(name)
    d = task.defaults
    data = parts[1] if len(parts) > 1 else ""
    protocol = parts[2] if len(parts) > 2 else ""
    if not task.transfer:
        if protocol:
            raise C.ConfigError(f"--tasks {spec}: {name} evaluates the pre-trained run as it is and takes no protocol; "
                                f"use {name} or {name}:DATA.")
        return TaskSpec(name, data, "")
    try:
        protocol = task.check_protocol(protocol)
    except C.ConfigError as err:
        raise C.ConfigError(f"--tasks {spec}: {err}") from None
    if not data:
        data = d.real_data if d.real_data in (roots or {}) else d.demo_data
    return TaskSpec(name, data, protocol)


# --------------------------------------------------------------------------- the grid
@dataclass
class SweepConfig:
    """Everything a sweep needs (the command-line flags of the same names)."""

    methods: list[str] = field(default_factory=lambda: ["clip", "mgca"])
    tasks: list[str] = field(default_factory=lambda: ["classification", "segmentation"])
    fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    out: str = "results"
    runs: str = "runs/sweep"
    pretrain_steps: int = 200  # <= 0: the method's own schedule (trainer.max_epochs)
    pretrain_data: str = ""  # "" = the method config's default data (demo_cxr for the 2D methods)
    pretrain_root: str = ""  # data.root of the pre-training data ("" = --roots entry, else the config's)
    pretrain_overrides: list[str] = field(default_factory=list)  # more key=value for pre-training
    experiments: dict[str, str] = field(default_factory=dict)  # method -> a --config file (e.g. configs/experiment/*.yaml)
    roots: dict[str, str] = field(default_factory=dict)  # data config name -> data.root
    settings: dict[str, Any] = field(default_factory=dict)  # downstream settings: max_epochs, max_steps, ...


@dataclass(frozen=True)
class Combination:
    """One cell of the grid: a method's run on one task, data, protocol, label fraction and seed
    (``fraction`` and ``seed`` are None for tasks that evaluate the run as it is)."""

    method: str
    task: str
    data: str
    protocol: str
    fraction: float | None = None
    seed: int | None = None
    root: str = ""  # data.root override ("" = the data config's)

    @property
    def name(self) -> str:
        if self.fraction is None:
            return f"{self.task}-{self.data}"
        return f"{self.task}-{self.data}-{self.protocol}-f{self.fraction:g}-s{self.seed}"

    @property
    def column(self) -> tuple[str, str, str, float | None]:
        return (self.task, self.data, self.protocol, self.fraction)

    def folder(self, runs: str | Path) -> Path:
        return Path(runs) / self.method / "downstream" / self.name

    def describe(self) -> str:
        if self.fraction is None:
            return f"{self.method} {self.task} {self.data}"
        return f"{self.method} {self.task} {self.data} {self.protocol} f={self.fraction:g} s={self.seed}"


def pretrain_data_of(cfg: SweepConfig, method: str) -> str:
    """The data config a method pre-trains on: ``--pretrain-data``, else its experiment file's, else its
    method config's default (``demo_cxr`` for the 2D methods)."""
    if cfg.pretrain_data:
        return cfg.pretrain_data
    for layer in ([C.load_yaml(cfg.experiments[method])] if method in cfg.experiments else []) + [
            C.load_yaml(C.group_file("method", method))]:
        data = (layer.get("compose") or {}).get("data")
        if data:
            return str(data)
    return DEFAULT_DATA


def pretrain_root_of(cfg: SweepConfig, method: str) -> str:
    return cfg.pretrain_root or cfg.roots.get(pretrain_data_of(cfg, method), "")


def grid(cfg: SweepConfig) -> list[Combination]:
    """Every combination of the sweep, method by method, in the order of the flags."""
    specs = [parse_task(t, cfg.roots) for t in cfg.tasks]
    out: list[Combination] = []
    for method in cfg.methods:
        for spec in specs:
            if get_task(spec.task).transfer:
                root = cfg.roots.get(spec.data, "")
                out += [Combination(method, spec.task, spec.data, spec.protocol, float(f), int(s), root)
                        for f in cfg.fractions for s in cfg.seeds]
            else:
                own = pretrain_data_of(cfg, method)
                data = spec.data or own
                out.append(Combination(method, spec.task, data, "", root="" if data == own else cfg.roots.get(data, "")))
    return list(dict.fromkeys(out))  # a task given twice runs once


def settings_for(cfg: SweepConfig, combo: Combination) -> dict[str, Any]:
    """Downstream settings of a combination: the flags, then the task's quick settings on demo data."""
    settings = dict(cfg.settings)
    if _is_demo(combo.data) and not combo.root and not {"max_epochs", "max_steps"} & set(settings):
        settings.update(get_task(combo.task).defaults.demo_settings)  # a length given on the command line replaces them
    return settings


def _is_demo(data: str) -> bool:
    node = C.load_yaml(C.group_file("data", data)).get("data") or {}
    return str(node.get("root", "")) == "demo"


def _needs_root(data: str) -> bool:
    node = C.load_yaml(C.group_file("data", data)).get("data") or {}
    return str(node.get("root", "???")) == "???"


# --------------------------------------------------------------------------- validation
def pretrain_request(cfg: SweepConfig, method: str) -> dict[str, Any]:
    """What the sweep asks of a method's pre-training run (a run made with other settings is not reused)."""
    return {"method": method, "config": cfg.experiments.get(method, ""), "data": pretrain_data_of(cfg, method),
            "root": pretrain_root_of(cfg, method), "steps": int(cfg.pretrain_steps), "overrides": list(cfg.pretrain_overrides)}


def pretrain_overrides(cfg: SweepConfig, method: str) -> list[str]:
    ov = [f"run.out_dir={Path(cfg.runs).resolve()}", f"run.name={method}", "trainer.enable_progress_bar=false"]
    if cfg.pretrain_steps > 0:
        ov += [f"trainer.max_steps={int(cfg.pretrain_steps)}", "trainer.max_epochs=-1"]
    root = pretrain_root_of(cfg, method)
    if root:
        ov.append(f"data.root={root}")
    return ov + list(cfg.pretrain_overrides)


def compose_pretrain(cfg: SweepConfig, method: str):
    """The resolved pre-training config of a method (demo data generated, a real root's layout checked)."""
    from medvlp import api

    config_file = cfg.experiments.get(method) or None
    if config_file:
        named = (C.load_yaml(config_file).get("compose") or {}).get("method", method)
        if named != method:
            raise C.ConfigError(f"--experiments {method}={config_file}: the file composes method '{named}', not '{method}'.")
    run_cfg = C.compose(method=method, data=pretrain_data_of(cfg, method), config_file=config_file,
                        overrides=pretrain_overrides(cfg, method))
    api.resolve_data_root(run_cfg)
    return C.resolve(run_cfg)


def validate(cfg: SweepConfig, combos: list[Combination]) -> None:
    """Fail before any work: unknown methods, tasks or data, missing or wrong data roots, a run folder
    made with other pre-training settings."""
    from medvlp import api

    if not cfg.methods or not cfg.tasks:
        raise C.ConfigError("A sweep needs at least one method (--methods) and one task (--tasks).")
    known = METHODS.names()
    for m in cfg.methods:
        if m not in known:
            raise C.ConfigError(f"Unknown method '{m}'.{did_you_mean(m, known)} Available: {', '.join(known)}.")
        C.group_file("method", m)
    bad = [f for f in cfg.fractions if not 0 < f <= 1]
    if bad or not cfg.fractions:
        raise C.ConfigError(f"--fractions {bad or '(none)'}: label fractions are in (0, 1], e.g. --fractions 0.01 0.1 1.")
    if not cfg.seeds:
        raise C.ConfigError("--seeds is empty; give at least one seed, e.g. --seeds 0.")
    options = C.group_options("data")
    for method in cfg.experiments:
        if method not in cfg.methods:
            raise C.ConfigError(f"--experiments {method}=...: '{method}' is not one of --methods ({' '.join(cfg.methods)}).")
    for name in cfg.roots:
        if name not in options:
            raise C.ConfigError(f"--roots {name}=...: no data config '{name}'.{did_you_mean(name, options)} "
                                f"Available: {', '.join(options)}.")
    checked: set[tuple[str, str]] = set()
    for combo in combos:
        own = not get_task(combo.task).transfer and combo.data == pretrain_data_of(cfg, combo.method)
        if own or (combo.data, combo.root) in checked:  # the pre-training data is checked below
            continue
        checked.add((combo.data, combo.root))
        C.group_file("data", combo.data)
        if _needs_root(combo.data) and not combo.root:
            copies = [c for c in (f"demo_{combo.data}", f"demo_{combo.data.split('_')[0]}") if c in options]
            demo = f" or use its synthetic copy {combo.task}:{copies[0]}" if copies else ""
            raise C.ConfigError(f"Task {combo.task} on '{combo.data}' needs the dataset's folder: --roots {combo.data}=/path "
                                f"(make sweep ROOTS=\"{combo.data}=/path\"){demo}.")
        data_cfg = C.compose(data=combo.data, overrides=[f"data.root={combo.root}"] if combo.root else [], sections=("data",))
        api.resolve_data_root(data_cfg)  # generates the demo copy once; checks a real root's layout
    for method in cfg.methods:
        data = pretrain_data_of(cfg, method)
        if _needs_root(data) and not pretrain_root_of(cfg, method):
            raise C.ConfigError(f"Pre-training on '{data}' needs the dataset's folder: --pretrain-root /path "
                                f"(make sweep PRETRAIN_ROOT=/path).")
        run_dir = Path(cfg.runs) / method
        old = _read_json(run_dir / REQUEST)
        want = pretrain_request(cfg, method)
        if old is not None and old != want:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {want[k]!r}" for k in want if old.get(k) != want[k])
            raise C.ConfigError(f"{run_dir} holds a pre-training run made with other settings ({diff}); pass another "
                                f"--runs folder (make sweep RUNS=...) or delete {run_dir}.")
        if not (run_dir / DONE).is_file():
            compose_pretrain(cfg, method)  # checks the method config, the overrides and the data root


# --------------------------------------------------------------------------- the work
def _read_json(path: Path) -> dict[str, Any] | None:
    """The parsed JSON object in ``path``; None when missing, cut short or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _write_json(path: Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str))


def is_done(cfg: SweepConfig, combo: Combination) -> bool:
    return _read_json(combo.folder(cfg.runs) / RESULT) is not None


def ensure_pretrained(cfg: SweepConfig, method: str) -> Path:
    """The finished pre-training run of ``method`` in ``<runs>/<method>``: reused when its marker exists,
    continued from its last complete checkpoint when it has one, else (re)started from scratch."""
    from medvlp import api

    run_dir = Path(cfg.runs).resolve() / method
    if (run_dir / DONE).is_file():
        log.info("%s: pre-training done before (%s)", method, run_dir)
        return run_dir
    start = time.perf_counter()
    resumed = ""
    if (run_dir / api.CONFIG_NAME).is_file():
        try:
            resumed = str(api.latest_checkpoint(run_dir))
        except FileNotFoundError:
            resumed = ""
    if resumed:
        log.info("%s: continuing the interrupted pre-training run %s from %s", method, run_dir, Path(resumed).name)
        api.fit(api.load_config(run_dir), resume=run_dir)
    else:
        if run_dir.exists():
            log.info("%s: %s stopped before its first checkpoint; starting it again", method, run_dir)
            shutil.rmtree(run_dir)
        run_cfg = compose_pretrain(cfg, method)
        run_dir.mkdir(parents=True)
        _write_json(run_dir / REQUEST, pretrain_request(cfg, method))
        log.info("%s: pre-training on %s (%s)", method, pretrain_data_of(cfg, method),
                 f"{cfg.pretrain_steps} steps" if cfg.pretrain_steps > 0 else "the config's epochs")
        api.fit(run_cfg)
    seconds = time.perf_counter() - start
    _write_json(run_dir / DONE, {**pretrain_request(cfg, method), "seconds": seconds, "resumed_from": resumed or None,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log.info("%s: pre-training finished in %.0f s", method, seconds)
    return run_dir


def run_combination(cfg: SweepConfig, combo: Combination, run_dir: Path) -> dict[str, Any]:
    """Compute one combination and write its ``result.json`` (with the seconds it took)."""
    from medvlp import api

    folder = combo.folder(cfg.runs)
    start = time.perf_counter()
    overrides = [f"data.root={combo.root}"] if combo.root else []
    if get_task(combo.task).transfer:
        res = api.downstream(combo.task, combo.data, run_dir, fraction=combo.fraction, protocol=combo.protocol,
                             seed=combo.seed, overrides=overrides, out=folder, **settings_for(cfg, combo))
    elif combo.data == pretrain_data_of(cfg, combo.method):
        res = api.evaluate(run_dir, tasks=(combo.task,), split="test")
    else:  # the run on another dataset's test split, at the run's image size, channels and text length
        method, run_cfg = api.load_run(run_dir)
        overrides.append(f"data.max_length={run_cfg.data.max_length}")
        _, data_cfg = api.downstream_datamodule(run_cfg, combo.data, overrides, 1.0, method.tokenizer)
        res = api.evaluate_method(method, data_cfg, (combo.task,), "test")
        res["run"] = str(run_dir)
    res = dict(res)
    res["sweep"] = {"seconds": time.perf_counter() - start, "combination": combo.describe(),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json(folder / RESULT, res)
    return res


@dataclass
class SweepOutcome:
    """What a sweep did: the summary rows, this invocation's failures and counts, the files written."""

    rows: list[Row]
    failures: dict[str, str]
    computed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def run_sweep(cfg: SweepConfig, dry_run: bool = False, summary_only: bool = False) -> SweepOutcome:
    """Run (or finish) the sweep and write the summary; see the module docstring.

    Args:
        cfg: the sweep.
        dry_run: validate and list every combination with its state; compute and write nothing.
        summary_only: write the summary of what is done so far; compute nothing.

    Returns:
        The outcome; ``outcome.failures`` maps ``<method>/<combination name>`` to its error.
    """
    start = time.perf_counter()
    combos = grid(cfg)
    if summary_only:
        rows = collect(cfg, combos, {})
        return SweepOutcome(rows, {}, files=write_summary(cfg, rows), seconds=time.perf_counter() - start)
    validate(cfg, combos)
    if dry_run:
        for method in cfg.methods:
            state = "done" if (Path(cfg.runs) / method / DONE).is_file() else "to run"
            print(f"{method}: pre-training {state} ({Path(cfg.runs) / method})")
        for i, combo in enumerate(combos, 1):
            print(f"[{i}/{len(combos)}] {combo.describe()}: {'done' if is_done(cfg, combo) else 'to run'}")
        return SweepOutcome([], {}, seconds=time.perf_counter() - start)
    failures: dict[str, str] = {}
    computed = skipped = 0
    for method in cfg.methods:
        mine = [(i, c) for i, c in enumerate(combos, 1) if c.method == method]
        todo = [(i, c) for i, c in mine if not is_done(cfg, c)]
        for i, combo in mine:
            if (i, combo) not in todo:
                skipped += 1
                log.info("[%d/%d] %s: skipped (done before)", i, len(combos), combo.describe())
        if not todo:
            continue
        try:
            run_dir = ensure_pretrained(cfg, method)
        except Exception as err:  # one method's failure must not stop the others
            log.error("%s: pre-training failed: %s: %s", method, type(err).__name__, err)
            for i, combo in todo:
                failures[_key(combo)] = f"pre-training failed: {type(err).__name__}: {err}"
                log.error("[%d/%d] %s: failed (no pre-training run)", i, len(combos), combo.describe())
            continue
        for i, combo in todo:
            t0 = time.perf_counter()
            try:
                res = run_combination(cfg, combo, run_dir)
            except Exception as err:  # logged, summarised, retried by the next sweep
                failures[_key(combo)] = f"{type(err).__name__}: {err}"
                log.error("[%d/%d] %s: FAILED after %.0f s: %s: %s", i, len(combos), combo.describe(),
                          time.perf_counter() - t0, type(err).__name__, err)
                log.debug("traceback of %s", combo.describe(), exc_info=True)
                continue
            computed += 1
            try:
                metric, value = headline(combo.task, res)
                text = f"{metric} {value:.3f}"
            except (KeyError, TypeError, ValueError):
                text = f"but no {get_task(combo.task).defaults.metric} in its result"
            log.info("[%d/%d] %s: done, %s (%.0f s)", i, len(combos), combo.describe(), text, time.perf_counter() - t0)
    rows = collect(cfg, combos, failures)
    elapsed = time.perf_counter() - start
    files = write_summary(cfg, rows, elapsed=elapsed, computed=computed, skipped=skipped)
    return SweepOutcome(rows, failures, computed, skipped, elapsed, files)


def _key(combo: Combination) -> str:
    return f"{combo.method}/{combo.name}"


# --------------------------------------------------------------------------- summary
@dataclass
class Row:
    """One combination in the summary (``status``: ok | failed | missing)."""

    combo: Combination
    status: str
    metric: str = ""
    value: float = math.nan
    seconds: float = math.nan
    path: str = ""
    error: str = ""


def headline(task: str, res: dict[str, Any]) -> tuple[str, float]:
    """The task's headline metric of a result: (key, value) (``Task.headline``)."""
    return get_task(task).headline(res)


def metric_label(task: str, metric: str) -> str:
    return get_task(task).metric_label(metric)


def collect(cfg: SweepConfig, combos: list[Combination], failures: dict[str, str]) -> list[Row]:
    """One row per combination from its ``result.json`` (or this sweep's error)."""
    rows = []
    for combo in combos:
        path = combo.folder(cfg.runs) / RESULT
        res = _read_json(path)
        if res is None:
            err = failures.get(_key(combo), "")
            rows.append(Row(combo, "failed" if err else "missing", get_task(combo.task).defaults.metric, error=err))
            continue
        try:
            metric, value = headline(combo.task, res)
        except (KeyError, TypeError, ValueError) as err:
            rows.append(Row(combo, "failed", get_task(combo.task).defaults.metric, path=str(path), error=f"no metric {err} in {path}"))
            continue
        seconds = (res.get("sweep") or {}).get("seconds", res.get("seconds", math.nan))
        rows.append(Row(combo, "ok", metric, value, float(seconds), str(path)))
    return rows


@dataclass
class Cell:
    """The seeds of one method x column: mean, sample standard deviation (n >= 2), count, failures."""

    values: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.values else math.nan

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0 if self.values else math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def text(self) -> str:
        if not self.values:
            return "failed" if self.failed else "–"
        out = f"{self.mean:.3f} ± {self.std:.3f} ({self.n})" if self.n > 1 else f"{self.mean:.3f} ({self.n})"
        return out + (f", {self.failed} failed" if self.failed else "")


def fraction_text(fraction: float | None) -> str:
    return "–" if fraction is None else f"{fraction * 100:g}%"


@dataclass(frozen=True)
class Column:
    """One column of the table: a task on one data, protocol and label fraction, and its metric's label."""

    key: tuple[str, str, str, float | None]
    label: str

    @property
    def lines(self) -> list[str]:
        """Task / data (and the protocol when it is not the task's default) / metric @ fraction."""
        task, data, protocol, fraction = self.key
        shown = f" {protocol}" if protocol and protocol != task_defaults(task).protocol else ""
        return [task, data + shown, f"{self.label} @ {fraction_text(fraction)}"]

    @property
    def heading(self) -> str:
        """E.g. ``classification demo_chexpert AUROC @ 10%``."""
        return " ".join(self.lines)


def aggregate(rows: list[Row]) -> tuple[list[str], list[Column], dict[tuple[str, tuple], Cell]]:
    """Rows -> (methods, columns, cells by (method, column key)), in the order of the rows."""
    methods = list(dict.fromkeys(r.combo.method for r in rows))
    keys = list(dict.fromkeys(r.combo.column for r in rows))
    cells = {(m, k): Cell() for m in methods for k in keys}
    metrics: dict[tuple, str] = {}
    for r in rows:
        cell = cells[r.combo.method, r.combo.column]
        if r.status == "ok":
            cell.values.append(r.value)
            metrics.setdefault(r.combo.column, r.metric)
        elif r.status == "failed":
            cell.failed += 1
    columns = [Column(k, metric_label(k[0], metrics.get(k, task_defaults(k[0]).metric))) for k in keys]
    return methods, columns, cells


def summary_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "task", "data", "protocol", "fraction", "seed", "metric", "value", "seconds", "status",
                "result", "error"])
    for r in rows:
        c = r.combo
        w.writerow([c.method, c.task, c.data, c.protocol, "" if c.fraction is None else f"{c.fraction:g}",
                    "" if c.seed is None else c.seed, r.metric, "" if math.isnan(r.value) else repr(r.value),
                    "" if math.isnan(r.seconds) else f"{r.seconds:.1f}", r.status, r.path, r.error])
    return buf.getvalue()


def summary_markdown(cfg: SweepConfig, rows: list[Row], elapsed: float | None = None, computed: int = 0,
                     skipped: int = 0) -> str:
    """Methods as rows, one column per task x fraction (best mean in bold), then times and settings."""
    methods, columns, cells = aggregate(rows)
    lines = ["# Benchmark sweep", "",
             "Methods as rows; one column per task, data, metric and label fraction (– = no labels: the pre-trained "
             "run as it is): mean ± sample standard deviation over seeds (number of seeds); the best mean of a "
             "column in bold.", "",
             "| method | " + " | ".join(c.heading for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    best: dict[tuple, float] = {}
    for col in columns:
        means = [cells[m, col.key].mean for m in methods if cells[m, col.key].n]
        if len(means) > 1:
            best[col.key] = max(means)
    for m in methods:
        texts = [f"**{cells[m, c.key].text()}**" if cells[m, c.key].n and cells[m, c.key].mean == best.get(c.key)
                 else cells[m, c.key].text() for c in columns]
        lines.append(f"| {m} | " + " | ".join(texts) + " |")
    done = {m: _read_json(Path(cfg.runs) / m / DONE) for m in methods}
    pre = {m: float(d.get("seconds", 0.0)) for m, d in done.items() if d}
    ok = [r for r in rows if r.status == "ok"]
    transfer = sum(r.seconds for r in ok if not math.isnan(r.seconds))
    steps = f"{cfg.pretrain_steps} steps" if cfg.pretrain_steps > 0 else "the configs' epochs"
    data = ", ".join(sorted({pretrain_data_of(cfg, m) for m in methods}))
    pre_text = ", ".join(f"{m} {s:.0f} s" + (" (continued)" if done[m].get("resumed_from") else "") for m, s in pre.items())
    total = transfer + sum(pre.values())
    lines += ["", f"Time: pre-training ({steps} on {data}) {pre_text or 'not finished'}; transfer and evaluation "
                  f"{transfer:.0f} s for {len(ok)} of {len(rows)} combinations; total compute {total:.0f} s ({total / 60:.1f} min)."]
    if elapsed is not None:
        lines.append(f"This sweep: {elapsed:.0f} s wall, {computed} combinations computed, {skipped} skipped (done before).")
    roots = {**cfg.roots, **({"pre-training": cfg.pretrain_root} if cfg.pretrain_root else {})}
    used = {r.combo.task for r in rows}
    demo = {t: task_defaults(t).demo_settings for t in sorted(used)}
    quick = "; ".join(f"{t} {', '.join(f'{k}={v}' for k, v in d.items())}" for t, d in demo.items() if d)
    given = ", ".join(f"{k}={v}" for k, v in cfg.settings.items())
    lines.append(f"Settings: methods {' '.join(cfg.methods)}; tasks {' '.join(cfg.tasks)}; fractions "
                 f"{' '.join(f'{f:g}' for f in cfg.fractions)}; seeds {' '.join(str(s) for s in cfg.seeds)}; downstream "
                 f"{given or 'protocol defaults' + (f' (on demo data: {quick})' if quick else '')}; data "
                 f"{', '.join(f'{k}={v}' for k, v in roots.items()) or 'the synthetic demo world'}; runs in {cfg.runs}.")
    bad = [r for r in rows if r.status != "ok"]
    if bad:
        lines += ["", f"Not done ({len(bad)}):", ""]
        lines += [f"- {r.combo.describe()}: {r.status}{': ' + r.error if r.error else ''}" for r in bad]
    return "\n".join(lines) + "\n"


def summary_png(rows: list[Row], title: str = "") -> bytes:
    """Grouped bars as PNG bytes: one group per column (task x data x fraction), one bar per method,
    error bars = standard deviation over seeds, the mean written above each bar, a legend."""
    from PIL import Image, ImageDraw

    from medvlp.downstream.plots import COLOURS

    methods, columns, cells = aggregate(rows)
    bar, pad, plot_h = 30, 24, 300
    group = max(len(methods) * bar + pad, 130)
    left, top, bottom, legend = 56, 44, 56, 150
    width = left + group * max(len(columns), 1) + legend
    img = Image.new("RGB", (width, top + plot_h + bottom), "white")
    d = ImageDraw.Draw(img)

    def y(v: float) -> float:
        return top + (1.0 - min(max(v, 0.0), 1.0)) * plot_h

    def centred(text: str, x: float, y_: float) -> None:
        while len(text) > 4 and d.textlength(text) > group - 6:
            text = text[:-1]
        d.text((x - d.textlength(text) / 2, y_), text, fill="black")

    d.text((left, 12), title or "benchmark sweep: mean over seeds, error bars = standard deviation", fill="black")
    right = left + group * len(columns)
    for t in (0.25, 0.5, 0.75, 1.0):
        d.line([(left, y(t)), (right, y(t))], fill=(225, 225, 225))
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.text((left - 32, y(t) - 6), f"{t:.2f}", fill="black")
    d.line([(left, y(0)), (right, y(0))], fill="black")
    d.line([(left, y(0)), (left, y(1))], fill="black")
    for g, col in enumerate(columns):
        x0 = left + g * group + (group - len(methods) * bar) / 2
        for i, m in enumerate(methods):
            cell, colour, bx = cells[m, col.key], COLOURS[i % len(COLOURS)], x0 + i * bar
            cx = bx + bar / 2
            if not cell.n:
                centred("failed" if cell.failed else "-", cx, y(0) - 14)
                continue
            d.rectangle([bx + 3, y(cell.mean), bx + bar - 3, y(0)], fill=colour)
            top_y = y(cell.mean)
            if cell.n > 1 and cell.std > 0:
                lo, hi = y(cell.mean - cell.std), y(cell.mean + cell.std)
                d.line([(cx, lo), (cx, hi)], fill="black")
                d.line([(cx - 4, hi), (cx + 4, hi)], fill="black")
                d.line([(cx - 4, lo), (cx + 4, lo)], fill="black")
                top_y = hi
            label = f"{cell.mean:.2f}"
            d.text((cx - d.textlength(label) / 2, top_y - 13), label, fill="black")
        for j, line in enumerate(col.lines):
            centred(line.replace("@ –", "(no labels)"), left + g * group + group / 2, top + plot_h + 6 + 14 * j)
    lx = right + 16
    for i, m in enumerate(methods):
        d.rectangle([lx, top + 18 * i, lx + 12, top + 18 * i + 12], fill=COLOURS[i % len(COLOURS)])
        d.text((lx + 18, top + 18 * i), m, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_summary(cfg: SweepConfig, rows: list[Row], elapsed: float | None = None, computed: int = 0,
                  skipped: int = 0) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``cfg.out`` (each atomically)."""
    out = Path(cfg.out)
    files = {
        "csv": write_atomic(out / "summary.csv", summary_csv(rows)),
        "md": write_atomic(out / "summary.md", summary_markdown(cfg, rows, elapsed, computed, skipped)),
        "png": write_atomic(out / "summary.png", summary_png(rows)),
    }
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return files


# --------------------------------------------------------------------------- command line
def _pairs(items: list[str], flag: str) -> dict[str, str]:
    example = "--experiments mgca=configs/experiment/mgca_vit_mimic.yaml" if flag == "--experiments" else f"{flag} chexpert=/data/chexpert"
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise C.ConfigError(f"{flag} {item}: expected NAME=PATH, e.g. {example}.")
        out[name] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sweep's flags (``python -m medvlp.sweep`` and ``medvlp sweep``)."""
    d = SweepConfig()
    parser.add_argument("--methods", nargs="+", default=d.methods, metavar="METHOD", help=f"methods to pre-train (default {' '.join(d.methods)})")
    parser.add_argument("--tasks", nargs="+", default=d.tasks, metavar="TASK",
                        help="name[:data[:protocol]], name a registered task (medvlp list tasks; default "
                        + " ".join(d.tasks) + "); a transfer task's default data, protocol and metric are in "
                        "configs/downstream/<task>.yaml; evaluation tasks (zeroshot, retrieval) use the pre-training data's "
                        "test split")
    parser.add_argument("--fractions", nargs="+", type=float, default=d.fractions, metavar="F", help="label fractions (default 0.1 1)")
    parser.add_argument("--seeds", nargs="+", type=int, default=d.seeds, metavar="S", help="seeds of the transfer heads (default 0)")
    parser.add_argument("--out", default=d.out, help=f"where the summary goes (default {d.out})")
    parser.add_argument("--runs", default=d.runs, help=f"pre-training runs and their results, one folder per method (default {d.runs})")
    parser.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, metavar="N",
                        help=f"optimiser steps of each pre-training run (default {d.pretrain_steps}; 0 = the config's epochs)")
    parser.add_argument("--pretrain-data", default="", metavar="DATA", help="configs/data name to pre-train on (default: the method's, demo_cxr)")
    parser.add_argument("--pretrain-root", default="", metavar="PATH", help="data.root of the pre-training data (real data)")
    parser.add_argument("--pretrain-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more pre-training overrides, e.g. data.reports_root=/data/reports trainer.precision=bf16-mixed")
    parser.add_argument("--experiments", nargs="*", default=[], metavar="METHOD=FILE",
                        help="pre-train a method with a config file, e.g. mgca=configs/experiment/mgca_vit_mimic.yaml "
                             "(with --pretrain-steps 0 its own schedule)")
    parser.add_argument("--roots", nargs="*", default=[], metavar="DATA=PATH",
                        help="real datasets: data config name = its folder (e.g. chexpert=/data/chexpert siim_pneumothorax=/data/siim)")
    parser.add_argument("--max-epochs", type=int, metavar="N", help="downstream: at most this many epochs (default: the protocol's)")
    parser.add_argument("--max-steps", type=int, metavar="N", help="downstream: at most this many optimiser steps (quick runs)")
    parser.add_argument("--patience", type=int, metavar="N", help="downstream: early-stopping patience in epochs")
    parser.add_argument("--batch-size", type=int, metavar="N", help="downstream batch size")
    parser.add_argument("--lr", type=float, help="downstream learning rate")
    parser.add_argument("--dry-run", action="store_true", help="check everything and list the combinations; run nothing")
    parser.add_argument("--summary-only", action="store_true", help="write the summary of what is done so far; run nothing")
    return parser


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    settings = {k: getattr(args, k) for k in ("max_epochs", "max_steps", "patience", "batch_size", "lr")
                if getattr(args, k, None) is not None}
    return SweepConfig(methods=list(dict.fromkeys(args.methods)), tasks=list(dict.fromkeys(args.tasks)),
                       fractions=list(dict.fromkeys(args.fractions)), seeds=list(dict.fromkeys(args.seeds)),
                       out=args.out, runs=args.runs, pretrain_steps=args.pretrain_steps, pretrain_data=args.pretrain_data,
                       pretrain_root=args.pretrain_root, pretrain_overrides=list(args.pretrain_overrides),
                       experiments=_pairs(args.experiments, "--experiments"), roots=_pairs(args.roots, "--roots"),
                       settings=settings)


def cmd_sweep(args: argparse.Namespace) -> SweepOutcome:
    """Run the sweep of parsed flags; raises :class:`SweepFailed` when a combination failed."""
    cfg = config_from_args(args)
    outcome = run_sweep(cfg, dry_run=args.dry_run, summary_only=args.summary_only)
    if outcome.files:
        print(f"\n{outcome.files['md'].read_text()}\nwrote {', '.join(str(p) for p in outcome.files.values())}")
    if outcome.failures:
        raise SweepFailed(f"{len(outcome.failures)} of {len(outcome.rows)} combinations failed "
                          f"({', '.join(list(outcome.failures)[:3])}{', ...' if len(outcome.failures) > 3 else ''}); "
                          f"see {outcome.files.get('csv', cfg.out)}. Run the same command again to retry them.")
    return outcome


def main(argv: list[str] | None = None) -> int:
    """``python -m medvlp.sweep``: 0 when every combination is done, 1 when some failed, 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m medvlp.sweep", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    args = add_arguments(parser).parse_args(argv)
    from medvlp.cli import _setup_logging
    from medvlp.datamodules.base import DataError
    from medvlp.registry import RegistryError

    _setup_logging(args.verbose)
    try:
        cmd_sweep(args)
    except SweepFailed as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 1
    except (C.ConfigError, DataError, RegistryError, FileNotFoundError, OSError, ValueError) as err:
        if args.verbose:
            raise
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["Column", "Combination", "SweepConfig", "SweepFailed", "SweepOutcome", "add_arguments", "aggregate",
           "cmd_sweep", "grid", "main", "parse_task", "run_sweep", "write_summary"]


if __name__ == "__main__":
    sys.exit(main())

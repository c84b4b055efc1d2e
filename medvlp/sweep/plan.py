"""The sweep's plan: task specs, the grid of combinations, and the checks made before any work."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp import config as C
from medvlp.downstream.task import get_task
from medvlp.registry import METHODS, did_you_mean
from medvlp.registry import TASKS as TASK_REGISTRY

log = logging.getLogger("medvlp.sweep")  # also when run as python -m medvlp.sweep (__main__)

REQUEST = "sweep_request.json"  # what the sweep asked of a pre-training run (written before fit starts)
DONE = "pretrain_done.json"  # written after fit returns: the pre-training run is finished
RESULT = "result.json"
DEFAULT_DATA = "demo_cxr"  # pre-training data of a method config that names none (as `medvlp fit`)


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskSpec:
    """One ``--tasks`` item, defaults filled in (``data`` ``""`` = each method's pre-training data)."""

    task: str
    data: str
    protocol: str


def _presets() -> list[str]:
    from medvlp.downstream.protocols import protocol_names

    return protocol_names()


def parse_task(spec: str, roots: dict[str, str] | None = None) -> TaskSpec:
    """``name[:data[:protocol]]`` -> :class:`TaskSpec` with the defaults of :data:`TASKS`; ``protocol`` is a mode
    of a transfer task or a paper's preset (``configs/protocol``: ``segmentation:siim_pneumothorax:g2d``)."""
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
    from medvlp.downstream.protocols import is_protocol, load_protocol

    if is_protocol(protocol):  # a paper's preset (configs/protocol): it must cover the task
        if name not in load_protocol(protocol).tasks:
            raise C.ConfigError(f"--tasks {spec}: protocol '{protocol}' has no {name} protocol; it covers "
                                f"{', '.join(load_protocol(protocol).tasks)}.")
    elif not task.transfer:
        if protocol:
            raise C.ConfigError(f"--tasks {spec}: {name} evaluates the pre-trained run as it is and takes no protocol "
                                f"but a paper's preset ({', '.join(_presets())}); use {name} or {name}:DATA.")
        return TaskSpec(name, data, "")
    else:
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
            return f"{self.task}-{self.data}" + (f"-{self.protocol}" if self.protocol else "")
        return f"{self.task}-{self.data}-{self.protocol}-f{self.fraction:g}-s{self.seed}"

    @property
    def column(self) -> tuple[str, str, str, float | None]:
        return (self.task, self.data, self.protocol, self.fraction)

    def folder(self, runs: str | Path) -> Path:
        return Path(runs) / self.method / "downstream" / self.name

    def describe(self) -> str:
        if self.fraction is None:
            return f"{self.method} {self.task} {self.data}" + (f" {self.protocol}" if self.protocol else "")
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
                out.append(Combination(method, spec.task, data, spec.protocol, root="" if data == own else cfg.roots.get(data, "")))
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


def _read_json(path: Path) -> dict[str, Any] | None:
    """The parsed JSON object in ``path``; None when missing, cut short or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _key(combo: Combination) -> str:
    return f"{combo.method}/{combo.name}"

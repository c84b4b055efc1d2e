"""Downstream tasks as registered objects: one task registry drives ``api``, ``cli`` and ``sweep``.

A task is a subclass of :class:`Task` in a module of ``medvlp.downstream`` (or a plug-in package),
registered with ``@register_task("name")``, plus ``configs/downstream/<name>.yaml`` (its defaults,
schema :class:`TaskDefaults`). Nothing else names it: ``medvlp downstream --task``, ``medvlp
zeroshot`` / ``retrieve``, the sweep's grid, its headline metric and the printed table all come
from the task object.

Two kinds:

* transfer tasks (``transfer: true``: classification, segmentation, detection) train a head on a
  run's exported image encoder for a label fraction and seed: :meth:`Task.run`;
* evaluation tasks (``transfer: false``: zero-shot, retrieval) score the run as it is on a split's
  embeddings: :meth:`Task.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf

from medvlp import config as C


@dataclass
class TaskDefaults:
    """``configs/downstream/<task>.yaml``: how a task runs when nothing else is said.

    Attributes:
        transfer: True: a head is trained per label fraction and seed; False: the run is evaluated as it is.
        demo_data / real_data: the data config a sweep uses without / with ``--roots`` naming ``real_data``.
        protocol / protocols: the default protocol and the accepted ones (empty: any).
        metric / label: the headline key of ``result.json`` (dots go into nested dicts) and its name in tables.
        multiclass_metric / multiclass_label: the headline for exclusive classes ("" = ``metric``).
        demo_settings: settings for the synthetic data unless given (quick CPU runs).
        data: ``data.*`` values the task sets unless the user gives them.
        settings: optimiser and stopping settings per protocol (the papers' values), under the user's.
    """

    transfer: bool = True
    demo_data: str = ""
    real_data: str = ""
    protocol: str = ""
    protocols: list[str] = field(default_factory=list)
    metric: str = ""
    label: str = ""
    multiclass_metric: str = ""
    multiclass_label: str = ""
    demo_settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the task's settings per protocol (the papers')


def task_defaults(name: str) -> TaskDefaults:
    """``configs/downstream/<name>.yaml`` checked against :class:`TaskDefaults` (reads YAML only: no torch)."""
    path = C.group_file("downstream", name)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TaskDefaults), C.load_yaml(path))
    except Exception as err:  # an unknown key or a wrong type in the task's file
        raise C.ConfigError(f"{path}: {err}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


class Task:
    """Base class of every downstream task (see the module docstring).

    Subclasses set ``settings`` (the names of the keyword settings ``run`` accepts, offered on the
    command line) and implement :meth:`run` (transfer) or :meth:`evaluate` (evaluation), plus
    :meth:`rows` (the printed table).
    """

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str) -> None:
        self.name = name
        self.defaults = task_defaults(name)

    # ------------------------------------------------------------------ what the defaults say
    @property
    def transfer(self) -> bool:
        return bool(self.defaults.transfer)

    def check_protocol(self, protocol: str) -> str:
        """The protocol to use (the default for ``""``); an unknown one is a ``ConfigError``."""
        protocol = protocol or self.defaults.protocol
        if self.defaults.protocols and protocol not in self.defaults.protocols:
            raise C.ConfigError(f"protocol '{protocol}' is not one of {', '.join(self.defaults.protocols)} for {self.name}.")
        return protocol

    def headline(self, res: dict[str, Any]) -> tuple[str, float]:
        """``(key, value)`` of the task's headline metric in a result (a protocol preset may name another:
        ``res["headline"]``)."""
        key = self.defaults.multiclass_metric if res.get("multiclass") and self.defaults.multiclass_metric else self.defaults.metric
        key = str(res.get("headline") or key)
        value: Any = res
        for part in key.split("."):
            value = value[part]
        return key, float(value)

    def metric_label(self, metric: str) -> str:
        if metric and metric == self.defaults.multiclass_metric:
            return self.defaults.multiclass_label or metric
        return self.defaults.label or metric

    def data_defaults(self, given: set[str]) -> dict[str, Any]:
        """``data.*`` values the task sets, except those the user gave."""
        return {k: v for k, v in self.defaults.data.items() if k not in given}

    # ------------------------------------------------------------------ to implement
    def run(self, method: Any, dm: Any, protocol: str, seed: int, folder: Path, settings: dict[str, Any],
            trainer_cfg: Any = None) -> dict[str, Any] | None:
        """Transfer: train on ``dm`` (its ``cfg.label_fraction``) with a Lightning ``Trainer`` built from
        ``trainer_cfg`` (``trainer.*``: devices, strategy, precision), test, write plots into ``folder``;
        a JSON-ready result with ``n_train``, ``n_test``, ``history`` and ``files`` (name -> path), or
        None on the processes other than rank 0 of a multi-process run."""
        raise NotImplementedError(f"{self.name} is not a transfer task.")

    def evaluate(self, method: Any, dm: Any, emb: Any, cfg: Any) -> dict[str, Any]:
        """Evaluation: the result of the run's embeddings ``emb`` of a split of ``dm``."""
        raise NotImplementedError(f"{self.name} is a transfer task; use medvlp downstream --task {self.name}.")

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        """What ``medvlp`` prints: ``(title, rows, header)``."""
        metric, value = self.headline(res)
        return f"{self.name}", [(self.metric_label(metric), f"{value:.3f}")], ("metric", "value")


def transfer_title(res: dict[str, Any]) -> str:
    """The first line printed for a transfer result."""
    h = res["history"]
    length = f"L-BFGS, C={h['C']:.3g}" if h.get("solver") == "lbfgs" else f"{h['epochs']} epochs, {h.get('steps', 0)} steps"
    proto = f"{res['preset']} protocol, {res['protocol']}" if res.get("preset") else res["protocol"]
    return (f"{res['task']} ({proto}) of {res.get('method', '?')} on {res.get('data', '?')}, "
            f"{res['fraction']:g} of the training labels ({res['n_train']} images), test split ({res['n_test']} "
            f"images), {length}:")


def get_task(name: str) -> Task:
    """The registered task ``name`` (built with its ``configs/downstream`` defaults)."""
    from medvlp.registry import TASKS

    return TASKS.get(name)(name)


def print_table(title: str, rows: list[tuple[str, str]], header: tuple[str, str]) -> None:
    if title:
        print(title)
    width = max(len(r[0]) for r in [*rows, header])
    print(f"{header[0]:<{width}}  {header[1]}")
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


__all__ = ["Task", "TaskDefaults", "get_task", "task_defaults", "print_table", "transfer_title"]

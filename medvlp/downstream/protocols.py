"""Papers' downstream protocols as data: ``configs/protocol/<paper>.yaml``.

A protocol preset holds, per task, what a paper's evaluation fixes: the mode (``linear`` / ``frozen`` /
``finetune``), ``data.*`` values (input size, prompts, threshold split), the task's settings (batch,
lr, epochs, stopping rule, batch-norm mode, detector, headline metric) and the exceptions per dataset
(``by_data``, keyed by the dataset's ``data.name``) and per label fraction (``by_fraction``, keyed
``"0.01"``, ``"0.1"``, ``"1"``). ``medvlp downstream --protocol g2d``, ``medvlp zeroshot --protocol
hlip``, the sweep and ``medvlp reproduce`` resolve them with :func:`resolve`; anything the user gives
on the command line wins over the preset, and the preset wins over the task's defaults
(``configs/downstream/<task>.yaml``, medvlp's own protocol).

Resolution order for a task, a dataset and a fraction (later wins)::

    preset.data -> tasks.<task> -> tasks.<task>.by_fraction[f] -> tasks.<task>.by_data[name]
                -> tasks.<task>.by_data[name].by_fraction[f]

``settings`` may be keyed by mode (``settings: {linear: {...}, finetune: {...}}``) when a task runs in
several. Reading a preset imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from medvlp import config as C

MODES = ("linear", "frozen", "finetune")
ENTRY_KEYS = ("mode", "data", "settings", "metric", "by_data", "by_fraction")
ROW_KEYS = ("row", "task", "data", "demo", "demo_world", "model", "settings", "data_overrides", "metric", "keys", "skip",
            "paper")
MODEL_KEYS = ("title", "encoder", "demo")
ENCODER_KINDS = ("cnn", "vit")


@dataclass
class Protocol:
    """One paper's downstream protocol (``configs/protocol/<name>.yaml``)."""

    name: str
    paper: str = ""
    spec: str = ""
    follows: str = "paper"  # which side of the paper / code disagreements the preset takes
    data: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)  # the paper's tables (medvlp reproduce)
    # the pre-trained models the tables' rows come from: name -> {title, encoder (cnn | vit, checked against a
    # given run), demo (the configs/experiment file --demo pre-trains; "" = the method's own demo config)}
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def model_names(self) -> list[str]:
        return list(self.models) or ["default"]


@dataclass
class Resolved:
    """What a preset fixes for one task, dataset and fraction."""

    protocol: str
    mode: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    metric: str = ""


def protocol_names() -> list[str]:
    """The presets in ``configs/protocol``."""
    return sorted(p.stem for p in (C.config_dir() / "protocol").glob("*.yaml"))


def is_protocol(name: str) -> bool:
    return bool(name) and name in protocol_names()


def load_protocol(name: str) -> Protocol:
    """``configs/protocol/<name>.yaml`` checked (unknown keys, modes and fractions are named)."""
    if not is_protocol(name):
        raise C.ConfigError(f"protocol '{name}' is not a preset; the presets: {', '.join(protocol_names())} "
                            f"(configs/protocol/<name>.yaml), or a mode: {', '.join(MODES)}.")
    path = C.config_dir() / "protocol" / f"{name}.yaml"
    raw = OmegaConf.to_container(C.load_yaml(path), resolve=True) or {}
    unknown = sorted(set(raw) - {"paper", "spec", "follows", "data", "tasks", "tables", "models"})
    if unknown:
        raise C.ConfigError(f"{path}: unknown key(s) {unknown}; expected paper, spec, follows, data, tasks, tables, models.")
    proto = Protocol(name=name, **raw)
    if proto.follows not in ("paper", "code"):
        raise C.ConfigError(f"{path}: follows must be 'paper' or 'code', got '{proto.follows}'.")
    for task, entry in proto.tasks.items():
        _check_entry(path, f"tasks.{task}", entry or {})
    for name, model in proto.models.items():
        extra = sorted(set(model or {}) - set(MODEL_KEYS))
        if extra or (model or {}).get("encoder", "cnn") not in ENCODER_KINDS:
            raise C.ConfigError(f"{path}: models.{name} " + (f"has unknown key(s) {extra}" if extra else
                                f"encoder {model['encoder']!r} is not one of {', '.join(ENCODER_KINDS)}")
                                + f"; a model has {', '.join(MODEL_KEYS)}.")
    for t, table in enumerate(proto.tables):
        for r, row in enumerate(table.get("rows") or []):
            missing = [k for k in ("row", "task", "data", "demo", "paper") if k not in row]
            extra = sorted(set(row) - set(ROW_KEYS))
            if missing or extra:
                raise C.ConfigError(f"{path}: tables[{t}].rows[{r}] ({row.get('row', '?')}) "
                                    + (f"lacks {missing}" if missing else f"has unknown key(s) {extra}")
                                    + f"; a row has {', '.join(ROW_KEYS)}.")
            if proto.models and row.get("model") not in proto.models:
                raise C.ConfigError(f"{path}: tables[{t}].rows[{r}] ({row['row']}) names model {row.get('model')!r}; "
                                    f"the models: {', '.join(proto.models)}.")
            if row["task"] not in proto.tasks:
                raise C.ConfigError(f"{path}: tables[{t}].rows[{r}] ({row['row']}) uses task {row['task']}, which tasks "
                                    f"does not cover.")
    return proto


def _check_entry(path: Any, where: str, entry: dict[str, Any]) -> None:
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise C.ConfigError(f"{path}: {where} has unknown key(s) {unknown}; expected {', '.join(ENTRY_KEYS)}.")
    if entry.get("mode", "") and entry["mode"] not in MODES:
        raise C.ConfigError(f"{path}: {where}.mode '{entry['mode']}' is not one of {', '.join(MODES)}.")
    for frac, sub in (entry.get("by_fraction") or {}).items():
        try:
            value = float(frac)
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise C.ConfigError(f"{path}: {where}.by_fraction key '{frac}' is not a label fraction in (0, 1].")
        _check_entry(path, f"{where}.by_fraction.{frac}", sub or {})
    for name, sub in (entry.get("by_data") or {}).items():
        _check_entry(path, f"{where}.by_data.{name}", sub or {})


def _fraction_entry(entry: dict[str, Any], fraction: float) -> dict[str, Any]:
    for key, sub in (entry.get("by_fraction") or {}).items():
        if abs(float(key) - float(fraction)) < 1e-9:
            return sub or {}
    return {}


def _apply(out: Resolved, entry: dict[str, Any]) -> None:
    if entry.get("mode"):
        out.mode = str(entry["mode"])
    out.data.update(entry.get("data") or {})
    if entry.get("metric"):
        out.metric = str(entry["metric"])
    settings = dict(entry.get("settings") or {})
    if settings and set(settings) <= set(MODES):  # keyed by mode: kept until the mode is known
        out.settings.setdefault("__by_mode__", {})
        for mode, values in settings.items():
            out.settings["__by_mode__"].setdefault(mode, {}).update(values or {})
    else:
        out.settings.update(settings)


def resolve(name: str, task: str, data_name: str, fraction: float, mode: str = "") -> Resolved:
    """What preset ``name`` fixes for ``task`` on the dataset ``data_name`` (its ``data.name``) at
    ``fraction``; ``mode`` (given by the user) wins over the preset's. A task the preset does not
    cover is a ``ConfigError`` naming the tasks it does."""
    proto = load_protocol(name)
    if task not in proto.tasks:
        raise C.ConfigError(f"protocol '{name}' has no {task} protocol; it covers: {', '.join(proto.tasks) or 'nothing'} "
                            f"(configs/protocol/{name}.yaml).")
    out = Resolved(protocol=name, data=dict(proto.data))
    entry = proto.tasks[task] or {}
    by_data = (entry.get("by_data") or {}).get(data_name) or {}
    for part in (entry, _fraction_entry(entry, fraction), by_data, _fraction_entry(by_data, fraction)):
        _apply(out, part)
    out.mode = mode or out.mode
    by_mode = out.settings.pop("__by_mode__", {})
    if by_mode:
        base = dict(by_mode.get(out.mode, by_mode.get("linear" if out.mode == "frozen" else "", {})))
        out.settings = {**base, **out.settings}
    return out


__all__ = ["MODES", "Protocol", "Resolved", "is_protocol", "load_protocol", "protocol_names", "resolve"]

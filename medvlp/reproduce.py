"""``medvlp reproduce --paper g2d``: a paper's tables, run under its protocol preset, beside its numbers.

The rows come from the preset's ``tables`` (``configs/protocol/<paper>.yaml``): each names a task, a
dataset (and its synthetic stand-in), the settings that set it apart (e.g. G2D's encoder-decoder row:
``decoder: pretrained``) and the paper's numbers, per label fraction for transfer tasks or per metric
for zero-shot ones. Every cell runs with ``protocol=<paper>`` (:mod:`medvlp.downstream.protocols`) on
the given run, and ``<out>/table.md`` lists, per row and column, the paper's value, ours and the
difference (percentage points). A cell whose ``result.json`` exists is not run again (the command
resumes); a cell that fails is reported in the table with its error, and the others still run.

Models: a paper whose tables come from several pre-trained models (MGCA's ResNet-50 and ViT-B/16, HLIP's
chest CT and brain MRI models) names them in the preset's ``models``; each row says which it needs.
``--run NAME=RUN_DIR`` gives one model's run (a plain ``--run RUN_DIR`` serves every model); a model given
no run is skipped (with ``--demo`` it is pre-trained on the synthetic data first), and a run whose image
encoder is not the model's (a ViT run for the ResNet-50 rows) is refused for those rows, which are listed
as skipped. A row the released protocols cannot reproduce (``skip`` in the preset, e.g. HLIP's CQ500
template ensemble) stays in the table with the reason.

Data: ``--roots name=/path ...`` points each dataset of the tables at its download (rows whose dataset
has no root are listed as skipped); ``--demo`` uses the synthetic stand-ins at the run's own image size
with ``--max-steps`` optimiser steps per transfer (default 20), so the whole table runs on a CPU in
minutes - the machinery, not the paper's numbers. Without ``--run``, ``--demo`` first pre-trains the
paper's method on the synthetic chest X-rays (``--pretrain-steps``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp import config as C
from medvlp.cache import write_atomic

log = logging.getLogger(__name__)

ZERO_SHOT_KEYS = {"AUC": "zeroshot.mean_auroc", "F1": "zeroshot.mean_f1", "ACC": "zeroshot.mean_accuracy",
                  "Recall": "grounding.recall", "IoU": "grounding.iou", "Dice": "grounding.dice"}
ZERO_SHOT_KEYS.update({"weighted F1": "zeroshot.mean_f1_weighted", "precision": "zeroshot.mean_precision",
                       "recall": "zeroshot.mean_recall"})
PAPER_METHOD = {"mgca": "mgca", "g2d": "g2d", "hlip": "hlip", "fvlm": "fvlm"}
EVALUATION_TASKS = ("zeroshot", "zeroshot_classes", "grounding", "retrieval")


@dataclass
class Cell:
    """One number of a table: a row at one label fraction (transfer) or one metric (evaluation)."""

    table: str
    row: str
    column: str  # "1 %" / "10 %" / "100 %", or a metric name
    paper: float
    ours: float = float("nan")
    status: str = "pending"  # done | failed: ... | skipped: ...
    folder: str = ""
    spec: dict[str, Any] = field(default_factory=dict)


def fraction_label(f: float) -> str:
    return f"{f * 100:g} %"


def _value(res: dict[str, Any], key: str) -> float:
    value: Any = res
    for part in key.split("."):
        value = value[part]
    return float(value)


def plan(paper: str, demo: bool, roots: dict[str, str], fractions: list[float] | None = None,
         rows: list[str] | None = None) -> list[Cell]:
    """Every cell of the paper's tables (or of the rows whose name contains one of ``rows``), with what
    computes it (``spec``) or why it is skipped."""
    from medvlp.downstream.protocols import load_protocol

    proto = load_protocol(paper)
    if not proto.tables:
        raise C.ConfigError(f"configs/protocol/{paper}.yaml lists no tables to reproduce.")
    cells: list[Cell] = []
    for table in proto.tables:
        for row in table["rows"]:
            if rows and not any(r.lower() in row["row"].lower() for r in rows):
                continue
            data = row["demo"] if demo else row["data"]
            skip = (f"skipped: {row['skip']}" if row.get("skip") else
                    "" if demo or row["data"] in roots else f"skipped: no --roots entry for {row['data']}")
            base = {"task": row["task"], "data": data, "settings": dict(row.get("settings") or {}),
                    "data_overrides": dict(row.get("data_overrides") or {}), "metric": row.get("metric", ""),
                    "root": "" if demo else roots.get(row["data"], ""), "model": str(row.get("model") or "default"),
                    "demo_world": str(row.get("demo_world") or "") if demo else ""}
            keys = dict(row.get("keys") or {})
            for column, value in (row["paper"] or {}).items():
                paper_value = float("nan") if value is None else float(value)
                if row["task"] in EVALUATION_TASKS:
                    key = keys.get(str(column)) or ZERO_SHOT_KEYS.get(str(column))
                    if not key:
                        raise C.ConfigError(f"configs/protocol/{paper}.yaml: row '{row['row']}' column '{column}' has no "
                                            f"result key; give it in the row's keys.")
                    spec = {**base, "key": key}
                    label = str(column)
                else:
                    f = float(column)
                    if fractions and not any(abs(f - g) < 1e-9 for g in fractions):
                        continue
                    spec = {**base, "fraction": f}
                    label = fraction_label(f)
                cells.append(Cell(table["title"], row["row"], label, paper_value, status=skip or "pending", spec=spec))
    return cells


def cell_folder(out: Path, cell: Cell) -> Path:
    s = cell.spec
    extra = "-".join(f"{k}={v}" for k, v in sorted(s["settings"].items()))
    model = "" if s.get("model", "default") == "default" else f"{s['model']}-"
    name = f"{model}{s['task']}-{s['data']}" + (f"-{extra}" if extra else "") + (f"-f{s['fraction']:g}" if "fraction" in s else "")
    return out / "cells" / name.replace("/", "_")


def _data_name(data: str) -> str:
    """The ``data.name`` (datamodule) of the ``configs/data`` group ``data``."""
    return str(C.load_yaml(C.group_file("data", data)).data.name)


def _takes_image_size(data: str) -> bool:
    """Whether the data config ``data`` (a ``configs/data`` name) has ``data.image_size`` (2D sets do, volumes not)."""
    from dataclasses import fields

    from medvlp.registry import DATAMODULES

    return "image_size" in {f.name for f in fields(DATAMODULES.get(_data_name(data)).Config)}


def _preset_crop(paper: str, spec: dict[str, Any]) -> tuple[int, int] | None:
    """``(crop_from, image_size)`` the preset sets for the cell's task and dataset, or None."""
    from medvlp.downstream.protocols import resolve

    data = resolve(paper, spec["task"], _data_name(spec["data"]), float(spec.get("fraction", 1.0))).data
    crop = int(data.get("crop_from", 0) or 0)
    return (crop, int(data.get("image_size", 224))) if crop else None


def run_cell(paper: str, run: Path, cell: Cell, out: Path, demo_size: int | None, max_steps: int) -> None:
    """Compute one cell (or read its finished result) into ``cell.ours``."""
    from medvlp import api

    s = cell.spec
    folder = cell_folder(out, cell)
    cell.folder = str(folder)
    result = folder / "result.json"
    overrides = [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in s["data_overrides"].items()]
    if s["root"]:
        overrides.append(f"data.root={s['root']}")
    elif s.get("demo_world"):  # an evaluation-only set: its synthetic format example
        from medvlp.datamodules.demo import ensure_demo

        # the format examples hold the real sets' broken items on purpose: skipped, counted and listed
        overrides += [f"data.root={ensure_demo(s['demo_world'])}", "data.on_error=skip"]
    if demo_size and _takes_image_size(s["data"]):
        overrides.append(f"data.image_size={demo_size}")
        crop = _preset_crop(paper, s)
        if crop:  # the preset's crop at the demo's scale (256 -> 224 becomes 73 -> 64)
            overrides.append(f"data.crop_from={round(demo_size * crop[0] / crop[1])}")
    if not result.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if "fraction" in s:
            settings = dict(s["settings"])
            if max_steps:
                settings["max_steps"] = max_steps
            api.downstream(s["task"], s["data"], run, fraction=s["fraction"], protocol=paper, overrides=overrides,
                           out=folder, **settings)
        else:
            res = api.evaluate(run, tasks=(s["task"],), split="test", data_overrides=overrides, data=s["data"],
                               protocol=paper)
            write_atomic(result, json.dumps(res, indent=2, default=str))  # a killed run leaves no partial result
    res = json.loads(result.read_text())
    key = s.get("key") or s["metric"] or res.get("headline", "")
    cell.ours = 100 * _value(res, key)
    cell.status = "done" if not math.isnan(cell.ours) else "done: undefined on this data (e.g. one class only)"


def demo_run(paper: str, runs: Path, steps: int, demo_config: str = "") -> Path:
    """The paper's method pre-trained on the synthetic data (``steps`` steps), made once: its own demo
    config, or ``configs/experiment/<demo_config>``."""
    from medvlp import api

    method = PAPER_METHOD.get(paper, paper)
    tag = Path(demo_config).stem if demo_config else method
    folder = runs / f"{tag}-demo-{steps}"
    done = sorted(p.parent for p in folder.glob("*/run_info.json") if (p.parent / "checkpoints").is_dir()
                  and any((p.parent / "checkpoints").glob("*.ckpt")))
    if done:
        return done[-1]
    overrides = [f"run.out_dir={folder}", f"trainer.max_steps={steps}", "trainer.max_epochs=1000",
                 "trainer.enable_progress_bar=false", "trainer.limit_val_batches=2"]
    if demo_config:
        cfg = C.compose(config_file=str(C.config_dir() / "experiment" / demo_config), overrides=overrides)
    else:
        cfg = C.compose(method=method, overrides=overrides)
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    return api.fit(cfg)


def encoder_kind(run: Path) -> str:
    """``vit`` or ``cnn``: the kind of the run's image encoder."""
    from medvlp import api

    method, _ = api.load_run(run)
    return "vit" if getattr(method.export_encoder().module, "is_vit", False) else "cnn"


def model_runs(paper: str, cells: list[Cell], run: Path | dict[str, Path] | None, demo: bool, runs: Path,
               pretrain_steps: int) -> dict[str, Path]:
    """The run of every model the pending cells need (given, or with ``demo`` pre-trained); the cells of a
    model without a usable run are marked skipped with the reason."""
    from medvlp.downstream.protocols import load_protocol

    proto = load_protocol(paper)
    given = dict(run) if isinstance(run, dict) else ({"": Path(run)} if run is not None else {})
    unknown = sorted(set(given) - set(proto.model_names()) - {""})
    if unknown:
        raise C.ConfigError(f"--run {unknown[0]}=...: {paper} has no model '{unknown[0]}'; its models: "
                            f"{', '.join(proto.model_names())}.")
    out: dict[str, Path] = {}
    made: dict[str, Path] = {}
    for name in dict.fromkeys(c.spec["model"] for c in cells if c.status == "pending"):
        model = proto.models.get(name) or {}
        title = model.get("title") or name
        path = given.get(name) or given.get("")
        reason = ""
        if path is None and demo:
            demo_config = str(model.get("demo") or "")
            if demo_config not in made:
                made[demo_config] = demo_run(paper, runs, pretrain_steps, demo_config)
            path = made[demo_config]
        if path is None:
            reason = f"no --run for the {title} model (--run {name}=RUN_DIR)"
        elif model.get("encoder") and encoder_kind(Path(path)) != model["encoder"]:
            kinds = {"cnn": "a CNN", "vit": "a ViT"}
            reason = (f"the run's image encoder is {kinds['vit' if model['encoder'] == 'cnn' else 'cnn']}, this row is the "
                      f"{title} model's (--run {name}=RUN_DIR)")
        if reason:
            for c in cells:
                if c.spec["model"] == name and c.status == "pending":
                    c.status = f"skipped: {reason}"
        else:
            out[name] = Path(path)
    return out


def write_table(paper: str, cells: list[Cell], path: Path, run: Path | dict[str, Path], demo: bool) -> str:
    """``table.md``: per table, every row x column with the paper's value, ours and the difference."""
    from medvlp.downstream.protocols import load_protocol

    proto = load_protocol(paper)
    runs = run if isinstance(run, dict) else {"default": run}
    used = "; ".join(f"`{p}`" if name == "default" else f"{(proto.models.get(name) or {}).get('title', name)}: `{p}`"
                     for name, p in runs.items()) or "none"
    lines = [f"# {proto.paper or paper}: the paper's numbers beside medvlp's", "",
             f"Run{'s' if len(runs) > 1 else ''}: {used}. Protocol: `configs/protocol/{paper}.yaml` ({proto.spec}). "
             "Values in percent; difference = ours - paper."]
    if demo:
        lines.append("Synthetic demo data at the run's image size and a few optimiser steps per cell: this checks the "
                     "machinery, the numbers are not comparable with the paper's.")
    for title in dict.fromkeys(c.table for c in cells):
        lines += ["", f"## {title}", "", "| row | column | paper | medvlp | difference | status |", "| --- | --- | --- | --- | --- | --- |"]
        for c in (c for c in cells if c.table == title):
            ours = f"{c.ours:.1f}" if not math.isnan(c.ours) else "-"
            paper_value = f"{c.paper:.1f}" if not math.isnan(c.paper) else "-"
            diff = f"{c.ours - c.paper:+.1f}" if not (math.isnan(c.ours) or math.isnan(c.paper)) else "-"
            lines.append(f"| {c.row} | {c.column} | {paper_value} | {ours} | {diff} | {c.status} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return text


def reproduce(paper: str, run: str | Path | dict[str, Path] | None = None, out: str | Path = "",
              roots: dict[str, str] | None = None, demo: bool = False, max_steps: int = 20, pretrain_steps: int = 100,
              fractions: list[float] | None = None, runs: str | Path = "runs/reproduce",
              rows: list[str] | None = None) -> tuple[Path, list[Cell]]:
    """Run every cell of ``paper``'s tables and write ``<out>/table.md`` (default ``results/<paper>``);
    returns the table's path and the cells. ``run``: one run for every model, or ``{model: run}``."""
    from medvlp import api

    roots = dict(roots or {})
    if not demo and not run:
        raise C.ConfigError("medvlp reproduce needs --run RUN_DIR (the pre-trained run, or the authors' weights through "
                            "medvlp import), or --demo.")
    if max_steps < 0 or pretrain_steps < 1:
        raise C.ConfigError(f"--max-steps must be >= 0 and --pretrain-steps >= 1, got {max_steps} and {pretrain_steps}.")
    cells = plan(paper, demo, roots, fractions, rows)
    if not cells:
        raise C.ConfigError(f"No cell of {paper}'s tables matches --rows {rows} / --fractions {fractions}.")
    out = Path(out or Path("results") / paper)
    run_dirs = model_runs(paper, cells, run, demo, Path(runs), pretrain_steps)
    for cell in cells:
        if cell.status != "pending":
            continue
        run_dir = run_dirs[cell.spec["model"]]
        data_cfg = api.load_config(run_dir).data
        size = int(data_cfg.image_size) if demo and "image_size" in data_cfg else None
        start = time.perf_counter()
        try:
            run_cell(paper, run_dir, cell, out, size, max_steps if demo else 0)
        except Exception as err:  # one failed cell does not stop the table
            cell.status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            log.warning("%s / %s / %s: %s", cell.table, cell.row, cell.column, cell.status)
        log.info("%s %s: %.1f (%.0f s)", cell.row, cell.column, cell.ours, time.perf_counter() - start)
    path = out / "table.md"
    write_table(paper, cells, path, run_dirs, demo)
    return path, cells


def parse_runs(items: list[str] | str | None, paper: str) -> Path | dict[str, Path] | None:
    """``--run`` values: ``RUN_DIR`` (every model) or ``MODEL=RUN_DIR`` items (the preset's model names)."""
    from medvlp.downstream.protocols import load_protocol

    if not items:
        return None
    items = [items] if isinstance(items, str) else list(items)
    names = load_protocol(paper).model_names()
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        key = name if sep and name in names else ""
        if sep and name and not key and not Path(item).exists():
            raise C.ConfigError(f"--run {item}: {paper} has no model '{name}'; its models: {', '.join(names)} "
                                f"(--run MODEL=RUN_DIR, or --run RUN_DIR for every model).")
        if key in out:
            raise C.ConfigError(f"--run given twice for {'model ' + key if key else 'every model'}.")
        out[key] = Path(path if key else item)
    return out[""] if list(out) == [""] else out


def parse_roots(items: list[str]) -> dict[str, str]:
    """``["siim_pneumothorax=/data/siim", ...]`` (or one space-separated string) -> dict."""
    out: dict[str, str] = {}
    for item in (x for entry in items for x in entry.split()):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise C.ConfigError(f"--roots {item}: expected DATASET=PATH, e.g. siim_pneumothorax=/data/siim.")
        out[name] = path
    return out


__all__ = ["Cell", "model_runs", "parse_roots", "parse_runs", "plan", "reproduce", "write_table"]

"""The sweep's report: ``summary.csv``, ``summary.md`` (methods as rows) and ``summary.png`` (matplotlib)."""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp.cache import write_atomic
from medvlp.downstream.task import get_task, task_defaults
from medvlp.sweep.plan import DONE, RESULT, Combination, SweepConfig, _key, _read_json, pretrain_data_of

log = logging.getLogger("medvlp.sweep")

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
    """Grouped bars as PNG bytes (matplotlib): one group per column (task x data x fraction), one bar per
    method, error bars = standard deviation over seeds, the mean written above each bar, a legend; a
    cell without a value is marked "failed" or "-"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, columns, cells = aggregate(rows)
    n_cols, n_methods = max(len(columns), 1), max(len(methods), 1)
    width = 0.8 / n_methods
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 1.6 * n_cols + 0.25 * n_cols * n_methods), 4.8), layout="constrained")
    for i, m in enumerate(methods):
        xs, means, errs = [], [], []
        for g, col in enumerate(columns):
            cell, x = cells[m, col.key], g - 0.4 + width * (i + 0.5)
            if not cell.n:
                ax.text(x, 0.02, "failed" if cell.failed else "-", ha="center", va="bottom", rotation=90, fontsize=8)
                continue
            xs.append(x)
            means.append(cell.mean)
            errs.append(cell.std if cell.n > 1 else 0.0)
        bars = ax.bar(xs, means, width * 0.9, yerr=errs, capsize=3, label=m)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in means], padding=2, fontsize=8)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(["\n".join(line.replace("@ –", "(no labels)") for line in c.lines) for c in columns], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score (mean over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Benchmark sweep: mean over seeds, error bars = standard deviation", fontsize=10, wrap=True)
    if methods:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
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



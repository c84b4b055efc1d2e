"""Running a sweep: each pre-training run and each combination is its own ``medvlp`` process."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp.cache import write_atomic
from medvlp.downstream.task import get_task
from medvlp.sweep.plan import (
    DONE,
    REQUEST,
    RESULT,
    Combination,
    SweepConfig,
    _key,
    _read_json,
    compose_pretrain,
    grid,
    pretrain_data_of,
    pretrain_overrides,
    pretrain_request,
    settings_for,
    validate,
)
from medvlp.sweep.report import Row, collect, headline, write_summary

log = logging.getLogger("medvlp.sweep")

class SweepFailed(ValueError):
    """Some combinations failed; the summary marks them. A ``ValueError`` so that the command line
    reports it as a one-line error with a non-zero exit status."""



# --------------------------------------------------------------------------- the work
def _write_json(path: Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str))


def is_done(cfg: SweepConfig, combo: Combination) -> bool:
    return _read_json(combo.folder(cfg.runs) / RESULT) is not None


LOG = "log.txt"  # each medvlp process's output, beside what it wrote


class StepFailed(RuntimeError):
    """A ``medvlp`` process of the sweep exited with an error (its log's last lines in the message)."""


def medvlp_command(*args: str) -> list[str]:
    """``python -m medvlp.cli ARGS`` with this interpreter (the installed package, whatever the PATH)."""
    return [sys.executable, "-m", "medvlp.cli", *args]


def execute(argv: list[str], log_path: Path) -> None:
    """Run one ``medvlp`` command in its own process (a crash or an out-of-memory kill costs that step
    only, and no GPU state leaks into the next), its output appended to ``log_path``.

    Raises:
        StepFailed: the exit status and the last lines of the log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {shlex.join(argv)}\n")
        fh.flush()
        start = fh.tell()
        code = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            fh.seek(start)
            tail = fh.read().strip().splitlines()[-5:]
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise StepFailed(f"`medvlp {shlex.join(argv[3:])}` {how}: {' | '.join(tail)} (log: {log_path})")


def ensure_pretrained(cfg: SweepConfig, method: str) -> Path:
    """The finished pre-training run of ``method`` in ``<runs>/<method>``: reused when its marker exists,
    continued when it was interrupted (``medvlp fit --resume``: from its newest complete checkpoint, or
    from step 0 in place when it had none; nothing it wrote is deleted), else started (``medvlp fit``);
    the run's output goes to ``<runs>/<method>/log.txt``."""
    from medvlp import api

    run_dir = Path(cfg.runs).resolve() / method
    if (run_dir / DONE).is_file():
        log.info("%s: pre-training done before (%s)", method, run_dir)
        return run_dir
    start = time.perf_counter()
    resumed = ""
    if (run_dir / api.CONFIG_NAME).is_file():
        # an interrupted run continues from its newest complete checkpoint, exactly as it would have gone
        # on (medvlp.resume); one killed before its first checkpoint starts again in place from step 0
        from medvlp.checkpoints import candidates

        found = candidates(run_dir)  # which one is complete, fit --resume decides (and says)
        resumed = str(found[0]) if found else "step 0"
        log.info("%s: continuing the interrupted pre-training run %s (newest checkpoint: %s)", method, run_dir,
                 Path(resumed).name)
        execute(medvlp_command("fit", "--resume", str(run_dir)), run_dir / LOG)
    else:
        compose_pretrain(cfg, method)  # fails here, with the config error, before a process starts
        run_dir.mkdir(parents=True, exist_ok=True)  # may hold the log of an attempt that ended before its config
        _write_json(run_dir / REQUEST, pretrain_request(cfg, method))
        log.info("%s: pre-training on %s (%s)", method, pretrain_data_of(cfg, method),
                 f"{cfg.pretrain_steps} steps" if cfg.pretrain_steps > 0 else "the config's epochs")
        args = ["fit", "--method", method, "--data", pretrain_data_of(cfg, method)]
        if cfg.experiments.get(method):
            args += ["--config", str(cfg.experiments[method])]
        execute(medvlp_command(*args, *pretrain_overrides(cfg, method)), run_dir / LOG)
    seconds = time.perf_counter() - start
    _write_json(run_dir / DONE, {**pretrain_request(cfg, method), "seconds": seconds, "resumed_from": resumed or None,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log.info("%s: pre-training finished in %.0f s", method, seconds)
    return run_dir


def combination_command(cfg: SweepConfig, combo: Combination, run_dir: Path) -> list[str]:
    """The ``medvlp`` command that computes one combination and writes its ``result.json``."""
    folder = combo.folder(cfg.runs)
    overrides = [f"data.root={combo.root}"] if combo.root else []
    if get_task(combo.task).transfer:
        settings = [f"--set={k}={json.dumps(v)}" for k, v in settings_for(cfg, combo).items()]
        return medvlp_command("downstream", "--task", combo.task, "--data", combo.data, "--run", str(run_dir),
                              "--fraction", f"{combo.fraction:g}", "--protocol", combo.protocol, "--seed", str(combo.seed),
                              "--out", str(folder), *settings, *overrides)
    other = [] if combo.data == pretrain_data_of(cfg, combo.method) else ["--data", combo.data]
    preset = ["--protocol", combo.protocol] if combo.protocol else []
    return medvlp_command("evaluate", "--task", combo.task, "--run", str(run_dir), "--split", "test", *other, *preset,
                          "--json", str(folder / RESULT), *overrides)


def run_combination(cfg: SweepConfig, combo: Combination, run_dir: Path) -> dict[str, Any]:
    """Compute one combination in its own ``medvlp`` process; add the seconds it took to its ``result.json``."""
    folder = combo.folder(cfg.runs)
    start = time.perf_counter()
    execute(combination_command(cfg, combo, run_dir), folder / LOG)
    res = _read_json(folder / RESULT)
    if res is None:
        raise StepFailed(f"{combo.describe()}: the process ended without writing {folder / RESULT}.")
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



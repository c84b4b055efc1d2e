"""Learning runs shared by the whole test session: each method trains on the synthetic world once.

``learned[key]`` composes the run of :data:`RUNS`, evaluates the untrained method (the control),
trains it with ``api.fit`` (the in-memory method is kept), and evaluates the run directory. The
learning tests (``tests/methods/test_*_learns.py``) assert on these, the method contract suite
reuses them (the loss falls, save / reload, zero-shot and retrieval) and the transfer tests start
from them, so that no method is trained twice for the same purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlp import api
from medvlp import config as C

EXPERIMENTS = C.config_dir() / "experiment"

# key -> (AUROC floor or None, compose arguments, optimiser steps)
RUNS: dict[str, tuple[float | None, dict[str, Any], int]] = {
    "clip": (0.75, {"method": "clip", "data": "demo_cxr"}, 100),  # AUROC 0.90 after 100 steps (0.91 after 140)
    "clip_3d": (0.70, {"config_file": str(EXPERIMENTS / "clip_demo_ct.yaml")}, 600),
    "mgca": (0.75, {"method": "mgca", "data": "demo_cxr"}, 200),  # 0.83
    "g2d": (0.75, {"method": "g2d", "data": "demo_cxr"}, 80),  # 0.91 (0.93 after 110, 0.94 after 140)
    "hlip": (0.70, {"config_file": str(EXPERIMENTS / "hlip_demo_ct.yaml")}, 450),  # 0.805 (0.816 after 550)
    "hlip_brain": (0.70, {"config_file": str(EXPERIMENTS / "hlip_demo_brain.yaml")}, 500),
    "fvlm": (0.75, {"method": "fvlm"}, 300),  # 0.79
    # zero-shot CN / MCI / AD accuracy (ITC mode) 0.94 after 200 steps (0.94-0.98 over run.seed 0, 1, 3, 4); the learning test asserts on it
    "medblip": (None, {"method": "medblip"}, 200),
    # CLIP on the same CT scans, steps and findings, for fVLM's comparison (0.71)
    "clip_vs_fvlm": (None, {"config_file": str(EXPERIMENTS / "clip_demo_ct.yaml"), "overrides": (
        "data.eval_labels=[Cardiomegaly,Pleural effusion,Lung nodule,Consolidation,Emphysema,Arterial wall calcification,"
        "Hiatal hernia]",)}, 300),
}


def demo_overrides(out_dir: Any, steps: int) -> list[str]:
    """Command-line overrides of a learning run: ``steps`` optimiser steps into ``out_dir``, quiet."""
    return [f"run.out_dir={out_dir}", f"trainer.max_steps={steps}", "trainer.max_epochs=100",
            "trainer.enable_progress_bar=false", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=5"]


def learning_checks(res: dict[str, Any], auc_min: float) -> tuple[bool, bool, str]:
    """``(mean AUROC >= auc_min, image-to-text R@5 >= 2 x chance, message)``."""
    auc = res["zeroshot"]["mean_auroc"]
    r5 = res["retrieval"]["image_to_text"]["R@5"]
    chance = res["retrieval"]["chance_R@5_i2t"]
    return auc >= auc_min, r5 >= 2 * chance, f"mean AUROC {auc:.3f}, R@5 {r5:.3f} (chance {chance:.3f})"


@dataclass
class Learned:
    """One learning run: config, run directory, the untrained and trained methods (in memory) and
    the zero-shot / retrieval evaluation of each."""

    cfg: Any
    run_dir: Path
    untrained: Any
    trained: Any
    before: dict[str, Any]
    after: dict[str, Any]
    auc_min: float | None

    def assert_learned(self) -> None:
        """The untrained method fails both checks, the trained run passes both."""
        auc_ok, r5_ok, msg = learning_checks(self.before, self.auc_min)
        assert not auc_ok and not r5_ok, f"untrained model already passes: {msg}"
        auc_ok, r5_ok, msg = learning_checks(self.after, self.auc_min)
        print(f"{self.cfg.method.name} after training: {msg}", self.after["zeroshot"]["auroc"])
        assert auc_ok and r5_ok, msg


def untrained_run(out_dir: Path, steps: int, overrides: tuple[str, ...] = (), **compose: Any) -> tuple[Any, Any]:
    """``(config, untrained method)`` of a learning run: composed and resolved, the method built from the run's seed."""
    import torch

    cfg = C.compose(**compose, overrides=[*demo_overrides(out_dir, steps), *overrides])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    torch.manual_seed(cfg.run.seed)
    return cfg, api.build_method(cfg)


def train(out_dir: Path, auc_min: float | None, steps: int, overrides: tuple[str, ...] = (), **compose: Any) -> Learned:
    """Compose, evaluate the untrained method, fit (keeping the trained method), evaluate the run."""
    cfg, untrained = untrained_run(out_dir, steps, overrides, **compose)
    before = api.evaluate_method(untrained, cfg) if auc_min is not None else {}
    made: list[Any] = []
    build = api.build_method

    def keep(c: Any) -> Any:
        made.append(build(c))
        return made[-1]

    api.build_method = keep
    try:
        run_dir = api.fit(cfg.copy())
    finally:
        api.build_method = build
    return Learned(cfg, run_dir, untrained, made[0], before, api.evaluate(run_dir), auc_min)


def _load(key: str, folder: Path, auc_min: float | None, compose: dict[str, Any], steps: int) -> Learned:
    """A learning run another test process made: the untrained method rebuilt from the same seed, the trained
    one from the run directory, the evaluations from ``learned.json``."""
    saved = json.loads((folder / "learned.json").read_text())
    cfg, untrained = untrained_run(folder, steps, **compose)
    trained, _ = api.load_run(saved["run_dir"])
    return Learned(cfg, Path(saved["run_dir"]), untrained, trained, saved["before"], saved["after"], auc_min)


class LearnedRuns(dict):
    """``learned[key]``: the run of ``RUNS[key]`` (or of an entry added with :meth:`add`), made on first use.

    Test processes running side by side (``pytest -n 2``) share the runs through ``shared``: the first
    process to need a run trains it under a file lock and writes ``learned.json`` beside it; the others
    wait for the lock and load it."""

    def __init__(self, shared: Path) -> None:
        super().__init__()
        self.shared = Path(shared)
        self.specs = dict(RUNS)

    def add(self, key: str, auc_min: float | None, compose: dict[str, Any], steps: int) -> None:
        self.specs.setdefault(key, (auc_min, compose, steps))

    def __missing__(self, key: str) -> Learned:
        import fcntl

        auc_min, compose, steps = self.specs[key]
        folder = self.shared / f"learned-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (folder / "learned.json").is_file():
                self[key] = _load(key, folder, auc_min, compose, steps)
            else:
                self[key] = train(folder, auc_min, steps, **compose)
                record = {"run_dir": str(self[key].run_dir), "before": self[key].before, "after": self[key].after}
                tmp = folder / "learned.json.tmp"
                tmp.write_text(json.dumps(record))
                tmp.replace(folder / "learned.json")
        return self[key]

"""`medvlp fit` end to end through the CLI: run directory, zero-shot, retrieval, kill + resume."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "medvlp.cli"]


def final_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


# 192 training images in batches of 32: 6 batches an epoch; a checkpoint every 3 steps is alternately
# mid-epoch (3, 9, 15) and at an epoch boundary (6, 12).
STEPS, EVERY, PER_EPOCH = 16, 3, 6
FIT = ["fit", "--method", "clip", f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every_n_steps={EVERY}",
       "trainer.deterministic=true", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
       "data.limit_train=192", "data.batch_size=32", "run.seed=3"]


def logged_step(run_dir: Path) -> int:
    """The last training step in the run's metrics.csv (-1 before the first)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return -1
    with open(path, newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss_step")]
    return max(steps, default=-1)


def killed_and_resumed(out: Path, fit: list[str], kills: list[int]) -> tuple[Path, Path]:
    """``fit`` run whole (in this process) and the same run killed with SIGKILL once it has logged each
    step of ``kills``, each time continued with ``medvlp fit --resume`` (to its end after the last):
    ``(uninterrupted run, resumed run)``."""
    import logging

    logger = logging.getLogger("medvlp")  # main() sets up the command line's logging: undone at the end
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    try:
        return _killed_and_resumed(out, fit, kills)
    finally:
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level


def _killed_and_resumed(out: Path, fit: list[str], kills: list[int]) -> tuple[Path, Path]:
    from medvlp.cli import main

    assert main([*fit, f"run.out_dir={out}", "run.name=whole"]) == 0  # in this process: no start-up to pay
    chain = out / "killed"
    for i, at in enumerate(kills):
        args = [*fit, f"run.out_dir={out}", "run.name=killed"] if i == 0 else ["fit", "--resume", str(chain)]
        proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 300
        try:
            while logged_step(chain) < at and time.time() < deadline:
                assert proc.poll() is None, f"training ended before it could be killed at step {at}"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert main(["fit", "--resume", str(chain)]) == 0
    torch.use_deterministic_algorithms(False)  # trainer.deterministic set it for this process
    return out / "whole", chain


def assert_same_run(whole: Path, chain: Path, note: str) -> None:
    """The same final weights and optimiser state, bit for bit, and the same metrics.csv."""
    a = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(chain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] and a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{key} differs ({note})"
    for group_a, group_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(group_a[k], group_b[k]) for k in group_a), note
    assert (chain / "metrics.csv").read_text() == (whole / "metrics.csv").read_text(), note


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run of :data:`FIT` whole and killed at three random steps: ``(whole, resumed, kill points)``."""
    rng = random.Random()
    kills = [rng.randint(4, 5), rng.randint(7, 8), rng.randint(10, 11)]  # after checkpoints 3, 6 and 9
    whole, chain = killed_and_resumed(tmp_path_factory.mktemp("runs"), FIT, kills)
    return whole, chain, kills


def test_killed_and_resumed_run_is_bit_identical(runs):
    """kill -9 at three random steps + --resume: the weights of the uninterrupted run, bit for bit, the same
    per-step losses and one row per logged step in metrics.csv (deterministic mode, CPU)."""
    whole, chain, kills = runs
    assert final_step(chain) == final_step(whole) == STEPS
    assert_same_run(whole, chain, f"kills at {kills}")
    with open(chain / "metrics.csv", newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss_step")]
    assert steps == list(range(STEPS))
    # the resumes started from mid-epoch and from epoch-boundary checkpoints
    resumed = [r["step"] for r in json.loads((chain / "run_info.json").read_text())["resumed"]]
    assert len(resumed) == 3 and all(s % EVERY == 0 and s > 0 for s in resumed), resumed
    assert any(s % PER_EPOCH for s in resumed) and any(s % PER_EPOCH == 0 for s in resumed), resumed
    # the rows trained again after a kill are kept beside metrics.csv, not deleted
    assert list(chain.glob("metrics.after-step*.csv"))
    assert len(list((chain / "tb").glob("events.out.tfevents.*"))) == 4


def test_fit_writes_run_dir(runs):
    run_dir = runs[0]
    for rel in ("config.yaml", "run_info.json", "text_encoder/tokenizer.json", "text_encoder/config.json",
                "checkpoints/last.ckpt", "metrics.csv"):
        assert (run_dir / rel).exists(), rel
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_itc_step" in header and "val/loss_itc" in header


def test_zeroshot_and_retrieve_on_run(runs, capsys):
    """``medvlp zeroshot`` / ``medvlp retrieve`` on the run (the command line's ``main``, in this process)."""
    from medvlp.cli import main

    run_dir = runs[1]
    assert main(["zeroshot", "--run", str(run_dir)]) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    for finding in ("Cardiomegaly", "Pleural Effusion", "Consolidation", "Pneumothorax", "Lung Lesion", "mean"):
        assert finding in out
    assert main(["retrieve", "--run", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "R@5" in out and "image to text" in out


@pytest.mark.slow
def test_resume_is_exact_with_accumulation_workers_and_mid_epoch_validation(tmp_path):
    """The same with gradient accumulation over 2 batches, two persistent DataLoader workers, validation
    twice an epoch and a checkpoint every 2 optimiser steps (12 batches an epoch, 6 steps)."""
    fit = [*FIT[:3], "trainer.max_steps=14", "trainer.checkpoint_every_n_steps=2", "trainer.accumulate_grad_batches=2",
           "trainer.val_check_interval=0.5", "data.num_workers=2", "data.persistent_workers=true",
           *[a for a in FIT[5:] if not a.startswith("data.batch_size")], "data.batch_size=16"]
    rng = random.Random()
    kills = [rng.randint(3, 4), rng.randint(7, 8), rng.randint(10, 11)]
    whole, chain = killed_and_resumed(tmp_path, fit, kills)
    assert final_step(chain) == 14
    assert_same_run(whole, chain, f"kills at {kills}")


class Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def planted(runs, tmp_path):
    """A copy of the finished run whose ``last.ckpt`` holds the real weights plus a pickled payload."""
    import shutil

    src, run_dir = runs[0], tmp_path / "planted"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("checkpoints", "downstream", "tb"))
    state = torch.load(src / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state["extra"] = Payload(tmp_path / "ran")
    (run_dir / "checkpoints").mkdir()
    torch.save(state, run_dir / "checkpoints" / "last.ckpt")
    return run_dir, tmp_path / "ran"


@pytest.mark.parametrize("command", ["zeroshot", "retrieve", "downstream", "explain", "resume"])
def test_a_planted_checkpoint_is_refused_by_every_command(planted, command, capsys):
    from medvlp.cli import main

    run_dir, marker = planted
    argv = {"zeroshot": ["zeroshot", "--run", str(run_dir)],
            "retrieve": ["retrieve", "--run", str(run_dir)],
            "downstream": ["downstream", "--task", "classification", "--data", "demo_chexpert", "--run", str(run_dir)],
            "explain": ["explain", "--run", str(run_dir)],
            "resume": ["fit", "--resume", str(run_dir)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Refusing to load" in err and "last.ckpt" in err and "Nothing in it was run" in err, err
    assert not marker.exists()
    if command == "resume":  # the control: the file does run code when unpickled in full
        torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        assert marker.exists()

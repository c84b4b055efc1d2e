"""`medvlp fit` end to end through the CLI: run directory, zero-shot, retrieval, kill + resume."""

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "medvlp.cli"]


def final_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A 50-step ``medvlp fit``, killed with SIGKILL once it has checkpointed step 15 or later, then
    ``medvlp fit --resume``d to its end: ``(run directory, the step it was killed at)``."""
    out = tmp_path_factory.mktemp("runs")
    args = [*CLI, "fit", "--method", "clip", "trainer.max_steps=50", "trainer.checkpoint_every_n_steps=5",
            f"run.out_dir={out}", "run.name=killed", "trainer.enable_progress_bar=false"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckdir = out / "killed" / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not any(int(p.stem[4:]) >= 15 and zipfile.is_zipfile(p) for p in ckdir.glob("step*.ckpt")):
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    from medvlp.api import latest_checkpoint

    killed_at = torch.load(latest_checkpoint(out / "killed"), map_location="cpu", weights_only=False)["global_step"]
    res = subprocess.run([*CLI, "fit", "--resume", str(out / "killed")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "killed", killed_at


def test_sigkill_and_resume_reaches_same_step(resumed_run):
    run_dir, killed_at = resumed_run
    assert 15 <= killed_at < 50
    assert final_step(run_dir) == 50  # where the uninterrupted 50-step run ends


def test_fit_writes_run_dir(resumed_run):
    run_dir, _ = resumed_run
    for rel in ("config.yaml", "run_info.json", "text_encoder/tokenizer.json", "text_encoder/config.json",
                "checkpoints/last.ckpt", "metrics.csv"):
        assert (run_dir / rel).exists(), rel
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_itc_step" in header and "val/loss_itc" in header


def test_zeroshot_and_retrieve_on_run(resumed_run, capsys):
    """``medvlp zeroshot`` / ``medvlp retrieve`` on the run (the command line's ``main``, in this process)."""
    from medvlp.cli import main

    run_dir, _ = resumed_run
    assert main(["zeroshot", "--run", str(run_dir)]) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    for finding in ("Cardiomegaly", "Pleural Effusion", "Consolidation", "Pneumothorax", "Lung Lesion", "mean"):
        assert finding in out
    assert main(["retrieve", "--run", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "R@5" in out and "image to text" in out

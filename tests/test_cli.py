"""The command line as a user runs it (subprocesses)."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=600, cwd=None):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "medvlp.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ})
    return proc, time.time() - t0


def test_help_is_fast():
    run("--help")  # warm the file cache
    proc, dt = run("--help")
    assert proc.returncode == 0 and "fit" in proc.stdout and "zeroshot" in proc.stdout
    assert dt < 3.0, f"medvlp --help took {dt:.1f}s"


def test_list_prints_registries():
    proc, _ = run("list")
    assert proc.returncode == 0
    for name in ("clip", "mimic_cxr", "ct_rate", "timm", "vit3d", "hf", "zeroshot", "retrieval", "detection", "segmentation"):
        assert name in proc.stdout


def test_missing_root_fails_fast_with_layout():
    proc, dt = run("fit", "--method", "clip", "data.root=/nonexistent")
    assert proc.returncode == 2
    assert "/nonexistent" in proc.stderr and "mimic-cxr-2.0.0-metadata" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert dt < 5.0, f"took {dt:.1f}s"


def test_typo_suggests_key():
    proc, _ = run("fit", "--method", "clip", "trainer.max_epoch=1")
    assert proc.returncode == 2 and "trainer.max_epochs" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_method_suggests():
    proc, _ = run("fit", "--method", "clpi")
    assert proc.returncode == 2 and "Did you mean 'clip'" in proc.stderr

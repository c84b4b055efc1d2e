"""The built wheel carries its configs: installed (not editable) in a fresh environment, `medvlp fit`
composes and trains from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 12 s: builds and installs a wheel
def test_the_wheel_ships_the_configs_and_trains_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("medvlp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for group in ("method", "data", "trainer", "encoder", "downstream", "experiment", "prompts"):
        assert any(n.startswith(f"medvlp/configs/{group}/") and n.endswith(".yaml") for n in names), group
    assert "medvlp/configs/method/clip.yaml" in names and not any(n.startswith("tests/") for n in names)

    # A fresh environment that sees the already installed dependencies, with medvlp from the wheel only.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", site,
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDVLP_CONFIG_DIR")}
    env["HF_HUB_OFFLINE"] = "1"
    where = subprocess.run([str(py), "-c", "import medvlp, medvlp.config as C; print(medvlp.__file__); print(C.config_dir())"],
                           capture_output=True, text=True, cwd=away, env=env)
    assert where.stdout.startswith(site), f"medvlp imported from {where.stdout!r}, not the wheel in {site}"
    fit = subprocess.run([str(py), "-m", "medvlp.cli", "fit", "--method", "clip", "trainer.max_steps=5",
                          "trainer.enable_progress_bar=false", "data.batch_size=8"],
                         capture_output=True, text=True, cwd=away, env=env, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run_dir,) = (away / "runs").iterdir()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()

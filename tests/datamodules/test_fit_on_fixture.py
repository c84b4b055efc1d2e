"""``medvlp fit --method clip --data mimic_cxr data.root=<fixture>`` trains on the tiny MIMIC fixture."""

from __future__ import annotations

import subprocess
import sys

from conftest import write_mimic


def test_cli_fit_on_the_mimic_fixture(tmp_path):
    fx = write_mimic(tmp_path / "mimic-cxr-jpg")
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "medvlp.cli", "fit", "--method", "clip", "--data", "mimic_cxr", f"data.root={fx.root}",
           f"run.out_dir={out}", "trainer.max_steps=3", "data.num_workers=0", "trainer.enable_progress_bar=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = list(out.iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert "data:\n  name: mimic_cxr" in (run / "config.yaml").read_text()
    assert (run / "metrics.csv").read_text().count("\n") >= 2

"""Two gloo processes (Lightning's DDP on the CPU): a ``medvlp fit`` and a ``medvlp downstream`` transfer each
write one run directory, and reach the weights and the loss of one process on the global batch.

The two processes run ``tests/ddp_run.py`` - both commands in one launch, as a user's script would - with
8 items per process and step; this process then runs the same commands with 16 items per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_run import FIT_STEPS, PROBE_EPOCHS, commands

from medvlp import api

HERE = Path(__file__).resolve().parent


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]


@pytest.mark.distributed
def test_ddp_fit_and_transfer_match_one_process_on_the_global_batch(tmp_path):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_run.py"), str(ddp), "2", "8"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size: 2" in proc.stderr.lower() or "distributed_backend=gloo" in proc.stderr, proc.stderr[-2000:]
    from medvlp.cli import main

    for command in commands(one, 1, 16, run=ddp / "fit"):  # both probes start from the same pre-trained run
        assert main(command) == 0

    # one run directory and one transfer folder, complete, written once
    assert sorted(p.name for p in ddp.iterdir()) == ["fit", "probe"]
    run = ddp / "fit"
    assert all((run / f).is_file() for f in ("config.yaml", "run_info.json", "metrics.csv", "checkpoints/last.ckpt"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == FIT_STEPS
    assert proc.stdout.count("run directory: ") == 1 and proc.stdout.count("wrote ") == 1
    assert api.load_config(run).trainer.devices == "2"

    # the fit: the update of one process on 16 items per step (up to float rounding, which AdamW's
    # normalisation makes visible in single weights whose gradient is nearly 0), and its loss on a batch
    import lightning as L

    cfg = api.load_config(one / "fit")
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)  # the initial weights, as fit draws them
    w0, w2, w1 = api.build_method(cfg).state_dict(), _weights(run), _weights(one / "fit")
    assert w2.keys() == w1.keys() == w0.keys()
    diff = sum(float((w2[k] - w1[k]).pow(2).sum()) for k in w1) ** 0.5
    update = sum(float((w1[k] - w0[k]).pow(2).sum()) for k in w1) ** 0.5
    assert update > 0.1 and diff < 1e-2 * update, (diff, update)
    losses = []
    for path in (run, one / "fit"):
        method, cfg = api.load_run(path)
        batch = next(iter(api.build_datamodule(cfg, tokenizer=method.tokenizer).val_dataloader()))
        with torch.no_grad():
            losses.append(float(method.eval().losses(batch)["itc"]))
    assert abs(losses[0] - losses[1]) < 1e-3 * losses[1], losses

    # the transfer: the same validation losses epoch by epoch and the same test AUROC
    r2, r1 = (json.loads((d / "probe" / "result.json").read_text()) for d in (ddp, one))
    assert r2["history"]["epochs"] == r1["history"]["epochs"] == PROBE_EPOCHS and r2["n_train"] == r1["n_train"]
    assert max(abs(a - b) for a, b in zip(r2["history"]["val_loss"], r1["history"]["val_loss"])) < 1e-5
    assert r1["history"]["val_loss"][-1] < r1["history"]["val_loss"][0]  # the head trained
    assert abs(r2["mean_auroc"] - r1["mean_auroc"]) < 1e-4

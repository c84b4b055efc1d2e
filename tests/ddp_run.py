"""``medvlp fit`` and then ``medvlp downstream`` (a linear probe on the fitted run) in one launch, on
``DEVICES`` CPU processes, each with ``BATCH`` items per step: ``python tests/ddp_run.py OUT DEVICES BATCH``.

With ``DEVICES > 1`` Lightning's DDP launcher starts the other processes by running this script again
(gloo); they rejoin both commands. The fit is CLIP with a ViT (no batch norm) on the demo chest X-rays,
deterministic, so that DDP on ``BATCH`` per process and one process on ``DEVICES x BATCH`` can be compared.
"""

from __future__ import annotations

import sys
from pathlib import Path

FIT_STEPS = 4
TRAIN_ITEMS = 64  # whole global batches for 2 x 8 and 16
PROBE_EPOCHS = 2


def commands(out: Path, devices: int, batch: int, run: Path | None = None) -> list[list[str]]:
    """The fit into ``out/fit`` and the probe into ``out/probe`` (on ``run``, default the fit)."""
    trainer = ["trainer.accelerator=cpu", f"trainer.devices={devices}", "trainer.enable_progress_bar=false",
               "trainer.deterministic=true", *(["trainer.strategy=ddp"] if devices > 1 else [])]
    root = Path(__file__).resolve().parents[1]
    fit = ["fit", "--config", str(root / "configs/experiment/clip_vit_demo.yaml"), f"run.out_dir={out}", "run.name=fit",
           f"data.batch_size={batch}", f"data.limit_train={TRAIN_ITEMS}", "data.num_workers=0",
           f"trainer.max_steps={FIT_STEPS}", "trainer.limit_val_batches=0", *trainer]
    probe = ["downstream", "--task", "classification", "--data", "demo_chexpert", "--run", str(run or out / "fit"),
             "--batch-size", str(batch), "--max-epochs", str(PROBE_EPOCHS), "--out", str(out / "probe"),
             "data.num_workers=0", *trainer]
    return [fit, probe]


if __name__ == "__main__":
    from medvlp.cli import main

    out, devices, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for command in commands(out, devices, batch):
        code = main(command)
        if code:
            sys.exit(code)

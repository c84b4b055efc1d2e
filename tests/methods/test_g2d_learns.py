"""G2D measurably learns the 2D synthetic world on CPU: zero-shot AUROC, the pseudo-segmentation loss
falls, and the decoder's masks find the drawn consolidations better than a constant mask.

110 steps of ``medvlp fit --method g2d`` (the shared run of ``tests/learning.py``).
"""

from __future__ import annotations

import pandas as pd
import torch

from medvlp import api
from medvlp.downstream import dense_probe as dp


def test_g2d_learns_2d_demo(learned):
    r = learned["g2d"]
    r.assert_learned()
    run_dir, untrained = r.run_dir, r.untrained

    metrics = pd.read_csv(run_dir / "metrics.csv")
    for term in ("vla", "pa"):
        values = metrics[f"train/loss_{term}_step"].dropna().to_numpy()
        assert len(values) >= 15, term
        first, last = values[:3].mean(), values[-3:].mean()
        assert last < 0.7 * first, f"{term}: {first:.3f} -> {last:.3f}"

    # The decoder's masks on held-out images with a drawn consolidation overlap the true region
    # better than a constant (all-ones) mask; the untrained decoder does not.
    method, cfg = api.load_run(run_dir)
    method.eval()
    dm = api.build_datamodule(cfg, tokenizer=method.tokenizer)
    images, truth = dp.load_images_and_masks(dm, dp.demo_mask_records(dm, "test", "consolidation", positives_only=True))
    assert len(images) >= 10
    constant = dp.mask_dice(torch.ones_like(truth), truth).mean().item()
    trained = dp.mask_dice(method.dense_outputs(images)["prediction"][:, 0] >= 0.5, truth).mean().item()
    untrained.eval()
    before = dp.mask_dice(untrained.dense_outputs(images)["prediction"][:, 0] >= 0.5, truth).mean().item()
    print(f"consolidation Dice on {len(images)} test images: G2D {trained:.3f}, constant mask {constant:.3f}, "
          f"untrained {before:.3f}")
    assert trained > constant + 0.05, (trained, constant)
    assert before < trained
    assert (run_dir / "export" / "unet.pt").is_file() and (run_dir / "export" / "encoder.pt").is_file()

"""G2D's encoder gives better dense features than the CLIP baseline's after the same pre-training.

Both methods pre-train the same image encoder (timm ``test_resnet``, 64 px, from scratch) on the
2D synthetic world for the same number of steps with the same seeds. Then, frozen, the hypercolumn
of the encoder stages G2D's decoder reads (strides 4 to 16, :func:`dense_features`) feeds a
1x1-convolution probe trained on the drawn consolidation and pneumothorax masks of the train split;
Dice is measured on the test images that contain the finding. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp import api
from medvlp import config as C
from medvlp.downstream import dense_probe as dp

STEPS = 300
SEEDS = (0, 1)
FINDINGS = ("consolidation", "pneumothorax")


def pretrain(tmp_path, method: str, seed: int):
    cfg = C.compose(method=method, data="demo_cxr", overrides=[
        f"run.out_dir={tmp_path}", f"run.name={method}-{seed}", f"run.seed={seed}", f"trainer.max_steps={STEPS}",
        "trainer.max_epochs=100", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1"])
    if method == "clip":  # the same encoder and input as G2D's demo config
        assert cfg.method.image_encoder.model == "test_resnet"
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    return api.load_run(api.fit(cfg))


def probe_dice(method, cfg, data) -> dict[str, float]:
    out = {}
    for finding, (xtr, mtr, xte, mte) in data.items():
        ftr = dp.dense_features(method.image_encoder, xtr, stages=(1, 2, 3))
        fte = dp.dense_features(method.image_encoder, xte, stages=(1, 2, 3))
        out[finding] = dp.linear_probe(ftr, mtr, fte, mte, steps=300)["dice"]
    return out


@pytest.mark.slow
def test_g2d_dense_features_beat_clip_with_a_linear_probe(tmp_path):
    torch.manual_seed(0)
    results: dict[str, list[dict[str, float]]] = {"g2d": [], "clip": []}
    data = None
    for seed in SEEDS:
        for name in results:
            method, cfg = pretrain(tmp_path, name, seed)
            method.eval()
            if data is None:
                dm = api.build_datamodule(cfg, tokenizer=method.tokenizer)
                data = {}
                for finding in FINDINGS:
                    xtr, mtr = dp.load_images_and_masks(dm, dp.demo_mask_records(dm, "train", finding)[:600])
                    xte, mte = dp.load_images_and_masks(dm, dp.demo_mask_records(dm, "test", finding))
                    data[finding] = (xtr, mtr, xte, mte)
            results[name].append(probe_dice(method, cfg, data))
    mean = {name: float(np.mean([d[f] for d in runs for f in FINDINGS])) for name, runs in results.items()}
    for name, runs in results.items():
        print(name, [{f: round(d[f], 3) for f in FINDINGS} for d in runs], f"mean {mean[name]:.3f}")
    assert mean["g2d"] > mean["clip"], results

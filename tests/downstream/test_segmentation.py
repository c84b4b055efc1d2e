"""Segmentation transfer (``medvlp downstream --task segmentation``): MGCA's Dice and loss by hand, the
U-Net over a pretrained timm CNN (weights carried over), the ViT decoder, and short runs on the demo worlds."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medvlp import api
from medvlp import config as C
from medvlp.downstream.segmentation import (
    balance_positives,
    build_segmenter,
    dice_per_image,
    focal_loss,
    segmentation_loss,
    soft_dice_batch,
)


def test_dice_follows_mgca_including_empty_masks():
    truth = torch.zeros(4, 4, 4)
    truth[0, :2, :2] = 1  # 4 pixels
    truth[1, 0, 0] = 1
    pred = torch.zeros(4, 4, 4)
    pred[0, :2, :1] = 0.9  # 2 of the 4, nothing else
    pred[2, 3, 3] = 0.7  # a prediction on an empty truth
    d = dice_per_image(pred, truth)
    assert math.isclose(float(d[0]), 2 * 2 / (2 + 4), rel_tol=1e-6) and float(d[1]) == 0.0
    assert float(d[2]) == 0.0 and float(d[3]) == 1.0  # empty truth: 0 with a prediction, 1 without
    assert float(dice_per_image(torch.full((1, 2, 2), 0.5), torch.ones(1, 2, 2))) == 0.0  # 0.5 is not > 0.5


def test_loss_is_ten_focal_minus_log_soft_dice():
    logits = torch.tensor([[[2.0, -1.0], [0.0, 3.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    p = torch.sigmoid(logits)
    pt = torch.where(target > 0, p, 1 - p)
    focal = (-(1 - pt) ** 2 * torch.log(pt)).mean()
    dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert torch.isclose(focal_loss(logits, target), focal) and torch.isclose(soft_dice_batch(logits, target), dice)
    assert torch.isclose(segmentation_loss(logits, target), 10 * focal - torch.log(dice))


def test_siim_balancing_keeps_every_positive_and_as_many_negatives():
    recs = [SimpleNamespace(labels=np.array([float(i % 5 == 0)]), i=i) for i in range(50)]
    kept = balance_positives(recs)
    assert sum(float(r.labels[0]) for r in kept) == 10 and len(kept) == 20
    assert [r.i for r in balance_positives(recs)] == [r.i for r in kept]  # seeded


def _fit(tmp_path, *overrides):
    cfg = C.compose(method="clip", overrides=[f"run.out_dir={tmp_path}", "trainer.max_steps=40",
                                              "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1", *overrides])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    return api.fit(cfg)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("clip"))


def test_unet_carries_the_pretrained_encoder_weights(cnn_run):
    method, _ = api.load_run(cnn_run)
    seg = build_segmenter(method, in_channels=1, decoder_channels=(32, 16, 16, 8, 8))
    src = method.image_encoder.model.state_dict()
    dst = seg.encoder.state_dict()
    def key(k):  # smp's tu- encoders hold the timm model as .model
        return "model." + k if "model." + k in dst else k

    shared = [k for k in src if key(k) in dst]
    assert len(shared) > 10 and all(torch.equal(src[k], dst[key(k)]) for k in shared)
    assert seg(torch.randn(2, 1, 64, 64)).shape == (2, 64, 64)


def test_frozen_unet_on_siim_beats_a_constant_mask(cnn_run, tmp_path):
    res = api.downstream("segmentation", "demo_siim", cnn_run, protocol="frozen", out=tmp_path / "seg",
                         max_epochs=4, batch_size=16, decoder_channels=(32, 16, 16, 8, 8))
    assert res["balanced"] and res["n_test_positive"] > 5
    ones = json.loads((tmp_path / "seg" / "result.json").read_text())["baseline_all_ones_dice_positive"]
    assert res["dice_positive"] > max(0.3, 2 * ones), (res["dice_positive"], ones)
    assert (tmp_path / "seg" / "overlays.png").stat().st_size > 1000
    frozen = res["history"]["steps"] > 0
    assert frozen


def test_vit_decoder_and_finetune_on_rsna_boxes(tmp_path):
    run = _fit(tmp_path / "vit", "method.image_encoder.img_size=[32]", "data.image_size=32",
               "method.image_encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
               "method.image_encoder.model=vit_base_patch16_224", "method.image_encoder.pretrained=false",
               "method.image_encoder.in_chans=1")
    res = api.downstream("segmentation", "demo_rsna", run, protocol="finetune", out=tmp_path / "seg",
                         max_steps=15, batch_size=16, decoder_channels=(32, 16))
    assert res["protocol"] == "finetune" and res["history"]["steps"] == 15 and 0.0 <= res["dice"] <= 1.0
    assert res["decoder"] == "SETRNaiveSegmenter"

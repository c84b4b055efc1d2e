"""Detection transfer (``medvlp downstream --task detection``): mAP by hand (MGCA's IoU range, the 101-point
interpolation, MGCA's image filter), the feature pyramids over CNN and ViT encoders, and short runs of
every registered 2D method on the demo RSNA boxes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medvlp import api
from medvlp.cli import main
from medvlp.downstream.detection import IOU_THRESHOLDS, build_detector, detection_map, settings_for

METHODS_2D = ("clip", "mgca", "g2d")


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _pred(boxes, scores):
    return {"boxes": _boxes(*boxes), "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.zeros(len(scores), dtype=torch.long)}


def _truth(*boxes):
    return {"boxes": _boxes(*boxes), "labels": torch.zeros(len(boxes), dtype=torch.long)}


def test_map_by_hand_over_mgca_iou_thresholds():
    assert IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
    # one box with IoU 0.625: a hit at 0.40 ... 0.60 (5 of the 8 thresholds), a miss above
    one = detection_map([_pred([[0, 0, 10, 6.25]], [0.9])], [_truth([0, 0, 10, 10])])
    assert math.isclose(one["map"], 5 / 8, abs_tol=1e-6) and one["per_iou"]["0.65"] == 0.0
    assert math.isclose(one["map_50"], 1.0, abs_tol=1e-6)
    # ranked hit, false alarm, hit over two true boxes: precision 1 up to recall 0.5 (51 of the 101
    # recall points), then 2/3 (50 points)
    g1, g2, far = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
    preds = [_pred([g1], [0.9]), _pred([far, g2], [0.8, 0.7])]
    truths = [_truth(g1), _truth(g2)]
    assert math.isclose(detection_map(preds, truths)["map"], (51 + 50 * 2 / 3) / 101, abs_tol=1e-6)
    # a missed image and a false alarm (0.95) on an image without findings: recall stops at 2/3 and
    # the best precision is 1/2 -> 67 recall points at 1/2
    preds4 = [*preds, _pred([], []), _pred([[0, 0, 5, 5]], [0.95])]
    truths4 = [*truths, _truth([5, 5, 15, 15]), _truth()]
    assert math.isclose(detection_map(preds4, truths4)["map"], 67 * 0.5 / 101, abs_tol=1e-6)


def test_mgca_mode_counts_only_images_with_a_detection_and_a_box():
    g1, g2, far = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
    preds = [_pred([g1], [0.9]), _pred([far, g2], [0.8, 0.3]), _pred([], []), _pred([[0, 0, 5, 5]], [0.95])]
    truths = [_truth(g1), _truth(g2), _truth([5, 5, 15, 15]), _truth()]
    mgca = detection_map(preds, truths, "mgca", score_threshold=0.5)
    # the 0.3 hit is dropped; the missed image and the false alarm on the empty image do not enter:
    # hit (0.9), false alarm (0.8) over two boxes -> precision 1 up to recall 0.5
    assert mgca["n_images"] == 2 and math.isclose(mgca["map"], 51 / 101, abs_tol=1e-6)
    standard = detection_map(preds, truths, "standard", score_threshold=0.5)
    assert standard["n_images"] == 4 and standard["map"] < mgca["map"]
    assert detection_map([_pred([], [])], [_truth(g1)], "mgca")["map"] == 0.0  # nothing enters: 0
    assert math.isnan(detection_map([_pred([g1], [0.9])], [_truth()])["map"])  # no true box at all
    with pytest.raises(ValueError, match="mAP mode"):
        detection_map(preds, truths, "voc")


def test_settings_follow_mgca_per_fraction():
    assert (settings_for(1.0).lr, settings_for(1.0).batch_size) == (5e-4, 16)
    assert (settings_for(0.1).lr, settings_for(0.1).batch_size) == (5e-4, 16)
    assert (settings_for(0.01, "rsna_pneumonia").lr, settings_for(0.01).batch_size) == (2e-4, 8)
    assert settings_for(0.01, "object_cxr").lr == 2.5e-4 and settings_for(1.0).weight_decay == 1e-6
    assert settings_for(0.01, lr=1e-3).lr == 1e-3
    with pytest.raises(ValueError, match="Unknown detection setting"):
        settings_for(1.0, momentum=0.9)


LOSSES = {"fcos": {"classification", "bbox_regression", "bbox_ctrness"},
          "retinanet": {"classification", "bbox_regression"},
          "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}}


@pytest.mark.parametrize(("enc", "detector"), [
    (dict(model="test_resnet"), "fcos"), (dict(model="test_resnet"), "retinanet"), (dict(model="test_resnet"), "faster_rcnn"),
    (dict(model="vit_base_patch16_224", img_size=[64], kwargs={"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}),
     "fcos")], ids=["cnn-fcos", "cnn-retinanet", "cnn-faster_rcnn", "vit-fcos"])
def test_pyramid_levels_and_a_training_step(enc, detector, untrained_method):
    method = untrained_method(**enc)
    det = build_detector(method, in_channels=1, image_size=64, settings=settings_for(1.0, detector=detector))
    # the encoder is a copy carrying the run's weights
    for a, b in zip(det.backbone.encoder.state_dict().values(), method.image_encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    feats = det.backbone(torch.randn(2, 1, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(f.shape[1] == 256 for f in feats.values()) and det.backbone.strides == (4, 8, 16, 32, 64)
    det.train()
    images = [torch.randn(1, 64, 64) for _ in range(2)]
    targets = [{"boxes": _boxes([10, 12, 30, 40]), "labels": torch.tensor([1])},
               {"boxes": _boxes(), "labels": torch.zeros(0, dtype=torch.long)}]  # an image without findings
    losses = det(images, targets)
    assert set(losses) == LOSSES[detector] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


# with the slow tests (13 s each); the default suite trains every detector a step on each kind of encoder
# (test_pyramid_levels_and_a_training_step)
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS_2D)
def test_frozen_detector_beats_the_mean_box_for_every_2d_method(runs, method, tmp_path):
    res = api.downstream("detection", "demo_rsna", runs[method], protocol="frozen", out=tmp_path / "det",
                         max_epochs=2, pyramid_channels=64)
    assert res["task"] == "detection" and res["n_test_positive"] > 10
    assert res["map"] > max(0.15, 3 * res["baseline_mean_box_map"]), (res["map"], res["baseline_mean_box_map"])
    assert 0.0 <= res["map_mgca"] <= 1.0 and res["map_mgca_images"] <= res["n_test_positive"]
    saved = json.loads((tmp_path / "det" / "result.json").read_text())
    assert saved["map"] == res["map"] and saved["method"] == method
    for name in ("overlays.png", "precision_recall.png"):
        assert (tmp_path / "det" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # 10 s; the detector itself is trained in the default suite
def test_detection_cli_on_object_cxr_finetune(runs, tmp_path, capsys):
    main(["downstream", "--task", "detection", "--data", "demo_object_cxr", "--run", str(runs["clip"]),
          "--protocol", "finetune", "--fraction", "0.1", "--max-steps", "6", "--out", str(tmp_path / "obj"),
          "--pyramid-channels", "64"])
    out = capsys.readouterr().out
    assert "mAP @ IoU 0.40-0.75" in out and "MGCA's evaluation" in out
    res = json.loads((tmp_path / "obj" / "result.json").read_text())
    assert res["protocol"] == "finetune" and res["history"]["steps"] == 6 and res["settings"]["lr"] == 5e-4
    assert res["n_train"] < 100 and 0.0 <= res["map"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS_2D)
def test_finetuned_detector_and_segmenter_beat_chance_for_every_2d_method(runs, method, tmp_path):
    """The ``finetune`` protocol of both dense tasks, encoder trained too (with the slow tests)."""
    det = api.downstream("detection", "demo_rsna", runs[method], protocol="finetune", out=tmp_path / "det",
                         max_epochs=2, pyramid_channels=64)
    assert det["map"] > max(0.15, 3 * det["baseline_mean_box_map"]), (det["map"], det["baseline_mean_box_map"])
    seg = api.downstream("segmentation", "demo_siim", runs[method], protocol="finetune", out=tmp_path / "seg",
                         max_epochs=4, batch_size=16, decoder_channels=(32, 16, 16, 8, 8))
    ones = seg["baseline_all_ones_dice_positive"]
    assert seg["dice_positive"] > max(0.3, 2 * ones), (seg["dice_positive"], ones)

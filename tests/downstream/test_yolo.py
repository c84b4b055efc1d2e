"""MGCA's YOLOv3 detector (``detector=yolov3``): anchors and loss weights pinned to the spec (mgca.md §7.3),
the head's maps, the loss by hand and its target assignment (ignore rule), decoding + NMS, and a short
run of the detection task on the demo RSNA boxes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from medvlp import api
from medvlp import config as C
from medvlp.downstream.detection import (
    build_detector,
    detection_step,
    predict_boxes,
    run_detection,
    settings_for,
)
from medvlp.downstream.yolo import (
    YOLO_ANCHORS,
    YOLODetector,
    YoloLossWeights,
    YOLOv3Head,
    build_targets,
    decode,
    postprocess,
    yolo_anchors,
    yolo_loss,
    yolo_map_loss,
)


def _box(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _target(*rows, label=0):
    boxes = _box(*rows)
    return {"boxes": boxes, "labels": torch.full((len(boxes),), label, dtype=torch.long)}


def _tokenizer(texts, padding=None, truncation=None, max_length=8, return_tensors=None):
    """The datamodule's batches carry tokens; detection does not read them."""
    return {"input_ids": torch.zeros(len(texts), max_length, dtype=torch.long),
            "attention_mask": torch.ones(len(texts), max_length, dtype=torch.long)}


def _bce(p, t):
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_anchors_are_yolov3_coco_scaled_by_224_over_416():
    assert YOLO_ANCHORS == {8: ((10, 13), (16, 30), (33, 23)), 16: ((30, 61), (62, 45), (59, 119)),
                            32: ((116, 90), (156, 198), (373, 326))}  # the largest on the coarsest map
    scaled = yolo_anchors(224)
    expected = {8: [(5.384615, 7.0), (8.615385, 16.153846), (17.769231, 12.384615)],
                16: [(16.153846, 32.846154), (33.384615, 24.230769), (31.769231, 64.076923)],
                32: [(62.461538, 48.461538), (84.0, 106.615385), (200.846154, 175.538462)]}
    assert list(scaled) == [8, 16, 32]
    for stride, pairs in expected.items():
        for got, want in zip(scaled[stride], pairs, strict=True):
            assert got == pytest.approx(want, abs=1e-6)
    assert yolo_anchors(416) == {s: tuple((float(w), float(h)) for w, h in p) for s, p in YOLO_ANCHORS.items()}


def test_loss_weights_follow_mgca():
    w = YoloLossWeights()
    assert (w.xy, w.wh, w.objectness, w.classification) == (2.5, 2.5, 1.0, 1.0)
    assert w.ignore_iou == 0.5 and w.no_object == 0.5  # no_object: the official code's factor on the no-object BCE


def test_head_maps_at_strides_8_16_32_with_mgca_widths():
    head = YOLOv3Head((512, 1024, 2048), n_classes=1)  # ResNet-50's layer2 / layer3 / layer4
    assert sum(p.numel() for p in head.parameters()) == 21_626_934  # the official head (ModelMain without backbone)
    assert head.branch32.body[0].conv.weight.shape == (512, 2048, 1, 1)
    assert head.branch32.body[1].conv.weight.shape == (1024, 512, 3, 3)
    assert head.lateral16.conv.weight.shape == (256, 512, 1, 1) and head.branch16.body[0].conv.weight.shape == (256, 1280, 1, 1)
    assert head.lateral8.conv.weight.shape == (128, 256, 1, 1) and head.branch8.body[0].conv.weight.shape == (128, 640, 1, 1)
    assert head.branch8.out[1].weight.shape == (18, 256, 1, 1) and head.branch8.out[1].bias is not None
    assert isinstance(head.branch32.body[0].act, torch.nn.LeakyReLU) and head.branch32.body[0].act.negative_slope == 0.1
    with torch.no_grad():  # 96 px: 12 / 6 / 3 cells
        maps = head([torch.randn(1, 512, 12, 12), torch.randn(1, 1024, 6, 6), torch.randn(1, 2048, 3, 3)])
    assert [tuple(m.shape) for m in maps] == [(1, 18, 12, 12), (1, 18, 6, 6), (1, 18, 3, 3)]


def test_detector_takes_the_encoders_stage_channels_and_trains_the_head_only(untrained_method):
    det = build_detector(untrained_method(model="test_resnet"), 1, 64, 1, settings_for(1.0, detector="yolov3", pyramid_channels=32))
    assert isinstance(det, YOLODetector) and det.backbone.strides == (8, 16, 32)
    assert det.head.in_channels == (48, 192, 96)  # test_resnet's layer2-4, not ResNet-50's 512 / 1024 / 2048
    assert det.anchor_sizes == tuple(yolo_anchors(64)[s] for s in (8, 16, 32))
    images = torch.randn(2, 1, 64, 64)
    maps = det.head(det.backbone(images))
    assert [tuple(m.shape) for m in maps] == [(2, 18, 8, 8), (2, 18, 4, 4), (2, 18, 2, 2)]
    for p in det.backbone.encoder.parameters():  # protocol=frozen
        p.requires_grad_(False)
    det.backbone.train_encoder = False

    batch = SimpleNamespace(images=images, boxes=[_box([10, 12, 30, 40]), _box()],  # an image without findings
                            box_labels=[torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long)])
    det.train()
    total, parts = detection_step(det, batch, torch.device("cpu"))
    assert set(parts) == {"xy", "wh", "objectness", "classification"} and math.isclose(float(total), sum(parts.values()), rel_tol=1e-6)
    total.backward()
    assert all(p.grad is not None for p in det.head.parameters())
    preds, truths, _ = predict_boxes(det, [batch], torch.device("cpu"))
    assert len(preds) == 2 and preds[0]["boxes"].shape[1] == 4 and truths[0]["boxes"].shape == (1, 4)
    assert all(bool((p["labels"] >= 0).all()) for p in preds)  # back to 0-based classes


def test_yolov3_needs_a_cnn_and_bad_detectors_are_named(untrained_method):
    vit = untrained_method(model="vit_base_patch16_224", img_size=[32], kwargs={"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2})
    with pytest.raises(ValueError, match="yolov3 needs a CNN encoder.*fcos, retinanet or faster_rcnn"):
        build_detector(vit, 1, 32, 1, settings_for(1.0, detector="yolov3"))
    with pytest.raises(ValueError, match="detector='yolo3'. Did you mean 'yolov3'.*fcos, retinanet, faster_rcnn, yolov3"):
        settings_for(1.0, detector="yolo3")
    assert settings_for(1.0).detector == "fcos"  # the task's default stays FCOS


def test_loss_by_hand_on_one_box():
    """One 16-px box on a 4x4 map of a 32-px image; anchors 8 / 16 / 32 px (1 / 2 / 4 cells). The box's
    centre (12, 12) is cell (1, 1) with offsets 0.5; its shape matches anchor 1 (IoU 1), so tw = th = 0
    and anchor 1 is the only one ignored there (+1 IoUs 4/9, 1, 9/25)."""
    raw = torch.zeros(1, 18, 4, 4)
    cell = dict(x=1.0, y=-1.0, w=0.3, h=-0.2, obj=2.0, cls=0.5)
    for k, v in enumerate(cell.values()):
        raw[0, 6 * 1 + k, 1, 1] = v  # anchor 1, cell (row 1, col 1)
    losses = yolo_map_loss(raw, [_target([4, 4, 20, 20])], [(8, 8), (16, 16), (32, 32)], (32, 32), 1)
    n = 3 * 4 * 4  # every term is a mean over all anchors and cells
    xy = (_bce(_sigmoid(1.0), 0.5) + _bce(_sigmoid(-1.0), 0.5)) / n
    wh = (0.3 ** 2 + 0.2 ** 2) / n
    obj = -math.log(_sigmoid(2.0)) / n + 0.5 * 47 * math.log(2) / n  # 47 not-ignored anchors at sigmoid(0)
    cls = -math.log(_sigmoid(0.5)) / n
    assert float(losses["xy"]) == pytest.approx(2.5 * xy, rel=1e-5)
    assert float(losses["wh"]) == pytest.approx(2.5 * wh, rel=1e-5)
    assert float(losses["objectness"]) == pytest.approx(obj, rel=1e-5)
    assert float(losses["classification"]) == pytest.approx(cls, rel=1e-5)
    # the maps add up; no box: only the no-object term remains
    both = yolo_loss([raw, raw], [_target([4, 4, 20, 20])], [[(8, 8), (16, 16), (32, 32)]] * 2, (32, 32), 1)
    assert float(both["objectness"]) == pytest.approx(2 * obj, rel=1e-5)
    empty = yolo_map_loss(torch.zeros(1, 18, 4, 4), [_target()], [(8, 8), (16, 16), (32, 32)], (32, 32), 1)
    assert float(empty["objectness"]) == pytest.approx(0.5 * math.log(2), rel=1e-5)
    assert float(empty["xy"]) == float(empty["wh"]) == float(empty["classification"]) == 0.0


def test_target_assignment_and_the_ignore_rule():
    anchors = [(8, 8), (16, 16), (32, 32)]
    # a 12-px box (1.5 cells): +1 shape IoUs 0.64, 0.69, 0.25 -> anchor 1 is assigned, anchors 0 and 1
    # leave the no-object term at its cell (without the official +1, anchor 0's IoU would be 0.44)
    t = build_targets([_target([10, 18, 22, 30], label=1)], anchors, (4, 4), (32, 32), n_classes=2)
    assert t.mask.sum() == 1 and t.mask[0, 1, 3, 2] == 1  # centre (16, 24) -> column 2, row 3
    assert t.no_object[0, :, 3, 2].tolist() == [0.0, 0.0, 1.0] and t.no_object.sum() == 48 - 2
    assert float(t.tx[0, 1, 3, 2]) == 0.0 and float(t.tw[0, 1, 3, 2]) == pytest.approx(math.log(1.5 / 2))
    assert t.cls[0, 1, 3, 2].tolist() == [0.0, 1.0]
    # a 4-px box: best anchor 0 with IoU 0.25 <= 0.5, so it stays in the no-object term as well (official)
    t = build_targets([_target([0, 0, 4, 4])], [(16, 16), (32, 32), (64, 64)], (4, 4), (32, 32), 1)
    assert t.mask[0, 0, 0, 0] == 1 and t.no_object.sum() == 48
    # a centre on the image border goes to the last cell; boxes without area are skipped
    t = build_targets([_target([24, 24, 40, 40], [5, 5, 5, 9])], anchors, (4, 4), (32, 32), 1)
    assert t.mask.sum() == 1 and t.mask[0, 1, 3, 3] == 1 and float(t.tx[0, 1, 3, 3]) == 1.0


def _encode(box, image_size, anchors_by_map, grids, logit=10.0):
    """Raw maps that predict ``box`` exactly where the loss assigns it (its targets as logits)."""
    maps = []
    for anchors, grid in zip(anchors_by_map, grids, strict=True):
        t = build_targets([_target(box)], anchors, grid, image_size, 1)
        raw = torch.full((1, 3, *grid, 6), -logit)
        raw[..., 0], raw[..., 1] = torch.logit(t.tx.clamp(1e-6, 1 - 1e-6)), torch.logit(t.ty.clamp(1e-6, 1 - 1e-6))
        raw[..., 2], raw[..., 3] = t.tw, t.th
        raw[..., 4] = torch.where(t.mask > 0, logit, -logit)
        raw[..., 5] = torch.where(t.mask > 0, logit, -logit)
        maps.append(raw.permute(0, 1, 4, 2, 3).reshape(1, 18, *grid))
    return maps


def test_decode_and_nms_give_the_encoded_box_back():
    anchors = yolo_anchors(64)
    by_map, grids = [anchors[s] for s in (8, 16, 32)], [(8, 8), (4, 4), (2, 2)]
    box = [10.3, 14.7, 41.2, 50.9]
    maps = _encode(box, (64, 64), by_map, grids)
    decoded = decode(maps, by_map, (64, 64))
    assert decoded.shape == (1, 3 * (64 + 16 + 4), 6)
    (out,) = postprocess(decoded)  # MGCA's objectness threshold 0.5 and NMS IoU 0.5
    # every map predicts the box (each assigns it to one of its anchors); NMS keeps one
    assert out["boxes"].shape == (1, 4) and torch.allclose(out["boxes"][0], torch.tensor(box), atol=1e-3)
    assert float(out["scores"][0]) == pytest.approx(_sigmoid(10.0), rel=1e-6) and int(out["labels"][0]) == 0
    assert (decoded[0, :, 4] >= 0.5).sum() == 3
    # the perfect maps have a lower loss than random ones, every term >= 0; the xy BCE of a perfect
    # prediction is the entropy of the offsets (soft targets), its wh MSE is 0
    target = [_target(box)]
    perfect = yolo_loss(maps, target, by_map, (64, 64), 1)
    torch.manual_seed(0)
    noisy = yolo_loss([torch.randn_like(m) for m in maps], target, by_map, (64, 64), 1)
    assert all(float(v) >= 0 for v in (*perfect.values(), *noisy.values()))
    assert float(sum(perfect.values())) < 0.2 * float(sum(noisy.values())) and float(perfect["wh"]) < 1e-10
    entropy = 0.0
    for anchors, (h, w) in zip(by_map, grids, strict=True):
        t = build_targets(target, anchors, (h, w), (64, 64), 1)
        at = t.mask > 0
        entropy += sum(_bce(float(v), float(v)) for v in (*t.tx[at], *t.ty[at])) / (3 * h * w)
    assert float(perfect["xy"]) == pytest.approx(2.5 * entropy, rel=1e-4)


def test_run_detection_with_yolov3_on_the_demo_rsna_boxes(tmp_path, untrained_method):
    cfg = C.compose(method="clip", data="demo_rsna", overrides=["data.task=detection", "data.augment=false"])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    dm = api.build_datamodule(cfg, tokenizer=_tokenizer)
    res = run_detection(untrained_method(model="test_resnet"), dm, protocol="frozen", folder=tmp_path, detector="yolov3",
                        max_steps=2, batch_size=4, pyramid_channels=32)
    assert res["detector"] == "yolov3" and res["pyramid"] == "StageTaps" and res["history"]["steps"] == 2
    assert set(res["history"]["last_losses"]) == {"xy", "wh", "objectness", "classification"}
    assert res["n_test_positive"] > 0 and 0.0 <= res["map"] <= 1.0 and 0.0 <= res["map_mgca"] <= 1.0
    assert res["anchor_sizes"][0] == [pytest.approx(a) for a in yolo_anchors(64)[8]]


@pytest.mark.slow
def test_yolov3_beats_the_mean_box_on_a_pretrained_run(runs, tmp_path):
    res = api.downstream("detection", "demo_rsna", runs["clip"], protocol="frozen", out=tmp_path / "det",
                         detector="yolov3", max_epochs=3, pyramid_channels=64)
    assert res["detector"] == "yolov3" and res["n_test_positive"] > 10
    assert res["map"] > max(0.15, 3 * res["baseline_mean_box_map"]), (res["map"], res["baseline_mean_box_map"])

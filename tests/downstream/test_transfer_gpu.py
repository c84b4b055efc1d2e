"""Detection and segmentation transfer on a CUDA GPU in bf16: paper-sized train steps (ResNet-50 and
ViT-B/16 at 224 px) and a short end-to-end run on the demo boxes."""

from __future__ import annotations

import time

import pytest
import torch

from medvlp.downstream.detection import build_detector, detection_step, predict_boxes, settings_for
from medvlp.downstream.segmentation import build_segmenter, segmentation_loss

pytestmark = pytest.mark.gpu

ENCODERS = {"resnet50": dict(model="resnet50", in_chans=3), "vit_b16": dict(model="vit_base_patch16_224", img_size=[224], in_chans=3)}


class _Batch:
    def __init__(self, n: int, size: int = 224):
        self.images = torch.randn(n, 3, size, size)
        self.boxes = [torch.tensor([[30.0 + i, 40.0, 120.0 + i, 150.0]]) if i % 2 == 0 else torch.zeros(0, 4) for i in range(n)]
        self.box_labels = [torch.zeros(len(b), dtype=torch.long) for b in self.boxes]
        self.masks = torch.zeros(n, size, size)
        self.masks[:, 60:120, 50:140] = 1


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("protocol", ["frozen", "finetune"])
def test_detection_train_steps_in_bf16(encoder, protocol, untrained_method):
    """MGCA's batch of 16 at 224 px; the encoder and pyramid run in bf16, heads and losses in fp32."""
    device = torch.device("cuda")
    model = build_detector(untrained_method(**ENCODERS[encoder]), 3, 224, 1, settings_for(1.0)).to(device)
    if protocol == "frozen":
        model.backbone.train_encoder = False
        for p in model.backbone.encoder.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=1e-6)
    batch = _Batch(16)
    feats = model.backbone(batch.images.to(device))
    assert all(f.dtype == torch.float32 for f in feats.values())
    model.train()
    for step in range(3):
        torch.cuda.synchronize()
        t = time.time()
        loss, parts = detection_step(model, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        print(f"{encoder} {protocol} step {step}: {time.time() - t:.3f} s, {parts}")
        assert torch.isfinite(loss)
    grads = [p.grad for p in model.backbone.encoder.parameters() if p.grad is not None]
    assert (len(grads) > 0) == (protocol == "finetune")
    preds, truths, _ = predict_boxes(model, [batch], device)
    assert len(preds) == 16 and all(p["boxes"].dtype == torch.float32 for p in preds)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_segmentation_train_steps_in_bf16(encoder, untrained_method):
    """U-Net (ResNet-50) or SETR decoder (ViT-B/16), encoder frozen, MGCA's SIIM batch of 8."""
    device = torch.device("cuda")
    model = build_segmenter(untrained_method(**ENCODERS[encoder]), 3).to(device).train()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    batch = _Batch(8)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(batch.images.to(device))
        loss = segmentation_loss(logits.float(), batch.masks.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and logits.dtype == torch.bfloat16 and logits.shape == (8, 224, 224)


def test_demo_detection_and_segmentation_on_cuda(tmp_path):
    from medvlp import api
    from medvlp import config as C

    cfg = C.compose(method="clip", overrides=[f"run.out_dir={tmp_path}", "trainer.max_steps=10", "trainer.enable_progress_bar=false",
                                              "trainer.limit_val_batches=1", "data.demo_size=tiny"])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    run = api.fit(cfg)
    det = api.downstream("detection", "demo_rsna", run, protocol="frozen", out=tmp_path / "det", max_steps=20)
    seg = api.downstream("segmentation", "demo_siim", run, protocol="frozen", out=tmp_path / "seg", max_steps=20)
    assert 0.0 <= det["map"] <= 1.0 and 0.0 <= seg["dice"] <= 1.0

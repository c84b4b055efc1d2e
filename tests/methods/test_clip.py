import math

import pytest
import torch
import torch.nn.functional as F

from medvlp import config as C
from medvlp.batch import ImageTextBatch
from medvlp.registry import METHODS

REPORTS = [
    "The heart is enlarged. No pleural effusion.",
    "Small left pleural effusion. Heart size is normal.",
    "Right upper lobe consolidation.",
    "No acute cardiopulmonary process.",
]


def build(overrides=()):
    cfg = C.compose(config_file=str(C.config_dir() / "experiment" / "clip_vit_demo.yaml"),
                    overrides=["method.image_encoder.img_size=[32]",
                                              "method.image_encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
                                              *overrides])
    cfg.data.root = "/unused"
    C.resolve(cfg)
    return METHODS.get("clip")(cfg.method, cfg.optim)


def batch_for(method, n=4):
    tok = method.tokenizer(REPORTS[:n], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    torch.manual_seed(1)
    return ImageTextBatch(images=torch.randn(n, 1, 32, 32), input_ids=tok["input_ids"],
                          attention_mask=tok["attention_mask"], study_ids=[str(i) for i in range(n)])


def test_loss_keys_and_initial_value():
    m = build(["method.learnable_temperature=false", "method.temperature=1.0"])
    out = m.losses(batch_for(m))
    assert set(out) == {"itc"}
    # random init, tau = 1: logits are cosines in [-1, 1] -> loss within log(B) +- 1
    assert abs(out["itc"].item() - math.log(4)) < 1.0


def test_gradients_reach_trainable_and_not_frozen():
    m = build(["method.text_encoder.freeze_layers=1"])
    m.losses(batch_for(m))["itc"].backward()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("text_encoder.model.embeddings") or "layer.0." in n for n in frozen)
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_loss_falls_on_a_fixed_batch():
    m = build()
    b = batch_for(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    first = None
    for _ in range(20):
        loss = m.losses(b)["itc"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_embeddings_unit_norm_and_similarity_shape():
    m = build().eval()
    b = batch_for(m)
    img, txt = m.embed_image(b.images), m.embed_text(b.input_ids, b.attention_mask)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert m.similarity(img, txt[:3]).shape == (4, 3)


def test_both_encoders_use_fused_sdpa(monkeypatch):
    m = build()
    b = batch_for(m)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    m.embed_image(b.images)
    n_img = len(calls)
    m.embed_text(b.input_ids, b.attention_mask)
    n_txt = len(calls) - n_img
    assert n_img == len(m.image_encoder.model.blocks)
    assert n_txt == m.text_encoder.model.config.num_hidden_layers


def test_lr_schedule_warmup_then_cosine():
    from medvlp.methods.base import lr_factor

    assert lr_factor(0, 10, 110, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 0, 100, "constant", 0.0) == 1.0
    # warm restarts (G2D's code: T_0 = 200 steps): back to the peak at every period
    assert lr_factor(0, 0, 10_000, "cosine_restarts", 0.0, 200) == pytest.approx(1.0)
    assert lr_factor(100, 0, 10_000, "cosine_restarts", 0.0, 200) == pytest.approx(0.5)
    assert lr_factor(200, 0, 10_000, "cosine_restarts", 0.0, 200) == pytest.approx(1.0)
    assert lr_factor(399, 0, 10_000, "cosine_restarts", 1e-3, 200) == pytest.approx(1e-3, abs=1e-4)


def test_param_groups_no_decay_on_norms_and_text_lr():
    m = build(["optim.text_lr_mult=0.1", "optim.lr=1e-3"])
    groups = m.param_groups()
    text_ids = {id(p) for p in m.text_encoder.parameters()}
    for g in groups:
        is_text = id(g["params"][0]) in text_ids
        assert g["lr"] == pytest.approx(1e-4 if is_text else 1e-3)
        if g["weight_decay"] > 0:
            assert all(p.ndim > 1 for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in m.parameters() if p.requires_grad)


def test_multi_scan_studies_are_embedded_scan_by_scan_and_averaged():
    """A method without cross-scan attention embeds each real scan of a [B, S, C, D, H, W] study and
    averages them (padded scans ignored); the loss runs on such batches."""
    cfg = C.compose(config_file=str(C.config_dir() / "experiment" / "clip_demo_ct.yaml"),
                    overrides=["data.root=/unused", "method.image_encoder.img_size=[8,32,32]",
                               "method.image_encoder.patch_size=[4,8,8]", "method.image_encoder.width=24",
                               "method.image_encoder.depth=1", "method.image_encoder.heads=2"])
    C.resolve(cfg)
    m = METHODS.get("clip")(cfg.method, cfg.optim).eval()
    torch.manual_seed(0)
    studies = torch.randn(2, 3, 1, 8, 32, 32)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        emb = m.embed_images(studies, mask)
        per_scan = m.embed_image(studies[0, :2])
    assert torch.allclose(emb[0], F.normalize(per_scan.mean(0), dim=-1), atol=1e-6)
    studies[0, 2] = 100.0  # the padded scan does not matter
    with torch.no_grad():
        assert torch.allclose(m.embed_images(studies, mask), emb, atol=1e-6)
    tok = m.tokenizer(REPORTS[:2], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    batch = ImageTextBatch(images=studies, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           study_ids=["a", "b"], scan_mask=mask)
    assert m.train().losses(batch)["itc"].isfinite()

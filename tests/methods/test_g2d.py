"""G2D: architecture invariants, gradient paths, parity switches, export to smp.Unet, configs."""

from __future__ import annotations

import math

import pytest
import torch

from medvlp import config as C
from medvlp.batch import ImageTextBatch
from medvlp.methods.g2d import G2D, AttentionPool2d, G2DConfig

EXPERIMENTS = C.config_dir() / "experiment"


def tiny_g2d(**overrides) -> G2D:
    cfg = G2DConfig(
        image_encoder=C.TimmEncoderConfig(model="test_resnet", pretrained=False, in_chans=1, img_size=[64]),
        text_encoder=C.TextEncoderConfig(name="hf", model="tiny", pretrained=False, freeze_layers=0, pool="cls"),
        encoder_depth=4, decoder_channels=[32, 16, 16, 8],
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return G2D(cfg)


def batch_for(method: G2D, n: int = 6, size: int = 64) -> ImageTextBatch:
    torch.manual_seed(1)
    images = torch.rand(n, 1, size, size) * 0.2
    images[:, :, 6:58, 8:56] += 0.6  # a body on a dark background
    texts = [f"study {i} with {'left' if i % 2 else 'right'} effusion" for i in range(n)]
    tok = method.tokenizer(texts, padding=True, return_tensors="pt")
    return ImageTextBatch(images=images, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                          study_ids=[str(i) for i in range(n)], texts=texts)


def test_shapes_and_pool_attention():
    m = tiny_g2d()
    b = batch_for(m)
    stages = m.image_encoder.pyramid(b.images, 4)
    assert [s.shape[-1] for s in stages] == [32, 16, 8, 4]
    pooled, attn = m.pool(m.img_proj(stages[-1]))
    assert pooled.shape == (6, 128) and attn.shape == (6, 4, 17)
    assert torch.allclose(attn.sum(-1), torch.ones(6, 4), atol=1e-5)  # over [mean; 16 tokens]
    assert torch.all(attn[..., 1:].sum(-1) < 1)
    img = m.embed_image(b.images)
    txt = m.embed_text(b.input_ids, b.attention_mask)
    assert img.shape == txt.shape == (6, 128)
    assert torch.allclose(img.norm(dim=-1), torch.ones(6)) and torch.allclose(txt.norm(dim=-1), torch.ones(6))
    out = m.dense_outputs(b.images)
    assert out["prediction"].shape == out["target"].shape == (6, 1, 64, 64)


def test_vla_at_init_and_the_parity_switches():
    m = tiny_g2d(pa_start_step=10**6)  # VLA only
    m.train()
    b = batch_for(m, n=8)
    torch.manual_seed(2)
    both = m.losses(b)
    assert set(both) == {"vla"}
    # random-like embeddings: one direction ~ log B + 1 / (2 d sigma^2)
    assert 0.5 * math.log(8) < both["vla"].item() < 2.5 * (math.log(8) + 0.8)
    img = m.embed_image(b.images)
    txt = m.embed_text(b.input_ids, b.attention_mask)
    s = img @ txt.T / 0.07
    target = torch.arange(8)
    i2t = torch.nn.functional.cross_entropy(s, target)
    t2i = torch.nn.functional.cross_entropy(s.T, target)
    m.eval()  # BatchNorm on running stats: three calls see the same embeddings
    with torch.no_grad():
        img, txt = m.embed_image(b.images), m.embed_text(b.input_ids, b.attention_mask)
        s = img @ txt.T / 0.07
        i2t, t2i = torch.nn.functional.cross_entropy(s, target), torch.nn.functional.cross_entropy(s.T, target)
        for directions, reduction, expect in (("both", "mean", (i2t + t2i) / 2), ("both", "sum", i2t + t2i), ("i2t", "mean", i2t)):
            m.cfg.vla_directions, m.cfg.vla_reduction = directions, reduction
            assert m.losses(b)["vla"].item() == pytest.approx(expect.item(), rel=1e-5)


def test_pa_warmup_switches_on_at_the_configured_step(monkeypatch):
    m = tiny_g2d(pa_start_step=200)
    m.train()
    b = batch_for(m)
    monkeypatch.setattr(G2D, "global_step", property(lambda self: 199))
    assert set(m.losses(b)) == {"vla"}
    monkeypatch.setattr(G2D, "global_step", property(lambda self: 200))
    assert set(m.losses(b)) == {"vla", "pa"}


def test_gradient_paths():
    m = tiny_g2d()
    m.train()
    b = batch_for(m)
    terms = m.losses(b)
    terms["pa"].backward(retain_graph=True)
    grads = {n: p.grad for n, p in m.named_parameters()}
    # PA reaches the decoder, the head and (through the skips and the bottleneck) the encoder ...
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("segmentation_head"))
    assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("decoder"))
    assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("image_encoder"))
    # ... but never the attention pool, the projectors or the text side: the pseudo mask is a constant target
    for n, g in grads.items():
        if n.startswith(("pool.", "img_proj.", "txt_proj.", "text_encoder.")):
            assert g is None or g.abs().sum() == 0, n
    m.zero_grad()
    terms["vla"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.segmentation_head.parameters())
    assert m.pool.positions.grad is not None and m.pool.positions.grad.abs().sum() > 0


def test_target_does_not_depend_on_the_decoder():
    m = tiny_g2d()
    m.eval()
    b = batch_for(m)
    before = m.dense_outputs(b.images)
    with torch.no_grad():
        for p in m.decoder.parameters():
            p.add_(torch.randn_like(p))
    after = m.dense_outputs(b.images)
    assert torch.equal(before["target"], after["target"])
    assert not torch.allclose(before["prediction"], after["prediction"])


def test_positions_interpolate_to_other_grids():
    pool = AttentionPool2d(16, 4, (4, 4))
    assert torch.equal(pool.position_table((4, 4)), pool.positions)
    table = pool.position_table((6, 6))
    assert table.shape == (37, 16) and torch.equal(table[0], pool.positions[0])
    m = tiny_g2d()
    m.eval()
    assert m.embed_image(torch.rand(2, 1, 96, 96)).shape == (2, 128)  # 6 x 6 grid from a 4 x 4 table
    with pytest.raises(ValueError, match="divisible by 16"):
        m.embed_image(torch.rand(2, 1, 72, 72))


def test_per_head_masks_give_a_head_per_decoder_output():
    m = tiny_g2d()
    m.cfg.pseudo_mask.aggregate = "none"
    m = G2D(m.cfg)
    m.train()
    assert m.segmentation_head[0].out_channels == 4
    assert "pa" in m.losses(batch_for(m))


@pytest.mark.parametrize("key,value,match", [
    ("pool_heads", 3, "must divide method.embed_dim"),
    ("vla_directions", "t2i", "vla_directions"),
    ("pa_form", "gloria", "pa_form"),
    ("encoder_depth", 6, "encoder_depth"),
    ("loss_weights", {"vla": 1.0, "itc": 1.0}, "method.loss_weights.itc: G2D has no loss term"),
])
def test_bad_config_names_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_g2d(**{key: value})


def test_vit_encoder_is_refused_with_a_clear_message():
    cfg = G2DConfig(image_encoder=C.TimmEncoderConfig(model="test_vit", pretrained=False, in_chans=1,
                                                       img_size=[64]),
                    text_encoder=C.TextEncoderConfig(name="hf", model="tiny", pretrained=False, freeze_layers=0))
    with pytest.raises(ValueError, match="no multi-scale feature stages"):
        G2D(cfg)


def test_export_loads_into_smp_unet_and_predicts_the_same():
    import segmentation_models_pytorch as smp

    m = tiny_g2d()
    m.eval()
    exp = m.export_unet()
    assert exp["encoder_name"] == "tu-test_resnet"
    unet = smp.Unet(exp["encoder_name"], encoder_depth=exp["encoder_depth"], encoder_weights=None,
                    decoder_channels=exp["decoder_channels"], in_channels=exp["in_channels"], classes=exp["classes"])
    unet.load_state_dict(exp["state_dict"], strict=True)
    unet.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = m.decode(x, m.image_encoder.pyramid(x, 4))
        assert torch.allclose(unet(x), ours, atol=1e-5)


def test_resnet50_export_uses_smp_native_key_names():
    import segmentation_models_pytorch as smp

    cfg = G2DConfig(image_encoder=C.TimmEncoderConfig(model="resnet50", pretrained=False, in_chans=3,
                                                       img_size=[224]),
                    text_encoder=C.TextEncoderConfig(name="hf", model="tiny", pretrained=False, freeze_layers=0))
    m = G2D(cfg)
    assert m.pool.grid == (7, 7)  # 224 / 32: the paper's pooling grid
    exp = m.export_unet()
    assert exp["encoder_name"] == "resnet50"
    unet = smp.Unet("resnet50", encoder_weights=None, classes=1)
    missing, unexpected = unet.load_state_dict(exp["state_dict"], strict=True), None
    assert not missing.missing_keys and not missing.unexpected_keys and unexpected is None


def test_text_encoder_freezing_of_the_paper_config():
    cfg = C.compose(config_file=str(EXPERIMENTS / "g2d_mimic.yaml"),
                    overrides=["method.text_encoder.model=tiny", "method.text_encoder.pretrained=false",
                               "method.text_encoder.freeze_layers=1", "method.image_encoder.pretrained=false",
                               "data.root=/nonexistent"])
    m = G2D(cfg.method)
    frozen = [n for n, p in m.text_encoder.named_parameters() if not p.requires_grad]
    assert frozen and all("layer.0." in n for n in frozen)  # layer 0 only: layer 1 and the embeddings train
    assert all(p.requires_grad for p in m.text_encoder.model.embeddings.parameters())


def test_paper_and_code_experiment_configs():
    paper = C.compose(config_file=str(EXPERIMENTS / "g2d_mimic.yaml"), overrides=["data.root=/x"])
    m, o, t, d = paper.method, paper.optim, paper.trainer, paper.data
    assert m.name == "g2d" and m.image_encoder.model.startswith("resnet50") and m.image_encoder.pretrained
    assert m.image_encoder.img_size == [224] and d.image_size == 224 and d.channels == 3
    assert m.text_encoder.model == "emilyalsentzer/Bio_ClinicalBERT" and m.text_encoder.freeze_layers == 9
    assert m.embed_dim == 128 and m.pool_heads == 4 and m.temperature == 0.07 and m.encoder_depth == 5
    assert list(m.decoder_channels) == [256, 128, 64, 32, 16]
    assert m.vla_directions == "both" and m.pa_form == "paper" and m.pa_start_step == 0
    pmc = m.pseudo_mask
    assert (pmc.aggregate, pmc.upsample, pmc.body_mask, pmc.threshold, pmc.quantile, pmc.inclusive, pmc.over, pmc.smooth) == \
        ("mean", "bilinear", True, "quantile", 0.85, True, "body", "bilateral")
    assert o.lr == 2e-4 and o.weight_decay == 1e-8 and o.schedule == "cosine" and o.warmup_ratio > 0
    assert t.max_epochs == 50 and d.batch_size == 128 and t.devices == "16"
    code = C.compose(config_file=str(EXPERIMENTS / "g2d_code_mimic.yaml"), overrides=["data.root=/x"])
    m, o, t, d = code.method, code.optim, code.trainer, code.data
    assert m.image_encoder.img_size == [256] and d.image_size == 256
    assert m.vla_reduction == "sum" and m.pa_form == "code" and m.pa_start_step == 200 and m.text_bn_all_tokens
    assert m.text_encoder.freeze_layers == 9 and d.max_length == 256
    pmc = m.pseudo_mask
    assert (pmc.upsample, pmc.body_mask, pmc.inclusive, pmc.over, pmc.smooth) == ("nearest", False, False, "all", "none")
    assert o.lr == 2e-5 and o.weight_decay == 1e-8 and t.max_epochs == 52 and d.batch_size == 64 and t.devices == "8"
    assert t.precision == "16-mixed"


# --------------------------------------------------------------------------- fit
def test_cli_fit_on_tiny_demo_then_reload_and_export(tmp_path):
    """`medvlp fit --method g2d` end to end (tiny demo, 3 steps), then the run reloads and its export
    loads into smp.Unet."""
    import segmentation_models_pytorch as smp

    from medvlp import api
    from medvlp.cli import main

    assert main(["fit", "--method", "g2d", "data.demo_size=tiny", "data.batch_size=4", "trainer.max_steps=3",
                 "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
                 f"run.out_dir={tmp_path}", "run.name=smoke"]) == 0
    run = tmp_path / "smoke"
    method, cfg = api.load_run(run)
    assert cfg.method.name == "g2d" and isinstance(method, G2D)
    exp = torch.load(run / "export" / "unet.pt", weights_only=True)
    unet = smp.Unet(exp["encoder_name"], encoder_depth=exp["encoder_depth"], encoder_weights=None,
                    decoder_channels=exp["decoder_channels"], in_channels=exp["in_channels"], classes=exp["classes"])
    unet.load_state_dict(exp["state_dict"])
    enc = torch.load(run / "export" / "encoder.pt", weights_only=True)
    method.image_encoder.model.load_state_dict(enc["state_dict"])


@pytest.mark.gpu
def test_paper_step_on_cuda_in_bf16():
    """One optimiser step of the paper configuration on one GPU in bf16: its per-GPU batch of 128,
    ResNet-50 U-Net at 224 px and a BERT-base-sized 12-layer text encoder with 9 layers frozen
    (offline: `tiny` tokenizer, random weights); the pseudo masks are built on the GPU."""
    import time

    cfg = C.compose(config_file=str(EXPERIMENTS / "g2d_mimic.yaml"), overrides=[
        "data.root=/unused", "method.image_encoder.pretrained=false", "method.text_encoder.model=tiny",
        "method.text_encoder.pretrained=false",
        "method.text_encoder.config_overrides={hidden_size: 768, num_attention_heads: 12, intermediate_size: 3072, "
        "num_hidden_layers: 12}"])
    C.resolve(cfg)
    m = G2D(cfg.method, cfg.optim).cuda().train()
    n = 128
    texts = ["small left pleural effusion. the heart is enlarged."] * (n // 2) + ["no acute cardiopulmonary process."] * (n // 2)
    tok = m.tokenizer(texts, padding="max_length", truncation=True, max_length=int(cfg.data.max_length), return_tensors="pt")
    images = torch.randn(n, 3, 224, 224, device="cuda")
    batch = ImageTextBatch(images=images, input_ids=tok["input_ids"].cuda(), attention_mask=tok["attention_mask"].cuda(),
                           study_ids=[str(i) for i in range(n)])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    torch.cuda.reset_peak_memory_stats()
    for step in range(3):
        torch.cuda.synchronize()
        t = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.losses(batch)
        loss = sum(out.values())
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        print(f"step {step}: {time.time() - t:.3f} s, loss {loss.item():.3f}")
    assert set(out) == {"vla", "pa"} and torch.isfinite(loss)
    m.eval()
    dense = m.dense_outputs(images[:4])
    assert dense["target"].is_cuda and dense["target"].shape == (4, 1, 224, 224)
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


@pytest.mark.gpu
def test_demo_fit_on_cuda_in_bf16(tmp_path):
    from medvlp import api

    cfg = C.compose(method="g2d", overrides=["data.demo_size=tiny", "data.batch_size=8", "trainer.max_steps=4",
                                             "trainer.accelerator=gpu", "trainer.devices=1",
                                             "trainer.precision=bf16-mixed", "trainer.enable_progress_bar=false",
                                             "trainer.limit_val_batches=1", f"run.out_dir={tmp_path}"])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    run = api.fit(cfg)
    import pandas as pd

    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["train/loss_pa_step"].dropna().map(math.isfinite).all()

"""HLIP: the hierarchical ViT's invariants (spec §9), the loss, the optimiser groups and the configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medvlp.config import HierarchicalViTConfig
from medvlp.encoders.hlip_vit import HierarchicalViT, inflate_patch_kernel, sincos_1d
from medvlp.losses import clip_loss, siglip_loss

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = {"name": "hlip_vit", "in_chans": 1, "img_size": [16, 32, 32], "patch_size": [4, 8, 8], "width": 48, "depth": 6,
        "heads": 3, "levels": ["slice", "scan", "study", "slice", "scan", "study"], "max_scans": 40,
        "sequence_pos_embed": True, "pos_embed": "sincos", "pretrained": False}


def encoder(**kw) -> HierarchicalViT:
    torch.manual_seed(0)
    cfg = HierarchicalViTConfig(**{**TINY, **kw})
    if "levels" not in kw and "depth" in kw:
        cfg.levels = (["slice", "scan", "study"] * kw["depth"])[: kw["depth"]]
    return HierarchicalViT(cfg).eval()


def studies(b: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 1, 16, 32, 32, generator=g)


def test_level_list_is_validated_against_the_depth() -> None:
    with pytest.raises(ValueError, match="levels has 3 entries for depth=6"):
        encoder(levels=["slice", "scan", "study"])
    with pytest.raises(ValueError, match=r"\['volume'\] are not levels"):
        encoder(levels=["slice", "scan", "study", "slice", "scan", "volume"])


def test_token_counts_and_shapes() -> None:
    enc = encoder()
    out = enc(studies(2, 3))
    assert out.pooled.shape == (2, 48) and out.tokens.shape == (2, 3 * 64, 48) and out.grid == (4, 4, 4)
    assert enc(studies(2, 1)[:, 0]).pooled.shape == (2, 48)  # [B, C, D, H, W]: one scan per study


def test_a_study_alone_equals_the_same_study_in_a_padded_batch() -> None:
    """Padded scans take no part in any attention or mean (fp32, < 1e-5)."""
    enc = encoder()
    a, b = studies(1, 2, seed=1), studies(1, 4, seed=2)
    alone = enc(a).pooled
    batch = torch.cat([torch.cat([a, torch.randn(1, 2, 1, 16, 32, 32) * 5], dim=1), b])  # padding is garbage on purpose
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    padded = enc(batch, scan_mask=mask).pooled
    assert (padded[0] - alone[0]).abs().max() < 1e-5
    assert (padded[1] - enc(b).pooled[0]).abs().max() < 1e-5
    mean = encoder(global_pool="mean")
    assert (mean(batch, scan_mask=mask).pooled[0] - mean(a).pooled[0]).abs().max() < 1e-5
    few = encoder(max_scans=3)  # evaluation beyond the table: each study's rows fit its own scan count
    wide = torch.cat([torch.cat([a, torch.zeros(1, 3, 1, 16, 32, 32)], dim=1), studies(1, 5, seed=3)])
    wide_mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    assert (few(wide, scan_mask=wide_mask).pooled[0] - few(a).pooled[0]).abs().max() < 1e-5
    rec = encoder(depth=1, levels=["study"])
    attn = rec(batch, scan_mask=mask, return_attention=True).attentions  # [B, heads, L, L]
    assert torch.allclose(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5)
    assert attn[0, :, :, 1 + 2 * 64 :].abs().max() == 0  # no mass on the padded scans' keys
    assert rec(batch, scan_mask=mask, return_tokens=False).tokens is None
    with pytest.raises(ValueError, match="at least one real scan"):
        enc(batch, scan_mask=torch.tensor([[False] * 4, [True] * 4]))


def test_slice_blocks_ignore_other_slabs_and_scan_blocks_ignore_other_scans() -> None:
    x = studies(1, 2)
    slab = encoder(depth=2, levels=["slice", "slice"], sequence_pos_embed=False)
    y = x.clone()
    y[:, :, :, 4:8] += 3.0  # slab 1 (slices 4-7) of both scans
    t0, t1 = slab(x).tokens.reshape(2, 4, 16, 48), slab(y).tokens.reshape(2, 4, 16, 48)
    assert torch.equal(t0[:, 0], t1[:, 0]) and torch.equal(t0[:, 2:], t1[:, 2:]) and not torch.allclose(t0[:, 1], t1[:, 1])
    scan = encoder(depth=2, levels=["scan", "scan"], sequence_pos_embed=False)
    y = x.clone()
    y[:, 1] += 3.0
    t0, t1 = scan(x).tokens.reshape(2, 64, 48), scan(y).tokens.reshape(2, 64, 48)
    assert torch.equal(t0[0], t1[0]) and not torch.allclose(t0[1], t1[1])
    study = encoder(depth=2, levels=["scan", "study"], sequence_pos_embed=False)
    assert not torch.allclose(study(x).tokens[:, :64], study(y).tokens[:, :64])  # a study block mixes the scans


def test_windowed_blocks_equal_masked_global_attention() -> None:
    """A slice block over window batches = the same block on the whole sequence with a block-diagonal
    mask where each window carries its own [CLS] copy (§9)."""
    enc = encoder(depth=1, levels=["slice"], sequence_pos_embed=False)
    x = studies(1, 2)
    patches, grid = enc.patch_embed(x.flatten(0, 1))
    patches = (patches.reshape(1, 2, *grid, 48) + enc.spatial_positions(grid)).reshape(8, 16, 48)  # 8 windows
    cls = enc.cls_token.expand(8, 1, 48)
    windows = torch.cat([cls, patches], dim=1)  # [8, 17, 48]
    full = windows.reshape(1, 8 * 17, 48)
    owner = torch.arange(8).repeat_interleave(17)
    mask = (owner[:, None] == owner[None, :])[None, None]
    ref = enc.blocks[0](full, attn_mask=mask).reshape(8, 17, 48)
    expect_cls = enc.norm(ref[:, 0].mean(0))
    out = enc(x)
    assert (out.pooled[0] - expect_cls).abs().max() < 1e-5
    assert (out.tokens[0] - enc.norm(ref[:, 1:].reshape(-1, 48))).abs().max() < 1e-5


def test_one_study_block_over_one_window_is_a_plain_vit_block() -> None:
    enc = encoder(depth=1, levels=["study"], sequence_pos_embed=False)
    x = studies(2, 1)
    patches, grid = enc.patch_embed(x.flatten(0, 1))
    seq = torch.cat([enc.cls_token.expand(2, 1, 48), patches + enc.spatial_positions(grid).reshape(1, -1, 48)], dim=1)
    ref = enc.norm(enc.blocks[0](seq))
    out = enc(x)
    assert (out.pooled - ref[:, 0]).abs().max() < 1e-6 and (out.tokens - ref[:, 1:]).abs().max() < 1e-6


def test_with_one_scan_scan_and_study_blocks_agree_and_regrouping_round_trips() -> None:
    a = encoder(depth=4, levels=["scan"] * 4)
    b = encoder(depth=4, levels=["study"] * 4)
    b.load_state_dict(a.state_dict())
    x = studies(2, 1)
    assert (a(x).pooled - b(x).pooled).abs().max() < 1e-6
    enc = encoder()
    b, n, s_, c = 2, 3, 4, 48
    shapes = {"slice": (b, n, s_, c), "scan": (b, n, c), "study": (b, c)}
    for fine, coarse in (("slice", "scan"), ("slice", "study"), ("scan", "study")):
        x = torch.randn(shapes[coarse])
        copies = enc._regroup(x, coarse, fine, n, s_, None)  # split: every window gets a copy
        assert copies.shape == shapes[fine] and torch.allclose(enc._regroup(copies, fine, coarse, n, s_, None), x, atol=1e-6)
        y = torch.randn(shapes[fine])
        merged = enc._regroup(y, fine, coarse, n, s_, None)  # merge: the mean of the window copies
        assert torch.allclose(merged, y.reshape(b, -1, c).mean(1) if coarse == "study" else y.mean(2), atol=1e-6)
    w = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])  # padded scan 3 of study 0 has no weight
    y = torch.randn(b, n, c)
    assert torch.allclose(enc._regroup(y, "scan", "study", n, s_, w)[0], y[0, :2].mean(0), atol=1e-6)


def test_positions_are_fixed_and_sequence_rows_random_in_training() -> None:
    enc = encoder()
    assert not enc.spatial_pos.requires_grad and not enc.sequence_pos.requires_grad
    assert torch.allclose(enc.sequence_pos, sincos_1d(torch.arange(40), 48))
    assert torch.equal(enc.sequence_positions(3), enc.sequence_pos[:3])
    assert enc.sequence_positions(50).shape == (50, 48)  # eval: interpolated beyond max_scans
    enc.train()
    rows = enc.sequence_positions(10)
    idx = [int((enc.sequence_pos - r).abs().sum(1).argmin()) for r in rows]
    assert len(set(idx)) == 10
    with pytest.raises(ValueError, match="max_scans"):
        enc.sequence_positions(41)
    before = (enc.spatial_pos.clone(), enc.sequence_pos.clone())
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    enc(studies(2, 2)).pooled.sum().backward()
    opt.step()
    assert torch.equal(before[0], enc.spatial_pos) and torch.equal(before[1], enc.sequence_pos)
    assert encoder(pos_embed="learned").spatial_pos.requires_grad


def test_scan_order_matters_only_through_the_sequence_embedding() -> None:
    x = studies(1, 3)
    perm = x[:, [2, 0, 1]]
    plain = encoder(sequence_pos_embed=False)
    assert (plain(x).pooled - plain(perm).pooled).abs().max() < 1e-5
    seq = encoder()
    assert (seq(x).pooled - seq(perm).pooled).abs().max() > 1e-4


def test_patch_dropout_keeps_the_same_token_count_in_every_window() -> None:
    enc = encoder(patch_dropout=0.25)
    enc.train()
    out = enc(studies(2, 3))
    assert out.tokens.shape == (2, 3 * 4 * 12, 48)  # 16 tokens per slab -> 12 kept
    scan_only = encoder(depth=2, levels=["scan", "study"], patch_dropout=0.5).train()
    assert scan_only(studies(1, 2)).tokens.shape == (1, 2 * 32, 48)
    enc.eval()
    assert enc(studies(2, 3)).tokens.shape == (2, 3 * 64, 48)


def test_average_inflation_reproduces_the_2d_patch_response() -> None:
    """A volume constant along z whose slices are the 2D image I gives the 2D conv of I replicated to RGB."""
    import timm

    torch.manual_seed(0)
    vit2d = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    enc = HierarchicalViT(HierarchicalViTConfig(**{**TINY, "width": 192, "depth": 2, "heads": 3, "levels": ["scan", "study"],
                                                "patch_size": [4, 16, 16], "img_size": [8, 32, 32]}))
    enc.inflate_from_2d.__func__  # noqa: B018 - the method exists
    w3d = inflate_patch_kernel(vit2d.patch_embed.proj.weight.detach(), (4, 16, 16), 1)
    image = torch.randn(1, 1, 32, 32)
    vol = image[:, :, None].expand(1, 1, 8, 32, 32)
    out3d = F.conv3d(vol, w3d, vit2d.patch_embed.proj.bias, stride=(4, 16, 16))
    out2d = F.conv2d(image.expand(1, 3, 32, 32), vit2d.patch_embed.proj.weight, vit2d.patch_embed.proj.bias, stride=16)
    assert torch.allclose(out3d[:, :, 0], out2d, atol=1e-5) and torch.allclose(out3d[:, :, 1], out2d, atol=1e-5)
    resized = inflate_patch_kernel(vit2d.patch_embed.proj.weight.detach(), (8, 24, 24), 1)
    assert resized.shape == (192, 1, 8, 24, 24)  # bicubic 16 -> 24, no magnitude rescaling (H6)
    direct = F.interpolate(vit2d.patch_embed.proj.weight.detach(), size=(24, 24), mode="bicubic", align_corners=False)
    assert torch.allclose(resized[:, 0, 3], direct.sum(1) / 8)


def test_inflating_a_timm_vit_copies_blocks_cls_and_2d_positions(monkeypatch) -> None:
    import timm

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: src)
    enc = HierarchicalViT(HierarchicalViTConfig(**{**TINY, "width": 192, "depth": 12, "heads": 3, "levels": ["scan", "study"] * 6,
                                                "patch_size": [4, 16, 16], "img_size": [8, 224, 224],
                                                "inflate_from": "vit_tiny_patch16_224"}))
    assert torch.equal(enc.blocks[5].mlp.fc1.weight, src.blocks[5].mlp.fc1.weight)
    assert torch.allclose(enc.cls_token, src.cls_token + src.pos_embed[:, :1])
    table = src.pos_embed[0, 1:].T.reshape(192, 14, 14)
    depth = sincos_1d(torch.arange(2), 192)
    assert torch.allclose(enc.spatial_pos[0, :, 1], table + depth[1][:, None, None], atol=1e-6)
    with pytest.raises(ValueError, match="Cannot inflate"):
        HierarchicalViT(HierarchicalViTConfig(**{**TINY, "inflate_from": "vit_tiny_patch16_224"}))


# ---------------------------------------------------------------------------------------------- method + loss


def make_method(**kw):
    from medvlp.methods.hlip import HLIP

    torch.manual_seed(0)
    return HLIP({"image_encoder": TINY, "text_encoder": {"name": "hf", "model": "tiny", "pool": "cls"}, "embed_dim": 32, **kw},
                {"lr": 1e-3, "weight_decay": 0.2, "betas": [0.9, 0.98], "eps": 1e-6})


def test_clip_loss_at_init_and_logit_scale_clamp() -> None:
    torch.manual_seed(0)
    u, w = F.normalize(torch.randn(64, 512), dim=-1), F.normalize(torch.randn(64, 512), dim=-1)
    loss, i2t, t2i = clip_loss(u, w, 1 / 0.07)
    assert abs(float(loss) - (math.log(64) + 1 / (2 * 512 * 0.07**2))) < 0.15  # spec §9: ~4.34
    assert torch.allclose(clip_loss(w, u, 1 / 0.07)[0], loss)  # symmetric in the modalities
    m = make_method()
    assert abs(float(m.logit_scale.detach()) - math.log(1 / 0.07)) < 1e-6
    with torch.no_grad():
        m.logit_scale.fill_(7.0)
    m.clamp_logit_scale()
    assert abs(float(m.logit_scale.detach()) - math.log(100)) < 1e-6
    with torch.no_grad():
        m.logit_scale.fill_(-1.0)
    m.clamp_logit_scale()
    assert float(m.logit_scale.detach()) == 0.0


def test_siglip_loss_by_hand() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    s, b = 10.0, -10.0
    logits = s * u @ w.T + b
    z = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    expect = -torch.log(torch.sigmoid(z * logits)).sum() / 2
    assert torch.allclose(siglip_loss(u, w, s, b), expect)
    m = make_method(loss="siglip")
    assert abs(float(m.logit_scale.detach().exp()) - 10.0) < 1e-5 and float(m.logit_bias.detach()) == -10.0


def test_step_embeddings_groups_and_text_lock() -> None:
    from medvlp.batch import ImageTextBatch

    m = make_method()
    tok = m.tokenizer(["The volume shows: Emphysema.", "The volume shows: Not emphysema."] * 2, padding="max_length",
                      max_length=16, truncation=True, return_tensors="pt")
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    batch = ImageTextBatch(images=studies(4, 2), input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           study_ids=list("abcd"), texts=[""] * 4, scan_mask=mask)
    terms = m.losses(batch)
    assert set(terms) == {"itc"} and terms["itc"].isfinite()
    terms["itc"].backward()
    m.eval()  # fixed sequence positions
    emb = m.embed_images(batch.images, batch.scan_mask)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4)) and emb.shape == (4, 32)
    assert torch.allclose(m.embed_images(batch.images[1:2, :1]), emb[1], atol=1e-5)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = m.param_groups()
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    flat = {names[id(p)] for g in groups for p in g["params"]}
    assert "image_encoder.cls_token" in decay and "img_proj.weight" in decay and "image_encoder.patch_embed.proj.weight" in decay
    assert "logit_scale" in flat - decay and not any(n.endswith("bias") or "norm" in n.lower() for n in decay)
    assert not any("spatial_pos" in n or "sequence_pos" in n for n in flat)
    locked = make_method(lock_text=True)
    trainable = [n for n, p in locked.text_encoder.named_parameters() if p.requires_grad]
    assert trainable and all("LayerNorm" in n for n in trainable)
    assert locked.txt_proj.weight.requires_grad
    with pytest.raises(ValueError, match="method.image_encoder.levels: .*image encoder 'vit3d'"):
        make_method(image_encoder={**TINY, "name": "vit3d"})  # HLIP's keys are not those of the plain 3D ViT
    with pytest.raises(ValueError, match="must be hlip_vit for HLIP"):
        make_method(image_encoder={"name": "vit3d", "in_chans": 1, "img_size": [16, 32, 32], "patch_size": [4, 8, 8]})


# ---------------------------------------------------------------------------------------------- configs + CLI


def resolved(name: str, *overrides: str):
    from medvlp import config as C

    cfg = C.compose(config_file=str(CONFIGS / "experiment" / name), overrides=["data.root=/unused", *overrides])
    C.resolve(cfg)
    return cfg


def test_ctrate_parity_config_matches_the_spec() -> None:
    cfg = resolved("hlip_ctrate.yaml")
    m, e, d, o, t = cfg.method, cfg.method.image_encoder, cfg.data, cfg.optim, cfg.trainer
    assert (m.name, m.embed_dim, m.loss, m.temperature, m.max_logit_scale, m.lock_text) == ("hlip", 512, "clip", 0.07, 100.0, True)
    assert (e.width, e.depth, e.heads, e.mlp_ratio, e.drop_path) == (768, 12, 12, 4.0, 0.2)
    assert list(e.img_size) == [112, 336, 336] and list(e.patch_size) == [8, 24, 24]
    assert [i for i, v in enumerate(e.levels) if v == "scan"] == [2, 5, 8, 11]
    assert [i for i, v in enumerate(e.levels) if v == "slice"] == [0, 1, 3, 4, 6, 7, 9, 10]
    assert (e.pos_embed, e.sequence_pos_embed, e.global_pool, e.patch_dropout) == ("sincos", False, "cls", 0.0)
    assert e.inflate_from == "vit_base_patch16_224.mae" and e.grad_checkpointing
    assert (cfg.method.text_encoder.model, cfg.method.text_encoder.pool) == ("microsoft/BiomedVLP-CXR-BERT-specialized", "cls")
    assert list(d.spacing) == [3.0, 1.0, 1.0] and list(d.size) == [112, 336, 336] and list(d.window) == [-1150.0, 350.0]
    assert (d.mean, d.std, d.orientation, d.flip_prob, d.max_length, d.text) == (0.449, 0.226, "", 0.0, 512, "impressions+findings")
    assert (d.reconstructions, d.eval_reconstructions) == ("one", "all")  # one drawn per step; all scored
    assert len(d.eval_labels) == 16 and "Medical material" not in d.eval_labels and "Lymphadenopathy" not in d.eval_labels
    assert d.batch_size * int(t.devices) == 512  # 4 GPUs x 32 x accum-batch 4 (one concatenated forward)
    assert (o.lr, o.weight_decay, list(o.betas), o.eps, o.warmup_steps, o.schedule) == (8e-5, 0.2, [0.9, 0.98], 1e-6, 47, "cosine")
    assert (t.max_epochs, t.precision, t.gradient_clip_val) == (20, "bf16-mixed", 0.0)
    tokens = math.prod(s // p for s, p in zip(e.img_size, e.patch_size, strict=True))
    assert tokens == 2744


def test_brainmri_parity_config_matches_the_spec() -> None:
    cfg = resolved("hlip_brainmri.yaml")
    e, d = cfg.method.image_encoder, cfg.data
    assert list(e.img_size) == [48, 224, 224] and list(e.patch_size) == [8, 16, 16]
    assert math.prod(s // p for s, p in zip(e.img_size, e.patch_size, strict=True)) == 1176
    assert [i for i, v in enumerate(e.levels) if v == "study"] == [2, 5, 8, 11] and "slice" not in e.levels
    assert (e.max_scans, e.sequence_pos_embed, e.patch_dropout, e.drop_path) == (40, True, 0.25, 0.2)
    assert (d.num_scans, d.scan_sampling, d.num_slices, d.eval_num_slices, d.resize, d.image_size) == (10, "repeat", 48, 144, 256, 224)
    assert (d.max_length, d.eval_batch_size, d.text_prefix) == (256, 1, "This MRI study shows: ")
    assert cfg.method.text_encoder.model == "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"


def test_headct_config_is_the_brain_architecture_on_head_ct() -> None:
    """The released head-CT model is vit_base_multiscan_h2_token1176 (scan + study blocks), as the brain one;
    the uint8 series' window is recorded (3.4), the prompt prefix is the CT one."""
    head, brain = resolved("hlip_headct.yaml"), resolved("hlip_brainmri.yaml")
    assert head.data.name == "head_ct" and head.method.image_encoder == brain.method.image_encoder
    assert (head.optim, head.trainer.max_epochs) == (brain.optim, brain.trainer.max_epochs)
    d = head.data
    assert (d.window, d.scale, d.text_prefix) == ("brain [0, 80] HU", 255.0, "This CT study shows: ")
    assert (d.num_scans, d.scan_sampling, d.num_slices, d.resize, d.image_size, d.eval_batch_size) == (10, "repeat", 48, 256, 224, 1)


def test_hlip_prompt_files_follow_the_spec() -> None:
    from medvlp.downstream.zero_shot import load_merges, load_prompts, merge_scores

    ct = load_prompts(CONFIGS / "prompts" / "hlip_ct_rate.yaml")
    assert len(ct) == 16
    assert ct["Atelectasis"] == {"positive": ["The volume shows: Atelectasis."], "negative": ["The volume shows: Not atelectatic."]}
    assert ct["Lung nodule"]["negative"] == ["The volume shows: Not lung nodule."]
    assert ct["Hiatal hernia"]["negative"] == ["The volume shows: Not hiatal hernia."]
    rad = load_prompts(CONFIGS / "prompts" / "hlip_rad_chestct.yaml")
    assert len(rad) == 15 and "Mosaic attenuation pattern" not in rad
    merges = load_merges(CONFIGS / "prompts" / "hlip_rad_chestct.yaml")
    assert merges == {"Calcification": ["Coronary artery wall calcification", "Arterial wall calcification"]}
    import numpy as np

    merged = merge_scores([np.array([0.3, -0.2, -0.5, 0.1]), np.array([-0.4, -0.1, 0.2, 0.6])])
    assert merged.tolist() == [0.3, -0.2, 0.2, 0.6]  # max if either is positive, else min


def test_zero_shot_merges_two_labels_into_one(monkeypatch) -> None:
    """Rad-ChestCT's calcification: two scored classes become one AUROC, 14 classes in the mean."""
    import numpy as np

    from medvlp.downstream import zero_shot as Z
    from medvlp.downstream.embed import Embeddings

    labels = ["A", "B", "C"]
    y = torch.tensor([[1, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
    emb = Embeddings(images=torch.eye(4), texts=torch.eye(4), study_ids=list("wxyz"), labels=y)
    vectors = {"pa": torch.tensor([1.0, 0, 1, 0]), "na": torch.tensor([0, 1.0, 0, 1]), "pb": torch.tensor([0.5, 0, 0.5, 0]),
               "nb": torch.zeros(4), "pc": torch.tensor([0, 1.0, 1, 0]), "nc": torch.zeros(4)}
    monkeypatch.setattr(Z, "embed_prompts", lambda method, texts, max_length: vectors[texts[0]])

    class M:
        @staticmethod
        def similarity(a, b):
            return a @ b.T

        @staticmethod
        def temperature():
            return 0.07

    prompts = {k: {"positive": ["p" + k.lower()], "negative": ["n" + k.lower()]} for k in labels}
    res = Z.zero_shot_auc(M(), emb, labels, labels, prompts, 8, merges={"AB": ["A", "B"]})
    assert set(res["auroc"]) == {"AB", "C"} and res["auroc"]["AB"] == 1.0
    assert np.isclose(res["mean_auroc"], np.mean([res["auroc"]["AB"], res["auroc"]["C"]]))
    assert set(res["thresholded"]) == {"AB", "C"} and res["logit_scale"] == 1 / 0.07  # M.temperature()
    assert res["thresholded"]["AB"]["accuracy"] == 1.0 and 0 <= res["mean_f1_weighted"] <= 1


def test_fit_hlip_on_the_ct_rate_fixture(tmp_path, capsys) -> None:
    """`medvlp fit --method hlip --data ct_rate data.root=<fixture>` end to end (the tiny CT-RATE world in
    the real layout), then zero-shot with HLIP's prompt pairs (the command line's ``main``, in this process)."""
    from medvlp.cli import main
    from medvlp.datamodules.demo import write_ct_demo

    ct_root = write_ct_demo(tmp_path / "ct-rate", size="tiny", seed=0)
    out = tmp_path / "runs"
    cmd = ["fit", "--method", "hlip", "--data", "ct_rate", f"data.root={ct_root}",
           "data.spacing=[10.0,6.0,6.0]", "data.size=[8,32,32]", "data.batch_size=2", "data.max_length=32",
           "data.num_workers=0", "method.image_encoder.img_size=[8,32,32]", "method.image_encoder.patch_size=[4,8,8]",
           f"run.out_dir={out}", "trainer.max_steps=3", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1"]
    assert main(cmd) == 0, capsys.readouterr().err[-3000:]
    (run,) = list(out.iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file() and "name: hlip_vit" in (run / "config.yaml").read_text()
    capsys.readouterr()
    zs = ["zeroshot", "--run", str(run), "--split", "val", "data.prompts=hlip_ct_rate.yaml",
          "data.eval_labels=[Emphysema,Cardiomegaly,Lung nodule]"]
    assert main(zs) == 0, capsys.readouterr().err[-3000:]
    out_text = capsys.readouterr().out
    assert "Cardiomegaly" in out_text and "mean" in out_text


@pytest.mark.gpu
def test_ctrate_recipe_step_on_cuda_in_bf16() -> None:
    """One AdamW step at the CT-RATE recipe's per-GPU forward batch (128 volumes of 112 x 336 x 336, ViT-B
    with gradient checkpointing; text side offline-tiny) under bf16 autocast; prints time and peak memory."""
    import time

    from medvlp.batch import ImageTextBatch
    from medvlp.registry import METHODS

    cfg = resolved("hlip_ctrate.yaml", "method.image_encoder.inflate_from=", "method.text_encoder.model=tiny",
                   "method.text_encoder.architecture=auto", "method.lock_text=false")
    m = METHODS.get("hlip")(cfg.method, cfg.optim).cuda()
    opt = torch.optim.AdamW(m.param_groups(), lr=8e-5, betas=(0.9, 0.98), eps=1e-6)
    b = int(cfg.data.batch_size)
    tok = m.tokenizer(["The volume shows: Emphysema."] * b, padding="max_length", max_length=64, return_tensors="pt")
    batch = ImageTextBatch(images=torch.randn(b, 1, 1, 112, 336, 336, device="cuda"), input_ids=tok["input_ids"].cuda(),
                           attention_mask=tok["attention_mask"].cuda(), study_ids=[str(i) for i in range(b)])
    torch.cuda.reset_peak_memory_stats()
    for step in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m.losses(batch)["itc"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.clamp_logit_scale()
        torch.cuda.synchronize()
        print(f"step {step}: {time.perf_counter() - start:.2f} s, loss {float(loss):.3f}, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert torch.isfinite(loss)


def test_without_data_hlip_trains_on_the_ct_demo() -> None:
    from medvlp import config as C

    cfg = C.compose(method="hlip")
    assert (cfg.data.name, cfg.data.root, cfg.data.text) == ("ct_rate", "demo", "impressions")
    assert C.compose(method="clip").data.name == "mimic_cxr"
    brain = C.compose(method="hlip", data="demo_brain_mri")
    assert brain.data.name == "brain_mri" and brain.method.image_encoder.name == "hlip_vit"

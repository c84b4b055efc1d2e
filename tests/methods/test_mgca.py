"""MGCA as a method: terms, gradients, frozen parts, switch-on epochs, paper configs, a smoke fit."""

import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import medvlp.methods.mgca  # noqa: F401  (registers "mgca" until registry.py declares it)
from medvlp import api
from medvlp import config as C
from medvlp.batch import ImageTextBatch
from medvlp.encoders.text import HFTextEncoder
from medvlp.methods.mgca import MGCA, TextCLSAttention
from medvlp.registry import METHODS

REPORTS = [
    "The heart is enlarged. No pleural effusion.",
    "Small left pleural effusion. Heart size is normal.",
    "Right upper lobe consolidation with a small pneumothorax.",
    "No acute cardiopulmonary process.",
]
TINY = ["method.image_encoder.img_size=[32]", "method.image_encoder.kwargs={patch_size: 8}", "method.proj_hidden_dim=32",
        "method.num_prototypes=16"]
# zero_init_last=false: timm zero-initialises each block's last BN scale, which blocks the gradient of the
# other convolutions of the block at step 0 (a property of the init, not of MGCA)
RESNET = ["method.image_encoder.model=test_resnet", "method.image_encoder.kwargs={zero_init_last: false}",
          "method.cnn_local_layer=layer3", "method.proj_hidden_dim=32", "method.num_prototypes=16"]


def build(overrides=(), base=TINY):
    cfg = C.compose(method="mgca", overrides=[*base, *overrides])
    cfg.data.root = "/unused"
    C.resolve(cfg)
    torch.manual_seed(0)
    return METHODS.get("mgca")(cfg.method, cfg.optim)


def batch_for(method, n=4, size=32):
    tok = method.tokenizer(REPORTS[:n], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    torch.manual_seed(1)
    return ImageTextBatch(images=torch.randn(n, 1, size, size), input_ids=tok["input_ids"],
                          attention_mask=tok["attention_mask"], study_ids=[str(i) for i in range(n)])


@pytest.fixture(scope="module")
def vit():
    """The tiny ViT method (parity settings), built once; tests change ``cfg`` through ``cfg_set``."""
    return build()


@pytest.fixture
def cfg_set(vit):
    """``cfg_set(key=value, ...)`` changes ``vit.cfg`` for one test (the method reads cfg at every call)."""
    saved = {}

    def set_(**kw):
        for k, v in kw.items():
            saved.setdefault(k, vit.cfg[k])
            vit.cfg[k] = v

    yield set_
    for k, v in saved.items():
        vit.cfg[k] = v


@pytest.fixture
def at_epoch(monkeypatch):
    """Set ``current_epoch`` of every MGCA without a Trainer."""

    def set_epoch(epoch):
        monkeypatch.setattr(MGCA, "current_epoch", property(lambda self: epoch))

    return set_epoch


def test_terms_and_values_at_init(vit):
    m = vit
    out = m.losses(batch_for(m))
    assert set(out) == {"ita", "cta", "cpa"}
    assert all(torch.isfinite(v) for v in out.values())
    assert out["cpa"].item() == pytest.approx(math.log(16), abs=0.3)  # ~ log K with near-uniform predictions
    # sum of two InfoNCE directions at tau 0.07: far below 2 log B would mean leaking positives (the analytic
    # value for isotropic embeddings is checked in tests/losses; a random encoder + BatchNorm over B = 4 is
    # anisotropic, so the value here can sit well above it)
    assert out["ita"].item() > 2 * math.log(4) - 0.5


@pytest.mark.parametrize("base", [TINY, RESNET], ids=["vit", "resnet"])
def test_gradients_reach_trainable_and_not_frozen(base, at_epoch):
    m = build(["method.text_encoder.freeze_layers=1"], base=base)
    sum(m.losses(batch_for(m)).values()).backward()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("text_encoder.model.embeddings") or ".layer.0." in n for n in frozen)
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # Lightning's hook after backward: prototypes get no update during the first epoch only
    at_epoch(0)
    m.on_after_backward()
    assert m.prototypes.weight.grad is None
    assert m.img_global[0].weight.grad is not None


def test_prototypes_frozen_in_epoch_zero_then_learn(at_epoch):
    m = build()
    b = batch_for(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for epoch in (0, 1):
        at_epoch(epoch)
        before = m.prototypes.weight.detach().clone()
        head = m.txt_global[0].weight.detach().clone()
        opt.zero_grad()
        sum(m.losses(b).values()).backward()
        m.on_after_backward()
        opt.step()
        assert not torch.equal(m.txt_global[0].weight, head)
        moved = (m.prototypes.weight - before).abs().max().item()
        assert (moved < 1e-6) if epoch == 0 else (moved > 1e-4), (epoch, moved)
    m.losses(b)  # every forward re-normalises the prototype rows
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(16), atol=1e-5)


def test_terms_switch_on_at_their_epochs(vit, cfg_set, at_epoch):
    m = vit
    cfg_set(cpa_start_epoch=1, cta_start_epoch=2)
    b = batch_for(m)
    for epoch, terms in ((0, {"ita"}), (1, {"ita", "cpa"}), (2, {"ita", "cpa", "cta"}), (5, {"ita", "cpa", "cta"})):
        at_epoch(epoch)
        assert set(m.losses(b)) == terms, epoch
    with pytest.raises(ValueError, match="at least one term on from epoch 0"):
        build(["method.ita_start_epoch=1", "method.cpa_start_epoch=1", "method.cta_start_epoch=2"])


def test_token_weights_masks_and_norms(vit, cfg_set):
    m = vit
    b = batch_for(m)
    tok = m.local_tokens(b)
    n_words = tok.word_mask.sum(1)
    # parity: the words + [SEP] (no [CLS]); padding slots exactly 0 weight; rows sum to 1
    ids = b.input_ids
    assert tok.word_emb.shape[1] == ids.shape[1] - 1
    assert (tok.word_weights[~tok.word_mask] == 0).all()
    assert torch.allclose(tok.word_weights.sum(1), torch.ones(4), atol=1e-5)
    assert torch.allclose(tok.patch_weights.sum(1), torch.ones(4), atol=1e-5)
    assert tok.patch_emb.shape[1] == 16 and (tok.patch_weights > 0).all()
    for x in (tok.word_emb, tok.patch_emb):
        assert torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:2]), atol=1e-5)
    words = [m.tokenizer.convert_ids_to_tokens(row[1:int(mask.sum())]) for row, mask in zip(ids, b.attention_mask)]
    merged = [sum(1 for t in w if not t.startswith("##")) for w in words]  # words after [CLS], [SEP] included
    assert n_words.tolist() == merged
    # the official shift gives [SEP] the attention of the (padding) token after it: weight 0
    sep_slot = n_words - 1
    assert (tok.word_weights[torch.arange(4), sep_slot] == 0).all()
    # corrected alignment and [SEP] excluded: [SEP] is a padding slot with zero weight
    cfg_set(fix_token_weight_shift=True, exclude_sep_word=True)
    tok2 = m.local_tokens(b)
    assert (tok2.word_mask.sum(1) == n_words - 1).all()
    assert (tok2.word_weights[~tok2.word_mask] == 0).all() and (tok2.word_weights[tok2.word_mask] > 0).all()
    # CNNs: uniform patch weights over the layer3 cells
    r = build(base=RESNET)
    tr = r.local_tokens(batch_for(r, size=64))
    assert torch.allclose(tr.patch_weights, torch.full_like(tr.patch_weights, 1 / tr.patch_weights.shape[1]))


def test_text_cls_attention_equals_eager_attention():
    cfg = OmegaConf.structured(C.TextEncoderConfig(model="tiny", attn_implementation="eager"))
    enc = HFTextEncoder(cfg).eval()
    tok = enc.tokenizer(REPORTS, padding="max_length", max_length=20, return_tensors="pt")
    with TextCLSAttention(enc.model) as rec:
        out = enc(tok["input_ids"], tok["attention_mask"], return_attention=True)
    ref = out.attentions[:, :, 0].mean(1)
    ours = rec.probs(tok["attention_mask"])
    assert torch.allclose(ours, ref, atol=1e-6)
    assert (ours[tok["attention_mask"] == 0] == 0).all()


def test_learnable_token_attention_and_flags_build_and_learn():
    m = build(["method.learnable_token_attention=true", "method.mask_pad_candidates=true",
               "method.ita_reduction=mean", "method.normalize_vit_patch_summary=true"])
    sum(m.losses(batch_for(m)).values()).backward()
    assert m.word_attention.in_proj_weight.grad.abs().sum() > 0
    assert m.patch_attention.in_proj_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ita_reduction"):
        build(["method.ita_reduction=avg"])


# --------------------------------------------------------------------------- paper configs
COMMON = {
    "method.name": "mgca",
    "method.embed_dim": 128,
    "method.proj_hidden_dim": 2048,
    "method.ita_temperature": 0.07,
    "method.cta_temperature": 0.1,
    "method.cpa_temperature": 0.2,
    "method.num_prototypes": 500,
    "method.sinkhorn_epsilon": 0.05,
    "method.sinkhorn_iterations": 3,
    "method.freeze_prototypes_epochs": 1,
    "method.ita_start_epoch": 0,
    "method.cta_start_epoch": 0,
    "method.cpa_start_epoch": 0,
    "method.bidirectional": True,
    "method.token_weight_percentiles": [0.1, 0.9],
    "method.ita_reduction": "sum",
    "method.gather_negatives": False,
    "method.distributed_sinkhorn": False,
    "method.fix_token_weight_shift": False,
    "method.learnable_token_attention": False,
    "method.loss_weights": {"ita": 1.0, "cta": 1.0, "cpa": 1.0},
    "method.image_encoder.pretrained": True,
    "method.image_encoder.in_chans": 3,
    "method.image_encoder.kwargs": {},
    "method.text_encoder.model": "emilyalsentzer/Bio_ClinicalBERT",
    "method.text_encoder.pretrained": True,
    "method.text_encoder.num_layers": 6,
    "method.text_encoder.freeze_layers": 0,
    "method.text_encoder.pool": "cls",
    "data.name": "mimic_cxr",
    "data.image_size": 224,
    "data.channels": 3,
    "data.batch_size": 72,
    "data.max_length": 112,
    "data.views": ["PA", "AP"],
    "data.sections": ["impression", "findings"],
    "data.min_tokens": 3,
    "data.aug_degrees": 0.0,
    "trainer.devices": "2",  # 2 GPUs x 72 = 144
    "trainer.accelerator": "gpu",
    "trainer.precision": "bf16-mixed",
    "trainer.max_epochs": 50,
    "optim.lr": 2e-5,
    "optim.betas": [0.9, 0.999],
    "optim.weight_decay": 0.05,
    "optim.no_decay_norm_bias": False,
    "optim.warmup_ratio": 0.4,
    "optim.schedule": "cosine",
    "optim.min_lr_ratio": 1e-8 / 2e-5,
    "run.seed": 42,
}
PAPER = {
    "mgca_vit_mimic": {**COMMON, "method.image_encoder.model": "deit_base_patch16_224.fb_in1k",
                       "method.image_encoder.img_size": [224]},
    "mgca_resnet_mimic": {**COMMON, "method.image_encoder.model": "resnet50.tv2_in1k",
                          "method.cnn_local_layer": "layer3", "method.cnn_input_size": 299},
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_experiment_configs_hold_the_paper_settings(name):
    cfg = C.compose(config_file=str(C.config_dir() / "experiment" / f"{name}.yaml"), overrides=["data.root=/data/mimic"])
    C.resolve(cfg)
    for key, expected in PAPER[name].items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if isinstance(expected, float):
            assert value == pytest.approx(expected, rel=1e-6), key
        else:
            assert value == expected, key
    assert cfg.data.batch_size * int(cfg.trainer.devices) == 144


# --------------------------------------------------------------------------- fit
def test_smoke_fit_on_tiny_demo(tmp_path):
    """3 steps (epoch 0: 2 steps, epoch 1: 1 step) with CTA switched on in epoch 1; zero-shot runs."""
    cfg = C.compose(method="mgca", overrides=[
        *TINY, "data.image_size=32", "data.demo_size=tiny", "data.batch_size=3", "method.cta_start_epoch=1",
        "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=1", f"run.out_dir={tmp_path}", "run.name=smoke",
    ])
    run_dir = api.fit(cfg)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [dict(zip(header, r.split(","))) for r in rows[1:]]
    steps = [r for r in steps if r.get("train/loss_ita_step")]
    assert len(steps) == 3
    assert [bool(r["train/loss_cta_step"]) for r in steps] == [False, False, True]
    assert all(r["train/loss_cpa_step"] for r in steps)
    for col in ("train/loss_cta_word_step", "train/loss_cta_patch_step", "train/inbatch_acc1_step", "val/loss_cpa"):
        assert col in header
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    L.seed_everything(cfg.run.seed, verbose=False)
    init = api.build_method(cfg)  # the same initial weights as the run
    assert not torch.allclose(state["img_global.0.weight"], init.img_global[0].weight)
    method, _ = api.load_run(run_dir)
    emb = method.embed_image(torch.randn(2, 1, 32, 32))
    assert emb.shape == (2, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.gpu
def test_paper_batch_step_on_cuda_in_bf16():
    """One optimiser step at the paper's global batch (144) on one GPU in bf16: ViT-B/16 at 224 px and a
    6-layer BERT-base-sized text encoder (offline: `tiny` tokenizer, random weights)."""
    from medvlp.batch import ImageTextBatch
    from medvlp.registry import METHODS

    cfg = C.compose(config_file=str(C.config_dir() / "experiment" / "mgca_vit_mimic.yaml"), overrides=[
        "data.root=/unused", "method.image_encoder.pretrained=false", "method.text_encoder.model=tiny",
        "method.text_encoder.num_layers=6",
        "method.text_encoder.config_overrides={hidden_size: 768, num_attention_heads: 12, intermediate_size: 3072}"])
    C.resolve(cfg)
    m = METHODS.get("mgca")(cfg.method, cfg.optim).cuda()
    n = 144
    texts = ["small left pleural effusion. the heart is enlarged."] * (n // 2) + ["no acute cardiopulmonary process."] * (n // 2)
    tok = m.tokenizer(texts, padding="max_length", truncation=True, max_length=int(cfg.data.max_length), return_tensors="pt")
    batch = ImageTextBatch(images=torch.randn(n, 3, 224, 224, device="cuda"), input_ids=tok["input_ids"].cuda(),
                           attention_mask=tok["attention_mask"].cuda(), study_ids=[str(i) for i in range(n)])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m.losses(batch)
    assert set(out) == {"ita", "cta", "cpa"}
    loss = sum(out.values())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

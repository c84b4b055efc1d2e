"""fVLM: the spec's invariants (§9) and hand-computed values - encoder, anatomy geometry, pooling, text
assembly, false-negative-reduction targets, the per-anatomy loss, zero-shot scoring - and the configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medvlp import api
from medvlp import config as C
from medvlp.batch import ImageTextBatch
from medvlp.config import AnatomyViTConfig
from medvlp.datamodules.ct_rate import fvlm_anatomy_texts
from medvlp.downstream.metrics import youden_like_threshold
from medvlp.encoders.fvlm_vit import AnatomyViT, mae_sincos_2d
from medvlp.losses import clip_loss
from medvlp.losses.anatomy import fnr_targets, soft_target_clip, text_keys

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ANATOMIES = ["lung", "heart", "esophagus", "aorta"]


def method(**overrides):
    """The demo fVLM (tiny ViT, tiny BERT), seeded, in eval mode (no dropout)."""
    cfg = C.compose(method="fvlm", overrides=[f"method.{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return api.build_method(cfg).eval()


def label_maps(b: int, absent: dict[int, list[int]] | None = None, touching: dict[int, list[int]] | None = None) -> torch.Tensor:
    """``[b, 1, 32, 64, 64]`` label maps with four blobs (1 lung, 2 heart, 3 esophagus, 4 aorta), shifted per
    sample; ``absent[i]`` / ``touching[i]`` list anatomies (1-based) left out of / pushed onto a face of sample i."""
    out = torch.zeros(b, 1, 32, 64, 64, dtype=torch.long)
    for i in range(b):
        s = i % 3
        boxes = {1: (8, 24, 10 + s, 30 + s, 8, 28), 2: (10, 20, 34, 50, 34 + s, 50 + s), 3: (4 + s, 28, 30, 34, 30, 34),
                 4: (6, 26, 40, 44, 18 + s, 22 + s)}
        for k, (z0, z1, y0, y1, x0, x1) in boxes.items():
            if k in (absent or {}).get(i, []):
                continue
            if k in (touching or {}).get(i, []):
                z0 = 0
            out[i, 0, z0:z1, y0:y1, x0:x1] = k
    return out


def batch(m, b: int = 6, abnormal: torch.Tensor | None = None, texts: dict | None = None, **maps) -> ImageTextBatch:
    g = torch.Generator().manual_seed(3)
    if abnormal is None:
        abnormal = torch.tensor([[(i + k) % 2 == 0 for k in range(4)] for i in range(b)])
    if texts is None:
        texts = {a: [f"{a} finding number {i}." if abnormal[i, k] else f"{a} shows no significant abnormalities."
                     for i in range(b)] for k, a in enumerate(ANATOMIES)}
    tok = m.tokenizer(["a report"] * b, padding="max_length", max_length=16, return_tensors="pt")
    return ImageTextBatch(images=torch.rand(b, 1, 32, 64, 64, generator=g), input_ids=tok["input_ids"],
                          attention_mask=tok["attention_mask"], study_ids=[str(i) for i in range(b)],
                          anatomy_masks=label_maps(b, **maps), anatomy_texts=texts, anatomy_abnormal=abnormal)


def captured(m, b: ImageTextBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``(terms, logged per-anatomy values)`` of one ``losses`` call."""
    logged: dict[str, float] = {}
    m.log_terms = lambda values, batch_size=None: logged.update({k: float(v) for k, v in values.items()})
    return m.losses(b), logged


# --------------------------------------------------------------------------- encoder
def vit(**kw) -> AnatomyViT:
    torch.manual_seed(0)
    cfg = AnatomyViTConfig(**{"width": 64, "depth": 4, "heads": 4, "out_blocks": [1, 2, 3], "pretrained": False, **kw})
    return AnatomyViT(cfg).eval()


def test_parity_grid_has_no_cls_and_four_levels_only_the_last_normalised():
    enc = vit(depth=2, out_blocks=[1])
    assert enc.ref_grid == (7, 16, 11) and enc.pos_embed.shape == (1, 64, 7, 16, 11)  # 1,232 tokens
    captured_blocks = []
    for blk in enc.blocks:
        blk.register_forward_hook(lambda mod, inp, out: captured_blocks.append(out))
    with torch.no_grad():
        f = enc(torch.rand(1, 1, 112, 256, 352))
    assert f.grid == (7, 16, 11) and f.tokens.shape == (1, 1232, 64) and len(f.levels) == 2
    assert torch.equal(f.levels[0], captured_blocks[0]) and torch.equal(f.levels[-1], f.tokens)
    assert torch.allclose(f.tokens.mean(-1), torch.zeros(1, 1232), atol=1e-5)  # LayerNorm'd (weight 1, bias 0)
    assert f.levels[0].mean(-1).abs().max() > 1e-3  # the raw residual stream is not
    with torch.no_grad():
        wide = enc(torch.rand(1, 1, 112, 288, 352))  # fVLM's evaluation window: 7 x 18 x 11 tokens
    assert wide.grid == (7, 18, 11) and wide.tokens.shape[1] == 1386 and enc.positions((7, 18, 11)).shape == (1, 1386, 64)


def mae_reference(dim: int, size: int) -> np.ndarray:
    """MAE's ``get_2d_sincos_pos_embed`` (util/pos_embed.py), written from its definition."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))  # w goes first
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_positions_start_from_mae_sincos_tiled_over_depth():
    assert np.allclose(mae_sincos_2d(64, 14).numpy(), mae_reference(64, 14), atol=1e-6)
    enc = vit(img_size=[32, 64, 64], patch_size=[8, 16, 16])
    table = enc.pos_embed[0]  # [W, d, h, w]
    assert all(torch.equal(table[:, 0], table[:, z]) for z in range(table.shape[1]))  # no depth information at start
    ref = F.interpolate(mae_sincos_2d(64, 14).T.reshape(1, 64, 14, 14), size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(table[:, 0], ref[0], atol=1e-6)


def test_blocks_and_final_norm_come_from_the_2d_vit_and_the_patch_embedding_stays_random():
    import timm

    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    made = []
    real = timm.create_model

    def create(name, **kw):  # the weights the encoder loads are src's (no download in tests)
        made.append((name, kw))
        return src

    timm.create_model = create
    try:
        enc = vit(width=192, heads=3, depth=2, out_blocks=[1], inflate_from="vit_tiny_patch16_224")
    finally:
        timm.create_model = real
    assert made == [("vit_tiny_patch16_224", {"pretrained": False, "num_classes": 0})]
    for i in range(2):
        for k, v in src.blocks[i].state_dict().items():
            assert torch.equal(enc.blocks[i].state_dict()[k], v), k
    assert torch.equal(enc.norm.weight, src.norm.weight)
    fresh = vit(width=192, heads=3, depth=2, out_blocks=[1])
    assert torch.equal(enc.pos_embed, fresh.pos_embed)  # positions keep the tiled MAE table
    assert enc.patch_embed.proj.weight.shape == (192, 1, 16, 16, 32)


def test_encoder_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"out_blocks=\[3, 9\]"):
        vit(out_blocks=[3, 9])
    with pytest.raises(ValueError, match="global_pool=mean"):
        vit(global_pool="cls")


# --------------------------------------------------------------------------- anatomy geometry and pooling
def test_token_flags_match_a_max_pool_of_each_anatomy_mask():
    m = method()
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(3, 32, 64, 64, generator=g) > 0.9995).long() * torch.randint(1, 5, (3, 32, 64, 64), generator=g)
    flags = m.token_flags(labels)
    assert flags.shape == (3, 4, 64) and flags.any()
    for k in range(4):  # the released code's definition: a max-pool of the anatomy's mask over each patch
        pooled = F.max_pool3d((labels == k + 1).float()[:, None], kernel_size=(8, 16, 16), stride=(8, 16, 16))
        assert torch.equal(flags[:, k], pooled.flatten(1) > 0)
    z, y, x = 2, 1, 3  # and one patch by hand
    patch = labels[1, z * 8:(z + 1) * 8, y * 16:(y + 1) * 16, x * 16:(x + 1) * 16]
    assert [bool(flags[1, k, z * 16 + y * 4 + x]) for k in range(4)] == [bool((patch == k + 1).any()) for k in range(4)]


def test_intact_rule_excludes_an_anatomy_on_a_face_and_includes_it_one_voxel_in():
    m = method()
    labels = torch.zeros(1, 32, 64, 64, dtype=torch.long)
    labels[0, 10:20, 10:20, 54:64] = 2  # touches the last x column
    present, touching = m.anatomy_presence(labels)
    assert present[0, 1] and touching[0, 1]
    labels = torch.zeros(1, 32, 64, 64, dtype=torch.long)
    labels[0, 10:20, 10:20, 53:63] = 2  # one voxel away
    present, touching = m.anatomy_presence(labels)
    assert present[0, 1] and not touching[0, 1] and not present[0, 0]


def test_pooling_equals_multihead_attention_per_sample_and_ignores_token_order():
    m = method()
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, 64, 96, generator=g) for _ in range(4)]
    flags = torch.rand(2, 4, 64, generator=g) > 0.6
    m.query_tokens.data.normal_(generator=g)  # a non-zero query, so the weights are not uniform
    with torch.no_grad():
        pooled = m.pool(levels, flags)
        for b in range(2):
            for k in range(4):
                kv = torch.cat([lv[b, flags[b, k]] for lv in levels])[None]
                ref, _ = m.attention(m.query_tokens[k][None, None], kv, kv)
                assert torch.allclose(pooled[b, k], ref[0, 0], atol=1e-5)
        perm = torch.randperm(64, generator=g)
        shuffled = m.pool([lv[:, perm] for lv in levels], flags[:, :, perm])
    assert torch.allclose(pooled, shuffled, atol=1e-5)


# --------------------------------------------------------------------------- anatomy texts
def test_text_assembly_follows_the_released_code():
    texts, abnormal = fvlm_anatomy_texts(
        {"lung": "Lungs are clear", "heart": "Heart size is increased (mild)."},
        {"heart": 'Cardiomegaly. "Pericardial" effusion.'})
    assert texts["heart"] == "Cardiomegaly. Pericardial effusion.Heart size is increased mild."  # no separator
    assert texts["lung"] == "lung shows no significant abnormalities.Lungs are clear."
    assert texts["aorta"] == "aorta shows no significant abnormalities."
    assert abnormal == [False, True, False, False]
    m = method()
    b = batch(m, 3, abnormal=torch.tensor([[False, True, False, False]] * 3),
              texts={k: [v] * 3 for k, v in texts.items()})
    rows = [0, 1, 2]
    assert m.report_texts(b, 0, rows)[0] == "Lungs are clear."  # normal with findings: findings only
    assert m.report_texts(b, 3, rows)[0] == "aorta shows no significant abnormalities."  # normal, no findings: template
    assert m.report_texts(b, 1, rows)[0] == texts["heart"]  # abnormal: impression + findings


# --------------------------------------------------------------------------- targets and loss
def test_fnr_targets_on_hand_made_normal_and_duplicate_cases():
    normal = torch.tensor([True, True, False, False, False, True])
    keys = text_keys(["n1", "n2", "effusion.", "nodule.", "effusion.", "n3"])
    y = fnr_targets(normal, keys)
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 1], [1, 1, 0, 0, 0, 1], [0, 0, 1, 0, 1, 0],
        [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.float)
    assert torch.allclose(y, expected / expected.sum(1, keepdim=True))
    assert torch.allclose(y.sum(1), torch.ones(6), atol=1e-6) and (y.diagonal() > 0).all()
    assert torch.equal(y > 0, (y > 0).T)
    assert torch.equal(fnr_targets(normal, keys, normal_positives=False, duplicate_positives=False), torch.eye(6))


def test_loss_is_plain_infonce_when_every_anatomy_is_present_and_unique():
    g = torch.Generator().manual_seed(0)
    v, t = F.normalize(torch.randn(8, 32, generator=g), dim=-1), F.normalize(torch.randn(8, 32, generator=g), dim=-1)
    y = fnr_targets(torch.zeros(8, dtype=torch.bool), text_keys([f"finding {i}" for i in range(8)]))
    ours, _, _ = soft_target_clip(v, t, 0.07, y)
    plain, _, _ = clip_loss(v, t, 1 / 0.07, gather_distributed=False)
    assert torch.allclose(ours, plain, atol=1e-5)
    swapped, _, _ = soft_target_clip(t, v, 0.07, y)  # symmetric under swapping image and text roles
    assert torch.allclose(ours, swapped, atol=1e-5)


def test_loss_is_at_least_the_target_entropy_and_reaches_it_for_perfect_unique_matches():
    g = torch.Generator().manual_seed(0)
    normal = torch.tensor([True, True, True, False, False, False])
    y = fnr_targets(normal, text_keys(["a", "b", "c", "d", "e", "f"]))
    entropy = float(-(y * y.clamp_min(1e-12).log()).sum(1).mean())
    for _ in range(5):
        v, t = F.normalize(torch.randn(6, 16, generator=g), dim=-1), F.normalize(torch.randn(6, 16, generator=g), dim=-1)
        assert float(soft_target_clip(v, t, 0.1, y)[0]) >= entropy - 1e-6
    unique = fnr_targets(torch.zeros(6, dtype=torch.bool), text_keys(list("abcdef")))
    e = torch.eye(6)
    assert float(soft_target_clip(e, e, 0.001, unique)[0]) < 1e-6  # entropy of a one-hot row is 0


@pytest.mark.parametrize("n", [14, 56])
def test_loss_at_initialisation_is_ln_n_plus_one_over_2_d_tau_squared(n):
    g = torch.Generator().manual_seed(0)
    values = []
    for _ in range(40):
        v, t = F.normalize(torch.randn(n, 256, generator=g), dim=-1), F.normalize(torch.randn(n, 256, generator=g), dim=-1)
        normal = torch.rand(n, generator=g) < 0.7
        values.append(float(soft_target_clip(v, t, 0.07, fnr_targets(normal, text_keys([str(i) for i in range(n)])))[0]))
    assert np.mean(values) == pytest.approx(math.log(n) + 1 / (2 * 256 * 0.07**2), abs=0.08)


def test_method_loss_sums_contributing_anatomies_and_skips_all_normal_ones():
    m = method()
    abnormal = torch.tensor([[i % 2 == 0, i % 3 == 0, False, True] for i in range(6)])
    terms, logged = captured(m, batch(m, abnormal=abnormal))
    assert set(logged) == {"lung_itc", "heart_itc", "aorta_itc", "temperature"}  # esophagus: no abnormal sample
    assert float(terms["itc"]) == pytest.approx(logged["lung_itc"] + logged["heart_itc"] + logged["aorta_itc"], rel=1e-5)
    none = torch.zeros(6, 4, dtype=torch.bool)
    assert m.losses(batch(m, abnormal=none)) == {}  # nothing to learn: the step is skipped


def test_an_absent_anatomy_contributes_nothing_and_gets_no_gradient():
    m = method()
    abnormal = torch.tensor([[True, i % 2 == 0, i < 3, True] for i in range(6)])
    base = batch(m, abnormal=abnormal, absent={i: [3] for i in range(6)} | {0: [2, 3]}, touching={1: [2]})
    terms, logged = captured(m, base)
    assert "esophagus_itc" not in logged
    terms["itc"].backward()
    assert m.vision_projs[2].weight.grad is None or not m.vision_projs[2].weight.grad.any()
    assert m.query_tokens.grad[2].abs().max() == 0 and m.query_tokens.grad[1].abs().max() > 0
    # sample 0 lacks the heart and sample 1's heart touches a face: their heart texts do not matter
    texts = {k: list(v) for k, v in base.anatomy_texts.items()}
    texts["heart"][0], texts["heart"][1] = "completely different.", "another text."
    m.zero_grad()
    again, logged2 = captured(m, batch(m, abnormal=abnormal, texts=texts, absent={i: [3] for i in range(6)} | {0: [2, 3]},
                                       touching={1: [2]}))
    assert logged2["heart_itc"] == pytest.approx(logged["heart_itc"], rel=1e-6)


def test_temperature_is_clamped_before_every_forward():
    m = method()
    with torch.no_grad():
        m.temp.fill_(5.0)
    m.losses(batch(m))
    assert float(m.temp) == 0.5 and m.temperature() == 0.5
    with torch.no_grad():
        m.temp.fill_(-1.0)
    assert m.temperature() == pytest.approx(0.001)


def test_coteaching_trains_one_model_at_a_time_with_the_peers_soft_targets():
    """fnr_abnormal=coteach (§4.6, not in the released code): two models with different initialisations take
    turns; the one training mixes the peer's softmax into its targets with weight 1 - alpha."""
    plain = method()
    b = batch(plain)
    reference = plain.losses(b)["itc"].item()
    m = method(fnr_abnormal="coteach", coteach_alpha=1.0)
    assert not torch.equal(m.peer.vision_projs[0].weight, m.vision_projs[0].weight)
    assert float(m.losses(b)["itc"]) == pytest.approx(reference, rel=1e-5)  # alpha = 1: the FNR targets alone
    m = method(fnr_abnormal="coteach")
    for turn in (0, 1):
        m.zero_grad()
        m._turn = turn
        loss = m.losses(b)["itc"]
        loss.backward()
        own = [p.grad is not None and bool(p.grad.any()) for n, p in m.named_parameters() if not n.startswith("peer.")]
        peer = [p.grad is not None and bool(p.grad.any()) for p in m.peer.parameters()]
        assert (any(own), any(peer)) == ((True, False) if turn == 0 else (False, True))
    m._turn = 0
    assert float(m.losses(b)["itc"]) != pytest.approx(reference, rel=1e-4)
    scoped = method(fnr_abnormal="coteach", coteach_scope="abnormal_only")
    assert torch.isfinite(scoped.losses(b)["itc"])


def test_momentum_text_adds_soft_positives_between_abnormal_samples_only():
    normal = torch.tensor([True, True, False, False])
    keys = text_keys(["a", "b", "c", "d"])
    soft = torch.full((4, 4), 0.25) * ((~normal)[:, None] & (~normal)[None, :])
    y = fnr_targets(normal, keys, extra=soft)
    assert torch.allclose(y[:2], fnr_targets(normal, keys)[:2])  # normal rows unchanged
    assert torch.allclose(y[2], torch.tensor([0, 0, 1.25, 0.25]) / 1.5)
    m = method(fnr_abnormal="momentum_text", momentum=0.5)
    loss = m.losses(batch(m))["itc"]
    loss.backward()
    assert all(p.grad is None for p in m.text_encoder_m.parameters()) and not any(p.requires_grad for p in m.text_proj_m.parameters())
    with torch.no_grad():
        m.text_proj.weight.add_(1.0)
    before = m.text_proj_m.weight.clone()
    m.momentum_update()
    assert torch.allclose(m.text_proj_m.weight, 0.5 * before + 0.5 * m.text_proj.weight)


# --------------------------------------------------------------------------- zero-shot
def test_zero_shot_scores_each_prompt_with_its_anatomy_and_marks_absent_ones():
    m = method()
    b = batch(m, 4, absent={1: [2]})
    with torch.no_grad():
        emb = m.embed_batch(b)
        pos, neg = F.normalize(torch.randn(2, 128), dim=-1)
        sims = m.similarity(emb, torch.stack([pos, neg]), anatomy="heart")
    assert emb.shape == (4, 4, 128) and torch.isnan(emb[1, 1]).all() and not torch.isnan(emb[0]).any()
    assert torch.isnan(sims[1]).all() and torch.allclose(sims[0], emb[0, 1] @ torch.stack([pos, neg]).T)
    tau = m.temperature()
    p = torch.sigmoid((sims[0, 0] - sims[0, 1]) / tau)
    assert torch.allclose(p, torch.softmax(sims[0] / tau, 0)[0]) and torch.allclose(1 - p, torch.sigmoid((sims[0, 1] - sims[0, 0]) / tau))
    with pytest.raises(ValueError, match="anatomy label map"):
        m.embed_image(b.images)


def eval_py_window(mask: torch.Tensor, crop_size) -> tuple[slice, ...]:
    """fVLM's ``eval.py`` ``center_crop`` (via ``masks_to_boxes_3d``), written from its definition."""
    z, y, x = mask.nonzero().T
    lo, hi = [int(z.min()), int(y.min()), int(x.min())], [int(z.max()), int(y.max()), int(x.max())]
    out = []
    for a in range(3):
        crop = max(crop_size[a], hi[a] - lo[a])
        c = (lo[a] + hi[a]) // 2
        start = max(0, c - crop // 2)
        end = min(mask.shape[a], start + crop)
        if end - start < crop:
            start = max(0, end - crop)
        out.append(slice(start, end))
    return tuple(out)


def test_evaluation_windows_follow_eval_py():
    from medvlp.methods.fvlm import anatomy_window

    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        mask = torch.zeros(40, 90, 120, dtype=torch.bool)
        z0, y0, x0 = (int(torch.randint(0, n - 4, (), generator=g)) for n in mask.shape)
        dz, dy, dx = (int(torch.randint(1, 60, (), generator=g)) for _ in range(3))
        mask[z0:z0 + dz, y0:y0 + dy, x0:x0 + dx] = True
        roi = [int(torch.randint(4, 50, (), generator=g)), 32, int(torch.randint(10, 130, (), generator=g))]
        assert anatomy_window(mask, roi) == eval_py_window(mask, roi)
    m = method(eval_windows=True, eval_roi="[16,32,48]")
    b = batch(m, 2, absent={1: [3]})
    with torch.no_grad():
        emb = m.embed_batch(b)
        labels = b.anatomy_masks[0, 0]
        box = anatomy_window(labels == 2, [16, 32, 48])
        window = F.pad(b.images[:1, :, box[0], box[1], box[2]], [0, -(box[2].stop - box[2].start) % 16, 0,
                       -(box[1].stop - box[1].start) % 16, 0, -(box[0].stop - box[0].start) % 8])
        only = torch.zeros_like(window, dtype=torch.long)
        only[0, 0, :box[0].stop - box[0].start, :box[1].stop - box[1].start, :box[2].stop - box[2].start] = \
            (labels[box] == 2).long() * 2
        direct, _ = m.embed_anatomies(window, only[:, 0])
    assert emb.shape == (2, 4, 128) and torch.isnan(emb[1, 2]).all() and not torch.isnan(emb[0]).any()
    assert torch.allclose(emb[0, 1], direct[0, 1], atol=1e-5)


def calc_metrics_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """fVLM's ``calc_metrics.find_threshold``, written from its definition: ``prob > t``, ``<=`` keeps the last."""
    best_t, best = 0.0, 10000.0
    for t in np.linspace(0, 1, 100):
        pred = probs > t
        tp, fn = (pred & (labels == 1)).sum(), (~pred & (labels == 1)).sum()
        fp, tn = (pred & (labels == 0)).sum(), (~pred & (labels == 0)).sum()
        d = math.sqrt((1 - tp / (tp + fn)) ** 2 + (fp / (fp + tn)) ** 2)
        if d <= best:
            best, best_t = d, t
    return float(best_t)


def test_threshold_search_reproduces_calc_metrics_with_its_tie_breaking():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = (rng.random(60) < 0.3).astype(int)
        probs = np.round(np.clip(rng.normal(0.4 + 0.3 * labels, 0.2), 0, 1), 1)  # coarse: many ties
        probs[:5] = 0.0  # unscored images (probability 0)
        assert youden_like_threshold(probs, labels, strict=True) == calc_metrics_threshold(probs, labels)


def test_thresholds_can_come_from_another_split_and_unscored_images_follow_the_prompt_file():
    """data.threshold_split: each label's threshold is chosen on another split's probabilities and applied to the
    evaluated one; ``_missing: zero`` ranks an image without the anatomy last (probability 0), ``exclude`` drops it."""
    from medvlp.downstream.embed import Embeddings
    from medvlp.downstream.zero_shot import probabilities, prompt_scores, zero_shot_auc

    m = method()
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Embeddings:
        img = F.normalize(torch.randn(n, 4, 128, generator=g), dim=-1)
        img[:3, 1] = float("nan")  # no heart in the first three volumes
        return Embeddings(img, torch.zeros(n, 128), [str(i) for i in range(n)], (torch.rand(n, 1, generator=g) > 0.5).float())

    test, val = split(40), split(30)
    prompts = {"Cardiomegaly": {"anatomy": "heart", "positive": ["Cardiomegaly."], "negative": ["heart shows no significant abnormalities."]}}
    opts = {"threshold": "fvlm", "missing": "zero"}
    own = zero_shot_auc(m, test, ["Cardiomegaly"], ["Cardiomegaly"], prompts, 32, options=opts)
    moved = zero_shot_auc(m, test, ["Cardiomegaly"], ["Cardiomegaly"], prompts, 32, options=opts, threshold_emb=val)
    scale = 1 / m.temperature()
    other = prompt_scores(m, val, ["Cardiomegaly"], prompts, 32)[0]["Cardiomegaly"]
    assert moved["thresholded"]["Cardiomegaly"]["threshold"] == youden_like_threshold(
        probabilities(other, scale), val.labels[:, 0].numpy(), strict=True)
    assert own["auroc"] == moved["auroc"] and own["unscored"] == {"Cardiomegaly": 3}
    excluded = zero_shot_auc(m, test, ["Cardiomegaly"], ["Cardiomegaly"], prompts, 32, options={**opts, "missing": "exclude"})
    y = test.labels[:, 0]
    assert excluded["positives"]["Cardiomegaly"] == int((y[3:] > 0.5).sum())


# --------------------------------------------------------------------------- two processes
def _rank(rank: int, init: str, state: dict, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        m = method()
        m.load_state_dict(state)
        full = batch(m, 8, absent={0: [2], 5: [2, 4], 6: [4]})
        for with_grad in (False, True):
            m.cfg.gather_with_grad = with_grad
            m.zero_grad()
            lo, hi = rank * 4, rank * 4 + 4
            half = ImageTextBatch(images=full.images[lo:hi], input_ids=full.input_ids[lo:hi],
                                  attention_mask=full.attention_mask[lo:hi], study_ids=full.study_ids[lo:hi],
                                  anatomy_masks=full.anatomy_masks[lo:hi],
                                  anatomy_texts={k: v[lo:hi] for k, v in full.anatomy_texts.items()},
                                  anatomy_abnormal=full.anatomy_abnormal[lo:hi])
            terms = m.losses(half)
            terms["itc"].backward()
            out[(rank, with_grad)] = (float(terms["itc"]),
                                      {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        dist.barrier()  # both ranks done before the process group goes away
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 22 s; tests/losses/test_distributed.py checks the same loss on uneven processes in the default suite
@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Each rank holds different anatomy sets (rank 1 has two samples without the aorta, one without the
    heart); the gathered loss equals the one-process loss, and the DDP average of the gradients is half the
    one-process gradient with the released plain gather (except tau's), the whole one with the
    gradient-carrying gather."""
    m = method()
    full = batch(m, 8, absent={0: [2], 5: [2, 4], 6: [4]})
    loss = m.losses(full)["itc"]
    loss.backward()
    single = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    out = mp.Manager().dict()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    mp.spawn(_rank, args=(str(tmp_path / "init"), state, out), nprocs=2, join=True)
    for with_grad in (False, True):
        assert out[(0, with_grad)][0] == pytest.approx(float(loss), rel=1e-5)
        assert out[(1, with_grad)][0] == pytest.approx(float(loss), rel=1e-5)
        for name, g in single.items():
            # tau scales the logits after the gather, so every rank's loss carries its whole gradient
            factor = 1.0 if with_grad or name == "temp" else 0.5
            grads = [out[(r, with_grad)][1].get(name, torch.zeros_like(g)) for r in (0, 1)]
            assert torch.allclose((grads[0] + grads[1]) / 2, factor * g, atol=1e-5, rtol=1e-4), (name, with_grad)


# --------------------------------------------------------------------------- configs
def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"method.anatomies=\['lung', 'lung'\]"):
        method(anatomies="[lung,lung]")
    with pytest.raises(ValueError, match="method.pool_heads=5"):
        method(pool_heads=5)
    with pytest.raises(ValueError, match="method.text_padding='ragged'"):
        method(text_padding="ragged")


def test_the_released_recipe_value_by_value():
    cfg = C.compose(config_file=str(CONFIGS / "experiment" / "fvlm_ctrate.yaml"))
    m, d, o, t = cfg.method, cfg.data, cfg.optim, cfg.trainer
    enc = m.image_encoder
    assert (enc.name, list(enc.img_size), list(enc.patch_size), enc.width, enc.depth, enc.heads, enc.mlp_ratio) == \
        ("fvlm_vit", [112, 256, 352], [16, 16, 32], 768, 12, 12, 4.0)
    assert (list(enc.out_blocks), enc.dropout, enc.norm_eps, enc.drop_path, enc.pos_init, enc.inflate_from, enc.in_chans) == \
        ([4, 7, 10], 0.1, 1e-5, 0.0, "mae_sincos", "vit_base_patch16_224.mae", 1)
    assert (m.text_encoder.model, m.text_encoder.architecture, m.text_encoder.pool) == \
        ("microsoft/BiomedVLP-CXR-BERT-specialized", "bert", "cls")
    assert (m.embed_dim, list(m.anatomies), m.pool_heads, m.pool_dropout) == (256, ANATOMIES, 4, 0.1)
    assert (m.temperature, m.temperature_min, m.temperature_max) == (0.07, 0.001, 0.5)
    assert (m.text_max_length, m.text_padding, m.normal_template) == (384, "max_length", "{anatomy} shows no significant abnormalities.")
    assert (m.fnr_abnormal, m.eval_windows, list(m.eval_roi), d.eval_crop, d.eval_batch_size) == \
        ("none", True, [112, 288, 352], "full", 1)
    assert m.fnr_normal and m.fnr_duplicates and m.intact_only and m.strip_template and m.gather_distributed
    assert not m.gather_with_grad
    assert (d.name, d.version, d.apply_metadata_rescale, list(d.spacing), list(d.size), list(d.window), d.mean, d.std) == \
        ("ct_rate", "v1", "on", [3.0, 1.0, 1.0], [112, 256, 352], [-1150.0, 350.0], 0.0, 1.0)
    assert (d.orientation, d.flip_prob, list(d.flip_axes), d.anatomy_groups, d.anatomy_text, d.crop, list(d.crop_margin)) == \
        ("", 0.2, [True, True, True], "fvlm4", "fvlm", "anatomy", [5, 20, 20])
    assert (d.reconstructions, d.eval_reconstructions, d.batch_size, d.max_length, d.prompts) == \
        ("one", "all", 14, 384, "fvlm_ct_rate.yaml")
    assert len(d.eval_labels) == 16 and "Medical material" not in d.eval_labels and "Lymphadenopathy" not in d.eval_labels
    assert (o.lr, o.weight_decay, o.no_decay_norm_bias, list(o.betas), o.eps) == (1e-4, 0.01, False, [0.9, 0.999], 1e-8)
    assert (o.warmup_steps, o.warmup_start_ratio, o.schedule, o.min_lr_ratio) == (377, 0.01, "cosine_epoch", 0.01)
    assert (str(t.devices), t.strategy, t.precision, t.max_epochs) == ("4", "ddp_find_unused_parameters_true", "32-true", 20)
    from medvlp.downstream.zero_shot import load_options, load_prompts

    prompts = load_prompts(CONFIGS / "prompts" / "fvlm_ct_rate.yaml")
    assert set(prompts) == set(d.eval_labels)
    assert prompts["Atelectasis"] == {"positive": ["Atelectatic."], "negative": ["Not Atelectatic."], "anatomy": "lung"}
    assert prompts["Pulmonary fibrotic sequela"]["positive"] == ["Pulmonary fibrotic."]
    assert {p["anatomy"] for p in prompts.values()} == set(ANATOMIES)
    assert load_options(CONFIGS / "prompts" / "fvlm_ct_rate.yaml") == {"threshold": "fvlm", "missing": "zero", "score": "difference"}


def test_released_schedule_warms_up_from_1e6_then_one_cosine_value_per_epoch():
    from medvlp.methods.base import lr_factor

    epoch, epochs = 430, 20  # 24,128 scans / 56 per step
    lr = [1e-4 * lr_factor(s, 377, epoch * epochs, "cosine_epoch", 0.01, epoch, 0.01) for s in range(epoch * epochs)]
    assert lr[0] == pytest.approx(1e-6) and lr[376] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 376 / 377)
    assert lr[377] == pytest.approx(1e-4) and lr[429] == pytest.approx(1e-4)
    assert lr[430] == lr[859] == pytest.approx((1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 20)) + 1e-6)
    assert lr[-1] == pytest.approx((1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 19 / 20)) + 1e-6)


# --------------------------------------------------------------------------- the released configuration's step
def parity_step_setup(batch_size: int, device: str):
    """The released recipe's model (random weights, offline: BERT-base-sized text encoder with the `tiny`
    tokenizer) and a batch at its crop (112 x 256 x 352) with the four anatomies as blobs, some of them
    abnormal, and texts of realistic length; an optimiser over every parameter."""
    cfg = C.compose(config_file=str(CONFIGS / "experiment" / "fvlm_ctrate.yaml"), overrides=[
        "data.root=/unused", "method.image_encoder.pretrained=false",
        "method.text_encoder.model=tiny", "method.text_encoder.pretrained=false",
        "method.text_encoder.config_overrides={hidden_size: 768, num_attention_heads: 12, intermediate_size: 3072, "
        "num_hidden_layers: 12, max_position_embeddings: 512}"])
    torch.manual_seed(0)
    m = api.build_method(cfg).to(device).train()
    labels = torch.zeros(batch_size, 1, 112, 256, 352, dtype=torch.long)
    for i in range(batch_size):
        s = 4 * (i % 5)
        labels[i, 0, 20:90, 40 + s:210, 30:320] = 1  # lung (both sides as one box)
        labels[i, 0, 40:80, 100:180, 140 + s:240] = 2  # heart inside it
        labels[i, 0, 10:100, 170:180, 170:180] = 3  # esophagus
        labels[i, 0, 15:95, 150 + s:165 + s, 200:215] = 4  # aorta
    abnormal = torch.tensor([[i % 2 == 0, i % 3 == 0, i % 4 == 0, i % 2 == 1] for i in range(batch_size)])
    sentence = "Consolidation in the right lower lobe with air bronchograms and small pleural effusion. "
    texts = {a: [(sentence * 6 + f"case {i}.") if abnormal[i, k] else f"{a} shows no significant abnormalities."
                 for i in range(batch_size)] for k, a in enumerate(ANATOMIES)}
    tok = m.tokenizer(["report"] * batch_size, padding="max_length", max_length=32, return_tensors="pt")
    b = ImageTextBatch(images=torch.rand(batch_size, 1, 112, 256, 352, device=device),
                       input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device),
                       study_ids=[str(i) for i in range(batch_size)], anatomy_masks=labels.to(device),
                       anatomy_texts=texts, anatomy_abnormal=abnormal.to(device))
    return m, b, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01)


def timed_steps(m, b, opt, n: int, device: str, dtype: torch.dtype | None) -> list[float]:
    import time

    times = []
    for _ in range(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = m.losses(b)["itc"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        assert torch.isfinite(loss)
    return times


@pytest.mark.gpu
def test_a_bf16_step_at_the_released_batch_and_crop_reports_peak_memory():
    """B = 14 per GPU, A = 4, 112 x 256 x 352, bf16 autocast: finite loss, step time and peak memory printed."""
    m, b, opt = parity_step_setup(14, "cuda")
    torch.cuda.reset_peak_memory_stats()
    times = timed_steps(m, b, opt, 3, "cuda", torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"fVLM released configuration, B=14, bf16: step {min(times):.3f} s, peak GPU memory {peak:.1f} GiB")
    assert peak < torch.cuda.get_device_properties(0).total_memory / 2**30


@pytest.mark.slow
def test_cpu_step_time_of_the_released_configuration_at_batch_2():
    """The released configuration's fp32 training step at batch 2 on the CPU (printed; one warm-up step)."""
    m, b, opt = parity_step_setup(2, "cpu")
    times = timed_steps(m, b, opt, 3, "cpu", None)
    print(f"fVLM released configuration, B=2, fp32 on {torch.get_num_threads()} CPU threads: "
          f"steps {', '.join(f'{t:.1f}' for t in times)} s (median of the last two {np.median(times[1:]):.1f} s)")


# --------------------------------------------------------------------------- the command line on a CT-RATE layout
def test_fit_then_zeroshot_on_a_ct_rate_layout_with_masks_and_a_missing_mask_folder(tmp_path, capsys):
    """``medvlp fit --method fvlm --data ct_rate`` on a CT-RATE download with TotalSegmentator maps and fVLM's
    per-anatomy files (the tiny synthetic world), then ``medvlp zeroshot`` on the run; a mask folder that does
    not exist stops ``fit`` before anything is written, naming the path."""
    from medvlp.cli import main
    from medvlp.datamodules.demo import write_ct_demo

    root = write_ct_demo(tmp_path / "CT-RATE" / "dataset", size="tiny", seed=0)
    data = [f"data.root={root}", "data.anatomy_groups=fvlm4", "data.anatomy_text=fvlm", "data.spacing=[10.0,6.0,6.0]",
            "data.size=[32,64,64]", "data.max_length=96", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0",
            "data.prompts=fvlm_demo_ct.yaml", "data.eval_labels=[Cardiomegaly,Pleural effusion,Arterial wall calcification]",
            "data.eval_reconstructions=one"]
    run = [f"run.out_dir={tmp_path / 'runs'}", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
           "trainer.limit_val_batches=1"]
    assert main(["fit", "--method", "fvlm", "--data", "ct_rate", *data, "data.anatomy_dir=totalseg", *run]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'totalseg'} does not exist" in err and not (tmp_path / "runs").exists()
    assert main(["fit", "--method", "fvlm", "--data", "ct_rate", *data, "data.anatomy_dir=anatomy_masks", *run]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    assert main(["zeroshot", "--run", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "zero-shot AUROC" in out and "Arterial wall calcification" in out and "mean" in out


def test_unmerged_totalsegmentator_ids_are_a_clear_error():
    m = method()
    b = batch(m, 2)
    b.anatomy_masks[0, 0, 1, 1, 1] = 51  # a TotalSegmentator id left unmerged
    with pytest.raises(ValueError, match="holds the value 51.*data.anatomy_groups"):
        m.losses(b)

"""The parameter-free pseudo-mask processor (G2D, spec section 4 and the invariants of section 9)."""

from __future__ import annotations

import pytest
import torch

from medvlp.losses import pseudo_masks as pm
from medvlp.losses.pseudo_masks import PseudoMaskConfig, pseudo_masks

# The released code's recipe: nearest upsampling, strict ">", over every pixel, no body mask, no smoothing.
CODE = PseudoMaskConfig(upsample="nearest", body_mask=False, inclusive=False, over="all", smooth="none")
PLAIN_GE = PseudoMaskConfig(upsample="nearest", body_mask=False, inclusive=True, over="all", smooth="none")


def test_code_recipe_marks_exactly_nine_of_64_blocks():
    torch.manual_seed(0)
    attn = torch.rand(3, 4, 8, 8).softmax(dim=-1)  # no ties
    masks = pseudo_masks(attn, (256, 256), CODE)
    assert masks.shape == (3, 1, 256, 256)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    for m in masks[:, 0]:
        blocks = m.reshape(8, 32, 8, 32).permute(0, 2, 1, 3).reshape(64, -1)
        assert torch.all(blocks.min(dim=1).values == blocks.max(dim=1).values)  # every 32 x 32 block constant
        assert int(blocks[:, 0].sum()) == 9
        assert float(m.mean()) == pytest.approx(0.140625)
        # the nine blocks are the nine largest head-means
        top = attn.new_zeros(64)
    mean = attn.mean(dim=1).reshape(3, 64)
    for i in range(3):
        chosen = masks[i, 0].reshape(8, 32, 8, 32)[:, 0, :, 0].reshape(64).bool()
        assert set(chosen.nonzero().flatten().tolist()) == set(mean[i].topk(9).indices.tolist())
    del top


def test_threshold_by_hand_and_the_tie_rule():
    # 2 x 2 grid, nearest to 4 x 4: 16 values, four each of 0.1 .. 0.4. The 0.85 quantile sits at
    # position 0.85 * 15 = 12.75 between two 0.4s, so t = 0.4: ">=" keeps the 0.4 block, ">" keeps nothing.
    attn = torch.tensor([[0.1, 0.2], [0.3, 0.4]]).view(1, 1, 2, 2)
    ge = pseudo_masks(attn, (4, 4), PLAIN_GE)[0, 0]
    gt = pseudo_masks(attn, (4, 4), CODE)[0, 0]
    expect = torch.zeros(4, 4)
    expect[2:, 2:] = 1
    assert torch.equal(ge, expect)
    assert gt.sum() == 0
    # at q = 0.5 the threshold is the mean of the 8th and 9th values (0.2 and 0.3) = 0.25: both rules agree
    half = PseudoMaskConfig(**{**CODE.__dict__, "quantile": 0.5})
    expect = torch.zeros(4, 4)
    expect[2:] = 1
    assert torch.equal(pseudo_masks(attn, (4, 4), half)[0, 0], expect)
    assert torch.equal(pseudo_masks(attn, (4, 4), PseudoMaskConfig(**{**half.__dict__, "inclusive": True}))[0, 0], expect)


def test_all_equal_attention():
    attn = torch.full((2, 4, 7, 7), 1 / 50)
    assert pseudo_masks(attn, (28, 28), CODE).sum() == 0  # strict ">": nothing exceeds the threshold
    assert torch.all(pseudo_masks(attn, (28, 28), PLAIN_GE) == 1)  # ">=": everything reaches it
    img = torch.zeros(2, 1, 28, 28)
    img[:, :, 4:24, 6:22] = 1.0  # body
    body = pseudo_masks(attn, (28, 28), PseudoMaskConfig(smooth="none"), images=img)
    assert torch.equal(body[:, 0].bool(), img[:, 0].bool())  # ">=" over body pixels: exactly the body


def test_batch_independence_scale_and_head_order():
    torch.manual_seed(1)
    attn = torch.rand(5, 4, 6, 6)
    images = torch.rand(5, 1, 48, 48)
    cfg = PseudoMaskConfig()
    together = pseudo_masks(attn, (48, 48), cfg, images)
    for i in range(5):
        alone = pseudo_masks(attn[i : i + 1], (48, 48), cfg, images[i : i + 1])
        assert torch.allclose(together[i : i + 1], alone, atol=1e-6)
    changed = attn.clone()
    changed[0] = torch.rand(4, 6, 6)  # another image's attention does not affect the rest
    assert torch.allclose(pseudo_masks(changed, (48, 48), cfg, images)[1:], together[1:], atol=1e-6)
    assert torch.allclose(pseudo_masks(attn * 7.5, (48, 48), cfg, images), together, atol=1e-6)  # scale
    assert torch.allclose(pseudo_masks(attn[:, [2, 0, 3, 1]], (48, 48), cfg, images), together, atol=1e-6)  # heads


def test_no_parameters_and_no_gradient_through_the_targets():
    attn = torch.rand(2, 4, 4, 4, requires_grad=True)
    target = pseudo_masks(attn, (32, 32), PseudoMaskConfig(body_mask=False))
    assert not target.requires_grad and target.grad_fn is None
    logits = torch.zeros(2, 1, 32, 32, requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits * attn.sum(), target)
    loss.backward()
    grad_via_target = attn.grad.clone()
    # the same loss with the target as a plain constant gives the same gradient: none flows through it
    attn.grad = None
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits * attn.sum(), target.clone())
    loss.backward()
    assert torch.allclose(attn.grad, grad_via_target)
    assert not any(isinstance(v, torch.nn.Parameter) for v in vars(pm).values())


def test_paper_recipe_stays_inside_the_body_and_takes_the_top_15_percent():
    torch.manual_seed(2)
    img = torch.zeros(2, 1, 64, 64)
    img[:, :, 6:60, 8:56] = 0.8  # body
    img[:, :, 14:48, 14:30] = 0.2  # dark lung, enclosed by the body: still body
    attn = torch.rand(2, 4, 4, 4)
    attn[:, :, 0, 0] = 5.0  # high attention on the background corner
    masks = pseudo_masks(attn, (64, 64), PseudoMaskConfig(smooth="none"), images=img)
    body = pm.body_mask(img)[:, 0]
    assert torch.all(body[:, 20, 20]) and not torch.any(body[:, 1, 1])
    assert torch.all(masks[:, 0][~body] == 0)
    frac = masks[:, 0].sum(dim=(1, 2)) / body.sum(dim=(1, 2))
    assert torch.all(frac <= 0.152) and torch.all(frac >= 0.14)  # 15 % up to rounding of the count


def test_per_head_masks():
    attn = torch.rand(2, 3, 4, 4)
    masks = pseudo_masks(attn, (16, 16), PseudoMaskConfig(**{**CODE.__dict__, "aggregate": "none"}))
    assert masks.shape == (2, 3, 16, 16)
    for h in range(3):
        assert torch.equal(masks[:, h : h + 1], pseudo_masks(attn[:, h : h + 1], (16, 16), CODE))


def test_masked_quantile_matches_torch():
    torch.manual_seed(3)
    x = torch.randn(6, 50)
    valid = torch.rand(6, 50) > 0.3
    for q in (0.0, 0.15, 0.5, 0.85, 1.0):
        got = pm.masked_quantile(x, valid, q)
        for i in range(6):
            assert got[i] == pytest.approx(float(torch.quantile(x[i][valid[i]], q)), abs=1e-6)
    assert pm.masked_quantile(x, torch.zeros_like(valid), 0.5).isinf().all()


def test_otsu_splits_two_modes():
    torch.manual_seed(4)
    v = torch.cat([torch.randn(1, 500) * 0.05 + 0.2, torch.randn(1, 300) * 0.05 + 0.8], dim=1)
    t = float(pm.otsu_threshold(v)[0])
    assert float(v[0, :500].max()) <= t < float(v[0, 500:].min())  # separates the modes exactly


def test_fill_holes():
    m = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    m[0, 0, 2:8, 2:8] = True
    m[0, 0, 4:6, 4:6] = False  # hole
    m[0, 0, 0:3, 9] = True  # touches the border, not a hole
    filled = pm.fill_holes(m)
    assert filled[0, 0, 4:6, 4:6].all() and not filled[0, 0, 0, 0]
    assert int(filled.sum()) == 36 + 3


def test_bilateral_filter():
    flat = torch.full((1, 1, 12, 12), 0.7)
    assert torch.allclose(pm.bilateral_filter(flat, 5, 2.0, 0.5), flat)
    step = torch.zeros(1, 1, 12, 12)
    step[..., 6:] = 1
    out = pm.bilateral_filter(step, 5, 2.0, 0.5)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[..., :3], step[..., :3]) and torch.equal(out[..., 9:], step[..., 9:])  # far from the edge
    assert 0 < float(out[0, 0, 0, 5]) < 0.5 < float(out[0, 0, 0, 6]) < 1  # softened at the edge, same side
    soft = pseudo_masks(torch.rand(1, 1, 3, 3), (12, 12), PseudoMaskConfig(body_mask=False))
    hard = pseudo_masks(torch.rand(1, 1, 3, 3), (12, 12), PseudoMaskConfig(body_mask=False, rebinarize_at=0.5))
    assert soft.min() >= 0 and soft.max() <= 1
    assert set(hard.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("key,value", [("aggregate", "max"), ("upsample", "bicubic"), ("threshold", "gmm"),
                                       ("quantile", 1.5), ("bilateral_size", 4), ("over", "lungs")])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"pseudo_mask.{key}"):
        pseudo_masks(torch.rand(1, 1, 2, 2), (4, 4), PseudoMaskConfig(**{"body_mask": False, key: value}))


def test_body_mask_needs_images():
    with pytest.raises(ValueError, match="needs the images"):
        pseudo_masks(torch.rand(1, 1, 2, 2), (4, 4), PseudoMaskConfig())

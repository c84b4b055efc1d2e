"""MGCA's loss pieces against arithmetic written out by hand on tiny tensors.

Sinkhorn-Knopp (``medvlp.losses.sinkhorn``), swapped prototype prediction (CPA), the ITA term, and the
token-alignment pieces (word-piece merging, clipped weights, cross-modal summaries, token InfoNCE).
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medvlp.losses.prototype import swapped_prototype_loss
from medvlp.losses.sinkhorn import sinkhorn_knopp
from medvlp.losses.token_alignment import (
    clipped_token_weights,
    cross_modal_summary,
    cta_loss,
    masked_quantile,
    merge_word_pieces,
    token_contrastive_loss,
)


def ita_loss(*args, **kwargs):
    # imported lazily: the distributed test's worker processes import this module and should stay light
    from medvlp.methods.mgca import ita_loss as ita

    return ita(*args, **kwargs)


def ce(logits, target):
    """-log softmax(logits)[target], written out."""
    return -logits[target] + math.log(sum(math.exp(z) for z in logits))


def unit(*xs):
    n = math.sqrt(sum(x * x for x in xs))
    return [x / n for x in xs]


# --------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_one_iteration_by_hand():
    # exp(S / eps) with eps = 1: sample 0 -> [1, 2], sample 1 -> [3, 1].  Q = exp(S)^T (K x B):
    #   Q = [[1, 3], [2, 1]] / 7
    # rows to 1/K = 1/2: row 0 *= (1/2) / (4/7) -> [1/8, 3/8]; row 1 *= (1/2) / (3/7) -> [1/3, 1/6]
    # columns to 1/B = 1/2: col 0 sum 11/24 -> * 12/11 -> [3/22, 4/11]; col 1 sum 13/24 -> * 12/13 -> [9/26, 2/13]
    # final: each column / its sum (1/2) -> sample 0 [3/11, 8/11], sample 1 [9/13, 4/13]
    scores = torch.log(torch.tensor([[1.0, 2.0], [3.0, 1.0]]))
    codes = sinkhorn_knopp(scores, epsilon=1.0, n_iters=1)
    expected = torch.tensor([[3 / 11, 8 / 11], [9 / 13, 4 / 13]])
    assert torch.allclose(codes, expected, atol=1e-6)
    # a constant shift of the scores changes nothing (Q is normalised)
    assert torch.allclose(sinkhorn_knopp(scores + 5.0, epsilon=1.0, n_iters=1), expected, atol=1e-6)


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    b, k = 72, 500
    emb = F.normalize(torch.randn(b, 128), dim=1)
    protos = F.normalize(torch.randn(k, 128), dim=1)
    scores = (emb @ protos.T).requires_grad_(True)
    codes = sinkhorn_knopp(scores, epsilon=0.05, n_iters=3)
    assert not codes.requires_grad
    assert torch.allclose(codes.sum(1), torch.ones(b), atol=1e-5)  # every sample's code sums to 1
    ratio = codes.sum(0) / (b / k)  # prototype marginal ~ uniform (spec: 0.997 - 1.002 x B / K)
    assert ratio.min() > 0.98 and ratio.max() < 1.02, (ratio.min(), ratio.max())
    exact = sinkhorn_knopp(scores, epsilon=0.05, n_iters=50)  # converged: both marginals exact
    assert torch.allclose(exact.sum(0), torch.full((k,), b / k), rtol=1e-3)


def _sinkhorn_worker(rank, world, init_file, scores, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    half = scores.shape[0] // world
    out[rank] = sinkhorn_knopp(scores[rank * half:(rank + 1) * half], 0.05, 3, distributed=True)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_sinkhorn_equals_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    scores = F.normalize(torch.randn(8, 16), dim=1) @ F.normalize(torch.randn(5, 16), dim=1).T
    full = sinkhorn_knopp(scores, 0.05, 3)
    out = mp.Manager().dict()
    mp.spawn(_sinkhorn_worker, args=(2, str(tmp_path / "init"), scores, out), nprocs=2, join=True)
    assert torch.allclose(torch.cat([out[0], out[1]]), full, atol=1e-6)
    assert not torch.allclose(torch.cat([sinkhorn_knopp(scores[:4], 0.05, 3), sinkhorn_knopp(scores[4:], 0.05, 3)]), full, atol=1e-3)


# --------------------------------------------------------------------------- CPA
def test_cpa_by_hand_and_symmetric():
    # image scores: exp -> [[1, 2], [3, 1]] -> codes (eps 1, 1 iteration) [[3/11, 8/11], [9/13, 4/13]] (above)
    # report scores 0 -> uniform codes [1/2, 1/2] and uniform predictions [1/2, 1/2]
    # image predictions (tau 1): softmax(log [1, 2]) = [1/3, 2/3]; softmax(log [3, 1]) = [3/4, 1/4]
    # H(q_img, P_txt) = log 2 for both samples
    # H(q_txt, P_img): sample 0 = -(log(1/3) + log(2/3)) / 2; sample 1 = -(log(3/4) + log(1/4)) / 2
    img = torch.log(torch.tensor([[1.0, 2.0], [3.0, 1.0]]))
    txt = torch.zeros(2, 2)
    h_i2t = math.log(2)
    h_t2i = (-(math.log(1 / 3) + math.log(2 / 3)) / 2 - (math.log(3 / 4) + math.log(1 / 4)) / 2) / 2
    expected = (h_i2t + h_t2i) / 2
    loss, img_codes, txt_codes = swapped_prototype_loss(img, txt, temperature=1.0, epsilon=1.0, n_iters=1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(txt_codes, torch.full((2, 2), 0.5))
    swapped, _, _ = swapped_prototype_loss(txt, img, temperature=1.0, epsilon=1.0, n_iters=1)
    assert swapped.item() == pytest.approx(loss.item(), abs=1e-7)


def test_cpa_at_init_is_log_k_and_only_predictions_carry_gradient():
    torch.manual_seed(0)
    k = 500
    protos = F.normalize(torch.randn(k, 128), dim=1)
    img = F.normalize(torch.randn(72, 128), dim=1).requires_grad_(True)
    txt = F.normalize(torch.randn(72, 128), dim=1).requires_grad_(True)
    loss, codes, _ = swapped_prototype_loss(img @ protos.T, txt @ protos.T, 0.2, 0.05, 3)
    assert abs(loss.item() - math.log(k)) < 0.2  # spec: ~6.31 for K = 500
    assert not codes.requires_grad
    loss.backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


# --------------------------------------------------------------------------- ITA
def test_ita_by_hand_sum_and_mean():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # tau = 0.5: logits = 2 * img @ txt^T = [[2, 1.2], [0, 1.6]]
    i2t = (ce([2.0, 1.2], 0) + ce([0.0, 1.6], 1)) / 2  # rows
    t2i = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2  # columns
    assert ita_loss(img, txt, 0.5, "sum").item() == pytest.approx(i2t + t2i, abs=1e-6)
    assert ita_loss(img, txt, 0.5, "mean").item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert ita_loss(txt, img, 0.5, "sum").item() == pytest.approx(i2t + t2i, abs=1e-6)  # symmetric


def test_ita_at_init_near_analytic_value():
    torch.manual_seed(0)
    b = 64
    img, txt = F.normalize(torch.randn(b, 128), dim=1), F.normalize(torch.randn(b, 128), dim=1)
    # near-zero logits: each direction is log B, the official sum 2 log B
    assert ita_loss(img, txt, 1e4, "sum").item() == pytest.approx(2 * math.log(b), abs=1e-3)
    # tau 0.07, isotropic d = 128: each direction ~ log B + 1 / (2 d tau^2) (spec: ~9.7 at B = 64)
    assert abs(ita_loss(img, txt, 0.07, "sum").item() - 2 * (math.log(b) + 1 / (2 * 128 * 0.07**2))) < 0.6
    # identical embeddings with a small tau: ~0; a shuffled pairing: large
    assert ita_loss(img, img, 0.01).item() < 1e-3
    assert ita_loss(img, img.roll(1, 0), 0.07).item() > 10


# --------------------------------------------------------------------------- words and weights
# toy vocabulary: 0 [PAD], 1 [CLS], 2 [SEP], 3 "pneumo", 4 "##thorax", 5 "left"
IS_CONT = torch.tensor([False, False, False, False, True, False])


def test_merge_word_pieces_by_hand():
    ids = torch.tensor([[1, 3, 4, 5, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    tokens = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]]).unsqueeze(-1)  # feature of token k = 2^k
    importance = torch.tensor([[0.5, 0.1, 0.05, 0.15, 0.2, 0.0, 0.0]])
    w = merge_word_pieces(tokens, ids, mask, IS_CONT, sep_token_id=2, importance=importance)
    # [CLS] dropped; "pneumo ##thorax" = 2 + 4; "left" = 8; [SEP] = 16; then 3 empty slots (T - 1 = 6)
    assert w.features.squeeze(-1).tolist() == [[6.0, 8.0, 16.0, 0.0, 0.0, 0.0]]
    assert w.mask.tolist() == [[True, True, True, False, False, False]]
    assert torch.allclose(w.importance, torch.tensor([[0.15, 0.15, 0.2, 0, 0, 0]]))
    # official off-by-one: token k carries the importance of token k + 1 -> [SEP] gets the (zero) pad attention
    s = merge_word_pieces(tokens, ids, mask, IS_CONT, sep_token_id=2, importance=importance, shift=True)
    assert torch.equal(s.features, w.features)
    assert torch.allclose(s.importance, torch.tensor([[0.05 + 0.15, 0.2, 0.0, 0, 0, 0]]))
    d = merge_word_pieces(tokens, ids, mask, IS_CONT, sep_token_id=2, importance=importance, drop_sep=True)
    assert d.mask.tolist() == [[True, True, False, False, False, False]]
    assert d.features.squeeze(-1).tolist() == [[6.0, 8.0, 0.0, 0.0, 0.0, 0.0]]


def test_merge_word_pieces_full_sequence_with_official_shift_loses_last_word():
    ids = torch.tensor([[1, 3, 4, 5, 2]])  # fills all T = 5 positions
    mask = torch.ones(1, 5, dtype=torch.long)
    tokens = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]]).unsqueeze(-1)
    fixed = merge_word_pieces(tokens, ids, mask, IS_CONT, 2)
    assert fixed.features.squeeze(-1).tolist() == [[6.0, 8.0, 16.0, 0.0]]
    # the official loop visits T - 1 tokens and flushes a word at the next one: "left" and [SEP] vanish
    shifted = merge_word_pieces(tokens, ids, mask, IS_CONT, 2, shift=True)
    assert shifted.features.squeeze(-1).tolist() == [[6.0, 0.0, 0.0, 0.0]]
    assert shifted.mask.tolist() == [[True, False, False, False]]


def test_merge_word_pieces_gradient_reaches_each_sub_token():
    ids = torch.tensor([[1, 3, 4, 5, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    tokens = torch.randn(1, 6, 3, requires_grad=True)
    merge_word_pieces(tokens, ids, mask, IS_CONT, 2).features.sum().backward()
    # [CLS] (its own dropped word) and the padding get no gradient; every other token gets 1
    assert tokens.grad[0, :, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_clipped_token_weights_by_hand():
    imp = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.25], [0.3, 0.0, 0.1, 0.2, 0.4]])
    valid = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    w = clipped_token_weights(imp, valid, 0.1, 0.9)
    # row 0: entries 0.1..0.4 (n = 4): q10 at 0.3 -> 0.1 + 0.3 * 0.1 = 0.13; q90 at 2.7 -> 0.3 + 0.7 * 0.1 = 0.37
    # clipped [0.13, 0.2, 0.3, 0.37] sums to 1; the masked entry is exactly 0
    assert torch.allclose(w[0], torch.tensor([0.13, 0.2, 0.3, 0.37, 0.0]), atol=1e-6)
    assert w[0, 4].item() == 0.0
    # row 1: the zero entry is ignored (official: nonzero()); non-zero [0.1, 0.2, 0.3, 0.4] -> same clipping
    assert torch.allclose(w[1], torch.tensor([0.3, 0.0, 0.13, 0.2, 0.37]), atol=1e-6)
    assert w[1, 1].item() == 0.0
    # [0, 1] = no clipping: plain normalisation
    assert torch.allclose(clipped_token_weights(imp, valid, 0.0, 1.0)[0], torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]), atol=1e-6)


def test_masked_quantile_matches_torch_quantile():
    torch.manual_seed(0)
    x = torch.rand(6, 11)
    valid = torch.rand(6, 11) > 0.3
    valid[:, 0] = True
    for q in (0.1, 0.5, 0.9):
        ours = masked_quantile(x, valid, q)
        ref = torch.stack([torch.quantile(x[i][valid[i]], q) for i in range(6)])
        assert torch.allclose(ours, ref, atol=1e-6)


# --------------------------------------------------------------------------- CTA
def test_cross_modal_summary_by_hand_and_masked_keys_get_zero():
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # tau 1: attention [e, 1] / (e + 1); summary = attention-weighted keys
    a0, a1 = math.e / (math.e + 1), 1 / (math.e + 1)
    out = cross_modal_summary(q, k, 1.0, normalize=False)
    assert torch.allclose(out, torch.tensor([[[a0, a1]]]), atol=1e-6)
    assert torch.allclose(cross_modal_summary(q, k, 1.0), torch.tensor([[unit(a0, a1)]]), atol=1e-6)
    masked = cross_modal_summary(q, k, 1.0, key_mask=torch.tensor([[True, False]]), normalize=False)
    assert torch.equal(masked, torch.tensor([[[1.0, 0.0]]]))  # the padding key has probability exactly 0
    k2 = k.clone()
    k2[0, 1] = torch.tensor([5.0, -3.0])  # whatever the padding key holds
    assert torch.equal(cross_modal_summary(q, k2, 1.0, key_mask=torch.tensor([[True, False]])), F.normalize(masked, dim=-1))


def test_token_contrastive_loss_by_hand():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    summaries = torch.tensor([[[0.6, 0.8], [0.0, 1.0]]])
    weights = torch.tensor([[0.25, 0.75]])
    # Z[j, m] = <token j, summary m> (tau 1) = [[0.6, 0.0], [0.8, 1.0]]
    row = [ce([0.6, 0.0], 0), ce([0.8, 1.0], 1)]  # token j picks summary j
    col = [ce([0.6, 0.8], 0), ce([0.0, 1.0], 1)]  # summary m picks token m
    expected = 0.25 * (row[0] + col[0]) / 2 + 0.75 * (row[1] + col[1]) / 2
    assert token_contrastive_loss(tokens, summaries, weights, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # symmetric in (tokens, summaries): rows and columns swap
    assert token_contrastive_loss(summaries, tokens, weights, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # near-zero logits: every CE is log N; weights summing to 1 -> log N
    t = F.normalize(torch.randn(3, 7, 4), dim=-1)
    s = F.normalize(torch.randn(3, 7, 4), dim=-1)
    w = torch.full((3, 7), 1 / 7)
    assert token_contrastive_loss(t, s, w, 1e5).item() == pytest.approx(math.log(7), abs=1e-3)


def test_padding_candidates_masked_equal_the_unpadded_problem():
    torch.manual_seed(0)
    t = F.normalize(torch.randn(2, 4, 3), dim=-1)
    s = F.normalize(torch.randn(2, 4, 3), dim=-1)
    w = torch.tensor([[0.2, 0.3, 0.5, 0.0], [0.2, 0.3, 0.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]] * 2)
    masked = token_contrastive_loss(t, s, w, 0.1, candidate_mask=mask)
    assert masked.item() == pytest.approx(token_contrastive_loss(t[:, :3], s[:, :3], w[:, :3], 0.1).item(), abs=1e-5)
    # without the mask (official) the padding slot is a candidate and the loss differs
    assert token_contrastive_loss(t, s, w, 0.1).item() != pytest.approx(masked.item(), abs=1e-4)


def test_cta_word_and_patch_terms_by_hand():
    # one pair, two words, two patches, tau = 1
    w0, w1 = [1.0, 0.0], [0.0, 1.0]
    p0, p1 = [1.0, 0.0], [0.6, 0.8]
    dot = lambda a, b: a[0] * b[0] + a[1] * b[1]  # noqa: E731

    def summary(q, keys, normalize):
        e = [math.exp(dot(q, k)) for k in keys]
        v = [sum(ei * k[i] for ei, k in zip(e, keys)) / sum(e) for i in range(2)]
        return unit(*v) if normalize else v

    c = [summary(w0, [p0, p1], True), summary(w1, [p0, p1], True)]  # word -> patch summaries (normalised)
    zw = [[dot(w, cm) for cm in c] for w in (w0, w1)]
    word = 0.5 * (ce(zw[0], 0) + ce([zw[0][0], zw[1][0]], 0)) / 2 + 0.5 * (ce(zw[1], 1) + ce([zw[0][1], zw[1][1]], 1)) / 2
    e = [summary(p0, [w0, w1], False), summary(p1, [w0, w1], False)]  # patch -> word, ViT: not normalised
    zp = [[dot(p, en) for en in e] for p in (p0, p1)]
    patch = 0.4 * (ce(zp[0], 0) + ce([zp[0][0], zp[1][0]], 0)) / 2 + 0.6 * (ce(zp[1], 1) + ce([zp[0][1], zp[1][1]], 1)) / 2
    loss_word, loss_patch = cta_loss(
        torch.tensor([[w0, w1]]), torch.tensor([[True, True]]), torch.tensor([[0.5, 0.5]]),
        torch.tensor([[p0, p1]]), torch.tensor([[0.4, 0.6]]), temperature=1.0, normalize_patch_summary=False,
    )
    assert loss_word.item() == pytest.approx(word, abs=1e-5)
    assert loss_patch.item() == pytest.approx(patch, abs=1e-5)
    only_word, none = cta_loss(torch.tensor([[w0, w1]]), torch.tensor([[True, True]]), torch.tensor([[0.5, 0.5]]),
                               torch.tensor([[p0, p1]]), torch.tensor([[0.4, 0.6]]), 1.0, bidirectional=False)
    assert none is None and only_word.item() == pytest.approx(word, abs=1e-5)


def test_cta_padding_words_change_nothing_in_the_patch_term():
    torch.manual_seed(0)
    words = F.normalize(torch.randn(2, 5, 8), dim=-1)
    patches = F.normalize(torch.randn(2, 6, 8), dim=-1)
    mask = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    ww = clipped_token_weights(torch.rand(2, 5), mask)
    pw = torch.full((2, 6), 1 / 6)
    _, patch = cta_loss(words, mask, ww, patches, pw, 0.1)
    other = words.clone()
    other[~mask] = F.normalize(torch.randn(int((~mask).sum()), 8), dim=-1)
    _, patch2 = cta_loss(other, mask, ww, patches, pw, 0.1)
    assert patch.item() == pytest.approx(patch2.item(), abs=1e-6)
    assert (ww[~mask] == 0).all()

"""Token-wise cross-modal alignment (MGCA's CTA term) and its pieces.

Reference: Wang et al. 2022, "Multi-Granularity Cross-modal Alignment for Generalized Medical Visual
Representation Learning" (MGCA, arXiv 2210.06044), section 3.2; official code
``HKU-MedAI/MGCA: mgca/models/mgca/mgca_module.py`` (``MGCA.forward``, token-level part) and
``mgca/models/backbones/encoder.py`` (``BertEncoder.aggregate_tokens``).

Pieces, each usable on its own:

* :func:`merge_word_pieces` - sum WordPiece sub-tokens (``pneumo ##thorax``) into words, drop the
  [CLS] slot, zero the slots after [SEP]: ``[B, T, D]`` tokens -> ``[B, T - 1, D]`` words + mask.
* :func:`clipped_token_weights` - token importance from [CLS] attention, clipped per sample to its
  [10th, 90th] percentile and normalised to sum 1; masked and zero entries get exactly 0.
* :func:`cross_modal_summary` - parameter-free cross-attention: each query token attends over the
  tokens of the *other* modality of the *same* pair (``softmax(<q, k> / tau)``, values = keys).
* :func:`token_contrastive_loss` - each token must pick its own cross-modal summary among the
  summaries of the other tokens of the same pair (and vice versa), weighted by importance.
* :func:`cta_loss` - the two directions of MGCA: words -> patches and patches -> words.

Differences from the official code: fully vectorised (the official loops over samples and
tokens in Python, spec quirk Q9); masked logits use the dtype's most negative finite value instead
of ``-inf`` so that an all-masked row gives a uniform (not NaN) distribution - rows with at least
one valid key are unchanged (the masked entries get probability exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


# --------------------------------------------------------------------------- words
def continuation_table(tokenizer: Any) -> Tensor:
    """``[V]`` bool: True for WordPiece continuation tokens (``##xx``) of ``tokenizer``'s vocabulary."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
    for token, idx in vocab.items():
        if token.startswith("##"):
            table[idx] = True
    return table


@dataclass
class Words:
    """Word-level features after merging sub-tokens.

    Shapes:
        features: ``[B, W, D]`` with ``W = T - 1`` slots; slot ``j`` = the ``(j + 1)``-th word after
            [CLS] ([SEP] is a word of its own unless dropped); empty slots hold zeros.
        mask: ``[B, W]`` bool, True = the slot holds a word (False = padding).
        importance: ``[B, W]`` summed token importance of each word (0 on empty slots).
    """

    features: Tensor
    mask: Tensor
    importance: Tensor


def merge_word_pieces(
    tokens: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    is_continuation: Tensor,
    sep_token_id: int,
    importance: Tensor | None = None,
    shift: bool = False,
    drop_sep: bool = False,
) -> Words:
    """Sum sub-token features (and importances) into words, as ``BertEncoder.aggregate_tokens``.

    A token whose string starts with ``##`` joins the current word; any other token starts a new
    word. Position 0 ([CLS]) is always a word of its own and is dropped from the output (it is the
    report's global feature). Aggregation stops at the first [SEP] (kept as its own word unless
    ``drop_sep``); later slots are zero and masked.

    Args:
        tokens: ``[B, T, D]`` last-layer token features (``T`` includes [CLS] and padding).
        input_ids: ``[B, T]`` token ids; ``attention_mask``: ``[B, T]`` 1 = real token.
        is_continuation: ``[V]`` bool lookup (see :func:`continuation_table`).
        sep_token_id: id of [SEP]; a sequence without one ends at its last real token.
        importance: ``[B, T]`` per-token importance (MGCA: head-averaged last-layer [CLS] attention);
            ``None`` = zeros.
        shift: reproduce the official off-by-one (spec quirk Q3): token ``k`` carries the importance of
            token ``k + 1``, and a sequence that fills all ``T`` positions loses its last word and its
            [SEP] (the official loop only visits ``T - 1`` tokens and flushes a word at the next one).
        drop_sep: leave [SEP] out of the words (it becomes padding).

    Returns:
        :class:`Words` with ``features`` ``[B, T - 1, D]``, ``mask`` / ``importance`` ``[B, T - 1]``.
    """
    b, t, d = tokens.shape
    device = tokens.device
    pos = torch.arange(t, device=device).unsqueeze(0)  # [1, T]
    valid = attention_mask.bool()
    is_sep = (input_ids == sep_token_id) & valid
    last_real = valid.long().sum(1) - 1
    end = torch.where(is_sep.any(1), is_sep.long().argmax(1), last_real)  # first [SEP] (argmax: first max)
    keep = valid & (pos <= end.unsqueeze(1))
    start = ~is_continuation.to(device)[input_ids]
    start[:, 0] = True
    importance = tokens.new_zeros(b, t, dtype=torch.float32) if importance is None else importance.detach().float()
    if shift:
        importance = torch.cat([importance[:, 1:], importance.new_zeros(b, 1)], dim=1)
        keep = keep & (pos < t - 1)
    word_id = torch.cumsum((start & keep).long(), dim=1) - 1  # [B, T], valid where keep
    if shift and t >= 2:
        cut = (end == t - 1).unsqueeze(1)  # the loop never reached the token after position T - 2
        keep = keep & ~(cut & (word_id == word_id[:, t - 2 : t - 1]))
    if drop_sep:
        keep = keep & ~is_sep
    index = torch.where(keep, word_id, torch.full_like(word_id, t))  # dropped tokens -> dump slot T
    feats = tokens.new_zeros(b, t + 1, d).scatter_add(1, index.unsqueeze(-1).expand(b, t, d), tokens)
    count = torch.zeros(b, t + 1, device=device).scatter_add(1, index, keep.float())
    imp = importance.new_zeros(b, t + 1).scatter_add(1, index, importance * keep)
    return Words(features=feats[:, 1:t], mask=count[:, 1:t] > 0, importance=imp[:, 1:t])


# --------------------------------------------------------------------------- weights
@torch.no_grad()
def masked_quantile(x: Tensor, valid: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile ``[B]`` of the ``valid`` entries of ``x`` ``[B, N]``.

    Linear interpolation between order statistics, as ``torch.quantile`` (position ``q * (n - 1)``).
    Rows without a valid entry return a meaningless value (callers mask them).
    """
    big = torch.finfo(x.dtype).max
    ordered = x.masked_fill(~valid, big).sort(dim=1).values
    n = valid.long().sum(1)
    where = q * (n - 1).clamp(min=0).to(x.dtype)
    lo = where.floor().long()
    hi = where.ceil().long()
    v_lo = ordered.gather(1, lo.unsqueeze(1)).squeeze(1)
    v_hi = ordered.gather(1, hi.unsqueeze(1)).squeeze(1)
    frac = where - lo.to(x.dtype)
    return torch.where(lo == hi, v_lo, v_lo + (v_hi - v_lo) * frac)


@torch.no_grad()
def clipped_token_weights(importance: Tensor, valid: Tensor | None = None, low: float = 0.1, high: float = 0.9) -> Tensor:
    """Token weights ``[B, N]`` from importances: percentile-clipped per sample, rows summing to 1.

    Entries that are masked out (``valid`` False) or exactly zero (the official code clips
    ``nonzero()`` entries) get weight exactly 0 and do not enter the percentiles. The others are
    clipped to ``[quantile(low), quantile(high)]`` of the sample's entries and divided by the row sum.
    ``low=0, high=1`` turns the clipping off. No gradient.

    Args:
        importance: ``[B, N]`` non-negative importances (e.g. [CLS] attention averaged over heads).
        valid: ``[B, N]`` bool, False = padding / excluded token; ``None`` = all valid.
        low, high: the clipping percentiles as fractions (MGCA: 0.1 and 0.9).

    Returns:
        ``[B, N]`` float32 weights; a row without any valid entry is all zero.
    """
    imp = importance.detach().float()
    ok = imp > 0 if valid is None else valid.bool() & (imp > 0)
    lo = masked_quantile(imp, ok, low).unsqueeze(1)
    hi = masked_quantile(imp, ok, high).unsqueeze(1)
    w = torch.where(ok, torch.minimum(torch.maximum(imp, lo), hi), torch.zeros_like(imp))
    return w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


# --------------------------------------------------------------------------- alignment
def cross_modal_summary(
    queries: Tensor, keys: Tensor, temperature: float, key_mask: Tensor | None = None, normalize: bool = True
) -> Tensor:
    """Parameter-free cross-attention within each pair: ``softmax_k(<q, k> / tau) @ keys``.

    Args:
        queries: ``[B, Nq, D]`` unit token embeddings of one modality.
        keys: ``[B, Nk, D]`` unit token embeddings of the other modality (also the values).
        temperature: tau (MGCA tau2 = 0.1).
        key_mask: ``[B, Nk]`` bool, False = padding key (gets probability exactly 0).
        normalize: L2-normalise the summaries.

    Returns:
        ``[B, Nq, D]`` summaries: for each query, the attention-weighted mean of its pair's keys.
    """
    sim = queries @ keys.transpose(1, 2) / temperature  # [B, Nq, Nk]
    if key_mask is not None:
        sim = sim.masked_fill(~key_mask.bool().unsqueeze(1), torch.finfo(sim.dtype).min)
    out = sim.softmax(dim=-1) @ keys
    return F.normalize(out, dim=-1) if normalize else out


def token_contrastive_loss(
    tokens: Tensor, summaries: Tensor, weights: Tensor, temperature: float, candidate_mask: Tensor | None = None
) -> Tensor:
    """Importance-weighted, bidirectional InfoNCE between tokens and their own summaries.

    ``Z[b, j, m] = <tokens[b, j], summaries[b, m]> / tau``. Row direction: token ``j`` must pick
    summary ``j`` among the ``N`` summaries of the same pair; column direction: summary ``j`` must
    pick token ``j`` among the ``N`` tokens. Loss
    ``(1 / B) * sum_{b, j} weights[b, j] * (CE_row[b, j] + CE_col[b, j]) / 2``.

    Args:
        tokens: ``[B, N, D]`` unit token embeddings.
        summaries: ``[B, N, D]`` their cross-modal summaries (row ``j`` summarises token ``j``).
        weights: ``[B, N]`` token weights (MGCA: rows sum to 1, 0 on padding).
        temperature: tau (MGCA tau2 = 0.1).
        candidate_mask: ``[B, N]`` bool; when given, tokens / summaries that are False are removed
            from the candidates of every *other* row and column (the official code keeps padding as
            candidates: ``mask_pad_candidates=False``).

    Returns:
        Scalar loss.
    """
    b, n, _ = tokens.shape
    sim = tokens @ summaries.transpose(1, 2) / temperature  # [B, N, N]
    if candidate_mask is not None:
        ok = candidate_mask.bool()
        bad = ~(ok.unsqueeze(1) & ok.unsqueeze(2)) & ~torch.eye(n, dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(bad, torch.finfo(sim.dtype).min)
    targets = torch.arange(n, device=sim.device).repeat(b)
    ce_row = F.cross_entropy(sim.reshape(b * n, n), targets, reduction="none").view(b, n)
    ce_col = F.cross_entropy(sim.transpose(1, 2).reshape(b * n, n), targets, reduction="none").view(b, n)
    return (weights.to(ce_row.dtype) * (ce_row + ce_col) / 2).sum() / b


def cta_loss(
    word_emb: Tensor,
    word_mask: Tensor,
    word_weights: Tensor,
    patch_emb: Tensor,
    patch_weights: Tensor,
    temperature: float = 0.1,
    bidirectional: bool = True,
    normalize_patch_summary: bool = True,
    mask_pad_candidates: bool = False,
    word_summaries: Tensor | None = None,
    patch_summaries: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """MGCA's cross-modal token alignment: ``(L_word, L_patch)`` (``L_patch`` None if not bidirectional).

    Words -> patches: each word (padding slots included, as the official code) attends over the
    patches of its own image; its summary is L2-normalised. Patches -> words: each patch attends
    over the non-padding words of its own report; the summary is normalised only when
    ``normalize_patch_summary`` (official: ResNet yes, ViT no - spec quirk Q5). Each direction is
    then a :func:`token_contrastive_loss` weighted by the token weights.

    Args:
        word_emb: ``[B, W, D]`` unit word embeddings; ``word_mask``: ``[B, W]`` bool, True = word.
        word_weights: ``[B, W]`` word weights (0 on padding), e.g. :func:`clipped_token_weights`.
        patch_emb: ``[B, P, D]`` unit patch embeddings; ``patch_weights``: ``[B, P]``.
        temperature: tau2 of both the attention and the contrast (MGCA 0.1).
        bidirectional: also compute the patch term (MGCA default True).
        normalize_patch_summary: L2-normalise the patch -> word summaries.
        mask_pad_candidates: exclude padding word slots from the word-loss candidates.
        word_summaries / patch_summaries: ``[B, W, D]`` / ``[B, P, D]`` precomputed (e.g. learnable
            cross-attention) summaries before normalisation; ``None`` = the parameter-free attention.

    Returns:
        ``(loss_word, loss_patch)``; CTA = their sum.
    """
    if word_summaries is None:
        word_summaries = cross_modal_summary(word_emb, patch_emb, temperature, normalize=False)
    word_summaries = F.normalize(word_summaries, dim=-1)
    loss_word = token_contrastive_loss(word_emb, word_summaries, word_weights, temperature,
                                       candidate_mask=word_mask if mask_pad_candidates else None)
    if not bidirectional:
        return loss_word, None
    if patch_summaries is None:
        patch_summaries = cross_modal_summary(patch_emb, word_emb, temperature, key_mask=word_mask, normalize=False)
    if normalize_patch_summary:
        patch_summaries = F.normalize(patch_summaries, dim=-1)
    loss_patch = token_contrastive_loss(patch_emb, patch_summaries, patch_weights, temperature)
    return loss_word, loss_patch

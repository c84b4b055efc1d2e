"""MGCA: Multi-Granularity Cross-modal Alignment (Wang et al., NeurIPS 2022).

Paper: https://arxiv.org/abs/2210.06044. Official code: ``HKU-MedAI/MGCA``
(``mgca/models/mgca/mgca_module.py``, ``mgca/models/backbones/encoder.py``). Spec:
``specs/methods/mgca.md``. Three terms on every batch, each logged as ``train/loss_<name>``:

* ``ita`` - instance-wise image-report InfoNCE on the 128-d global embeddings (tau1 = 0.07, the sum
  of both directions, per-GPU negatives);
* ``cta`` - token-wise alignment: words attend over their image's patches and patches over their
  report's words; each token is contrasted with its own cross-modal summary against the summaries of
  the other tokens of the same pair, weighted by last-layer [CLS] attention (tau2 = 0.1);
  :mod:`medvlp.losses.token_alignment`;
* ``cpa`` - prototype alignment: SwAV-style swapped prediction of Sinkhorn codes over K = 500 shared
  prototypes (tau3 = 0.2, epsilon = 0.05, 3 iterations); :mod:`medvlp.losses.prototype`.

The word (``train/loss_cta_word``) and patch (``train/loss_cta_patch``) halves of CTA and the
in-batch retrieval accuracy (``train/inbatch_acc1``, ``train/inbatch_acc5``, mean of both directions,
as the official ``acc1`` / ``acc5``) are logged as well.

Config keys (``method.*``, :class:`MGCAConfig`): ``embed_dim``, ``proj_hidden_dim``,
``ita_temperature``, ``cta_temperature``, ``cpa_temperature``, ``num_prototypes``,
``sinkhorn_epsilon``, ``sinkhorn_iterations``, ``freeze_prototypes_epochs``, ``ita_start_epoch``,
``cta_start_epoch``, ``cpa_start_epoch``, ``bidirectional``, ``token_weight_percentiles``,
``cnn_local_layer``, ``cnn_input_size``, the parity flags of spec section 11 and ``loss_weights``.

Image encoders: a timm ViT (patch tokens, patch weights from its last block's [CLS] attention) or a
timm CNN (local features = the cells of ``cnn_local_layer``, e.g. ResNet-50 ``layer3``; uniform
patch weights; global = pooled last feature map).

Differences from the official code:
    * Parity defaults reproduce the official behaviour (6-layer text encoder, ITA as a sum, per-GPU
      negatives and Sinkhorn, parameter-free token attention, 10-90 % clipped weights with the
      off-by-one shift Q3, [SEP] as a word, padding words as candidates, unnormalised ViT patch
      summaries); each quirk has a flag that fixes it.
    * The two unused ``nn.MultiheadAttention`` layers and BERT's cross-attention sub-layers are not
      created (spec Q1/Q2); ``learnable_token_attention=true`` creates and uses the two attention
      layers (the paper's description, spec D2).
    * Word aggregation, percentile clipping and weights are vectorised; no anomaly detection (Q9).
    * The last-layer [CLS] attention of the text encoder is recomputed from the inputs of its last
      self-attention module (the encoder keeps fused SDPA attention, which returns no probabilities).
    * Prototype rows are also normalised at construction, so they are exactly constant during the
      freeze epochs (the official normalises them at the first forward pass).
    * Each term can be switched on from a given epoch (``*_start_epoch``; official: all from 0).
    * The ResNet resize to 299 px happens in the method (``cnn_input_size``), not in the encoder, so
      downstream protocols that use the bare encoder must resize themselves for parity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageTextBatch, TokenAlignment
from medvlp.config import ImageEncoderConfig, MethodConfig, TextEncoderConfig, TimmEncoderConfig, bounded
from medvlp.distributed import world
from medvlp.encoders.text import LastTextAttentionRecorder
from medvlp.encoders.text import last_self_attention as text_last_self_attention
from medvlp.losses.contrastive import clip_loss
from medvlp.losses.prototype import swapped_prototype_loss
from medvlp.losses.token_alignment import (
    clipped_token_weights,
    continuation_table,
    cta_loss,
    merge_word_pieces,
)
from medvlp.methods.base import VLPMethod
from medvlp.registry import register_method

log = logging.getLogger(__name__)

TERMS = ("ita", "cta", "cpa")


@dataclass
class MGCAConfig(MethodConfig):
    """``method.*`` of MGCA; defaults are the official ("parity") settings of the spec, section 11."""

    name: str = "mgca"
    image_encoder: ImageEncoderConfig = field(
        default_factory=lambda: TimmEncoderConfig(model="deit_base_patch16_224.fb_in1k", pretrained=True,
                                                   in_chans=3, img_size=[224])
    )
    text_encoder: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(name="hf", model="emilyalsentzer/Bio_ClinicalBERT", pretrained=True,
                                                  num_layers=6, pool="cls")
    )
    embed_dim: int = 128  # d of the global and local embeddings
    proj_hidden_dim: int = bounded(2048, gt=0)  # hidden width of the four projection heads
    ita_temperature: float = bounded(0.07, gt=0)  # tau1 (fixed)
    cta_temperature: float = bounded(0.1, gt=0)  # tau2: token attention and token contrast
    cpa_temperature: float = bounded(0.2, gt=0)  # tau3: prototype predictions
    num_prototypes: int = bounded(500, gt=0)  # K
    sinkhorn_epsilon: float = bounded(0.05, gt=0)
    sinkhorn_iterations: int = bounded(3, ge=1)
    freeze_prototypes_epochs: int = bounded(1, ge=0)  # prototype gradients dropped while current_epoch < this
    ita_start_epoch: int = bounded(0, ge=0)  # first epoch in which each term is computed (official: all 0)
    cta_start_epoch: int = bounded(0, ge=0)
    cpa_start_epoch: int = bounded(0, ge=0)
    bidirectional: bool = True  # CTA = word term + patch term (False: word term only)
    token_weight_percentiles: list[float] = bounded(default_factory=lambda: [0.1, 0.9], ge=0, le=1, each=True)  # clip range of token weights
    cnn_local_layer: str = "layer3"  # CNN local features: a timm feature_info module name; "" = last feature map
    cnn_input_size: int = bounded(0, ge=0)  # CNNs: resize inputs to this size inside the method (official ResNet: 299); 0 = off
    # Parity flags (spec section 11): all off = the official behaviour.
    ita_reduction: str = "sum"  # sum (official) | mean (the paper's formula)
    gather_negatives: bool = False  # ITA negatives from every GPU
    distributed_sinkhorn: bool = False  # codes balanced over the global batch
    fix_token_weight_shift: bool = False  # token k gets its own [CLS] attention (official: that of token k+1)
    normalize_vit_patch_summary: bool = False  # L2-normalise ViT patch->word summaries as for CNNs
    mask_pad_candidates: bool = False  # padding word slots are no candidates in the word loss
    exclude_sep_word: bool = False  # [SEP] is not a word
    learnable_token_attention: bool = False  # the paper's cross-attention with learned projections
    token_attention_heads: int = bounded(1, gt=0)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"ita": 1.0, "cta": 1.0, "cpa": 1.0})


@dataclass
class LocalTokens:
    """What CTA consumes for one batch.

    Shapes:
        word_emb: ``[B, W, d]`` unit word embeddings (``W = T - 1`` slots, [CLS] dropped);
        word_mask: ``[B, W]`` bool, True = a word (False = padding slot);
        word_weights: ``[B, W]`` rows sum to 1, exactly 0 where ``word_mask`` is False;
        patch_emb: ``[B, P, d]`` unit patch / feature-map-cell embeddings;
        patch_weights: ``[B, P]`` rows sum to 1 (uniform ``1 / P`` for CNNs).
    """

    word_emb: Tensor
    word_mask: Tensor
    word_weights: Tensor
    patch_emb: Tensor
    patch_weights: Tensor


def ita_loss(img_emb: Tensor, txt_emb: Tensor, temperature: float = 0.07, reduction: str = "sum",
             gather_distributed: bool = False) -> Tensor:
    """MGCA's instance-wise alignment: InfoNCE image->report plus report->image.

    ``S = img_emb @ txt_emb^T / temperature``; ``CE_i2t = mean_i CE(S[i, :], i)``,
    ``CE_t2i = mean_k CE(S[:, k], k)``. Returns ``CE_i2t + CE_t2i`` (``reduction="sum"``, the official
    code) or their mean (``"mean"``, the paper's formula). Symmetric in the two modalities.

    Args:
        img_emb, txt_emb: ``[B, d]`` unit embeddings, row ``i`` of each forming a pair.
        temperature: tau1 (fixed; MGCA 0.07).
        reduction: ``sum`` | ``mean``.
        gather_distributed: negatives from every rank (:func:`medvlp.losses.clip_loss`); official: False.
    """
    _, i2t, t2i = clip_loss(img_emb, txt_emb, 1.0 / temperature, gather_distributed=gather_distributed)
    return i2t + t2i if reduction == "sum" else (i2t + t2i) / 2


class GlobalEmbedding(nn.Sequential):
    """Linear(in->hidden) - BN - ReLU - Linear(hidden->out) - BN(affine=False): ``[B, in]`` -> ``[B, out]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim, affine=False),
        )


class LocalEmbedding(nn.Module):
    """The global head per token with 1x1 Conv1d: ``[B, N, in]`` -> ``[B, N, out]``.

    BatchNorm statistics run over batch x every token position (padding word slots included, as in
    the official ``LocalEmbedding``).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv1d(in_dim, hidden_dim, kernel_size=1), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Conv1d(hidden_dim, out_dim, kernel_size=1), nn.BatchNorm1d(out_dim, affine=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.transpose(1, 2)).transpose(1, 2)


class TextCLSAttention(LastTextAttentionRecorder):
    """Records the input of a BERT-family encoder's last self-attention and recomputes its [CLS] row.

    Used as ``with TextCLSAttention(hf_model) as rec: out = model(...)``; then ``rec.probs(mask)``
    gives the last layer's attention probabilities from [CLS] to every token, averaged over heads
    ``[B, T]`` (0 on padding), without gradient. The encoder itself keeps its fused SDPA attention.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__(last_self_attention(hf_model))

    @torch.no_grad()
    def probs(self, attention_mask: Tensor) -> Tensor:  # type: ignore[override]
        return super().probs(attention_mask, rows=slice(0, 1)).squeeze(2).mean(dim=1)


def last_self_attention(hf_model: nn.Module) -> nn.Module:
    """The last layer's self-attention module (with ``query`` / ``key``) of a BERT-family model."""
    module = text_last_self_attention(hf_model)
    if module is None:
        raise ValueError(
            f"MGCA needs the last-layer [CLS] attention of a BERT-family text encoder (encoder.layer[-1].attention.self "
            f"with query/key projections); {type(hf_model).__name__} has none. Use a BERT-family "
            f"method.text_encoder.model (e.g. emilyalsentzer/Bio_ClinicalBERT or tiny)."
        )
    return module


def validate_config(c: Any) -> None:
    """Check ``method.*`` of MGCA (``loss_weights`` keys are checked by the base class); raises
    ``ValueError`` naming the key, the value and the valid options."""
    if c.image_encoder.name != "timm":
        raise ValueError(f"MGCA is a 2D method: method.image_encoder.name must be 'timm', got '{c.image_encoder.name}'.")
    if c.ita_reduction not in ("sum", "mean"):
        raise ValueError(f"method.ita_reduction='{c.ita_reduction}': expected 'sum' (official) or 'mean' (paper).")
    starts = {t: int(c[f"{t}_start_epoch"]) for t in TERMS}
    if any(v < 0 for v in starts.values()) or min(starts.values()) != 0:
        raise ValueError(f"method.*_start_epoch must be >= 0 with at least one term on from epoch 0, got {starts}.")
    pct = [float(v) for v in c.token_weight_percentiles]
    if len(pct) != 2 or not 0.0 <= pct[0] <= pct[1] <= 1.0:
        raise ValueError(f"method.token_weight_percentiles={list(c.token_weight_percentiles)}: need 0 <= low <= high <= 1 "
                         f"(official [0.1, 0.9]; [0, 1] turns clipping off).")
    for key in ("ita_temperature", "cta_temperature", "cpa_temperature", "sinkhorn_epsilon"):
        if float(c[key]) <= 0:
            raise ValueError(f"method.{key} must be > 0, got {c[key]}.")


@register_method("mgca")
class MGCA(VLPMethod):
    """MGCA: instance (``ita``), token (``cta``) and prototype (``cpa``) image-report alignment."""

    Config = MGCAConfig
    terms = TERMS
    global_batch_keys = ("gather_negatives", "distributed_sinkhorn")

    # ------------------------------------------------------------------ construction
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        validate_config(cfg)

    def build(self) -> None:
        c = self.cfg
        enc = self.image_encoder
        self.is_vit = bool(getattr(enc, "is_vit", False))
        self._local_index: int | None = None
        local_dim = int(enc.local_dim)
        if not self.is_vit and c.cnn_local_layer:
            info = list(getattr(enc.model, "feature_info", []))
            names = [str(i["module"]) for i in info]
            if c.cnn_local_layer not in names:
                raise ValueError(f"method.cnn_local_layer='{c.cnn_local_layer}' is not a feature stage of "
                                 f"{c.image_encoder.model}; choose one of {names} or '' (last feature map).")
            self._local_index = names.index(c.cnn_local_layer)
            local_dim = int(info[self._local_index]["num_chs"])
        if self.is_vit and getattr(enc.model, "cls_token", None) is None:
            raise ValueError(f"MGCA weighs patches by the [CLS] attention of the last ViT block, but "
                             f"{c.image_encoder.model} has no class token; use a ViT with a [CLS] token or a CNN.")
        text_dim = int(self.text_encoder.out_dim)
        d, hid = int(c.embed_dim), int(c.proj_hidden_dim)
        self.img_global = GlobalEmbedding(int(enc.out_dim), hid, d)
        self.img_local = LocalEmbedding(local_dim, hid, d)
        self.txt_global = GlobalEmbedding(text_dim, hid, d)
        self.txt_local = LocalEmbedding(text_dim, hid, d)
        self.prototypes = nn.Linear(d, int(c.num_prototypes), bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        if c.learnable_token_attention:
            self.word_attention = nn.MultiheadAttention(d, int(c.token_attention_heads), batch_first=True)
            self.patch_attention = nn.MultiheadAttention(d, int(c.token_attention_heads), batch_first=True)
        last_self_attention(self.text_encoder.model)  # fail now, not at the first step
        tok = self.tokenizer
        if tok.sep_token_id is None:
            raise ValueError(f"MGCA merges word pieces up to [SEP], but the tokenizer of {c.text_encoder.model} has no sep token.")
        self.register_buffer("is_continuation", continuation_table(tok), persistent=False)

    # ------------------------------------------------------------------ features
    def _resize(self, images: Tensor) -> Tensor:
        size = int(self.cfg.cnn_input_size)
        if self.is_vit or size <= 0 or tuple(images.shape[-2:]) == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)

    def image_features(self, images: Tensor, local: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Backbone features of ``images`` ``[B, C, H, W]``.

        Returns:
            ``(pooled [B, D_img], tokens [B, P, D_local] or None, patch_importance [B, P] or None)``;
            the importance is the head-averaged last-block [CLS]->patch attention (ViTs only).
        """
        images = self._resize(images)
        if self.is_vit:
            f = self.encode_image(images, return_attention=local)
            importance = f.attentions[:, :, 0, 1:].float().mean(dim=1) if local else None
            return f.pooled, (f.tokens if local else None), importance
        if local and self._local_index is not None:
            final, inter = self.image_encoder.model.forward_intermediates(images, indices=[self._local_index])
            return final.mean(dim=(2, 3)), inter[0].flatten(2).transpose(1, 2), None
        f = self.encode_image(images)
        return f.pooled, (f.tokens if local else None), None

    def embed_image(self, images: Tensor) -> Tensor:
        """Unit global image embedding ``[B, embed_dim]`` (retrieval / zero-shot)."""
        pooled, _, _ = self.image_features(images, local=False)
        return F.normalize(self.img_global(pooled), dim=-1)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit global report embedding ``[B, embed_dim]`` (retrieval / zero-shot)."""
        return F.normalize(self.txt_global(self.encode_text(input_ids, attention_mask).pooled), dim=-1)

    # ------------------------------------------------------------------ the method
    def active_terms(self) -> list[str]:
        """The terms computed at the current epoch (``*_start_epoch <= current_epoch``)."""
        epoch = int(self.current_epoch)
        return [t for t in TERMS if int(self.cfg[f"{t}_start_epoch"]) <= epoch]

    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        c = self.cfg
        active = self.active_terms()
        feats = self._features(batch, local="cta" in active)
        img_emb, txt_emb = feats["img_emb"], feats["txt_emb"]
        out: dict[str, Tensor] = {}
        extra: dict[str, Tensor] = {}
        if "ita" in active:
            out["ita"] = ita_loss(img_emb, txt_emb, float(c.ita_temperature), str(c.ita_reduction), bool(c.gather_negatives))
        if "cta" in active:
            tok = self._local(batch, feats)
            c_word = c_patch = None
            if c.learnable_token_attention:
                c_word, _ = self.word_attention(tok.word_emb, tok.patch_emb, tok.patch_emb, need_weights=False)
                if c.bidirectional:
                    c_patch, _ = self.patch_attention(tok.patch_emb, tok.word_emb, tok.word_emb,
                                                      key_padding_mask=~tok.word_mask, need_weights=False)
            loss_word, loss_patch = cta_loss(
                tok.word_emb, tok.word_mask, tok.word_weights, tok.patch_emb, tok.patch_weights, float(c.cta_temperature),
                bidirectional=bool(c.bidirectional),
                normalize_patch_summary=(not self.is_vit) or bool(c.normalize_vit_patch_summary),
                mask_pad_candidates=bool(c.mask_pad_candidates), word_summaries=c_word, patch_summaries=c_patch,
            )
            out["cta"] = loss_word if loss_patch is None else loss_word + loss_patch
            extra["loss_cta_word"] = loss_word
            if loss_patch is not None:
                extra["loss_cta_patch"] = loss_patch
        if "cpa" in active:
            with torch.no_grad():
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
            out["cpa"], _, _ = swapped_prototype_loss(
                self.prototypes(img_emb), self.prototypes(txt_emb), float(c.cpa_temperature),
                float(c.sinkhorn_epsilon), int(c.sinkhorn_iterations), distributed=bool(c.distributed_sinkhorn),
            )
        self._touch_unused(out, active)
        if self.attached:
            extra.update(zip(("inbatch_acc1", "inbatch_acc5"), inbatch_accuracy(img_emb, txt_emb, (1, 5)), strict=True))
            self.log_terms(extra, batch_size=len(batch))
        return out

    def _features(self, batch: ImageTextBatch, local: bool) -> dict[str, Any]:
        """Both encoders once: unit global embeddings, plus the raw local features when ``local``."""
        pooled, patches, patch_imp = self.image_features(batch.images, local=local)
        if local:
            with TextCLSAttention(self.text_encoder.model) as rec:
                txt = self.encode_text(batch.input_ids, batch.attention_mask)
            cls_attn = rec.probs(batch.attention_mask)
        else:
            txt, cls_attn = self.encode_text(batch.input_ids, batch.attention_mask), None
        return {
            "img_emb": F.normalize(self.img_global(pooled), dim=-1),
            "txt_emb": F.normalize(self.txt_global(txt.pooled), dim=-1),
            "patches": patches, "patch_importance": patch_imp, "text_tokens": txt.tokens, "cls_attention": cls_attn,
        }

    def _local(self, batch: ImageTextBatch, feats: dict[str, Any]) -> LocalTokens:
        c = self.cfg
        low, high = (float(v) for v in c.token_weight_percentiles)
        words = merge_word_pieces(
            feats["text_tokens"], batch.input_ids, batch.attention_mask, self.is_continuation,
            int(self.tokenizer.sep_token_id), importance=feats["cls_attention"], shift=not c.fix_token_weight_shift,
            drop_sep=bool(c.exclude_sep_word),
        )
        word_emb = F.normalize(self.txt_local(words.features), dim=-1)
        patch_emb = F.normalize(self.img_local(feats["patches"]), dim=-1)
        if feats["patch_importance"] is None:  # CNN: uniform
            patch_w = torch.full(patch_emb.shape[:2], 1.0 / patch_emb.shape[1], device=patch_emb.device)
        else:
            patch_w = clipped_token_weights(feats["patch_importance"], None, low, high)
        word_w = clipped_token_weights(words.importance, words.mask, low, high)
        return LocalTokens(word_emb=word_emb, word_mask=words.mask, word_weights=word_w, patch_emb=patch_emb,
                           patch_weights=patch_w)

    def local_tokens(self, batch: ImageTextBatch) -> LocalTokens:
        """The inputs of CTA for ``batch``: unit word / patch embeddings, word mask and token weights."""
        return self._local(batch, self._features(batch, local=True))

    @torch.no_grad()
    def token_alignment(self, batch: ImageTextBatch) -> TokenAlignment:
        """Word-to-patch attention of CTA, ``softmax(word . patch / cta_temperature)`` over the patches."""
        tok = self.local_tokens(batch)
        attn = (tok.word_emb @ tok.patch_emb.transpose(1, 2) / float(self.cfg.cta_temperature)).softmax(dim=-1)
        h, w = self._resize(batch.images).shape[-2:]
        stride = math.sqrt(h * w / attn.shape[-1])  # patches / feature-map cells of the local features
        grid = (round(h / stride), round(w / stride))
        if grid[0] * grid[1] != attn.shape[-1]:
            raise ValueError(f"MGCA's {attn.shape[-1]} local tokens do not tile a {h} x {w} image.")
        return TokenAlignment(attention=attn, word_mask=tok.word_mask, word_weights=tok.word_weights, grid=grid)

    def temperature(self) -> float:
        return float(self.cfg.ita_temperature)

    def _touch_unused(self, out: dict[str, Tensor], active: list[str]) -> None:
        """Under DDP, give the heads of switched-off terms a zero gradient (find_unused_parameters=False)."""
        if world()[1] == 1 or len(active) == len(TERMS) or not out:
            return
        used: set[str] = set()
        groups = {"ita": ["img_global", "txt_global"], "cpa": ["img_global", "txt_global", "prototypes"],
                  "cta": ["img_local", "txt_local", "word_attention", "patch_attention"]}
        for t in active:
            used.update(groups[t])
        unused = [p for name in set().union(*groups.values()) - used if hasattr(self, name)
                  for p in getattr(self, name).parameters() if p.requires_grad]
        if unused:
            first = next(iter(out))
            out[first] = out[first] + 0.0 * sum(p.sum() for p in unused)

    # ------------------------------------------------------------------ optimisation
    def on_after_backward(self) -> None:
        """Drop the prototype gradients during the first ``freeze_prototypes_epochs`` epochs."""
        if int(self.current_epoch) < int(self.cfg.freeze_prototypes_epochs):
            for p in self.prototypes.parameters():
                p.grad = None


@torch.no_grad()
def inbatch_accuracy(img_emb: Tensor, txt_emb: Tensor, top_k: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Top-k in-batch retrieval accuracy (fraction), mean of image->text and text->image."""
    scores = img_emb.float() @ txt_emb.float().T
    target = torch.arange(scores.shape[0], device=scores.device)
    out = []
    for k in top_k:
        k = min(k, scores.shape[1])
        i2t = (scores.topk(k, dim=1).indices == target[:, None]).any(1).float().mean()
        t2i = (scores.T.topk(k, dim=1).indices == target[:, None]).any(1).float().mean()
        out.append((i2t + t2i) / 2)
    return out


__all__ = ["MGCA", "MGCAConfig", "LocalTokens", "ita_loss", "GlobalEmbedding", "LocalEmbedding", "TextCLSAttention", "inbatch_accuracy"]

"""BLIP-2's Q-Former: a BERT whose layers also let learned query tokens read image tokens.

Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
Language Models", ICML 2023 (https://arxiv.org/abs/2301.12597); used by MedBLIP
(https://arxiv.org/abs/2305.10799). The design is the one of ``salesforce/LAVIS:
lavis/models/blip2_models/Qformer.py``:

* BERT embeddings (word + absolute position, LayerNorm, dropout). Query embeddings, when given, are
  put *before* the text embeddings and share the LayerNorm / dropout; they get no position embedding.
* Each layer: self-attention over the whole sequence (queries + text); in layers ``0, f, 2f, ...``
  (``f = cross_attention_freq``) a cross-attention block from the query positions only to the image
  tokens; then a feed-forward block of its own for the query positions (``intermediate_query`` /
  ``output_query``) and BERT's for the text positions (``intermediate`` / ``output``).
* Three passes: text only (:meth:`QFormer.forward`, no queries, no cross-attention), queries only
  (:meth:`QFormer.encode_queries`) and both in one sequence (:meth:`QFormer.encode_joint`, BLIP-2's
  image-text matching pass).

Submodules carry the names of transformers' ``BertModel`` (and of LAVIS), so a BERT checkpoint loads
key by key; cross-attention, query feed-forward blocks and query tokens start random (std: the config's initializer_range, 0.02).
Attention runs through PyTorch SDPA.

Differences from the official code: MedBLIP deletes the word and position tables after loading
``bert-base-uncased`` (copied from BLIP-2's stage-2 models), which makes its own text pass fail; they are
kept here. BERT's token-type table has no counterpart (as in LAVIS), so a checkpoint's type-0 row is not
added to the text embeddings.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medvlp.batch import TextFeatures
from medvlp.config import QFormerConfig
from medvlp.encoders.text import pool_tokens
from medvlp.registry import register_text_encoder

log = logging.getLogger(__name__)

# fields written into the saved config.json next to BERT's own, so a run directory rebuilds the Q-Former
QFORMER_FIELDS = ("num_query_tokens", "cross_attention_freq", "encoder_width")
# BERT weights that have no place in the Q-Former (LAVIS has no token types; the pooler is unused)
IGNORED_BERT_PREFIXES = ("pooler.", "embeddings.token_type_embeddings.", "embeddings.token_type_ids",
                         "embeddings.position_ids", "cls.")
# parameters of ours that a BERT checkpoint never fills
NEW_PARTS = (".crossattention.", ".intermediate_query.", ".output_query.")


class QFormerAttention(nn.Module):
    """Multi-head attention projections (``query`` / ``key`` / ``value``, as in BERT); keys and values may
    come from another width (cross-attention to image tokens)."""

    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"method.text_encoder: hidden size {hidden} is not a multiple of the {heads} attention heads")
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dropout_p = dropout

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # [B, h, N, d]

    def forward(self, hidden: Tensor, context: Tensor, mask: Tensor | None, explicit: bool = False) -> tuple[Tensor, Tensor | None]:
        """``hidden`` ``[B, L, H]`` attends to ``context`` ``[B, N, W]``; ``mask`` bool, broadcastable to
        ``[B, heads, L, N]`` (True = may attend) or None. Returns ``([B, L, H], probabilities [B, heads, L, N]
        when explicit else None)``."""
        q, k, v = self._split(self.query(hidden)), self._split(self.key(context)), self._split(self.value(context))
        p = self.dropout_p if self.training else 0.0
        probs = None
        if explicit:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            out = F.dropout(probs, p=p, training=self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1), probs


class ResidualOutput(nn.Module):
    """BERT's post-norm residual: ``LayerNorm(dropout(dense(x)) + residual)``."""

    def __init__(self, width: int, hidden: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class AttentionBlock(nn.Module):
    """Attention plus its residual output (``self`` / ``output``, BERT's ``BertAttention``)."""

    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float, attn_dropout: float, eps: float) -> None:
        super().__init__()
        self.self = QFormerAttention(hidden, heads, kv_width, attn_dropout)
        self.output = ResidualOutput(hidden, hidden, dropout, eps)

    def forward(self, hidden: Tensor, context: Tensor, mask: Tensor | None, explicit: bool = False) -> tuple[Tensor, Tensor | None]:
        out, probs = self.self(hidden, context, mask, explicit)
        return self.output(out, hidden), probs


class Intermediate(nn.Module):
    """The first half of BERT's feed-forward block: ``act(dense(x))``."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(hidden, intermediate)
        self.intermediate_act_fn = ACT2FN[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class QFormerLayer(nn.Module):
    """One Q-Former layer: self-attention over queries + text, optional cross-attention from the queries
    to the image tokens, and separate feed-forward blocks for query and text positions."""

    def __init__(self, bert_cfg: Any, cross_attention: bool, encoder_width: int) -> None:
        super().__init__()
        h, heads, i = int(bert_cfg.hidden_size), int(bert_cfg.num_attention_heads), int(bert_cfg.intermediate_size)
        drop, attn_drop = float(bert_cfg.hidden_dropout_prob), float(bert_cfg.attention_probs_dropout_prob)
        eps, act = float(bert_cfg.layer_norm_eps), str(bert_cfg.hidden_act)
        self.attention = AttentionBlock(h, heads, h, drop, attn_drop, eps)
        self.crossattention = AttentionBlock(h, heads, encoder_width, drop, attn_drop, eps) if cross_attention else None
        self.intermediate = Intermediate(h, i, act)
        self.output = ResidualOutput(i, h, drop, eps)
        self.intermediate_query = Intermediate(h, i, act)
        self.output_query = ResidualOutput(i, h, drop, eps)

    def forward(self, hidden: Tensor, self_mask: Tensor | None, query_length: int, image_tokens: Tensor | None,
                image_mask: Tensor | None, explicit: bool = False) -> tuple[Tensor, Tensor | None]:
        """``hidden`` ``[B, Q + T, H]`` (the first ``query_length`` positions are queries); returns the layer
        output and, when ``explicit``, the self-attention probabilities."""
        attn, probs = self.attention(hidden, hidden, self_mask, explicit)
        if query_length == 0:
            return self.output(self.intermediate(attn), attn), probs
        queries = attn[:, :query_length]
        if self.crossattention is not None:
            if image_tokens is None:
                raise ValueError("The Q-Former's query positions need image tokens for cross-attention.")
            queries, _ = self.crossattention(queries, image_tokens, image_mask)
        out = self.output_query(self.intermediate_query(queries), queries)
        if attn.shape[1] > query_length:
            text = attn[:, query_length:]
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out, probs


class QFormerEmbeddings(nn.Module):
    """Word + absolute position embeddings of the text, query embeddings put in front, then LayerNorm and
    dropout over the whole sequence."""

    def __init__(self, bert_cfg: Any) -> None:
        super().__init__()
        h = int(bert_cfg.hidden_size)
        self.word_embeddings = nn.Embedding(int(bert_cfg.vocab_size), h, padding_idx=bert_cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(int(bert_cfg.max_position_embeddings), h)
        self.LayerNorm = nn.LayerNorm(h, eps=float(bert_cfg.layer_norm_eps))
        self.dropout = nn.Dropout(float(bert_cfg.hidden_dropout_prob))

    def forward(self, input_ids: Tensor | None = None, query_embeds: Tensor | None = None) -> Tensor:
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            t, limit = input_ids.shape[1], self.position_embeddings.num_embeddings
            if t > limit:
                raise ValueError(
                    f"The Q-Former got text of {t} tokens but has {limit} positions "
                    f"(method.text_encoder.max_position_embeddings, or the checkpoint's); shorten the text "
                    f"(data.max_length <= {limit})."
                )
            positions = torch.arange(t, device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.LayerNorm(x))


class QFormerEncoder(nn.Module):
    """The stack of layers (``encoder.layer.{i}``, as in BERT)."""

    def __init__(self, bert_cfg: Any, cross_attention_freq: int, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            QFormerLayer(bert_cfg, i % cross_attention_freq == 0, encoder_width)
            for i in range(int(bert_cfg.num_hidden_layers))
        )


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, ``std``) (the config's ``initializer_range``, 0.02) for Linear and
    Embedding weights (padding row zero), zero biases, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_text_encoder("qformer")
class QFormer(nn.Module):
    """BLIP-2's Q-Former (LAVIS design) with its text path; ``pooled`` is the text's [CLS] output.

    Config keys (``method.text_encoder.*``): ``model`` (a BERT checkpoint - hub name or local directory -,
    a directory written by :meth:`save_pretrained_parts`, which fixes the architecture but holds no weights,
    or ``tiny``), ``pretrained`` (copy the BERT checkpoint's weights), ``tokenizer``,
    ``num_query_tokens``, ``cross_attention_freq``, ``encoder_width``, ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings``
    (these five size ``tiny`` only; a checkpoint or saved directory brings its own),
    ``dropout``, ``num_layers`` (keep the first N layers), ``freeze_layers`` (freeze the BERT part -
    self-attention and text feed-forward - of the first N layers, and the embeddings unless
    ``freeze_embeddings=false``), ``attn_implementation`` (``sdpa`` or ``eager``), ``pool``,
    ``grad_checkpointing``, ``config_overrides`` (fields of the ``BertConfig``).

    Differences from the official code (``salesforce/LAVIS: lavis/models/blip2_models/Qformer.py``,
    ``Qybc/MedBLIP: medblip/modeling_medblip_t5.py``): the word and position tables are kept (MedBLIP
    sets them to None and cannot run its text pass); there is no token-type table, as in LAVIS.
    """

    Config = QFormerConfig  # the schema of method.text_encoder for this encoder

    ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

    fsdp_forward_methods = ("encode_queries", "encode_joint")  # sharded by FSDP2: these gather the weights

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.architecture not in ("auto", "bert"):
            raise ValueError(f"method.text_encoder.architecture='{cfg.architecture}': expected auto or bert (the Q-Former is a BERT)")
        if cfg.attn_implementation not in self.ATTN_IMPLEMENTATIONS:
            raise ValueError(f"method.text_encoder.attn_implementation='{cfg.attn_implementation}': the Q-Former "
                             f"supports {' or '.join(self.ATTN_IMPLEMENTATIONS)}")
        if cfg.position_ids != "sequential":
            raise ValueError(f"method.text_encoder.position_ids='{cfg.position_ids}': the Q-Former uses positions 0..T-1 "
                             f"(sequential).")
        self.tokenizer, bert_cfg = self._tokenizer_and_config(cfg)
        self.bert_config = bert_cfg
        self.num_query_tokens = int(bert_cfg.num_query_tokens)
        self.cross_attention_freq = int(bert_cfg.cross_attention_freq)
        self.encoder_width = int(bert_cfg.encoder_width)
        self.out_dim = int(bert_cfg.hidden_size)
        self.explicit_attention = cfg.attn_implementation == "eager"
        self.grad_checkpointing = bool(cfg.grad_checkpointing)

        self.embeddings = QFormerEmbeddings(bert_cfg)
        self.encoder = QFormerEncoder(bert_cfg, self.cross_attention_freq, self.encoder_width)
        self.query_tokens = nn.Parameter(torch.zeros(1, self.num_query_tokens, self.out_dim))
        std = float(getattr(bert_cfg, "initializer_range", 0.02))
        self.apply(lambda m: init_bert_weights(m, std))
        nn.init.normal_(self.query_tokens, mean=0.0, std=std)
        self.cross_attention_layers = [i for i, layer in enumerate(self.encoder.layer) if layer.crossattention is not None]
        if cfg.pretrained and cfg.model != "tiny":
            if self._is_saved_qformer:  # a run's text_encoder directory: the weights are in its checkpoint
                log.info("method.text_encoder.model=%s is a saved Q-Former (config and tokenizer only); its weights "
                         "come from the run's checkpoint, not from this directory", cfg.model)
            else:
                self._load_bert(cfg.model)
        self._freeze(cfg.freeze_layers, bool(cfg.freeze_embeddings))

    # ------------------------------------------------------------------ construction
    def _tokenizer_and_config(self, cfg: QFormerConfig) -> tuple[Any, Any]:
        """The tokenizer and the ``BertConfig`` (with the Q-Former fields set) the modules are built from."""
        from transformers import AutoTokenizer, BertConfig

        name = str(cfg.model)
        source = cfg.tokenizer or name
        try:
            if name == "tiny":
                if not cfg.tokenizer:
                    from medvlp.encoders.tokenizers import medblip_tokenizer_dir

                    source = str(medblip_tokenizer_dir("wordpiece"))
                tokenizer = AutoTokenizer.from_pretrained(source)
                bert_cfg = BertConfig(
                    vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_size=cfg.hidden_size,
                    num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                    intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                )
            else:
                tokenizer = AutoTokenizer.from_pretrained(source)
                bert_cfg = BertConfig.from_pretrained(name)
        except OSError as err:
            raise OSError(
                f"method.text_encoder: could not load '{source}' ({err}). It must be a model hub name reachable "
                f"from this machine or a local directory in the transformers layout; use "
                f"method.text_encoder.model=tiny to run offline."
            ) from err
        self._is_saved_qformer = all(hasattr(bert_cfg, k) for k in QFORMER_FIELDS)
        for key in QFORMER_FIELDS:
            wanted = getattr(cfg, key)
            if self._is_saved_qformer:  # a directory written by save_pretrained_parts defines the architecture
                saved = getattr(bert_cfg, key)
                if saved != wanted:
                    log.warning("method.text_encoder.%s=%s differs from the saved Q-Former in %s (%s); using %s",
                                key, wanted, name, saved, saved)
            else:
                setattr(bert_cfg, key, wanted)
        bert_cfg.hidden_dropout_prob = float(cfg.dropout)
        bert_cfg.attention_probs_dropout_prob = float(cfg.dropout)
        if cfg.num_layers > 0:
            bert_cfg.num_hidden_layers = int(cfg.num_layers)
        for key, value in cfg.config_overrides.items():
            if not hasattr(bert_cfg, key):
                raise ValueError(f"method.text_encoder.config_overrides: '{key}' is not a field of BertConfig")
            setattr(bert_cfg, key, value)
        if len(tokenizer) > int(bert_cfg.vocab_size):
            raise ValueError(
                f"method.text_encoder: the tokenizer '{source}' has {len(tokenizer)} tokens but the Q-Former's "
                f"vocabulary has {bert_cfg.vocab_size}; use the checkpoint's own tokenizer "
                f"(method.text_encoder.tokenizer='') or a matching one."
            )
        return tokenizer, bert_cfg

    def _load_bert(self, name: str) -> None:
        """Copy a BERT checkpoint into the self-attention, text feed-forward and embedding weights."""
        from transformers import BertModel

        try:
            bert = BertModel.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise OSError(
                f"method.text_encoder.model='{name}' (pretrained=true): the BERT weights could not be loaded "
                f"({type(err).__name__}: {err}). Give a hub name reachable from this machine, a local "
                f"directory in the transformers layout, method.text_encoder.pretrained=false, or "
                f"method.text_encoder.model=tiny to run offline."
            ) from err
        ours = self.state_dict()
        n_layers = len(self.encoder.layer)
        unexpected, mismatched, filled, seen = [], [], set(), set()
        for key, value in bert.state_dict().items():
            if key.startswith(IGNORED_BERT_PREFIXES):
                continue
            if key.startswith("encoder.layer.") and int(key.split(".")[2]) >= n_layers:
                continue  # layers dropped by method.text_encoder.num_layers
            if key not in ours:
                unexpected.append(key)
            elif ours[key].shape != value.shape:
                mismatched.append(f"{key} {tuple(value.shape)} vs ours {tuple(ours[key].shape)}")
                seen.add(key)
            else:
                filled.add(key)
        seen |= filled
        missing = [k for k in ours if k not in seen and k != "query_tokens" and not any(p in f".{k}" for p in NEW_PARTS)]
        if unexpected or mismatched or missing:
            parts = [f"{label}: {', '.join(keys)}" for label, keys in
                     (("unexpected", unexpected), ("shape mismatch", mismatched), ("missing", missing)) if keys]
            raise ValueError(f"method.text_encoder.model='{name}' is not a BERT checkpoint the Q-Former can load "
                             f"({'; '.join(parts)}).")
        source = bert.state_dict()
        with torch.no_grad():
            for key in filled:
                ours[key].copy_(source[key])

    def _freeze(self, n: int, embeddings: bool) -> None:
        if n <= 0:
            return
        layers = self.encoder.layer
        if n > len(layers):
            raise ValueError(f"method.text_encoder.freeze_layers={n} but the Q-Former has {len(layers)} layers")
        modules: list[nn.Module] = [self.embeddings] if embeddings else []
        for layer in layers[:n]:
            modules += [layer.attention, layer.intermediate, layer.output]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ masks and the shared trunk
    def self_attention_mask(self, query_length: int, attention_mask: Tensor | None, batch: int) -> Tensor:
        """Who may attend to whom in the self-attention: bool ``[B, 1, L, L]``, True = may attend.

        ``L = query_length + T`` (queries first). Query positions are always visible; text positions are
        visible where ``attention_mask`` ``[B, T]`` is 1 (padding is masked as a key). Every position sees
        every visible one (bidirectional), so in the joint pass queries see the text and text sees the
        queries. ``attention_mask=None`` means no text (the query pass).
        """
        device = attention_mask.device if attention_mask is not None else self.query_tokens.device
        keys = [torch.ones(batch, query_length, dtype=torch.bool, device=device)]
        if attention_mask is not None:
            if attention_mask.shape[0] != batch:
                raise ValueError(f"attention_mask has batch {attention_mask.shape[0]}, expected {batch}")
            keys.append(attention_mask.bool())
        visible = torch.cat(keys, dim=1)  # [B, L]
        length = visible.shape[1]
        return visible[:, None, None, :].expand(batch, 1, length, length)

    def _check_image_tokens(self, image_tokens: Tensor, image_mask: Tensor | None) -> Tensor | None:
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.encoder_width:
            raise ValueError(
                f"The Q-Former expects image tokens [B, N, {self.encoder_width}] "
                f"(method.text_encoder.encoder_width={self.encoder_width}), got {list(image_tokens.shape)} "
                f"(width {image_tokens.shape[-1]}); set method.text_encoder.encoder_width={image_tokens.shape[-1]} "
                f"to match the image encoder."
            )
        if image_mask is None:
            return None
        if image_mask.shape != image_tokens.shape[:2]:
            raise ValueError(f"image_mask must be [B, N] = {list(image_tokens.shape[:2])}, got {list(image_mask.shape)}")
        return image_mask.bool()[:, None, None, :]

    def _run(self, hidden: Tensor, self_mask: Tensor | None, query_length: int, image_tokens: Tensor | None,
             image_mask: Tensor | None, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        probs = None
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            explicit = self.explicit_attention or (return_attention and i == last)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden, p = checkpoint(layer, hidden, self_mask, query_length, image_tokens, image_mask, explicit,
                                       use_reentrant=False)
            else:
                hidden, p = layer(hidden, self_mask, query_length, image_tokens, image_mask, explicit)
            if i == last and return_attention:
                probs = p
        return hidden, probs

    # ------------------------------------------------------------------ the three passes
    def forward(self, input_ids: Tensor, attention_mask: Tensor, return_attention: bool = False) -> TextFeatures:
        """The text pass (no queries, no cross-attention).

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]`` 1 = token, 0 = padding.
            return_attention: also return the last layer's self-attention probabilities
                ``[B, heads, T, T]`` (computed explicitly; padding keys get 0).

        Returns:
            :class:`TextFeatures` with ``pooled`` ``[B, H]`` (position 0, [CLS], with ``pool=cls``),
            ``tokens`` ``[B, T, H]`` and ``mask``.
        """
        hidden = self.embeddings(input_ids=input_ids)
        mask = self.self_attention_mask(0, attention_mask, input_ids.shape[0])
        tokens, probs = self._run(hidden, mask, 0, None, None, return_attention)
        return TextFeatures(pooled=pool_tokens(tokens, attention_mask, self.cfg.pool), tokens=tokens,
                            mask=attention_mask, attentions=probs)

    def encode_queries(self, image_tokens: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """The query pass: the learned queries attend to each other and cross-attend to the image.

        Args:
            image_tokens: ``[B, N, encoder_width]``.
            image_mask: ``[B, N]`` 1 = keep; None = all tokens.

        Returns:
            ``[B, Q, H]`` query outputs.
        """
        cross_mask = self._check_image_tokens(image_tokens, image_mask)
        b = image_tokens.shape[0]
        hidden = self.embeddings(query_embeds=self.query_tokens.expand(b, -1, -1))
        out, _ = self._run(hidden, None, self.num_query_tokens, image_tokens, cross_mask)  # no text: nothing to mask
        return out

    def encode_joint(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor,
                     image_mask: Tensor | None = None) -> Tensor:
        """BLIP-2's image-text matching pass: queries and text in one sequence with bidirectional
        self-attention (text padding masked as keys), cross-attention from the query positions only.

        Args:
            image_tokens: ``[B, N, encoder_width]``.
            input_ids: ``[B, T]``; attention_mask: ``[B, T]`` 1 = token.
            image_mask: ``[B, N]`` 1 = keep; None = all tokens.

        Returns:
            ``[B, Q + T, H]``: the query outputs first (BLIP-2's ITM head reads those), then the text.
        """
        cross_mask = self._check_image_tokens(image_tokens, image_mask)
        b = input_ids.shape[0]
        if image_tokens.shape[0] != b:
            raise ValueError(f"image_tokens has batch {image_tokens.shape[0]} but input_ids has {b}")
        hidden = self.embeddings(input_ids=input_ids, query_embeds=self.query_tokens.expand(b, -1, -1))
        mask = self.self_attention_mask(self.num_query_tokens, attention_mask, b)
        out, _ = self._run(hidden, mask, self.num_query_tokens, image_tokens, cross_mask)
        return out

    # ------------------------------------------------------------------ saving
    def save_pretrained_parts(self, directory: str | Path) -> None:
        """Write the tokenizer and a ``config.json`` (a ``BertConfig`` plus ``num_query_tokens``,
        ``cross_attention_freq``, ``encoder_width``), from which ``QFormer(model=directory,
        pretrained=false, tokenizer="")`` rebuilds the same architecture offline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.bert_config.save_pretrained(directory)

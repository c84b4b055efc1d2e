"""Text encoders through transformers, and the offline ``tiny`` preset.

``method.text_encoder.model`` is a hub name (``emilyalsentzer/Bio_ClinicalBERT``), a local
directory in the transformers layout, or ``tiny``: a 2-layer BERT with a WordPiece tokenizer
trained (with the ``tokenizers`` library) on the synthetic demo reports, for tests and the demo,
since neither needs - nor here can reach - a model hub. Attention runs through PyTorch SDPA.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medvlp.batch import TextFeatures
from medvlp.config import TextEncoderConfig
from medvlp.registry import register_text_encoder

TINY_VERSION = 2
TINY_VOCAB = 2000
TINY_BERT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


def tiny_tokenizer_dir() -> Path:
    """Directory of the ``tiny`` WordPiece tokenizer, trained once on the demo report corpus."""
    from medvlp.datamodules import demo

    target = demo.cache_dir() / "tokenizers" / f"tiny-v{TINY_VERSION}-g{demo.GEN_VERSION}"
    if (target / "tokenizer.json").is_file():
        return target
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.WordPieceTrainer(vocab_size=TINY_VOCAB, special_tokens=specials, min_frequency=1)
    tok.train_from_iterator(demo.report_corpus(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **SPECIAL_TOKENS)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    fast.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pool_tokens(tokens: Tensor, mask: Tensor, how: str) -> Tensor:
    """Pool ``[B, T, D]`` token features to ``[B, D]``: the first ([CLS]) token, or mean / max over ``mask``."""
    if how == "cls":
        return tokens[:, 0]
    keep = mask.bool().unsqueeze(-1)
    if how == "mean":
        return (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)
    return tokens.masked_fill(~keep, torch.finfo(tokens.dtype).min).amax(1)


def last_self_attention(hf_model: nn.Module) -> nn.Module | None:
    """The last layer's self-attention module (``query`` / ``key`` projections) of a BERT-family
    model, or None for another architecture."""
    try:
        module = hf_model.encoder.layer[-1].attention.self
    except AttributeError:
        return None
    needed = ("query", "key", "num_attention_heads", "attention_head_size")
    return module if all(hasattr(module, a) for a in needed) else None


class LastTextAttentionRecorder:
    """Records the input of a BERT-family encoder's last self-attention and recomputes its
    probabilities, so the forward pass keeps its fused SDPA kernel (which returns no weights).

    ``with LastTextAttentionRecorder(module) as rec: model(...)``; then ``rec.probs(mask)`` is
    ``[B, heads, T, T]`` (``rows`` selects query rows, e.g. ``slice(0, 1)`` for [CLS]); keys on
    padding get probability 0. Differentiable unless called under ``torch.no_grad``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inputs: Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> LastTextAttentionRecorder:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs = args[0] if args else kwargs["hidden_states"]

        self._handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def probs(self, attention_mask: Tensor, rows: slice = slice(None)) -> Tensor:
        if self.inputs is None:
            raise RuntimeError("The text encoder's last self-attention was not called during the forward pass.")
        attn, h = self.module, self.inputs
        b, t, _ = h.shape
        heads, size = int(attn.num_attention_heads), int(attn.attention_head_size)
        q = attn.query(h[:, rows])
        q = q.view(b, q.shape[1], heads, size).transpose(1, 2)  # [B, h, R, d]
        k = attn.key(h).view(b, t, heads, size).transpose(1, 2)  # [B, h, T, d]
        scale = float(getattr(attn, "scaling", size**-0.5))
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1)


@register_text_encoder("hf")
class HFTextEncoder(nn.Module):
    """A BERT-family encoder from transformers; ``pooled`` pools the last layer (``pool``).

    Config keys: ``model``, ``pretrained``, ``tokenizer``, ``num_layers`` (keep the first N layers), ``position_ids``
    (``zeros``: MGCA's position-blind encoder, spec mgca.md Q19),
    ``freeze_layers`` (freeze the first N layers, and the embeddings unless ``freeze_embeddings=false``), ``attn_implementation`` (``sdpa``),
    ``pool`` (``cls`` token, or ``mean`` / ``max`` over the unmasked tokens), ``grad_checkpointing``,
    ``config_overrides``.
    """

    Config = TextEncoderConfig  # the schema of method.<image|text>_encoder for this encoder

    POOLS = ("cls", "mean", "max")

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

        self.cfg = cfg
        if cfg.architecture not in ("auto", "bert"):
            raise ValueError(f"method.text_encoder.architecture='{cfg.architecture}': expected auto or bert")
        model_cls, config_cls = (BertModel, BertConfig) if cfg.architecture == "bert" else (AutoModel, AutoConfig)
        if cfg.pool not in self.POOLS:
            raise ValueError(f"method.text_encoder.pool='{cfg.pool}': expected one of {', '.join(self.POOLS)}")
        name = cfg.model
        try:
            if name == "tiny":
                self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or tiny_tokenizer_dir())
                hf_cfg = BertConfig(vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id, **TINY_BERT)
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or name)
                hf_cfg = config_cls.from_pretrained(name)
        except OSError as err:
            raise OSError(
                f"method.text_encoder: could not load '{cfg.tokenizer or name}' ({err}). It must be a model "
                f"hub name reachable from this machine or a local directory in the transformers layout; "
                f"use method.text_encoder.model=tiny to run offline."
            ) from err
        if cfg.num_layers > 0:
            hf_cfg.num_hidden_layers = cfg.num_layers
        for key, value in cfg.config_overrides.items():
            if not hasattr(hf_cfg, key):
                raise ValueError(f"method.text_encoder.config_overrides: '{key}' is not a field of {type(hf_cfg).__name__}")
            setattr(hf_cfg, key, value)
        kwargs: dict[str, Any] = {"attn_implementation": cfg.attn_implementation}
        if hf_cfg.model_type == "bert":
            kwargs["add_pooling_layer"] = False  # unused: a pooler without gradients breaks DDP
        if cfg.pretrained and name != "tiny":
            try:
                self.model = model_cls.from_pretrained(name, config=hf_cfg, **kwargs)
            except (OSError, ValueError) as err:
                raise OSError(
                    f"method.text_encoder.model='{name}' (pretrained=true): the weights could not be loaded "
                    f"({type(err).__name__}: {err}). Give a hub name reachable from this machine, a local "
                    f"directory in the transformers layout, method.text_encoder.pretrained=false, or "
                    f"method.text_encoder.model=tiny to run offline."
                ) from err
        else:
            self.model = BertModel._from_config(hf_cfg, **kwargs) if cfg.architecture == "bert" else AutoModel.from_config(hf_cfg, **kwargs)
        if cfg.grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.out_dim = int(hf_cfg.hidden_size)
        self.cfg_freeze_embeddings = bool(cfg.freeze_embeddings)
        self._freeze(cfg.freeze_layers)
        if cfg.position_ids not in ("sequential", "zeros"):
            raise ValueError(f"method.text_encoder.position_ids='{cfg.position_ids}': expected sequential or zeros")
        self.zero_positions = cfg.position_ids == "zeros"
        token_types = getattr(getattr(self.model, "embeddings", None), "token_type_embeddings", None)
        if self.zero_positions and token_types is not None:  # MGCA's encoder has no token-type table: add nothing
            with torch.no_grad():
                token_types.weight.zero_()
            token_types.weight.requires_grad_(False)

    def _freeze(self, n: int) -> None:
        if n <= 0:
            return
        layers = self.model.encoder.layer
        if n > len(layers):
            raise ValueError(f"method.text_encoder.freeze_layers={n} but the encoder has {len(layers)} layers")
        frozen = [self.model.embeddings] if self.cfg_freeze_embeddings else []
        for module in [*frozen, *layers[:n]]:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, return_attention: bool = False) -> TextFeatures:
        """Encode token ids ``[B, T]``; returns ``pooled`` ``[B, D]`` and ``tokens`` ``[B, T, D]``."""
        attn = None
        extra = {"position_ids": torch.zeros_like(input_ids)} if self.zero_positions else {}
        if return_attention:
            module = last_self_attention(self.model)
            if module is None:
                raise ValueError(f"return_attention needs a BERT-family text encoder; {type(self.model).__name__} is not one.")
            with LastTextAttentionRecorder(module) as rec:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
            attn = rec.probs(attention_mask)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        tokens = out.last_hidden_state
        return TextFeatures(pooled=pool_tokens(tokens, attention_mask, self.cfg.pool), tokens=tokens,
                            mask=attention_mask, attentions=attn)

    def save_pretrained_parts(self, directory: str | Path) -> None:
        """Write the tokenizer and the model config, so a run can be rebuilt offline from its directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.model.config.save_pretrained(directory)

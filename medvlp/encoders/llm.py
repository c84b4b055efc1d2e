"""MedBLIP's frozen language model: a Hugging Face seq2seq or causal LM fed with a visual soft prompt.

MedBLIP (https://arxiv.org/abs/2305.10799) maps the Q-Former's query outputs into the input embedding
space of a frozen LLM - FLAN-T5-XL (encoder-decoder) or BioMedLM (decoder-only, GPT-2 style) - and trains
the bridge with the LLM's language-modelling loss on the diagnosis answer (spec ``methods/medblip.md``
§2.4, §4.3, §6). :class:`FrozenLLM` owns the frozen model and its tokenizer and builds exactly what the
model consumes, so the method only supplies the soft prompt ``visual`` ``[B, Q, W]``.

Offline stand-ins (spec §12.2), built from config objects with random weights and the word-level tokenizers
of :mod:`medvlp.encoders.tokenizers`: ``tiny_t5`` (2+2 layers, width 64) and ``tiny_gpt2`` (2 layers,
width 64). ``config_overrides`` resizes them (or changes any field of a hub model's config).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.config import LLMConfig

IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("auto", "seq2seq", "causal")
STAND_INS = {"tiny_t5": "t5", "tiny_gpt2": "gpt2"}  # model name -> tokenizer kind
# LoRA targets when method.llm.lora_targets is empty: the query and value projections of each model family
DEFAULT_LORA_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "umt5": ["q", "v"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
}  # fmt: skip


def _tiny_t5_config(tokenizer: Any) -> Any:
    from transformers import T5Config

    pad = tokenizer.pad_token_id
    return T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=len(tokenizer),
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=pad, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        # at T5's own init the untied head of a random, frozen decoder starts at an LM loss of ~35 whose gradient
        # (through weights that never learn) drowns everything upstream; a small init keeps its output near
        # uniform (loss ~ ln V). config_overrides can set it back (initializer_factor=1.0).
        initializer_factor=0.01,
    )


def _tiny_gpt2_config(tokenizer: Any) -> Any:
    from transformers import GPT2Config

    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return GPT2Config(
        n_embd=64, n_layer=2, n_head=2, n_positions=256, vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
    )


_STAND_IN_CONFIGS = {"tiny_t5": _tiny_t5_config, "tiny_gpt2": _tiny_gpt2_config}


def _plain(value: Any) -> Any:
    """An OmegaConf node as plain Python containers; anything else unchanged."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def apply_config_overrides(hf_cfg: Any, overrides: dict[str, Any]) -> None:
    """Set fields of a transformers config; a key the config does not have is a ValueError naming it."""
    for key, value in (_plain(overrides) or {}).items():
        if not hasattr(hf_cfg, key):
            raise ValueError(
                f"method.llm.config_overrides: '{key}' is not a field of {type(hf_cfg).__name__} "
                f"(model_type '{hf_cfg.model_type}'); check the spelling against the model's config.json."
            )
        setattr(hf_cfg, key, value)


def _pad_batch(seqs: list[list[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """Pad token lists to the longest one on ``side``: ``(ids, mask)``, both ``[B, T]`` int64."""
    length = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        where = slice(0, n) if side == "right" else slice(length - n, length)
        ids[i, where] = torch.tensor(seq, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


def positions_from_attention_mask(mask: Tensor) -> Tensor:
    """Position ids that count only attended tokens: ``cumsum(mask) - 1``, clamped at 0 (so left pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class FrozenLLM(nn.Module):
    """A frozen Hugging Face LM (optionally with trainable LoRA adapters) that reads a visual soft prompt.

    Paper: https://arxiv.org/abs/2305.10799 (MedBLIP), spec ``methods/medblip.md`` §2.4, §4.3, §6.

    Config keys (``method.llm``, :class:`~medvlp.config.LLMConfig`): ``model`` (hub name, local directory,
    ``tiny_t5`` or ``tiny_gpt2``), ``kind`` (``auto`` = the config's ``is_encoder_decoder``), ``pretrained``,
    ``tokenizer`` (a directory or hub name overriding the model's own), ``dtype`` (of the frozen weights),
    ``config_overrides``, ``attn_implementation``, ``lora`` / ``lora_r`` / ``lora_alpha`` / ``lora_dropout`` /
    ``lora_targets``, ``grad_checkpointing``.

    Every base parameter has ``requires_grad=False`` and the base model stays in eval mode whatever
    ``train()`` is called with (its dropout is never active); gradients still flow through it to ``visual``.
    With LoRA, only the adapters are trainable (kept in float32) and their dropout follows ``train()``.
    With ``grad_checkpointing``, the transformer blocks recompute their activations in the backward pass
    while the module is in training mode (only the blocks' own flag is set; their dropout stays off).

    The stand-ins' random weights come from torch's RNG at construction (seed before building); they are
    drawn in float32 and then cast to ``dtype``, so one seed gives the same weights up to rounding in every
    dtype. Decoder-only models never get new tokens: without a pad token (or with one outside the embedding
    table, as BioMedLM's added ``<PAD>``) the EOS id pads, always under a zero attention mask.

    Differences from the official code (``Qybc/MedBLIP: medblip/modeling_medblip_t5.py``,
    ``medblip/modeling_medblip_biomedlm.py``): the pad token is the EOS id instead of a new ``<PAD>`` that
    is missing from the frozen embedding table (spec §11 Q3); optional EOS after decoder-only answers (Q7),
    prompt masking (Q6) and mask-derived positions with left padding (Q8) are arguments here, off by
    default; the LM loss is computed in float32 from the logits; ``num_beams`` is honoured (Q10).
    """

    Config = LLMConfig

    fsdp_forward_methods = ("lm_loss", "answer_logprob", "generate")  # sharded by FSDP2: these gather the weights

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        self.cfg = cfg
        if cfg.dtype not in DTYPES:
            raise ValueError(f"method.llm.dtype='{cfg.dtype}': expected one of {', '.join(DTYPES)}")
        if cfg.kind not in KINDS:
            raise ValueError(f"method.llm.kind='{cfg.kind}': expected one of {', '.join(KINDS)}")
        dtype = DTYPES[cfg.dtype]
        name = str(cfg.model)
        stand_in = name in STAND_INS
        self._tokenizer, hf_cfg = self._load_tokenizer_and_config(cfg, name)
        apply_config_overrides(hf_cfg, cfg.config_overrides)

        encoder_decoder = bool(getattr(hf_cfg, "is_encoder_decoder", False))
        seq2seq = encoder_decoder if cfg.kind == "auto" else cfg.kind == "seq2seq"
        if seq2seq != encoder_decoder:
            raise ValueError(
                f"method.llm.kind='{cfg.kind}' but '{name}' is {'an encoder-decoder' if encoder_decoder else 'a decoder-only'} "
                f"model (model_type '{hf_cfg.model_type}'); set method.llm.kind=auto."
            )
        self._seq2seq = seq2seq
        auto_cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        kwargs: dict[str, Any] = {"attn_implementation": cfg.attn_implementation}
        if cfg.pretrained and not stand_in:
            try:
                model = auto_cls.from_pretrained(name, config=hf_cfg, dtype=dtype, **kwargs)
            except (OSError, ValueError) as err:
                raise OSError(
                    f"method.llm.model='{name}' (pretrained=true): the weights could not be loaded "
                    f"({type(err).__name__}: {err}). Give a hub name reachable from this machine, a local directory "
                    f"in the transformers layout, method.llm.pretrained=false, or method.llm.model=tiny_t5 / "
                    f"tiny_gpt2 to run offline."
                ) from err
        elif stand_in:
            model = auto_cls.from_config(hf_cfg, **kwargs)  # float32 init, then cast: same weights in every dtype
        else:
            model = auto_cls.from_config(hf_cfg, dtype=dtype, **kwargs)
        model = model.to(dtype)
        model.requires_grad_(False)

        self._set_special_ids(model)
        if cfg.grad_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:  # transformers before the rename
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self._add_lora(model) if cfg.lora else model
        self._appends_eos = self._tokenizer_appends_eos()
        self.train()

    # ----------------------------------------------------------------------------------------- building

    @staticmethod
    def _load_tokenizer_and_config(cfg: LLMConfig, name: str) -> tuple[Any, Any]:
        from transformers import AutoConfig, AutoTokenizer

        source = str(cfg.tokenizer) if cfg.tokenizer else None
        try:
            if name in STAND_INS:
                if source is None:
                    from medvlp.encoders.tokenizers import medblip_tokenizer_dir

                    source = str(medblip_tokenizer_dir(STAND_INS[name]))
                tokenizer = AutoTokenizer.from_pretrained(source)
                return tokenizer, _STAND_IN_CONFIGS[name](tokenizer)
            tokenizer = AutoTokenizer.from_pretrained(source or name)
            return tokenizer, AutoConfig.from_pretrained(name)
        except OSError as err:
            raise OSError(
                f"method.llm: could not load '{source or name}' ({err}). It must be a model hub name reachable from "
                f"this machine or a local directory in the transformers layout; use method.llm.model=tiny_t5 or "
                f"tiny_gpt2 to run offline."
            ) from err

    def _set_special_ids(self, model: nn.Module) -> None:
        """Pad / EOS ids for batching and generation; never adds a token to the frozen model."""
        tok = self._tokenizer
        eos = tok.eos_token_id
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        rows = model.get_input_embeddings().num_embeddings
        pad = tok.pad_token_id
        if pad is None or pad >= rows:
            if eos is None:
                raise ValueError(
                    f"method.llm.model='{self.cfg.model}': the tokenizer has neither a usable pad token nor an EOS "
                    f"token; give a tokenizer with one (method.llm.tokenizer)."
                )
            if tok.eos_token is not None:
                tok.pad_token = tok.eos_token  # reuse an existing token; the embedding table is not resized
            pad = eos
        self._pad_id, self._eos_id = int(pad), None if eos is None else int(eos)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = self._pad_id
            if gen.eos_token_id is None and self._eos_id is not None:
                gen.eos_token_id = self._eos_id

    def _add_lora(self, model: nn.Module) -> nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ImportError(
                "method.llm.lora=true needs the peft package: pip install peft (or pip install medvlp[llm])."
            ) from err
        cfg = self.cfg
        model_type = model.config.model_type
        targets = [str(t) for t in (_plain(cfg.lora_targets) or [])] or DEFAULT_LORA_TARGETS.get(model_type)
        lora_cfg = LoraConfig(
            r=int(cfg.lora_r), lora_alpha=float(cfg.lora_alpha), lora_dropout=float(cfg.lora_dropout),
            target_modules=targets, fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
        )
        try:
            with warnings.catch_warnings():  # peft still queries a transformers property that is being renamed
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                wrapped = get_peft_model(model, lora_cfg)
        except ValueError as err:
            raise ValueError(
                f"method.llm.lora: could not place LoRA adapters on '{cfg.model}' (model_type '{model_type}', "
                f"targets {targets}): {err}. Set method.llm.lora_targets to the names of its attention projections."
            ) from err
        for pname, p in wrapped.named_parameters():
            is_adapter = "lora_" in pname
            p.requires_grad_(is_adapter)
            if is_adapter and p.dtype != torch.float32:
                p.data = p.data.float()
        return wrapped

    def _tokenizer_appends_eos(self) -> bool:
        """Whether the tokenizer's own special tokens end a text with EOS (T5 does, GPT-2 does not)."""
        if self._eos_id is None:
            return False
        with_specials = self._tokenizer("a")["input_ids"]
        without = self._tokenizer("a", add_special_tokens=False)["input_ids"]
        return len(with_specials) > len(without) and with_specials[-1] == self._eos_id

    # ------------------------------------------------------------------------------------------ state

    def train(self, mode: bool = True) -> FrozenLLM:
        """Set this module's mode; the frozen model stays in eval mode (see the class docstring)."""
        super().train(mode)
        self.model.eval()
        if mode:
            from transformers.modeling_layers import GradientCheckpointingLayer

            for mname, module in self.model.named_modules():
                if "lora_dropout" in mname.split("."):
                    module.train(True)
                elif self.cfg.grad_checkpointing and isinstance(module, GradientCheckpointingLayer):
                    module.training = True  # the block's own flag only: it gates checkpointing, not dropout
        return self

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (LoRA layers injected in place when ``lora``)."""
        return self.model.get_base_model() if self.cfg.lora else self.model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def is_seq2seq(self) -> bool:
        return self._seq2seq

    @property
    def width(self) -> int:
        """The LM's embedding width (``d_model`` / ``n_embd`` / ``hidden_size``): the soft prompt's ``W``."""
        hf_cfg = self.hf_model.config
        for key in ("d_model", "n_embd", "hidden_size"):
            value = getattr(hf_cfg, key, None)
            if value is not None:
                return int(value)
        return int(self.hf_model.get_input_embeddings().embedding_dim)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen weights' dtype (of the input embedding table)."""
        return self.hf_model.get_input_embeddings().weight.dtype

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    def save_pretrained_parts(self, directory: str | Path) -> None:
        """Write the tokenizer and the model config (overrides applied) into ``directory``: with the weights of a
        checkpoint, ``model=<directory>, pretrained=false`` rebuilds this LLM offline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save_pretrained(directory)
        self.hf_model.config.save_pretrained(directory)

    # --------------------------------------------------------------------------------------- tokenize

    def tokenize(
        self, texts: list[str], max_length: int, side: str = "right", add_eos: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """Tokenise ``texts`` into ``(ids, mask)``, both ``[B, T]`` int64 (``mask`` 1 = token), padded with
        the pad id to the longest text of the batch on ``side`` (``right`` or ``left``: pads first).

        Args:
            texts: the strings.
            max_length: at most this many tokens per text, special tokens included; longer texts are
                truncated on the right (a closing EOS, when there is one, is kept).
            side: where the padding goes.
            add_eos: ``None`` - the tokenizer's own special tokens (T5 appends ``</s>``, GPT-2 adds nothing);
                ``True`` - every text ends with the EOS id (the tokenizer's own when it appends one, else
                appended after truncating to ``max_length - 1``; spec §11 Q7 for decoder-only answers);
                ``False`` - no special token at all.
        """
        if side not in ("left", "right"):
            raise ValueError(f"tokenize: side='{side}': expected 'left' or 'right'")
        if max_length < 1:
            raise ValueError(f"tokenize: max_length={max_length}: expected at least 1")
        texts = [str(t) for t in texts]
        tok = self._tokenizer
        if add_eos and not self._appends_eos:
            if self._eos_id is None:
                raise ValueError(f"tokenize: add_eos=True but the tokenizer of '{self.cfg.model}' has no EOS token")
            keep = max_length - 1
            seqs = tok(texts, add_special_tokens=True, truncation=True, max_length=max(keep, 1))["input_ids"]
            seqs = [list(s[:keep]) + [self._eos_id] for s in seqs]
        else:
            seqs = tok(texts, add_special_tokens=add_eos is not False, truncation=True, max_length=max_length)["input_ids"]
        return _pad_batch([list(s) for s in seqs], self._pad_id, side)

    # ------------------------------------------------------------------------------------ LM inputs

    def _embed(self, ids: Tensor) -> Tensor:
        return self.hf_model.get_input_embeddings()(ids)

    def _check_visual(self, visual: Tensor, batch: int) -> None:
        if visual.ndim != 3 or visual.shape[0] != batch or visual.shape[-1] != self.width:
            raise ValueError(
                f"Expected the visual soft prompt as [B={batch}, Q, W={self.width}] (W = the LLM's width), got "
                f"{list(visual.shape)}; project the query features to method.llm's width first."
            )

    def lm_inputs(
        self,
        visual: Tensor,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        answer_ids: Tensor,
        answer_mask: Tensor,
        visual_first: bool = False,
        supervise_prompt: bool = False,
        positions_from_mask: bool = False,
        right_padded: bool = False,
    ) -> dict[str, Tensor]:
        """What the LM consumes for teacher-forced training on the answer (spec §4.3); a pure function of the
        inputs and the frozen embedding table.

        Args:
            visual: ``[B, Q, W]`` soft prompt, any float dtype (cast to the embedding dtype).
            prompt_ids, prompt_mask: ``[B, Tp]`` (any padding side).
            answer_ids, answer_mask: ``[B, Ta]``, right-padded.
            visual_first: ``[visual ; prompt]`` instead of the official ``[prompt ; visual]``.
            supervise_prompt: decoder-only only: the prompt tokens are LM targets too (the official code).
            positions_from_mask: decoder-only only: ``position_ids = cumsum(mask) - 1`` (clamped at 0), so pads
                do not shift positions (spec §11 Q8); else ``0 .. L-1`` as in the official code.
            right_padded: the caller built the answers right-padded (MedBLIP's step does), so the check that
                they are - a read of the device - is skipped.

        Returns:
            seq2seq: ``inputs_embeds`` ``[B, Tp+Q, W]`` (encoder input), ``attention_mask`` ``[B, Tp+Q]``,
            ``labels`` ``[B, Ta]`` = answer ids with pads at -100 (the decoder's teacher-forced targets).
            causal: ``inputs_embeds`` ``[B, Tp+Q+Ta, W]``, ``attention_mask``, ``labels`` (-100 on the visual
            positions, on pads and, unless ``supervise_prompt``, on the prompt) and ``position_ids``, all
            ``[B, Tp+Q+Ta]``; the label at position t is predicted from position t-1.
        """
        b = prompt_ids.shape[0]
        self._check_visual(visual, b)
        if answer_ids.shape[0] != b:
            raise ValueError(f"lm_inputs: {b} prompts but {answer_ids.shape[0]} answers")
        prompt_mask, answer_mask = prompt_mask.long(), answer_mask.long()
        vis = visual.to(self.dtype)
        vis_mask = prompt_mask.new_ones(b, vis.shape[1])
        answer_labels = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)

        parts = [(self._embed(prompt_ids), prompt_mask), (vis, vis_mask)]
        if visual_first:
            parts.reverse()
        if self._seq2seq:
            if not right_padded and bool((answer_mask[:, 1:] > answer_mask[:, :-1]).any()):
                raise ValueError("lm_inputs: encoder-decoder answers must be right-padded (pads after the tokens)")
            return {
                "inputs_embeds": torch.cat([e for e, _ in parts], dim=1),
                "attention_mask": torch.cat([m for _, m in parts], dim=1),
                "labels": answer_labels,
            }

        prompt_labels = (
            prompt_ids.masked_fill(prompt_mask == 0, IGNORE_INDEX) if supervise_prompt
            else torch.full_like(prompt_ids, IGNORE_INDEX)
        )
        vis_labels = torch.full_like(vis_mask, IGNORE_INDEX)
        label_parts = [prompt_labels, vis_labels]
        if visual_first:
            label_parts.reverse()
        parts.append((self._embed(answer_ids), answer_mask))
        label_parts.append(answer_labels)
        mask = torch.cat([m for _, m in parts], dim=1)
        if positions_from_mask:
            positions = positions_from_attention_mask(mask)
        else:
            positions = torch.arange(mask.shape[1], device=mask.device).expand(b, -1)
        return {
            "inputs_embeds": torch.cat([e for e, _ in parts], dim=1),
            "attention_mask": mask,
            "labels": torch.cat(label_parts, dim=1),
            "position_ids": positions,
        }

    def _token_losses(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token cross-entropy in float32 over the supervised positions.

        Returns ``(ce [N], selected [B, T'])``: ``selected`` marks the N target positions (row-major), where
        ``T'`` is the answer length (seq2seq) or the sequence length minus one (causal, after the shift).
        """
        kwargs = dict(inputs)
        labels = kwargs.pop("labels")
        model = self.hf_model
        if self._seq2seq:
            if hasattr(model, "prepare_decoder_input_ids_from_labels"):
                kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
            else:
                kwargs["labels"] = labels  # the model shifts them into decoder inputs itself
        logits = model(**kwargs, use_cache=False).logits
        if not self._seq2seq:  # position t predicts the token at t+1
            logits, labels = logits[:, :-1], labels[:, 1:]
        selected = labels != IGNORE_INDEX
        ce = F.cross_entropy(logits[selected].float(), labels[selected], reduction="none")
        return ce, selected

    def lm_loss(
        self,
        visual: Tensor,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        answer_ids: Tensor,
        answer_mask: Tensor,
        visual_first: bool = False,
        supervise_prompt: bool = False,
        positions_from_mask: bool = False,
        global_mean: bool = False,
        right_padded: bool = False,
    ) -> Tensor:
        """Mean token cross-entropy (float32) over the supervised positions of :meth:`lm_inputs` (same
        arguments); 0 when there is none. Gradients reach ``visual`` (and LoRA adapters), never the base.

        ``global_mean``: under DDP, the mean over the supervised tokens of every process (this process's sum
        times the world size over the all-reduced count), so that the processes' mean - what DDP's gradient
        averaging optimises - is the token mean of the global batch, however the tokens are spread."""
        inputs = self.lm_inputs(visual, prompt_ids, prompt_mask, answer_ids, answer_mask, visual_first=visual_first,
                                supervise_prompt=supervise_prompt, positions_from_mask=positions_from_mask,
                                right_padded=right_padded)
        ce, selected = self._token_losses(inputs)
        count = selected.sum().float()
        if global_mean:
            from medvlp.distributed import all_reduce_sum, world

            size = world()[1]
            if size > 1:
                return ce.sum() * size / all_reduce_sum(count).clamp(min=1)
        return ce.sum() / count.clamp(min=1)

    forward = lm_loss

    def answer_logprob(
        self,
        visual: Tensor,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        answer_ids: Tensor,
        answer_mask: Tensor,
        visual_first: bool = False,
        positions_from_mask: bool = False,
    ) -> Tensor:
        """Summed log-likelihood ``[B]`` (float32) of each answer's tokens given its prompt and soft prompt:
        the score of spec §6.2 ``rank`` mode. The answer's EOS counts when the tokenizer put one there."""
        inputs = self.lm_inputs(visual, prompt_ids, prompt_mask, answer_ids, answer_mask, visual_first=visual_first,
                                supervise_prompt=False, positions_from_mask=positions_from_mask)
        ce, selected = self._token_losses(inputs)
        per_token = torch.zeros(selected.shape, dtype=ce.dtype, device=ce.device)
        per_token = per_token.masked_scatter(selected, -ce)
        return per_token.sum(dim=1)

    # ------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        visual: Tensor,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        visual_first: bool = False,
        max_new_tokens: int = 60,
        num_beams: int = 1,
        positions_from_mask: bool = False,
    ) -> list[str]:
        """Greedy (``num_beams=1``) or beam-search answers, decoded without special tokens and stripped.

        seq2seq: the encoder reads ``[prompt ; visual]`` (or ``[visual ; prompt]``) as in training and the
        decoder starts from its start token. causal: the model reads the same embeddings and continues after
        them; prompts should be left-padded (pads first) so that generation continues right after the last
        real token. ``positions_from_mask`` as in :meth:`lm_inputs` (False: ``0 .. L-1``; True: pads skipped).
        """
        b = prompt_ids.shape[0]
        self._check_visual(visual, b)
        prompt_mask = prompt_mask.long()
        parts = [(self._embed(prompt_ids), prompt_mask), (visual.to(self.dtype), prompt_mask.new_ones(b, visual.shape[1]))]
        if visual_first:
            parts.reverse()
        embeds = torch.cat([e for e, _ in parts], dim=1)
        mask = torch.cat([m for _, m in parts], dim=1)
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds, "attention_mask": mask, "max_new_tokens": int(max_new_tokens),
            "num_beams": int(num_beams), "do_sample": False, "pad_token_id": self._pad_id,
        }
        if self._eos_id is not None:
            kwargs["eos_token_id"] = self._eos_id
        if not self._seq2seq:
            kwargs["position_ids"] = (
                positions_from_attention_mask(mask) if positions_from_mask
                else torch.arange(mask.shape[1], device=mask.device).expand(b, -1).contiguous()
            )
        out = self.hf_model.generate(**kwargs)
        return [text.strip() for text in self._tokenizer.batch_decode(out, skip_special_tokens=True)]

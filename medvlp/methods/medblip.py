"""MedBLIP (Chen et al., 2023, arXiv 2305.10799; ACCV 2024): 3D volumes through a trainable 3D patch embedding
into a frozen 2D ViT, a Q-Former and a frozen language model (spec ``specs/methods/medblip.md``).

Components, each from config: ``method.image_encoder`` (``medblip_vit``: Conv3d patch embedding + 3D
position table in front of a frozen ViT trunk, then a trainable ``ln_vision``), ``method.text_encoder``
(``qformer``: the Q-Former, whose text pass also encodes the texts the ITC terms contrast) and
``method.llm`` (any Hugging Face seq2seq or causal LM, frozen: :class:`~medvlp.encoders.llm.FrozenLLM`).
Heads (§2.3): ``vision_proj`` / ``text_proj`` / ``qa_proj`` (hidden -> ``embed_dim``), ``llm_proj``
(hidden -> the LLM's width), the learnable temperature ``temp`` (0.07), and ``itm_head`` only when the
``itm`` term has a weight.

Terms (§4), weighted by ``method.loss_weights``:

* ``itc_desc`` - the image's best-matching query against the EHR description's [CLS] (symmetric CE
  with label smoothing 0.1, negatives gathered from every process);
* ``itc_qa`` - the same against ``Question: What will this subject be diagnosed with? Answer: <answer>``;
* ``lm`` - the frozen LLM, given the prompt (description + question) and the 32 projected queries,
  produces the answer (seq2seq: decoder targets; decoder-only: one sequence, labels masked as §4.3 says);
* ``itm`` - BLIP-2's image-text matching with hard negatives (absent from the released code: weight 0).

The official code's bugs (§11) are flags; fixes the code cannot run without are always on: the
Q-Former keeps its word and position tables (Q1), the Q-Former reads its own WordPiece ids (Q2), a
decoder-only LLM reuses EOS as padding and is never given new tokens (Q3), similarities come from
einsums (Q14). Flags: ``loss_weights.itm`` (Q4), ``truncate`` (Q5), ``lm_supervise_prompt`` (Q6),
``answer_eos`` (Q7), ``prompt_padding`` (Q8), ``visual_tokens_first`` (Q9), ``generate_num_beams`` (Q10),
``clamp_temperature`` (Q11), ``data.orientation`` (Q12), ``data.clip_percentiles`` (Q13), ``itc_qa_positive``
(Q15), ``checkpoint_frozen`` (Q17), ``weight_decay_rule``.

Differences from the official code (``Qybc/MedBLIP: medblip/modeling_medblip_t5.py``,
``modeling_medblip_biomedlm.py``): the ITC features are gathered across processes (the code runs on one
GPU); answers come from the datamodule's class labels through ``method.answers`` (exact labels, never
substring replacement, spec Q19); rows without a diagnosis get the empty answer, as in the code.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageTextBatch
from medvlp.config import FrozenTrunkViTConfig, LLMConfig, MethodConfig, QFormerConfig, bounded
from medvlp.encoders.llm import STAND_INS
from medvlp.losses.medblip import hard_negatives, query_itc, query_similarity
from medvlp.methods.base import VLPMethod
from medvlp.registry import register_method

log = logging.getLogger(__name__)

QUESTION = "What will this subject be diagnosed with?"
ANSWERS = ["Not demented", "mild cognitive impairment (MCI)", "Dementia"]  # classes CN, MCI, AD (§3.3)
CLASS_IDS = "class_ids"  # batch.meta key: each row's class, listed on the host before the transfer


@dataclass
class MedBLIPConfig(MethodConfig):
    """``method.*`` of MedBLIP (``configs/method/medblip.yaml``; the paper's in ``configs/experiment/medblip_paper.yaml``)."""

    name: str = "medblip"
    image_encoder: FrozenTrunkViTConfig = field(default_factory=FrozenTrunkViTConfig)
    text_encoder: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"itm": 0.0})  # ITM is not in the released code
    embed_dim: int = bounded(256, gt=0)
    temperature: float = bounded(0.07, gt=0)  # initial tau, learnable
    clamp_temperature: bool = False  # Q11: clamp tau to temperature_range before every forward (official: never)
    temperature_range: list[float] = bounded(default_factory=lambda: [0.001, 0.5], gt=0, each=True)
    label_smoothing: float = bounded(0.1, ge=0, lt=1)
    itc_qa_positive: Literal["diagonal", "same_label"] = "diagonal"  # Q15: same-label QA strings as positives
    gather_distributed: bool = True  # ITC negatives from every process
    question: str = QUESTION
    answers: list[str] = field(default_factory=lambda: list(ANSWERS))  # the answer of each class, in label order
    text_max_length: int = bounded(60, gt=0)  # Q-Former tokens of a description / QA string (padded to it)
    prompt_max_length: int = bounded(60, gt=0)  # LLM tokens of a prompt and of an answer (T5 60, BioMedLM 100)
    truncate: Literal["prompt", "description"] = "prompt"  # Q5: official cuts the prompt's end (maybe the question)
    lm_supervise_prompt: bool = True  # Q6, decoder-only: prompt tokens are LM targets (official)
    answer_eos: bool = False  # Q7, decoder-only: append EOS to the answer
    prompt_padding: Literal["right", "left"] = "right"  # Q8: left = pads first, positions from the mask
    visual_tokens_first: bool = False  # Q9: official puts the prompt before the 32 visual tokens
    generate_max_new_tokens: int = bounded(60, gt=0)  # official: 60 (T5); BioMedLM relies on a 20-token total
    generate_num_beams: int = bounded(1, gt=0)  # Q10: the official generate hard-codes 1
    weight_decay_rule: Literal["names", "shapes"] = "names"  # names: official (no decay on *bias* / LayerNorm.*); shapes: the base rule
    itm_seed: int = bounded(0, ge=0)  # seed of the hard-negative draws (per step)
    checkpoint_frozen: bool = True  # Q17: checkpoints hold the frozen ViT and LLM too (official); false = trainable parts only


@register_method("medblip")
class MedBLIP(VLPMethod):
    """MedBLIP: frozen ViT + Q-Former + frozen LLM on 3D volumes with EHR text (see the module docstring)."""

    Config = MedBLIPConfig
    terms = ("itc_desc", "itc_qa", "lm", "itm")
    global_batch_keys = ("gather_distributed",)

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        lo, hi = (float(v) for v in cfg.temperature_range) if len(cfg.temperature_range) == 2 else (1.0, 0.0)
        if not 0 < lo < hi:
            raise ValueError(f"method.temperature_range={list(cfg.temperature_range)}: expected [low, high] with 0 < low < high.")
        if not cfg.answers or len(set(cfg.answers)) != len(cfg.answers) or any(not str(a).strip() for a in cfg.answers):
            raise ValueError(f"method.answers={list(cfg.answers)}: expected distinct, non-empty answers, one per class.")
        if not cfg.checkpoint_frozen and (cfg.llm.model in STAND_INS or not cfg.llm.pretrained or not (
                cfg.image_encoder.pretrained or cfg.image_encoder.trunk_checkpoint)):
            raise ValueError("method.checkpoint_frozen=false leaves the frozen ViT and LLM out of checkpoints, so they must "
                             "come from a source when the run is reloaded: a pretrained method.llm (not a stand-in) and "
                             "method.image_encoder.pretrained=true or a trunk_checkpoint.")
        if cfg.image_encoder.name != "medblip_vit" or cfg.text_encoder.name != "qformer":
            raise ValueError(f"MedBLIP needs method.image_encoder.name=medblip_vit and method.text_encoder.name=qformer, "
                             f"got '{cfg.image_encoder.name}' and '{cfg.text_encoder.name}'.")

    def build(self) -> None:
        from medvlp.encoders.llm import FrozenLLM

        c = self.cfg
        width = int(self.image_encoder.out_dim)
        if width != int(self.text_encoder.encoder_width):
            raise ValueError(f"method.text_encoder.encoder_width={self.text_encoder.encoder_width} must equal the image "
                             f"encoder's width {width} (method.image_encoder).")
        hidden = int(self.text_encoder.out_dim)
        self.llm = FrozenLLM(c.llm)
        self.vision_proj = nn.Linear(hidden, c.embed_dim)
        self.text_proj = nn.Linear(hidden, c.embed_dim)
        self.qa_proj = nn.Linear(hidden, c.embed_dim)
        self.llm_proj = nn.Linear(hidden, int(self.llm.width))
        self.temp = nn.Parameter(torch.tensor([float(c.temperature)]))  # 1-d: FSDP2 shards no 0-d parameter
        self.itm_head = nn.Linear(hidden, 2) if self.loss_weight("itm") > 0 else None
        self._itm_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ features
    def temperature_value(self) -> Tensor:
        """``tau``; with ``clamp_temperature`` clamped in place to ``temperature_range`` first (Q11)."""
        if self.cfg.clamp_temperature:
            with torch.no_grad():
                self.temp.clamp_(*(float(v) for v in self.cfg.temperature_range))
        return self.temp[0]

    def temperature(self) -> float:
        return float(self.temperature_value().detach())

    def image_sequence(self, images: Tensor) -> Tensor:
        """``[B, 1 + N, W]``: the frozen ViT's output sequence after ``ln_vision`` (class token first)."""
        if images.ndim != 5:
            raise ValueError(f"MedBLIP takes one volume per study [B, C, D, H, W], got {tuple(images.shape)}.")
        f = self.encode_image(images)
        return torch.cat([f.pooled[:, None], f.tokens], dim=1)

    def queries(self, images: Tensor) -> Tensor:
        """``[B, Q, H]``: the Q-Former's query outputs for a batch of volumes."""
        return self.text_encoder.encode_queries(self.image_sequence(images))

    def embed_image(self, images: Tensor) -> Tensor:
        """``[B, Q, embed_dim]`` normalised query features (:meth:`similarity` takes the best query)."""
        return F.normalize(self.vision_proj(self.queries(images)), dim=-1)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, embed_dim]``: the normalised description feature ([CLS] of the Q-Former's text pass)."""
        return F.normalize(self.text_proj(self.encode_text(input_ids, attention_mask).pooled), dim=-1)

    def similarity(self, img_emb: Tensor, txt_emb: Tensor, anatomy: str | None = None) -> Tensor:
        return query_similarity(img_emb, txt_emb) if img_emb.ndim == 3 else img_emb @ txt_emb.T

    def qformer_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Q-Former ids and mask of ``texts``, padded to ``text_max_length`` and truncated (the official padding)."""
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=int(self.cfg.text_max_length),
                             return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def text_features(self, texts: list[str], proj: nn.Module) -> Tensor:
        ids, mask = self.qformer_tokens(texts)
        return F.normalize(proj(self.encode_text(ids, mask).pooled), dim=-1)

    def qa_string(self, answer: str, question: str | None = None) -> str:
        return f"Question: {question or self.cfg.question} Answer: {answer}"

    def class_ids(self, batch: ImageTextBatch, device: torch.device | None = None) -> Tensor:
        """``[B]`` class index of each row (-100: no diagnosis) on ``device`` (default the method's); the labels
        are one-hot in ``answers`` order."""
        n = len(batch)
        device = device or self.device
        if batch.labels is None:
            return torch.full((n,), -100, dtype=torch.long, device=device)
        labels = batch.labels.to(device)
        if labels.shape[1] != len(self.cfg.answers):
            raise ValueError(f"The batch has {labels.shape[1]} label columns but method.answers has {len(self.cfg.answers)} "
                             f"answers ({list(self.cfg.answers)}); give one answer per class, in the datamodule's order.")
        known = ~torch.isnan(labels).any(1)
        return torch.where(known, labels.nan_to_num(0).argmax(1), torch.full_like(known, -100, dtype=torch.long))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this on the host before moving the batch to the device: the class of every row as a
        list (``batch.meta["class_ids"]``), so that the step builds its answer strings without reading the device."""
        if isinstance(batch, ImageTextBatch) and batch.labels is not None and batch.labels.device.type == "cpu":
            batch.meta = {**(batch.meta or {}), CLASS_IDS: self.class_ids(batch, batch.labels.device).tolist()}
        return batch

    def descriptions(self, batch: ImageTextBatch) -> list[str]:
        """The EHR descriptions (the datamodule's ``descriptions``; else the batch texts)."""
        return list(batch.descriptions) if batch.descriptions is not None else list(batch.texts)

    # ------------------------------------------------------------------ the LLM's inputs
    def _pad(self, rows: list[list[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
        longest = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), longest), int(pad_id), dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            if not r:
                continue
            sl = slice(longest - len(r), longest) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def prompt_tokens(self, descriptions: list[str], questions: list[str] | None = None) -> tuple[Tensor, Tensor, int]:
        """LLM ids / mask of ``description + "Question: <q> Answer: "`` (§3.3), padded on ``prompt_padding``.

        ``truncate=prompt`` cuts the prompt's end at ``prompt_max_length`` (official: a long description
        removes the question, Q5); ``description`` cuts the description so that the question survives.

        Returns:
            ``(ids, mask, truncated)``: the number of prompts that were cut.
        """
        tok, limit = self.llm.tokenizer, int(self.cfg.prompt_max_length)
        questions = questions or [self.cfg.question] * len(descriptions)
        rows, cut = [], 0
        for d, q in zip(descriptions, questions, strict=True):
            tail = f"Question: {q} Answer: "
            if self.cfg.truncate == "prompt":
                full = tok(d + tail)["input_ids"]
                cut += len(full) > limit
                rows.append(full[:limit])
            else:
                q_ids = tok(tail)["input_ids"]
                d_ids = tok(d, add_special_tokens=False)["input_ids"] if d else []
                keep = max(0, limit - len(q_ids))
                cut += len(d_ids) > keep
                rows.append(d_ids[:keep] + q_ids[:limit])
        ids, mask = self._pad(rows, self.llm.tokenizer.pad_token_id, self.cfg.prompt_padding)
        return ids, mask, cut

    def answer_tokens(self, answers: list[str]) -> tuple[Tensor, Tensor]:
        """LLM ids / mask of the answers, right-padded, truncated at ``prompt_max_length``; decoder-only with
        ``answer_eos`` end with EOS (Q7). An empty answer (no diagnosis) is the empty string, as in the code."""
        tok, limit = self.llm.tokenizer, int(self.cfg.prompt_max_length)
        rows = []
        for a in answers:
            ids = tok(a)["input_ids"] if a or self.llm.is_seq2seq else []
            if not self.llm.is_seq2seq and self.cfg.answer_eos:
                ids = [*ids, int(tok.eos_token_id)]
            rows.append(ids[:limit])
        return self._pad(rows, tok.pad_token_id, "right")

    def lm_kwargs(self) -> dict[str, Any]:
        return {"visual_first": bool(self.cfg.visual_tokens_first),
                "positions_from_mask": self.cfg.prompt_padding == "left"}

    # ------------------------------------------------------------------ the method
    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        c = self.cfg
        seq = self.image_sequence(batch.images)
        z_raw = self.text_encoder.encode_queries(seq)  # [B, Q, H]
        z = F.normalize(self.vision_proj(z_raw), dim=-1)
        tau = self.temperature_value()
        eps = float(c.label_smoothing)
        desc = self.descriptions(batch)
        cls = self.class_ids(batch)
        ids = batch.meta.get(CLASS_IDS) if batch.meta else None  # prepared on the host before the transfer
        answers = [c.answers[int(k)] if k >= 0 else "" for k in (ids if ids is not None else cls.tolist())]
        out: dict[str, Tensor] = {}
        desc_ids = desc_mask = None
        if self.loss_weight("itc_desc") > 0 or self.itm_head is not None:
            desc_ids, desc_mask = self.qformer_tokens(desc)
            t = F.normalize(self.text_proj(self.encode_text(desc_ids, desc_mask).pooled), dim=-1)
            if self.loss_weight("itc_desc") > 0:
                out["itc_desc"] = query_itc(z, t, tau, eps, c.gather_distributed)
        if self.loss_weight("itc_qa") > 0:
            a = self.text_features([self.qa_string(x) for x in answers], self.qa_proj)
            same = cls if c.itc_qa_positive == "same_label" else None
            out["itc_qa"] = query_itc(z, a, tau, eps, c.gather_distributed, labels=same)
        if self.loss_weight("lm") > 0:
            p_ids, p_mask, cut = self.prompt_tokens(desc)
            a_ids, a_mask = self.answer_tokens(answers)
            out["lm"] = self.llm.lm_loss(self.llm_proj(z_raw), p_ids, p_mask, a_ids, a_mask,
                                         supervise_prompt=bool(c.lm_supervise_prompt), global_mean=bool(c.gather_distributed),
                                         right_padded=True,
                                         **self.lm_kwargs())
            self.log_terms({"prompts_truncated": float(cut)}, batch_size=len(batch))
        if self.itm_head is not None:
            out["itm"] = self.itm_loss(seq, z, t, desc_ids, desc_mask, tau)
        self.log_terms({"temperature": tau}, batch_size=len(batch))
        return out

    def itm_loss(self, seq: Tensor, z: Tensor, t: Tensor, ids: Tensor, mask: Tensor, tau: Tensor) -> Tensor:
        """BLIP-2's image-text matching (§4.2): per image one hard-negative description and per description one
        hard-negative image (drawn within this process's batch, never the positive), the Q-Former in joint
        mode, a 2-way head on every query output averaged over the queries; CE over ``[B positives, 2B negatives]``."""
        if self._itm_generator is None:
            self._itm_generator = torch.Generator(device="cpu")
            self._itm_generator.manual_seed(int(self.cfg.itm_seed))
        sim = query_similarity(z, t).float().cpu()
        tau = float(tau.detach())
        neg_txt = hard_negatives(sim, tau, self._itm_generator).to(seq.device)
        neg_img = hard_negatives(sim.T, tau, self._itm_generator).to(seq.device)
        images = torch.cat([seq, seq, seq[neg_img]])
        ids_all = torch.cat([ids, ids[neg_txt], ids])
        mask_all = torch.cat([mask, mask[neg_txt], mask])
        joint = self.text_encoder.encode_joint(images, ids_all, mask_all)
        q = int(self.text_encoder.num_query_tokens)
        logits = self.itm_head(joint[:, :q]).mean(1)
        b = seq.shape[0]
        target = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(seq.device)
        return F.cross_entropy(logits, target)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, batch: ImageTextBatch, prompts: list[str] | None = None, **kwargs: Any) -> list[str]:
        """Answers generated by the frozen LLM from each volume's 32 query tokens and its prompt (§6.1, §6.3).

        Args:
            batch: volumes and their EHR descriptions.
            prompts: one question per row (None: the diagnosis question).
            kwargs: ``max_new_tokens``, ``num_beams`` (default: ``generate_max_new_tokens`` / ``generate_num_beams``).
        """
        p_ids, p_mask, _ = self.prompt_tokens(self.descriptions(batch), prompts)
        visual = self.llm_proj(self.queries(batch.images.to(self.device)))
        return self.llm.generate(visual, p_ids, p_mask, visual_first=bool(self.cfg.visual_tokens_first),
                                 max_new_tokens=int(kwargs.get("max_new_tokens") or self.cfg.generate_max_new_tokens),
                                 num_beams=int(kwargs.get("num_beams") or self.cfg.generate_num_beams),
                                 positions_from_mask=True)

    @torch.no_grad()
    def answer_scores(self, batch: ImageTextBatch, mode: str) -> Tensor:
        """``[B, K]`` scores of the K class answers (§6.2): ``itc`` - best-query similarity of the volume to each
        QA string divided by tau; ``rank`` - the LLM's summed log-likelihood of each answer given the prompt and
        the visual tokens. Their softmax is the class probability."""
        z_raw = self.queries(batch.images.to(self.device))
        if mode == "itc":
            z = F.normalize(self.vision_proj(z_raw), dim=-1)
            qa = self.text_features([self.qa_string(a) for a in self.cfg.answers], self.qa_proj)
            return query_similarity(z, qa) / self.temperature_value()
        if mode != "rank":
            raise ValueError(f"answer_scores mode must be 'itc' or 'rank', got '{mode}'.")
        p_ids, p_mask, _ = self.prompt_tokens(self.descriptions(batch))
        visual = self.llm_proj(z_raw)
        cols = []
        for answer in self.cfg.answers:
            a_ids, a_mask = self.answer_tokens([answer] * len(batch))
            cols.append(self.llm.answer_logprob(visual, p_ids, p_mask, a_ids, a_mask, **self.lm_kwargs()))
        return torch.stack(cols, dim=1).float()

    # ------------------------------------------------------------------ run directory
    def pretrained_parts(self) -> dict[str, Any]:
        """The LLM's tokenizer and config (``<run>/llm``) when it comes from a hub or a directory; the offline
        stand-ins are rebuilt from their names."""
        return {} if self.cfg.llm.model in STAND_INS else {"llm": self.llm}

    @classmethod
    def offline_config(cls, cfg: Any, run_dir: Any, saved: Any) -> None:
        """The LLM from ``<run>/llm`` with the checkpoint's weights; with ``checkpoint_frozen=false`` the frozen
        weights are not in the checkpoint, so the trunk and the LLM are read from their sources again."""
        from pathlib import Path

        if not saved.method.checkpoint_frozen:
            for key in ("pretrained", "trunk_checkpoint"):
                cfg.method.image_encoder[key] = saved.method.image_encoder[key]
            return
        parts = Path(run_dir) / "llm"
        if cfg.method.llm.model not in STAND_INS and parts.is_dir():
            cfg.method.llm.model, cfg.method.llm.tokenizer, cfg.method.llm.pretrained = str(parts), "", False

    def frozen_keys(self) -> list[str]:
        """State-dict keys of the frozen trunk and LLM (LoRA adapters excluded): what ``checkpoint_frozen=false``
        leaves out of checkpoints."""
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
        owners = ("image_encoder.trunk_blocks.", "image_encoder.cls_token", "llm.")
        return [k for k in self.state_dict() if k.startswith(owners) and (k in frozen or "lora_" not in k)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``checkpoint_frozen=false`` (Q17): checkpoints hold the trainable parts only (the frozen ViT and LLM
        are read from their sources when the run is reloaded)."""
        if not self.cfg.checkpoint_frozen:
            for key in self.frozen_keys():
                checkpoint["state_dict"].pop(key, None)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Strict, except that with ``checkpoint_frozen=false`` the frozen trunk and LLM may be absent (they were
        built from their sources); any other missing or unexpected key is still an error."""
        if self.cfg.checkpoint_frozen:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        allowed = set(self.frozen_keys())
        missing = [k for k in result.missing_keys if k not in allowed]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"MedBLIP checkpoint does not match the model: missing {missing[:5]}, unexpected "
                               f"{result.unexpected_keys[:5]} (the frozen trunk and LLM may be absent).")
        return result

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """``weight_decay_rule=names`` (official): no weight decay on parameters whose name contains ``bias``,
        ``LayerNorm.bias`` or ``LayerNorm.weight``; everything else (``temp``, ``ln_vision.weight``, the
        position table) decays. ``shapes``: the base rule (norms, biases and 1-d parameters exempt)."""
        if self.cfg.weight_decay_rule == "shapes":
            return super().param_groups()
        o = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if re.search(r"bias|LayerNorm\.(bias|weight)", name) else decay).append(p)
        return [g for g in ({"params": decay, "weight_decay": o.weight_decay, "lr": o.lr},
                            {"params": no_decay, "weight_decay": 0.0, "lr": o.lr}) if g["params"]]


__all__ = ["ANSWERS", "QUESTION", "MedBLIP", "MedBLIPConfig"]

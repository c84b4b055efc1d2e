"""fVLM: anatomy-level vision-language alignment for CT (Shui et al., ICLR 2025).

Spec: ``specs/methods/fvlm.md``. Contrast happens per anatomy instead of per volume:

* the image tower (``method.image_encoder.name=fvlm_vit``, :mod:`medvlp.encoders.fvlm_vit`) returns
  four token sets (the raw residual stream after blocks 4, 7, 10 and the final normalised tokens);
* for anatomy ``k`` of sample ``b``, the tokens whose patch holds any voxel of the anatomy (label
  ``k + 1`` of ``batch.anatomy_masks``, max-pooled to the token grid) are pooled by a learnable query
  ``q_k`` (initialised to zeros) through one 4-head attention shared by all anatomies, over the
  tokens of all four levels (§2.3); then ``vision_projs[k]`` (one per anatomy) and L2 norm;
* the anatomy's report text (``batch.anatomy_texts[k]``; a normal text longer than the template
  loses the template, §3.2) goes through the text encoder's [CLS] and the shared ``text_proj``;
* per anatomy, the samples in which it is **intact** (present and touching no face of the crop,
  §3.6) form a soft-target InfoNCE problem over the global batch with false-negative reduction
  targets (normal samples, identical texts; §4.2, :mod:`medvlp.losses.anatomy`);
* an anatomy contributes only when some sample of the global batch is intact and abnormal for it,
  and only if its targets are not all equal; the loss is the **sum** over contributing anatomies
  (term ``itc``; each anatomy's value is logged as ``<anatomy>_itc``). A batch in which no anatomy
  contributes is skipped (no optimiser step), as in the released code.

Everything is batched: token sets of variable size are boolean masks over the token grid, the
pooling is one masked attention over ``[B, A, tokens]``, and features are gathered across processes
padded to the largest per-rank count (``gather_with_grad=false``: only the local rows carry a
gradient, the released code's "plain gather").

Zero-shot (§7.1): :meth:`embed_batch` gives ``[B, A, D]`` (NaN for an anatomy absent from the
volume) and :meth:`similarity` scores a prompt against the anatomy its prompt file names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageTextBatch
from medvlp.config import AnatomyViTConfig, ImageEncoderConfig, MethodConfig, bounded
from medvlp.distributed import all_reduce_sum, gather_rows, world
from medvlp.losses.anatomy import fnr_targets, soft_target_clip, text_keys
from medvlp.methods.base import VLPMethod
from medvlp.registry import register_method

TEXT_PADDING = ("max_length", "longest")


@dataclass
class FVLMConfig(MethodConfig):
    """``method.*`` of fVLM (``configs/method/fvlm.yaml``; the released recipe: ``configs/experiment/fvlm_ctrate.yaml``)."""

    name: str = "fvlm"
    image_encoder: ImageEncoderConfig = field(default_factory=AnatomyViTConfig)
    embed_dim: int = 256
    anatomies: list[str] = field(default_factory=lambda: ["lung", "heart", "esophagus", "aorta"])  # label k+1 = anatomies[k]
    pool_heads: int = bounded(4, gt=0)  # heads of the shared anatomy-pooling attention
    pool_dropout: float = bounded(0.1, ge=0, lt=1)  # dropout on its attention probabilities
    temperature: float = bounded(0.07, gt=0)  # initial tau (learnable; logits = cosine / tau)
    temperature_min: float = bounded(0.001, gt=0)  # tau is clamped to [min, max] before every forward
    temperature_max: float = bounded(0.5, gt=0)
    normal_template: str = "{anatomy} shows no significant abnormalities."  # a normal anatomy's report text
    strip_template: bool = True  # a normal text longer than the template loses the template (§3.2 step 5)
    fnr_normal: bool = True  # normal samples of an anatomy are positives of each other (§4.2)
    fnr_duplicates: bool = True  # samples with identical anatomy texts are positives of each other
    intact_only: bool = True  # an anatomy touching a face of the crop is left out for that sample (§3.6)
    gather_distributed: bool = True  # each anatomy's problem spans the global batch (every process)
    gather_with_grad: bool = False  # false: only local rows carry a gradient (released code); true: all
    text_max_length: int = bounded(384, gt=0)  # anatomy texts are padded / truncated to this many tokens
    text_padding: str = "max_length"  # max_length (released code) | longest (pad to the longest text)


@register_method("fvlm")
class FVLM(VLPMethod):
    """Anatomy-level CLIP with false-negative reduction (term ``itc`` = the sum over anatomies)."""

    Config = FVLMConfig
    terms = ("itc",)
    global_batch_keys = ("gather_distributed",)
    may_skip_batches = True

    @classmethod
    def validate_config(cls, c: FVLMConfig) -> None:
        names = [str(a) for a in c.anatomies]
        if not names or len(set(names)) != len(names) or not all(n.strip() for n in names):
            raise ValueError(f"method.anatomies={names}: expected distinct, non-empty anatomy names (fVLM: lung, heart, "
                             f"esophagus, aorta); the k-th is label k+1 of the anatomy label map.")
        if c.image_encoder.name != "fvlm_vit":
            raise ValueError(f"method.image_encoder.name must be fvlm_vit for fVLM (four token levels), got "
                             f"'{c.image_encoder.name}'.")
        if int(c.image_encoder.width) % int(c.pool_heads):
            raise ValueError(f"method.pool_heads={c.pool_heads} must divide method.image_encoder.width={c.image_encoder.width}.")
        if not 0 < float(c.temperature_min) <= float(c.temperature) <= float(c.temperature_max):
            raise ValueError(f"method.temperature={c.temperature} must lie in [temperature_min, temperature_max] = "
                             f"[{c.temperature_min}, {c.temperature_max}].")
        if "{anatomy}" not in c.normal_template:
            raise ValueError(f"method.normal_template='{c.normal_template}' must contain {{anatomy}}.")
        if c.text_padding not in TEXT_PADDING:
            raise ValueError(f"method.text_padding='{c.text_padding}': choose one of {list(TEXT_PADDING)}.")

    def build(self) -> None:
        c = self.cfg
        width = self.image_encoder.out_dim
        self.anatomies = [str(a) for a in c.anatomies]
        self.attention = nn.MultiheadAttention(width, int(c.pool_heads), dropout=float(c.pool_dropout), batch_first=True)
        self.query_tokens = nn.Parameter(torch.zeros(len(self.anatomies), width))
        self.vision_projs = nn.ModuleList(nn.Linear(width, c.embed_dim) for _ in self.anatomies)
        self.text_proj = nn.Linear(self.text_encoder.out_dim, c.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(c.temperature)))

    # ------------------------------------------------------------------ anatomy geometry
    def label_map(self, batch: ImageTextBatch) -> Tensor:
        """``batch.anatomy_masks`` as ``[B, D, H, W]`` (a clear error when the loader gives none)."""
        masks = batch.anatomy_masks
        if masks is None:
            raise ValueError("fVLM needs each volume's anatomy label map: set data.anatomy_dir (TotalSegmentator output) "
                             "and data.anatomy_groups (fvlm4 for lung, heart, esophagus, aorta).")
        return masks[:, 0] if masks.ndim == 5 else masks

    def anatomy_presence(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(present, touching)`` ``[B, A]`` bool: the anatomy has a voxel in the volume / on one of its six faces."""
        b = labels.shape[0]
        faces = torch.cat([labels[:, 0].reshape(b, -1), labels[:, -1].reshape(b, -1), labels[:, :, 0].reshape(b, -1),
                           labels[:, :, -1].reshape(b, -1), labels[:, :, :, 0].reshape(b, -1), labels[:, :, :, -1].reshape(b, -1)], 1)
        flat = labels.reshape(b, -1)
        present = torch.stack([(flat == k + 1).any(1) for k in range(len(self.anatomies))], 1)
        touching = torch.stack([(faces == k + 1).any(1) for k in range(len(self.anatomies))], 1)
        return present, touching

    def token_flags(self, labels: Tensor) -> Tensor:
        """``[B, A, L]`` bool: token ``t`` belongs to anatomy ``k`` iff its patch holds a voxel labelled ``k + 1``
        (a max-pool of the anatomy's mask with kernel = stride = the patch size)."""
        b, d, h, w = labels.shape
        pd, ph, pw = self.image_encoder.patch_size
        if d % pd or h % ph or w % pw:
            raise ValueError(f"The anatomy label map {tuple(labels.shape[1:])} is not a multiple of the patch size "
                             f"{(pd, ph, pw)}; it must be aligned with the volume.")
        x = labels.reshape(b, d // pd, pd, h // ph, ph, w // pw, pw)
        return torch.stack([(x == k + 1).any(6).any(4).any(2).reshape(b, -1) for k in range(len(self.anatomies))], 1)

    # ------------------------------------------------------------------ pooling and embeddings
    def pool(self, levels: list[Tensor], flags: Tensor) -> Tensor:
        """Attention pooling of every anatomy of every sample: ``[B, A, width]``.

        The query of anatomy ``k`` attends over the tokens of all ``levels`` (each ``[B, L, width]``) whose
        flag is set (``flags`` ``[B, A, L]``), with the weights of ``self.attention`` (an
        ``nn.MultiheadAttention``: the same result as calling it per sample and anatomy). A sample without
        the anatomy gets a meaningless (finite) row, which callers leave out.
        """
        mha = self.attention
        kv = torch.cat(levels, dim=1)  # [B, nL * L, W]
        b, t, width = kv.shape
        heads = mha.num_heads
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        q = F.linear(self.query_tokens.to(kv.dtype), wq, bq)  # [A, W]
        k = F.linear(kv, wk, bk).view(b, t, heads, -1).transpose(1, 2)  # [B, h, T, hd]
        v = F.linear(kv, wv, bv).view(b, t, heads, -1).transpose(1, 2)
        q = q.view(1, -1, heads, width // heads).transpose(1, 2).expand(b, -1, -1, -1)  # [B, h, A, hd]
        keep = flags.repeat(1, 1, len(levels))  # [B, A, nL * L], level-major like kv
        keep = keep | ~keep.any(-1, keepdim=True)  # an absent anatomy attends everywhere (finite; discarded)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None],
                                             dropout_p=float(mha.dropout) if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, -1, width)  # [B, A, W]
        return mha.out_proj(out)

    def project_all(self, pooled: Tensor) -> Tensor:
        """Each anatomy's ``vision_projs[k]`` on ``pooled`` ``[B, A, width]``, L2-normalised: ``[B, A, D]``."""
        weight = torch.stack([p.weight for p in self.vision_projs])  # [A, D, W]
        bias = torch.stack([p.bias for p in self.vision_projs])  # [A, D]
        return F.normalize(torch.einsum("baw,adw->bad", pooled, weight) + bias, dim=-1)

    def embed_anatomies(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(embeddings [B, A, D], present [B, A])`` of every anatomy present in each volume."""
        feats = self.encode_image(images)
        flags = self.token_flags(labels)
        return self.project_all(self.pool(feats.levels, flags)), flags.any(-1)

    def embed_batch(self, batch: ImageTextBatch) -> Tensor:
        """``[B, A, D]``: each anatomy's embedding, NaN where the volume does not contain the anatomy."""
        emb, present = self.embed_anatomies(batch.images, self.label_map(batch))
        return emb.masked_fill(~present[..., None], float("nan"))

    def embed_image(self, images: Tensor, anatomy_masks: Tensor | None = None) -> Tensor:
        """``[B, A, D]`` anatomy embeddings of ``images`` with their label maps ``anatomy_masks`` ``[B, (1,) D, H, W]``."""
        if anatomy_masks is None:
            raise ValueError("fVLM embeds anatomies, not whole volumes: pass the anatomy label map (the loaders do with "
                             "data.anatomy_dir set).")
        labels = anatomy_masks[:, 0] if anatomy_masks.ndim == 5 else anatomy_masks
        emb, present = self.embed_anatomies(images, labels)
        return emb.masked_fill(~present[..., None], float("nan"))

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(self.text_proj(self.encode_text(input_ids, attention_mask).pooled), dim=-1)

    def similarity(self, img_emb: Tensor, txt_emb: Tensor, anatomy: str | None = None) -> Tensor:
        """Cosine scores ``[N, T]``: with ``anatomy``, of that anatomy's embedding (NaN where it is absent);
        without, the mean over the anatomies present (retrieval with whole reports)."""
        if img_emb.ndim == 2:
            return img_emb @ txt_emb.T
        if anatomy is not None:
            if anatomy not in self.anatomies:
                raise ValueError(f"A prompt names the anatomy '{anatomy}', which this fVLM run does not embed "
                                 f"(method.anatomies={self.anatomies}).")
            return img_emb[:, self.anatomies.index(anatomy)] @ txt_emb.T
        return torch.nanmean(torch.einsum("nad,td->nat", img_emb, txt_emb), dim=1)

    def temperature(self) -> float:
        return float(self.temp.detach().clamp(float(self.cfg.temperature_min), float(self.cfg.temperature_max)))

    # ------------------------------------------------------------------ loss
    def report_texts(self, batch: ImageTextBatch, k: int, rows: Tensor) -> list[str]:
        """The anatomy-``k`` texts of ``rows`` as encoded: a normal text longer than the template loses it."""
        name = self.anatomies[k]
        texts = batch.anatomy_texts.get(name) if batch.anatomy_texts else None
        if texts is None:
            raise ValueError(f"The batch has no '{name}' anatomy texts (batch.anatomy_texts has "
                             f"{sorted(batch.anatomy_texts or {})}); fVLM needs data.anatomy_text=fvlm.")
        template = self.cfg.normal_template.format(anatomy=name)
        out = [texts[i] for i in rows.tolist()]
        if self.cfg.strip_template:
            out = [t.replace(template, "") if t.startswith(template) and t != template else t for t in out]
        return out

    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        c = self.cfg
        with torch.no_grad():
            self.temp.clamp_(float(c.temperature_min), float(c.temperature_max))
        if batch.anatomy_abnormal is None:
            raise ValueError("fVLM needs per-anatomy abnormal flags (batch.anatomy_abnormal): set data.anatomy_text=fvlm.")
        labels = self.label_map(batch)
        present, touching = self.anatomy_presence(labels)
        used = present & ~touching if c.intact_only else present  # [B, A]
        abnormal = batch.anatomy_abnormal.to(used.device).bool()
        gathered = c.gather_distributed
        counts = (used & abnormal).sum(0)
        contributing = (all_reduce_sum(counts) if gathered else counts) > 0
        if not bool(contributing.any()):  # every process agrees: the batch is skipped
            return {}
        feats = self.encode_image(batch.images)
        pooled = self.pool(feats.levels, self.token_flags(labels))  # [B, A, W]
        ks = contributing.nonzero().flatten().tolist()
        rows = {k: used[:, k].nonzero().flatten() for k in ks}
        texts = {k: self.report_texts(batch, k, rows[k]) for k in ks}
        txt_all = self.encode_anatomy_texts([t for k in ks for t in texts[k]], pooled.device)
        per_anatomy: dict[str, Tensor] = {}
        start = 0
        for k in ks:
            n = len(rows[k])
            t = txt_all[start:start + n]
            start += n
            v = F.normalize(self.vision_projs[k](pooled[rows[k], k]), dim=-1)
            normal = ~abnormal[rows[k], k]
            keys = text_keys([batch.anatomy_texts[self.anatomies[k]][i] for i in rows[k].tolist()], v.device)
            if gathered:
                v_all, offset = gather_rows(v, with_grad=c.gather_with_grad)
                t_all, _ = gather_rows(t, with_grad=c.gather_with_grad)
                normal_all, _ = gather_rows(normal)
                keys_all, _ = gather_rows(keys)
            else:
                v_all, t_all, normal_all, keys_all = v, t, normal, keys
            if n == 0:
                continue
            y = fnr_targets(normal_all, keys_all, c.fnr_normal, c.fnr_duplicates)
            if bool((y == y[0, 0]).all()):  # every target equal (one sample, or all normal): no signal
                continue
            per_anatomy[self.anatomies[k]] = soft_target_clip(v_all, t_all, self.temp, y)[0]
        if not per_anatomy:
            if world()[1] == 1:
                return {}
            # other processes have samples of a contributing anatomy: take part in the step with a zero loss
            return {"itc": pooled.sum() * 0.0}
        self.log_terms({f"{name}_itc": v.detach() for name, v in per_anatomy.items()}, batch_size=len(batch))
        self.log_terms({"temperature": self.temp.detach()}, batch_size=len(batch))
        return {"itc": sum(per_anatomy.values())}

    def encode_anatomy_texts(self, texts: list[str], device: torch.device) -> Tensor:
        """``[len(texts), D]``: tokenised (``text_padding``, ``text_max_length``), [CLS] -> ``text_proj`` -> L2 norm."""
        if not texts:
            return torch.zeros(0, self.cfg.embed_dim, device=device)
        tok = self.tokenizer(texts, padding=self.cfg.text_padding, truncation=True, max_length=int(self.cfg.text_max_length),
                             return_tensors="pt")
        return self.embed_text(tok["input_ids"].to(device), tok["attention_mask"].to(device))


__all__ = ["FVLM", "FVLMConfig"]

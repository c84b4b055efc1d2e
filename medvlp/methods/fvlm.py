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
  contributes trains nothing (no backward; the iteration still counts), as in the released code.

Everything is batched: token sets of variable size are boolean masks over the token grid, the
pooling is one masked attention over ``[B, A, tokens]``, and features are gathered across processes
padded to the largest per-rank count (``gather_with_grad=false``: only the local rows carry a
gradient, the released code's "plain gather").

Zero-shot (§7.1): :meth:`embed_batch` gives ``[B, A, D]`` (NaN for an anatomy absent from the
volume) - with ``eval_windows``, each anatomy from its own window as fVLM's ``eval.py`` does - and
:meth:`similarity` scores a prompt against the anatomy its prompt file names.

Options beyond the released code (§4.6): ``fnr_abnormal=coteach`` trains a peer model in turns and
mixes its similarities into the targets; ``fnr_abnormal=momentum_text`` adds EMA text-text
similarities between abnormal samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageTextBatch
from medvlp.config import AnatomyViTConfig, ImageEncoderConfig, MethodConfig, bounded
from medvlp.distributed import all_reduce_sum, world
from medvlp.losses.anatomy import all_targets_equal, anatomy_itc, text_keys
from medvlp.methods.base import VLPMethod
from medvlp.registry import register_method

TEXT_PADDING = ("max_length", "longest")
FNR_ABNORMAL = ("none", "coteach", "momentum_text")


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
    # soft positives among abnormal samples (§4.6, absent from the released code): none | coteach (the paper: a
    # peer model's similarities mixed into the targets) | momentum_text (the lab's successor code: EMA text features)
    fnr_abnormal: str = "none"
    coteach_alpha: float = bounded(0.5, ge=0, le=1)  # weight of the FNR targets; 1 - alpha goes to the peer's softmax
    coteach_alternate: str = "step"  # step | epoch: the two models take turns being trained
    coteach_scope: str = "all"  # all | abnormal_only: rows that get the peer's soft targets
    momentum: float = bounded(0.995, ge=0, lt=1)  # momentum_text: EMA of the text encoder and projection
    # evaluation (§7.1): false = each anatomy pooled from the volume as loaded; true = from its own window, centred
    # on the anatomy's box, eval_roi or the anatomy's extent if larger, padded at the end to whole patches
    eval_windows: bool = False
    eval_roi: list[int] = bounded(default_factory=lambda: [112, 288, 352], gt=0, each=True)


def anatomy_window(mask: Tensor, roi: list[int]) -> tuple[slice, slice, slice]:
    """The evaluation window of one anatomy (fVLM's ``eval.py`` ``center_crop``): per axis, size
    ``max(roi, max - min)`` over the anatomy's voxels (the code's extent, one voxel short of the box),
    centred on ``(min + max) // 2``, shifted back inside the volume, cut at the volume's end.

    Args:
        mask: ``[D, H, W]`` bool, the anatomy's voxels (at least one).
        roi: the smallest window ``(d, h, w)``.
    """
    out = []
    for axis, (size, n) in enumerate(zip(roi, mask.shape)):
        other = tuple(x for x in range(3) if x != axis)
        where = mask.any(other).nonzero().flatten()
        lo, hi = int(where[0]), int(where[-1])
        crop = max(int(size), hi - lo)
        start = max(0, (lo + hi) // 2 - crop // 2)
        end = min(n, start + crop)
        if end - start < crop:
            start = max(0, end - crop)
        out.append(slice(start, end))
    return out[0], out[1], out[2]


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
        for key, value, options in (("fnr_abnormal", c.fnr_abnormal, FNR_ABNORMAL), ("coteach_alternate", c.coteach_alternate,
                                    ("step", "epoch")), ("coteach_scope", c.coteach_scope, ("all", "abnormal_only"))):
            if value not in options:
                raise ValueError(f"method.{key}='{value}': choose one of {list(options)}.")

    def build(self) -> None:
        c = self.cfg
        width = self.image_encoder.out_dim
        self.anatomies = [str(a) for a in c.anatomies]
        self.attention = nn.MultiheadAttention(width, int(c.pool_heads), dropout=float(c.pool_dropout), batch_first=True)
        self.query_tokens = nn.Parameter(torch.zeros(len(self.anatomies), width))
        self.vision_projs = nn.ModuleList(nn.Linear(width, c.embed_dim) for _ in self.anatomies)
        self.text_proj = nn.Linear(self.text_encoder.out_dim, c.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(c.temperature)))
        self._turn = 0  # co-teaching outside a Trainer: which model trains (0 = this one, 1 = the peer)
        if c.fnr_abnormal == "coteach":  # the peer: the same model, initialised from another seed
            from omegaconf import OmegaConf

            peer_cfg = OmegaConf.merge(c, {"fnr_abnormal": "none"})
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.initial_seed()) % (2**63) + 7919)
                self.peer = FVLM(peer_cfg, self.optim_cfg)
        if c.fnr_abnormal == "momentum_text":  # EMA copies, never trained by the optimiser
            import copy

            self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
            self.text_proj_m = copy.deepcopy(self.text_proj).requires_grad_(False)

    # ------------------------------------------------------------------ anatomy geometry
    def label_map(self, batch: ImageTextBatch, check: bool = True) -> Tensor:
        """``batch.anatomy_masks`` as ``[B, D, H, W]`` (a clear error when the loader gives none); ``check``:
        its values are checked against the anatomies (one host read; the training step checks them in its own)."""
        masks = batch.anatomy_masks
        if masks is None:
            raise ValueError("fVLM needs each volume's anatomy label map: set data.anatomy_dir (TotalSegmentator output) "
                             "and data.anatomy_groups (fvlm4 for lung, heart, esophagus, aorta).")
        labels = masks[:, 0] if masks.ndim == 5 else masks
        if check:
            self._check_labels(int(labels.min()), int(labels.max()))
        return labels

    def _check_labels(self, low: int, top: int) -> None:
        if top > len(self.anatomies) or low < 0:
            bad = top if top > len(self.anatomies) else low
            raise ValueError(f"The anatomy label map holds the value {bad}, but this fVLM has {len(self.anatomies)} "
                             f"anatomies ({self.anatomies}, labels 1..{len(self.anatomies)}): merge the TotalSegmentator "
                             f"classes with data.anatomy_groups (fvlm4).")

    def anatomy_presence(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(present, touching)`` ``[B, A]`` bool: the anatomy has a voxel in the volume / on one of its six faces."""
        b = labels.shape[0]
        faces = torch.cat([labels[:, 0].reshape(b, -1), labels[:, -1].reshape(b, -1), labels[:, :, 0].reshape(b, -1),
                           labels[:, :, -1].reshape(b, -1), labels[:, :, :, 0].reshape(b, -1), labels[:, :, :, -1].reshape(b, -1)], 1)
        return self._which(labels.reshape(b, -1)), self._which(faces)

    def _which(self, values: Tensor) -> Tensor:
        """``[..., A]`` bool: which labels ``1..A`` occur along the last axis of ``values`` (one scatter pass)."""
        a = len(self.anatomies)
        seen = torch.zeros(*values.shape[:-1], a + 1, dtype=torch.bool, device=values.device)
        return seen.scatter_(-1, values.long().clamp(0, a), True)[..., 1:]

    def token_flags(self, labels: Tensor) -> Tensor:
        """``[B, A, L]`` bool: token ``t`` belongs to anatomy ``k`` iff its patch holds a voxel labelled ``k + 1``
        (what a max-pool of the anatomy's mask with kernel = stride = the patch size gives)."""
        b, d, h, w = labels.shape
        pd, ph, pw = self.image_encoder.patch_size
        if d % pd or h % ph or w % pw:
            raise ValueError(f"The anatomy label map {tuple(labels.shape[1:])} is not a multiple of the patch size "
                             f"{(pd, ph, pw)}; it must be aligned with the volume.")
        x = labels.reshape(b, d // pd, pd, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
        return self._which(x.reshape(b, (d // pd) * (h // ph) * (w // pw), -1)).transpose(1, 2)

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
        """:meth:`embed_image` of the batch's volumes with their (checked) anatomy label maps."""
        return self.embed_image(batch.images, self.label_map(batch))

    def embed_windows(self, images: Tensor, labels: Tensor) -> Tensor:
        """fVLM's evaluation (``eval.py``): for every anatomy present in a volume, the window of
        :func:`anatomy_window` around it, its label map reduced to that anatomy, both padded at the end to
        whole patches (zeros), one encoder pass, and the anatomy's pooled embedding: ``[B, A, D]`` (NaN
        where the anatomy is absent). Volumes may be any size (the positions are resized)."""
        b, a = labels.shape[0], len(self.anatomies)
        out = torch.full((b, a, self.cfg.embed_dim), float("nan"), device=images.device)
        patch = self.image_encoder.patch_size
        for i in range(b):
            for k in range(a):
                mask = labels[i] == k + 1
                if not bool(mask.any()):
                    continue
                box = anatomy_window(mask, [int(v) for v in self.cfg.eval_roi])
                pads = []
                for sl, p in zip(reversed(box), reversed(patch)):
                    pads += [0, -(sl.stop - sl.start) % p]
                window = F.pad(images[i:i + 1, :, box[0], box[1], box[2]], pads)
                only_k = F.pad(mask[box].long() * (k + 1), pads)[None]
                emb, present = self.embed_anatomies(window, only_k)
                out[i, k] = emb[0, k].to(out.dtype)
        return out

    def embed_image(self, images: Tensor, anatomy_masks: Tensor | None = None) -> Tensor:
        """``[B, A, D]``: each anatomy's embedding of ``images`` with their label maps ``anatomy_masks``
        ``[B, (1,) D, H, W]``, NaN where a volume does not contain the anatomy; with ``eval_windows`` each
        anatomy is embedded from its own window (:meth:`embed_windows`)."""
        if anatomy_masks is None:
            raise ValueError("fVLM embeds anatomies, not whole volumes: pass the anatomy label map (the loaders do with "
                             "data.anatomy_dir set).")
        labels = anatomy_masks[:, 0] if anatomy_masks.ndim == 5 else anatomy_masks
        if self.cfg.eval_windows:
            return self.embed_windows(images, labels)
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
    def report_texts(self, batch: ImageTextBatch, k: int, rows: list[int]) -> list[str]:
        """The anatomy-``k`` texts of ``rows`` as encoded: a normal text longer than the template loses it."""
        name = self.anatomies[k]
        texts = batch.anatomy_texts.get(name) if batch.anatomy_texts else None
        if texts is None:
            raise ValueError(f"The batch has no '{name}' anatomy texts (batch.anatomy_texts has "
                             f"{sorted(batch.anatomy_texts or {})}); fVLM needs data.anatomy_text=fvlm.")
        template = self.cfg.normal_template.format(anatomy=name)
        out = [texts[i] for i in rows]
        if self.cfg.strip_template:
            out = [t.replace(template, "") if t.startswith(template) and t != template else t for t in out]
        return out

    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        c = self.cfg
        model, teacher = (self, getattr(self, "peer", None)) if self.coteach_turn() == 0 else (self.peer, self)
        with torch.no_grad():
            for m in (model, teacher):
                if m is not None:
                    m.temp.clamp_(float(c.temperature_min), float(c.temperature_max))
        if batch.anatomy_abnormal is None:
            raise ValueError("fVLM needs per-anatomy abnormal flags (batch.anatomy_abnormal): set data.anatomy_text=fvlm.")
        labels = self.label_map(batch, check=False)
        present, touching = self.anatomy_presence(labels)
        used = present & ~touching if c.intact_only else present  # [B, A]
        abnormal = batch.anatomy_abnormal.to(used.device).bool()
        gathered = c.gather_distributed
        counts = (used & abnormal).sum(0)
        counts = all_reduce_sum(counts) if gathered else counts
        # one host read for the whole step: which samples each anatomy uses, their abnormal flags, which
        # anatomies contribute on some process, and the label map's range (checked here)
        b, a = used.shape
        host = torch.cat([used.flatten().long(), abnormal.flatten().long(), counts.long(),
                          torch.stack([labels.min(), labels.max()]).long()]).tolist()
        used_h, abnormal_h, counts_h = host[:b * a], host[b * a:2 * b * a], host[2 * b * a:2 * b * a + a]
        self._check_labels(host[-2], host[-1])
        ks = [k for k in range(a) if counts_h[k] > 0]
        if not ks:  # every process agrees: the batch is skipped
            return {}
        rows_h = {k: [i for i in range(b) if used_h[i * a + k]] for k in ks}
        rows = {k: torch.tensor(rows_h[k], dtype=torch.long, device=used.device) for k in ks}
        texts = {k: self.report_texts(batch, k, rows_h[k]) for k in ks}
        feats, pooled = model.anatomy_features(batch.images, labels, rows, texts)
        peer_feats = momentum = None
        if teacher is not None:
            with torch.no_grad():
                peer_feats = teacher.anatomy_features(batch.images, labels, rows, texts)[0]
        if c.fnr_abnormal == "momentum_text":
            with torch.no_grad():
                momentum = self.momentum_text_features(texts, pooled.device)

        alone = not gathered or world()[1] == 1
        per_anatomy: dict[str, Tensor] = {}
        for k in ks:
            v, t = feats[k]
            normal_h = [not abnormal_h[i * a + k] for i in rows_h[k]]
            raw = [batch.anatomy_texts[self.anatomies[k]][i] for i in rows_h[k]]
            # on one process the host knows whether every target is equal (no signal) without reading the device
            uniform = (all_targets_equal(normal_h, raw, c.fnr_normal, c.fnr_duplicates)
                       if alone and momentum is None and peer_feats is None else None)
            loss = anatomy_itc(
                v, t, torch.tensor(normal_h, device=v.device), text_keys(raw, v.device), model.temp,
                gather_distributed=gathered, with_grad=c.gather_with_grad,
                normal_positives=c.fnr_normal, duplicate_positives=c.fnr_duplicates,
                momentum_text=momentum[k] if momentum is not None else None,
                peer=(*peer_feats[k], teacher.temp.detach()) if peer_feats is not None else None,
                alpha=float(c.coteach_alpha), abnormal_only=c.coteach_scope == "abnormal_only", uniform=uniform)
            if loss is not None:
                per_anatomy[self.anatomies[k]] = loss
        if not per_anatomy:
            if world()[1] == 1:
                return {}
            # other processes have samples of a contributing anatomy: take part in the step with a zero loss
            return {"itc": pooled.sum() * 0.0}
        self.log_terms({f"{name}_itc": v.detach() for name, v in per_anatomy.items()}, batch_size=len(batch))
        self.log_terms({"temperature": model.temp.detach()}, batch_size=len(batch))
        return {"itc": sum(per_anatomy.values())}

    def anatomy_features(self, images: Tensor, labels: Tensor, rows: dict[int, Tensor],
                         texts: dict[int, list[str]]) -> tuple[dict[int, tuple[Tensor, Tensor]], Tensor]:
        """``({k: (v [n_k, D], t [n_k, D])}, pooled [B, A, W])``: this model's unit image / text embeddings of
        anatomy ``k`` for the samples ``rows[k]`` (texts ``texts[k]``), all texts in one encoder call."""
        feats = self.encode_image(images)
        pooled = self.pool(feats.levels, self.token_flags(labels))
        ks = list(rows)
        txt_all = self.encode_anatomy_texts([t for k in ks for t in texts[k]], pooled.device)
        out, start = {}, 0
        for k in ks:
            n = len(rows[k])
            out[k] = (F.normalize(self.vision_projs[k](pooled[rows[k], k]), dim=-1), txt_all[start:start + n])
            start += n
        return out, pooled

    def coteach_turn(self) -> int:
        """Co-teaching: 0 when this model trains (the peer teaches), 1 when the peer does; alternating every
        optimiser step or epoch (``coteach_alternate``). Always 0 without co-teaching."""
        if self.cfg.fnr_abnormal != "coteach":
            return 0
        if self.attached:
            count = self.trainer.global_step if self.cfg.coteach_alternate == "step" else self.trainer.current_epoch
            return int(count) % 2
        return self._turn

    def momentum_text_features(self, texts: dict[int, list[str]], device: torch.device) -> dict[int, Tensor]:
        """``{k: [n_k, D]}`` unit text embeddings of the EMA text encoder and projection."""
        flat = [t for k in texts for t in texts[k]]
        out: dict[int, Tensor] = {}
        if not flat:
            return {k: torch.zeros(0, self.cfg.embed_dim, device=device) for k in texts}
        tok = self.tokenizer(flat, padding=self.cfg.text_padding, truncation=True, max_length=int(self.cfg.text_max_length),
                             return_tensors="pt")
        feats = self.text_encoder_m(tok["input_ids"].to(device), tok["attention_mask"].to(device)).pooled
        emb, start = F.normalize(self.text_proj_m(feats), dim=-1), 0
        for k in texts:
            out[k] = emb[start:start + len(texts[k])]
            start += len(texts[k])
        return out

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA step of the momentum text encoder and projection (``momentum_text``)."""
        m = float(self.cfg.momentum)
        for online, ema in ((self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)):
            for p, q in zip(online.parameters(), ema.parameters(), strict=True):
                q.mul_(m).add_(p.detach(), alpha=1 - m)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: ANN001 - Lightning hook
        if self.cfg.fnr_abnormal == "momentum_text":
            self.momentum_update()

    def encode_anatomy_texts(self, texts: list[str], device: torch.device) -> Tensor:
        """``[len(texts), D]``: tokenised (``text_padding``, ``text_max_length``), [CLS] -> ``text_proj`` -> L2 norm."""
        if not texts:
            return torch.zeros(0, self.cfg.embed_dim, device=device)
        tok = self.tokenizer(texts, padding=self.cfg.text_padding, truncation=True, max_length=int(self.cfg.text_max_length),
                             return_tensors="pt")
        return self.embed_text(tok["input_ids"].to(device), tok["attention_mask"].to(device))


__all__ = ["FVLM", "FVLMConfig", "anatomy_window"]

"""HLIP: CLIP on whole 3D studies with a hierarchical-attention ViT (Zhao et al., 2025).

Spec: ``specs/methods/hlip.md``. The image tower is :class:`~medvlp.encoders.hlip_vit.HierarchicalViT`
(``method.image_encoder.name=hlip_vit``): slice / scan / study attention levels per block, [CLS]
copied into windows and averaged back, fixed sin-cos positions, average inflation from a timm ViT.
The study feature (final-norm [CLS]) and the text feature ([CLS] of the last hidden state) go
through bias-free linear projections to ``embed_dim`` (512) and are L2-normalised (§2.6-2.7).

Loss (§4): the symmetric CLIP loss with a learnable logit scale ``s = exp(theta)``, ``theta``
initialised to ``ln(1 / 0.07)`` and clamped to ``[0, ln 100]`` after every optimiser step; or, with
``method.loss=siglip``, the sigmoid loss with learnable scale (``ln 10``) and bias (``-10``).
``method.lock_text`` freezes the text transformer except its LayerNorms (open_clip's ``--lock-text``,
H8); the projection stays trainable.

Multi-scan batches (``images`` ``[B, N, 1, D, H, W]`` with ``scan_mask``) go to the encoder whole:
the scan mask keeps padded scans out of every attention and mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageTextBatch
from medvlp.config import MethodConfig, bounded
from medvlp.losses import clip_loss, siglip_loss
from medvlp.methods.base import VLPMethod
from medvlp.registry import register_method

LOSSES = ("clip", "siglip")


@dataclass
class HLIPConfig(MethodConfig):
    """``method.*`` of HLIP (``configs/method/hlip.yaml``)."""

    name: str = "hlip"
    embed_dim: int = 512
    loss: str = "clip"  # clip (the paper) | siglip
    temperature: float = bounded(0.07, gt=0)  # CLIP: theta = ln(1 / temperature)
    max_logit_scale: float = bounded(100.0, gt=0)  # theta is clamped to [0, ln(max_logit_scale)] after every step
    siglip_scale: float = bounded(10.0, gt=0)  # SigLIP: initial scale (theta = ln 10) ...
    siglip_bias: float = -10.0  # ... and bias
    lock_text: bool = False  # freeze the text transformer except its LayerNorms (CT-RATE recipe)
    lock_text_layer_norm: bool = False  # with lock_text, freeze the LayerNorms too
    gather_distributed: bool = True  # negatives from every GPU
    # under DDP (CLIP loss): local_grad = each rank's rows against the gathered columns, the gather carrying
    # gradients (open_clip --local-loss --gather-with-grad, HLIP's 2026 CT-RATE recipe); plain = the whole
    # matrix on every rank, only the local slice grad-carrying (open_clip's default, the paper's runs)
    gather: Literal["local_grad", "plain"] = "local_grad"


@register_method("hlip")
class HLIP(VLPMethod):
    """Study-level CLIP with hierarchical attention (term ``itc``, or ``siglip``)."""

    Config = HLIPConfig
    terms = ("itc", "siglip")
    global_batch_keys = ("gather_distributed",)

    @classmethod
    def validate_config(cls, c: HLIPConfig) -> None:
        if c.loss not in LOSSES:
            raise ValueError(f"method.loss='{c.loss}' is not valid; choose one of {list(LOSSES)}.")
        if c.image_encoder.name != "hlip_vit":
            raise ValueError(f"method.image_encoder.name must be hlip_vit for HLIP, got '{c.image_encoder.name}'.")
        if float(c.max_logit_scale) < 1.0 or float(c.temperature) <= 0:
            raise ValueError(f"method.max_logit_scale={c.max_logit_scale} must be >= 1 and "
                             f"method.temperature={c.temperature} > 0.")

    def build(self) -> None:
        c = self.cfg
        self.img_proj = nn.Linear(self.image_encoder.out_dim, c.embed_dim, bias=False)
        self.txt_proj = nn.Linear(self.text_encoder.out_dim, c.embed_dim, bias=False)
        init = math.log(c.siglip_scale) if c.loss == "siglip" else math.log(1.0 / c.temperature)
        self.logit_scale = nn.Parameter(torch.tensor(float(init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(c.siglip_bias))) if c.loss == "siglip" else None
        if c.lock_text:
            for name, p in self.text_encoder.named_parameters():
                p.requires_grad_(not c.lock_text_layer_norm and "LayerNorm" in name)

    # ------------------------------------------------------------------ embeddings
    def embed_image(self, images: Tensor, scan_mask: Tensor | None = None) -> Tensor:
        feats = self.image_encoder(images, scan_mask=scan_mask, return_tokens=False)
        return F.normalize(self.img_proj(feats.pooled), dim=-1)

    def embed_images(self, images: Tensor, scan_mask: Tensor | None = None) -> Tensor:
        return self.embed_image(images, scan_mask)  # the encoder attends across the scans of a study

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(self.txt_proj(self.encode_text(input_ids, attention_mask).pooled), dim=-1)

    def encode_image(self, images: Tensor, return_attention: bool = False, scan_mask: Tensor | None = None):
        return self.image_encoder(images, scan_mask=scan_mask, return_attention=return_attention)

    # ------------------------------------------------------------------ loss
    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        img = self.embed_image(batch.images, batch.scan_mask)
        txt = self.embed_text(batch.input_ids, batch.attention_mask)
        scale = self.logit_scale.exp()
        self.log_terms({"logit_scale": scale}, batch_size=len(batch))
        if self.cfg.loss == "siglip":
            return {"siglip": siglip_loss(img, txt, scale, self.logit_bias, gather_distributed=self.cfg.gather_distributed)}
        loss, _, _ = clip_loss(img, txt, scale, gather_distributed=self.cfg.gather_distributed,
                               local_loss=self.cfg.gather == "local_grad")
        return {"itc": loss}

    def temperature(self) -> float:
        """``1 / exp(theta)`` with theta clamped to ``[0, ln max_logit_scale]`` as after every step."""
        return 1.0 / min(float(self.logit_scale.detach().exp()), float(self.cfg.max_logit_scale))

    def clamp_logit_scale(self) -> None:
        """theta <- clamp(theta, 0, ln max_logit_scale), as open_clip does after each step."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(float(self.cfg.max_logit_scale)))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: ANN001 - Lightning hook
        self.clamp_logit_scale()


__all__ = ["HLIP", "HLIPConfig"]

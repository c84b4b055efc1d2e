"""CLIP / ConVIRT-style baseline: symmetric InfoNCE on projected global features.

This file is the template a new method copies: a ``Config`` dataclass (the schema of
``configs/method/clip.yaml``), ``build()`` for the heads, ``losses()`` returning named terms,
and the retrieval embeddings.

References: Radford et al. 2021 (CLIP, arXiv 2103.00020); Zhang et al. 2022 (ConVIRT,
arXiv 2010.00747), whose non-linear projection heads are ``projection: mlp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageTextBatch
from medvlp.config import MethodConfig, bounded
from medvlp.encoders.heads import PROJECTIONS, projection_head
from medvlp.losses import clip_loss
from medvlp.methods.base import VLPMethod
from medvlp.registry import register_method


@dataclass
class CLIPConfig(MethodConfig):
    """``method.*`` of the CLIP baseline."""

    name: str = "clip"
    embed_dim: int = 512
    projection: str = "linear"  # linear (CLIP) | mlp (ConVIRT: Linear-ReLU-Linear)
    temperature: float = bounded(0.07, gt=0)  # initial tau
    learnable_temperature: bool = True
    max_logit_scale: float = bounded(100.0, gt=0)  # clamp of 1 / tau (CLIP)
    gather_distributed: bool = True  # negatives from every GPU


@register_method("clip")
class CLIP(VLPMethod):
    """Dual encoder trained with the symmetric image-text InfoNCE loss (term ``itc``)."""

    Config = CLIPConfig
    terms = ("itc",)
    global_batch_keys = ("gather_distributed",)

    @classmethod
    def validate_config(cls, cfg: CLIPConfig) -> None:
        if cfg.projection not in PROJECTIONS:
            raise ValueError(f"method.projection must be one of {list(PROJECTIONS)}, got '{cfg.projection}'.")
        if float(cfg.temperature) <= 0 or float(cfg.max_logit_scale) <= 0:
            raise ValueError(f"method.temperature={cfg.temperature} and method.max_logit_scale={cfg.max_logit_scale} "
                             f"must be > 0.")

    def build(self) -> None:
        c = self.cfg
        self.img_proj = projection_head(c.projection, self.image_encoder.out_dim, c.embed_dim)
        self.txt_proj = projection_head(c.projection, self.text_encoder.out_dim, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.temperature)), requires_grad=c.learnable_temperature)

    def embed_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.img_proj(self.encode_image(images).pooled), dim=-1)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(self.txt_proj(self.encode_text(input_ids, attention_mask).pooled), dim=-1)

    def logit_scale_value(self) -> Tensor:
        """``1 / tau = exp(logit_scale)``, clamped at ``max_logit_scale`` (CLIP)."""
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def temperature(self) -> float:
        return 1.0 / float(self.logit_scale_value().detach())

    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        img = self.embed_images(batch.images, batch.scan_mask)
        txt = self.embed_text(batch.input_ids, batch.attention_mask)
        scale = self.logit_scale_value()
        loss, _, _ = clip_loss(img, txt, scale, gather_distributed=self.cfg.gather_distributed)
        self.log_terms({"logit_scale": scale}, batch_size=len(batch))
        return {"itc": loss}

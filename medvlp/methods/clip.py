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
from medvlp.config import MethodConfig
from medvlp.losses import clip_loss
from medvlp.methods.base import VLPMethod
from medvlp.registry import register_method


@dataclass
class CLIPConfig(MethodConfig):
    """``method.*`` of the CLIP baseline."""

    name: str = "clip"
    embed_dim: int = 512
    projection: str = "linear"  # linear (CLIP) | mlp (ConVIRT: Linear-ReLU-Linear)
    temperature: float = 0.07  # initial tau
    learnable_temperature: bool = True
    max_logit_scale: float = 100.0  # clamp of 1 / tau (CLIP)
    gather_distributed: bool = True  # negatives from every GPU


def projection_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    raise ValueError(f"method.projection must be 'linear' or 'mlp', got '{kind}'")


@register_method("clip")
class CLIP(VLPMethod):
    """Dual encoder trained with the symmetric image-text InfoNCE loss (term ``itc``)."""

    Config = CLIPConfig

    def build(self) -> None:
        c = self.cfg
        self.img_proj = projection_head(c.projection, self.image_encoder.out_dim, c.embed_dim)
        self.txt_proj = projection_head(c.projection, self.text_encoder.out_dim, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.temperature)), requires_grad=c.learnable_temperature)

    def embed_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.img_proj(self.encode_image(images).pooled), dim=-1)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(self.txt_proj(self.encode_text(input_ids, attention_mask).pooled), dim=-1)

    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        img = self.embed_images(batch.images, batch.scan_mask)
        txt = self.embed_text(batch.input_ids, batch.attention_mask)
        scale = self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)
        loss, _, _ = clip_loss(img, txt, scale, gather_distributed=self.cfg.gather_distributed)
        if self._trainer is not None:
            self.log(f"{'train' if self.training else 'val'}/logit_scale", scale.detach(), batch_size=len(batch))
        return {"itc": loss}

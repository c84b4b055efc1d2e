"""G2D: From Global to Dense radiography representation learning (Liu et al., NeurIPS 2024).

Paper: https://arxiv.org/abs/2312.01522. Official code: ``cheliu-computation/G2D-NeurIPS24``
(``PRETRAIN/models/cnn_ae.py``, ``PRETRAIN/utils/trainer.py``, ``PRETRAIN/utils/loss.py``). Spec:
``specs/methods/g2d.md``. A CLIP-style dual encoder whose CNN image encoder is also the encoder of
a U-Net; two terms, each logged as ``train/loss_<name>``:

* ``vla`` - global vision-language alignment: InfoNCE between the attention-pooled image embedding
  and the projected report embedding (sigma = 0.07 fixed);
* ``pa`` - pixel alignment by pseudo segmentation: the U-Net decoder predicts, per pixel, a pseudo
  mask built without parameters or gradient from the attention of the pooling query
  (:mod:`medvlp.losses.pseudo_masks`); loss ``0.5 (Dice + BCE)`` (:mod:`medvlp.losses.segmentation`).

Also logged: ``train/pa_dice`` (1 - Dice), ``train/pa_bce`` and ``train/pseudo_mask_fraction`` (mean
target value, ~0.15 for the 85th percentile).

Architecture (spec section 2): the last encoder stage ``V`` is projected per location
(1x1 conv - BN(affine=False) - ReLU - 1x1 conv, to ``embed_dim``), pooled by one multi-head attention
whose query is the mean token (CLIP's ``AttentionPool2d``, ``pool_heads`` heads, learned positions
for the grid of ``image_encoder.img_size``, bicubically interpolated to other grids), then a linear
output layer. The report embedding is the projected pooled text feature (the same projector with
1-d layers). The decoder is segmentation_models_pytorch's ``UnetDecoder`` over the encoder stages
and its ``SegmentationHead``, so the pre-trained U-Net exports to ``smp.Unet`` key for key
(:meth:`G2D.export_unet`, written to ``<run>/export/`` at the end of training).

Defaults follow the paper (spec section 11); ``configs/experiment/g2d_code_mimic.yaml`` is the
released code's recipe. Parity switches: ``vla_directions`` (both | i2t), ``vla_reduction``
(mean | sum), ``pa_form`` (paper | code: ``(1 - Dice on logits) + 0.2 BCE``), ``pa_start_step``
(code: 200 global-only steps), ``text_bn_all_tokens`` (BatchNorm over every token position, padding
included, spec Q14), and the pseudo-mask recipe ``pseudo_mask.*``.

Differences from the official code:
    * The pseudo masks are built on the training device in one batched pass (the official moves the
      attention to numpy per image).
    * ``encoder_depth`` < 5 uses the first stages only (the attention pool then runs on a finer grid);
      the paper's setting is 5 (ResNet-50 ``layer4``, grid 7 x 7 at 224 px).
    * The unused ``pseudo_conv`` layer and the unused projected word tokens are not created (spec 2.1,
      Q5); the LR warm restarts of the code (Q6) are not reproduced (``optim.*`` is warm-up + cosine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageTextBatch
from medvlp.config import ImageEncoderConfig, MethodConfig, TextEncoderConfig, TimmEncoderConfig, bounded
from medvlp.distributed import world
from medvlp.encoders.image2d import smp_encoder_name
from medvlp.losses.contrastive import clip_loss
from medvlp.losses.pseudo_masks import PseudoMaskConfig, pseudo_masks
from medvlp.losses.pseudo_masks import validate as validate_pseudo_mask
from medvlp.losses.segmentation import dice_bce_loss
from medvlp.methods.base import VLPMethod
from medvlp.registry import register_method

log = logging.getLogger(__name__)

TERMS = ("vla", "pa")


@dataclass
class G2DConfig(MethodConfig):
    """``method.*`` of G2D; defaults are the paper's settings (spec section 11)."""

    name: str = "g2d"
    image_encoder: ImageEncoderConfig = field(
        default_factory=lambda: TimmEncoderConfig(model="resnet50.tv_in1k", pretrained=True, in_chans=3,
                                                   img_size=[224])
    )
    text_encoder: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(name="hf", model="emilyalsentzer/Bio_ClinicalBERT", pretrained=True,
                                                  freeze_layers=9, pool="cls")
    )
    embed_dim: int = 128  # d of the projectors and the attention pool
    pool_heads: int = bounded(4, gt=0)  # heads of the attention pool (must divide embed_dim; the code uses 4)
    temperature: float = bounded(0.07, gt=0)  # sigma of VLA (fixed)
    vla_directions: str = "both"  # both (symmetric) | i2t (the paper's Eq. 1 literally)
    vla_reduction: str = "mean"  # mean of the two directions | sum (official clip_loss)
    gather_negatives: bool = False  # negatives from every GPU (official: per-GPU batch only)
    encoder_depth: int = bounded(5, ge=1, le=5)  # encoder stages used (U-Net depth); the pool runs on the last one
    decoder_channels: list[int] = bounded(default_factory=lambda: [256, 128, 64, 32, 16], gt=0, each=True)
    pa_form: str = "paper"  # paper: 0.5 (Dice + BCE) on probabilities | code: (1 - Dice on logits) + 0.2 BCE
    pa_start_step: int = bounded(0, ge=0)  # optimiser steps with VLA only before PA joins (official: 200)
    text_bn_all_tokens: bool = False  # text projector BatchNorm over every token position (official, Q14)
    pseudo_mask: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"vla": 1.0, "pa": 1.0})


def validate_config(c: Any) -> None:
    """Check ``method.*`` of G2D; raises ``ValueError`` naming the key, the value and the valid options."""
    if c.image_encoder.name != "timm":
        raise ValueError(f"G2D is a 2D method: method.image_encoder.name must be 'timm', got '{c.image_encoder.name}'.")
    if int(c.embed_dim) % int(c.pool_heads):
        raise ValueError(f"method.pool_heads={c.pool_heads} must divide method.embed_dim={c.embed_dim} "
                         f"(the paper's 3 heads cannot split 128 channels; the code uses 4).")
    choices = {"vla_directions": ("both", "i2t"), "vla_reduction": ("mean", "sum"), "pa_form": ("paper", "code")}
    for key, valid in choices.items():
        if c[key] not in valid:
            raise ValueError(f"method.{key}='{c[key]}': expected one of {list(valid)}.")
    if int(c.encoder_depth) < 1 or len(c.decoder_channels) < int(c.encoder_depth):
        raise ValueError(f"method.encoder_depth={c.encoder_depth} needs >= 1 and at least that many "
                         f"method.decoder_channels (got {list(c.decoder_channels)}).")
    if float(c.temperature) <= 0:
        raise ValueError(f"method.temperature must be > 0, got {c.temperature}.")
    if int(c.pa_start_step) < 0:
        raise ValueError(f"method.pa_start_step must be >= 0, got {c.pa_start_step}.")
    validate_pseudo_mask(PseudoMaskConfig(**c.pseudo_mask))


class Projector(nn.Sequential):
    """G2D's ``Pv`` / ``Pl``: 1x1 conv (no bias) - BN(affine=False) - ReLU - 1x1 conv (no bias).

    ``dims=2`` works on feature maps ``[B, C, h, w]``; ``dims=1`` on sequences ``[B, C, T]``
    (or, through :meth:`vector`, on ``[B, C]``).
    """

    def __init__(self, in_dim: int, out_dim: int, dims: int = 2) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        super().__init__(conv(in_dim, out_dim, 1, bias=False), norm(out_dim, affine=False), nn.ReLU(inplace=True),
                         conv(out_dim, out_dim, 1, bias=False))

    def vector(self, x: Tensor) -> Tensor:
        """``[B, C]`` -> ``[B, out_dim]`` (BatchNorm over the batch)."""
        return self(x[:, :, None])[:, :, 0]


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean token queries ``[mean; tokens] + positions`` with multi-head attention.

    Args:
        dim: token width; heads: attention heads; grid: ``(h, w)`` of the learned positional table
            (other grids are served by bicubic interpolation of its spatial part).
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.heads, self.grid = heads, tuple(int(g) for g in grid)
        self.positions = nn.Parameter(torch.randn(1 + self.grid[0] * self.grid[1], dim) / dim**0.5)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, dim)

    def position_table(self, grid: tuple[int, int]) -> Tensor:
        if tuple(grid) == self.grid:
            return self.positions
        spatial = self.positions[1:].T.reshape(1, -1, *self.grid)
        spatial = F.interpolate(spatial, size=tuple(grid), mode="bicubic", align_corners=False)
        return torch.cat([self.positions[:1], spatial.reshape(spatial.shape[1], -1).T])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, C, h, w]`` -> ``(pooled [B, C], attention [B, heads, 1 + h w])`` (query over [mean; tokens])."""
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1) + self.position_table((h, w)).to(t.dtype)
        dh = c // self.heads
        q = self.q_proj(t[:, :1]).reshape(b, 1, self.heads, dh).transpose(1, 2)
        k = self.k_proj(t).reshape(b, -1, self.heads, dh).transpose(1, 2)
        v = self.v_proj(t).reshape(b, -1, self.heads, dh).transpose(1, 2)
        attn = ((q * dh**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, heads, 1, 1 + hw]
        out = (attn @ v).transpose(1, 2).reshape(b, c)
        return self.c_proj(out), attn[:, :, 0]


@register_method("g2d")
class G2D(VLPMethod):
    """G2D: global alignment (``vla``) plus parameter-free pseudo segmentation (``pa``)."""

    Config = G2DConfig
    terms = TERMS
    global_batch_keys = ("gather_negatives",)

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        validate_config(cfg)

    def build(self) -> None:
        from segmentation_models_pytorch.base.heads import SegmentationHead
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

        c = self.cfg
        enc = self.image_encoder
        stages = enc.stages
        depth = int(c.encoder_depth)
        if depth > len(stages):
            raise ValueError(f"method.encoder_depth={depth}, but {c.image_encoder.model} has {len(stages)} stages.")
        # Stages past encoder_depth feed neither the U-Net nor the embedding: frozen, so that every trainable
        # parameter receives a gradient (DDP runs without find_unused_parameters).
        for stage in stages[depth:]:
            enc.model.get_submodule(str(stage["module"])).requires_grad_(False)
        self.reduction = int(stages[depth - 1]["reduction"])
        size = int(c.image_encoder.img_size[0])
        if size % self.reduction:
            raise ValueError(f"method.image_encoder.img_size={size} must be divisible by the encoder's stride "
                             f"{self.reduction} at encoder_depth={depth}.")
        d = int(c.embed_dim)
        self.img_proj = Projector(int(stages[depth - 1]["num_chs"]), d, dims=2)
        self.pool = AttentionPool2d(d, int(c.pool_heads), (size // self.reduction, size // self.reduction))
        self.txt_proj = Projector(int(self.text_encoder.out_dim), d, dims=1)
        self.pm_cfg = PseudoMaskConfig(**c.pseudo_mask)
        channels = [int(c.image_encoder.in_chans)] + [int(s["num_chs"]) for s in stages[:depth]]
        dec = [int(x) for x in c.decoder_channels][:depth]
        self.decoder = UnetDecoder(encoder_channels=channels, decoder_channels=dec, n_blocks=depth, use_norm="batchnorm")
        self.num_masks = int(c.pool_heads) if self.pm_cfg.aggregate == "none" else 1
        self.segmentation_head = SegmentationHead(dec[-1], self.num_masks, kernel_size=3)

    # ------------------------------------------------------------------ features
    def _check_size(self, images: Tensor) -> None:
        h, w = images.shape[-2:]
        if h % self.reduction or w % self.reduction:
            raise ValueError(f"G2D's U-Net needs image sides divisible by {self.reduction}; got {h} x {w} "
                             f"(set data.image_size to a multiple of {self.reduction}).")

    def global_image(self, last: Tensor) -> tuple[Tensor, Tensor]:
        """Last encoder stage ``[B, C, h, w]`` -> ``(unit embedding [B, d], pooling attention [B, heads, h, w])``."""
        pooled, attn = self.pool(self.img_proj(last))
        h, w = last.shape[-2:]
        return F.normalize(pooled, dim=-1), attn[:, :, 1:].reshape(attn.shape[0], attn.shape[1], h, w)

    def decode(self, images: Tensor, stages: list[Tensor]) -> Tensor:
        """U-Net decoder logits ``[B, num_masks, H, W]`` from the encoder stages of ``images``."""
        return self.segmentation_head(self.decoder([images, *stages]))

    def embed_image(self, images: Tensor) -> Tensor:
        """Unit attention-pooled image embedding ``[B, embed_dim]`` (retrieval / zero-shot)."""
        self._check_size(images)
        stages = self.image_encoder.pyramid(images, int(self.cfg.encoder_depth))
        return self.global_image(stages[-1])[0]

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit projected report embedding ``[B, embed_dim]`` (retrieval / zero-shot)."""
        txt = self.encode_text(input_ids, attention_mask)
        if self.cfg.text_bn_all_tokens:  # official: project every position (padding included), keep [CLS]
            return F.normalize(self.txt_proj(txt.tokens.transpose(1, 2))[:, :, 0], dim=-1)
        return F.normalize(self.txt_proj.vector(txt.pooled), dim=-1)

    def dense_embeddings(self, images: Tensor) -> Tensor:
        """The projected last encoder stage ``Pv(x)`` ``[B, embed_dim, h, w]`` (before the attention pool; G2D's
        zero-shot grounding, g2d.md §7.5), unit length at every position."""
        self._check_size(images)
        stages = self.image_encoder.pyramid(images, int(self.cfg.encoder_depth))
        return F.normalize(self.img_proj(stages[-1]), dim=1)

    @torch.no_grad()
    def dense_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """For inspection: ``{"target": pseudo masks, "prediction": decoder probabilities, "attention": [B, heads, h, w]}``."""
        self._check_size(images)
        stages = self.image_encoder.pyramid(images, int(self.cfg.encoder_depth))
        _, attn = self.global_image(stages[-1])
        target = pseudo_masks(attn, tuple(images.shape[-2:]), self.pm_cfg, images)
        return {"target": target, "prediction": torch.sigmoid(self.decode(images, stages)), "attention": attn}

    # ------------------------------------------------------------------ the method
    def pa_active(self) -> bool:
        return int(self.global_step) >= int(self.cfg.pa_start_step) or not self.training

    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        c = self.cfg
        images = batch.images
        self._check_size(images)
        stages = self.image_encoder.pyramid(images, int(c.encoder_depth))
        img, attn = self.global_image(stages[-1])
        txt = self.embed_text(batch.input_ids, batch.attention_mask)
        _, i2t, t2i = clip_loss(img, txt, 1.0 / float(c.temperature), gather_distributed=bool(c.gather_negatives))
        if c.vla_directions == "i2t":
            vla = i2t
        else:
            vla = i2t + t2i if c.vla_reduction == "sum" else (i2t + t2i) / 2
        out = {"vla": vla}
        extra: dict[str, Tensor] = {}
        if self.pa_active():
            target = pseudo_masks(attn, tuple(images.shape[-2:]), self.pm_cfg, images)
            logits = self.decode(images, stages)
            out["pa"], extra["pa_dice"], extra["pa_bce"] = dice_bce_loss(logits, target, str(c.pa_form))
            extra["pseudo_mask_fraction"] = target.mean()
        elif world()[1] > 1:  # DDP without find_unused_parameters: give the decoder a zero gradient
            out["vla"] = vla + 0.0 * sum(p.sum() for m in (self.decoder, self.segmentation_head) for p in m.parameters())
        self.log_terms(extra, batch_size=len(batch))
        return out

    # ------------------------------------------------------------------ export
    def smp_encoder_name(self) -> tuple[str, str]:
        """``(encoder_name, key prefix)`` for ``segmentation_models_pytorch.Unet``: smp's own ResNets take
        torchvision key names (= timm's), any other timm CNN goes through smp's ``tu-`` encoders."""
        return smp_encoder_name(str(self.cfg.image_encoder.model))

    def export_unet(self) -> dict[str, Any]:
        """The pre-trained U-Net as ``smp.Unet`` expects it: build
        ``smp.Unet(encoder_name, encoder_depth=..., decoder_channels=..., in_channels=..., classes=...,
        encoder_weights=None)`` from the returned settings and ``load_state_dict(state_dict)``."""
        name, prefix = self.smp_encoder_name()
        state = {}
        for k, v in self.image_encoder.model.state_dict().items():
            if k.startswith(("fc.", "head.", "global_pool.")):
                continue
            state[prefix + k] = v.detach().cpu().clone()
        for part in ("decoder", "segmentation_head"):
            for k, v in getattr(self, part).state_dict().items():
                state[f"{part}.{k}"] = v.detach().cpu().clone()
        import segmentation_models_pytorch as smp

        depth = int(self.cfg.encoder_depth)
        settings = {"encoder_name": name, "encoder_depth": depth, "in_channels": int(self.cfg.image_encoder.in_chans),
                    "classes": self.num_masks, "decoder_channels": [int(x) for x in self.cfg.decoder_channels][:depth]}
        # Keep exactly the keys of the smp.Unet these settings build (a shallower U-Net has no layer4).
        wanted = set(smp.Unet(encoder_weights=None, **settings).state_dict())
        missing = sorted(wanted - set(state))
        if missing:
            raise RuntimeError(f"G2D export: smp.Unet('{name}') expects keys this model lacks, e.g. {missing[:3]}.")
        state = {k: v for k, v in state.items() if k in wanted}
        return {**settings, "timm_model": str(self.cfg.image_encoder.model), "state_dict": state}

    def export(self, folder: str | Path) -> list[Path]:
        """Write ``unet.pt`` (encoder + decoder, :meth:`export_unet`) and ``encoder.pt`` (timm key names)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        unet = self.export_unet()
        encoder = {"timm_model": unet["timm_model"], "in_channels": unet["in_channels"],
                   "state_dict": {k: v.detach().cpu().clone() for k, v in self.image_encoder.model.state_dict().items()}}
        torch.save(unet, folder / "unet.pt")
        torch.save(encoder, folder / "encoder.pt")
        return [folder / "unet.pt", folder / "encoder.pt"]

    def export_decoder(self) -> dict[str, Any]:
        """The pre-trained U-Net (encoder + decoder) and the ``smp.Unet`` settings that rebuild it."""
        return self.export_unet()

    def temperature(self) -> float:
        return float(self.cfg.temperature)

    def on_train_end(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero and trainer.default_root_dir:
            paths = self.export(Path(trainer.default_root_dir) / "export")
            log.info("G2D: U-Net and encoder weights written to %s", paths[0].parent)


__all__ = ["G2D", "G2DConfig", "AttentionPool2d", "Projector", "validate_config"]

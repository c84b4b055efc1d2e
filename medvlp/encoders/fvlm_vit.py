"""fVLM's image tower: a 3D ViT-B in MONAI's layout (``specs/methods/fvlm.md`` §2.1).

* ``Conv3d(in -> width, kernel = stride = patch_size)`` (fVLM: (16, 16, 32) over (z, y, x)), tokens
  flattened in (z, y, x) row-major order, **no [CLS] token**.
* A learnable position table over the reference grid (fVLM: 7 x 16 x 11), resized trilinearly to
  any other grid on every forward (evaluation windows). ``pos_init=mae_sincos`` starts it from MAE's
  fixed 2D sin-cos table: the 14 x 14 grid resized bilinearly to (h, w) and **repeated over depth**, so
  the model starts with no depth information (F5); MAE's table is computed here, no download needed.
* Pre-norm blocks (timm ``Block``: qkv bias, GELU MLP, fused attention) with MONAI's dropout (after
  the positions, on attention probabilities, after the output projection, twice in the MLP) and
  LayerNorm eps 1e-5, then a final LayerNorm.
* Outputs: the final normalised tokens, and ``levels`` = the **raw** residual stream after each of
  ``out_blocks`` (fVLM: blocks 4, 7, 10, 1-indexed) followed by the final normalised tokens - the
  four token sets fVLM's anatomy pooling attends over.

``inflate_from`` (fVLM: ``vit_base_patch16_224.mae``) copies a timm ViT's blocks and final norm; the
patch embedding stays random (fVLM does not inflate the 2D kernel) and the positions keep
``pos_init``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageFeatures
from medvlp.config import AnatomyViTConfig
from medvlp.encoders.image3d import PatchEmbed3D, ViT3DEncoder, run_block
from medvlp.registry import register_image_encoder

MAE_GRID = 14  # MAE ViT-B/16 at 224 px: a 14 x 14 patch grid


def mae_sincos_2d(dim: int, size: int = MAE_GRID) -> Tensor:
    """MAE's fixed 2D sin-cos position table ``[size * size, dim]`` (rows in (row, column) order): the
    first half of the channels encodes the column index, the second half the row index, each as
    ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000^(-i / (dim / 4))``."""
    if dim % 4:
        raise ValueError(f"MAE's 2D sin-cos table needs a width divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")

    def one(pos: Tensor) -> Tensor:
        ang = pos.reshape(-1, 1) * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


def tiled_2d_positions(table_2d: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """fVLM's initial table ``[1, width, d, h, w]``: a square 2D table ``[n, width]`` viewed as its grid,
    resized bilinearly (``align_corners=False``) to ``(h, w)`` and repeated for every depth index."""
    side = int(math.isqrt(table_2d.shape[0]))
    if side * side != table_2d.shape[0]:
        raise ValueError(f"A 2D position table of {table_2d.shape[0]} rows is not a square grid.")
    t = table_2d.T.reshape(1, -1, side, side)
    t = F.interpolate(t, size=grid[1:], mode="bilinear", align_corners=False)
    return t[:, :, None].repeat(1, 1, grid[0], 1, 1)


@register_image_encoder("fvlm_vit")
class AnatomyViT(nn.Module):
    """fVLM's 3D ViT (see the module docstring).

    Config keys: those of ``vit3d`` (``img_size`` = the training crop, ``patch_size``, ``width``, ``depth``,
    ``heads``, ``mlp_ratio``, ``drop_path``, ``inflate_from`` + ``pretrained``, ``grad_checkpointing``)
    plus ``out_blocks``, ``dropout``, ``norm_eps`` and ``pos_init``.
    """

    Config = AnatomyViTConfig

    def __init__(self, cfg: AnatomyViTConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        if len(cfg.patch_size) != 3 or len(cfg.img_size) != 3:
            raise ValueError(f"method.image_encoder.img_size and patch_size need 3 entries (d, h, w), got "
                             f"{list(cfg.img_size)} and {list(cfg.patch_size)}.")
        if cfg.width % cfg.heads:
            raise ValueError(f"method.image_encoder.width={cfg.width} is not divisible by heads={cfg.heads}.")
        if cfg.global_pool != "mean" or cfg.pos_embed != "learned" or cfg.stem != "patch":
            raise ValueError("method.image_encoder (fvlm_vit) has no [CLS] token, learned positions and a patch "
                             f"embedding: set global_pool=mean, pos_embed=learned, stem=patch (got {cfg.global_pool}, "
                             f"{cfg.pos_embed}, {cfg.stem}).")
        bad = [b for b in cfg.out_blocks if not 1 <= int(b) <= cfg.depth]
        if bad or list(cfg.out_blocks) != sorted(set(int(b) for b in cfg.out_blocks)):
            raise ValueError(f"method.image_encoder.out_blocks={list(cfg.out_blocks)}: expected increasing block numbers "
                             f"in 1..depth={cfg.depth} (1-indexed; fVLM: [4, 7, 10]).")
        self.cfg = cfg
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        self.ref_grid = tuple(int(s) // p for s, p in zip(cfg.img_size, self.patch_size))
        if min(self.ref_grid) < 1:
            raise ValueError(f"method.image_encoder.img_size={list(cfg.img_size)} is smaller than one patch "
                             f"{list(cfg.patch_size)}.")
        self.patch_embed = PatchEmbed3D(cfg.in_chans, cfg.width, self.patch_size)  # type: ignore[arg-type]
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.width, *self.ref_grid))
        self.pos_drop = nn.Dropout(cfg.dropout)
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path, cfg.depth)]
        norm = partial(nn.LayerNorm, eps=float(cfg.norm_eps))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, proj_drop=cfg.dropout,
                  attn_drop=cfg.dropout, drop_path=dpr[i], norm_layer=norm)
            for i in range(cfg.depth)
        )
        self.norm = norm(cfg.width)
        self.apply(ViT3DEncoder._init_weights)  # trunc-normal linears, unit LayerNorms
        self.reset_positions()
        self.out_blocks = [int(b) - 1 for b in cfg.out_blocks]
        self.grad_checkpointing = cfg.grad_checkpointing
        self.out_dim = self.local_dim = cfg.width
        if cfg.inflate_from:
            self.load_2d_blocks(cfg.inflate_from, pretrained=cfg.pretrained)

    @torch.no_grad()
    def reset_positions(self) -> None:
        """Initialise the position table per ``pos_init``."""
        if self.cfg.pos_init == "mae_sincos":
            self.pos_embed.copy_(tiled_2d_positions(mae_sincos_2d(self.cfg.width), self.ref_grid))
        elif self.cfg.pos_init == "random":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            raise ValueError(f"method.image_encoder.pos_init must be mae_sincos or random, got '{self.cfg.pos_init}'.")

    def positions(self, grid: tuple[int, int, int]) -> Tensor:
        """The position table ``[1, d*h*w, width]`` of ``grid`` (the stored one resized trilinearly)."""
        table = self.pos_embed
        if tuple(grid) != self.ref_grid:
            table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def forward(self, volumes: Tensor, return_attention: bool = False) -> ImageFeatures:
        """Encode ``volumes`` ``[B, C, D, H, W]`` (each axis a multiple of the patch size).

        Returns:
            ImageFeatures: ``tokens`` the final normalised tokens ``[B, d*h*w, width]``, ``pooled`` their
            mean, ``grid`` ``(d, h, w)``, ``levels`` the raw residual stream after each of ``out_blocks``
            and the final tokens (``len(out_blocks) + 1`` tensors ``[B, d*h*w, width]``).
        """
        x, grid = self.patch_embed(volumes)
        x = self.pos_drop(x + self.positions(grid))
        levels, attn = [], None
        for i, blk in enumerate(self.blocks):
            x, probs = run_block(blk, x, return_attention and i == len(self.blocks) - 1, self.grad_checkpointing and self.training)
            attn = probs if probs is not None else attn
            if i in self.out_blocks:
                levels.append(x)
        x = self.norm(x)
        levels.append(x)
        return ImageFeatures(pooled=x.mean(dim=1), tokens=x, grid=grid, attentions=attn, levels=levels)

    @torch.no_grad()
    def load_2d_blocks(self, name: str, pretrained: bool = True) -> None:
        """Copy a timm ViT's transformer blocks and final norm (fVLM: MAE ViT-B/16's encoder); the patch
        embedding and the positions are left as initialised."""
        import timm

        src = timm.create_model(name, pretrained=pretrained, num_classes=0)
        if src.embed_dim != self.cfg.width or len(src.blocks) < self.cfg.depth:
            raise ValueError(f"Cannot load '{name}' (width {src.embed_dim}, {len(src.blocks)} blocks) into an fvlm_vit "
                             f"of width {self.cfg.width} and depth {self.cfg.depth}.")
        for dst, s in zip(self.blocks, src.blocks):
            dst.load_state_dict(s.state_dict())
        self.norm.load_state_dict(src.norm.state_dict())


__all__ = ["AnatomyViT", "mae_sincos_2d", "tiled_2d_positions"]

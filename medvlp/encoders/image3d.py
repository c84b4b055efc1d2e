"""A ViT over volumes: 3D patch embedding, positions for variable grids, 2D->3D inflation.

Blocks are timm ``Block`` modules (fused SDPA attention), so weights of any timm ViT of the same
width can be inflated into it: the blocks, norms and [CLS] token are copied, the 2D patch kernel
``[D, C, ph, pw]`` becomes ``[D, C, pd, ph, pw]`` by repeating it along depth and dividing by ``pd``
(average inflation: a volume of identical slices gives the 2D response), and the 2D position
table is resized to the (h, w) grid and repeated along depth.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageFeatures
from medvlp.config import ViT3DEncoderConfig
from medvlp.encoders.image2d import LastAttentionRecorder
from medvlp.registry import register_image_encoder


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int) -> Tensor:
    """Fixed sine-cosine positions ``[d*h*w, dim]`` for a token grid ``(d, h, w)``.

    Rows follow the patch embedding's flattening (depth slowest, width fastest: row ``(i*h + j)*w + k``
    is depth ``i``, height ``j``, width ``k``). Each row is three 1-D MAE sin-cos codes of ``dim // 3``
    channels (``[sin(p w_n), cos(p w_n)]``, ``w_n = 10000^(-n / (dim/6))``) laid out in the order
    **(w, h, d)**: channels ``[0, dim/3)`` encode ``k``, ``[dim/3, 2 dim/3)`` encode ``j`` and the last
    third ``i``. This is HLIP's ``get_3d_sincos_pos_embed`` (``src/hlip/pos_embed.py``; specs/methods/
    hlip.md §2.4), whose (w, h, d) order extends MAE's 2-D table (first half: the column, second half:
    the row). It is the one 3-D sin-cos layout in the library: HLIP's table without 2-D inflation and
    ``vit3d`` with ``pos_embed=sincos`` (which no spec pins) both use it.

    Differences from the official code: widths that are not a multiple of 6 are accepted; each axis
    then gets ``(dim // 6) * 2`` channels and the remaining ones are zero (the official code asserts).
    """
    per_axis = (dim // 6) * 2  # even number of channels per axis
    omega = 1.0 / (10000 ** (torch.arange(per_axis // 2, dtype=torch.float32) / max(per_axis // 2, 1)))
    out = []
    for axis in (2, 1, 0):  # (w, h, d) as in the official table
        size = grid[axis]
        ang = torch.arange(size, dtype=torch.float32)[:, None] * omega[None]
        emb = torch.cat([ang.sin(), ang.cos()], dim=1)  # [size, per_axis]
        shape = [1, 1, 1, per_axis]
        shape[axis] = size
        out.append(emb.reshape(shape).expand(*grid, per_axis))
    table = torch.cat(out, dim=-1).reshape(-1, 3 * per_axis)
    return F.pad(table, (0, dim - table.shape[1]))


def vit_trunk(cfg: ViT3DEncoderConfig) -> tuple[nn.ModuleList, nn.LayerNorm]:
    """``(blocks, final norm)`` of a timm-compatible ViT: ``depth`` pre-norm blocks (qkv bias, LayerNorm
    eps 1e-6, stochastic depth rising linearly to ``drop_path``), so 2D weights load into them."""
    from timm.models.vision_transformer import Block

    dpr = [x.item() for x in torch.linspace(0, cfg.drop_path, cfg.depth)]
    blocks = nn.ModuleList(
        Block(cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path=dpr[i],
              norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for i in range(cfg.depth)
    )
    return blocks, nn.LayerNorm(cfg.width, eps=1e-6)


def run_block(blk: nn.Module, x: Tensor, record: bool, checkpoint: bool) -> tuple[Tensor, Tensor | None]:
    """One transformer block: ``(output, attention probabilities if record else None)``; with
    ``checkpoint`` its activations are recomputed in the backward pass."""
    if record:
        with LastAttentionRecorder(blk.attn) as rec:
            x = blk(x)
        return x, rec.probs()
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False), None
    return blk(x), None


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches: ``[B, C, D, H, W]`` -> ``[B, d*h*w, width]`` and the grid."""

    def __init__(self, in_chans: int, width: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        for axis, (size, p) in enumerate(zip(x.shape[2:], self.patch_size)):
            if size % p:
                raise ValueError(
                    f"Volume axis {axis} has {size} voxels, not a multiple of the patch size {p} "
                    f"(method.image_encoder.patch_size={list(self.patch_size)}); crop or pad the volume "
                    f"(data.size) to a multiple."
                )
        x = self.proj(x)
        grid = (int(x.shape[2]), int(x.shape[3]), int(x.shape[4]))
        return x.flatten(2).transpose(1, 2), grid


class ConvStem3D(nn.Module):
    """Convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see
    better"): stride-2 3x3x3 convolutions (GroupNorm + GELU) until the total stride equals the
    patch size on every axis, then a 1x1x1 projection to ``width``. Same output as
    :class:`PatchEmbed3D`; better optimisation and data efficiency when training from scratch.
    """

    def __init__(self, in_chans: int, width: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        for p in patch_size:
            if p & (p - 1):
                raise ValueError(f"method.image_encoder.stem=conv needs power-of-two patch sizes, got {list(patch_size)}")
        n = max(int(math.log2(p)) for p in patch_size)
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(n):
            stride = tuple(2 if (p >> i) > 1 else 1 for p in patch_size)
            out = max(8, width >> (n - i))
            layers += [nn.Conv3d(chans, out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(math.gcd(8, out), out), nn.GELU()]
            chans = out
        layers.append(nn.Conv3d(chans, width, 1))
        self.proj = nn.Sequential(*layers)

    forward = PatchEmbed3D.forward


@register_image_encoder("vit3d")
class ViT3DEncoder(nn.Module):
    """Vision Transformer over volumes.

    Config keys: ``img_size`` (D, H, W of the reference grid), ``patch_size`` (pd, ph, pw),
    ``in_chans``, ``width``, ``depth``, ``heads``, ``mlp_ratio``, ``drop_path``, ``pos_embed``
    (``learned``: a table over the reference grid, trilinearly resized for other grids;
    ``sincos``: fixed), ``stem`` (``patch``: one strided convolution; ``conv``: :class:`ConvStem3D`),
    ``global_pool`` (``cls`` | ``mean``), ``inflate_from`` + ``pretrained`` (inflate a timm 2D ViT),
    ``grad_checkpointing``.
    """

    Config = ViT3DEncoderConfig  # the schema of method.<image|text>_encoder for this encoder

    def __init__(self, cfg: ViT3DEncoderConfig) -> None:
        super().__init__()

        if len(cfg.patch_size) != 3:
            raise ValueError(f"method.image_encoder.patch_size must have 3 entries (d, h, w), got {list(cfg.patch_size)}")
        if len(cfg.img_size) != 3:
            raise ValueError(f"method.image_encoder.img_size must have 3 entries (D, H, W) for vit3d, got {list(cfg.img_size)}")
        if cfg.width % cfg.heads:
            raise ValueError(f"method.image_encoder.width={cfg.width} is not divisible by heads={cfg.heads}")
        if cfg.global_pool not in ("cls", "mean"):
            raise ValueError(f"method.image_encoder.global_pool must be 'cls' or 'mean', got '{cfg.global_pool}'")
        self.cfg = cfg
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        self.ref_grid = tuple(int(s) // p for s, p in zip(cfg.img_size, self.patch_size))
        if cfg.stem not in ("patch", "conv"):
            raise ValueError(f"method.image_encoder.stem must be 'patch' or 'conv', got '{cfg.stem}'")
        if cfg.stem == "conv" and cfg.inflate_from:
            raise ValueError("method.image_encoder.inflate_from needs stem=patch (a 2D ViT has a patch embedding)")
        stem = ConvStem3D if cfg.stem == "conv" else PatchEmbed3D
        self.patch_embed = stem(cfg.in_chans, cfg.width, self.patch_size)  # type: ignore[arg-type]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.width, *self.ref_grid))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif cfg.pos_embed == "sincos":
            self.register_parameter("pos_embed", None)
        else:
            raise ValueError(f"method.image_encoder.pos_embed must be 'learned' or 'sincos', got '{cfg.pos_embed}'")
        self.blocks, self.norm = vit_trunk(cfg)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.out_dim = self.local_dim = cfg.width
        if cfg.inflate_from:
            self.inflate_from_2d(cfg.inflate_from, pretrained=cfg.pretrained)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def positions(self, grid: tuple[int, int, int]) -> Tensor:
        """Position table ``[1, d*h*w, width]`` for ``grid``."""
        if self.pos_embed is None:
            return sincos_pos_embed_3d(grid, self.cfg.width).to(self.cls_token)[None]
        table = self.pos_embed
        if grid != self.ref_grid:
            table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def forward(self, volumes: Tensor, return_attention: bool = False) -> ImageFeatures:
        """Encode ``volumes`` ``[B, C, D, H, W]`` (each axis a multiple of the patch size).

        Returns:
            ImageFeatures: ``pooled`` the [CLS] token (or the mean patch token) ``[B, width]``, ``tokens`` ``[B, d*h*w, width]``,
            ``grid`` ``(d, h, w)``, and with ``return_attention`` the last block's attention.
        """
        x, grid = self.patch_embed(volumes)
        x = x + self.positions(grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        attn = None
        for i, blk in enumerate(self.blocks):
            x, probs = run_block(blk, x, return_attention and i == len(self.blocks) - 1, self.grad_checkpointing and self.training)
            attn = probs if probs is not None else attn
        x = self.norm(x)
        pooled = x[:, 1:].mean(dim=1) if self.cfg.global_pool == "mean" else x[:, 0]
        return ImageFeatures(pooled=pooled, tokens=x[:, 1:], grid=grid, attentions=attn)

    @torch.no_grad()
    def inflate_from_2d(self, name: str, pretrained: bool = True) -> None:
        """Copy a timm 2D ViT's weights into this encoder (average inflation of the patch kernel)."""
        import timm

        src = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=self.cfg.in_chans)
        if src.embed_dim != self.cfg.width or len(src.blocks) < self.cfg.depth:
            raise ValueError(
                f"Cannot inflate '{name}' (width {src.embed_dim}, {len(src.blocks)} blocks) into a vit3d of "
                f"width {self.cfg.width} and depth {self.cfg.depth}."
            )
        for dst, s in zip(self.blocks, src.blocks):
            dst.load_state_dict(s.state_dict())
        self.norm.load_state_dict(src.norm.state_dict())
        if getattr(src, "cls_token", None) is not None:
            self.cls_token.copy_(src.cls_token)
        w2d = src.patch_embed.proj.weight  # [D, C, ph, pw]
        pd, ph, pw = self.patch_size
        if w2d.shape[-2:] != (ph, pw):
            w2d = F.interpolate(w2d, size=(ph, pw), mode="bicubic", align_corners=False) * (
                w2d.shape[-2] * w2d.shape[-1] / (ph * pw)
            )
        self.patch_embed.proj.weight.copy_(w2d[:, :, None].repeat(1, 1, pd, 1, 1) / pd)
        self.patch_embed.proj.bias.copy_(src.patch_embed.proj.bias)
        if self.pos_embed is not None and getattr(src, "pos_embed", None) is not None:
            n_prefix = int(getattr(src, "num_prefix_tokens", 1)) if not getattr(src, "no_embed_class", False) else 0
            table = src.pos_embed[0, n_prefix:]  # [n, width]
            side = int(math.isqrt(table.shape[0]))
            table = table.T.reshape(1, -1, side, side)
            table = F.interpolate(table, size=self.ref_grid[1:], mode="bicubic", align_corners=False)
            self.pos_embed.copy_(table[:, :, None].expand(-1, -1, self.ref_grid[0], -1, -1))

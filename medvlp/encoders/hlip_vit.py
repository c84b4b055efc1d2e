"""HLIP's image tower: a plain ViT over a whole study whose blocks attend within a slab, a scan or the study.

Input ``[B, N, C, D, H, W]`` (B studies of N scans; ``[B, C, D, H, W]`` is one scan per study). The
3D patch embedding gives a token grid ``[B, N, d, h, w]``; every block is an unmodified ViT block
(timm ``Block``, fused SDPA) run on one of three **window batchings** of the same token tensor
(``specs/methods/hlip.md`` §2.5):

=========  ==========================  ===================
level      one window                  windows per batch
=========  ==========================  ===================
``slice``  one depth index of one scan ``B * N * d``
``scan``   one scan                    ``B * N``
``study``  the whole study             ``B``
=========  ==========================  ===================

Patch tokens live in one contiguous tensor ``[B, N, S, T, C]`` (``S`` slabs of ``T`` tokens), so each
level is a free reshape of it. Every window carries its own copy of the prefix ([CLS]) token: going
to a finer level copies the current [CLS] into each window; going to a coarser level averages the
copies of the merged windows. After the last block the [CLS] copies are merged to the study level,
and the final LayerNorm'd [CLS] is the study feature.

Padded studies (``scan_mask`` ``[B, N]``, False = padding): slice / scan windows of padded scans are
computed and discarded, study blocks mask padded keys, and every [CLS] mean runs over real scans
only - a study gives the same feature alone and inside a padded batch.

Positions (fixed, not learned, §2.4): a spatial table per scan - MAE's 2D sin-cos table of the
inflated model resized to ``(h, w)`` with timm's ``resample_abs_pos_embed`` plus a 1-D sin-cos over
``d`` (full width), or, without inflation, the 3-D sin-cos table whose channel thirds encode
(w, h, d) (:func:`~medvlp.encoders.image3d.sincos_pos_embed_3d`) - resized trilinearly
(``align_corners=False``) to other grids; and, for multi-scan models, a 1-D
sin-cos **sequence** table of ``max_scans`` rows (training: a random set of distinct rows in random
order, shared by the batch; evaluation: rows ``0..N-1``, interpolated when ``N > max_scans``).
``pos_embed=learned`` makes both tables trainable (initialised the same way).

Patch dropout (``patch_dropout`` > 0, training only) keeps the same random fraction of the tokens
in every finest window, so the re-grouping stays valid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageFeatures
from medvlp.config import HierarchicalViTConfig
from medvlp.encoders.image2d import LastAttentionRecorder
from medvlp.encoders.image3d import PatchEmbed3D, ViT3DEncoder, sincos_pos_embed_3d, vit_trunk
from medvlp.registry import register_image_encoder

LEVELS = ("slice", "scan", "study")
_RANK = {"slice": 0, "scan": 1, "study": 2}


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """MAE's 1-D sin-cos embedding ``[len(positions), dim]``: ``[sin(p w_i), cos(p w_i)]``, ``w_i = 10000^(-2i/dim)``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    ang = positions.double()[:, None] * omega[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1).float()


def parse_levels(levels: list[str] | tuple[str, ...], depth: int) -> list[str]:
    """Validate the per-block attention levels against the depth (a clear error otherwise)."""
    levels = [str(v).strip().lower() for v in levels]
    if len(levels) != depth:
        raise ValueError(f"method.image_encoder.levels has {len(levels)} entries for depth={depth}; give one level "
                         f"({', '.join(LEVELS)}) per block, e.g. [slice, scan, study] * {max(depth // 3, 1)}.")
    bad = [v for v in levels if v not in LEVELS]
    if bad:
        raise ValueError(f"method.image_encoder.levels: {bad} are not levels; use {', '.join(LEVELS)}.")
    return levels


@register_image_encoder("hlip_vit")
class HierarchicalViT(nn.Module):
    """HLIP's hierarchical-attention ViT (see the module docstring).

    Config keys: ``img_size`` (D, H, W of the training scan), ``patch_size`` (pd, ph, pw), ``in_chans``,
    ``width``, ``depth``, ``heads``, ``mlp_ratio``, ``drop_path``, ``levels`` (one per block),
    ``max_scans`` (rows of the sequence table), ``sequence_pos_embed``, ``pos_embed`` (``sincos`` fixed |
    ``learned``), ``patch_dropout``, ``inflate_from`` + ``pretrained`` (average inflation of a timm 2D
    ViT, HLIP's recipe), ``grad_checkpointing``.
    """

    Config = HierarchicalViTConfig  # the schema of method.<image|text>_encoder for this encoder

    def __init__(self, cfg: HierarchicalViTConfig) -> None:
        super().__init__()

        if len(cfg.patch_size) != 3 or len(cfg.img_size) != 3:
            raise ValueError(f"method.image_encoder.patch_size and img_size need 3 entries (d, h, w), got "
                             f"{list(cfg.patch_size)} and {list(cfg.img_size)}")
        if cfg.width % cfg.heads:
            raise ValueError(f"method.image_encoder.width={cfg.width} is not divisible by heads={cfg.heads}")
        if cfg.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"method.image_encoder.pos_embed must be 'sincos' (HLIP) or 'learned', got '{cfg.pos_embed}'")
        if not 0.0 <= float(cfg.patch_dropout) < 1.0:
            raise ValueError(f"method.image_encoder.patch_dropout must be in [0, 1), got {cfg.patch_dropout}")
        if cfg.global_pool not in ("cls", "mean"):
            raise ValueError(f"method.image_encoder.global_pool must be 'cls' (HLIP) or 'mean', got '{cfg.global_pool}'")
        self.cfg = cfg
        self.levels = parse_levels(list(cfg.levels), int(cfg.depth))
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        self.ref_grid = tuple(int(s) // p for s, p in zip(cfg.img_size, self.patch_size, strict=True))
        if min(self.ref_grid) < 1:
            raise ValueError(f"method.image_encoder.img_size {list(cfg.img_size)} is smaller than one patch {list(cfg.patch_size)}")
        self.patch_embed = PatchEmbed3D(cfg.in_chans, cfg.width, self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        learn = cfg.pos_embed == "learned"
        spatial = sincos_pos_embed_3d(self.ref_grid, cfg.width).T.reshape(1, cfg.width, *self.ref_grid)
        self.spatial_pos = nn.Parameter(spatial, requires_grad=learn)
        self.max_scans = int(cfg.max_scans)
        if cfg.sequence_pos_embed and self.max_scans < 1:
            raise ValueError("method.image_encoder.sequence_pos_embed needs max_scans >= 1")
        seq = sincos_1d(torch.arange(max(self.max_scans, 1)), cfg.width) if cfg.sequence_pos_embed else torch.zeros(0)
        self.sequence_pos = nn.Parameter(seq, requires_grad=learn and bool(cfg.sequence_pos_embed))
        self.blocks, self.norm = vit_trunk(cfg)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(ViT3DEncoder._init_weights)
        self.grad_checkpointing = bool(cfg.grad_checkpointing)
        self.out_dim = self.local_dim = int(cfg.width)
        if cfg.inflate_from:
            self.inflate_from_2d(cfg.inflate_from, pretrained=cfg.pretrained)

    # ------------------------------------------------------------------ positions
    def spatial_positions(self, grid: tuple[int, int, int]) -> Tensor:
        """``[d, h, w, width]`` (resized trilinearly, ``align_corners=False``, from the reference grid when it
        differs, as the official ``resample_3d_posemb``)."""
        table = self.spatial_pos
        if tuple(grid) != self.ref_grid:
            table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
        return table[0].permute(1, 2, 3, 0)

    def sequence_positions(self, n: int) -> Tensor | None:
        """``[n, width]`` for ``n`` scans, or None without a sequence table."""
        if self.sequence_pos.numel() == 0:
            return None
        table = self.sequence_pos
        if self.training:
            if n > self.max_scans:
                raise ValueError(f"{n} scans per study exceed method.image_encoder.max_scans={self.max_scans} in training")
            return table[torch.randperm(self.max_scans, device=table.device)[:n]]
        if n <= self.max_scans:
            return table[:n]
        return F.interpolate(table.T[None], size=n, mode="linear", align_corners=False)[0].T

    # ------------------------------------------------------------------ windows
    @staticmethod
    def _windows(level: str, b: int, n: int, s: int) -> tuple[int, ...]:
        """The [CLS] layout ``[B, *windows]`` of a level."""
        return {"slice": (b, n, s), "scan": (b, n), "study": (b,)}[level]

    def _merge(self, cls: Tensor, src: str, dst: str, scan_w: Tensor | None) -> Tensor:
        """Average [CLS] copies from level ``src`` to the coarser ``dst`` (real scans only)."""
        if src == "slice":  # [B, N, S, C] -> [B, N, C]
            cls = cls.mean(dim=2)
            src = "scan"
        if src == dst:
            return cls
        if scan_w is None:  # scan -> study
            return cls.mean(dim=1)
        return (cls.float() * scan_w[..., None]).sum(dim=1).to(cls.dtype)

    @staticmethod
    def _split(cls: Tensor, src: str, dst: str, n: int, s: int) -> Tensor:
        """Copy [CLS] from level ``src`` into every window of the finer ``dst``."""
        if src == "study":
            cls = cls[:, None].expand(-1, n, -1)
            src = "scan"
        if dst == "slice":
            cls = cls[:, :, None].expand(-1, -1, s, -1)
        return cls

    def _regroup(self, cls: Tensor, src: str, dst: str, n: int, s: int, scan_w: Tensor | None) -> Tensor:
        if _RANK[dst] > _RANK[src]:
            return self._merge(cls, src, dst, scan_w)
        if _RANK[dst] < _RANK[src]:
            return self._split(cls, src, dst, n, s)
        return cls

    def _run_block(self, i: int, blk: nn.Module, level: str, cls: Tensor, patches: Tensor,
                   key_mask: Tensor | None, record: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        b, n, s, t, c = patches.shape
        layout = self._windows(level, b, n, s)
        windows = math.prod(layout)
        seq = torch.cat([cls.reshape(windows, 1, c), patches.reshape(windows, -1, c)], dim=1)
        mask = key_mask if level == "study" else None
        attn = None
        if record:
            with LastAttentionRecorder(blk.attn) as rec:
                out = blk(seq, attn_mask=mask) if mask is not None else blk(seq)
            attn = rec.probs()
            if mask is not None:  # the recorder recomputes softmax(q k^T): drop padded keys, renormalise
                attn = attn * mask.to(attn.dtype)
                attn = attn / attn.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        elif self.grad_checkpointing and self.training:
            out = torch.utils.checkpoint.checkpoint(blk, seq, mask, use_reentrant=False)
        else:
            out = blk(seq, attn_mask=mask) if mask is not None else blk(seq)
        return out[:, 0].reshape(*layout, c), out[:, 1:].reshape(b, n, s, t, c), attn

    # ------------------------------------------------------------------ forward
    def _patch_dropout(self, patches: Tensor) -> Tensor:
        """Keep the same random subset size of tokens in every finest window (training only)."""
        p = float(self.cfg.patch_dropout)
        if not self.training or p <= 0:
            return patches
        b, n, s, t, c = patches.shape
        keep = max(1, int(round(t * (1.0 - p))))
        idx = torch.rand(b, n, s, t, device=patches.device).argsort(dim=-1)[..., :keep]
        return torch.gather(patches, 3, idx[..., None].expand(-1, -1, -1, -1, c))

    def forward(self, images: Tensor, scan_mask: Tensor | None = None, return_attention: bool = False,
                return_tokens: bool = True) -> ImageFeatures:
        """Encode studies ``[B, N, C, D, H, W]`` (or scans ``[B, C, D, H, W]``).

        Returns:
            ImageFeatures: ``pooled`` ``[B, width]`` (final-norm [CLS], or the mean patch token with
            ``global_pool=mean``), ``tokens`` ``[B, N * d * h * w, width]`` (normed; padded scans
            included; None with ``return_tokens=False``, which spares their normalisation), ``grid``
            ``(d, h, w)``, and with ``return_attention`` the last block's attention.
        """
        if images.ndim == 5:
            images = images[:, None]
        if images.ndim != 6:
            raise ValueError(f"hlip_vit expects studies [B, N, C, D, H, W] or scans [B, C, D, H, W], got {tuple(images.shape)}")
        b, n = images.shape[:2]
        x, grid = self.patch_embed(images.flatten(0, 1))  # [B*N, d*h*w, C]
        c = x.shape[-1]
        d, h, w = grid
        x = x.reshape(b, n, d, h, w, c) + self.spatial_positions(grid).to(x.dtype)
        seq = self.sequence_positions(n)
        if seq is not None:
            counts = (scan_mask.sum(dim=1).tolist() if scan_mask is not None and not self.training and n > self.max_scans
                      else None)  # read only where it decides something
            if counts is not None and min(counts) < n:
                # rows interpolated to each study's own scan count, as if it were alone; padding gets none
                seq = torch.stack([F.pad(self.sequence_positions(int(k)), (0, 0, 0, n - int(k))) for k in counts])
                x = x + seq.to(x.dtype)[:, :, None, None, None]
            else:
                x = x + seq.to(x.dtype)[None, :, None, None, None]
        finest = min(self.levels, key=_RANK.__getitem__)
        patches = x.reshape(b, n, d, h * w, c) if finest == "slice" else x.reshape(b, n, 1, d * h * w, c)
        patches = self._patch_dropout(patches)
        s, t = patches.shape[2], patches.shape[3]

        scan_w, key_mask = None, None
        if scan_mask is not None:
            real = scan_mask.to(device=images.device, dtype=torch.bool)
            if real.shape != (b, n) or not real.any(dim=1).all():
                raise ValueError(f"scan_mask must be [B, N] = {(b, n)} with at least one real scan per study, got "
                                 f"{tuple(real.shape)}")
            if not real.all():
                scan_w = real.float() / real.sum(dim=1, keepdim=True).float()  # mean weights over real scans (fp32)
                keys = torch.cat([real.new_ones(b, 1), real[:, :, None].expand(-1, -1, s * t).reshape(b, -1)], dim=1)
                key_mask = keys[:, None, None, :]  # [B, 1, 1, 1 + N*S*T], True = attend

        level = self.levels[0]
        cls = self.cls_token.to(x.dtype).reshape(1, c).expand(math.prod(self._windows(level, b, n, s)), c)
        cls = cls.reshape(*self._windows(level, b, n, s), c)
        attn = None
        for i, blk in enumerate(self.blocks):
            new = self.levels[i]
            cls = self._regroup(cls, level, new, n, s, scan_w)
            level = new
            record = return_attention and i == len(self.blocks) - 1
            cls, patches, a = self._run_block(i, blk, level, cls, patches, key_mask, record)
            attn = a if record else attn
        cls = self._regroup(cls, level, "study", n, s, scan_w)  # [B, C]
        cls = self.norm(cls)
        need = return_tokens or self.cfg.global_pool == "mean"
        tokens = self.norm(patches.reshape(b, n * s * t, c)) if need else None
        if self.cfg.global_pool == "mean":
            if scan_w is None:
                pooled = tokens.mean(dim=1)
            else:
                pooled = (tokens.reshape(b, n, s * t, c).mean(dim=2) * scan_w[..., None]).sum(dim=1)
        else:
            pooled = cls
        return ImageFeatures(pooled=pooled, tokens=tokens if return_tokens else None, grid=grid, attentions=attn)

    # ------------------------------------------------------------------ 2D -> 3D
    @torch.no_grad()
    def inflate_from_2d(self, name: str, pretrained: bool = True) -> None:
        """HLIP's initialisation from a timm 2D ViT (e.g. ``vit_base_patch16_224.mae``), §2.3: blocks, final
        norm and [CLS] copied; the patch kernel resized bicubically in-plane (no magnitude rescaling),
        summed over the RGB inputs, repeated along depth and divided by ``pd``; the bias copied; the
        spatial table = the 2D position table resized to ``(h, w)`` by timm's antialiased
        ``resample_abs_pos_embed`` (:func:`resize_2d_positions`) + a 1-D sin-cos over ``d``."""
        import timm

        src = timm.create_model(name, pretrained=pretrained, num_classes=0)
        if src.embed_dim != self.cfg.width or len(src.blocks) != self.cfg.depth:
            raise ValueError(f"Cannot inflate '{name}' (width {src.embed_dim}, {len(src.blocks)} blocks) into an hlip_vit "
                             f"of width {self.cfg.width} and depth {self.cfg.depth}.")
        for dst, s in zip(self.blocks, src.blocks, strict=True):
            dst.load_state_dict(s.state_dict())
        self.norm.load_state_dict(src.norm.state_dict())
        n_prefix = int(getattr(src, "num_prefix_tokens", 1))
        cls = src.cls_token
        if getattr(src, "pos_embed", None) is not None and not getattr(src, "no_embed_class", False):
            cls = cls + src.pos_embed[:, :1]  # MAE's row 0 is zero: the [CLS] alone
        self.cls_token.copy_(cls)
        self.patch_embed.proj.weight.copy_(inflate_patch_kernel(src.patch_embed.proj.weight, self.patch_size,
                                                                self.cfg.in_chans))
        self.patch_embed.proj.bias.copy_(src.patch_embed.proj.bias)
        if getattr(src, "pos_embed", None) is not None:
            start = 0 if getattr(src, "no_embed_class", False) else n_prefix
            table = resize_2d_positions(src.pos_embed[:, start:], self.ref_grid[1:],
                                        getattr(src.patch_embed, "grid_size", None))  # [1, C, h, w]
            depth = sincos_1d(torch.arange(self.ref_grid[0]), self.cfg.width).T  # [C, d]
            spatial = table[:, :, None] + depth[None, :, :, None, None]
            self.spatial_pos.copy_(spatial.to(self.spatial_pos))


def resize_2d_positions(table: Tensor, size: tuple[int, int], src_grid: tuple[int, int] | None = None) -> Tensor:
    """A 2D ViT's position table ``[1, n, C]`` (prefix rows removed, rows in raster order) resized to
    ``size`` = ``(h, w)`` -> ``[1, C, h, w]``.

    This is timm's ``resample_abs_pos_embed`` (bicubic, ``align_corners=False``, **antialiased**), as in
    HLIP's ``study_pos_embed`` (``src/hlip/pos_embed.py``, spec §2.4); a table already of ``size`` is
    returned unchanged. ``src_grid`` is the source's token grid; without it the source is taken to be
    square, as in the official code (which cannot load a non-square source).
    """
    from timm.layers import resample_abs_pos_embed

    n = table.shape[1]
    if src_grid is None:
        side = math.isqrt(n)
        src_grid = (side, side)
    src_grid = (int(src_grid[0]), int(src_grid[1]))
    if src_grid[0] * src_grid[1] != n:
        raise ValueError(f"A 2D position table of {n} rows does not fill the source token grid {src_grid}; "
                         f"inflate from a ViT with an absolute position table over its patch grid.")
    size = (int(size[0]), int(size[1]))
    resized = resample_abs_pos_embed(table, new_size=size, old_size=src_grid, num_prefix_tokens=0)
    return resized.reshape(1, *size, table.shape[-1]).permute(0, 3, 1, 2)


def inflate_patch_kernel(w2d: Tensor, patch: tuple[int, int, int], in_chans: int = 1) -> Tensor:
    """HLIP's average inflation of a 2D patch kernel ``[D, 3, ph0, pw0]`` -> ``[D, in_chans, pd, ph, pw]``:
    bicubic in-plane resize without rescaling, summed over the input channels (for one grey channel),
    repeated ``pd`` times along depth and divided by ``pd``.

    The resize is a plain ``F.interpolate(mode="bicubic", align_corners=False)`` without antialiasing,
    as in ``custom_checkpoint_filter_fn`` (``src/hlip/visual_encoder.py``), not timm's
    ``resample_patch_embed`` (a pseudo-inverse resize that preserves the patch response)."""
    pd, ph, pw = patch
    if tuple(w2d.shape[-2:]) != (ph, pw):
        w2d = F.interpolate(w2d, size=(ph, pw), mode="bicubic", align_corners=False)
    if in_chans == 1 and w2d.shape[1] != 1:
        w2d = w2d.sum(dim=1, keepdim=True)
    elif w2d.shape[1] != in_chans:
        raise ValueError(f"Cannot inflate a {w2d.shape[1]}-channel patch kernel to in_chans={in_chans}")
    return w2d[:, :, None].repeat(1, 1, pd, 1, 1) / pd


__all__ = ["HierarchicalViT", "LEVELS", "inflate_patch_kernel", "parse_levels", "resize_2d_positions", "sincos_1d"]

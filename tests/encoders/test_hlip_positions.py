"""HLIP's spatial position tables against the official formulas (specs/methods/hlip.md §2.4).

References are written here in numpy from the definitions in HLIP's ``src/hlip/pos_embed.py``:
``get_3d_sincos_pos_embed`` (channel thirds in the order (w, h, d) over an ``ij`` meshgrid of
(d, h, w)) and ``study_pos_embed`` with a pretrained 2D table (timm's ``resample_abs_pos_embed`` to
(h, w) plus a full-width 1-D sin-cos over depth).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.config import HierarchicalViTConfig
from medvlp.encoders.hlip_vit import HierarchicalViT
from medvlp.encoders.image3d import sincos_pos_embed_3d

BASE = {"name": "hlip_vit", "in_chans": 1, "width": 48, "depth": 1, "heads": 3, "levels": ["scan"], "max_scans": 1,
        "sequence_pos_embed": False, "pos_embed": "sincos", "pretrained": False}


def sincos_1d_ref(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's 1-D code ``[M, dim]``: ``[sin(p w_n), cos(p w_n)]``, ``w_n = 10000^(-n / (dim/2))``."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    ang = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)


def sincos_3d_ref(grid: tuple[int, int, int], dim: int, order: str = "whd") -> np.ndarray:
    """The official 3-D table ``[d*h*w, dim]``; ``order="dhw"`` gives the previous (wrong) layout."""
    axes = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in grid), indexing="ij")  # d, h, w
    codes = {a: sincos_1d_ref(dim // 3, g) for a, g in zip("dhw", axes, strict=True)}
    return np.concatenate([codes[a] for a in order], axis=1)


def mae_2d_ref(side: int, dim: int) -> np.ndarray:
    """MAE's 2D table ``[side*side, dim]`` in raster order: first half the column, second half the row."""
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    return np.concatenate([sincos_1d_ref(dim // 2, cols), sincos_1d_ref(dim // 2, rows)], axis=1)


def test_3d_table_is_the_official_w_h_d_layout_on_a_non_cubic_grid() -> None:
    grid, dim = (3, 4, 5), 48
    ref = sincos_3d_ref(grid, dim)
    table = sincos_pos_embed_3d(grid, dim).double().numpy()
    assert table.shape == ref.shape == (60, 48)
    assert np.abs(table - ref).max() < 1e-6
    assert np.abs(table - sincos_3d_ref(grid, dim, order="dhw")).max() > 0.5  # the (d, h, w) layout is caught
    # row (i*h + j)*w + k is depth i, height j, width k: channel 0 = sin(k), channel 2*dim/3 = sin(i)
    row = (2 * 4 + 1) * 5 + 3
    assert np.isclose(table[row, 0], np.sin(3.0)) and np.isclose(table[row, 16], np.sin(1.0))
    assert np.isclose(table[row, 32], np.sin(2.0))

    enc = HierarchicalViT(HierarchicalViTConfig(**{**BASE, "img_size": [12, 32, 40], "patch_size": [4, 8, 8]}))
    assert enc.ref_grid == grid
    x = torch.randn(1, 1, 12, 32, 40)
    tokens, got = enc.patch_embed(x)
    assert got == grid  # the patch grid is (d, h, w) of [B, C, D, H, W], flattened depth-slowest
    conv = enc.patch_embed.proj(x)[0, :, 2, 1, 3]
    assert torch.allclose(tokens[0, row], conv, atol=1e-6)
    pos = enc.spatial_positions(grid).double().numpy()  # [d, h, w, C]
    assert np.abs(pos - ref.reshape(*grid, dim)).max() < 1e-6
    # other grids: the official trilinear resize (align_corners=False) of the [1, C, d, h, w] table
    other = torch.from_numpy(ref.reshape(*grid, dim)).float().permute(3, 0, 1, 2)[None]
    expect = F.interpolate(other, size=(6, 4, 3), mode="trilinear", align_corners=False)[0].permute(1, 2, 3, 0)
    assert (enc.spatial_positions((6, 4, 3)) - expect).abs().max() < 1e-6


@pytest.mark.parametrize("size", [(6, 6), (5, 9), (20, 16)])
def test_inflated_spatial_table_uses_timms_antialiased_resample(monkeypatch, size) -> None:
    import timm
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1, embed_dim=48, num_heads=3)
    with torch.no_grad():  # MAE's fixed 2D table (row 0 = [CLS], zero), as in vit_base_patch16_224.mae
        src.pos_embed[0, 0] = 0
        src.pos_embed[0, 1:] = torch.from_numpy(mae_2d_ref(14, 48)).float()
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: src)
    depth = 2
    img_size = [4 * depth, 16 * size[0], 16 * size[1]]
    enc = HierarchicalViT(HierarchicalViTConfig(**{**BASE, "patch_size": [4, 16, 16], "img_size": img_size,
                                                   "inflate_from": "vit_tiny_patch16_224"}))
    table2d = resample_abs_pos_embed(src.pos_embed[:, 1:].detach(), new_size=list(size), num_prefix_tokens=0)
    table2d = table2d.reshape(*size, 48).double().numpy()
    ref = table2d[None] + sincos_1d_ref(48, np.arange(depth))[:, None, None]  # [d, h, w, C]
    got = enc.spatial_positions((depth, *size)).double().numpy()
    assert np.abs(got - ref).max() < 1e-6
    if size == (6, 6):  # the previous plain bicubic resize (no antialiasing) is caught
        plain = F.interpolate(src.pos_embed[:, 1:].detach().reshape(1, 14, 14, 48).permute(0, 3, 1, 2), size=size,
                              mode="bicubic", align_corners=False).permute(0, 2, 3, 1)[0].double().numpy()
        assert np.abs(plain - table2d).max() > 0.05

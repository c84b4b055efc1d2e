import pytest
import torch
from omegaconf import OmegaConf

from medvlp.config import TimmEncoderConfig, ViT3DEncoderConfig
from medvlp.encoders.image2d import TimmImageEncoder
from medvlp.encoders.image3d import ViT3DEncoder


def cfg(**kw):
    """The schema of the encoder ``kw`` names (timm by default), as the composed config gives it."""
    schema = ViT3DEncoderConfig if kw.get("name") == "vit3d" else TimmEncoderConfig
    return OmegaConf.structured(schema(**kw))


TINY_VIT = dict(model="vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=[32], kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})


def test_vit_tokens_grid_and_attention_match_unfused():
    enc = TimmImageEncoder(cfg(**TINY_VIT)).eval()
    x = torch.randn(2, 1, 32, 32)
    f = enc(x, return_attention=True)
    assert f.pooled.shape == (2, 32) and f.tokens.shape == (2, 16, 32) and f.grid == (4, 4)
    assert f.attentions.shape == (2, 2, 17, 17)
    assert torch.allclose(f.attentions.sum(-1), torch.ones(2, 2, 17))
    attn = enc.model.blocks[-1].attn
    attn.fused_attn = False
    seen = {}
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("p", i[0]))
    enc(x)
    h.remove()
    assert torch.allclose(seen["p"], f.attentions, atol=1e-5)


def test_cnn_feature_map_cells():
    enc = TimmImageEncoder(cfg(model="resnet18", pretrained=False, in_chans=3))
    f = enc(torch.randn(2, 3, 64, 64))
    assert f.pooled.shape == (2, 512) and f.tokens.shape == (2, 4, 512) and f.grid == (2, 2)
    assert torch.allclose(f.pooled, f.tokens.mean(1), atol=1e-5)


def test_unknown_timm_model_is_a_clear_error():
    with pytest.raises(Exception, match="vit_nonexistent"):
        TimmImageEncoder(cfg(model="vit_nonexistent", pretrained=False))


V3 = dict(name="vit3d", in_chans=1, img_size=[16, 32, 32], patch_size=[4, 8, 8], width=32, depth=2, heads=2)


def test_vit3d_shapes_and_variable_grid():
    enc = ViT3DEncoder(cfg(**V3))
    f = enc(torch.randn(2, 1, 16, 32, 32), return_attention=True)
    assert f.pooled.shape == (2, 32) and f.tokens.shape == (2, 64, 32) and f.grid == (4, 4, 4)
    assert f.attentions.shape == (2, 2, 65, 65)
    g = enc(torch.randn(1, 1, 8, 32, 48))
    assert g.grid == (2, 4, 6) and g.tokens.shape == (1, 48, 32)
    s = ViT3DEncoder(cfg(**{**V3, "pos_embed": "sincos"}))
    assert s(torch.randn(1, 1, 8, 32, 48)).grid == (2, 4, 6)


def test_vit3d_bad_volume_size_message():
    enc = ViT3DEncoder(cfg(**V3))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        enc(torch.randn(1, 1, 10, 32, 32))


def test_vit3d_inflation_matches_2d_on_constant_depth(monkeypatch):
    """Average inflation: a volume of identical slices gives the 2D patch tokens; blocks are copied."""
    import timm

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=32)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: src)
    enc = ViT3DEncoder(cfg(**{**V3, "width": 192, "heads": 3, "patch_size": [4, 16, 16], "img_size": [8, 32, 32]}))
    enc.inflate_from_2d("vit_tiny_patch16_224", pretrained=False)
    slice_ = torch.randn(1, 1, 32, 32)
    vol = slice_[:, :, None].repeat(1, 1, 8, 1, 1)
    with torch.no_grad():
        t3, grid = enc.patch_embed(vol)
        t2 = src.patch_embed(slice_)
        pos3 = enc.positions(grid)[0].reshape(2, 4, 192)
    assert grid == (2, 2, 2)
    assert torch.allclose(t3[:, :4], t2, atol=1e-5) and torch.allclose(t3[:, 4:], t2, atol=1e-5)
    assert torch.allclose(pos3[0], src.pos_embed[0, 1:], atol=1e-5) and torch.allclose(pos3[1], pos3[0])
    assert torch.equal(enc.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert torch.equal(enc.cls_token, src.cls_token)


def test_vit3d_conv_stem_and_mean_pool():
    enc = ViT3DEncoder(cfg(**{**V3, "stem": "conv", "global_pool": "mean"}))
    convs = [m for m in enc.patch_embed.proj if isinstance(m, torch.nn.Conv3d)]
    assert [c.stride for c in convs] == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 1, 1)]  # total stride = patch [4, 8, 8]
    f = enc(torch.randn(2, 1, 16, 32, 32))
    assert f.grid == (4, 4, 4) and f.tokens.shape == (2, 64, 32)
    assert torch.allclose(f.pooled, f.tokens.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two"):
        ViT3DEncoder(cfg(**{**V3, "stem": "conv", "patch_size": [3, 8, 8]}))
    with pytest.raises(ValueError, match=r"expected one of \['patch', 'conv'\]"):  # the schema: at config time
        ViT3DEncoder(cfg(**{**V3, "stem": "hybrid"}))
    with pytest.raises(ValueError, match=r"global_pool|expected one of \['cls', 'mean'\]"):
        ViT3DEncoder(cfg(**{**V3, "global_pool": "max"}))

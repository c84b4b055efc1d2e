"""MedBLIP's image branch (``medblip_vit``): real-size shapes and counts on the meta device, freezing, gradient
flow through the frozen trunk, trunk checkpoints in BLIP-2's key layout, dtype casting and input checks."""

import pytest
import torch
from omegaconf import OmegaConf

from medvlp.config import FrozenTrunkViTConfig, check_values, group_file, load_yaml
from medvlp.encoders.medblip_vit import VolumeToFrozenViT
from medvlp.registry import IMAGE_ENCODERS

TRAINABLE = {"patch_embed_3d.weight", "patch_embed_3d.bias", "pos_embed_3d", "ln_vision.weight", "ln_vision.bias"}


def cfg(yaml: str = "medblip_vit_demo", **overrides):
    """``configs/encoder/<yaml>.yaml`` on the schema, with ``overrides``, as the composed config gives it."""
    c = OmegaConf.merge(OmegaConf.structured(FrozenTrunkViTConfig), load_yaml(group_file("encoder", yaml)), overrides)
    check_values(c)
    return c


def demo(**overrides) -> VolumeToFrozenViT:
    torch.manual_seed(0)
    return VolumeToFrozenViT(cfg(**overrides))


def trunk_state(enc):
    return {k: v.clone() for k, v in enc.state_dict().items() if k.startswith("trunk_blocks.") or k == "cls_token"}


def test_registered_under_its_config_name():
    assert IMAGE_ENCODERS.get("medblip_vit") is VolumeToFrozenViT
    assert VolumeToFrozenViT.Config is FrozenTrunkViTConfig


def test_paper_configuration_on_meta_device():
    """§10 items 1-2: 224^3 volumes -> 343 tokens of width 1408; parameter counts of the 3D embedding."""
    with torch.device("meta"):
        enc = VolumeToFrozenViT(cfg("eva_vit_g_3d", pretrained=False))
        f = enc(torch.empty(2, 1, 224, 224, 224))
    assert sum(p.numel() for p in enc.patch_embed_3d.parameters()) == 46_138_752
    assert enc.pos_embed_3d.shape == (1, 344, 1408) and enc.pos_embed_3d.numel() == 484_352
    assert len(enc.trunk_blocks) == 39 and enc.out_dim == enc.local_dim == 1408
    assert all(b.norm1.normalized_shape == (1408,) and b.attn.num_heads == 16 for b in enc.trunk_blocks)
    assert enc.trunk_blocks[0].mlp.fc1.out_features == 6144 and enc.trunk_blocks[0].norm1.eps == 1e-6
    assert enc.grid == (7, 7, 7) and enc.n_tokens == 343
    assert f.tokens.shape == (2, 343, 1408) and f.pooled.shape == (2, 1408) and f.grid == (7, 7, 7)
    # float16 Linear weights, float32 LayerNorms; nothing of the 2D model (patch_embed, pos_embed, norm, head) kept
    assert enc.trunk_blocks[0].mlp.fc1.weight.dtype == torch.float16 and enc.trunk_blocks[0].attn.q_bias.dtype == torch.float16
    assert enc.trunk_blocks[0].norm1.weight.dtype == torch.float32
    names = {n.split(".")[0] for n, _ in enc.named_parameters()}
    assert names == {"patch_embed_3d", "pos_embed_3d", "cls_token", "trunk_blocks", "ln_vision"}
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == TRAINABLE


def test_demo_shapes_freezing_and_gradient_through_the_trunk():
    """§10 items 3-4: only the 3D embedding, positions and ln_vision train; gradients reach the patch
    embedding through the frozen blocks and no trunk parameter gets one; an optimiser step leaves the trunk alone."""
    enc = demo().train()
    assert all(not b.training for b in enc.trunk_blocks) and enc.training
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == TRAINABLE
    assert all(not p.requires_grad for p in enc.trunk_parameters())
    before = trunk_state(enc)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2, weight_decay=0.1)
    f = enc(torch.randn(2, 1, 32, 32, 32))
    assert f.tokens.shape == (2, 64, 64) and f.pooled.shape == (2, 64) and f.grid == (4, 4, 4)
    assert f.attentions is None
    (f.tokens.pow(2).mean() + f.pooled.sum()).backward()
    assert enc.patch_embed_3d.weight.grad is not None and enc.patch_embed_3d.weight.grad.abs().sum() > 0
    assert enc.pos_embed_3d.grad.abs().sum() > 0 and enc.ln_vision.weight.grad is not None
    assert all(p.grad is None for p in enc.trunk_parameters())
    opt.step()
    after = trunk_state(enc)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trainable_trunk_when_not_frozen():
    enc = demo(freeze_trunk=False).train()
    assert all(b.training for b in enc.trunk_blocks)
    enc(torch.randn(1, 1, 32, 32, 32)).pooled.sum().backward()
    assert all(p.grad is not None for p in enc.trunk_parameters())
    with pytest.raises(ValueError, match="freeze_trunk"):
        demo(freeze_trunk=False, trunk_dtype="bfloat16")


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    x = torch.randn(2, 1, 32, 32, 32)
    out = []
    for ckpt in (False, True):
        enc = demo(grad_checkpointing=ckpt).train()
        loss = enc(x).tokens.pow(2).mean()
        loss.backward()
        out.append((loss.detach(), enc.patch_embed_3d.weight.grad.clone(), enc.pos_embed_3d.grad.clone()))
    assert torch.allclose(out[0][0], out[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out[0][1:], out[1][1:]))


def test_attention_of_the_last_block_matches_the_unfused_computation():
    enc = demo().eval()
    x = torch.randn(2, 1, 32, 32, 32)
    f = enc(x, return_attention=True)
    assert f.attentions.shape == (2, 2, 65, 65)
    attn = enc.trunk_blocks[-1].attn
    attn.fused_attn = False
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("p", i[0]))
    g = enc(x)
    handle.remove()
    assert torch.allclose(seen["p"], f.attentions, atol=1e-5)
    assert torch.allclose(g.tokens, f.tokens, atol=1e-5)


def lavis_checkpoint(width=64, depth=3, mlp=256, dtype=torch.float16) -> dict:
    """A synthetic state dict in the key layout of BLIP-2's eva_vit_g.pth (LAVIS's EVA ViT)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {"cls_token": r(1, 1, width), "pos_embed": r(1, 257, width), "patch_embed.proj.weight": r(width, 3, 14, 14),
          "patch_embed.proj.bias": r(width)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(width), p + "norm1.bias": r(width), p + "attn.q_bias": r(width),
                   p + "attn.v_bias": r(width), p + "attn.qkv.weight": r(3 * width, width),
                   p + "attn.proj.weight": r(width, width), p + "attn.proj.bias": r(width),
                   p + "norm2.weight": r(width), p + "norm2.bias": r(width), p + "mlp.fc1.weight": r(mlp, width),
                   p + "mlp.fc1.bias": r(mlp), p + "mlp.fc2.weight": r(width, mlp), p + "mlp.fc2.bias": r(width)})
    return sd


@pytest.mark.parametrize("wrapped", [False, True])
def test_trunk_checkpoint_in_blip2_layout_is_copied(tmp_path, wrapped):
    sd = lavis_checkpoint()
    path = tmp_path / "eva_vit_g.pth"
    torch.save({"model": sd} if wrapped else sd, path)
    enc = demo(trunk_checkpoint=str(path), pretrained=True)  # the file replaces pretrained weights
    assert torch.equal(enc.cls_token, sd["cls_token"].float())
    for i, blk in enumerate(enc.trunk_blocks):
        assert torch.equal(blk.attn.qkv.weight, sd[f"blocks.{i}.attn.qkv.weight"].float())
        assert torch.equal(blk.attn.q_bias, sd[f"blocks.{i}.attn.q_bias"].float())
        assert torch.equal(blk.attn.v_bias, sd[f"blocks.{i}.attn.v_bias"].float())
        assert torch.equal(blk.mlp.fc2.bias, sd[f"blocks.{i}.mlp.fc2.bias"].float())
        assert torch.equal(blk.norm2.weight, sd[f"blocks.{i}.norm2.weight"].float())
        assert torch.count_nonzero(blk.attn.k_bias) == 0
    assert len(enc.trunk_blocks) == 2  # the file's third block is ignored, as are its 2D pos_embed / patch_embed
    assert not any(p.requires_grad for p in enc.trunk_parameters())


def test_trunk_checkpoint_errors_name_the_keys(tmp_path):
    sd = lavis_checkpoint()
    del sd["blocks.1.attn.v_bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*blocks\.1\.attn\.v_bias"):
        demo(trunk_checkpoint=str(tmp_path / "missing.pth"))
    sd = lavis_checkpoint()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(128, 64)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth.*blocks\.0\.mlp\.fc1\.weight \(file \[128, 64\], model \[256, 64\]\)"):
        demo(trunk_checkpoint=str(tmp_path / "shape.pth"))
    with pytest.raises(FileNotFoundError, match="trunk_checkpoint"):
        demo(trunk_checkpoint=str(tmp_path / "absent.pth"))


def test_bfloat16_trunk_runs_on_cpu_with_float32_input():
    enc = demo(trunk_dtype="bfloat16").train()
    blk = enc.trunk_blocks[0]
    assert blk.attn.qkv.weight.dtype == blk.mlp.fc1.weight.dtype == blk.attn.v_bias.dtype == torch.bfloat16
    assert blk.norm1.weight.dtype == torch.float32 and enc.patch_embed_3d.weight.dtype == torch.float32
    f = enc(torch.randn(2, 1, 32, 32, 32))
    assert f.tokens.dtype == f.pooled.dtype == torch.float32 and torch.isfinite(f.tokens).all()
    f.tokens.mean().backward()
    assert enc.patch_embed_3d.weight.grad.dtype == torch.float32 and enc.patch_embed_3d.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 1, 32, 32, 16), (2, 2, 32, 32, 32), (2, 32, 32, 32)])
def test_wrong_input_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"method\.image_encoder\.img_size=\[32, 32, 32\].*got \[" + ", ".join(map(str, shape))):
        demo()(torch.randn(*shape))


def test_configuration_errors_name_the_key():
    with pytest.raises(ValueError, match=r"method\.image_encoder\.trunk_depth=5"):
        demo(trunk_depth=5)
    assert len(demo(trunk_depth=1).trunk_blocks) == 1
    with pytest.raises(ValueError, match=r"method\.image_encoder\.trunk='resnet18'"):
        demo(trunk="resnet18")
    with pytest.raises(ValueError, match=r"method\.image_encoder\.trunk='no_such_vit'"):
        demo(trunk="no_such_vit")
    with pytest.raises(ValueError, match=r"method\.image_encoder\.patch_size"):
        demo(patch_size=[8, 8, 12])
    with pytest.raises(ValueError, match="pretrained=false"):
        demo(pretrained=True)


def test_any_timm_vit_trunk_keeps_only_blocks_and_class_token():
    enc = demo(trunk="test_vit")
    names = {n.split(".")[0] for n, _ in enc.named_parameters()}
    assert names == {"patch_embed_3d", "pos_embed_3d", "cls_token", "trunk_blocks", "ln_vision"}
    f = enc(torch.randn(1, 1, 32, 32, 32), return_attention=True)
    assert f.tokens.shape == (1, 64, enc.out_dim) and f.attentions.shape[-1] == 65

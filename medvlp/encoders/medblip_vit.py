"""MedBLIP's image branch: a trainable 3D patch embedding in front of a frozen 2D ViT trunk
(``specs/methods/medblip.md`` §2.1; Chen et al., https://arxiv.org/abs/2305.10799).

* ``patch_embed_3d``: one ``Conv3d(in_chans -> width, kernel = stride = patch_size)`` (MedBLIP: 1 -> 1408,
  32^3 over a 224^3 volume: a 7 x 7 x 7 grid of 343 tokens), PyTorch's default init, tokens flattened in
  (d, h, w) row-major order (d slowest).
* The trunk's class token is prepended and ``pos_embed_3d`` ``[1, 1 + d*h*w, width]`` (trunc-normal,
  std ``pos_std``) is added; no dropout.
* The trunk's transformer blocks (BLIP-2's EVA ViT-g: the first 39 of EVA01-CLIP-g's 40 blocks, width 1408,
  16 heads, MLP 6144, q and v biases, LayerNorm eps 1e-6, no rotary positions, no layer-scale) run on that
  sequence. The trunk's own 2D patch embedding, 2D position table, final norm and head are dropped: MedBLIP
  never uses them, and unused parameters would only bloat checkpoints and trip DDP's unused-parameter check.
* ``ln_vision``: a fresh, trainable ``LayerNorm(width)`` (eps 1e-5) over the trunk's output sequence.

With ``freeze_trunk`` (the official rule) every trunk parameter, the class token included, is frozen and
the blocks stay in eval mode, but the forward pass is not wrapped in ``no_grad``: gradients flow *through*
the frozen blocks to the patch embedding and position table, so every step pays a full input-gradient
backward pass through the trunk (§9).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.batch import ImageFeatures
from medvlp.config import FrozenTrunkViTConfig
from medvlp.encoders.image2d import LastAttentionRecorder
from medvlp.registry import register_image_encoder

EVA_VIT_G = "eva_giant_patch14_clip_224"  # timm's EVA01-CLIP-g/14 image tower (BLIP-2's ViT-g)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shown(keys: list[str], limit: int = 8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or type(module).__name__.lower().endswith("norm")


def cast_trunk(blocks: nn.Module, dtype: torch.dtype) -> None:
    """Cast every parameter and buffer of ``blocks`` to ``dtype`` except those of normalisation layers.

    BLIP-2's ``convert_weights_to_fp16`` casts the Linear layers only; the attention's separate q / v
    biases (and layer-scale factors, where a trunk has them) are cast here too so that the blocks run
    without autocast as well (autocast would cast them on the fly anyway)."""
    for module in blocks.modules():
        if _is_norm(module):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point():
                setattr(module, name, buf.to(dtype))


def block_attention_probs(attn: nn.Module, x: Tensor) -> Tensor:
    """Self-attention probabilities ``[B, heads, N, N]`` (float32) of a timm ``EvaAttention`` or ``Attention``
    module on its input ``x`` ``[B, N, width]`` (the block's ``norm1`` output), recomputed from the module's
    own projections: softmax(q k^T * scale)."""
    if not hasattr(attn, "num_heads") or not hasattr(attn, "scale"):
        raise NotImplementedError(f"return_attention is not supported for the trunk's attention module "
                                  f"{type(attn).__name__} (expected timm's EvaAttention or Attention).")
    b, n, _ = x.shape
    heads = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:  # EVA: separate q / v biases, none on k
            k_bias = getattr(attn, "k_bias", None)
            bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias) if k_bias is None else k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
    elif getattr(attn, "q_proj", None) is not None and getattr(attn, "k_proj", None) is not None:
        q = attn.q_proj(x).reshape(b, n, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, heads, -1).transpose(1, 2)
    else:
        raise NotImplementedError(f"return_attention: the trunk's {type(attn).__name__} has neither a fused qkv "
                                  f"projection nor separate q / k projections.")
    q = getattr(attn, "q_norm", nn.Identity())(q)
    k = getattr(attn, "k_norm", nn.Identity())(k)
    return ((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)


@register_image_encoder("medblip_vit")
class VolumeToFrozenViT(nn.Module):
    """MedBLIP's image branch: 3D patch embedding + 3D positions -> frozen 2D ViT blocks -> ``ln_vision``
    (see the module docstring).

    Config keys (``method.image_encoder``): ``in_chans``, ``img_size`` (D, H, W: the one volume size the
    position table fits), ``patch_size`` (pd, ph, pw; each must divide ``img_size``), ``trunk``,
    ``trunk_depth``, ``pretrained``, ``trunk_checkpoint``, ``trunk_dtype``, ``freeze_trunk``, ``pos_std``,
    ``grad_checkpointing``, ``drop_path`` (the trunk's stochastic depth; only acts on a trainable trunk) and,
    for ``trunk=eva`` only, ``width`` / ``depth`` / ``heads`` / ``mlp_ratio``.

    Trunks:
        ``eva_vit_g``: timm's ``eva_giant_patch14_clip_224`` (EVA01-CLIP-g/14: width 1408, 40 blocks of which
        MedBLIP keeps 39, 16 heads, MLP 6144, q / v biases, LayerNorm eps 1e-6, no rotary positions; timm's
        defaults for that model already match BLIP-2's trunk). ``pretrained=true`` loads timm's weights for it
        (``timm.create_model(..., pretrained=True)``). BLIP-2's own ``eva_vit_g.pth`` (the file LAVIS downloads)
        can be given instead as ``trunk_checkpoint``: its keys (``blocks.{i}.norm1.weight``,
        ``blocks.{i}.attn.qkv.weight``, ``blocks.{i}.attn.q_bias`` / ``v_bias``, ``blocks.{i}.attn.proj.*``,
        ``blocks.{i}.norm2.*``, ``blocks.{i}.mlp.fc1.*`` / ``fc2.*``, ``cls_token``) are timm's names, and its
        2D ``pos_embed`` / ``patch_embed.*`` are ignored as in the official code.
        ``eva``: timm's ``Eva`` built at ``width`` / ``depth`` / ``heads`` / ``mlp_ratio`` with random weights
        (the CPU stand-in; there are no published weights for it, so ``pretrained`` needs ``trunk_checkpoint``).
        Any other name: ``timm.create_model(trunk, pretrained=pretrained)`` of a ViT with ``.blocks`` and a
        ``.cls_token`` and without rotary positions (the width is the trunk's own).

    ``trunk_checkpoint``: a local state-dict file (a plain dict of tensors or ``{"model": state_dict}``),
    read with ``torch.load(weights_only=True)``; it replaces ``pretrained``. Every tensor of the kept blocks and
    the class token must be present with the right shape (else an error names the file and the keys); keys of
    blocks beyond ``trunk_depth`` and everything else are ignored.

    ``trunk_dtype``: the frozen blocks' weights are cast to it (MedBLIP: float16; LayerNorms stay float32);
    the token stream is cast to it before the blocks and back to float32 after, so float32 volumes work with
    or without autocast.

    Attributes:
        out_dim, local_dim: the trunk's width. grid: the token grid ``(d, h, w)``; n_tokens: ``d*h*w``.
        patch_embed_3d (Conv3d), pos_embed_3d (``[1, 1 + n_tokens, width]``), cls_token (``[1, 1, width]``),
        trunk_blocks (ModuleList), ln_vision (LayerNorm).

    Differences from the official code (``Qybc/MedBLIP: medblip/eva_vit.py``):
        * ``patch_embed_3d`` is the Conv3d itself (official: ``patch_embed_3d.proj``); no MedBLIP weights were
          released, so no checkpoint depends on the name.
        * The architecture is built from the config and weights are read only when a file is named or
          ``pretrained`` asks for timm's (the official factory downloads BLIP-2's file at construction, §11 Q20).
        * The trunk's 2D patch embedding, position table and the 40th block are not kept at all (official:
          built, partly loaded, never used).
        * With ``trunk_dtype`` float16 the q / v biases are cast too (official: float32, relying on autocast).
    """

    Config = FrozenTrunkViTConfig  # the schema of method.image_encoder for this encoder

    def __init__(self, cfg: FrozenTrunkViTConfig) -> None:
        super().__init__()
        if len(cfg.img_size) != 3 or len(cfg.patch_size) != 3:
            raise ValueError(f"method.image_encoder.img_size and patch_size need 3 entries (d, h, w), got "
                             f"{list(cfg.img_size)} and {list(cfg.patch_size)}.")
        self.img_size = tuple(int(s) for s in cfg.img_size)
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"method.image_encoder.patch_size={list(self.patch_size)} must divide img_size="
                             f"{list(self.img_size)} on every axis (MedBLIP: 224^3 volumes, 32^3 patches).")
        if cfg.trunk_dtype not in DTYPES:
            raise ValueError(f"method.image_encoder.trunk_dtype='{cfg.trunk_dtype}': expected one of {', '.join(DTYPES)}.")
        self.trunk_dtype = DTYPES[cfg.trunk_dtype]
        if self.trunk_dtype != torch.float32 and not cfg.freeze_trunk:
            raise ValueError(f"method.image_encoder.trunk_dtype={cfg.trunk_dtype} casts the trunk's weights, which only "
                             f"suits a frozen trunk: set freeze_trunk=true or trunk_dtype=float32 (use mixed precision "
                             f"for a trainable trunk).")
        self.cfg = cfg
        self.freeze_trunk = bool(cfg.freeze_trunk)
        self.grad_checkpointing = bool(cfg.grad_checkpointing)

        blocks, cls_token = self._build_trunk(cfg)
        n_kept = int(cfg.trunk_depth) or len(blocks)
        if n_kept > len(blocks):
            raise ValueError(f"method.image_encoder.trunk_depth={cfg.trunk_depth} exceeds the {len(blocks)} blocks of "
                             f"trunk '{cfg.trunk}'; use a value in 0..{len(blocks)} (0 = all; MedBLIP keeps 39 of 40).")
        self.trunk_blocks = nn.ModuleList(list(blocks)[:n_kept])
        self.cls_token = cls_token
        width = int(cls_token.shape[-1])

        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.n_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed_3d = nn.Conv3d(cfg.in_chans, width, kernel_size=self.patch_size, stride=self.patch_size)
        self.pos_embed_3d = nn.Parameter(torch.zeros(1, 1 + self.n_tokens, width))
        nn.init.trunc_normal_(self.pos_embed_3d, std=float(cfg.pos_std))
        self.ln_vision = nn.LayerNorm(width)
        self.out_dim = self.local_dim = width

        if cfg.trunk_checkpoint:
            self.load_trunk_checkpoint(cfg.trunk_checkpoint)
        if self.freeze_trunk:
            for p in self.trunk_parameters():
                p.requires_grad_(False)
            self.trunk_blocks.eval()
        if self.trunk_dtype != torch.float32:
            cast_trunk(self.trunk_blocks, self.trunk_dtype)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _build_trunk(cfg: FrozenTrunkViTConfig) -> tuple[nn.Module, nn.Parameter]:
        """``(blocks, class token)`` of the configured trunk; the rest of the timm model is discarded."""
        import timm

        use_timm_weights = bool(cfg.pretrained) and not cfg.trunk_checkpoint
        if cfg.trunk == "eva":
            if cfg.width % cfg.heads:
                raise ValueError(f"method.image_encoder.width={cfg.width} is not divisible by heads={cfg.heads}.")
            if use_timm_weights:
                raise ValueError("method.image_encoder.trunk=eva is a randomly initialised stand-in with no published "
                                 "weights: set pretrained=false, or give the weights as trunk_checkpoint.")
            from timm.models.eva import Eva

            # A 1-pixel dummy image: the model's own patch embedding and position table are never used.
            model = Eva(img_size=1, patch_size=1, in_chans=1, num_classes=0, global_pool="token", embed_dim=cfg.width,
                        depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                        drop_path_rate=cfg.drop_path)
        else:
            name = EVA_VIT_G if cfg.trunk == "eva_vit_g" else cfg.trunk
            try:
                model = timm.create_model(name, pretrained=use_timm_weights, num_classes=0, drop_path_rate=cfg.drop_path)
            except OSError as err:  # the hub's "not found locally / offline" errors
                raise OSError(f"method.image_encoder.trunk='{cfg.trunk}' (timm '{name}', pretrained=true): the weights "
                              f"could not be loaded ({type(err).__name__}: {err}). Give a local state dict as "
                              f"method.image_encoder.trunk_checkpoint, or set pretrained=false.") from err
            except (RuntimeError, ValueError, TypeError) as err:  # unknown model names, bad arguments
                raise ValueError(f"method.image_encoder.trunk='{cfg.trunk}': timm could not build '{name}': {err}. "
                                 f"Use eva_vit_g, eva or a timm ViT name.") from err
        blocks = getattr(model, "blocks", None)
        cls_token = getattr(model, "cls_token", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not isinstance(cls_token, nn.Parameter):
            raise ValueError(f"method.image_encoder.trunk='{cfg.trunk}' ({type(model).__name__}) is not a ViT with "
                             f"transformer `blocks` and a `cls_token`; use eva_vit_g, eva or a timm ViT such as "
                             f"vit_base_patch16_224.")
        if getattr(model, "rope", None) is not None:
            raise ValueError(f"method.image_encoder.trunk='{cfg.trunk}' uses rotary positions computed from its 2D "
                             f"patch grid, which a 3D token grid cannot feed; use a trunk with absolute positions "
                             f"(eva_vit_g, eva, vit_*).")
        return blocks, cls_token

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The trunk's parameters: its kept blocks and its class token."""
        return [*self.trunk_blocks.parameters(), self.cls_token]

    @torch.no_grad()
    def load_trunk_checkpoint(self, path: str | Path) -> None:
        """Copy the kept blocks and the class token from a state-dict file in timm / LAVIS EVA naming
        (``blocks.{i}.<name>``, ``cls_token``); other keys are ignored.

        Raises:
            FileNotFoundError: no such file. ValueError: the file is not a weights-only state dict, or a
            kept block's tensor (or the class token) is missing, has the wrong shape or is unknown.
        """
        key = "method.image_encoder.trunk_checkpoint"
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{key}='{path}' does not exist.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled code or a corrupt file
            raise ValueError(f"{key}='{path}' could not be read as a weights-only state dict "
                             f"({type(err).__name__}: {err}).") from err
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{key}='{path}' holds no state dict (a mapping of names to tensors, or one under 'model').")

        targets: dict[str, Tensor] = {"cls_token": self.cls_token}
        for i, blk in enumerate(self.trunk_blocks):
            targets.update({f"blocks.{i}.{name}": t for name, t in blk.state_dict(keep_vars=True).items()})
        missing = [k for k in targets if k not in state]
        mismatched = [f"{k} (file {list(state[k].shape)}, model {list(t.shape)})"
                      for k, t in targets.items() if k in state and state[k].shape != t.shape]
        prefixes = tuple(f"blocks.{i}." for i in range(len(self.trunk_blocks)))
        unexpected = [k for k in state if k.startswith(prefixes) and k not in targets]
        if missing or mismatched or unexpected:
            problems = [f"{what}: {_shown(keys)}" for what, keys in
                        (("missing keys", missing), ("shape mismatches", mismatched),
                         ("keys the trunk's blocks do not have", unexpected)) if keys]
            raise ValueError(f"{key}='{path}' does not fit the {len(self.trunk_blocks)} kept blocks of trunk "
                             f"'{self.cfg.trunk}': {'; '.join(problems)}.")
        for k, t in targets.items():
            t.copy_(state[k])

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> VolumeToFrozenViT:
        """Set the training mode; a frozen trunk stays in eval mode."""
        super().train(mode)
        if self.freeze_trunk:
            self.trunk_blocks.eval()
        return self

    # ------------------------------------------------------------------ forward
    def _check_input(self, images: Tensor) -> None:
        expected = [self.cfg.in_chans, *self.img_size]
        if images.dim() != 5 or list(images.shape[1:]) != expected:
            raise ValueError(
                f"Expected volumes [B, {', '.join(str(s) for s in expected)}] (method.image_encoder.in_chans="
                f"{self.cfg.in_chans}, method.image_encoder.img_size={list(self.img_size)}), got {list(images.shape)}. "
                f"The 3D position table is fixed to img_size: resample or pad the volumes to it in preprocessing "
                f"(data.size), or change method.image_encoder.img_size."
            )

    def forward(self, images: Tensor, return_attention: bool = False) -> ImageFeatures:
        """Encode volumes ``images`` ``[B, in_chans, D, H, W]`` (exactly ``img_size``).

        Returns:
            ImageFeatures: ``pooled`` the ``ln_vision`` output at the class token ``[B, width]``, ``tokens``
            the other positions ``[B, d*h*w, width]`` (d slowest), ``grid`` ``(d, h, w)`` and, with
            ``return_attention``, the last block's attention probabilities ``[B, heads, 1 + N, 1 + N]``.
        """
        self._check_input(images)
        x = self.patch_embed_3d(images).flatten(2).transpose(1, 2)  # [B, N, width]
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_3d
        if self.trunk_dtype != torch.float32 and x.dtype != self.trunk_dtype:
            x = x.to(self.trunk_dtype)
        checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.trunk_blocks) - 1
        attn = None
        for i, blk in enumerate(self.trunk_blocks):
            if return_attention and i == last:
                with LastAttentionRecorder(blk.attn) as rec:
                    x = blk(x)
                attn = block_attention_probs(blk.attn, rec.inputs)
            elif checkpoint:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.ln_vision(x.float())
        return ImageFeatures(pooled=x[:, 0], tokens=x[:, 1:], grid=self.grid, attentions=attn)


__all__ = ["VolumeToFrozenViT", "block_attention_probs", "cast_trunk"]

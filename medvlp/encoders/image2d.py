"""2D image encoders through timm: any timm model, global embedding plus local tokens.

ViTs return their [CLS] (or mean-pooled) token as the global embedding and their patch tokens as
local features; CNNs return the global average of their last feature map and its cells. Attention
maps of the last block are recomputed from its inputs only when asked, so the forward pass keeps
timm's fused SDPA attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medvlp.batch import ImageFeatures
from medvlp.config import TimmEncoderConfig
from medvlp.registry import register_image_encoder


def attention_probs(attn: nn.Module, x: Tensor) -> Tensor:
    """Self-attention probabilities ``[B, heads, N, N]`` of a timm ``Attention`` module on ``x``.

    Recomputes softmax(q k^T * scale) from the module's own ``qkv`` projection and q/k norms, so it
    matches what the fused kernel computed inside the forward pass.
    """
    b, n, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class LastAttentionRecorder:
    """Records the input of a ViT's last attention module during a forward pass."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self.inputs: Tensor | None = None
        self._handle = None

    def __enter__(self) -> LastAttentionRecorder:
        def hook(_mod: nn.Module, args: tuple) -> None:
            self.inputs = args[0]

        self._handle = self.attn.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def probs(self) -> Tensor:
        if self.inputs is None:
            raise RuntimeError("The attention module was not called during the forward pass.")
        return attention_probs(self.attn, self.inputs)


@register_image_encoder("timm")
class TimmImageEncoder(nn.Module):
    """Any timm model as a VLP image encoder.

    Config keys: ``model`` (timm name), ``pretrained``, ``in_chans``, ``img_size`` (ViTs),
    ``drop_path``, ``grad_checkpointing``, ``kwargs`` (extra ``timm.create_model`` arguments, e.g.
    ``{depth: 2, embed_dim: 64}`` for a tiny ViT).

    Attributes:
        out_dim: width of ``pooled``; ``local_dim``: width of ``tokens``; ``is_vit``.
    """

    Config = TimmEncoderConfig  # the schema of method.<image|text>_encoder for this encoder

    def __init__(self, cfg: TimmEncoderConfig) -> None:
        super().__init__()
        import timm

        kwargs = dict(cfg.kwargs)
        self.is_vit = "vit" in cfg.model or "deit" in cfg.model
        if self.is_vit and cfg.img_size:
            kwargs.setdefault("img_size", int(cfg.img_size[0]))
        try:
            self.model = timm.create_model(
                cfg.model,
                pretrained=cfg.pretrained,
                num_classes=0,
                in_chans=cfg.in_chans,
                drop_path_rate=cfg.drop_path,
                **kwargs,
            )
        except OSError as err:  # includes the hub's "not found locally / offline" errors
            raise OSError(
                f"method.image_encoder.model='{cfg.model}' (pretrained={str(bool(cfg.pretrained)).lower()}): the "
                f"weights could not be loaded ({type(err).__name__}: {err}). Give a model reachable from this "
                f"machine, set method.image_encoder.pretrained=false, or use a configs/encoder/ file that runs "
                f"offline (e.g. resnet_demo)."
            ) from err
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"method.image_encoder: timm could not build '{cfg.model}' with {kwargs}: {err}") from err
        self.is_vit = hasattr(self.model, "blocks") and hasattr(self.model, "patch_embed")
        self.channels_last = bool(cfg.channels_last) and not self.is_vit
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.out_dim = int(self.model.num_features)
        self.local_dim = int(getattr(self.model, "embed_dim", self.out_dim))
        self.cfg = cfg

    def forward(self, images: Tensor, return_attention: bool = False) -> ImageFeatures:
        """Encode ``images`` ``[B, C, H, W]``.

        Returns:
            ImageFeatures with ``pooled`` ``[B, out_dim]``, ``tokens`` ``[B, N, local_dim]``, the
            token ``grid`` and, for ViTs with ``return_attention``, ``attentions``
            ``[B, heads, 1 + N, 1 + N]`` (prefix tokens included).
        """
        if self.is_vit:
            return self._forward_vit(images, return_attention)
        fmap = self.model.forward_features(self._layout(images))  # [B, C, h, w]
        return ImageFeatures(
            pooled=fmap.mean(dim=(2, 3)),
            tokens=fmap.flatten(2).transpose(1, 2),
            grid=(int(fmap.shape[2]), int(fmap.shape[3])),
        )

    # ------------------------------------------------------------------ multi-scale (CNNs)
    @property
    def stages(self) -> list[dict]:
        """timm's ``feature_info`` of a CNN: one dict per stage with ``module``, ``num_chs``, ``reduction``."""
        info = list(getattr(self.model, "feature_info", []) or [])
        if self.is_vit or not info or not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"method.image_encoder.model='{self.cfg.model}' has no multi-scale feature stages; dense "
                             f"decoders (U-Net) need a timm CNN such as resnet50 or test_resnet.")
        return [dict(i) for i in info]

    def pyramid(self, images: Tensor, depth: int = 0) -> list[Tensor]:
        """Feature maps of the first ``depth`` stages (0 = all), finest first.

        For ResNets the stages are the stem (stride 2) and ``layer1`` ... ``layer4`` (strides 4 to 32),
        as segmentation_models_pytorch's U-Net encoders return them. Only the stages asked for are
        computed.
        """
        n = len(self.stages)
        depth = n if depth <= 0 else depth
        if depth > n:
            raise ValueError(f"{self.cfg.model} has {n} feature stages; a depth of {depth} was asked for.")
        return list(self.model.forward_intermediates(self._layout(images), indices=list(range(depth)), intermediates_only=True,
                                                     stop_early=True))

    def _layout(self, images: Tensor) -> Tensor:
        """The input in the memory order of the weights (channels-last CNNs)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _forward_vit(self, images: Tensor, return_attention: bool) -> ImageFeatures:
        m = self.model
        if return_attention:
            with LastAttentionRecorder(m.blocks[-1].attn) as rec:
                x = m.forward_features(images)
            attn = rec.probs()
        else:
            x = m.forward_features(images)
            attn = None
        n_prefix = int(getattr(m, "num_prefix_tokens", 1))
        tokens = x[:, n_prefix:]
        pooled = x[:, 0] if getattr(m, "cls_token", None) is not None else tokens.mean(dim=1)
        h, w = images.shape[-2] // m.patch_embed.patch_size[0], images.shape[-1] // m.patch_embed.patch_size[1]
        if attn is not None and n_prefix > 1:  # keep [CLS] + patches only
            keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n_prefix, attn.shape[-1])]).to(attn.device)
            attn = attn.index_select(-1, keep).index_select(-2, keep)
        return ImageFeatures(pooled=pooled, tokens=tokens, grid=(int(h), int(w)), attentions=attn)


SMP_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def smp_encoder_name(timm_model: str) -> tuple[str, str]:
    """``(encoder_name, key prefix)`` of a timm CNN inside a segmentation_models_pytorch model: smp's own
    ResNets take torchvision key names (= timm's for the torchvision weights); any other timm CNN goes
    through smp's ``tu-`` encoders, which hold the timm model as ``encoder.model``."""
    base = str(timm_model).split(".")[0]
    if base in SMP_RESNETS and str(timm_model) in (base, f"{base}.tv_in1k", f"{base}.a1_in1k", f"{base}.tv2_in1k"):
        return base, "encoder."
    return f"tu-{base}", "encoder.model."


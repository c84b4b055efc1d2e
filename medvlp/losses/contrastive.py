"""InfoNCE / CLIP losses with optional distributed gathering.

Local-loss form (open_clip): each rank scores its own samples against the gathered batch of
every rank, so the global batch supplies the negatives while the logits stay ``[B, world * B]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.distributed import gather, world


def info_nce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of each row of ``logits`` ``[N, M]`` against its target column ``[N]``."""
    return F.cross_entropy(logits, targets)


def clip_loss(
    img_emb: Tensor,
    txt_emb: Tensor,
    logit_scale: Tensor | float,
    gather_distributed: bool = True,
    local_loss: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric InfoNCE between paired embeddings.

    Args:
        img_emb: ``[B, D]`` L2-normalised image embeddings (row i pairs with ``txt_emb[i]``).
        txt_emb: ``[B, D]`` L2-normalised text embeddings.
        logit_scale: the inverse temperature ``1 / tau`` (already exponentiated / clamped).
        gather_distributed: use the negatives of every rank.
        local_loss: under DDP, each rank scores its own rows against the gathered columns and the gather
            carries gradients to every rank (open_clip's ``--local-loss --gather-with-grad``: the mean over
            ranks is the global loss and DDP's averaged gradient is its gradient). False: the "plain
            gather" (open_clip's default) - every rank builds the whole ``G x G`` matrix from features
            gathered without gradients, its own slice grad-carrying, so its loss is the global loss and
            DDP's averaged gradient is that gradient divided by the world size (same optimum; AdamW is
            nearly scale-free). The same value on one process either way.

    Returns:
        ``(loss, loss_i2t, loss_t2i)`` with ``loss = (loss_i2t + loss_t2i) / 2``.
    """
    rank, size = world()
    if gather_distributed and size > 1 and not local_loss:
        img_emb, txt_emb = gather(img_emb, with_grad=False), gather(txt_emb, with_grad=False)
        all_txt, all_img, offset = txt_emb, img_emb, 0
    elif gather_distributed and size > 1:
        all_txt, all_img = gather(txt_emb), gather(img_emb)
        offset = rank * img_emb.shape[0]
    else:
        all_txt, all_img, offset = txt_emb, img_emb, 0
    targets = torch.arange(img_emb.shape[0], device=img_emb.device) + offset
    loss_i2t = info_nce(logit_scale * img_emb @ all_txt.T, targets)
    loss_t2i = info_nce(logit_scale * txt_emb @ all_img.T, targets)
    return (loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i


def siglip_loss(
    img_emb: Tensor,
    txt_emb: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    gather_distributed: bool = True,
) -> Tensor:
    """Sigmoid image-text loss (SigLIP, Zhai et al. 2023; open_clip's ``SigLipLoss``).

    ``L = -(1/B) sum_i sum_j log sigmoid(z_ij (s <u_i, w_j> + b))`` with ``z_ij = +1`` on the pairs and
    ``-1`` elsewhere; each rank scores its ``B`` images against the texts of every rank (the same total
    as open_clip's neighbour exchange).

    Args:
        img_emb: ``[B, D]`` L2-normalised image embeddings (row i pairs with ``txt_emb[i]``).
        txt_emb: ``[B, D]`` L2-normalised text embeddings.
        logit_scale: ``s`` (already exponentiated).
        logit_bias: ``b``.
        gather_distributed: use the texts of every rank as negatives.
    """
    rank, size = world()
    if gather_distributed and size > 1:
        all_txt, offset = gather(txt_emb), rank * img_emb.shape[0]
    else:
        all_txt, offset = txt_emb, 0
    logits = logit_scale * img_emb @ all_txt.T + logit_bias
    signs = -torch.ones_like(logits)
    idx = torch.arange(img_emb.shape[0], device=logits.device)
    signs[idx, idx + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / img_emb.shape[0]

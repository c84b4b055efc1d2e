"""Swapped prototype prediction between two views / modalities (SwAV; MGCA's CPA term).

Reference: Caron et al. 2020 (SwAV, arXiv 2006.09882) section 3.1; MGCA (Wang et al. 2022,
arXiv 2210.06044) section 3.3 "cross-modal prototype alignment", official code
``HKU-MedAI/MGCA: mgca/models/mgca/mgca_module.py`` (``MGCA.forward``, prototype part).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from medvlp.losses.sinkhorn import sinkhorn_knopp


def swapped_prototype_loss(
    img_scores: Tensor,
    txt_scores: Tensor,
    temperature: float = 0.2,
    epsilon: float = 0.05,
    n_iters: int = 3,
    distributed: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Each modality predicts the other's Sinkhorn code over shared prototypes.

    ``P^v = softmax(img_scores / temperature)`` and ``P^t`` likewise carry the gradient; the codes
    ``q^v, q^t`` come from :func:`~medvlp.losses.sinkhorn.sinkhorn_knopp` (no gradient), each
    modality separately. The loss is

        ``1/2 * [ mean_i H(q^v_i, P^t_i) + mean_i H(q^t_i, P^v_i) ]``,  ``H(q, P) = -sum_k q_k log P_k``,

    symmetric in the two modalities. With uniform predictions it equals ``log K``.

    Args:
        img_scores: ``[B, K]`` scores of the image embeddings against the ``K`` prototypes
            (MGCA: cosines of unit embeddings with unit prototypes).
        txt_scores: ``[B, K]`` the same for the paired reports (row i pairs with image i).
        temperature: softmax temperature of the predictions (MGCA tau3 = 0.2).
        epsilon: Sinkhorn regularisation of the codes (MGCA 0.05).
        n_iters: Sinkhorn iterations (MGCA 3).
        distributed: balance the codes over the batches of every rank (see ``sinkhorn_knopp``).

    Returns:
        ``(loss, img_codes, txt_codes)``: the scalar loss and the ``[B, K]`` codes (rows sum to 1).
    """
    if img_scores.shape != txt_scores.shape or img_scores.ndim != 2:
        raise ValueError(f"swapped_prototype_loss expects two [B, K] score tensors, got {tuple(img_scores.shape)} "
                         f"and {tuple(txt_scores.shape)}")
    img_codes = sinkhorn_knopp(img_scores, epsilon, n_iters, distributed)
    txt_codes = sinkhorn_knopp(txt_scores, epsilon, n_iters, distributed)
    log_p_img = F.log_softmax(img_scores.float() / temperature, dim=1)
    log_p_txt = F.log_softmax(txt_scores.float() / temperature, dim=1)
    loss_i2t = -(img_codes * log_p_txt).sum(dim=1).mean()  # image code supervises the report
    loss_t2i = -(txt_codes * log_p_img).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, img_codes, txt_codes


__all__ = ["swapped_prototype_loss"]

"""Parameter-free pseudo segmentation masks from attention maps (G2D, Liu et al. NeurIPS 2024).

A pooling query's attention over a feature grid says where a model looked to build its global
embedding. :func:`pseudo_masks` turns such maps into per-pixel binary (or edge-smoothed) targets:

1. aggregate the heads (mean; ``"none"`` keeps one mask per head);
2. upsample the grid to the image size (``bilinear`` or ``nearest``);
3. optionally zero the scores outside the body (:func:`body_mask`: Otsu threshold of the image
   intensities, holes filled, so the dark lungs enclosed by the chest wall stay inside);
4. threshold per image at a quantile of the scores (over body pixels or over all pixels), at the
   mean or at the median, with an explicit tie rule (``>=`` or ``>``);
5. optionally smooth the edges with a bilateral filter (:func:`bilateral_filter`), keeping the soft
   values or re-binarising them.

Everything runs under ``torch.no_grad`` on the input's device, and the result is detached: a
pseudo mask is a constant target. There are no parameters anywhere in this module. Used by
:mod:`medvlp.methods.g2d`; any method with an attention-pooled image embedding can reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

AGGREGATIONS = ("mean", "none")
UPSAMPLING = ("bilinear", "nearest")
THRESHOLDS = ("quantile", "mean", "median")
SMOOTHING = ("none", "bilateral")


@dataclass
class PseudoMaskConfig:
    """How attention maps become pseudo masks (``method.pseudo_mask.*`` of G2D).

    Defaults are the G2D paper's recipe (§3.2): mean over heads, bilinear upsampling, body mask,
    85th percentile over body pixels with ``>=``, bilateral edge smoothing kept soft. The released
    code's recipe is ``upsample=nearest, body_mask=false, inclusive=false, over=all, smooth=none``.
    """

    aggregate: str = "mean"  # mean (one mask per image) | none (one mask per head)
    upsample: str = "bilinear"  # bilinear | nearest (the official code: each token becomes a block)
    body_mask: bool = True  # zero the scores outside the body (Otsu + hole filling of the image)
    threshold: str = "quantile"  # quantile | mean | median
    quantile: float = 0.85  # the q of threshold=quantile
    inclusive: bool = True  # foreground = score >= t (paper); false: score > t (official code)
    over: str = "body"  # body: the threshold is taken over body pixels | all: over every pixel
    smooth: str = "bilateral"  # none | bilateral
    bilateral_size: int = 9  # odd window side in mask pixels
    bilateral_sigma_space: float = 3.0  # in mask pixels
    bilateral_sigma_color: float = 0.5  # on the {0, 1} mask values
    rebinarize_at: float = 0.0  # > 0: after smoothing, mask = (smoothed >= this); 0 keeps the soft mask


def validate(cfg: PseudoMaskConfig) -> None:
    """Raise ``ValueError`` naming the key and the valid values of a bad ``cfg``."""
    choices = {"aggregate": AGGREGATIONS, "upsample": UPSAMPLING, "threshold": THRESHOLDS, "smooth": SMOOTHING,
               "over": ("body", "all")}
    for key, valid in choices.items():
        if getattr(cfg, key) not in valid:
            raise ValueError(f"method.pseudo_mask.{key}='{getattr(cfg, key)}': expected one of {list(valid)}.")
    if not 0.0 <= float(cfg.quantile) <= 1.0:
        raise ValueError(f"method.pseudo_mask.quantile={cfg.quantile}: expected a value in [0, 1] (paper 0.85).")
    if cfg.smooth == "bilateral" and (int(cfg.bilateral_size) < 1 or int(cfg.bilateral_size) % 2 == 0):
        raise ValueError(f"method.pseudo_mask.bilateral_size={cfg.bilateral_size}: expected an odd window side >= 1.")
    if cfg.smooth == "bilateral" and (float(cfg.bilateral_sigma_space) <= 0 or float(cfg.bilateral_sigma_color) <= 0):
        raise ValueError("method.pseudo_mask.bilateral_sigma_space and bilateral_sigma_color must be > 0.")
    if not 0.0 <= float(cfg.rebinarize_at) <= 1.0:
        raise ValueError(f"method.pseudo_mask.rebinarize_at={cfg.rebinarize_at}: expected 0 (keep soft) or a value in (0, 1].")


# ---------------------------------------------------------------------------------------------- pieces
def masked_quantile(values: Tensor, valid: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile of ``values`` ``[N, M]`` over the entries where ``valid`` ``[N, M]`` is True.

    Linear interpolation between order statistics (numpy's and torch's default). A row without a
    valid entry gets ``+inf`` (so nothing passes a ``>=`` threshold). Works for any ``M`` (no size
    limit, unlike ``torch.quantile``).
    """
    v = values.float().masked_fill(~valid, float("inf"))
    ordered, _ = v.sort(dim=1)
    n = valid.sum(dim=1)
    pos = q * (n - 1).clamp(min=0).to(ordered.dtype)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=(n - 1).clamp(min=0))
    frac = pos - lo.to(pos.dtype)
    a = ordered.gather(1, lo[:, None]).squeeze(1)
    b = ordered.gather(1, hi[:, None]).squeeze(1)
    out = a + frac * (b - a)
    out = torch.where(frac == 0, a, out)  # keeps exact ties exact (inf - inf would be nan)
    return out.masked_fill(n == 0, float("inf"))


def otsu_threshold(values: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold of each row of ``values`` ``[N, M]``: maximises the between-class variance.

    Returns ``[N]`` thresholds in the units of ``values``; a constant row returns its value.
    """
    v = values.float()
    lo, hi = v.min(dim=1, keepdim=True).values, v.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp(min=1e-12)
    idx = ((v - lo) / span * (bins - 1)).round().long().clamp(0, bins - 1)
    hist = torch.zeros(v.shape[0], bins, device=v.device).scatter_add_(1, idx, torch.ones_like(v))
    p = hist / hist.sum(dim=1, keepdim=True)
    centers = torch.arange(bins, device=v.device, dtype=torch.float32)
    w0 = p.cumsum(dim=1)
    mu = (p * centers).cumsum(dim=1)
    mu_t = mu[:, -1:]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp(min=1e-12)
    between = between.masked_fill((w0 <= 0) | (w0 >= 1), -1.0)
    k = between.argmax(dim=1, keepdim=True).float()  # class 0 = bins <= k
    return (lo + (k + 0.5) / (bins - 1) * span).squeeze(1)


def fill_holes(mask: Tensor) -> Tensor:
    """Fill the holes of binary masks ``[N, 1, H, W]``: background not connected to the border becomes foreground.

    Geodesic reconstruction of the background from the image border (4-connected), by repeated
    3x3-cross dilation restricted to the background, until nothing changes.
    """
    bg = ~mask.bool()
    reach = torch.zeros_like(bg)
    reach[..., 0, :], reach[..., -1, :] = bg[..., 0, :], bg[..., -1, :]
    reach[..., :, 0], reach[..., :, -1] = bg[..., :, 0], bg[..., :, -1]
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32, device=mask.device).view(1, 1, 3, 3)
    for _ in range(mask.shape[-1] * mask.shape[-2]):
        grown = (F.conv2d(reach.float(), cross, padding=1) > 0) & bg
        if torch.equal(grown, reach):
            break
        reach = grown
    return ~reach


def body_mask(images: Tensor) -> Tensor:
    """Foreground (body) of radiographs ``[N, C, H, W]`` -> bool ``[N, 1, H, W]``.

    Otsu's threshold of each image's intensities (mean over channels) separates the bright body from
    the dark background; holes are filled so the lungs, darker than the threshold but enclosed by
    the chest wall, count as body. An image whose whole area is above the threshold is all body.
    """
    gray = images.float().mean(dim=1, keepdim=True)
    n = gray.shape[0]
    t = otsu_threshold(gray.reshape(n, -1))
    fg = gray > t.view(n, 1, 1, 1)
    fg = fill_holes(fg)
    empty = fg.reshape(n, -1).sum(dim=1) == 0
    return fg | empty.view(n, 1, 1, 1)


def bilateral_filter(x: Tensor, size: int = 9, sigma_space: float = 3.0, sigma_color: float = 0.5) -> Tensor:
    """Bilateral filter of ``x`` ``[N, C, H, W]`` (each channel guided by itself), edge-replicated borders.

    ``out(p) = sum_q w(p, q) x(q) / sum_q w(p, q)`` over the ``size x size`` window, with
    ``w = exp(-|p - q|^2 / 2 sigma_space^2) * exp(-(x(p) - x(q))^2 / 2 sigma_color^2)``. Loops over
    the window offsets, so memory stays ``O(N C H W)``.
    """
    r = size // 2
    xf = x.float()
    padded = F.pad(xf, (r, r, r, r), mode="replicate")
    h, w = xf.shape[-2:]
    num = torch.zeros_like(xf)
    den = torch.zeros_like(xf)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = padded[..., r + dy : r + dy + h, r + dx : r + dx + w]
            wgt = torch.exp(-(dx * dx + dy * dy) / (2 * sigma_space**2) - (shifted - xf) ** 2 / (2 * sigma_color**2))
            num += wgt * shifted
            den += wgt
    return (num / den).to(x.dtype)


# ---------------------------------------------------------------------------------------------- the processor
@torch.no_grad()
def pseudo_masks(attention: Tensor, size: tuple[int, int], cfg: PseudoMaskConfig | None = None,
                 images: Tensor | None = None) -> Tensor:
    """Pseudo segmentation masks from the attention of a pooling query over a feature grid.

    Args:
        attention: ``[B, heads, h, w]`` attention scores over the grid (e.g. a pooling query's
            probabilities over the ``h * w`` spatial tokens; any non-negative scores work).
        size: ``(H, W)`` of the masks (the image / decoder output size).
        cfg: the recipe (default: the paper's, :class:`PseudoMaskConfig`).
        images: ``[B, C, H', W']`` images, needed when ``cfg.body_mask`` (resized to ``size`` if needed).

    Returns:
        Detached float masks ``[B, 1, H, W]`` (``aggregate="mean"``) or ``[B, heads, H, W]``
        (``"none"``), values in {0, 1}, or in [0, 1] after soft bilateral smoothing.
    """
    cfg = cfg or PseudoMaskConfig()
    validate(cfg)
    if attention.ndim != 4:
        raise ValueError(f"pseudo_masks expects attention [B, heads, h, w], got shape {tuple(attention.shape)}.")
    a = attention.detach().float()
    if cfg.aggregate == "mean":
        a = a.mean(dim=1, keepdim=True)
    b, k = a.shape[:2]
    if cfg.upsample == "nearest":
        up = F.interpolate(a, size=size, mode="nearest")
    else:
        up = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    if cfg.body_mask:
        if images is None:
            raise ValueError("pseudo_masks: body_mask=True needs the images.")
        imgs = images.detach()
        if tuple(imgs.shape[-2:]) != tuple(size):
            imgs = F.interpolate(imgs.float(), size=size, mode="bilinear", align_corners=False)
        body = body_mask(imgs).expand(b, k, *size)
        up = up * body
    else:
        body = torch.ones_like(up, dtype=torch.bool)
    flat = up.reshape(b * k, -1)
    region = (body if cfg.over == "body" else torch.ones_like(body)).reshape(b * k, -1)
    if cfg.threshold == "quantile":
        t = masked_quantile(flat, region, float(cfg.quantile))
    elif cfg.threshold == "median":
        t = masked_quantile(flat, region, 0.5)
    else:
        t = (flat * region).sum(dim=1) / region.sum(dim=1).clamp(min=1)
    # Scores within a relative 1e-6 of the threshold are ties (upsampling rounds a constant map
    # to values that differ in the last bits); the tie rule decides them explicitly.
    tol = 1e-6 * flat.abs().amax(dim=1, keepdim=True)
    fg = (flat >= t[:, None] - tol) if cfg.inclusive else (flat > t[:, None] + tol)
    fg = fg & body.reshape(b * k, -1)
    masks = fg.reshape(b, k, *size).float()
    if cfg.smooth == "bilateral":
        masks = bilateral_filter(masks, int(cfg.bilateral_size), float(cfg.bilateral_sigma_space),
                                 float(cfg.bilateral_sigma_color))
        if float(cfg.rebinarize_at) > 0:
            masks = (masks >= float(cfg.rebinarize_at)).float()
    return masks.detach()


__all__ = ["PseudoMaskConfig", "pseudo_masks", "masked_quantile", "otsu_threshold", "fill_holes", "body_mask",
           "bilateral_filter", "validate"]

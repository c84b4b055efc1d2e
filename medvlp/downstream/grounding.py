"""Zero-shot visual grounding (G2D §7.5, BioViL's pipeline): where does a finding's prompt match the image?

For a method that gives a dense map in the joint space (:meth:`~medvlp.methods.base.VLPMethod.dense_embeddings`,
e.g. G2D's projected last-stage feature map), each position's cosine similarity with the positive prompt
of the dataset's finding (the first label; the prompt file's first positive prompt, e.g. G2D's
``pneumothorax``) gives a similarity map; it is resized bilinearly to the image, min-max scaled per image
and binarised at ``threshold`` (0.5: the paper does not state its threshold). On the test images with a
finding (SIIM masks, RSNA boxes rasterised: ``data.task=segmentation``) the prediction is compared with
the truth mask: recall ``|P & T| / |T|``, IoU ``|P & T| / |P | T|`` and Dice ``2 |P & T| / (|P| + |T|)``,
each averaged over the images.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.datamodules.base import DataError
from medvlp.downstream.embed import default_device, embed_prompts
from medvlp.downstream.task import Task
from medvlp.registry import register_task

THRESHOLD = 0.5  # of the min-max scaled similarity map (G2D states none; BioViL-style)


def grounding_scores(maps: Tensor, truths: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """Per-image recall, IoU and Dice ``[N]`` of similarity ``maps`` ``[N, H, W]`` (min-max scaled per
    image, positive where >= ``threshold``; a constant map predicts nothing) against binary ``truths``
    ``[N, H, W]``."""
    flat = maps.flatten(1).float()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    pred = (flat - lo) / (hi - lo).clamp_min(1e-12) >= threshold
    t = truths.flatten(1) > 0.5
    inter, p, tt = (pred & t).sum(1).float(), pred.sum(1).float(), t.sum(1).float()
    union = (pred | t).sum(1).float()
    return {"recall": inter / tt.clamp_min(1), "iou": inter / union.clamp_min(1), "dice": 2 * inter / (p + tt).clamp_min(1)}


def similarity_maps(method: Any, images: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity ``[B, H, W]`` of each position of the method's dense map with one unit text
    embedding ``text`` ``[D]``, resized to the images."""
    dense = method.dense_embeddings(images)
    if dense is None:
        raise ValueError(f"{method.cfg.name} gives no dense embeddings: zero-shot grounding needs a method that "
                         f"implements dense_embeddings (e.g. g2d).")
    sim = torch.einsum("bdhw,d->bhw", F.normalize(dense.float(), dim=1), F.normalize(text.float(), dim=0))
    return F.interpolate(sim[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def zero_shot_grounding(method: Any, dm: Any, split: str, max_length: int, threshold: float = THRESHOLD) -> dict[str, Any]:
    """Recall / IoU / Dice of the prompt's similarity map on the images of ``split`` that have a finding."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"The grounding threshold must be in [0, 1], got {threshold}.")
    from medvlp.downstream.zero_shot import load_prompts

    if not dm.label_names:
        raise DataError(f"{type(dm).__name__} has no labels: grounding needs the finding's name and its masks.")
    finding = dm.label_names[0]
    prompts = load_prompts(dm.prompt_file())
    if finding not in prompts:
        raise DataError(f"{dm.prompt_file()} has no prompts for '{finding}' (the finding grounded).")
    prompt = prompts[finding]["positive"][0]
    device = default_device()
    method.eval().to(device)
    text = embed_prompts(method, [prompt], max_length, device)
    scores: dict[str, list[Tensor]] = {"recall": [], "iou": [], "dice": []}
    n_images = 0
    for batch in dm.eval_dataloader(split):
        if batch.masks is None:
            raise DataError(f"{type(dm).__name__} gives no masks; set data.task=segmentation (SIIM, RSNA).")
        n_images += len(batch.masks)
        positive = batch.masks.flatten(1).sum(1) > 0
        if not positive.any():
            continue
        maps = similarity_maps(method, batch.images[positive].to(device), text.to(device)).cpu()
        for k, v in grounding_scores(maps, batch.masks[positive].float(), threshold).items():
            scores[k].append(v)
    n = sum(len(v) for v in scores["dice"])
    out = {k: float(torch.cat(v).mean()) if v else float("nan") for k, v in scores.items()}
    return {"finding": finding, "prompt": prompt, "threshold": float(threshold), "n_images": n_images, "n_positive": n, **out}


@register_task("grounding")
class GroundingTask(Task):
    """zero-shot grounding: prompt similarity maps against masks (recall, IoU, Dice)"""

    def evaluate(self, method: Any, dm: Any, emb: Any, cfg: Any) -> dict[str, Any]:
        return zero_shot_grounding(method, dm, emb.split or "test", int(cfg.data.max_length), THRESHOLD)

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        g = res["grounding"]
        rows = [(k, f"{g[k]:.3f}") for k in ("recall", "iou", "dice")]
        return (f"zero-shot grounding of '{g['prompt']}' ({g['finding']}) on the {res['split']} split "
                f"({g['n_positive']} of {g['n_images']} images with a finding)"), rows, ("metric", "value")


__all__ = ["GroundingTask", "grounding_scores", "similarity_maps", "zero_shot_grounding"]

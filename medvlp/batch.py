"""Typed batches and feature containers shared by every datamodule and method.

Lightning moves dataclasses to the device field by field, so methods receive these on the
right device. Collate functions build ``ImageTextBatch`` and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class ImageTextBatch:
    """One batch of studies with their reports.

    Shapes:
        images: ``[B, C, H, W]`` (2D), ``[B, C, D, H, W]`` (one volume per study) or
            ``[B, S, C, D, H, W]`` (several scans per study; see ``scan_mask``). Float, normalised.
        input_ids / attention_mask: ``[B, T]`` int64; mask 1 = real token.
        labels: ``[B, K]`` float, 1 positive, 0 negative, NaN unknown (``label_names`` order of the
            datamodule).
        scan_mask: ``[B, S]`` bool, True = real scan (multi-scan studies only).
        anatomy_masks: ``[B, 1, D, H, W]`` int64 label map aligned to ``images`` (fVLM): 0 background,
            ``k`` the ``k``-th anatomy of the datamodule's ``anatomy_names``.
        anatomy_texts: anatomy name -> ``B`` texts, each sample's report about that anatomy (fVLM).
        anatomy_abnormal: ``[B, A]`` bool, True where the report calls that anatomy abnormal (fVLM).
        descriptions: ``B`` EHR descriptions - the text before the diagnosis (MedBLIP's lists).
        prompts: ``B`` questions or prompts for generative methods (None: the method's default).
        boxes / box_labels: per image ``[N_i, 4]`` float ``(x1, y1, x2, y2)`` in the pixels of
            ``images`` and ``[N_i]`` int64 classes (detection datasets).
        masks: ``[B, H, W]`` uint8 {0, 1} aligned to ``images`` (segmentation datasets).
        skipped: items dropped by ``data.on_error=skip`` while building this batch.
        skipped_ids / skipped_reasons: the study id of each of those items and why it was skipped
            (the error message, naming the file); :class:`~medvlp.datamodules.dropped.DroppedItems`
            lists them in ``dropped.csv``.
        meta: per-item lists a dataset adds (``cohort``: the list a MedBLIP row came from).
    """

    images: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    study_ids: list[str]
    texts: list[str] = field(default_factory=list)
    labels: Tensor | None = None
    scan_mask: Tensor | None = None
    anatomy_masks: Tensor | None = None
    anatomy_texts: dict[str, list[str]] | None = None
    anatomy_abnormal: Tensor | None = None
    descriptions: list[str] | None = None
    prompts: list[str] | None = None
    boxes: list[Tensor] | None = None
    box_labels: list[Tensor] | None = None
    masks: Tensor | None = None
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    skipped_reasons: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self)


@dataclass
class ImageFeatures:
    """Output of an image encoder (before any method-specific projection).

    Shapes:
        pooled: ``[B, D]`` global embedding (CLS token or pooled feature map).
        tokens: ``[B, N, D_local]`` local features: ViT patch tokens or CNN feature-map cells,
            row-major over ``grid``.
        grid: the spatial shape of ``tokens`` (``(h, w)`` or ``(d, h, w)``); ``prod(grid) == N``.
        attentions: ``[B, heads, 1 + N, 1 + N]`` self-attention probabilities of the last block
            (ViTs only, and only when requested).
        levels: token tensors ``[B, N, D_local]`` of several depths of the encoder, the last being
            ``tokens`` (encoders that expose them, e.g. ``fvlm_vit``; else None).
    """

    pooled: Tensor
    tokens: Tensor
    grid: tuple[int, ...]
    attentions: Tensor | None = None
    levels: list[Tensor] | None = None


@dataclass
class TextFeatures:
    """Output of a text encoder.

    Shapes:
        pooled: ``[B, D]`` ([CLS] token of the last layer).
        tokens: ``[B, T, D]`` token features of the last layer.
        mask: ``[B, T]`` 1 = real token (the tokenizer's attention mask).
        attentions: ``[B, heads, T, T]`` last-layer attention probabilities (only when requested).
    """

    pooled: Tensor
    tokens: Tensor
    mask: Tensor
    attentions: Tensor | None = None


def stack_or_none(values: list[Any]) -> Tensor | None:
    """Stack per-item tensors / arrays, or return None when any item lacks the field."""
    if not values or any(v is None for v in values):
        return None
    return torch.stack([torch.as_tensor(v) for v in values])


@dataclass
class TokenAlignment:
    """A method's word-to-image-token alignment for one batch (``VLPMethod.token_alignment``).

    Shapes:
        attention: ``[B, W, P]`` rows over the image tokens sum to 1 (word ``w`` attends to token ``p``);
        word_mask: ``[B, W]`` bool, True = a word slot (False = padding);
        word_weights: ``[B, W]`` the weight of each word in the method's loss (0 on padding);
        grid: the image-token grid (``P = prod(grid)``), e.g. ``(h, w)`` for 2D.
    """

    attention: Tensor
    word_mask: Tensor
    word_weights: Tensor
    grid: tuple[int, ...]

"""Embedding extraction over a dataloader, shared by zero-shot and retrieval."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Embeddings:
    """Image and paired text embeddings of a split (row i of each belongs to ``study_ids[i]``)."""

    images: Tensor  # [N, D] (or [N, Q, D])
    texts: Tensor  # [N, D]
    study_ids: list[str]
    labels: Tensor | None  # [N, K], NaN unknown
    split: str = ""  # the split they were extracted from, when known


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch, device: torch.device):
    """A copy of a batch dataclass with its tensors on ``device``."""
    import dataclasses

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                        if isinstance(getattr(batch, f.name), torch.Tensor)})


@torch.no_grad()
def extract(method, loader, device: torch.device | None = None) -> Embeddings:
    """Run ``method.embed_batch`` (images, with the batch's ``scan_mask`` / anatomy maps) and ``embed_text``
    over ``loader`` in eval mode."""
    device = device or default_device()
    was_training = method.training
    method.eval().to(device)
    imgs, txts, ids, labels = [], [], [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        for batch in loader:
            imgs.append(method.embed_batch(to_device(batch, device)).float().cpu())
            txts.append(method.embed_text(batch.input_ids.to(device), batch.attention_mask.to(device)).float().cpu())
            ids.extend(batch.study_ids)
            labels.append(batch.labels)
    method.train(was_training)
    lab = torch.cat(labels) if labels and all(x is not None for x in labels) else None
    return Embeddings(torch.cat(imgs), torch.cat(txts), ids, lab)


@torch.no_grad()
def embed_prompts(method, texts: list[str], max_length: int, device: torch.device | None = None) -> Tensor:
    """Mean of the L2-normalised embeddings of ``texts``, re-normalised: ``[D]``."""
    device = device or default_device()
    method.eval().to(device)
    tok = method.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    emb = method.embed_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float()
    emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=0)
    return torch.nn.functional.normalize(emb, dim=-1).cpu()

"""Word-to-patch attention maps of a trained token-alignment method (MGCA's CTA), as PNGs.

For one study of a run's dataset, every selected report word attends over the image patches with
the method's own cross-modal attention, ``softmax(word . patch / cta_temperature)`` on the unit
local embeddings (the attention that builds CTA's word summaries). Each map is upsampled to the
image and drawn over it; the files are ``<out>/<study>/<k>_<word>.png`` plus ``image.png`` and
``words.json`` (the words, their token-importance weights and the map maxima).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.datamodules.base import DataError

# Words that carry no finding; skipped when the words are picked automatically.
STOPWORDS = frozenset(
    "a an the is are was were of in on at to and or with without no not there this that as by for be been "
    "its it has have than from which into also both seen noted present measuring size mm".split()
)


def report_words(tokenizer: Any, input_ids: torch.Tensor) -> list[str]:
    """The words of one tokenised report in the order MGCA merges them: sub-words (``##``) joined,
    [CLS] dropped, everything from the first [SEP] on dropped."""
    words: list[str] = []
    for tok in tokenizer.convert_ids_to_tokens(input_ids.tolist())[1:]:
        if tok == tokenizer.sep_token or tok == tokenizer.pad_token:
            break
        if tok.startswith("##") and words:
            words[-1] += tok[2:]
        else:
            words.append(tok)
    return words


def heat_overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``[H, W]`` gray in [0, 1] and a heat map in [0, 1] -> ``[H, W, 3]`` uint8 (blue-red colour ramp)."""
    r = np.clip(1.5 * heat - 0.25, 0, 1)
    g = np.clip(1.5 - np.abs(3 * heat - 1.5), 0, 1) * 0.8
    b = np.clip(1.0 - 1.5 * heat, 0, 1)
    colour = np.stack([r, g, b], -1)
    base = np.repeat(gray[..., None], 3, -1)
    out = (1 - alpha) * base + alpha * colour * (0.25 + 0.75 * heat[..., None])
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def explain(run_dir: str | Path, study: str = "", out: str | Path | None = None, split: str = "test",
            words: list[str] | None = None, max_words: int = 8) -> list[Path]:
    """Write word-to-patch attention PNGs for one study of a trained run.

    Args:
        run_dir: a run directory of a method with token alignment (``local_tokens``: MGCA).
        study: the study id; "" takes the first study of ``split`` with a finding word.
        out: output folder (default ``<run_dir>/explain``).
        split: the split the study is read from.
        words: words to draw (default: up to ``max_words`` report words that are not stop words).

    Returns:
        The PNG paths written.
    """
    from PIL import Image

    from medvlp import api

    method, cfg = api.load_run(run_dir)
    if not hasattr(method, "local_tokens"):
        raise ValueError(f"medvlp explain needs a method with word-patch alignment (e.g. mgca); this run is '{cfg.method.name}'.")
    api.resolve_data_root(cfg)
    dm = api.build_datamodule(cfg, tokenizer=method.tokenizer)
    records = dm.records(split)
    index = 0
    if study:
        ids = [r.study_id for r in records]
        if study not in ids:
            raise DataError(f"Study '{study}' is not in the {split} split of {cfg.data.root} (e.g. {', '.join(ids[:3])}).")
        index = ids.index(study)
    ds = dm.dataset(split)
    item = ds[index]
    if item is None:
        raise DataError(f"Study {records[index].study_id} could not be loaded.")
    batch = dm.collate([item])
    with torch.no_grad():
        tok = method.local_tokens(batch)
        grid = method.encode_image(batch.images).grid
        attn = (tok.word_emb[0] @ tok.patch_emb[0].T / float(method.cfg.cta_temperature)).softmax(dim=-1)  # [W, P]
    all_words = report_words(method.tokenizer, batch.input_ids[0])
    n = int(tok.word_mask[0].sum())
    all_words = all_words[:n]
    if words:
        picked = [(i, w) for i, w in enumerate(all_words) if w in {x.lower() for x in words}]
        if not picked:
            raise ValueError(f"None of {words} is a word of study {item['study_id']}'s report: {' '.join(all_words)}")
    else:
        seen: set[str] = set()
        picked = []
        for i, w in enumerate(all_words):
            if w not in STOPWORDS and re.fullmatch(r"[a-z]{3,}", w) and w not in seen:
                picked.append((i, w))
                seen.add(w)
        picked = picked[:max_words]
    if len(grid) != 2 or int(np.prod(grid)) != attn.shape[1]:
        raise ValueError(f"explain draws 2D patch grids; this encoder's grid is {grid}.")
    img = batch.images[0, 0].float()
    gray = ((img - img.min()) / (img.max() - img.min() + 1e-8)).numpy()
    folder = Path(out) if out else Path(run_dir) / "explain"
    folder = folder / re.sub(r"[^\w.-]", "_", str(item["study_id"]))
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((gray * 255).round().astype(np.uint8)).save(folder / "image.png")
    written, summary = [], []
    weights = tok.word_weights[0]
    for k, (i, w) in enumerate(picked):
        heat = attn[i].reshape(1, 1, *grid)
        heat = F.interpolate(heat, size=gray.shape, mode="bilinear", align_corners=False)[0, 0]
        heat = ((heat - heat.min()) / (heat.max() - heat.min() + 1e-8)).numpy()
        path = folder / f"{k:02d}_{w}.png"
        Image.fromarray(heat_overlay(gray, heat)).save(path)
        written.append(path)
        summary.append({"word": w, "position": i, "weight": float(weights[i]), "max_attention": float(attn[i].max())})
    (folder / "words.json").write_text(json.dumps({"study": item["study_id"], "text": item["text"], "grid": list(grid),
                                                   "words": summary}, indent=2) + "\n")
    return written

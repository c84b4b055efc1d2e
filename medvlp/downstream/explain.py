"""What a trained method looks at, as PNGs: ``medvlp explain --run DIR [--study ID]``.

The method says what it can show through its optional capabilities (``VLPMethod.supports``):
``dense_outputs`` (G2D) gives the image, its pseudo-mask target and the decoder's prediction side by
side (:func:`explain_dense`); ``token_alignment`` (MGCA's CTA) gives word-to-patch attention maps.

Word maps: for one study of a run's dataset, every selected report word attends over the image patches with
the method's own cross-modal attention (MGCA: ``softmax(word . patch / cta_temperature)`` on the unit
local embeddings, the attention that builds CTA's word summaries). Each map is upsampled to the
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


def _load_study(method: Any, cfg: Any, study: str, split: str) -> tuple[dict[str, Any], Any]:
    """``(item, one-item batch)`` of ``study`` (default: the first record) of ``split`` of a run's dataset."""
    from medvlp import api

    api.resolve_data_root(cfg)
    dm = api.build_datamodule(cfg, tokenizer=method.tokenizer)
    records = dm.records(split)
    index = 0
    if study:
        ids = [r.study_id for r in records]
        if study not in ids:
            raise DataError(f"Study '{study}' is not in the {split} split of {cfg.data.root} (e.g. {', '.join(ids[:3])}).")
        index = ids.index(study)
    item = dm.dataset(split)[index]
    if item is None:
        raise DataError(f"Study {records[index].study_id} could not be loaded.")
    return item, dm.collate([item])


def _gray(image: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` normalised image -> ``[H, W]`` in [0, 1] (first channel, min-max)."""
    img = image[0].float()
    return ((img - img.min()) / (img.max() - img.min() + 1e-8)).numpy()


def _study_folder(run_dir: str | Path, out: str | Path | None, study_id: str) -> Path:
    folder = (Path(out) if out else Path(run_dir) / "explain") / re.sub(r"[^\w.-]", "_", str(study_id))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def explain_dense(run_dir: str | Path, method: Any, cfg: Any, study: str = "", out: str | Path | None = None,
                  split: str = "test") -> list[Path]:
    """Dense methods (G2D): ``<out>/<study>/dense.png`` = image | pseudo-mask target | decoder prediction.

    The target and the prediction are drawn as heat over the image (and written alone as
    ``target.png`` / ``prediction.png``, 0-255); ``dense.json`` holds the foreground fractions, the
    Dice between prediction (>= 0.5) and target (>= 0.5), and the study's report.
    """
    from PIL import Image

    item, batch = _load_study(method, cfg, study, split)
    method.eval()
    with torch.no_grad():
        outputs = method.dense_outputs(batch.images)
    gray = _gray(batch.images[0])
    target = outputs["target"][0].float().mean(0).numpy()
    pred = outputs["prediction"][0].float().mean(0).numpy()
    panels = [np.repeat((gray[..., None] * 255).round().astype(np.uint8), 3, -1), heat_overlay(gray, target),
              heat_overlay(gray, pred)]
    gap = np.full((gray.shape[0], 4, 3), 255, np.uint8)
    folder = _study_folder(run_dir, out, item["study_id"])
    paths = [folder / "dense.png", folder / "target.png", folder / "prediction.png"]
    Image.fromarray(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)).save(paths[0])
    Image.fromarray((target * 255).round().astype(np.uint8)).save(paths[1])
    Image.fromarray((pred * 255).round().astype(np.uint8)).save(paths[2])
    hard_t, hard_p = target >= 0.5, pred >= 0.5
    denom = hard_t.sum() + hard_p.sum()
    info = {"study": item["study_id"], "text": item["text"], "panels": ["image", "pseudo-mask target", "prediction"],
            "target_fraction": float(target.mean()), "prediction_fraction": float(hard_p.mean()),
            "dice_prediction_vs_target": float(2 * (hard_t & hard_p).sum() / denom) if denom else 1.0}
    (folder / "dense.json").write_text(json.dumps(info, indent=2) + "\n")
    return paths


def explain(run_dir: str | Path, study: str = "", out: str | Path | None = None, split: str = "test",
            words: list[str] | None = None, max_words: int = 8) -> list[Path]:
    """Write the explanation PNGs of one study of a trained run: word-to-patch attention maps (MGCA),
    or image | pseudo mask | prediction for dense methods (G2D, :func:`explain_dense`).

    Args:
        run_dir: a run directory of a method with the ``token_alignment`` (MGCA) or ``dense_outputs``
            (G2D) capability.
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
    if method.supports("dense_outputs"):
        return explain_dense(run_dir, method, cfg, study=study, out=out, split=split)
    if not method.supports("token_alignment"):
        raise ValueError(f"medvlp explain needs a method with the token_alignment (e.g. mgca) or dense_outputs "
                         f"(e.g. g2d) capability; '{cfg.method.name}' has neither.")
    item, batch = _load_study(method, cfg, study, split)
    with torch.no_grad():
        tok = method.token_alignment(batch)
    grid = tok.grid
    attn = tok.attention[0].float()  # [W, P]
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
    gray = _gray(batch.images[0])
    folder = _study_folder(run_dir, out, item["study_id"])
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

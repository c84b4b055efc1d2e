"""Zero-shot classification with prompt pairs: score = sim(image, positive) - sim(image, negative).

Several prompts per side are embedded, averaged and re-normalised (as CheXzero / GLoRIA / MGCA
average prompt ensembles); the score is the difference of the two similarities, i.e. the logit of
the two-way softmax over {positive, negative}. AUROC per label over the images whose label is
known (NaN labels are left out).

A prompt file may merge labels scored separately into one (``_merge: {new: [a, b]}``; HLIP's
Rad-ChestCT calcification, H10): the merged score is the larger of the two scores when either is
positive (the two-way softmax above 0.5), else the smaller; its label is the first source's column.

Besides AUROC, each label gets HLIP's / fVLM's thresholded report (``thresholded``): the probability
``sigma(s * score)`` with the method's logit scale ``s``, the threshold on ``linspace(0, 1, 100)``
closest to the ROC corner (chosen on the evaluated set, H11), and accuracy, precision, recall and
weighted F1 there; their means over the labels are ``mean_accuracy`` etc.

A prompt entry may name the ``anatomy`` it is about (fVLM scores each finding with the embedding of
its anatomy); file-level ``_threshold`` and ``_missing`` choose the threshold rule and what happens to
an image the method cannot score for a label (:func:`load_options`; ``unscored`` counts them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvlp.datamodules.base import DataError
from medvlp.downstream.embed import Embeddings, embed_prompts
from medvlp.downstream.metrics import auroc, binary_report, youden_like_threshold
from medvlp.downstream.task import Task
from medvlp.registry import register_task


def load_prompts(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """Read a prompt file: ``{label: {positive: [...], negative: [...]}}``."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict):
        raise DataError(f"Prompt file {path} must map each label to {{positive: [...], negative: [...]}}.")
    cosine = raw.get("_score") == "cosine"  # positive prompts only
    out = {}
    for label, sides in raw.items():
        if str(label).startswith("_"):  # file-level options (_merge)
            continue
        if not isinstance(sides, dict) or not sides.get("positive") or not (cosine or sides.get("negative")):
            raise DataError(f"Prompt file {path}: label '{label}' needs non-empty 'positive' and 'negative' lists"
                            + (" (a 'positive' list with _score: cosine)." if cosine else "."))
        out[str(label)] = {"positive": list(sides["positive"]), "negative": list(sides.get("negative") or [])}
        if sides.get("anatomy"):
            out[str(label)]["anatomy"] = str(sides["anatomy"])
    return out


def load_options(path: str | Path) -> dict[str, str]:
    """The file-level scoring options of a prompt file, checked: ``_threshold`` (``hlip``: ``p >= t``, first
    best threshold; ``fvlm``: ``p > t``, last best, as fVLM's ``calc_metrics.py``; ``argmax``: positive iff
    the positive prompt is the more similar, G2D's rule, no threshold chosen) and ``_missing`` (an image
    the method cannot score for a label, e.g. fVLM without the anatomy: ``zero`` = probability 0, fVLM's
    rule; ``exclude`` = left out of that label's metrics)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path))
    raw = raw if isinstance(raw, dict) else {}
    out = {"threshold": str(raw.get("_threshold", "hlip")), "missing": str(raw.get("_missing", "zero")),
           "score": str(raw.get("_score", "difference"))}
    if out["threshold"] not in THRESHOLD_RULES or out["missing"] not in MISSING_RULES or out["score"] not in SCORE_RULES:
        raise DataError(f"Prompt file {path}: _threshold must be one of {list(THRESHOLD_RULES)}, _missing one of "
                        f"{list(MISSING_RULES)} and _score one of {list(SCORE_RULES)}, got {out['threshold']!r}, "
                        f"{out['missing']!r} and {out['score']!r}.")
    return out


THRESHOLD_RULES = ("hlip", "fvlm", "argmax")
MISSING_RULES = ("zero", "exclude")
SCORE_RULES = ("difference", "cosine")  # sim(pos) - sim(neg) | sim(pos) alone (HLIP's head-CT scoring, hlip.md §7.4)


def load_merges(path: str | Path) -> dict[str, list[str]]:
    """The ``_merge`` section of a prompt file: ``{merged label: [source labels]}`` (empty if none)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path))
    merges = raw.get("_merge", {}) if isinstance(raw, dict) else {}
    if not isinstance(merges, dict) or not all(isinstance(v, list) and len(v) >= 2 for v in merges.values()):
        raise DataError(f"Prompt file {path}: _merge must map a new label to a list of at least two labels.")
    return {str(k): [str(x) for x in v] for k, v in merges.items()}


def merge_scores(scores: list[np.ndarray]) -> np.ndarray:
    """HLIP's merge of per-class zero-shot scores (logits of the two-way softmax): the maximum where
    any score is positive (probability above 0.5), else the minimum."""
    stack = np.stack(scores)
    hi, lo = stack.max(axis=0), stack.min(axis=0)
    return np.where(hi > 0, hi, lo)


def prompt_scores(method, emb: Embeddings, eval_labels: list[str], prompts: dict[str, dict[str, list[str]]],
                  max_length: int, merges: dict[str, list[str]] | None = None,
                  score: str = "difference") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(scores, columns)``: per reported label the score ``sim(pos) - sim(neg)`` (``score="cosine"``: ``sim(pos)``)
    of every image (NaN where the method cannot score it) and the label column its truth comes from (merged
    labels: the first source's)."""
    missing = [lab for lab in eval_labels if lab not in prompts]
    if missing:
        raise DataError(f"No prompts for {missing}; add them to the prompt file (data.prompts).")
    scores: dict[str, np.ndarray] = {}
    for lab in eval_labels:
        pos = embed_prompts(method, prompts[lab]["positive"], max_length)
        neg = embed_prompts(method, prompts[lab]["negative"], max_length) if score == "difference" else torch.zeros_like(pos)
        where = {"anatomy": prompts[lab]["anatomy"]} if "anatomy" in prompts[lab] else {}
        with torch.no_grad():
            sims = method.similarity(emb.images.to(pos.device), torch.stack([pos, neg]).to(emb.images.dtype), **where).float()
        sims = sims if score == "difference" else torch.stack([sims[:, 0], torch.zeros_like(sims[:, 0])], dim=1)
        scores[lab] = (sims[:, 0] - sims[:, 1]).cpu().numpy().astype(np.float64)
    columns = {lab: lab for lab in eval_labels}
    for merged, sources in (merges or {}).items():
        present = [s for s in sources if s in scores]
        if len(present) < 2:
            continue
        scores[merged] = merge_scores([scores.pop(s) for s in present])
        columns[merged] = present[0]
        for s in present:
            columns.pop(s)
    return scores, columns


def probabilities(score: np.ndarray, scale: float) -> np.ndarray:
    """The two-way softmax's positive entry ``sigma(scale * score)``; 0 where the image is unscored (NaN)."""
    return np.where(np.isnan(score), 0.0, 1.0 / (1.0 + np.exp(-scale * np.nan_to_num(score))))


def zero_shot_auc(method, emb: Embeddings, label_names: list[str], eval_labels: list[str],
                  prompts: dict[str, dict[str, list[str]]], max_length: int,
                  merges: dict[str, list[str]] | None = None, options: dict[str, str] | None = None,
                  threshold_emb: Embeddings | None = None) -> dict[str, Any]:
    """Per-label and mean AUROC of prompt-pair zero-shot scores.

    Args:
        method: a trained ``VLPMethod``.
        emb: image embeddings of the split with their ``labels`` (``label_names`` order).
        eval_labels: the labels to score (each needs an entry in ``prompts``).
        merges: ``{merged: [sources]}``: the sources among ``eval_labels`` are scored, merged with
            :func:`merge_scores` and reported as one label.
        options: :func:`load_options` (threshold rule, unscored images).
        threshold_emb: embeddings of another split (with labels) on which each label's threshold is
            chosen and then applied to ``emb``; None = chosen on ``emb`` itself (HLIP / fVLM).
    """
    options = {"threshold": "hlip", "missing": "zero", "score": "difference", **(options or {})}
    for e in (emb, threshold_emb):
        if e is not None and e.labels is None:
            raise DataError("Zero-shot evaluation needs labels, but this split has none.")
    result: dict[str, Any] = {"auroc": {}, "positives": {}, "negatives": {}}
    scores, columns = prompt_scores(method, emb, eval_labels, prompts, max_length, merges, options["score"])
    other = (prompt_scores(method, threshold_emb, eval_labels, prompts, max_length, merges, options["score"])[0]
             if threshold_emb else None)
    scale = 1.0 / float(method.temperature())
    result["logit_scale"] = scale
    result["thresholded"] = {}
    result["threshold_rule"] = options["threshold"]
    result["unscored"] = {}
    strict = options["threshold"] == "fvlm"

    def truth(e: Embeddings, lab: str, score: np.ndarray) -> np.ndarray:
        y = e.labels[:, label_names.index(columns[lab])].numpy().astype(np.float64)
        return np.where(np.isnan(score), np.nan, y) if options["missing"] == "exclude" else y

    for lab in columns:
        score = scores[lab]
        unscored = np.isnan(score)
        result["unscored"][lab] = int(unscored.sum())
        y = truth(emb, lab, score)
        probs = probabilities(score, scale)
        floor = float(score[~unscored].min()) - 1.0 if (~unscored).any() else 0.0
        result["auroc"][lab] = auroc(np.where(unscored, floor, score), y)  # unscored = probability 0: ranked last
        result["positives"][lab] = int(np.nansum(y > 0.5))
        result["negatives"][lab] = int(np.sum(y < 0.5))
        if options["threshold"] == "argmax":  # G2D: positive iff cos(pos) > cos(neg), no threshold is chosen
            t = 0.5
            result["thresholded"][lab] = {"threshold": t, **binary_report(score > 0, y)}
            continue
        if other is None:
            t = youden_like_threshold(probs, y, strict=strict)
        else:
            t = youden_like_threshold(probabilities(other[lab], scale), truth(threshold_emb, lab, other[lab]), strict=strict)
        result["thresholded"][lab] = {"threshold": t, **binary_report(probs > t if strict else probs >= t, y)}
    vals = [v for v in result["auroc"].values() if not np.isnan(v)]
    result["mean_auroc"] = float(np.mean(vals)) if vals else float("nan")
    for key in ("accuracy", "f1", "f1_weighted", "precision", "recall"):
        result[f"mean_{key}"] = float(np.mean([m[key] for m in result["thresholded"].values()])) if columns else float("nan")
    return result


@register_task("zeroshot")
class ZeroShotTask(Task):
    """zero-shot classification with prompt pairs (AUROC)"""

    def evaluate(self, method: Any, dm: Any, emb: Embeddings, cfg: Any) -> dict[str, Any]:
        from medvlp.downstream.embed import extract

        if method.supports("generate") and dm.multiclass:  # MedBLIP: the class named by text, in three modes
            from medvlp.downstream.generative import zero_shot_diagnosis

            return zero_shot_diagnosis(method, dm.eval_dataloader(emb.split or "test"), list(dm.label_names))
        prompts = load_prompts(dm.prompt_file())
        split = str(cfg.data.get("threshold_split", "") or "")
        other = extract(method, dm.eval_dataloader(split)) if split else None
        res = zero_shot_auc(method, emb, list(dm.label_names), dm.eval_label_names(), prompts, cfg.data.max_length,
                            merges=load_merges(dm.prompt_file()), options=load_options(dm.prompt_file()),
                            threshold_emb=other)
        res["threshold_split"] = split or "evaluated"
        return res

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        z = res["zeroshot"]
        if "modes" in z:
            from medvlp.downstream.generative import diagnosis_rows

            return (f"zero-shot {', '.join(z['classes'])} on the {res['split']} split ({z['n']} volumes; "
                    f"{z['unlabelled']} without a diagnosis left out)", diagnosis_rows(z), ("mode", "result"))
        rows = [(lab, f"{auc:.3f}   (pos {z['positives'][lab]}, neg {z['negatives'][lab]})") for lab, auc in z["auroc"].items()]
        rows.append(("mean", f"{z['mean_auroc']:.3f}"))
        where = ("chosen on this split, as HLIP / fVLM report" if z.get("threshold_split", "evaluated") == "evaluated"
                 else f"chosen on the {z['threshold_split']} split")
        rule = ("where the positive prompt is the more similar (G2D)" if z["thresholded"] and all(
            m["threshold"] == 0.5 for m in z["thresholded"].values()) and z.get("threshold_rule") == "argmax"
            else f"at each finding's ROC-corner threshold ({where})")
        rows.append(("thresholded", f"{rule}: accuracy {z['mean_accuracy']:.3f}, F1 {z['mean_f1']:.3f}, weighted F1 {z['mean_f1_weighted']:.3f}, "
                                    f"precision {z['mean_precision']:.3f}, recall {z['mean_recall']:.3f} (means; per "
                                    f"finding in --json)"))
        return f"zero-shot AUROC on the {res['split']} split ({res['n']} images)", rows, ("finding", "AUROC")


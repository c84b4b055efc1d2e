"""Evaluation of generative methods (MedBLIP, spec ``medblip.md`` §6): zero-shot diagnosis by text and VQA.

Zero-shot CN / MCI / AD in three modes (``medvlp zeroshot`` on a run whose method can ``generate``):

* ``generate`` - the paper's: the LLM answers the diagnosis question from the visual tokens and the EHR
  prompt; the answer is read back with :func:`parse_diagnosis`; an answer that names no class is counted
  as ``unparsed`` and scored as wrong (never dropped);
* ``itc`` - the volume's best-matching query against the three QA strings (no LLM);
* ``rank`` - the LLM's log-likelihood of each canonical answer.

Each mode reports accuracy, balanced accuracy, macro-F1 and the confusion matrix, overall and per cohort
(the list a row came from: in-distribution test lists and unseen cohorts are reported apart); ``itc`` and
``rank`` also give one-vs-rest AUROC from their softmax probabilities. Rows without a diagnosis are left
out and counted.

VQA (``medvlp vqa``): free-text answers to any question about a study; against reference answers, exact
match (case- and whitespace-insensitive) and token-F1 (SQuAD's: the harmonic mean of token precision and
recall over the lower-cased word tokens).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvlp.downstream.embed import default_device, to_device
from medvlp.downstream.metrics import auroc
from medvlp.downstream.task import Task
from medvlp.registry import register_task

MODES = ("generate", "itc", "rank")
_MCI = ("mild cognitive impairment",)
_CN = ("not demented", "nondemented", "non-demented", "normal", "cognitively normal")
_AD = ("dementia", "demented", "alzheimer")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def parse_diagnosis(answer: str) -> int:
    """The class an answer names (spec §6.2, first match wins on the lower-cased, whitespace-normalised text):
    ``mild cognitive impairment`` or the token ``mci`` -> 1 (MCI); else ``not demented`` / ``nondemented`` /
    ``non-demented`` / ``normal`` / ``cognitively normal`` -> 0 (CN); else ``dementia`` / ``demented`` /
    ``alzheimer`` or the token ``ad`` -> 2 (AD); else -1 (unparsed). Order matters: "not demented" contains
    "demented"."""
    text = " ".join(answer.lower().split())
    words = set(_words(text))
    if any(p in text for p in _MCI) or "mci" in words:
        return 1
    if any(p in text for p in _CN):
        return 0
    if any(p in text for p in _AD) or "ad" in words:
        return 2
    return -1


def class_report(pred: np.ndarray, target: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present), macro-F1 (over the classes present
    in the targets or predictions) and the confusion matrix (rows: truth; a prediction of -1 counts in no
    column) of integer predictions."""
    n = len(target)
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(target, pred, strict=True):
        if p >= 0:
            conf[t, p] += 1
    present = [k for k in range(n_classes) if (target == k).any()]
    recalls = [conf[k, k] / (target == k).sum() for k in present]
    f1s = []
    for k in range(n_classes):
        tp, fp, fn = conf[k, k], (pred == k).sum() - conf[k, k], (target == k).sum() - conf[k, k]
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"n": int(n), "accuracy": float((pred == target).mean()) if n else float("nan"),
            "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
            "macro_f1": float(np.mean(f1s)) if f1s else float("nan"), "confusion": conf.tolist()}


def _report(pred: np.ndarray, target: np.ndarray, cohorts: np.ndarray, names: list[str]) -> dict[str, Any]:
    out = class_report(pred, target, len(names))
    out["cohorts"] = {c: {k: v for k, v in class_report(pred[cohorts == c], target[cohorts == c], len(names)).items()
                          if k != "confusion"} for c in sorted(set(cohorts.tolist()))}
    return out


@torch.no_grad()
def zero_shot_diagnosis(method: Any, loader: Any, class_names: list[str], modes: tuple[str, ...] = MODES,
                        device: torch.device | None = None) -> dict[str, Any]:
    """The three zero-shot modes of §6.2 over a split (see the module docstring).

    Args:
        method: a method with the ``generate`` capability and ``answer_scores(batch, mode)``.
        loader: an evaluation loader of a dataset with exclusive classes (one-hot labels).
        class_names: the datamodule's label names (``CN``, ``MCI``, ``AD``).
        modes: any of :data:`MODES`.

    Returns:
        ``{"modes": {mode: report}, "auroc": {class: AUROC of the itc mode}, "mean_auroc", "logit_scale",
        "unlabelled", "answers": the first generated answers}``.
    """
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"Unknown zero-shot mode(s) {unknown}; modes: {', '.join(MODES)}.")
    device = device or default_device()
    was_training = method.training
    method.eval().to(device)
    target, cohorts, unlabelled = [], [], 0
    scores: dict[str, list[np.ndarray]] = {m: [] for m in modes if m != "generate"}
    answers: list[str] = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        for batch in loader:
            if batch.labels is None:
                unlabelled += len(batch)
                continue
            keep = ~torch.isnan(batch.labels).any(1)
            unlabelled += int((~keep).sum())
            if not keep.any():
                continue
            rows = keep.nonzero().squeeze(1).tolist()
            batch = _select(batch, rows)
            target.append(batch.labels.argmax(1).numpy())
            cohorts += list((batch.meta or {}).get("cohort", [""] * len(batch)))
            b = to_device(batch, device)
            for m in scores:
                scores[m].append(method.answer_scores(b, m).float().cpu().numpy())
            if "generate" in modes:
                answers += method.generate(b)
    method.train(was_training)
    y = np.concatenate(target) if target else np.zeros(0, dtype=np.int64)
    coh = np.asarray(cohorts, dtype=object) if cohorts else np.zeros(0, dtype=object)
    res: dict[str, Any] = {"modes": {}, "classes": list(class_names), "unlabelled": unlabelled, "n": int(len(y))}
    for m, parts in scores.items():
        s = np.concatenate(parts) if parts else np.zeros((0, len(class_names)))
        probs = torch.from_numpy(s).softmax(-1).numpy()
        rep = _report(s.argmax(1) if len(s) else np.zeros(0, dtype=np.int64), y, coh, class_names)
        rep["auroc"] = {c: auroc(probs[:, k], (y == k).astype(np.float64)) for k, c in enumerate(class_names)}
        res["modes"][m] = rep
    if "generate" in modes:
        pred = np.asarray([parse_diagnosis(a) for a in answers], dtype=np.int64)
        rep = _report(pred, y, coh, class_names)
        rep["unparsed"] = int((pred < 0).sum())
        rep["parse_rate"] = float((pred >= 0).mean()) if len(pred) else float("nan")
        rep["examples"] = answers[:5]
        res["modes"]["generate"] = rep
    ranked = next((m for m in ("itc", "rank") if m in res["modes"]), None)
    res["auroc"] = res["modes"][ranked]["auroc"] if ranked else {}
    vals = [v for v in res["auroc"].values() if not np.isnan(v)]
    res["mean_auroc"] = float(np.mean(vals)) if vals else float("nan")
    res["auroc_mode"] = ranked or ""
    res["logit_scale"] = 1.0 / float(method.temperature())
    return res


def _select(batch: Any, rows: list[int]) -> Any:
    """The rows ``rows`` of a batch dataclass (tensors and per-row lists, per-row lists inside dicts)."""
    import dataclasses

    n = len(batch)
    idx = torch.tensor(rows, dtype=torch.long)
    values = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n:
            v = v[idx]
        elif isinstance(v, list) and len(v) == n:
            v = [v[i] for i in rows]
        elif isinstance(v, dict):
            v = {k: [x[i] for i in rows] if isinstance(x, list) and len(x) == n else x for k, x in v.items()}
        values[f.name] = v
    return type(batch)(**values)


def diagnosis_rows(z: dict[str, Any]) -> list[tuple[str, str]]:
    """Printed rows of :func:`zero_shot_diagnosis`: one per mode, then per cohort."""
    rows = []
    for mode, r in z["modes"].items():
        extra = f", unparsed {r['unparsed']} of {r['n']}" if mode == "generate" else f", mean AUROC {np.nanmean(list(r['auroc'].values())):.3f}"
        rows.append((mode, f"accuracy {r['accuracy']:.3f}, balanced accuracy {r['balanced_accuracy']:.3f}, "
                           f"macro-F1 {r['macro_f1']:.3f}{extra}"))
        for cohort, c in r["cohorts"].items():
            rows.append((f"  {cohort or '?'}", f"accuracy {c['accuracy']:.3f}, balanced accuracy {c['balanced_accuracy']:.3f} "
                                               f"({c['n']} volumes)"))
    return rows


# --------------------------------------------------------------------------- VQA
def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 of two answers (lower-cased word tokens; 1.0 when both are empty)."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return " ".join(prediction.lower().split()) == " ".join(reference.lower().split())


def read_references(path: str | Path) -> list[dict[str, str]]:
    """Reference answers: a CSV with the columns ``image``, ``question``, ``answer`` (``image``: the volume's
    path as its list writes it, or a study id)."""
    from medvlp.datamodules.base import DataError
    from medvlp.datamodules.formats.tables import read_text

    text = read_text(Path(path), "VQA reference file")
    reader = csv.DictReader(text.splitlines())
    missing = {"image", "question", "answer"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{path}: the VQA reference file lacks the column(s) {sorted(missing)}; expected image,question,answer "
                        f"(found {reader.fieldnames}).")
    rows = [dict(r) for r in reader]
    for n, r in enumerate(rows, 2):
        if not (r["image"] or "").strip() or not (r["question"] or "").strip():
            raise DataError(f"{path}, line {n}: empty image or question.")
    return rows


@torch.no_grad()
def answer_questions(method: Any, batch: Any, questions: list[str], device: torch.device | None = None) -> list[str]:
    """The method's answer to each question about the first study of ``batch`` (one volume)."""
    device = device or default_device()
    was_training = method.training
    method.eval().to(device)
    one = _select(batch, [0] * len(questions))
    out = method.generate(to_device(one, device), prompts=list(questions))
    method.train(was_training)
    return out


def vqa_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    em = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
    return {"n": len(em), "exact_match": float(np.mean(em)) if em else float("nan"),
            "token_f1": float(np.mean(f1)) if f1 else float("nan")}


@register_task("vqa")
class VQATask(Task):
    """free-text answers to questions about a study (generative methods); exact match and token-F1"""

    def evaluate(self, method: Any, dm: Any, emb: Any, cfg: Any) -> dict[str, Any]:
        """Every question of the dataset's reference file (``data.vqa_file``) about the studies of the split."""
        if not method.supports("generate"):
            raise ValueError(f"{type(method).__name__} does not generate text; VQA needs a generative method (medblip).")
        path = dm.vqa_file()
        if path is None:
            raise ValueError(f"The {cfg.data.name} datamodule has no VQA reference file; set data.vqa_file "
                             f"(a CSV image,question,answer).")
        return evaluate_references(method, dm, read_references(path), emb.split or "test")

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        v = res["vqa"]
        rows = [(q, f"exact match {s['exact_match']:.3f}, token-F1 {s['token_f1']:.3f} ({s['n']})") for q, s in v["questions"].items()]
        rows.append(("all", f"exact match {v['exact_match']:.3f}, token-F1 {v['token_f1']:.3f} ({v['n']} answers)"))
        return f"VQA on the {res['split']} split", rows, ("question", "score")


def evaluate_references(method: Any, dm: Any, refs: list[dict[str, str]], split: str) -> dict[str, Any]:
    """Answers to the reference questions whose study is in ``split``; scores overall and per question."""
    by_key = dm.study_index(split)
    preds, golds, questions, missing = [], [], [], []
    for r in refs:
        rec = by_key.get(r["image"].strip())
        if rec is None:
            missing.append(r["image"])
            continue
        batch = dm.collate([dm.dataset(split).load(rec)])
        preds += answer_questions(method, batch, [r["question"].strip()])
        golds.append(r["answer"])
        questions.append(r["question"].strip())
    res: dict[str, Any] = vqa_scores(preds, golds)
    res["questions"] = {q: vqa_scores([p for p, qq in zip(preds, questions) if qq == q], [g for g, qq in zip(golds, questions) if qq == q])
                        for q in dict.fromkeys(questions)}
    res["not_in_split"] = len(missing)
    res["examples"] = [{"question": q, "answer": p, "reference": g} for q, p, g in list(zip(questions, preds, golds))[:5]]
    return res


__all__ = ["MODES", "answer_questions", "class_report", "exact_match", "parse_diagnosis", "read_references",
           "token_f1", "vqa_scores", "zero_shot_diagnosis"]

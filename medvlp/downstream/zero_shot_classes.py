"""Zero-shot classification into exclusive classes with one prompt per class (HLIP's Pub-Brain-5, hlip.md §7.3).

Each class has one prompt (the file's ``_template`` around the class's phrase, e.g. ``This MRI study shows:
Acute stroke.``); a study's logits are ``s * <u, w_c>`` with the method's logit scale ``s``. The prompt file
(``data.prompts``) defines the tasks (``_tasks``): each names its classes - the logits softmaxed over them
only - and the studies it is scored on (``sources``: substrings of the study's path, as HLIP's script picks
a task's studies by their source folder; empty = every study). A study's true class is the one its labels
mark (one-hot); a study whose class is not among the task's is left out of that task and counted.

Two classes: balanced accuracy at the argmax (the headline), weighted F1, recall and precision of the second
class, AUC of its probability. More classes: balanced accuracy at the argmax and the macro AUC over the
one-hot columns (one-vs-rest). ``mean_balanced_accuracy`` averages the two-class tasks (HLIP's anomaly
detection mean).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medvlp.datamodules.base import DataError
from medvlp.downstream.embed import embed_prompts
from medvlp.downstream.metrics import auroc
from medvlp.downstream.task import Task
from medvlp.registry import register_task


def load_class_prompts(path: Any) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """``({class: prompt}, {task: {"classes": [...], "sources": [...]}})`` of a class-prompt file, checked."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict) or raw.get("_mode") != "classes":
        raise DataError(f"Prompt file {path} is not a class-prompt file (_mode: classes).")
    template = str(raw.get("_template", "{}"))
    if "{}" not in template:
        raise DataError(f"Prompt file {path}: _template must contain {{}} where the class phrase goes, got {template!r}.")
    prompts = {str(k): template.format(str(v)) for k, v in raw.items() if not str(k).startswith("_")}
    tasks = raw.get("_tasks") or {}
    if not isinstance(tasks, dict) or not tasks:
        raise DataError(f"Prompt file {path} defines no _tasks (name: {{classes: [...], sources: [...]}}).")
    out = {}
    for name, task in tasks.items():
        classes = [str(c) for c in (task or {}).get("classes", [])]
        unknown = [c for c in classes if c not in prompts]
        if len(classes) < 2 or unknown:
            raise DataError(f"Prompt file {path}: task {name} needs two or more classes with prompts; "
                            f"got {classes} ({unknown} without a prompt).")
        out[str(name)] = {"classes": classes, "sources": [str(s) for s in (task or {}).get("sources", [])]}
    return prompts, out


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall over the classes present in ``truth`` (scikit-learn's ``balanced_accuracy_score``)."""
    classes = np.unique(truth)
    return float(np.mean([(pred[truth == c] == c).mean() for c in classes])) if len(classes) else float("nan")


def weighted_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """F1 per class weighted by its support (``f1_score(average="weighted")``)."""
    total = 0.0
    for c in np.unique(truth):
        tp, fp, fn = int(((pred == c) & (truth == c)).sum()), int(((pred == c) & (truth != c)).sum()), int(((pred != c) & (truth == c)).sum())
        total += (truth == c).sum() * (2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(total / max(len(truth), 1))


def score_task(probs: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Metrics of one task from its softmax ``probs`` ``[N, C]`` and true class indices ``truth`` ``[N]``."""
    pred = probs.argmax(1)
    out: dict[str, Any] = {"n": int(len(truth)), "balanced_accuracy": balanced_accuracy(pred, truth)}
    if probs.shape[1] == 2:
        tp, fp, fn = int(((pred == 1) & (truth == 1)).sum()), int(((pred == 1) & (truth == 0)).sum()), int(((pred == 0) & (truth == 1)).sum())
        out.update(f1_weighted=weighted_f1(pred, truth), recall=tp / (tp + fn) if tp + fn else 0.0,
                   precision=tp / (tp + fp) if tp + fp else 0.0, auroc=auroc(probs[:, 1], truth.astype(np.float64)))
    else:
        per = [auroc(probs[:, c], (truth == c).astype(np.float64)) for c in range(probs.shape[1])]
        valid = [v for v in per if not np.isnan(v)]
        out["auroc"] = float(np.mean(valid)) if valid else float("nan")
    return out


def zero_shot_classes(method: Any, dm: Any, emb: Any, max_length: int) -> dict[str, Any]:
    """Every task of ``dm``'s class-prompt file on the embeddings ``emb`` of a split."""
    prompts, tasks = load_class_prompts(dm.prompt_file())
    names = list(dm.label_names)
    if emb.labels is None:
        raise DataError("Zero-shot classification needs labels, but this split has none.")
    missing = [c for t in tasks.values() for c in t["classes"] if c not in names]
    if missing:
        raise DataError(f"{dm.prompt_file()} scores classes the dataset does not label: {sorted(set(missing))} "
                        f"(its labels: {names}).")
    classes = list(prompts)
    text = torch.stack([embed_prompts(method, [prompts[c]], max_length) for c in classes])  # [K, D]
    scale = 1.0 / float(method.temperature())
    logits = scale * (torch.nn.functional.normalize(emb.images.float(), dim=-1) @ text.T).numpy()  # [N, K]
    records = {r.study_id: r for r in dm.records(emb.split or "test")}
    paths = [str(records[s].meta.get("study", records[s].image_path)) if s in records else s for s in emb.study_ids]
    labels = emb.labels.numpy()
    result: dict[str, Any] = {"tasks": {}, "prompts": prompts, "logit_scale": scale}
    for name, task in tasks.items():
        cols = [classes.index(c) for c in task["classes"]]
        label_cols = [names.index(c) for c in task["classes"]]
        chosen = [i for i, p in enumerate(paths) if not task["sources"] or any(s in p for s in task["sources"])]
        sub = labels[chosen][:, label_cols]
        known = np.nan_to_num(sub, nan=0.0).sum(1) == 1  # the study's class is one of the task's
        rows = np.asarray(chosen, dtype=np.int64)[known]
        z = logits[rows][:, cols]
        probs = np.exp(z - z.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        res = score_task(probs, np.nan_to_num(sub[known], nan=0.0).argmax(1))
        res.update(classes=task["classes"], left_out=int((~known).sum()))
        result["tasks"][name] = res
    binary = [t["balanced_accuracy"] for t in result["tasks"].values() if len(t["classes"]) == 2 and t["n"]]
    result["mean_balanced_accuracy"] = float(np.mean(binary)) if binary else float("nan")
    return result


@register_task("zeroshot_classes")
class ZeroShotClassesTask(Task):
    """zero-shot classification into exclusive classes, one prompt per class (balanced accuracy, AUC)"""

    def evaluate(self, method: Any, dm: Any, emb: Any, cfg: Any) -> dict[str, Any]:
        return zero_shot_classes(method, dm, emb, int(cfg.data.max_length))

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        z = res["zeroshot_classes"]
        rows = [(f"{name} ({' / '.join(t['classes'])}, {t['n']} studies)",
                 f"{t['balanced_accuracy']:.3f}   AUC {t['auroc']:.3f}") for name, t in z["tasks"].items()]
        rows.append(("mean of the two-class tasks", f"{z['mean_balanced_accuracy']:.3f}"))
        return f"zero-shot classification on the {res['split']} split ({res['n']} studies)", rows, ("task", "balanced accuracy")


__all__ = ["ZeroShotClassesTask", "balanced_accuracy", "load_class_prompts", "score_task", "weighted_f1", "zero_shot_classes"]

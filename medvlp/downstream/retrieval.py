"""Image <-> report retrieval: recall@K in both directions through ``method.similarity``.

The gallery of reports is deduplicated by study (several images of one study share a report);
an image's query is correct when a report of its own study is in the top K.
"""

from __future__ import annotations

from typing import Any

import torch

from medvlp.downstream.embed import Embeddings
from medvlp.downstream.metrics import recall_at_k
from medvlp.downstream.task import Task
from medvlp.registry import register_task


def retrieval_recall(method, emb: Embeddings, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Any]:
    first: dict[str, int] = {}
    for i, sid in enumerate(emb.study_ids):
        first.setdefault(sid, i)
    txt_rows = list(first.values())
    txt_ids = [emb.study_ids[i] for i in txt_rows]
    with torch.no_grad():
        sim = method.similarity(emb.images, emb.texts[txt_rows]).float().cpu().numpy()
    i2t = recall_at_k(sim, emb.study_ids, txt_ids, ks)
    t2i = recall_at_k(sim.T, txt_ids, emb.study_ids, ks)
    return {
        "image_to_text": {f"R@{k}": v for k, v in i2t.items()},
        "text_to_image": {f"R@{k}": v for k, v in t2i.items()},
        "n_images": len(emb.study_ids),
        "n_reports": len(txt_ids),
        "chance_R@5_i2t": min(1.0, 5 / max(1, len(txt_ids))),
    }


@register_task("retrieval")
class RetrievalTask(Task):
    """image<->text retrieval (recall@1/5/10)"""

    def evaluate(self, method: Any, dm: Any, emb: Embeddings, cfg: Any) -> dict[str, Any]:
        return retrieval_recall(method, emb)

    def rows(self, res: dict[str, Any]) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
        r = res["retrieval"]
        title = (f"retrieval on the {res['split']} split ({r['n_images']} images, {r['n_reports']} reports; "
                 f"chance R@5 = {r['chance_R@5_i2t']:.3f})")
        rows = [(d.replace("_", " "), "  ".join(f"{k} {v:.3f}" for k, v in r[d].items()))
                for d in ("image_to_text", "text_to_image")]
        return title, rows, ("direction", "recall")


"""HLIP's Pub-Brain-5 protocol (hlip.md §7.3): one prompt per class, tasks over subsets of classes and sources."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medvlp import config as C
from medvlp.datamodules.base import DataError
from medvlp.downstream import zero_shot_classes as Z
from medvlp.downstream.embed import Embeddings

CLASSES = ["Normal", "Stroke", "Glioma", "Meningioma", "Metastasis"]


def test_metrics_by_hand():
    truth = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 1, 0, 1, 0])
    assert math.isclose(Z.balanced_accuracy(pred, truth), (2 / 3 + 1 / 2) / 2)
    f1_0, f1_1 = 2 * 2 / (2 * 2 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 1)  # class 0: tp 2, fp 1, fn 1; class 1: tp 1, fp 1, fn 1
    assert math.isclose(Z.weighted_f1(pred, truth), (3 * f1_0 + 2 * f1_1) / 5)
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    res = Z.score_task(probs, truth)
    assert res["n"] == 5 and res["recall"] == 0.5 and res["precision"] == 0.5
    assert math.isclose(res["auroc"], 5 / 6)  # positives 0.7, 0.45 vs negatives 0.1, 0.6, 0.2: 5 of 6 pairs ordered
    three = Z.score_task(np.eye(3)[[0, 1, 2, 2]] * 0.8 + 0.1, np.array([0, 1, 2, 1]))
    assert math.isclose(three["balanced_accuracy"], (1 + 0.5 + 1) / 3) and "recall" not in three


def test_the_hlip_prompt_file_and_preset():
    prompts, tasks = Z.load_class_prompts(C.config_dir() / "prompts" / "hlip_pub_brain5.yaml")
    assert prompts["Stroke"] == "This MRI study shows: Acute stroke." and prompts["Normal"].endswith("No significant abnormalities.")
    assert list(tasks) == ["stroke", "glioma", "meningioma", "metastasis", "tumor", "disease"]
    assert tasks["metastasis"] == {"classes": ["Normal", "Metastasis"], "sources": ["metastasis", "nyu_mets", "ucsf_mets", "open_bhb"]}
    assert tasks["tumor"]["classes"] == ["Glioma", "Meningioma", "Metastasis"] and tasks["disease"]["sources"] == []
    from medvlp.downstream.protocols import resolve

    assert resolve("hlip", "zeroshot_classes", "pub_brain5", 1).data["prompts"] == "hlip_pub_brain5.yaml"


def test_tasks_pick_their_studies_and_softmax_over_their_classes(monkeypatch, tmp_path):
    # studies: (source folder, class); image embedding = the one-hot of the class it looks like
    studies = [("open_bhb/a", 0, 0), ("open_bhb/b", 0, 1), ("stroke/c", 1, 1), ("stroke/d", 1, 1),
               ("brats23/adult_glioma/e", 2, 2), ("nyu_mets/f", 4, 4), ("brats23/adult_meningioma/g", 3, 4)]
    images = torch.eye(5)[[s[2] for s in studies]]
    labels = torch.eye(5)[[s[1] for s in studies]]
    emb = Embeddings(images, images, [f"s{i}" for i in range(len(studies))], labels, split="test")
    records = [SimpleNamespace(study_id=f"s{i}", image_path=[], meta={"study": f"/data/pub_brain_5/{s[0]}"})
               for i, s in enumerate(studies)]
    prompt_file = C.config_dir() / "prompts" / "hlip_pub_brain5.yaml"
    dm = SimpleNamespace(label_names=CLASSES, prompt_file=lambda: prompt_file, records=lambda split: records)
    order = list(Z.load_class_prompts(prompt_file)[0])
    monkeypatch.setattr(Z, "embed_prompts", lambda method, texts, n: torch.eye(5)[order.index(
        next(c for c, p in Z.load_class_prompts(prompt_file)[0].items() if p == texts[0]))])
    method = SimpleNamespace(temperature=lambda: 0.1)
    res = Z.zero_shot_classes(method, dm, emb, 16)
    t = res["tasks"]
    assert t["stroke"]["n"] == 4 and t["stroke"]["balanced_accuracy"] == 0.75  # open_bhb/b looks like a stroke
    assert t["glioma"]["n"] == 3 and t["glioma"]["left_out"] == 0  # open_bhb a, b + the glioma
    assert t["metastasis"]["n"] == 3  # open_bhb a, b + nyu_mets (the meningioma is not from a metastasis source)
    assert t["tumor"]["n"] == 3 and math.isclose(t["tumor"]["balanced_accuracy"], (1 + 0 + 1) / 3)
    assert t["disease"]["n"] == 7 and t["meningioma"]["n"] == 3
    binary = [t[k]["balanced_accuracy"] for k in ("stroke", "glioma", "meningioma", "metastasis")]
    assert math.isclose(res["mean_balanced_accuracy"], float(np.mean(binary)))
    assert res["logit_scale"] == 10.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("_mode: classes\n_tasks: {x: {classes: [Normal, Tumour]}}\nNormal: fine\n")
    with pytest.raises(DataError, match=r"task x needs two or more classes with prompts"):
        Z.load_class_prompts(bad)


def test_head_ct_cosine_scoring(monkeypatch, tmp_path):
    """HLIP's RSNA protocol (hlip.md §7.4): the score is the plain cosine with the label's one prompt."""
    from medvlp.downstream import zero_shot as ZS
    from medvlp.downstream.protocols import resolve

    path = C.config_dir() / "prompts" / "hlip_rsna_ich.yaml"
    prompts = ZS.load_prompts(path)
    assert ZS.load_options(path)["score"] == "cosine" and prompts["subdural"]["negative"] == []
    assert prompts["any"]["positive"] == ["This CT study shows: intracranial hemorrhage."]
    assert resolve("hlip", "zeroshot", "rsna_ich", 1).data["eval_labels"] == [
        "any", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
    text = {"This CT study shows: intracranial hemorrhage.": torch.tensor([1.0, 0.0])}
    monkeypatch.setattr(ZS, "embed_prompts", lambda method, texts, n: text[texts[0]])
    method = SimpleNamespace(similarity=lambda img, txt: img @ txt.T)
    emb = Embeddings(torch.tensor([[0.6, 0.8], [1.0, 0.0]]), torch.zeros(2, 2), ["a", "b"], None)
    scores, _ = ZS.prompt_scores(method, emb, ["any"], prompts, 16, score="cosine")
    np.testing.assert_allclose(scores["any"], [0.6, 1.0])
    bad = tmp_path / "bad.yaml"
    bad.write_text("_score: sum\n")
    with pytest.raises(DataError, match="_score one of"):
        ZS.load_options(bad)

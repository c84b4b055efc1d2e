import math

import numpy as np

from medvlp.downstream.metrics import auroc, recall_at_k


def test_auroc_hand_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert auroc([0.2, 0.9, 0.5], [0, np.nan, 1]) == 1.0  # unknown labels are left out
    assert math.isnan(auroc([0.2, 0.3], [1, 1]))


def test_recall_at_k_hand_values():
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.1], [0.1, 0.2, 0.3]])
    r = recall_at_k(sim, ["a", "b", "c"], ["a", "b", "c"], ks=(1, 2))
    assert r[1] == 2 / 3 and r[2] == 1.0
    # duplicated study ids: any gallery item of the same study counts
    r = recall_at_k(np.array([[0.1, 0.9]]), ["a"], ["b", "a"], ks=(1,))
    assert r[1] == 1.0


def test_thresholded_report_by_hand():
    """fVLM / HLIP: the threshold closest to the ROC corner, then accuracy, precision, recall and
    support-weighted F1 there."""
    import numpy as np

    from medvlp.downstream.metrics import binary_report, youden_like_threshold

    probs = np.array([0.9, 0.8, 0.35, 0.3, 0.1])
    y = np.array([1, 1, 0, 1, 0], dtype=float)
    t = youden_like_threshold(probs, y)
    # t in (0.1, 0.3] gives TPR 1, FPR 0.5 (d = 0.5); t in (0.35, 0.8] gives TPR 2/3, FPR 0 (d = 1/3): the latter wins
    assert 0.35 < t <= 0.8 and abs(t - np.linspace(0, 1, 100)[35]) < 1e-12
    rep = binary_report(probs >= t, y)
    assert rep["accuracy"] == 0.8 and rep["precision"] == 1.0 and abs(rep["recall"] - 2 / 3) < 1e-12
    f1_pos, f1_neg = 2 * 2 / (2 * 2 + 0 + 1), 2 * 2 / (2 * 2 + 1 + 0)
    assert abs(rep["f1_weighted"] - (3 * f1_pos + 2 * f1_neg) / 5) < 1e-12
    nan = binary_report(np.array([1, 0, 1]), np.array([1.0, np.nan, 0.0]))
    assert nan["accuracy"] == 0.5 and nan["precision"] == 0.5 and nan["recall"] == 1.0

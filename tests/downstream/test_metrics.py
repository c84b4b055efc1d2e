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

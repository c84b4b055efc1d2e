"""fVLM measurably learns the synthetic chest CT - and the same checks fail untrained - and, trained for the
same number of steps on the same scans, beats CLIP on findings that live in one anatomy.

The world draws every finding inside one anatomy's label (cardiomegaly: heart; effusion, nodules,
consolidation, emphysema: lung; wall calcification: aorta; hiatal hernia: esophagus), so pooling the
tokens of that anatomy and aligning them with that anatomy's part of the report isolates the signal
that a whole-volume embedding shares with everything else in the scan. Both runs are session-shared
learning runs (``tests/learning.py``); about a minute and a half each on 2 idle cores.
"""

import numpy as np
import pytest


def test_fvlm_learns_the_ct_demo(learned):
    r = learned["fvlm"]
    r.assert_learned()
    assert r.cfg.data.anatomy_text == "fvlm" and r.cfg.method.anatomies == ["lung", "heart", "esophagus", "aorta"]


@pytest.mark.slow  # about 40 s: a second 300-step run (CLIP on the same scans); the fVLM learning test above is in the default suite
def test_fvlm_beats_clip_trained_for_the_same_steps_on_single_anatomy_findings(learned):
    fvlm, clip = learned["fvlm"], learned["clip_vs_fvlm"]
    assert clip.cfg.trainer.max_steps == fvlm.cfg.trainer.max_steps
    a, b = fvlm.after["zeroshot"]["auroc"], clip.after["zeroshot"]["auroc"]
    assert set(a) == set(b) and len(a) == 7
    print("fVLM", {k: round(v, 3) for k, v in a.items()}, "\nCLIP", {k: round(v, 3) for k, v in b.items()})
    wins = [k for k in a if a[k] > b[k]]
    assert np.mean(list(a.values())) > np.mean(list(b.values())) + 0.05, (a, b)
    assert len(wins) >= 5, f"fVLM beats CLIP on {wins} only"

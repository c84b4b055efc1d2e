"""MedBLIP measurably learns the synthetic ADNI-style cohort, and the same check fails untrained.

The world draws the diagnosis into the volumes (ventricles, the CSF rim and the hippocampi change from CN
to MCI to AD; head size, position and intensity do not), so the volume alone tells the class. Zero-shot in
the ITC mode (spec §6.2: the best-matching query against the three QA strings, no LLM) reaches 0.94 on the
balanced ADNI test list after 200 steps (the session-shared learning run of ``tests/learning.py``, about
25 s on 2 idle cores); untrained it predicts one class for every volume. The generation mode runs through
the frozen random stand-in LLM, so its answers rarely name a class: its parse rate is reported, not asserted
high; with a real LLM it is the paper's mode.
"""

from medvlp import api
from medvlp.downstream.generative import zero_shot_diagnosis


def test_medblip_learns_the_diagnosis_from_the_volumes(learned):
    r = learned["medblip"]
    dm = api.build_datamodule(r.cfg, tokenizer=r.untrained.tokenizer)
    before = zero_shot_diagnosis(r.untrained, dm.eval_dataloader("test"), list(dm.label_names), modes=("itc",))
    after = r.after["zeroshot"]
    itc0, itc = before["modes"]["itc"], after["modes"]["itc"]
    gen = after["modes"]["generate"]
    print(f"MedBLIP zero-shot on {after['n']} ADNI-test volumes: ITC accuracy {itc0['accuracy']:.3f} untrained -> "
          f"{itc['accuracy']:.3f} (balanced {itc['balanced_accuracy']:.3f}, mean AUROC {after['mean_auroc']:.3f}); "
          f"rank {after['modes']['rank']['accuracy']:.3f}; generation parse rate {gen['parse_rate']:.3f} "
          f"({gen['unparsed']} unparsed), e.g. {gen['examples'][:2]}")
    counts = [sum(row) for row in itc["confusion"]]
    assert after["n"] == 90 and max(counts) == min(counts), counts  # 3 balanced classes
    assert itc0["accuracy"] < 0.45 and itc0["balanced_accuracy"] < 0.45, itc0  # chance is 1/3
    assert itc["accuracy"] >= 0.6 and itc["balanced_accuracy"] >= 0.6, itc
    assert 0.0 <= gen["parse_rate"] <= 1.0 and gen["unparsed"] == round((1 - gen["parse_rate"]) * gen["n"])

"""medvlp reproduce: every row of G2D's Tables 1-3 with the paper's numbers (g2d.md §8), the table file, and
cells computed on the demo world under the G2D protocol."""

from __future__ import annotations

import math

import pytest

from medvlp.cli import main
from medvlp.reproduce import Cell, parse_roots, plan, reproduce, write_table

# g2d.md §8.1, §8.3, §8.4: row -> {column: paper value}
G2D = {
    "SIIM Dice, encoder transfer": {"1 %": 62.6, "10 %": 63.1, "100 %": 66.8},
    "SIIM Dice, encoder + decoder transfer": {"1 %": 65.6, "10 %": 66.9, "100 %": 68.4},
    "RSNA Dice, encoder transfer": {"1 %": 70.9, "10 %": 72.6, "100 %": 75.1},
    "RSNA Dice, encoder + decoder transfer": {"1 %": 72.8, "10 %": 73.4, "100 %": 76.9},
    "RSNA detection mAP": {"1 %": 15.9, "10 %": 21.7, "100 %": 27.2},
    "Object-CXR detection mAP": {"1 %": 3.8, "10 %": 13.1, "100 %": 20.4},
    "RSNA classification": {"AUC": 87.6, "F1": 64.8, "ACC": 81.5},
    "SIIM classification": {"AUC": 89.7, "F1": 69.3, "ACC": 85.4},
    "ChestX-ray14 classification": {"AUC": 79.4, "F1": 33.1, "ACC": 82.3},
    "CheXpert classification": {"AUC": 91.2, "F1": 65.6},
    "SIIM grounding": {"Recall": 37.7, "IoU": 3.9, "Dice": 5.1},
    "RSNA grounding": {"Recall": 88.4, "IoU": 33.5, "Dice": 47.7},
    "ChestX-ray14": {"1 %": 79.1, "10 %": 81.1, "100 %": 83.1},
}


def test_plan_has_every_row_of_g2d_tables_1_to_3_with_the_papers_numbers():
    cells = plan("g2d", demo=True, roots={})
    got: dict[str, dict[str, float]] = {}
    for c in cells:
        got.setdefault(c.row, {})[c.column] = c.paper
    assert got == G2D
    tables = list(dict.fromkeys(c.table for c in cells))
    assert [t.split(":")[0] for t in tables] == ["Table 1", "Table 2", "Table 3"]
    enc_dec = [c for c in cells if "encoder + decoder" in c.row]
    assert enc_dec and all(c.spec["settings"] == {"decoder": "pretrained"} for c in enc_dec)
    assert {c.spec["data"] for c in cells if c.row.startswith("SIIM")} == {"demo_siim"}
    real = plan("g2d", demo=False, roots=parse_roots(["siim_pneumothorax=/data/siim"]))
    assert {c.row for c in real if c.status == "pending"} == {r for r in G2D if r.startswith("SIIM")}
    assert all(c.status.startswith("skipped: no --roots entry") for c in real if not c.row.startswith("SIIM"))
    assert len(plan("g2d", True, {}, fractions=[0.1], rows=["grounding"])) == 6  # evaluation rows have no fraction


def test_table_lists_paper_ours_and_difference(tmp_path):
    cells = [Cell("Table 1: x", "SIIM Dice, encoder transfer", "1 %", 62.6, ours=60.1, status="done"),
             Cell("Table 1: x", "SIIM Dice, encoder transfer", "10 %", 63.1, status="failed: ValueError: boom"),
             Cell("Table 2: y", "SIIM grounding", "Dice", 5.1, ours=7.3, status="done")]
    text = write_table("g2d", cells, tmp_path / "t" / "table.md", tmp_path / "run", demo=True)
    assert "| SIIM Dice, encoder transfer | 1 % | 62.6 | 60.1 | -2.5 | done |" in text
    assert "| SIIM Dice, encoder transfer | 10 % | 63.1 | - | - | failed: ValueError: boom |" in text
    assert "| SIIM grounding | Dice | 5.1 | 7.3 | +2.2 | done |" in text
    assert "## Table 2: y" in text and (tmp_path / "t" / "table.md").read_text() == text
    with pytest.raises(Exception, match="expected DATASET=PATH"):
        parse_roots(["siim"])


def test_reproduce_cells_on_the_demo(runs, tmp_path, capsys):
    """The encoder-decoder segmentation row (G2D's pretrained decoder) at 1 % and zero-shot RSNA, through the CLI."""
    rc = main(["reproduce", "--paper", "g2d", "--demo", "--run", str(runs["g2d"]), "--out", str(tmp_path / "g2d"),
               "--rows", "SIIM Dice, encoder + decoder", "RSNA classification", "--fractions", "0.01", "--max-steps", "2"])
    assert rc == 0
    text = (tmp_path / "g2d" / "table.md").read_text()
    assert "| SIIM Dice, encoder + decoder transfer | 1 % | 65.6 |" in text and "| RSNA classification | AUC | 87.6 |" in text
    assert "failed" not in text and text.count("| done |") == 4, text
    assert "4 of 4 cells computed" in capsys.readouterr().out
    path, cells = reproduce("g2d", run=runs["g2d"], out=tmp_path / "g2d", demo=True, fractions=[0.01], max_steps=2,
                            rows=["SIIM Dice, encoder + decoder"])  # finished cells are read back, not run again
    assert path.is_file() and all(c.status == "done" and not math.isnan(c.ours) for c in cells)


@pytest.mark.slow  # every cell of Tables 1-3 on the demo world (about 3 minutes)
def test_make_reproduce_g2d_on_the_demo_writes_every_row(runs, tmp_path):
    path, cells = reproduce("g2d", run=runs["g2d"], out=tmp_path / "g2d", demo=True, max_steps=2)
    text = path.read_text()
    assert all(f"| {row} |" in text for row in G2D)
    assert [c for c in cells if c.status != "done"] == [], [c.status for c in cells if c.status != "done"]


# mgca.md §8.1 (ResNet-50 and ViT-B/16 rows) and §8.2 (ResNet-50): row -> {column: paper value}; None: not reported
MGCA = {
    "ResNet-50: CheXpert AUC": {"1 %": 87.6, "10 %": 88.0, "100 %": 88.2},
    "ResNet-50: RSNA AUC": {"1 %": 88.6, "10 %": 89.1, "100 %": 89.9},
    "ResNet-50: COVIDx ACC": {"1 %": 72.0, "10 %": 83.5, "100 %": 90.5},
    "ViT-B/16: CheXpert AUC": {"1 %": 88.8, "10 %": 89.1, "100 %": 89.7},
    "ViT-B/16: RSNA AUC": {"1 %": 89.1, "10 %": 89.9, "100 %": 90.8},
    "ViT-B/16: COVIDx ACC": {"1 %": 74.8, "10 %": 84.8, "100 %": 92.3},
    "RSNA detection mAP": {"1 %": 12.9, "10 %": 16.8, "100 %": 24.9},
    "Object-CXR detection mAP": {"1 %": None, "10 %": 12.1, "100 %": 19.2},
    "SIIM segmentation Dice": {"1 %": 49.7, "10 %": 59.3, "100 %": 64.2},
    "RSNA segmentation Dice": {"1 %": 63.0, "10 %": 68.3, "100 %": 69.8},
}
# hlip.md §8
HLIP = {
    "Rad-ChestCT (external)": {"AUC": 72.3, "ACC": 68.4, "weighted F1": 72.1, "recall": 66.7, "precision": 40.4},
    "CT-RATE (internal)": {"AUC": 78.7},
    "Pub-Brain-5": {"stroke": 91.5, "glioma": 89.2, "meningioma": 79.2, "metastasis": 78.1, "mean": 84.5},
    "RSNA ICH": {"IPH": 88.2, "IVH": 91.4, "SAH": 84.1, "SDH": 83.4, "any": 81.5, "mean": 85.7},
    "CQ500": {"AUC": 83.1},
}


def table_of(cells):
    got: dict[str, dict[str, float | None]] = {}
    for c in cells:
        got.setdefault(c.row, {})[c.column] = None if math.isnan(c.paper) else c.paper
    return got


def test_mgca_and_hlip_tables_have_every_row_with_the_papers_numbers():
    mgca = plan("mgca", demo=True, roots={})
    assert table_of(mgca) == MGCA
    assert {c.spec["model"] for c in mgca if c.row.startswith("ViT")} == {"vit"}
    assert {c.spec["model"] for c in mgca if not c.row.startswith("ViT")} == {"resnet50"}
    assert {c.spec["metric"] for c in mgca if "COVIDx" in c.row} == {"accuracy"}
    assert {c.spec["metric"] for c in mgca if "detection" in c.row} == {"map_mgca"}
    hlip = plan("hlip", demo=True, roots={})
    assert table_of(hlip) == HLIP
    keys = {c.column: c.spec["key"] for c in hlip if c.row == "RSNA ICH"}
    assert keys["IPH"] == "zeroshot.auroc.intraparenchymal" and keys["mean"] == "zeroshot.mean_auroc"
    assert {c.spec["key"] for c in hlip if c.row == "Pub-Brain-5" and c.column == "mean"} == \
        {"zeroshot_classes.mean_balanced_accuracy"}
    assert {c.status for c in hlip} == {"pending"}
    assert {c.spec["demo_world"] for c in hlip if c.row == "RSNA ICH"} == {"rsna_ich"}
    assert {c.spec["model"] for c in hlip} == {"chest_ct", "brain_mri", "head_ct"}


def test_a_run_serves_only_the_rows_of_its_model(runs, tmp_path, capsys):
    """MGCA's demo run is a ViT: its ViT row is computed, the ResNet-50 rows are listed as skipped (the
    detection head reads CNN layers), with the --run to give; a model name the paper lacks is an error."""
    from medvlp.config import ConfigError
    from medvlp.reproduce import parse_runs

    rc = main(["reproduce", "--paper", "mgca", "--demo", "--run", str(runs["mgca"]), "--out", str(tmp_path / "m"),
               "--rows", "COVIDx", "RSNA detection", "--fractions", "0.01", "--max-steps", "2"])
    assert rc == 0
    text = (tmp_path / "m" / "table.md").read_text()
    assert "| ViT-B/16: COVIDx ACC | 1 % | 74.8 |" in text and text.count("| done |") == 1, text
    assert ("| RSNA detection mAP | 1 % | 12.9 | - | - | skipped: the run's image encoder is a ViT, this row is the MGCA "
            "ResNet-50 model's (--run resnet50=RUN_DIR) |") in text
    assert "| ResNet-50: COVIDx ACC | 1 % | 72.0 | - | - | skipped: the run's image encoder is a ViT" in text
    assert "1 of 3 cells computed" in capsys.readouterr().out
    assert parse_runs([f"vit={runs['mgca']}"], "mgca") == {"vit": runs["mgca"]}
    assert parse_runs([str(runs["mgca"])], "mgca") == runs["mgca"]
    with pytest.raises(ConfigError, match="mgca has no model 'resnet'; its models: resnet50, vit"):
        parse_runs(["resnet=/x"], "mgca")
    path, cells = reproduce("mgca", run={"resnet50": runs["g2d"]}, out=tmp_path / "n", rows=["ViT-B/16: CheXpert"])
    assert {c.status for c in cells} == {"skipped: no --roots entry for chexpert"}


@pytest.mark.slow  # the HLIP run and the Rad-ChestCT format example (the plan test covers every row in the default suite)
def test_hlip_rows_run_on_the_format_examples(runs, tmp_path):
    """An evaluation-only set (Rad-ChestCT) on its synthetic format example, under the HLIP protocol; rows of a
    model with no run (brain MRI) are skipped and say which --run to give."""
    from medvlp.reproduce import model_runs

    path, cells = reproduce("hlip", run={"chest_ct": runs["hlip"]}, out=tmp_path / "h", demo=True, rows=["Rad-ChestCT"])
    assert len(cells) == 5 and all(c.status.startswith("done") for c in cells), [c.status for c in cells]
    assert not math.isnan(next(c.ours for c in cells if c.column == "ACC"))
    assert "HLIP (CT-RATE): `" in path.read_text()
    brain = plan("hlip", demo=False, roots={"pub_brain5": "/data/pub-brain-5"}, rows=["Pub-Brain-5"])
    assert model_runs("hlip", brain, {"chest_ct": runs["hlip"]}, demo=False, runs=tmp_path, pretrain_steps=1) == {}
    assert {c.status for c in brain} == {"skipped: no --run for the HLIP (brain MRI) model (--run brain_mri=RUN_DIR)"}

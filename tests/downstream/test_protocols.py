"""Protocol presets (configs/protocol/*.yaml) pinned value by value against the specs, and their plumbing."""

from __future__ import annotations

import pytest

from medvlp import api
from medvlp import config as C
from medvlp.downstream.protocols import load_protocol, protocol_names, resolve
from medvlp.downstream.zero_shot import load_options, load_prompts

LINEAR_MGCA = {"probe": "adamw", "lr": 5e-4, "batch_size": 48, "weight_decay": 1e-6, "betas": [0.9, 0.999], "max_epochs": 50,
               "patience": 10, "min_steps": 0, "standardize": False, "augment": True}  # mgca.md 7.2: raw features, the
# papers' stopping rule, the head trained on random 224 crops of the 256 letterbox (through the frozen encoder)
CROP_MGCA = {"image_size": 224, "crop_from": 256, "aug_degrees": 0.0, "aug_translate": 0.0, "aug_scale": [1.0, 1.0]}


def test_presets_exist_and_load():
    assert {"mgca", "g2d", "hlip", "fvlm"} <= set(protocol_names())
    for name in protocol_names():
        p = load_protocol(name)
        assert p.spec.startswith("specs/methods/") and p.follows in ("paper", "code") and p.tasks


def test_g2d_preset_values():  # g2d.md 7.1-7.4, 7.6
    assert resolve("g2d", "classification", "chexpert", 0.01).settings == {**LINEAR_MGCA, "batch_size": 8}
    for data in ("chexpert", "rsna_pneumonia", "covidx"):
        r = resolve("g2d", "classification", data, 0.1)
        assert r.mode == "linear" and r.data == CROP_MGCA and r.settings["batch_size"] == 8
    ft = resolve("g2d", "classification", "nih14", 1.0)  # 7.6: KAD's setup
    assert ft.mode == "finetune" and ft.data["image_size"] == 256 and ft.data["crop_from"] == 0
    assert ft.settings == {"lr": 1e-4, "batch_size": 64, "weight_decay": 1e-6, "betas": [0.9, 0.999], "max_epochs": 50,
                           "patience": 10, "min_steps": 0}
    seg = {"lr": 2e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "max_epochs": 50, "patience": 10, "min_steps": 0,
           "decoder": "fresh", "bn": "train"}
    siim, rsna = resolve("g2d", "segmentation", "siim_pneumothorax", 0.01), resolve("g2d", "segmentation", "rsna_pneumonia", 1)
    assert siim.mode == rsna.mode == "frozen" and siim.data == {"image_size": 224}
    assert siim.settings == {**seg, "batch_size": 8} and rsna.settings == {**seg, "batch_size": 16}
    det = {"detector": "yolov3", "weight_decay": 1e-6, "betas": [0.9, 0.999], "max_epochs": 50, "patience": 10, "min_steps": 0, "bn": "train",
           "val_metric": "map_mgca"}
    for data in ("rsna_pneumonia", "object_cxr"):
        r1, r10, r100 = (resolve("g2d", "detection", data, f) for f in (0.01, 0.1, 1.0))
        assert r1.settings == {**det, "batch_size": 8, "lr": 2e-4}  # G2D's appendix: 2e-4 for both datasets at 1 %
        assert r10.settings == r100.settings == {**det, "batch_size": 16, "lr": 5e-4}
        assert r1.mode == "frozen" and r1.metric == "map_mgca"
    zs = resolve("g2d", "zeroshot", "rsna_pneumonia", 1.0)
    assert zs.data == {"image_size": 224, "prompts": "g2d_cxr.yaml", "threshold_split": "", "crop_from": 256}  # 7.4: 256, crop 224


def test_mgca_preset_values():  # mgca.md 7.2-7.4
    assert resolve("mgca", "classification", "chexpert", 0.01).settings == LINEAR_MGCA
    assert resolve("mgca", "classification", "covidx", 1).data == CROP_MGCA  # 7.2: 256, (random) crop 224
    assert "crop_from" not in resolve("mgca", "segmentation", "siim_pneumothorax", 1).data  # 7.3-7.4: straight to 224
    seg = resolve("mgca", "segmentation", "siim_pneumothorax", 0.1)
    assert seg.settings == {"lr": 5e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "max_epochs": 50, "patience": 10,
                            "min_steps": 0, "decoder": "fresh", "bn": "train", "batch_size": 8}
    assert resolve("mgca", "segmentation", "rsna_pneumonia", 0.1).settings["batch_size"] == 16
    assert resolve("mgca", "detection", "rsna_pneumonia", 0.01).settings["lr"] == 2e-4
    assert resolve("mgca", "detection", "object_cxr", 0.01).settings["lr"] == 2.5e-4  # the scripts' Object-CXR value
    assert resolve("mgca", "detection", "object_cxr", 0.1).settings["lr"] == 5e-4
    assert resolve("mgca", "detection", "object_cxr", 1).settings["batch_size"] == 16
    assert resolve("mgca", "detection", "object_cxr", 1).metric == "map_mgca"
    with pytest.raises(C.ConfigError, match="protocol 'mgca' has no zeroshot protocol"):
        resolve("mgca", "zeroshot", "chexpert", 1)


def test_ct_presets_and_prompts():
    sixteen = resolve("hlip", "zeroshot", "ct_rate", 1).data["eval_labels"]
    assert len(sixteen) == 16 and "Medical material" not in sixteen and "Lymphadenopathy" not in sixteen
    assert resolve("hlip", "zeroshot", "rad_chestct", 1).data["prompts"] == "hlip_rad_chestct.yaml"
    assert resolve("fvlm", "zeroshot", "ct_rate", 1).data["prompts"] == "fvlm_ct_rate.yaml"
    assert resolve("fvlm", "zeroshot", "ct_rate", 1).data["eval_labels"] == sixteen
    for name in ("hlip", "fvlm"):
        assert resolve(name, "zeroshot", "ct_rate", 1).data["eval_batch_size"] == 1
    ich = resolve("hlip", "zeroshot", "rsna_ich", 1).data  # hlip.md 7.4: every labelled study, cosine, five labels
    assert ich["test_fraction"] == 1.0 and ich["val_fraction"] == 0.0 and ich["prompts"] == "hlip_rsna_ich.yaml"
    assert ich["eval_labels"] == ["any", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
    cq = resolve("hlip", "zeroshot", "cq500", 1).data  # 7.4: 11 labels, 18 templates each, plain cosine
    assert cq["eval_labels"] == ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
                                 "Fracture", "MassEffect", "MidlineShift"]
    path = C.config_dir() / "prompts" / cq["prompts"]
    prompts = load_prompts(path)
    assert list(prompts) == cq["eval_labels"] and load_options(path)["score"] == "cosine"
    assert all(len(p["positive"]) == 18 and not p.get("negative") for p in prompts.values())
    assert prompts["Fracture"]["positive"][0] == "This study shows: skull fracture."
    assert prompts["EDH"]["positive"][-1] == "This study shows: compatible with extradural hemorrhage."
    g2d = C.config_dir() / "prompts" / "g2d_cxr.yaml"
    prompts = load_prompts(g2d)
    assert load_options(g2d)["threshold"] == "argmax"
    assert prompts["Pneumonia"] == {"positive": ["pneumonia"], "negative": ["no pneumonia"]}
    assert all(len(p["positive"]) == len(p["negative"]) == 1 for p in prompts.values())


def test_bad_presets_are_named(tmp_path, monkeypatch):
    with pytest.raises(C.ConfigError, match="protocol 'nope' is not a preset"):
        load_protocol("nope")
    folder = tmp_path / "configs"
    (folder / "protocol").mkdir(parents=True)
    (folder / "protocol" / "bad.yaml").write_text("spec: specs/methods/x.md\ntasks:\n  segmentation: {mode: frozn}\n")
    monkeypatch.setattr(C, "config_dir", lambda: folder)
    with pytest.raises(C.ConfigError, match=r"tasks.segmentation.mode 'frozn' is not one of"):
        load_protocol("bad")
    (folder / "protocol" / "bad.yaml").write_text("tasks:\n  detection: {by_fraction: {'2': {}}}\n")
    with pytest.raises(C.ConfigError, match="by_fraction key '2' is not a label fraction"):
        load_protocol("bad")


def test_g2d_code_preset_run_transfers_at_224():
    """The G2D code preset pre-trains at 256 px; under the G2D protocol every transfer runs at 224 px."""
    run_cfg = C.compose(config_file=str(C.config_dir() / "experiment" / "g2d_code_mimic.yaml"), overrides=["data.root=/x"])
    assert run_cfg.data.image_size == 256
    mode, preset, data, settings, metric = api.downstream_plan("segmentation", "demo_siim", 0.1, "g2d", [], {"lr": 1e-3})
    assert (mode, preset, settings["lr"], settings["bn"]) == ("frozen", "g2d", 1e-3, "train")  # the user's lr wins
    _, cfg = api.downstream_datamodule(run_cfg, "demo_siim", [], 0.1, None, "segmentation", data)
    assert cfg.data.image_size == 224
    _, cfg = api.downstream_datamodule(run_cfg, "demo_siim", [], 0.1, None, "segmentation")
    assert cfg.data.image_size == 256  # without a preset: the run's size
    _, cfg = api.downstream_datamodule(run_cfg, "demo_siim", ["data.image_size=64"], 0.1, None, "segmentation", data)
    assert cfg.data.image_size == 64  # the user's override wins over the preset
    mode, preset, *_ = api.downstream_plan("classification", "demo_chexpert", 0.1, "linear", [], {})
    assert (mode, preset) == ("linear", "")


def test_detection_and_segmentation_settings_of_the_presets_are_checked():
    from medvlp.downstream import detection, segmentation

    s = detection.settings_for(0.01, "object_cxr", **resolve("mgca", "detection", "object_cxr", 0.01).settings)
    assert (s.detector, s.bn, s.val_metric, s.lr, s.batch_size) == ("yolov3", "train", "map_mgca", 2.5e-4, 8)
    with pytest.raises(ValueError, match="val_metric='mAP' is not one of"):
        detection.settings_for(1.0, val_metric="mAP")
    seg = segmentation.settings_for(**resolve("g2d", "segmentation", "siim_pneumothorax", 1).settings)
    assert (seg.decoder, seg.bn, seg.lr, seg.weight_decay) == ("fresh", "train", 2e-4, 0.05)
    with pytest.raises(ValueError, match="decoder='frozen' is not one of"):
        segmentation.settings_for(decoder="frozen")

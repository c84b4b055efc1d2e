"""``medvlp import``: the authors' released checkpoints of MGCA, G2D and HLIP as run directories.

* The official key layouts (``tests/fixtures/official_keys/*.json``, dumped from the official model classes;
  provenance in the README there) map completely onto medvlp's full-size models: every official key is
  renamed, combined or ignored by design, every medvlp key is filled, shapes agree.
* Official-layout checkpoints at the sizes of small encoders (the fixtures' names, random values) import
  into run directories that ``api.load_run`` reads and that evaluate; their forward pass equals the one of a
  model whose tensors were placed by hand under the official names (G2D's attention pool: the official
  ``nn.MultiheadAttention`` + ``c_proj`` computation itself).
* Missing, unknown and wrong-shape keys give an error naming them; a checkpoint that needs full unpickling
  is refused unless trusted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medvlp import api
from medvlp.importer import (
    LAYOUTS,
    ImportMappingError,
    UntrustedCheckpointError,
    add_parser,
    build_offline,
    cmd_import,
    import_checkpoint,
    import_config,
    map_state_dict,
    official_shapes,
    read_official,
    unwrap,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official_keys"

# fixture -> (method, variant, the full-size text model's vocabulary)
FULL = {"mgca_vit": ("mgca", "vit", 28996), "mgca_resnet": ("mgca", "resnet", 28996), "g2d": ("g2d", "resnet50_unet", 28996),
        "hlip_ctrate": ("hlip", "chest_ct", 30522), "hlip_brainmri": ("hlip", "brain_mri", 30522)}
# official keys each layout leaves out by design, per fixture
IGNORED = {"mgca_vit": 69, "mgca_resnet": 69, "g2d": 5, "hlip_ctrate": 1, "hlip_brainmri": 1}

SMALL_RESNET = ["method.image_encoder.model=resnet26", "method.image_encoder.kwargs={layers: [1, 1, 1, 1]}"]
SMALL = {  # fixture -> overrides that shrink the preset's model (key names unchanged)
    "mgca_vit": ["method.image_encoder.model=test_vit", "method.image_encoder.img_size=[32]",
                 "method.image_encoder.kwargs={patch_size: 8}", "method.proj_hidden_dim=32", "method.embed_dim=16",
                 "method.num_prototypes=8", "method.text_encoder.num_layers=0", "data.root=demo", "data.demo_size=tiny",
                 "data.image_size=32", "data.max_length=24", "data.eval_batch_size=32", "data.num_workers=0"],
    "mgca_resnet": [*SMALL_RESNET, "method.cnn_input_size=64", "method.proj_hidden_dim=32", "method.embed_dim=16",
                    "method.num_prototypes=8", "method.text_encoder.num_layers=0"],
    "g2d": [*SMALL_RESNET, "method.image_encoder.img_size=[64]", "method.decoder_channels=[16,8,8,8,8]",
            "method.embed_dim=32", "method.text_encoder.freeze_layers=0", "data.image_size=64"],
    "hlip_ctrate": ["method.image_encoder.width=48", "method.image_encoder.depth=6", "method.image_encoder.heads=3",
                    "method.image_encoder.levels=[slice,slice,scan,slice,slice,scan]", "method.image_encoder.img_size=[16,32,32]",
                    "method.image_encoder.patch_size=[8,16,16]", "method.embed_dim=32"],
    "hlip_brainmri": ["method.image_encoder.width=48", "method.image_encoder.depth=6", "method.image_encoder.heads=3",
                      "method.image_encoder.levels=[scan,scan,study,scan,scan,study]", "method.image_encoder.img_size=[16,32,32]",
                      "method.image_encoder.patch_size=[8,16,16]", "method.embed_dim=32"],
}
REPORTS = ["The heart is enlarged. No pleural effusion.", "Small left pleural effusion.",
           "Right upper lobe consolidation.", "No acute cardiopulmonary process."]


def fixture_keys(name: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """Local text-model directories (the offline tokenizer + a BERT config): ``small`` (2 layers, 64 wide) and
    the full-size configs of Bio_ClinicalBERT (vocabulary 28,996) and BiomedBERT / CXR-BERT (30,522)."""
    from transformers import AutoTokenizer, BertConfig

    from medvlp.encoders.text import TINY_BERT, tiny_tokenizer_dir

    root = tmp_path_factory.mktemp("text_models")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    configs = {"small": BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TINY_BERT),
               28996: BertConfig(vocab_size=28996), 30522: BertConfig(vocab_size=30522)}
    out = {}
    for name, cfg in configs.items():
        folder = root / str(name)
        tok.save_pretrained(folder)
        cfg.save_pretrained(folder)
        out[name] = str(folder)
    return out


@pytest.fixture
def meta_build(monkeypatch):
    """Build full-size models without allocating their weights (meta device); the stochastic-depth rates, read
    with ``.item()``, stay on the CPU."""
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))

    def build(cfg):
        with torch.device("meta"):
            return build_offline(cfg)

    return build


# --------------------------------------------------------------------------- full-size layouts
@pytest.mark.parametrize("name", list(FULL))
def test_every_official_key_is_mapped(name, text_models, meta_build):
    """The official layout (names and shapes) maps onto the preset's full-size model: nothing unknown,
    nothing unfilled, no shape conflict; the variant and its preset are recognised from the keys."""
    method, variant_name, vocab = FULL[name]
    layout = LAYOUTS[method]
    keys = fixture_keys(name)
    official = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    variant = layout.variant_of(list(keys))
    assert variant.name == variant_name
    cfg = import_config(layout, variant, official, overrides=[f"method.text_encoder.model={text_models[vocab]}"])
    ours = meta_build(cfg).state_dict()
    mapped = map_state_dict(layout, official, ours)
    c = mapped.counts()
    assert c["renamed"] + c["combined_official"] + c["ignored"] == len(keys)
    assert set(mapped.state_dict) == set(ours) and c["ours"] == len(ours)
    assert c["ignored"] == IGNORED[name]
    for key, value in mapped.state_dict.items():
        assert list(value.shape) == list(ours[key].shape), key
    if method == "mgca":
        assert cfg.method.text_encoder.position_ids == "zeros" and cfg.trainer.precision == "32-true"
        assert mapped.filled and list(mapped.filled.values())[0] == ["text_encoder.model.embeddings.token_type_embeddings.weight"]
    if method == "g2d":
        assert [group["ours"] for group in mapped.combined] == [["pool.q_proj.weight", "pool.k_proj.weight", "pool.v_proj.weight"],
                                                       ["pool.q_proj.bias", "pool.k_proj.bias", "pool.v_proj.bias"],
                                                       ["pool.c_proj.weight", "pool.c_proj.bias"]]
    if name == "hlip_brainmri":
        assert list(cfg.method.image_encoder.patch_size) == [8, 16, 16] and cfg.method.image_encoder.sequence_pos_embed


def test_listing_errors_name_the_keys(text_models, meta_build):
    """A missing, an unknown and a wrong-shape key each appear by name (and shapes) in the error."""
    layout = LAYOUTS["mgca"]
    keys = fixture_keys("mgca_vit")
    official = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    cfg = import_config(layout, layout.variant_of(list(keys)), official,
                        overrides=[f"method.text_encoder.model={text_models[28996]}"])
    ours = meta_build(cfg).state_dict()
    broken = dict(official)
    del broken["img_encoder_q.model.blocks.3.mlp.fc1.bias"]
    broken["img_encoder_q.model.head.weight"] = torch.empty(1000, 768, device="meta")
    broken["prototype_layer.weight"] = torch.empty(400, 128, device="meta")
    with pytest.raises(ImportMappingError) as info:
        map_state_dict(layout, broken, ours, source="release.ckpt")
    msg = str(info.value)
    assert "release.ckpt" in msg
    assert "image_encoder.model.blocks.3.mlp.fc1.bias [3072] (official name: img_encoder_q.model.blocks.3.mlp.fc1.bias)" in msg
    assert "img_encoder_q.model.head.weight [1000, 768]: would be image_encoder.model.head.weight" in msg
    assert "prototype_layer.weight [400, 128] -> prototypes.weight expects [500, 128]" in msg
    assert len(info.value.unknown) == len(info.value.unfilled) == len(info.value.mismatched) == 1
    hlip = LAYOUTS["hlip"]
    with pytest.raises(ImportMappingError, match="none of the keys that identify"):
        layout.variant_of(["visual.trunk.cls_token"])
    with pytest.raises(ImportMappingError, match="is this a mgca checkpoint"):
        map_state_dict(layout, {k: torch.empty(1, device="meta") for k in fixture_keys("hlip_ctrate")}, ours)
    assert hlip.variant_of(list(fixture_keys("hlip_ctrate"))).preset == "hlip_ctrate"


# --------------------------------------------------------------------------- small official-layout checkpoints
def random_like_official(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes: weights ~ N(0, 1 / fan_in), vectors ~ N(0, 0.02) (norm scales
    1 + N(0, 0.02)), positive variances."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=g) / max(1, math.prod(shape[1:])) ** 0.5
        elif "norm" in key.lower() or ".bn" in key or key.endswith(".1.weight"):
            out[key] = 1 + 0.02 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.02 * torch.randn(shape, generator=g)
    return out


def small_official(name: str, text_models) -> tuple[dict[str, torch.Tensor], list[str], nn.Module]:
    """The fixture's official names at the sizes of the small model (deeper layers than it has left out;
    keys ignored by design kept at a few elements), random values; the import overrides; and a freshly built
    small model (random weights)."""
    method = FULL[name][0]
    layout = LAYOUTS[method]
    keys = fixture_keys(name)
    overrides = [f"method.text_encoder.model={text_models['small']}", *SMALL[name]]
    cfg = import_config(layout, layout.variant_of(list(keys)), None, overrides=overrides)
    model = build_offline(cfg)
    ours = model.state_dict()
    shapes = official_shapes(layout, ours, list(keys))
    for key, shape in keys.items():
        if key not in shapes and any(r.matches(key) for r in layout.rules if hasattr(r, "matches")):
            shapes[key] = [min(int(s), 3) for s in shape]  # ignored by design: any size
    return random_like_official(shapes, seed=len(name)), overrides, model


def save_official(name: str, official: dict[str, torch.Tensor], path: Path) -> Path:
    """In the container each official trainer writes."""
    if name.startswith("mgca"):  # Lightning: hyper-parameters as an object need full unpickling
        obj = {"epoch": 12, "global_step": 3400, "pytorch-lightning_version": "1.5.10", "state_dict": official,
               "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-5}]}],
               "hyper_parameters": argparse.Namespace(img_encoder="vit_base", emb_dim=128)}
    elif name == "g2d":
        obj = {"epoch": 50, "model_state_dict": official, "optimizer_state_dict": {"state": {}, "param_groups": []}}
    else:  # open_clip, trained with DDP
        obj = {"epoch": 20, "name": name, "state_dict": {f"module.{k}": v for k, v in official.items()},
               "optimizer": {"state": {}, "param_groups": []}}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def imported(text_models, tmp_path_factory):
    """``imported(name)`` -> (run directory, official tensors, overrides, a fresh small model), imported once
    per module."""
    runs: dict[str, tuple[Path, dict[str, torch.Tensor], list[str], nn.Module]] = {}

    def get(name):
        if name not in runs:
            root = tmp_path_factory.mktemp(name)
            official, overrides, fresh = small_official(name, text_models)
            path = save_official(name, official, root / "release.ckpt")
            run = import_checkpoint(FULL[name][0], path, root / "run", overrides=overrides,
                                    trust_checkpoint=name.startswith("mgca"))
            runs[name] = (run, official, overrides, fresh)
        return runs[name]

    return get


def text_batch(method) -> tuple[torch.Tensor, torch.Tensor]:
    tok = method.tokenizer(REPORTS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    return tok["input_ids"], tok["attention_mask"]


def strip(official: dict[str, torch.Tensor], prefix: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in official.items() if k.startswith(prefix) and not any(s in k for s in skip)}


def placed_by_hand(name: str, official: dict[str, torch.Tensor], model: nn.Module) -> nn.Module:
    """``model`` (freshly built) with its tensors loaded module by module under the official names (no mapping
    table)."""
    method = FULL[name][0]
    text = model.text_encoder.model
    if method == "mgca":
        model.image_encoder.model.load_state_dict(strip(official, "img_encoder_q.model."))
        model.img_global.load_state_dict(strip(official, "img_encoder_q.global_embed.head."))
        model.txt_global.load_state_dict(strip(official, "text_encoder_q.global_embed.head."))
        missing, unexpected = text.load_state_dict(strip(official, "text_encoder_q.model.", ("crossattention", "position_ids")),
                                                   strict=False)
        assert missing == ["embeddings.token_type_embeddings.weight"] and not unexpected
        text.embeddings.token_type_embeddings.weight.data.zero_()
    elif method == "g2d":
        model.image_encoder.model.load_state_dict(strip(official, "img_model.encoder."))
        model.img_proj.load_state_dict(strip(official, "proj_v."))
        model.txt_proj.load_state_dict(strip(official, "proj_t."))
        text.load_state_dict(strip(official, "lm_model.", ("pooler", "position_ids")))
    else:
        enc = model.image_encoder
        trunk = strip(official, "visual.trunk.", ("posemb",))
        enc.load_state_dict({**trunk, "spatial_pos": official["visual.trunk.spatial_posemb"].permute(0, 4, 1, 2, 3),
                             "sequence_pos": official["visual.trunk.sequential_posemb"][0] if "visual.trunk.sequential_posemb"
                             in official else enc.sequence_pos})
        model.img_proj.weight.data.copy_(official["visual.head.proj.weight"])
        model.txt_proj.weight.data.copy_(official["text.proj.weight"])
        text.load_state_dict(strip(official, "text.transformer.", ("position_ids",)))
    return model.eval()


def official_g2d_image_embedding(model, official: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The official attention pool (nn.MultiheadAttention with the query = mean token, then c_proj) on the
    hand-placed encoder and projector."""
    d = official["attnpool.c_proj.weight"].shape[0]
    mhsa = nn.MultiheadAttention(d, int(model.cfg.pool_heads))
    mhsa.load_state_dict(strip(official, "attnpool.mhsa."))
    c_proj = nn.Linear(d, d)
    c_proj.load_state_dict(strip(official, "attnpool.c_proj."))
    x = model.img_proj(model.image_encoder.pyramid(images, 5)[-1]).flatten(2).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + official["attnpool.positional_embedding"][:, None]
    pooled, _ = mhsa(x[:1], x, x)
    return F.normalize(c_proj(pooled)[0], dim=-1)


@pytest.mark.parametrize("name", ["mgca_vit", pytest.param("mgca_resnet", marks=pytest.mark.slow), "g2d", "hlip_ctrate",
                                  pytest.param("hlip_brainmri", marks=pytest.mark.slow)])
def test_imported_run_loads_and_equals_weights_placed_by_name(name, imported):
    """The run directory holds what load_run needs; the imported model's embeddings equal those of the same
    tensors loaded by their official names."""
    run, official, overrides, fresh = imported(name)
    assert (run / api.CONFIG_NAME).is_file() and (run / api.TEXT_DIR / "config.json").is_file()
    info = json.loads((run / "run_info.json").read_text())["import"]
    c = info["counts"]
    assert c["official"] == len(official) == c["renamed"] + c["combined_official"] + c["ignored"]
    assert info["source"].endswith("release.ckpt") and len(info["sha256"]) == 64 and info["method"] == FULL[name][0]
    assert info["not_read"] and all(info["not_read"].values())
    model, cfg = api.load_run(run)
    hand = placed_by_hand(name, official, fresh)
    torch.manual_seed(0)
    if FULL[name][0] == "hlip":
        size = list(cfg.method.image_encoder.img_size)
        images = torch.randn(2, 2 if "brain" in name else 1, 1, *size)
        assert info["stripped_prefix"] == "module."
    else:
        side = int(cfg.method.image_encoder.img_size[0])
        images = torch.randn(4, 3, side, side)
    ids, mask = text_batch(model)
    with torch.no_grad():
        img, txt = model.embed_images(images), model.embed_text(ids, mask)
        if name == "g2d":
            ref_img = official_g2d_image_embedding(hand, official, images)
            txt_tokens = hand.text_encoder(ids, mask).tokens.transpose(1, 2)
            ref_txt = F.normalize(hand.txt_proj(txt_tokens)[:, :, 0], dim=-1)  # the official: every token, then [CLS]
        else:
            ref_img, ref_txt = hand.embed_images(images), hand.embed_text(ids, mask)
    assert img.std(dim=0).max() > 1e-3  # different images, different embeddings
    torch.testing.assert_close(img, ref_img, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=2e-6, rtol=1e-5)


def test_imported_run_evaluates(imported):
    """The imported run evaluates like a trained one: retrieval on the synthetic chest X-rays."""
    run, _, _, _ = imported("mgca_vit")
    res = api.evaluate(run, tasks=("retrieval",), split="train")
    assert res["n"] > 1 and 0.0 <= res["retrieval"]["image_to_text"]["R@1"] <= 1.0


@pytest.mark.slow
def test_imported_run_evaluates_zero_shot(imported):
    """Zero-shot AUROC of the imported run on the default-size synthetic chest X-rays."""
    run, _, _, _ = imported("mgca_vit")
    res = api.evaluate(run, tasks=("zeroshot",), data_overrides=["data.demo_size=default"])
    assert res["n"] > 50 and 0.0 <= res["zeroshot"]["mean_auroc"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL))
def test_full_size_checkpoint_imports(name, text_models, tmp_path):
    """A full-size official-layout checkpoint (the fixture's names and shapes, random values, in its trainer's
    container) imports, loads with load_run and embeds."""
    method, _, vocab = FULL[name]
    official = random_like_official(fixture_keys(name), seed=1)
    path = save_official(name, official, tmp_path / "release.ckpt")
    run = import_checkpoint(method, path, tmp_path / "run", overrides=[f"method.text_encoder.model={text_models[vocab]}"],
                            trust_checkpoint=method == "mgca")
    model, cfg = api.load_run(run)
    size = [int(v) for v in cfg.method.image_encoder.img_size]
    if method == "hlip":  # a smaller volume than the training grid (the position table is resized)
        patch = [int(p) for p in cfg.method.image_encoder.patch_size]
        images = torch.randn(1, 2 if "brain" in name else 1, 1, *[2 * p for p in patch])
    else:
        images = torch.randn(2, 3, size[0], size[0])
    ids, mask = text_batch(model)
    with torch.no_grad():
        img, txt = model.embed_images(images), model.embed_text(ids, mask)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(len(img)))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(len(txt)))


# --------------------------------------------------------------------------- trust and the command line
def test_pickled_objects_need_trust(imported, tmp_path):
    """A Lightning checkpoint whose hyper-parameters are an object is refused without trust (naming the file and
    --trust-checkpoint) and read with it; nothing in a refused file runs; classes this environment lacks are
    read as placeholders."""
    run, official, overrides, _ = imported("mgca_vit")
    path = tmp_path / "mgca_release.ckpt"
    save_official("mgca_vit", official, path)
    with pytest.raises(UntrustedCheckpointError) as info:
        import_checkpoint("mgca", path, tmp_path / "refused", overrides=overrides)
    assert str(path) in str(info.value) and "--trust-checkpoint" in str(info.value)
    assert not (tmp_path / "refused").exists()
    assert json.loads((run / "run_info.json").read_text())["import"]["full_unpickling"] is True

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, tmp_path / "payload.ckpt")
    with pytest.raises(UntrustedCheckpointError):
        read_official(tmp_path / "payload.ckpt")
    assert not marker.exists()

    gone = types.ModuleType("medvlp_test_gone_module")
    gone.Hyper = type("Hyper", (), {"__module__": gone.__name__})
    sys.modules[gone.__name__] = gone
    try:
        torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": gone.Hyper()}, tmp_path / "old.ckpt")
    finally:
        del sys.modules[gone.__name__]
    obj, how = read_official(tmp_path / "old.ckpt", trust_checkpoint=True)
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    assert how == {"full_unpickling": True, "placeholder_classes": ["medvlp_test_gone_module.Hyper"]}


def test_nested_layouts_are_unwrapped():
    """The state dict is found in the file itself or under state_dict / model_state_dict / model, with DDP's
    ``module.`` and torch.compile's ``_orig_mod.`` removed; the other entries are recorded with why they are not read."""
    w = {"a.weight": torch.zeros(2), "b.bias": torch.ones(1)}
    cases = [(w, "(the file itself)", ""), ({"model": {f"module.{k}": v for k, v in w.items()}}, "model", "module."),
             ({"epoch": 3, "optimizer": {}, "state_dict": {f"module.net._orig_mod.{k}": v for k, v in w.items()}},
              "state_dict", "_orig_mod.module.")]
    for obj, container, prefix in cases:
        state, info = unwrap(obj)
        assert list(state) in (list(w), [f"net.{k}" for k in w]) and info["container"] == container
        assert info["stripped_prefix"] == prefix
    _, info = unwrap(cases[2][0])
    assert info["epoch"] == 3 and info["not_read"] == {"epoch": "recorded in the imported checkpoint",
                                                       "optimizer": "optimizer state (training only)"}
    with pytest.raises(ValueError, match="holds no state dict"):
        unwrap({"epoch": 1, "args": {"lr": 1}}, "x.pt")


def test_command_line(imported, text_models, tmp_path, capsys):
    """``medvlp import`` through its argparse parser: G2D's training checkpoint into a run directory; a second
    import into the same directory is refused."""
    _, official, overrides, _ = imported("g2d")
    path = save_official("g2d", official, tmp_path / "g2d_50_checkpoint.pth")
    parser = argparse.ArgumentParser(prog="medvlp")
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["import", "--method", "g2d", "--checkpoint", str(path), "--out", str(tmp_path / "run"), *overrides]
    args = parser.parse_args(argv)
    cmd_import(args)
    printed = capsys.readouterr().out
    assert "g2d, resnet50_unet" in printed and "6 combined" in printed and str(tmp_path / "run") in printed
    model, cfg = api.load_run(tmp_path / "run")
    assert cfg.method.name == "g2d" and cfg.trainer.precision == "32-true" and list(cfg.method.image_encoder.img_size) == [64]
    with pytest.raises(ValueError, match="already holds a run"):
        cmd_import(parser.parse_args(argv))
    unet_only = tmp_path / "g2d_encoder_decoder.pth"
    torch.save({k[len("img_model."):]: v for k, v in official.items() if k.startswith("img_model.")}, unet_only)
    with pytest.raises(ImportMappingError, match="image-only export"):
        import_checkpoint("g2d", unet_only, tmp_path / "unet_only", overrides=overrides)

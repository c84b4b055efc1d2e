"""MedBLIP (spec ``medblip.md``): the §10 invariants and hand-computed values, the §11 flags, the zero-shot
parsing rule and metrics, the paper / recommended / FSDP configs value by value, and the bf16 GPU step."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from medvlp import api
from medvlp import config as C
from medvlp.batch import ImageTextBatch
from medvlp.downstream.generative import class_report, exact_match, parse_diagnosis, token_f1
from medvlp.losses.medblip import hard_negatives, query_itc, query_similarity

EXPERIMENTS = C.config_dir() / "experiment"
TRAINABLE = re.compile(r"^(image_encoder\.(patch_embed_3d|pos_embed_3d|ln_vision)|text_encoder\.|vision_proj\.|text_proj\.|"
                       r"qa_proj\.|llm_proj\.|temp$|itm_head\.)")


def build(*overrides: str):
    cfg = C.compose(method="medblip", data="medblip_mri", overrides=["data.root=/unused", *overrides])
    C.resolve(cfg)
    torch.manual_seed(0)
    return api.build_method(cfg)


def make_batch(n: int = 4, classes: tuple[int, ...] = (0, 1, 2, 0)) -> ImageTextBatch:
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(n, 3)
    labels[torch.arange(n), torch.tensor(classes[:n])] = 1
    desc = [f"A {70 + i}-year-old female. 16 years of education. MMSE score {29 - i}. " for i in range(n)]
    return ImageTextBatch(images=torch.rand(n, 1, 32, 32, 32, generator=g), input_ids=torch.zeros(n, 4, dtype=torch.long),
                          attention_mask=torch.ones(n, 4, dtype=torch.long), study_ids=[f"s{i}" for i in range(n)],
                          texts=desc, labels=labels, descriptions=desc, meta={"cohort": ["ADNI-test"] * n})


@pytest.fixture(scope="module")
def method():
    return build()


# --------------------------------------------------------------------------- §10 invariants
def test_only_the_bridge_is_trainable_and_the_frozen_parts_get_no_gradient(method):
    """§10 items 3-4: the trainable set, a gradient through the frozen ViT to the 3D patch embedding, None for
    every ViT and LLM parameter, and frozen parts bit-identical after an optimiser step."""
    m = build()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(TRAINABLE.match(n) for n in names), [n for n in names if not TRAINABLE.match(n)]
    assert not any(p.requires_grad for p in m.llm.parameters())
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert any(n.startswith("image_encoder.trunk_blocks") for n in frozen) and any(n.startswith("llm.") for n in frozen)
    m.train()
    terms = m.losses(make_batch())
    assert set(terms) == {"itc_desc", "itc_qa", "lm"}
    sum(terms.values()).backward()
    assert m.image_encoder.patch_embed_3d.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.named_parameters() if n in frozen)
    assert m.llm.hf_model.training is False and m.image_encoder.trunk_blocks.training is False
    torch.optim.AdamW(m.param_groups(), lr=1e-2, weight_decay=0.1).step()
    params = dict(m.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())


def test_itc_hand_values_transpose_and_uniform():
    """§10 items 10-12."""
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
    txt = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    s = query_similarity(img, txt)
    assert torch.allclose(s, torch.tensor([[1.0, 0.0], [0.6, 0.0]]))
    assert float(query_itc(img, txt, 0.07, 0.1)) == pytest.approx(2.459872, abs=1e-5)
    assert float(query_itc(img, txt, 0.07, 0.0)) == pytest.approx(2.317015, abs=1e-5)
    # text -> image is exactly the transpose of image -> text (max over the image's queries)
    img3, txt3 = torch.randn(5, 3, 4), torch.randn(5, 4)
    full = torch.einsum("bqd,md->bmq", img3, txt3).amax(-1)
    assert torch.equal(query_similarity(img3, txt3), full)
    flat = torch.ones(4, 2, 3) / math.sqrt(3)  # every similarity equal: ln B with or without smoothing
    for eps in (0.0, 0.1):
        assert float(query_itc(flat, flat[:, 0], 0.07, eps)) == pytest.approx(math.log(4), abs=1e-6)
    # same-label positives: with distinct labels the term is the plain one
    labels = torch.arange(5)
    assert torch.allclose(query_itc(img3, txt3, 0.1, 0.1, labels=labels), query_itc(img3, txt3, 0.1, 0.1))
    same = query_itc(img3, txt3, 0.1, 0.1, labels=torch.tensor([0, 0, 1, 1, -100]))
    assert torch.isfinite(same) and not torch.allclose(same, query_itc(img3, txt3, 0.1, 0.1))


def test_hard_negatives_never_pick_the_positive():
    """§10: whatever the positive's similarity, it is never drawn; the others follow the softmax."""
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6)
    sim.fill_diagonal_(50.0)  # a positive far more similar than anything else
    draws = torch.stack([hard_negatives(sim, 0.07, g) for _ in range(300)])
    assert not (draws == torch.arange(6)).any()
    sim = torch.zeros(3, 3)
    sim[0, 2] = 2.0  # row 0 prefers column 2 among the negatives
    counts = torch.bincount(torch.stack([hard_negatives(sim, 1.0, g) for _ in range(2000)])[:, 0], minlength=3)
    assert counts[0] == 0 and counts[2] > 3 * counts[1]
    with pytest.raises(ValueError, match="at least 2"):
        hard_negatives(torch.zeros(1, 1), 0.07)


def test_itm_term_draws_hard_negatives_and_trains_its_head():
    m = build("method.loss_weights.itm=1.0").train()
    terms = m.losses(make_batch())
    assert set(terms) == {"itc_desc", "itc_qa", "lm", "itm"} and torch.isfinite(terms["itm"])
    terms["itm"].backward()
    assert m.itm_head.weight.grad.abs().sum() > 0 and m.text_encoder.query_tokens.grad is not None


# --------------------------------------------------------------------------- LM inputs and the §11 flags
def test_lm_labels_mask_prompt_visual_and_pads_in_the_decoder_only_variant():
    """§10 item 13: the 32 (here 4) visual positions and every pad are -100; prompt tokens are targets only with
    lm_supervise_prompt (the official code, Q6); answer_eos appends EOS (Q7); left padding puts pads first (Q8)."""
    for supervise in (True, False):
        m = build("method.llm.model=tiny_gpt2", f"method.lm_supervise_prompt={str(supervise).lower()}",
                  "method.prompt_padding=left", "method.answer_eos=true")
        desc = ["A 70-year-old male. ", "A 81-year-old female. 12 years of education. MMSE score 20. "]
        p_ids, p_mask, _ = m.prompt_tokens(desc)
        assert (p_mask[:, 0] == 0).any() and (p_mask[:, -1] == 1).all()  # left padded
        a_ids, a_mask = m.answer_tokens(["Dementia", "Not demented"])
        assert (a_ids.gather(1, a_mask.sum(1, keepdim=True) - 1).squeeze(1) == m.llm.tokenizer.eos_token_id).all()
        visual = torch.randn(2, m.text_encoder.num_query_tokens, m.llm.width)
        inp = m.llm.lm_inputs(visual, p_ids, p_mask, a_ids, a_mask, supervise_prompt=supervise, **m.lm_kwargs())
        lab, n_p, q = inp["labels"], p_ids.shape[1], visual.shape[1]
        assert (lab[:, n_p:n_p + q] == -100).all()
        assert (lab[:, :n_p][p_mask == 0] == -100).all() and (lab[:, n_p + q:][a_mask == 0] == -100).all()
        assert torch.equal(lab[:, n_p + q:][a_mask == 1], a_ids[a_mask == 1])
        prompt_labels = lab[:, :n_p][p_mask == 1]
        assert (prompt_labels != -100).all() if supervise else (prompt_labels == -100).all()
        pos = inp["position_ids"]
        first = p_mask.argmax(1)  # the first real prompt token of each row: position 0, whatever the padding
        assert (pos[torch.arange(2), first] == 0).all() and (pos[:, -1] == p_mask.sum(1) + q + a_mask.sum(1) - 1).all()


def test_seq2seq_labels_are_the_answer_and_the_prompt_goes_first():
    m = build()
    p_ids, p_mask, _ = m.prompt_tokens(["A 70-year-old male. "])
    a_ids, a_mask = m.answer_tokens(["mild cognitive impairment (MCI)"])
    visual = torch.zeros(1, m.text_encoder.num_query_tokens, m.llm.width)
    inp = m.llm.lm_inputs(visual, p_ids, p_mask, a_ids, a_mask, **m.lm_kwargs())
    assert torch.equal(inp["labels"], a_ids.masked_fill(a_mask == 0, -100))
    emb = m.llm.hf_model.get_input_embeddings()(p_ids)
    assert torch.allclose(inp["inputs_embeds"][:, : p_ids.shape[1]], emb)  # Q9: prompt before the visual tokens
    assert torch.equal(inp["inputs_embeds"][:, p_ids.shape[1]:], visual)


def test_truncation_keeps_the_question_only_with_the_fix():
    """Q5: the official right truncation of the whole prompt cuts the question off a long description."""
    long = "MMSE score 28. " * 40
    for how, keeps in (("prompt", False), ("description", True)):
        m = build(f"method.truncate={how}", "method.prompt_max_length=24")
        ids, mask, cut = m.prompt_tokens([long, "A 70-year-old male. "])
        text = m.llm.tokenizer.decode(ids[0][mask[0] == 1], skip_special_tokens=True).lower()
        assert cut == 1 and ids.shape[1] <= 24
        assert ("diagnosed with" in text and text.rstrip().endswith("answer :") or text.rstrip().endswith("answer:")) == keeps, text


def test_temperature_clamp_and_weight_decay_rule():
    m = build("method.clamp_temperature=true")
    with torch.no_grad():
        m.temp.fill_(-1.0)
    assert m.temperature() == pytest.approx(0.001)
    assert build().temperature() == pytest.approx(0.07)
    m = build()
    named = dict(m.named_parameters())
    groups = m.param_groups()
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(named["temp"]) in decayed and id(named["image_encoder.ln_vision.weight"]) in decayed  # official rule
    assert id(named["text_proj.bias"]) not in decayed
    ln = next(n for n in named if "LayerNorm.weight" in n)
    assert id(named[ln]) not in decayed


def test_inference_answers_scores_and_a_batch_of_one(method):
    b = make_batch(1, (2,))
    assert isinstance(method.generate(b)[0], str)
    for mode in ("itc", "rank"):
        s = method.answer_scores(make_batch(), mode)
        assert s.shape == (4, 3) and torch.isfinite(s).all()
    method.train()
    assert all(torch.isfinite(v) for v in method.losses(make_batch(2, (0, 2))).values())  # B = 2 (Q14: no squeeze)
    with pytest.raises(ValueError, match="answer_scores mode"):
        method.answer_scores(b, "nope")


# --------------------------------------------------------------------------- zero-shot parsing and metrics
@pytest.mark.parametrize(("answer", "cls"), [
    ("Not demented", 0), ("not  Demented.", 0), ("nondemented", 0), ("cognitively normal", 0), ("normal", 0),
    ("mild cognitive impairment (MCI)", 1), ("MCI", 1), ("Dementia", 2), ("demented", 2), ("AD", 2),
    ("probable Alzheimer disease", 2), ("he had a scan", -1), ("", -1), ("the subject", -1),
])
def test_parse_diagnosis(answer, cls):
    assert parse_diagnosis(answer) == cls


def test_class_report_and_vqa_scores():
    import numpy as np

    r = class_report(np.array([0, 0, 1, -1, 2, 2]), np.array([0, 1, 1, 2, 2, 2]), 3)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["balanced_accuracy"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert r["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 2]]
    assert token_f1("not demented", "Not demented") == 1.0 and token_f1("yes", "no") == 0.0
    assert token_f1("the subject is demented", "demented") == pytest.approx(2 * 0.25 * 1 / 1.25)
    assert exact_match(" Dementia ", "dementia") and not exact_match("dementia.", "dementia")


# --------------------------------------------------------------------------- configs, value by value
def compose_experiment(name: str):
    cfg = C.compose(config_file=str(EXPERIMENTS / f"{name}.yaml"), overrides=["data.root=/data/medblip"])
    return C.resolve(cfg)


def test_paper_configs_hold_the_papers_settings():
    """§2, §4-6 and §5 (code) for both variants; §12.1 for the recommended one."""
    for name, llm, dtype, kind, length, new in (("medblip_paper", "google/flan-t5-xl", "bfloat16", "seq2seq", 60, 60),
                                                ("medblip_paper_biomedlm", "stanford-crfm/BioMedLM", "float16", "causal", 100, 20)):
        cfg = compose_experiment(name)
        m, d, o, t = cfg.method, cfg.data, cfg.optim, cfg.trainer
        ie, qf = m.image_encoder, m.text_encoder
        assert (ie.name, ie.trunk, ie.trunk_depth, list(ie.img_size), list(ie.patch_size), ie.in_chans, ie.trunk_dtype) == (
            "medblip_vit", "eva_vit_g", 39, [224] * 3, [32] * 3, 1, "float16")
        assert (qf.name, qf.model, qf.num_query_tokens, qf.cross_attention_freq, qf.encoder_width) == (
            "qformer", "bert-base-uncased", 32, 2, 1408)
        assert (m.llm.model, m.llm.dtype, m.llm.kind, m.llm.lora) == (llm, dtype, kind, False)
        assert dict(m.llm.config_overrides) == ({"dense_act_fn": "gelu"} if kind == "seq2seq" else {})
        assert (m.embed_dim, m.temperature, m.clamp_temperature, m.label_smoothing, m.itc_qa_positive) == (256, 0.07, False, 0.1, "diagonal")
        assert (m.text_max_length, m.prompt_max_length, m.truncate, m.visual_tokens_first, m.generate_num_beams) == (60, length, "prompt", False, 1)
        assert (m.lm_supervise_prompt, m.answer_eos, m.prompt_padding, m.generate_max_new_tokens) == (True, False, "right", new)
        assert dict(m.loss_weights) == {"itc_desc": 1.0, "itc_qa": 1.0, "lm": 1.0, "itm": 0.0}
        assert list(m.answers) == ["Not demented", "mild cognitive impairment (MCI)", "Dementia"]
        assert m.question == "What will this subject be diagnosed with?"
        assert (o.lr, o.weight_decay, o.warmup_ratio, o.schedule, o.min_lr_ratio, list(o.betas)) == (2e-5, 1e-4, 0.1, "cosine", 0.0, [0.9, 0.999])
        assert (d.batch_size, d.size, d.text, d.orientation, d.val_fraction, d.num_workers) == (7, 224, "description", "", 0.0, 4)
        assert list(d.train_lists) == ["ADNI-train", "NACC-train", "OASIS1-aligned_norm-train", "OASIS1-aligned_orig-train",
                                       "OASIS1-norm-train", "OASIS1-orig-train", "OASIS2-train"]
        assert list(d.test_lists) == ["ADNI-test", "NACC-test", "OASIS2-test", "AIBL-test", "MIRIAD-test"]
        assert (t.max_epochs, t.gradient_clip_val, t.precision, t.accumulate_grad_batches, cfg.run.seed) == (100, 1.0, "bf16-mixed", 1, 42)
    r = compose_experiment("medblip_recommended")
    m = r.method
    assert (m.truncate, m.lm_supervise_prompt, m.answer_eos, m.prompt_padding, m.clamp_temperature) == ("description", False, True, "left", True)
    assert (m.llm.model, m.llm.dtype, r.data.orientation) == ("stanford-crfm/BioMedLM", "bfloat16", "RAS")
    assert m.image_encoder.grad_checkpointing and m.image_encoder.trunk_dtype == "bfloat16" and not m.checkpoint_frozen
    assert compose_experiment("medblip_paper").method.checkpoint_frozen


def test_checkpoints_without_the_frozen_parts_reload(tmp_path):
    """Q17: with checkpoint_frozen=false a checkpoint holds the trainable parts only; the frozen trunk and LLM are
    rebuilt from their sources (here a trunk file and an LLM directory) and everything else must match."""
    src = build()
    trunk = tmp_path / "trunk.pt"
    sd = src.image_encoder.state_dict()
    torch.save({**{k.replace("trunk_blocks.", "blocks."): v for k, v in sd.items() if k.startswith("trunk_blocks.")},
                "cls_token": sd["cls_token"]}, trunk)
    llm_dir = tmp_path / "llm"
    src.llm.hf_model.save_pretrained(llm_dir)
    src.llm.tokenizer.save_pretrained(llm_dir)
    m = build("method.checkpoint_frozen=false", f"method.image_encoder.trunk_checkpoint={trunk}",
              f"method.llm.model={llm_dir}", "method.llm.pretrained=true")
    ckpt = {"state_dict": dict(m.state_dict())}
    m.on_save_checkpoint(ckpt)
    kept = set(ckpt["state_dict"])
    assert not any(k.startswith(("llm.", "image_encoder.trunk_blocks")) for k in kept) and "image_encoder.patch_embed_3d.weight" in kept
    again = build("method.checkpoint_frozen=false", f"method.image_encoder.trunk_checkpoint={trunk}",
                  f"method.llm.model={llm_dir}", "method.llm.pretrained=true")
    again.load_state_dict(ckpt["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(RuntimeError, match="missing"):
        again.load_state_dict({k: v for k, v in ckpt["state_dict"].items() if k != "temp"})
    with pytest.raises(ValueError, match="checkpoint_frozen=false"):
        build("method.checkpoint_frozen=false")  # stand-ins have no source to be read back from


def test_demo_config_is_the_code_with_the_stand_ins():
    """configs/method/medblip.yaml: the released code's loss settings on the §12.2 stand-ins and the synthetic cohort."""
    cfg = C.compose(method="medblip")
    m, d = cfg.method, cfg.data
    assert (m.image_encoder.name, m.image_encoder.trunk, list(m.image_encoder.img_size), list(m.image_encoder.patch_size),
            m.image_encoder.width, m.image_encoder.depth) == ("medblip_vit", "eva", [32] * 3, [8] * 3, 64, 2)
    assert (m.text_encoder.name, m.text_encoder.model, m.text_encoder.hidden_size, m.text_encoder.num_hidden_layers,
            m.text_encoder.num_query_tokens, m.text_encoder.cross_attention_freq, m.text_encoder.encoder_width) == (
        "qformer", "tiny", 64, 2, 4, 2, 64)
    assert (m.llm.model, m.llm.dtype, m.temperature, m.clamp_temperature, m.label_smoothing) == ("tiny_t5", "float32", 0.07, False, 0.1)
    assert (m.truncate, m.visual_tokens_first, m.itc_qa_positive, dict(m.loss_weights)) == ("prompt", False, "diagonal", {"itm": 0.0})
    assert (d.name, d.root, d.text, d.vqa_file) == ("medblip_mri", "demo", "description", "demo_truth/vqa.csv")
    assert C.resolve(cfg).data.size == 32 and cfg.data.max_length == 48


def test_fsdp_config_composes_and_names_real_module_classes():
    cfg = compose_experiment("medblip_fsdp")
    assert cfg.trainer.strategy == "fsdp" and "FrozenLLM" in cfg.trainer.fsdp_wrap
    api.check_trainer_choices(cfg)
    m = build()  # the wrapped classes exist in the model (the stand-in's blocks have the real names)
    classes = {type(x).__name__ for x in m.modules()}
    assert "FrozenLLM" in classes and "T5Block" in classes


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_a_bf16_step_with_a_billion_parameter_llm_reports_peak_memory():
    """A bf16 step with a random >= 1 B-parameter decoder-only LLM (BioMedLM-like width) and the demo image
    branch; prints the peak memory."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = build("method.llm.model=tiny_gpt2", "method.llm.dtype=bfloat16",
              "method.llm.config_overrides={n_embd: 2048, n_layer: 20, n_head: 16, n_positions: 512}").cuda().train()
    n_llm = sum(p.numel() for p in m.llm.parameters())
    assert n_llm >= 1e9, n_llm
    b = make_batch(7, (0, 1, 2, 0, 1, 2, 0))
    b.images = b.images.cuda()
    b.labels = b.labels.cuda()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms = m.losses(b)
    total = sum(terms.values())
    total.backward()
    assert torch.isfinite(total), terms
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"MedBLIP bf16 step, LLM {n_llm / 1e9:.2f} B parameters, batch 7: peak {peak:.2f} GiB, terms "
          f"{ {k: round(float(v), 4) for k, v in terms.items()} }")
    assert all(p.grad is None for p in m.llm.parameters())


def test_offline_stand_ins_need_no_network(monkeypatch):
    """The demo method builds with the hub unreachable (tests run with HF_HUB_OFFLINE=1)."""
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    m = build()
    assert m.llm.is_seq2seq and Path(m.llm.tokenizer.name_or_path).exists()


# --------------------------------------------------------------------------- end to end
def test_fit_zeroshot_and_vqa_from_the_command_line_on_a_list_fixture(tmp_path, capsys):
    """``medvlp fit --method medblip --data medblip_mri data.root=<fixture>``, then ``medvlp zeroshot`` (three
    modes, per cohort) and ``medvlp vqa`` (one question; the reference file) on the run."""
    import json

    from medvlp.cli import main
    from medvlp.datamodules.demo.adni import write_dataset

    root = tmp_path / "lists"
    write_dataset(root, 20, seed=0)  # MedBLIP's TSV lists and NIfTI volumes (the tiny world)
    runs = tmp_path / "runs"
    assert main(["fit", "--method", "medblip", "--data", "medblip_mri", f"data.root={root}", "trainer.max_steps=3",
                 f"run.out_dir={runs}", "trainer.enable_progress_bar=false", "data.batch_size=4"]) == 0
    (run,) = runs.iterdir()
    assert (run / "text_encoder" / "config.json").is_file() and not (run / "llm").exists()  # the stand-in rebuilds by name
    capsys.readouterr()
    assert main(["zeroshot", "--run", str(run), "--json", str(tmp_path / "z.json"), "data.test_lists=[ADNI-test,AIBL-test]"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("itc", "rank", "generate", "unparsed", "ADNI-test", "AIBL-test")), out
    z = json.loads((tmp_path / "z.json").read_text())["zeroshot"]
    assert set(z["modes"]) == {"itc", "rank", "generate"} and z["n"] > 0
    assert main(["vqa", "--run", str(run), "--study", "ADNI-test:1", "--question", "Is the subject demented?",
                 "--answers", str(root / "demo_truth" / "vqa.csv")]) == 0
    out = capsys.readouterr().out
    assert "Q: Is the subject demented?\nA:" in out and "token-F1" in out and "exact match" in out, out
    assert main(["vqa", "--run", str(run), "--study", "no-such-study", "--question", "x"]) == 2
    assert "No study 'no-such-study'" in capsys.readouterr().err


@pytest.mark.slow  # two processes with their own imports: about 40 s
@pytest.mark.distributed
def test_two_process_sharded_step_on_cpu(tmp_path):
    """The frozen LLM sharded over 2 gloo processes: Lightning's FSDP strategy needs CUDA, so on CPU the same
    units (``trainer.fsdp_wrap``) go through its FSDP2 strategy (``trainer.strategy=model_parallel``); the run
    writes whole checkpoints that ``load_run`` reads back."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    fit = subprocess.run([sys.executable, "-m", "medvlp.cli", "fit", "--method", "medblip", "trainer.strategy=model_parallel",
                          "trainer.devices=2", "trainer.accelerator=cpu", "trainer.fsdp_wrap=[FrozenLLM,T5Block]",
                          "trainer.max_steps=2", f"run.out_dir={runs}", "trainer.enable_progress_bar=false",
                          "trainer.limit_val_batches=1"], capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run,) = runs.iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    method, _ = api.load_run(run)
    assert method.temperature() > 0 and "train/loss_lm_epoch" in (run / "metrics.csv").read_text().splitlines()[0]

import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from medvlp.config import LLMConfig
from medvlp.encoders.llm import IGNORE_INDEX, FrozenLLM, positions_from_attention_mask
from medvlp.encoders.tokenizers import build_tokenizer

CORPUS = [
    "A 74-year-old female with 16 years of education. MMSE 28.",
    "A 81-year-old male with 12 years of education. MMSE 22.",
    "A 66-year-old male with 18 years of education. MMSE 30.",
    "Question: What will this subject be diagnosed with? Answer: ",
    "Question: What will this subject be diagnosed with? Answer: Not demented",
    "Question: What will this subject be diagnosed with? Answer: mild cognitive impairment (MCI)",
    "Question: What will this subject be diagnosed with? Answer: Dementia",
    "Not demented", "mild cognitive impairment (MCI)", "Dementia",
]  # fmt: skip
QUESTION = "Question: What will this subject be diagnosed with? Answer: "
PROMPTS = [CORPUS[0] + " " + QUESTION, QUESTION]  # the second is much shorter: padding in the batch
ANSWERS = ["Dementia", "mild cognitive impairment (MCI)"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The stand-ins are tiny: one intra-op thread is faster, and stays fast on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_tokenizers")
    return {kind: str(build_tokenizer(kind, CORPUS, root / kind)) for kind in ("wordpiece", "t5", "gpt2")}


def make(tok_dirs, model="tiny_t5", seed=0, **kw):
    torch.manual_seed(seed)
    kind = "t5" if model == "tiny_t5" else "gpt2"
    kw.setdefault("dtype", "float32")
    return FrozenLLM(LLMConfig(model=model, tokenizer=tok_dirs[kind], **kw))


def batch(llm, prompt_side=None, add_eos=None, prompts=PROMPTS, answers=ANSWERS):
    side = prompt_side or ("right" if llm.is_seq2seq else "left")
    p, pm = llm.tokenize(prompts, 60, side=side)
    a, am = llm.tokenize(answers, 20, add_eos=add_eos)
    return p, pm, a, am


# ------------------------------------------------------------------------------------------- tokenizers


def test_t5_tokenizer_specials_eos_and_readable_decoding(tok_dirs):
    tok = AutoTokenizer.from_pretrained(tok_dirs["t5"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("mild cognitive impairment (MCI)")["input_ids"]
    assert ids[-1] == 1 and ids.count(1) == 1  # </s> appended once
    assert tok.decode(ids, skip_special_tokens=True) == "mild cognitive impairment (mci)"
    assert tok.decode(tok(CORPUS[0])["input_ids"], skip_special_tokens=True) == CORPUS[0].lower()
    assert tok("zebra")["input_ids"] == [2, 1]  # unknown word
    assert tok("")["input_ids"] == [1]


def test_gpt2_tokenizer_single_special_and_no_added_tokens(tok_dirs):
    tok = AutoTokenizer.from_pretrained(tok_dirs["gpt2"])
    assert tok.bos_token == tok.eos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    assert len(tok.all_special_ids) == 1
    ids = tok("Not demented")["input_ids"]
    assert len(ids) == 2 and tok.eos_token_id not in ids  # no special tokens added, case kept
    assert tok.decode(tok(ANSWERS[1])["input_ids"]) == ANSWERS[1]


def test_wordpiece_tokenizer_is_bert_style(tok_dirs):
    tok = AutoTokenizer.from_pretrained(tok_dirs["wordpiece"])
    ids = tok("Dementia")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert {tok.pad_token, tok.unk_token, tok.mask_token} == {"[PAD]", "[UNK]", "[MASK]"}
    assert tok.decode(ids, skip_special_tokens=True) == "dementia"


def test_medblip_tokenizer_dir_trains_on_the_ehr_corpus():
    pytest.importorskip("medvlp.datamodules.demo.adni")
    from medvlp.encoders.tokenizers import medblip_tokenizer_dir

    for kind in ("t5", "gpt2"):
        tok = AutoTokenizer.from_pretrained(medblip_tokenizer_dir(kind))
        ids = tok("Dementia")["input_ids"]
        assert tok.unk_token_id not in ids[:1]
    assert medblip_tokenizer_dir("t5") == medblip_tokenizer_dir("t5")  # cached


def test_unknown_tokenizer_kind(tmp_path):
    with pytest.raises(ValueError, match="Unknown tokenizer kind 'bpe'. Available: wordpiece, t5, gpt2"):
        build_tokenizer("bpe", CORPUS, tmp_path)


# ---------------------------------------------------------------------------------------------- building


@pytest.mark.parametrize("model, seq2seq", [("tiny_t5", True), ("tiny_gpt2", False)])
def test_stand_ins_build_offline_and_stay_frozen(tok_dirs, model, seq2seq):
    llm = make(tok_dirs, model)
    assert llm.is_seq2seq is seq2seq and llm.width == 64 and llm.dtype == torch.float32
    assert not any(p.requires_grad for p in llm.parameters())
    llm.train()
    assert llm.training and not any(m.training for m in llm.model.modules())
    assert llm.pad_token_id == llm.tokenizer.pad_token_id


def test_tokenize_padding_truncation_and_eos(tok_dirs):
    t5 = make(tok_dirs, "tiny_t5")
    ids, mask = t5.tokenize(["Dementia", "Not demented"], 60, side="left")
    assert ids.tolist()[0][0] == t5.pad_token_id and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert ids[:, -1].tolist() == [1, 1]  # T5 appends </s>
    ids, mask = t5.tokenize([CORPUS[0]], 4)
    assert ids.shape == (1, 4) and ids[0, -1] == 1  # truncated on the right, </s> kept
    assert t5.tokenize(["Dementia"], 10, add_eos=False)[0][0, -1] != 1
    gpt = make(tok_dirs, "tiny_gpt2")
    eos = gpt.eos_token_id
    plain, _ = gpt.tokenize(["Not demented"], 10)
    with_eos, _ = gpt.tokenize(["Not demented"], 10, add_eos=True)
    assert with_eos.tolist() == [plain.tolist()[0] + [eos]]
    cut, _ = gpt.tokenize([CORPUS[0]], 5, add_eos=True)
    assert cut.shape == (1, 5) and cut[0, -1] == eos
    right, rmask = gpt.tokenize(ANSWERS, 20, side="right")
    assert rmask[0].tolist() == [1] + [0] * (rmask.shape[1] - 1)


def test_decoder_only_without_pad_token_reuses_eos(tok_dirs, tmp_path):
    tok = AutoTokenizer.from_pretrained(tok_dirs["gpt2"])
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id is None
    torch.manual_seed(0)
    llm = FrozenLLM(LLMConfig(model="tiny_gpt2", tokenizer=str(tmp_path), dtype="float32"))
    assert llm.pad_token_id == llm.eos_token_id == tok.eos_token_id
    assert len(llm.tokenizer) == len(tok) == llm.model.get_input_embeddings().num_embeddings  # no new token


# --------------------------------------------------------------------------------------------- LM inputs


def test_causal_labels_mask_visual_pads_and_prompt(tok_dirs):
    llm = make(tok_dirs, "tiny_gpt2")
    p, pm, a, am = batch(llm, add_eos=True)
    q, tp = 3, p.shape[1]
    vis = torch.randn(2, q, llm.width)
    for visual_first in (False, True):
        for supervise in (False, True):
            out = llm.lm_inputs(vis, p, pm, a, am, visual_first=visual_first, supervise_prompt=supervise)
            labels, mask = out["labels"], out["attention_mask"]
            assert out["inputs_embeds"].shape == (2, tp + q + a.shape[1], llm.width)
            vis_span = slice(0, q) if visual_first else slice(tp, tp + q)
            prompt_span = slice(q, q + tp) if visual_first else slice(0, tp)
            assert (labels[:, vis_span] == IGNORE_INDEX).all() and (mask[:, vis_span] == 1).all()
            assert torch.equal(mask[:, prompt_span], pm)
            expected_prompt = p.masked_fill(pm == 0, IGNORE_INDEX) if supervise else torch.full_like(p, IGNORE_INDEX)
            assert torch.equal(labels[:, prompt_span], expected_prompt)
            assert torch.equal(labels[:, tp + q:], a.masked_fill(am == 0, IGNORE_INDEX))
            assert (labels[mask == 0] == IGNORE_INDEX).all()
            assert torch.equal(out["inputs_embeds"][:, vis_span], vis)


def test_seq2seq_labels_are_the_answer_ids(tok_dirs):
    llm = make(tok_dirs, "tiny_t5")
    p, pm, a, am = batch(llm)
    vis = torch.randn(2, 3, llm.width)
    out = llm.lm_inputs(vis, p, pm, a, am)
    assert torch.equal(out["labels"], a.masked_fill(am == 0, IGNORE_INDEX))
    assert (out["labels"][0] == IGNORE_INDEX).sum() > 0  # the short answer is padded
    assert torch.equal(out["attention_mask"], torch.cat([pm, torch.ones(2, 3, dtype=torch.long)], 1))
    assert torch.equal(out["inputs_embeds"][:, p.shape[1]:], vis)
    first = llm.lm_inputs(vis, p, pm, a, am, visual_first=True)
    assert torch.equal(first["inputs_embeds"][:, :3], vis) and torch.equal(first["attention_mask"][:, 3:], pm)
    assert "position_ids" not in out
    with pytest.raises(ValueError, match="right-padded"):
        llm.lm_inputs(vis, p, pm, a.flip(1), am.flip(1))
    with pytest.raises(ValueError, match=r"\[B=2, Q, W=64\]"):
        llm.lm_inputs(torch.randn(2, 3, 32), p, pm, a, am)


def test_position_ids_from_the_mask_skip_left_pads(tok_dirs):
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_attention_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    llm = make(tok_dirs, "tiny_gpt2")
    p, pm, a, am = batch(llm)
    assert pm[1, 0] == 0  # the short prompt is left-padded
    vis = torch.randn(2, 2, llm.width)
    out = llm.lm_inputs(vis, p, pm, a, am, positions_from_mask=True)
    pos, m = out["position_ids"], out["attention_mask"]
    for row in range(2):
        assert pos[row][m[row] == 1].tolist()[: int(pm[row].sum()) + 2] == list(range(int(pm[row].sum()) + 2))
    plain = llm.lm_inputs(vis, p, pm, a, am)["position_ids"]
    assert torch.equal(plain, torch.arange(m.shape[1]).expand(2, -1))


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_lm_loss_matches_hand_computed_cross_entropy(tok_dirs, model):
    llm = make(tok_dirs, model)
    p, pm, a, am = batch(llm, add_eos=True)
    vis = torch.randn(2, 3, llm.width)
    inputs = llm.lm_inputs(vis, p, pm, a, am, supervise_prompt=True, positions_from_mask=True)
    with torch.no_grad():
        out = llm.model(**inputs)  # HF shifts the labels itself and computes its own loss
        loss = llm.lm_loss(vis, p, pm, a, am, supervise_prompt=True, positions_from_mask=True)
    logits, labels = out.logits.float(), inputs["labels"]
    if not llm.is_seq2seq:
        logits, labels = logits[:, :-1], labels[:, 1:]
    by_hand = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, by_hand, atol=1e-5) and torch.allclose(loss, out.loss, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_gradient_reaches_visual_and_no_llm_parameter(tok_dirs, model):
    llm = make(tok_dirs, model).train()
    p, pm, a, am = batch(llm)
    vis = torch.randn(2, 3, llm.width, requires_grad=True)
    llm.lm_loss(vis, p, pm, a, am).backward()
    assert vis.grad is not None and vis.grad.abs().sum() > 0
    assert all(param.grad is None for param in llm.parameters())


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_answer_logprob_is_minus_the_summed_cross_entropy(tok_dirs, model):
    llm = make(tok_dirs, model)
    p, pm, a, am = batch(llm, add_eos=True)
    vis = torch.randn(2, 3, llm.width)
    with torch.no_grad():
        scores = llm.answer_logprob(vis, p, pm, a, am, positions_from_mask=True)
        for i in range(2):
            n = int(am[i].sum())
            single = llm.lm_loss(vis[i:i + 1], p[i:i + 1], pm[i:i + 1], a[i:i + 1, :n], am[i:i + 1, :n],
                                 positions_from_mask=True)
            assert torch.allclose(scores[i], -single * n, atol=1e-4)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and (scores < 0).all()


def test_left_padding_with_mask_positions_does_not_change_scores(tok_dirs):
    llm = make(tok_dirs, "tiny_gpt2")
    p, pm, a, am = batch(llm, add_eos=True)
    vis = torch.randn(2, 3, llm.width)
    n = int(pm[1].sum())
    with torch.no_grad():
        padded = llm.answer_logprob(vis, p, pm, a, am, positions_from_mask=True)
        alone = llm.answer_logprob(vis[1:], p[1:, -n:], pm[1:, -n:], a[1:], am[1:], positions_from_mask=True)
    assert torch.allclose(padded[1], alone[0], atol=1e-4)


def test_answer_logprob_ranks_the_trained_answer_first(tok_dirs):
    """A soft prompt briefly trained (the LLM frozen) to make the model say one answer ranks it first."""
    llm = make(tok_dirs, "tiny_gpt2")
    candidates = ["Not demented", "mild cognitive impairment (MCI)", "Dementia"]
    p, pm = llm.tokenize([QUESTION] * 3, 30, side="left")
    a, am = llm.tokenize(candidates, 20, add_eos=True)
    vis = torch.zeros(1, 2, llm.width, requires_grad=True)
    opt = torch.optim.Adam([vis], lr=0.1)
    target = 2
    for _ in range(40):
        opt.zero_grad()
        llm.lm_loss(vis, p[target:target + 1], pm[target:target + 1], a[target:target + 1], am[target:target + 1]).backward()
        opt.step()
    with torch.no_grad():
        scores = llm.answer_logprob(vis.expand(3, -1, -1), p, pm, a, am)
    assert int(scores.argmax()) == target


# -------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_generate_returns_strings(tok_dirs, model, side):
    llm = make(tok_dirs, model)
    p, pm = llm.tokenize(PROMPTS, 60, side=side)
    vis = torch.randn(2, 3, llm.width)
    for kwargs in ({}, {"num_beams": 2, "visual_first": True, "positions_from_mask": True}):
        out = llm.generate(vis, p, pm, max_new_tokens=4, **kwargs)
        assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) and s == s.strip() for s in out)


def _greedy_by_hand(llm, vis, p, pm, steps, positions_from_mask):
    """Greedy decoding with full forward passes (no cache): what ``generate`` must reproduce."""
    embed = llm.model.get_input_embeddings()
    embeds = torch.cat([embed(p), vis], 1)
    mask = torch.cat([pm, torch.ones(vis.shape[:2], dtype=torch.long)], 1)
    out = []
    for _ in range(steps):
        pos = positions_from_attention_mask(mask) if positions_from_mask else torch.arange(mask.shape[1]).expand(len(p), -1)
        nxt = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
        out.append(nxt)
        embeds = torch.cat([embeds, embed(nxt)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    eos = llm.eos_token_id
    ids = [row[: row.index(eos)] if eos in row else row for row in torch.stack(out, 1).tolist()]
    return [s.strip() for s in llm.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def test_causal_generate_continues_after_the_left_padded_prompt(tok_dirs):
    """``generate`` equals greedy decoding by hand (both position rules), and a soft prompt trained to make
    the frozen GPT-2 answer "Dementia" makes it start with that word."""
    llm = make(tok_dirs, "tiny_gpt2")
    p, pm = llm.tokenize([QUESTION, "Answer: "], 30, side="left")
    a, am = llm.tokenize(["Dementia", "Dementia"], 20, add_eos=True)
    vis = torch.zeros(1, 2, llm.width, requires_grad=True)
    opt = torch.optim.Adam([vis], lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        llm.lm_loss(vis.expand(2, -1, -1), p, pm, a, am, positions_from_mask=True).backward()
        opt.step()
    out = llm.generate(vis.detach().expand(2, -1, -1), p, pm, max_new_tokens=4, positions_from_mask=True)
    assert [s.split()[0] for s in out] == ["Dementia", "Dementia"]
    with torch.no_grad():
        for from_mask in (True, False):
            noise = torch.randn(2, 2, llm.width)
            expected = _greedy_by_hand(llm, noise, p, pm, 4, from_mask)
            assert llm.generate(noise, p, pm, max_new_tokens=4, positions_from_mask=from_mask) == expected


# ---------------------------------------------------------------------------------------- dtypes, LoRA, size


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_bf16_weights_with_fp32_visual(tok_dirs, model):
    llm = make(tok_dirs, model, dtype="bfloat16")
    ref = make(tok_dirs, model, dtype="float32")
    assert llm.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in llm.parameters())
    p, pm, a, am = batch(llm)
    vis = torch.randn(2, 3, llm.width, requires_grad=True)
    loss = llm.lm_loss(vis, p, pm, a, am)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and vis.grad.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(loss, ref.lm_loss(vis, p, pm, a, am), rtol=0.05)  # same seed: same weights, rounded
    assert len(llm.generate(vis, p, pm, max_new_tokens=3)) == 2


@pytest.mark.parametrize("model, targets", [("tiny_t5", {"q", "v"}), ("tiny_gpt2", {"c_attn"})])
def test_lora_adapters_are_the_only_trainable_parameters(tok_dirs, model, targets):
    llm = make(tok_dirs, model, dtype="bfloat16", lora=True, lora_dropout=0.1)
    trainable = {n: p for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == targets  # the default targets
    assert all(p.dtype == torch.float32 for p in trainable.values())
    llm.train()
    dropouts = [m for n, m in llm.model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.training for m in dropouts)
    assert not any(m.training for n, m in llm.model.named_modules() if "lora_" not in n)
    p, pm, a, am = batch(llm)
    vis = torch.randn(2, 3, llm.width, requires_grad=True)
    llm.lm_loss(vis, p, pm, a, am).backward()
    assert all(p.grad is not None for n, p in trainable.items() if "lora_B" in n)  # B starts at 0: A gets none yet
    assert all(p.grad is None for p in llm.parameters() if not p.requires_grad)
    assert vis.grad is not None


def test_lora_without_peft_is_a_clear_error(tok_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install peft.*medvlp\[llm\]"):
        make(tok_dirs, "tiny_gpt2", lora=True)


def test_grad_checkpointing_gives_the_same_gradient(tok_dirs):
    plain, ckpt = make(tok_dirs, "tiny_gpt2").train(), make(tok_dirs, "tiny_gpt2", grad_checkpointing=True).train()
    blocks = list(ckpt.model.transformer.h)
    assert all(b.training and b.gradient_checkpointing for b in blocks)
    assert not any(m.training for b in blocks for m in b.modules() if m is not b)  # no dropout
    p, pm, a, am = batch(plain)
    grads = []
    for llm in (plain, ckpt):
        vis = torch.ones(2, 3, llm.width, requires_grad=True)
        llm.lm_loss(vis, p, pm, a, am).backward()
        grads.append(vis.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert not any(b.training for b in ckpt.eval().model.transformer.h)


def test_config_overrides_resize_and_unknown_key_errors(tok_dirs):
    small = make(tok_dirs, "tiny_gpt2")
    big = make(tok_dirs, "tiny_gpt2", config_overrides={"n_embd": 128, "n_layer": 3, "n_head": 4})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert big.width == 128 and len(big.model.transformer.h) == 3 and count(big) > 3 * count(small)
    t5 = make(tok_dirs, "tiny_t5", config_overrides={"d_model": 96, "dense_act_fn": "gelu"})
    assert t5.width == 96 and t5.model.config.dense_act_fn == "gelu"
    with pytest.raises(ValueError, match="'n_embed' is not a field of GPT2Config"):
        make(tok_dirs, "tiny_gpt2", config_overrides={"n_embed": 128})
    with pytest.raises(ValueError, match="kind='seq2seq'"):
        make(tok_dirs, "tiny_gpt2", kind="seq2seq")


def test_builds_from_an_omegaconf_node(tok_dirs):
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(LLMConfig(model="tiny_gpt2", tokenizer=tok_dirs["gpt2"], dtype="float32", lora=True))
    cfg.lora_targets = ["c_proj"]
    cfg.config_overrides = {"n_layer": 1}
    llm = FrozenLLM(cfg)
    names = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert len(llm.hf_model.transformer.h) == 1
    assert names and all(".c_proj.lora_" in n for n in names)  # attention and MLP output projections

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medvlp.config import QFormerConfig
from medvlp.encoders.qformer import QFormer
from medvlp.encoders.text import tiny_tokenizer_dir
from medvlp.registry import TEXT_ENCODERS

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "encoder"
TEXTS = ["no pleural effusion", "the heart is enlarged with a small left pleural effusion"]
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 64, "num_query_tokens": 3, "encoder_width": 24, "dropout": 0.0}


def make(**kw) -> QFormer:
    values = {"model": "tiny", "tokenizer": str(tiny_tokenizer_dir()), **SMALL, **kw}
    return QFormer(OmegaConf.structured(QFormerConfig(**values)))


def tokens(model: QFormer, length: int = 16):
    batch = model.tokenizer(TEXTS, padding="max_length", max_length=length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@pytest.fixture(scope="module")
def qformer() -> QFormer:
    torch.manual_seed(0)
    return make().eval()


def test_registered_and_demo_config_builds():
    assert TEXT_ENCODERS.get("qformer") is QFormer
    cfg = OmegaConf.merge(OmegaConf.structured(QFormerConfig), OmegaConf.load(CONFIGS / "qformer_demo.yaml"))
    cfg.tokenizer = str(tiny_tokenizer_dir())
    model = QFormer(cfg)
    assert (model.out_dim, model.num_query_tokens, model.encoder_width, model.cross_attention_layers) == (64, 4, 64, [0])
    assert model.query_tokens.shape == (1, 4, 64)
    paper = OmegaConf.merge(OmegaConf.structured(QFormerConfig), OmegaConf.load(CONFIGS / "qformer_bert_base.yaml"))
    assert (paper.model, paper.num_query_tokens, paper.encoder_width, paper.cross_attention_freq) == ("bert-base-uncased", 32, 1408, 2)


def test_shapes_of_the_three_passes(qformer):
    ids, mask = tokens(qformer)
    image = torch.randn(2, 5, 24)
    with torch.no_grad():
        text = qformer(ids, mask, return_attention=True)
        queries = qformer.encode_queries(image)
        joint = qformer.encode_joint(image, ids, mask)
    assert text.pooled.shape == (2, 32) and text.tokens.shape == (2, 16, 32) and text.mask is mask
    assert torch.equal(text.pooled, text.tokens[:, 0])
    assert queries.shape == (2, 3, 32)
    assert joint.shape == (2, 3 + 16, 32)
    assert text.attentions.shape == (2, 2, 16, 16)
    assert torch.allclose(text.attentions.sum(-1), torch.ones(2, 2, 16), atol=1e-5)
    assert text.attentions[0, :, :, mask[0] == 0].abs().max() == 0  # padding keys get nothing
    assert torch.allclose(qformer(ids, mask).tokens, text.tokens, atol=1e-5)  # SDPA == explicit path


def test_cross_attention_exactly_in_every_second_layer():
    model = make(num_hidden_layers=12, hidden_size=16, intermediate_size=16)
    assert model.cross_attention_layers == [0, 2, 4, 6, 8, 10]
    keys = model.state_dict().keys()
    for i in range(12):
        assert any(k.startswith(f"encoder.layer.{i}.crossattention.") for k in keys) == (i % 2 == 0)
        assert f"encoder.layer.{i}.intermediate_query.dense.weight" in keys  # query FFN in every layer
    assert model.encoder.layer[0].crossattention.self.key.in_features == 24  # projected from encoder_width
    assert make(num_hidden_layers=4, cross_attention_freq=3).cross_attention_layers == [0, 3]


def test_self_attention_masks(qformer):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    only_queries = qformer.self_attention_mask(3, None, 2)
    assert only_queries.shape == (2, 1, 3, 3) and only_queries.dtype == torch.bool and bool(only_queries.all())
    text = qformer.self_attention_mask(0, mask, 2)
    assert text.shape == (2, 1, 4, 4)
    assert torch.equal(text[:, 0], mask.bool()[:, None, :].expand(2, 4, 4))  # every row: padded keys masked
    joint = qformer.self_attention_mask(3, mask, 2)
    assert joint.shape == (2, 1, 7, 7)
    assert bool(joint[:, :, :, :3].all())  # everyone sees the queries (text sees queries)
    assert torch.equal(joint[:, 0, :3, 3:], mask.bool()[:, None, :].expand(2, 3, 4))  # queries see unpadded text
    assert torch.equal(joint[:, 0, 3:, 3:], text[:, 0])  # text among itself as in the text pass
    assert not joint[1, 0, :, 5:].any()  # padded text keys masked for queries and text


def test_passes_are_independent_where_they_should_be():
    torch.manual_seed(1)
    model = make().eval()
    ids, mask = tokens(model)
    image = torch.randn(2, 5, 24)
    with torch.no_grad():
        text, queries, joint = model(ids, mask).tokens, model.encode_queries(image), model.encode_joint(image, ids, mask)
        # the text pass never touches the image path, the query pass never the text path
        for layer in model.encoder.layer:
            for module in (layer.crossattention, layer.intermediate_query, layer.output_query):
                for p in module.parameters() if module is not None else ():
                    p.add_(torch.randn_like(p))
        assert torch.equal(model(ids, mask).tokens, text)
        assert not torch.allclose(model.encode_queries(image), queries)
    model = make().eval()
    with torch.no_grad():
        queries = model.encode_queries(image)
        text = model(ids, mask).tokens
        for module in (model.embeddings.word_embeddings, model.embeddings.position_embeddings,
                       *[m for layer in model.encoder.layer for m in (layer.intermediate, layer.output)]):
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(model.encode_queries(image), queries)
        assert not torch.allclose(model(ids, mask).tokens, text)
        # in the joint pass the queries read the text and the text reads the image (through the queries)
        other_ids = ids.clone()
        other_ids[:, 1] = ids[:, 2]
        joint, swapped = model.encode_joint(image, ids, mask), model.encode_joint(image, other_ids, mask)
        assert not torch.allclose(joint[:, :3], swapped[:, :3])
        assert not torch.allclose(joint[:, 3:], model.encode_joint(image + 1, ids, mask)[:, 3:])
        # the image mask: a masked image token changes nothing
        keep = torch.ones(2, 5, dtype=torch.long)
        keep[:, -1] = 0
        noisy = image.clone()
        noisy[:, -1] = 100.0
        assert torch.allclose(model.encode_queries(image, keep), model.encode_queries(noisy, keep), atol=1e-6)
        assert torch.allclose(model.encode_queries(image[:, :-1]), model.encode_queries(image, keep), atol=1e-6)


def test_padding_ids_do_not_leak(qformer):
    ids, mask = tokens(qformer)
    other = ids.clone()
    other[mask == 0] = 7  # some real word where the padding was
    image = torch.randn(2, 5, 24)
    keep = mask.bool()
    with torch.no_grad():
        a, b = qformer(ids, mask).tokens, qformer(other, mask).tokens
        assert torch.allclose(a[keep], b[keep], atol=1e-6)
        ja, jb = qformer.encode_joint(image, ids, mask), qformer.encode_joint(image, other, mask)
    joint_keep = torch.cat([torch.ones(2, 3, dtype=torch.bool), keep], dim=1)
    assert torch.allclose(ja[joint_keep], jb[joint_keep], atol=1e-6)


def test_loads_a_bert_checkpoint_key_by_key(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    bert_cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=40, pad_token_id=tok.pad_token_id)
    torch.manual_seed(2)
    bert = BertModel(bert_cfg).eval()
    with torch.no_grad():
        for p in bert.parameters():  # no weight left at an init value (LayerNorm ones, zero biases)
            p.add_(0.1 * torch.randn_like(p))
        bert.embeddings.token_type_embeddings.weight.zero_()  # the Q-Former has no token types
    bert.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    model = QFormer(OmegaConf.structured(QFormerConfig(model=str(tmp_path), pretrained=True, num_query_tokens=2,
                                                       encoder_width=16, dropout=0.1))).eval()
    assert model.out_dim == 32 and model.cross_attention_layers == [0, 2]
    ours, theirs = model.state_dict(), bert.state_dict()
    copied = {k for k in theirs if not k.startswith(("pooler.", "embeddings.token_type"))}
    for key in copied:
        assert torch.equal(ours[key], theirs[key]), key
    new = set(ours) - copied
    assert new and all(k == "query_tokens" or any(p in k for p in (".crossattention.", ".intermediate_query.", ".output_query."))
                       for k in new)

    ids, mask = tokens(model)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        out = model(ids, mask).tokens
    assert torch.allclose(out, ref, atol=1e-5)  # the self-attention and text FFN are BERT layers

    with pytest.raises(ValueError, match=r"shape mismatch: encoder\.layer\.0\.intermediate\.dense\.weight \(48, 32\) vs ours \(40, 32\)"):
        QFormer(OmegaConf.structured(QFormerConfig(model=str(tmp_path), encoder_width=16, config_overrides={"intermediate_size": 40})))
    short = QFormer(OmegaConf.structured(QFormerConfig(model=str(tmp_path), num_layers=2, encoder_width=16)))
    assert len(short.encoder.layer) == 2 and torch.equal(short.state_dict()["encoder.layer.1.output.dense.weight"],
                                                         theirs["encoder.layer.1.output.dense.weight"])


def test_save_pretrained_parts_rebuilds_offline(tmp_path):
    torch.manual_seed(3)
    model = make(num_hidden_layers=3).eval()
    model.save_pretrained_parts(tmp_path / "text_encoder")
    # what load_run does: the saved directory, its own tokenizer, no pretrained weights; other fields at defaults
    again = QFormer(OmegaConf.structured(QFormerConfig(model=str(tmp_path / "text_encoder"), pretrained=False,
                                                       tokenizer="", dropout=0.0))).eval()
    assert (again.out_dim, again.num_query_tokens, again.encoder_width, again.cross_attention_layers) == (32, 3, 24, [0, 2])
    assert len(again.tokenizer) == len(model.tokenizer)
    again.load_state_dict(model.state_dict())
    ids, mask = tokens(model)
    image = torch.randn(2, 5, 24)
    with torch.no_grad():
        assert torch.equal(again(ids, mask).tokens, model(ids, mask).tokens)
        assert torch.equal(again.encode_queries(image), model.encode_queries(image))
        assert torch.equal(again.encode_joint(image, ids, mask), model.encode_joint(image, ids, mask))


def test_query_pass_trains_queries_and_cross_attention():
    torch.manual_seed(4)
    model = make().train()
    out = model.encode_queries(torch.randn(2, 5, 24))
    (out * torch.randn_like(out)).sum().backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    for name in ("query", "key", "value"):
        grad = getattr(model.encoder.layer[0].crossattention.self, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.encoder.layer[1].output_query.dense.weight.grad.abs().sum() > 0
    assert model.embeddings.word_embeddings.weight.grad is None  # no text in the query pass


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grad_checkpointing_gives_the_same_gradients(dropout):
    torch.manual_seed(5)
    plain = make(dropout=dropout).train()
    ckpt = make(dropout=dropout, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    ids, mask = tokens(plain)
    image, weights = torch.randn(2, 5, 24), torch.randn(2, 3 + 16, 32)
    for model in (plain, ckpt):
        torch.manual_seed(6)
        ((model.encode_joint(image, ids, mask) * weights).sum() + model(ids, mask).pooled.pow(2).sum()).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_clear_errors(qformer):
    with pytest.raises(ValueError, match=r"method\.text_encoder\.encoder_width=24.*width 40"):
        qformer.encode_queries(torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match=r"config_overrides: 'not_a_field'"):
        make(config_overrides={"not_a_field": 1})
    assert make(config_overrides={"layer_norm_eps": 1e-6}).encoder.layer[0].output.LayerNorm.eps == 1e-6
    ids = torch.ones(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match=r"65 tokens but has 64 positions"):
        qformer(ids, torch.ones_like(ids))


def test_freeze_layers_keeps_the_new_parts_trainable():
    model = make(freeze_layers=1)
    first = model.encoder.layer[0]
    assert not any(p.requires_grad for p in [*first.attention.parameters(), *first.output.parameters(),
                                             *model.embeddings.parameters()])
    assert all(p.requires_grad for p in [*first.crossattention.parameters(), *first.output_query.parameters(),
                                         *model.encoder.layer[1].parameters(), model.query_tokens])

import pytest
import torch
from omegaconf import OmegaConf

from medvlp.config import TextEncoderConfig
from medvlp.encoders.text import HFTextEncoder, pool_tokens


def test_pool_tokens_by_hand():
    tokens = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [100.0, 100.0]]])  # last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool_tokens(tokens, mask, "cls"), torch.tensor([[1.0, 5.0]]))
    assert torch.equal(pool_tokens(tokens, mask, "mean"), torch.tensor([[2.0, 2.0]]))
    assert torch.equal(pool_tokens(tokens, mask, "max"), torch.tensor([[3.0, 5.0]]))


def test_tiny_encoder_pools_and_ignores_padding():
    enc = HFTextEncoder(OmegaConf.structured(TextEncoderConfig(model="tiny", pool="mean"))).eval()
    short = enc.tokenizer(["no pleural effusion"], return_tensors="pt")
    padded = enc.tokenizer(["no pleural effusion"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        a = enc(short["input_ids"], short["attention_mask"]).pooled
        b = enc(padded["input_ids"], padded["attention_mask"]).pooled
    assert a.shape == (1, enc.out_dim)
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_pool_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected one of \['cls', 'mean', 'max'\]"):  # the schema
        HFTextEncoder(OmegaConf.structured(TextEncoderConfig(model="tiny", pool="avg")))


def test_return_attention_recomputes_the_last_layer_under_sdpa():
    enc = HFTextEncoder(OmegaConf.structured(TextEncoderConfig(model="tiny"))).eval()
    batch = enc.tokenizer(["no pleural effusion", "the heart is enlarged with a small left pleural effusion"],
                          padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        f = enc(batch["input_ids"], batch["attention_mask"], return_attention=True)
        eager = HFTextEncoder(OmegaConf.structured(TextEncoderConfig(model="tiny", attn_implementation="eager"))).eval()
        eager.load_state_dict(enc.state_dict())
        ref = eager.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True).attentions[-1]
    assert f.attentions.shape == (2, 2, 16, 16)
    assert torch.allclose(f.attentions.sum(-1), torch.ones(2, 2, 16), atol=1e-5)
    assert f.attentions[0, :, :, batch["attention_mask"][0] == 0].abs().max() == 0  # padding keys get nothing
    assert torch.allclose(f.attentions, ref, atol=1e-5)


def test_zero_position_ids_make_the_encoder_position_blind_as_mgcas_was():
    """position_ids=zeros (spec mgca.md Q19): every token at position row 0, no token-type embedding; the outputs
    then follow the tokens when two of them swap, which they do not with positions 0..T-1."""
    torch.manual_seed(0)
    blind = HFTextEncoder(OmegaConf.structured(TextEncoderConfig(model="tiny", position_ids="zeros"))).eval()
    torch.manual_seed(0)
    normal = HFTextEncoder(OmegaConf.structured(TextEncoderConfig(model="tiny"))).eval()
    assert not blind.model.embeddings.token_type_embeddings.weight.any()
    assert not blind.model.embeddings.token_type_embeddings.weight.requires_grad
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    mask = torch.ones_like(ids)
    swapped = ids[:, [0, 2, 1, 3, 4]]
    with torch.no_grad():
        out, out_sw = (blind(x, mask).tokens for x in (ids, swapped))
        ref = blind.model(input_ids=ids, attention_mask=mask, position_ids=torch.zeros_like(ids)).last_hidden_state
        n, n_sw = (normal(x, mask).tokens for x in (ids, swapped))
    assert torch.equal(out, ref)
    assert torch.allclose(out[:, [0, 2, 1, 3, 4]], out_sw, atol=1e-6)
    assert not torch.allclose(n[:, [0, 2, 1, 3, 4]], n_sw, atol=1e-4)
    with pytest.raises(ValueError, match="position_ids"):
        from medvlp.config import QFormerConfig
        from medvlp.encoders.qformer import QFormer

        QFormer(OmegaConf.structured(QFormerConfig(model="tiny", position_ids="zeros")))

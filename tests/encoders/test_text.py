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
    with pytest.raises(ValueError, match="pool='avg'"):
        HFTextEncoder(OmegaConf.structured(TextEncoderConfig(model="tiny", pool="avg")))

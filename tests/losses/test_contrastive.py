import math

import torch
import torch.nn.functional as F

from medvlp.losses import clip_loss


def test_clip_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = 2.0
    # logits i2t = 2 * [[1, .6], [0, .8]]; t2i = 2 * [[1, 0], [.6, .8]]
    def ce(row, t):
        return -(row[t] - math.log(sum(math.exp(v) for v in row)))

    i2t = (ce([2.0, 1.2], 0) + ce([0.0, 1.6], 1)) / 2
    t2i = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2
    loss, a, b = clip_loss(img, txt, scale)
    assert math.isclose(a.item(), i2t, rel_tol=1e-6) and math.isclose(b.item(), t2i, rel_tol=1e-6)
    assert math.isclose(loss.item(), (i2t + t2i) / 2, rel_tol=1e-6)


def test_clip_loss_symmetric_and_random_init_value():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(64, 32), dim=-1), F.normalize(torch.randn(64, 32), dim=-1)
    loss, a, b = clip_loss(img, txt, 1.0)
    _, b2, a2 = clip_loss(txt, img, 1.0)
    assert torch.allclose(a, a2) and torch.allclose(b, b2)
    # near-orthogonal random embeddings with scale 1: loss ~ log(B)
    assert abs(loss.item() - math.log(64)) < 0.1
    # perfectly aligned, large scale: loss -> 0
    assert clip_loss(img, img, 100.0)[0].item() < 1e-3

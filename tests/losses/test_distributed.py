"""Two gloo processes with gathering give the loss and gradients of one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medvlp.losses import clip_loss


def _full(img, txt, scale):
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    loss, _, _ = clip_loss(img, txt, scale, gather_distributed=False)
    loss.backward()
    return loss.item(), img.grad, txt.grad


def _worker(rank, world, init_file, img, txt, scale, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = img.shape[0] // world
    my_img = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    my_txt = txt[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    loss, _, _ = clip_loss(my_img, my_txt, scale, gather_distributed=True)
    loss.backward()
    out[rank] = (loss.item(), my_img.grad.clone(), my_txt.grad.clone())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gathered_loss_equals_single_process(tmp_path):
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = 5.0
    loss, g_img, g_txt = _full(img, txt, scale)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), img, txt, scale, out), nprocs=2, join=True)
    # DDP averages parameter gradients over ranks: the mean of the rank losses is the full loss and
    # half of each rank's embedding gradient is the full-batch gradient of its slice.
    assert abs((out[0][0] + out[1][0]) / 2 - loss) < 1e-5
    for r in range(2):
        assert torch.allclose(out[r][1] / 2, g_img[r * 4:(r + 1) * 4], atol=1e-6)
        assert torch.allclose(out[r][2] / 2, g_txt[r * 4:(r + 1) * 4], atol=1e-6)

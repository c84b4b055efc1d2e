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
    for local_loss in (True, False):
        my_img = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        my_txt = txt[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        loss, _, _ = clip_loss(my_img, my_txt, scale, gather_distributed=True, local_loss=local_loss)
        loss.backward()
        out[(rank, local_loss)] = (loss.item(), my_img.grad.clone(), my_txt.grad.clone())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gathered_loss_equals_single_process(tmp_path):
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = 5.0
    loss, g_img, g_txt = _full(img, txt, scale)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), img, txt, scale, out), nprocs=2, join=True)
    # DDP averages parameter gradients over ranks. Local loss with the gradient-carrying gather: the mean of
    # the rank losses is the full loss and half of each rank's embedding gradient is the full-batch gradient
    # of its slice. Plain gather: every rank's loss is the full loss and each rank's embedding gradient is
    # the full-batch gradient of its slice (so DDP's average is the full gradient over the world size).
    assert abs((out[(0, True)][0] + out[(1, True)][0]) / 2 - loss) < 1e-5
    assert abs(out[(0, False)][0] - loss) < 1e-5 and abs(out[(1, False)][0] - loss) < 1e-5
    for r in range(2):
        rows = slice(r * 4, (r + 1) * 4)
        assert torch.allclose(out[(r, True)][1] / 2, g_img[rows], atol=1e-6)
        assert torch.allclose(out[(r, True)][2] / 2, g_txt[rows], atol=1e-6)
        assert torch.allclose(out[(r, False)][1], g_img[rows], atol=1e-6)
        assert torch.allclose(out[(r, False)][2], g_txt[rows], atol=1e-6)


def _anatomy_worker(rank, world, init_file, v, t, normal, keys, cut, out):
    from medvlp.losses.anatomy import anatomy_itc

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    lo, hi = (0, cut) if rank == 0 else (cut, v.shape[0])
    for with_grad in (False, True):
        my_v, my_t = v[lo:hi].clone().requires_grad_(True), t[lo:hi].clone().requires_grad_(True)
        tau = torch.tensor(0.1, requires_grad=True)
        loss = anatomy_itc(my_v, my_t, normal[lo:hi], keys[lo:hi], tau, with_grad=with_grad)
        loss.backward()
        out[(rank, with_grad)] = (loss.item(), my_v.grad.clone(), my_t.grad.clone(), tau.grad.clone())
    empty = anatomy_itc(v[:0], t[:0], normal[:0], keys[:0], 0.1) if rank == 1 else anatomy_itc(v, t, normal, keys, 0.1)
    out[(rank, "empty")] = None if empty is None else empty.item()  # rank 1 has no sample of this anatomy
    dist.barrier()  # both ranks done before the process group goes away
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fvlm_anatomy_loss_of_uneven_processes_equals_one_process(tmp_path):
    """fVLM's per-anatomy loss with 5 samples on one process and 3 on the other (padded gather + mask): the
    loss of every process is the one-process loss; with the plain gather each process's embedding gradients
    are the one-process gradients of its rows, with the gradient-carrying gather twice them (DDP then averages);
    a process without a sample of the anatomy gathers nothing and returns None."""
    from medvlp.losses.anatomy import anatomy_itc, text_keys

    torch.manual_seed(0)
    v, t = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    normal = torch.tensor([True, False, True, False, False, True, False, True])
    keys = text_keys(["n", "effusion.", "n2", "nodule.", "effusion.", "n3", "mass.", "n4"])
    full_v, full_t = v.clone().requires_grad_(True), t.clone().requires_grad_(True)
    tau = torch.tensor(0.1, requires_grad=True)
    loss = anatomy_itc(full_v, full_t, normal, keys, tau, gather_distributed=False)
    loss.backward()
    out = mp.Manager().dict()
    mp.spawn(_anatomy_worker, args=(2, str(tmp_path / "init"), v, t, normal, keys, 5, out), nprocs=2, join=True)
    for with_grad, factor in ((False, 1.0), (True, 2.0)):
        for rank, rows in ((0, slice(0, 5)), (1, slice(5, 8))):
            value, gv, gt, gtau = out[(rank, with_grad)]
            assert abs(value - loss.item()) < 1e-5
            assert torch.allclose(gv, factor * full_v.grad[rows], atol=1e-5)
            assert torch.allclose(gt, factor * full_t.grad[rows], atol=1e-5)
            assert torch.allclose(gtau, tau.grad, atol=1e-5)  # tau scales the gathered logits on every process
    assert out[(1, "empty")] is None and abs(out[(0, "empty")] - anatomy_itc(v, t, normal, keys, 0.1, gather_distributed=False).item()) < 1e-5

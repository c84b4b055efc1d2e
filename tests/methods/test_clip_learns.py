"""CLIP measurably learns the synthetic world (2D and 3D) - and the same checks fail untrained.

The runs are the session's shared learning runs (``tests/learning.py``): 2D 100 steps (under a minute
on 2 idle cores, in the default suite, also used by the contract and transfer tests), 3D 600 steps
(with the slow tests).
"""

import pytest

from medvlp import api
from medvlp import config as C


def test_clip_learns_2d_demo(learned):
    learned["clip"].assert_learned()


@pytest.mark.slow
def test_clip_learns_3d_demo(learned):
    learned["clip_3d"].assert_learned()


@pytest.mark.gpu
@pytest.mark.parametrize("experiment", [None, "clip_vit_demo.yaml"])
def test_fit_bf16_on_cuda(tmp_path, experiment):
    """The demo fit in bf16 mixed precision on one GPU (the CNN default and the ViT variant)."""
    config_file = str(C.config_dir() / "experiment" / experiment) if experiment else None
    cfg = C.compose(method="clip", data="demo_cxr", trainer="gpu", config_file=config_file,
                    overrides=[f"run.out_dir={tmp_path}", "trainer.max_steps=20", "trainer.devices=1",
                               "trainer.enable_progress_bar=false"])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    run_dir = api.fit(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    res = api.evaluate(run_dir, tasks=("retrieval",))
    assert res["retrieval"]["image_to_text"]["R@5"] > 0


@pytest.mark.gpu
def test_vit_step_uses_flash_or_efficient_sdpa_in_bf16():
    """On CUDA in bf16 both encoders of the ViT variant run a fused SDPA kernel (no math fallback)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from medvlp.batch import ImageTextBatch
    from medvlp.registry import METHODS

    cfg = C.compose(config_file=str(C.config_dir() / "experiment" / "clip_vit_demo.yaml"), overrides=["data.root=/unused"])
    C.resolve(cfg)
    m = METHODS.get("clip")(cfg.method, cfg.optim).cuda()
    tok = m.tokenizer(["no pleural effusion"] * 8, padding="max_length", max_length=32, return_tensors="pt")
    batch = ImageTextBatch(images=torch.randn(8, 1, 64, 64), input_ids=tok["input_ids"],
                           attention_mask=tok["attention_mask"], study_ids=[str(i) for i in range(8)])
    batch = ImageTextBatch(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in vars(batch).items()})
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(m.losses(batch).values())
        loss.backward()
    assert torch.isfinite(loss)

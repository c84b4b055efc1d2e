"""``medvlp fit --method clip --data mimic_cxr data.root=<fixture>`` trains on the tiny MIMIC fixture."""

from __future__ import annotations

from conftest import write_mimic

from medvlp.cli import main


def test_cli_fit_on_the_mimic_fixture(tmp_path):
    fx = write_mimic(tmp_path / "mimic-cxr-jpg")
    out = tmp_path / "runs"
    cmd = ["fit", "--method", "clip", "--data", "mimic_cxr", f"data.root={fx.root}",
           f"run.out_dir={out}", "trainer.max_steps=3", "data.num_workers=0", "trainer.enable_progress_bar=false"]
    assert main(cmd) == 0  # the command line's main, in this process (the imports are paid once per session)
    (run,) = list(out.iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert "data:\n  name: mimic_cxr" in (run / "config.yaml").read_text()
    assert (run / "metrics.csv").read_text().count("\n") >= 2


def test_cli_fit_on_the_ct_rate_fixture_from_the_preprocessed_cache(tmp_path, ct_root):
    """`medvlp preprocess --data ct_rate` then `medvlp fit --method clip --data ct_rate` with the 3D ViT,
    reading only the cache (data.use_preprocessed=true)."""
    cache = tmp_path / "cache"
    data = [f"data.root={ct_root}", "data.spacing=[5.0,1.6,1.6]", "data.size=[8,32,32]", f"data.preprocessed_dir={cache}"]
    assert main(["preprocess", "--data", "ct_rate", *data, "--workers", "1", "--no-progress"]) == 0
    out = tmp_path / "runs"
    cmd = ["fit", "--method", "clip", "--data", "ct_rate", *data,
           "data.use_preprocessed=true", "data.batch_size=2", "data.max_length=32", "data.num_workers=0",
           "method.image_encoder.name=vit3d", "method.image_encoder.img_size=[8,32,32]",
           "method.image_encoder.patch_size=[4,16,16]", "method.image_encoder.width=32", "method.image_encoder.depth=1",
           "method.image_encoder.heads=2", "method.image_encoder.in_chans=1", "method.image_encoder.pretrained=false",
           f"run.out_dir={out}", "trainer.max_steps=3", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1"]
    assert main(cmd) == 0
    (run,) = list(out.iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "name: ct_rate" in (run / "config.yaml").read_text() and "name: vit3d" in (run / "config.yaml").read_text()

"""HLIP measurably learns the synthetic 3D worlds - one scan per study (chest CT) and padded multi-scan
studies (brain MRI, 1-4 series each) - and the same checks fail untrained. About 1.5-2 minutes each on
2 idle cores."""

import torch
from conftest import demo_overrides, train_and_check

from medvlp import config as C


def test_hlip_learns_the_ct_demo(tmp_path):
    cfg, _, _, trained = train_and_check(0.70, config_file=str(C.config_dir() / "experiment" / "hlip_demo_ct.yaml"),
                                         overrides=demo_overrides(tmp_path, 1050))
    assert cfg.method.image_encoder.levels == ["slice", "scan", "study", "slice", "scan", "study"]


def test_hlip_learns_multi_scan_brain_studies_in_padded_mode(tmp_path):
    cfg, run_dir, _, trained = train_and_check(0.70, config_file=str(C.config_dir() / "experiment" / "hlip_demo_brain.yaml"),
                                               overrides=demo_overrides(tmp_path, 500))
    assert cfg.data.scan_sampling == "pad" and cfg.data.num_scans == 4
    from medvlp import api

    method, cfg = api.load_run(run_dir)
    api.resolve_data_root(cfg)
    dm = api.build_datamodule(cfg, tokenizer=method.tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[1] <= 4 and not batch.scan_mask.all()  # a padded batch
    counts = batch.scan_mask.sum(1)
    assert len(set(counts.tolist())) > 1
    with torch.no_grad():
        method.eval()
        emb = method.embed_images(batch.images, batch.scan_mask)
        i = int(counts.argmin())
        alone = method.embed_images(batch.images[i : i + 1, : int(counts[i])])
    assert (emb[i] - alone[0]).abs().max() < 1e-5

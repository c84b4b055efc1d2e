"""HLIP measurably learns the synthetic 3D worlds - one scan per study (chest CT) and padded multi-scan
studies (brain MRI, 1-4 series each) - and the same checks fail untrained. About 1.5-2 minutes each on
2 idle cores: the chest CT run is in the default suite (shared with the contract suite), the brain-MRI
one with the slow tests."""

import pytest
import torch


def test_hlip_learns_the_ct_demo(learned):
    r = learned["hlip"]
    r.assert_learned()
    assert r.cfg.method.image_encoder.levels == ["slice", "scan", "study", "slice", "scan", "study"]


@pytest.mark.slow
def test_hlip_learns_multi_scan_brain_studies_in_padded_mode(learned):
    r = learned["hlip_brain"]
    r.assert_learned()
    cfg, run_dir = r.cfg, r.run_dir
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

"""The 2D radiograph pipeline's crop (``data.crop_from``): MGCA's 256 -> 224 classification input and G2D's
zero-shot input - letterbox to 256, then the centre 224 square at evaluation, a random one in training -
with boxes and masks cut alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp.datamodules.transforms import CXRTransform, pad_to_square, resize_longest_side, to_float_image


def image(h=300, w=240):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def test_centre_crop_of_the_256_letterbox_is_torchvision_centre_crop():
    gray = image()
    t = CXRTransform(image_size=224, channels=1, augment=False, crop_from=256, mean=0.0, std=1.0)
    out = t(gray)
    box = pad_to_square(resize_longest_side(to_float_image(gray), 256))
    top = int(round((256 - 224) / 2.0))  # torchvision CenterCrop's offset: 16
    assert out.shape == (1, 224, 224) and top == 16
    assert torch.equal(out, box[..., top:top + 224, top:top + 224])
    plain = CXRTransform(image_size=224, channels=1, augment=False, mean=0.0, std=1.0)(gray)
    assert not torch.allclose(out, plain)  # 0 = letterbox straight to 224, the whole image


def test_boxes_and_masks_follow_the_crop():
    gray = image(256, 256)  # letterbox = identity at 256: boxes in input pixels
    mask = np.zeros((256, 256), np.uint8)
    mask[100:140, 20:60] = 1
    boxes = np.array([[20, 100, 60, 140], [0, 0, 10, 10]], np.float32)  # the second leaves the centre crop
    t = CXRTransform(image_size=224, channels=1, augment=False, crop_from=256)
    _, b, m = t.apply(gray, boxes=boxes, mask=mask)
    assert torch.equal(b[0], torch.tensor([4.0, 84.0, 44.0, 124.0]))  # shifted by (16, 16)
    assert torch.equal(b[1], torch.zeros(4))  # clipped to the crop: empty
    assert m.shape == (224, 224) and int(m.sum()) == 40 * 40 and int(m[84:124, 4:44].sum()) == 1600


def test_random_crop_in_training_is_seeded_and_inside_the_letterbox():
    gray = image()
    t = CXRTransform(image_size=224, channels=1, augment=True, crop_from=256, degrees=0.0, translate=0.0, scale=[1.0, 1.0],
                     mean=0.0, std=1.0)
    box = pad_to_square(resize_longest_side(to_float_image(gray), 256))
    seen = set()
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        top, left = t.crop_offset(True, torch.Generator().manual_seed(seed))
        out = t(gray, train=True, generator=g)
        assert 0 <= top <= 32 and 0 <= left <= 32
        assert torch.equal(out, box[..., top:top + 224, left:left + 224])
        seen.add((top, left))
    assert len(seen) > 1
    with pytest.raises(ValueError, match="crop_from=200 must be 0"):
        CXRTransform(image_size=224, crop_from=200)


def test_datamodule_reads_and_caches_at_the_letterbox_size(tmp_path):
    from medvlp import api
    from medvlp import config as C

    cfg = C.compose(method="clip", data="demo_chexpert", overrides=["data.image_size=32", "data.crop_from=40",
                                                                    "data.use_preprocessed=false"])
    api.resolve_data_root(cfg)
    dm = api.build_datamodule(cfg)
    assert dm.read_size == 40 and dm.transform.crop_from == 40
    rec = dm.records("test")[0]
    img = dm.load_image(rec, train=False)
    assert img.shape[-2:] == (32, 32)
    from medvlp.datamodules import cache

    assert cache.settings(dm)["image_size"] == 40 and "data.crop_from=40" in cache.command(dm)
    bad = C.compose(method="clip", data="demo_chexpert", overrides=["data.image_size=32", "data.crop_from=16"])
    api.resolve_data_root(bad)
    with pytest.raises(ValueError, match="data.crop_from=16 must be 0"):
        api.build_datamodule(bad)

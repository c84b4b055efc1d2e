"""Synthetic Object-CXR data in the MIDL 2020 release layout (``specs/datasets.md`` §5).

:func:`write_object_cxr` writes any list of :class:`ObjectCxrItem` (a gray image, its objects
and its name) as

```
train.csv  dev.csv        image_name,annotation     (empty annotation = no object)
test.csv                  image_path,annotation     (image_path = test/<name>)
train/<name>.jpg  dev/<name>.jpg  test/<name>.jpg
```

An annotation is ``;``-separated objects ``TYPE x1 y1 x2 y2 ...`` (integers, original pixels): 0
rectangle and 1 ellipse by their bounding box, 2 polygon by its vertices. The tiny dataset of §5.5
(``write_object_cxr_fixture``) lives in ``tests/format_fixtures.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvlp.datamodules.demo._util import soft, write_csv

SPLITS = ("train", "dev", "test")


@dataclass
class ObjectCxrItem:
    """One image of the synthetic Object-CXR set.

    ``objects`` are ``(type, coords)``: type 0 rectangle / 1 ellipse with ``coords`` ``(x1, y1, x2,
    y2)``, type 2 polygon with ``(x1, y1, ..., xn, yn)``; integers in pixels of ``image``
    (``[H, W]`` uint8, dense = bright).
    """

    image_name: str  # e.g. "00001.jpg"
    image: np.ndarray
    objects: Sequence[tuple[int, Sequence[int]]] = ()
    split: str = "train"  # train | dev | test

    def annotation(self) -> str:
        """The CSV cell: ``"0 x1 y1 x2 y2;2 x1 y1 ..."`` or ``""``."""
        return ";".join(f"{int(t)} " + " ".join(str(int(v)) for v in coords) for t, coords in self.objects)


def write_object_cxr(root: str | Path, items: Sequence[ObjectCxrItem], quality: int = 90) -> Path:
    """Write ``items`` in the Object-CXR layout under ``root`` (every CSV is written, possibly empty).

    Args:
        root: dataset root (created).
        items: images with their split.
        quality: JPEG quality.

    Returns:
        ``root``.
    """
    from PIL import Image

    root = Path(root)
    rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    for it in items:
        if it.split not in SPLITS:
            raise ValueError(f"item {it.image_name}: split '{it.split}' is not one of {SPLITS}")
        path = root / it.split / it.image_name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(it.image, dtype=np.uint8), mode="L").save(path, format="JPEG", quality=quality)
        name = f"test/{it.image_name}" if it.split == "test" else it.image_name
        rows[it.split].append([name, it.annotation() or None])
    write_csv(root / "train.csv", ["image_name", "annotation"], rows["train"])
    write_csv(root / "dev.csv", ["image_name", "annotation"], rows["dev"])
    write_csv(root / "test.csv", ["image_path", "annotation"], rows["test"])
    return root


def _draw(image: np.ndarray, objects: Sequence[tuple[int, Sequence[int]]]) -> np.ndarray:
    """Paint each object bright (metal is radio-opaque) inside its bounding box."""
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    img = image.astype(np.float32)
    for _, coords in objects:
        xs, ys = coords[0::2], coords[1::2]
        x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
        inside = soft(xx - x1, 0.5) * soft(x2 - xx, 0.5) * soft(yy - y1, 0.5) * soft(y2 - yy, 0.5)
        img = img + (250 - img) * 0.8 * inside
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)

"""Images/s of the 2D training read path: decoding full-size files on the fly vs the ``medvlp preprocess`` cache.

Not a test. Writes a few full-size (about 2,500 x 3,000 px) synthetic chest X-rays into a temporary
folder laid out as the real datasets:

* ``jpeg``: MIMIC-CXR-JPG (the demo writer's CSVs and reports; its JPEGs replaced by full-size ones);
* ``dicom16``: RSNA Pneumonia, uncompressed 12-bit-in-16 DICOMs with a VOI window (like CR/DX exports);
* ``dicom-jpeg8``: RSNA Pneumonia, JPEG Baseline 8-bit DICOMs (as Kaggle's RSNA / SIIM files),

then measures, at ``data.image_size`` (default 224) with ``num_workers`` 0 and 2:

* on the fly: ``RecordDataset`` over every record, ``train=True`` (decode + letterbox + random affine);
* cached: the same after ``preprocess`` (``data.use_preprocessed=true``);
* the ``preprocess`` throughput itself (``--workers`` processes).

Run: ``python benchmarks/preprocess_io.py [--n 16] [--size 224] [--workers 2] [--keep DIR]``.
The machine's load matters (``os.getloadavg`` is printed); compare ratios, not absolute figures. With
``num_workers=0`` this process runs torch with ``--threads`` intra-op threads (default 1, as in DataLoader
workers): on a busy 2-core machine two OpenMP threads make the small per-sample ops (affine warp of a
224-px image) tens of times slower, which would swamp the read cost being measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL = (3000, 2500)  # (H, W) of a full-size chest X-ray


def big_radiograph(seed: int, height: int = FULL[0], width: int = FULL[1], boxes=()) -> np.ndarray:
    """uint8 ``[H, W]``: the fixtures' synthetic chest image drawn at 1/8 size, enlarged, plus film grain."""
    from PIL import Image

    from medvlp.datamodules.demo._util import rng_for
    from medvlp.datamodules.demo.rsna import synthetic_radiograph

    small = synthetic_radiograph(rng_for(seed, 7), height // 8, width // 8, [tuple(v / 8 for v in b) for b in boxes])
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = np.random.default_rng(seed).normal(0, 3, size=(height, width)).astype(np.int16)
    return np.clip(img + grain, 0, 255).astype(np.uint8)


def write_jpeg_dataset(root: Path, n: int) -> int:
    """MIMIC-CXR-JPG layout whose frontal JPEGs are full size; returns the number of images replaced."""
    from PIL import Image

    from medvlp.datamodules.demo import cxr

    studies = 12
    while True:  # enough studies for n usable frontal images
        shutil.rmtree(root, ignore_errors=True)
        cxr.write_dataset(root, studies, seed=0)
        from medvlp.datamodules.mimic_cxr import MimicCXRConfig, MimicCXRDataModule

        dm = MimicCXRDataModule(MimicCXRConfig(root=str(root)))
        paths = [r.image_path for s in ("train", "val", "test") for r in dm.records(s)]
        if len(paths) >= n or studies > 40 * n:
            break
        studies *= 2
    for i, path in enumerate(paths):
        Image.fromarray(big_radiograph(i)).save(path, quality=95)
    return len(paths)


def write_rsna_dataset(root: Path, n: int, kind: str) -> int:
    """RSNA stage-2 layout with ``n`` full-size DICOMs: ``dicom16`` (uncompressed, 12 bits stored, a
    VOI window) or ``dicom-jpeg8`` (JPEG Baseline); one opacity box each."""
    from medvlp.datamodules.demo.dicom import write_dicom
    from medvlp.datamodules.demo.rsna import RsnaItem, write_rsna

    boxes = [(600.0, 900.0, 1100.0, 1700.0)]
    items = []
    for i in range(n):
        image = big_radiograph(100 + i, boxes=boxes)
        syntax = "jpeg_baseline" if kind == "dicom-jpeg8" else "explicit"
        items.append(RsnaItem(patient_id=f"00000000-0000-4000-8000-{i:012d}", image=image, boxes=boxes,
                              transfer_syntax=syntax))
    write_rsna(root, items)
    if kind == "dicom16":
        for it in items:  # the same image as 12-bit values in a 16-bit word, with a window
            stored = (it.image.astype(np.uint16) * 16 + np.random.default_rng(0).integers(0, 16, it.image.shape, dtype=np.uint16))
            write_dicom(root / "stage_2_train_images" / f"{it.patient_id}.dcm", stored, bits_stored=12,
                        tags={"PatientID": it.patient_id, "ViewPosition": it.view}, window=(2048.0, 4096.0))
    return n


def stack(items):
    import torch

    return torch.stack([it["image"] for it in items if it is not None])


def rate(dm, workers: int, min_images: int, repeat: int) -> float:
    """images/s of RecordDataset(train=True) over every record (repeated to at least ``min_images``);
    the best of ``repeat`` passes (the machine is shared: the best pass is the least disturbed)."""
    import torch
    from torch.utils.data import DataLoader

    from medvlp.datamodules.base import RecordDataset

    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    dm.preprocessed()  # resolve (and log) once, before the workers fork
    reps = max(1, -(-min_images // len(recs)))
    ds = RecordDataset(dm, recs * reps, train=True)
    best = 0.0
    for _ in range(repeat):
        loader = DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=stack)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        n = sum(len(b) for b in loader)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def read_ms(dm, min_images: int, repeat: int) -> float:
    """Milliseconds per image of ``read_image`` alone (decode or cache read, no transform), in this process."""
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    dm.preprocessed()
    reps = max(1, -(-min_images // len(recs)))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for rec in recs * reps:
            dm.read_image(rec, train=True)
        best = min(best, (time.perf_counter() - t0) / (len(recs) * reps) * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16, help="full-size images per format (default 16)")
    ap.add_argument("--size", type=int, default=224, help="data.image_size (default 224)")
    ap.add_argument("--workers", type=int, default=2, help="preprocess worker processes (default 2)")
    ap.add_argument("--keep", metavar="DIR", help="write (and keep) the datasets and caches in DIR")
    ap.add_argument("--formats", default="jpeg,dicom16,dicom-jpeg8")
    ap.add_argument("--repeat", type=int, default=3, help="passes per measurement; the best is reported (default 3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of this process (num_workers 0); DataLoader workers use 1 (default 1)")
    args = ap.parse_args(argv)

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("medvlp").setLevel(logging.WARNING)
    from medvlp import preprocess as P
    from medvlp.datamodules.mimic_cxr import MimicCXRConfig, MimicCXRDataModule
    from medvlp.datamodules.rsna import RSNAConfig, RSNAPneumoniaDataModule

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medvlp-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"cpu cores: {os.cpu_count()}  torch threads: {torch.get_num_threads()}  load average: "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}  folder: {base}", flush=True)
    rows = []
    try:
        for fmt in args.formats.split(","):
            root = base / fmt
            t0 = time.perf_counter()
            if fmt == "jpeg":
                n = write_jpeg_dataset(root, args.n)
                make = lambda root=root, **kw: MimicCXRDataModule(MimicCXRConfig(root=str(root), **kw))  # noqa: E731
            else:
                n = write_rsna_dataset(root, args.n, fmt)
                make = lambda root=root, **kw: RSNAPneumoniaDataModule(  # noqa: E731
                    RSNAConfig(root=str(root), task="detection", **kw))
            files = [p for p in root.rglob("*") if p.suffix in (".jpg", ".dcm")]
            mb = sum(p.stat().st_size for p in files) / n / 1e6
            print(f"{fmt}: wrote {n} images ({mb:.1f} MB each) in {time.perf_counter() - t0:.0f} s", flush=True)
            cache = base / f"{fmt}-cache"
            common = dict(image_size=args.size, preprocessed_dir=str(cache), augment=True)
            fly = {w: rate(make(use_preprocessed="false", **common), w, n, args.repeat) for w in (0, 2)}
            fly_ms = read_ms(make(use_preprocessed="false", **common), n, args.repeat)
            summary = P.preprocess(make(**common).cfg, workers=args.workers, progress=False)
            assert summary.failed == 0 and summary.done == n, summary.format()
            cached = {w: rate(make(use_preprocessed="true", **common), w, 40 * n, args.repeat) for w in (0, 2)}
            cache_ms = read_ms(make(use_preprocessed="true", **common), 40 * n, args.repeat)
            rows.append((fmt, n, mb, fly, cached, fly_ms, cache_ms, summary.images_per_second))
            print(f"  on the fly {fly[0]:.1f} / {fly[2]:.1f} img/s, cache {cached[0]:.0f} / {cached[2]:.0f} img/s "
                  f"(workers 0 / 2); read_image {fly_ms:.1f} vs {cache_ms:.2f} ms; preprocess "
                  f"{summary.images_per_second:.1f} img/s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print(f"\nimage_size {args.size}; images/s of the training read path (decode or cache read + letterbox + "
          f"random affine) with num_workers 0 / 2, best of {args.repeat}; read_image alone in ms per image; "
          f"preprocess with {args.workers} workers")
    head = (f"{'format':<12} {'n':>3} {'MB/img':>6} | {'on the fly w0':>13} {'w2':>6} | {'cache w0':>8} {'w2':>6} | "
            f"{'speed-up w0':>11} {'w2':>5} | {'read ms fly':>11} {'cache':>6} {'x':>5} | {'preprocess':>10}")
    print(head)
    print("-" * len(head))
    for fmt, n, mb, fly, cached, fly_ms, cache_ms, pre in rows:
        print(f"{fmt:<12} {n:>3} {mb:>6.1f} | {fly[0]:>13.1f} {fly[2]:>6.1f} | {cached[0]:>8.0f} {cached[2]:>6.0f} | "
              f"{cached[0] / fly[0]:>10.0f}x {cached[2] / fly[2]:>4.0f}x | {fly_ms:>11.1f} {cache_ms:>6.2f} "
              f"{fly_ms / cache_ms:>4.0f}x | {pre:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

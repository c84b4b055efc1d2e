"""Volumes/s of the 3D training read path: decoding full-size CT-RATE NIfTIs on the fly vs the
``medvlp preprocess`` cache.

Not a test. Writes the synthetic CT world in the CT-RATE layout into a temporary folder and replaces
its v2 (``*_fixed``, int16 HU) volumes by full-size ones: each is enlarged to 512 x 512 pixels in
plane and ``--slices`` slices (the same physical extent, finer spacing; a real CT-RATE volume is
512 x 512 x 100-600 at about 0.7 x 0.7 x 1-3 mm). Then, with ``data.version=v2`` (the other
volumes are skipped and counted), it measures ``CTRateDataModule.load_image`` over every record at
HLIP-like settings (spacing 3 x 1 x 1 mm, crop 112 x 336 x 336, window -1150..350 HU):

* on the fly: read .nii.gz -> orient -> resample -> HU check -> crop -> window -> normalise;
* cached: after ``preprocess`` (int16 HU, memory-mapped) -> crop -> window -> normalise;
* the ``preprocess`` throughput itself (``--workers`` processes).

Run: ``python benchmarks/preprocess_volumes.py [--patients 24] [--slices 300] [--workers 2] [--repeat 3] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def enlarge(path: Path, inplane: int, slices: int) -> None:
    """Resample the NIfTI at ``path`` to ``inplane x inplane x slices`` voxels over the same extent (int16)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    size = img.GetSize()
    new_size = (inplane, inplane, slices)
    spacing = [sp * n / m for sp, n, m in zip(img.GetSpacing(), size, new_size)]
    out = sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                        img.GetDirection(), -1024.0, sitk.sitkInt16)
    sitk.WriteImage(out, str(path), useCompression=True)


def timed_reads(dm, records, repeat: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeat):
        for rec in records:
            dm.load_image(rec, train=False)
            n += 1
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--inplane", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="passes over the records for each timing")
    ap.add_argument("--keep", default="", help="write the data here and keep it (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    from medvlp import preprocess as P
    from medvlp.datamodules.base import DataError
    from medvlp.datamodules.ct_rate import CTRateConfig, CTRateDataModule
    from medvlp.datamodules.demo import ct

    torch.set_num_threads(1)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medvlp-bench3d-"))
    root = base / "ct_rate"
    shutil.rmtree(root, ignore_errors=True)
    ct.write_dataset(root, args.patients, seed=0)
    fixed = sorted(root.rglob("*_fixed/**/*.nii.gz"))
    t0 = time.perf_counter()
    for path in fixed:
        enlarge(path, args.inplane, args.slices)
    mb = sum(p.stat().st_size for p in fixed) / len(fixed) / 2**20
    print(f"{len(fixed)} full-size volumes ({args.inplane} x {args.inplane} x {args.slices}, {mb:.0f} MB .nii.gz each) "
          f"written in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")

    common = dict(root=str(root), version="v2", on_error="skip", reconstructions="all", spacing=[3.0, 1.0, 1.0],
                  size=[112, 336, 336], preprocessed_dir=str(base / "cache"), exclude=[])
    splits = ("train", "val", "test")

    raw_dm = CTRateDataModule(CTRateConfig(use_preprocessed="false", **common))
    records, used = [], []
    for split in splits:
        try:
            records += raw_dm.records(split)
            used.append(split)
        except DataError:  # a split without any v2 volume
            continue
    raw_s, n = timed_reads(raw_dm, records, args.repeat)

    shutil.rmtree(base / "cache", ignore_errors=True)
    summary = P.preprocess(CTRateConfig(**common), splits=used, workers=args.workers, progress=False)
    print(summary.format())

    cached_dm = CTRateDataModule(CTRateConfig(use_preprocessed="true", **common))
    cached_s, _ = timed_reads(cached_dm, records, args.repeat)
    stored = sum(f.stat().st_size for f in (base / "cache").rglob("*.npy")) / max(1, summary.done) / 2**20
    print(f"on the fly : {n / raw_s:7.2f} volumes/s  ({raw_s / n * 1000:.0f} ms per volume)")
    print(f"from cache : {n / cached_s:7.2f} volumes/s  ({cached_s / n * 1000:.0f} ms per volume, {stored:.1f} MB int16 each)")
    print(f"speed-up   : {raw_s / cached_s:.1f}x")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

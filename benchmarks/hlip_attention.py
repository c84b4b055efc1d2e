"""Forward time and peak memory of HLIP's hierarchical attention vs study-level-only attention as the
number of scans per study grows (``specs/methods/hlip.md`` §2.5: a scan block costs ``N (d h w)^2``
attention scores per study, a study block ``(N d h w)^2``).

Not a test. For each N in ``--scans`` and each level pattern it builds an ``hlip_vit`` (random init),
runs ``--repeat`` timed forward passes on a batch of studies ``[B, N, 1, D, H, W]`` (after one warm-up),
and reports the median time and the peak memory of that forward:

* ``study``  - every block attends across the whole study (full attention);
* ``parity`` - HLIP's MRI pattern, scan blocks 0,1,3,4,6,7,9,10 and study blocks 2,5,8,11;
* ``slice``  - (``--with-slice``) the three-level pattern slice, scan, study.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU each measurement runs in a fresh
process and the peak is the growth of its resident set (``VmHWM``) during the forward passes.
``--grad`` times forward + backward instead (training).

Run: ``python benchmarks/hlip_attention.py [--scans 1 2 4 8] [--size 48 112 112] [--patch 8 16 16]
[--width 192] [--depth 12] [--batch 1] [--device cpu|cuda] [--grad]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATTERNS = {
    "study": ["study"] * 12,
    "parity": ["scan", "scan", "study"] * 4,
    "slice": ["slice", "scan", "study"] * 4,
}


def rss_peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def rss_now_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(args: argparse.Namespace, pattern: str, n: int) -> dict:
    """One (pattern, N) measurement in this process."""
    import torch

    from medvlp.config import ImageEncoderConfig
    from medvlp.encoders.hlip_vit import HierarchicalViT

    torch.manual_seed(0)
    levels = (PATTERNS[pattern] * ((args.depth + 11) // 12))[: args.depth]
    cfg = ImageEncoderConfig(name="hlip_vit", in_chans=1, img_size=list(args.size), patch_size=list(args.patch),
                             width=args.width, depth=args.depth, heads=max(1, args.width // 64), levels=levels,
                             sequence_pos_embed=True, pos_embed="sincos", pretrained=False)
    device = torch.device(args.device)
    model = HierarchicalViT(cfg).to(device)
    model.train(args.grad)
    x = torch.randn(args.batch, n, 1, *args.size, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctx = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        if args.grad:
            with ctx:
                out = model(x).pooled.float().sum()
            out.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), ctx:
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    base_kb = rss_now_kb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = max(0, rss_peak_kb() - base_kb) / 1024
    grid = [s // p for s, p in zip(args.size, args.patch, strict=True)]
    tokens = grid[0] * grid[1] * grid[2]
    scores = sum({"slice": n * grid[0] * (grid[1] * grid[2] + 1) ** 2, "scan": n * (tokens + 1) ** 2,
                  "study": (n * tokens + 1) ** 2}[lv] for lv in levels)
    return {"pattern": pattern, "scans": n, "tokens": n * tokens, "seconds": statistics.median(times),
            "peak_mb": peak_mb, "attention_scores": scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scans", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--size", type=int, nargs=3, default=[48, 112, 112], metavar=("D", "H", "W"))
    p.add_argument("--patch", type=int, nargs=3, default=[8, 16, 16])
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grad", action="store_true", help="forward + backward (training mode)")
    p.add_argument("--with-slice", action="store_true", help="also the slice / scan / study pattern")
    p.add_argument("--one", nargs=2, metavar=("PATTERN", "N"), help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one[0], int(args.one[1]))))
        return
    patterns = ["study", "parity"] + (["slice"] if args.with_slice else [])
    print(f"hlip_vit width {args.width}, depth {args.depth}, scans {args.size} at patch {args.patch}, batch {args.batch}, "
          f"{args.device}, {'forward + backward' if args.grad else 'forward'}")
    print(f"{'scans':>5} {'tokens':>7} " + " ".join(f"{pat + ' s':>10} {pat + ' MB':>10}" for pat in patterns)
          + f" {'score ratio':>12}")
    passthrough = sys.argv[1:]
    for n in args.scans:
        row = {}
        for pat in patterns:
            if args.device == "cpu":  # a fresh process per point: VmHWM then measures this forward only
                cmd = [sys.executable, __file__, *strip_scans(passthrough), "--one", pat, str(n)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                row[pat] = json.loads(out)
            else:
                row[pat] = measure(args, pat, n)
        ratio = row["parity"]["attention_scores"] / row["study"]["attention_scores"]
        print(f"{n:>5} {row['study']['tokens']:>7} "
              + " ".join(f"{row[pat]['seconds']:>10.3f} {row[pat]['peak_mb']:>10.0f}" for pat in patterns)
              + f" {ratio:>12.2f}")


def strip_scans(argv: list[str]) -> list[str]:
    """``argv`` without the ``--scans`` values (the child measures one N)."""
    out, skip = [], False
    for a in argv:
        if a == "--scans":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()

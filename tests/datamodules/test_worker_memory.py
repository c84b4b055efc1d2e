"""Peak memory of DataLoader worker processes stays bounded over a long run of 3D volumes.

The resident set (``VmRSS``) and its high-water mark (``VmHWM``) of every worker are read from
``/proc`` while two workers decode hundreds of volumes: after the warm-up (the in-memory LRU filled,
tables parsed, allocator pools grown) neither may keep growing with the number of volumes read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# soak tests (about 40 s together): with the slow tests; the in-process bound of the volume reads
# (tests/datamodules/test_ct_rate_preprocess.py) stays in the default suite
pytestmark = [pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads worker memory from /proc"),
              pytest.mark.slow]
MB = 1 << 20


def proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_workers(dm, split: str, epochs: int) -> tuple[int, dict[int, list[int]], dict[int, int]]:
    """Iterate ``epochs`` over ``split`` with 2 persistent workers; per worker pid, the RSS after each batch."""
    from torch.utils.data import DataLoader

    loader = dm._loader(split, shuffle=True, batch_size=4)
    rss: dict[int, list[int]] = {}
    seen = 0
    it = DataLoader.__iter__(loader)  # the workers' iterator itself (a SkippingLoader wraps it in a generator)
    pids = [w.pid for w in it._workers]
    for epoch in range(epochs):
        if epoch:
            it = DataLoader.__iter__(loader)
        for batch in it:
            seen += batch.images.shape[0]
            for pid in pids:
                rss.setdefault(pid, []).append(proc_kb(pid, "VmRSS"))
    peaks = {pid: proc_kb(pid, "VmHWM") for pid in pids}
    del it, loader
    return seen, rss, peaks


def check_bounded(seen: int, rss: dict[int, list[int]], peaks: dict[int, int], slack: int) -> None:
    assert len(rss) == 2
    for pid, series in rss.items():
        warm = max(series[: len(series) // 4])  # first quarter of the run: LRU filled, pools grown
        late = max(series[len(series) // 4 :])
        assert late - warm < slack, f"worker {pid}: RSS grew by {(late - warm) / MB:.1f} MB after warm-up ({seen} volumes read)"
        assert peaks[pid] - warm < slack + 16 * MB, f"worker {pid}: peak {peaks[pid] / MB:.0f} MB vs {warm / MB:.0f} MB warm"


def test_ct_worker_memory_is_bounded_over_many_volumes(tiny_tokenizer) -> None:
    """CT-RATE demo volumes decoded from NIfTI (read, rescale, orient, resample, window) by two
    workers, 3 epochs over the training split with an LRU of 8 volumes per worker."""
    from omegaconf import OmegaConf

    from medvlp.datamodules.ct_rate import CTRateConfig, CTRateDataModule
    from medvlp.datamodules.demo import ensure_demo

    demo = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "data" / "demo_ct.yaml").data
    cfg = CTRateConfig(root=str(ensure_demo("ct", "default")), spacing=list(demo.spacing), size=list(demo.size),
                       cache_size=8, num_workers=2, persistent_workers=True, use_preprocessed="false",
                       limit_train=160)
    dm = CTRateDataModule(cfg, tiny_tokenizer)
    seen, rss, peaks = run_workers(dm, "train", epochs=3)
    assert seen == 3 * 160
    volume = 4 * 32 * 64 * 64
    check_bounded(seen, rss, peaks, slack=12 * MB + 8 * volume)


def test_multi_scan_worker_memory_is_bounded_over_many_studies(tiny_tokenizer) -> None:
    """Brain-MRI demo studies (2-6 series each, repeated / cut to 3 scans) read by two workers, 3 epochs."""
    from medvlp.datamodules.brain_mri import BrainMRIConfig, BrainMRIDataModule
    from medvlp.datamodules.demo import ensure_demo

    cfg = BrainMRIConfig(root=str(ensure_demo("brain_mri", "default")), num_slices=16, resize=36, image_size=32,
                         num_scans=3, num_workers=2, persistent_workers=True, limit_train=200)
    dm = BrainMRIDataModule(cfg, tiny_tokenizer)
    seen, rss, peaks = run_workers(dm, "train", epochs=3)
    assert seen == 3 * 200
    check_bounded(seen, rss, peaks, slack=12 * MB)

    class Leaky(BrainMRIDataModule):  # the check must catch a worker that keeps what it reads
        kept: list = []

        def load_series(self, path, train):
            out = super().load_series(path, train)
            self.kept.append(out.clone())
            return out

    seen, rss, peaks = run_workers(Leaky(cfg, tiny_tokenizer), "train", epochs=3)
    with pytest.raises(AssertionError, match="RSS grew"):
        check_bounded(seen, rss, peaks, slack=12 * MB)

"""Label-fraction subsets (1 % / 10 % / 100 % of the training labels), drawn once and shared.

Fine-tuning benchmarks train on a fixed fraction of the labelled train split. The subset is drawn
with a fixed seed and written to a file; every later run, whatever the method, reads that file,
so all methods see exactly the same studies. The file lists study ids, one per line, under a
header that records how it was drawn; a file whose header disagrees with the request is refused.

Sampling (``data.fraction_sampling``):

* ``mgca`` - MGCA's ``df.sample(frac=p, random_state=seed)`` over the train rows (pandas draws
  ``round(p * n)`` rows with ``RandomState(seed).choice(n, size, replace=False)``; replicated here
  over unique studies, in record order);
* ``stratified`` - the same draw within each label pattern (positive set of the labels; NaN
  counts as negative), at least one study per pattern, as BenchX-style stratified subsets do.

Default location: ``<cache>/label_fractions/<dataset>-<digest of root and split>/`` (``data.fraction_file``
overrides it with an explicit path).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medvlp.datamodules.base import DataError

if TYPE_CHECKING:
    from medvlp.datamodules.base import Record

log = logging.getLogger(__name__)

SAMPLINGS = ("mgca", "stratified")
FORMAT = "medvlp-label-fraction v1"


def _studies(records: list[Record]) -> list[str]:
    """Unique study ids in record order."""
    return list(dict.fromkeys(r.study_id for r in records))


def _pattern(labels: np.ndarray | None) -> str:
    if labels is None:
        return ""
    return "".join("1" if v > 0.5 else "0" for v in np.nan_to_num(np.asarray(labels, dtype=np.float64), nan=0.0))


def draw(records: list[Record], fraction: float, seed: int, sampling: str = "mgca") -> list[str]:
    """Study ids of a ``fraction`` subset of ``records`` (sorted in record order).

    Args:
        records: the full train split.
        fraction: in ``(0, 1]``.
        seed: the random state (MGCA uses 42).
        sampling: ``mgca`` or ``stratified`` (module docstring).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"data.fraction_sampling='{sampling}' is not valid; choose one of {', '.join(SAMPLINGS)}.")
    studies = _studies(records)
    if fraction >= 1.0:
        return studies
    if sampling == "mgca":
        size = max(1, int(round(fraction * len(studies))))
        picked = np.random.RandomState(seed).choice(len(studies), size=size, replace=False)
        keep = set(picked.tolist())
        return [s for i, s in enumerate(studies) if i in keep]
    first: dict[str, Record] = {}
    for r in records:
        first.setdefault(r.study_id, r)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(studies):
        groups.setdefault(_pattern(first[s].labels), []).append(i)
    rng = np.random.RandomState(seed)
    keep: set[int] = set()
    for key in sorted(groups):
        idx = groups[key]
        size = max(1, int(round(fraction * len(idx))))
        keep.update(idx[j] for j in rng.choice(len(idx), size=size, replace=False).tolist())
    return [s for i, s in enumerate(studies) if i in keep]


def header(dataset: str, fraction: float, seed: int, sampling: str, n_total: int) -> str:
    return f"# {FORMAT} dataset={dataset} fraction={fraction:g} seed={seed} sampling={sampling} of={n_total}"


def default_path(cache: Path, dataset: str, root: str, split_key: str, fraction: float, seed: int, sampling: str) -> Path:
    """``<cache>/label_fractions/<dataset>-<digest>/<pct>pct_seed<seed>_<sampling>.txt``."""
    digest = hashlib.sha1(f"{os.path.abspath(root)}|{split_key}".encode()).hexdigest()[:12]
    pct = f"{fraction * 100:g}".replace(".", "p")
    return cache / "label_fractions" / f"{dataset}-{digest}" / f"{pct}pct_seed{seed}_{sampling}.txt"


def load_or_draw(path: Path, records: list[Record], dataset: str, fraction: float, seed: int, sampling: str) -> list[Record]:
    """The records of the studies listed in ``path``; draws and writes the file first if absent.

    Raises:
        DataError: the file was drawn with other settings, or lists studies the split lacks.
    """
    want = header(dataset, fraction, seed, sampling, len(_studies(records)))
    if path.is_file():
        lines = path.read_text().splitlines()
        if not lines or lines[0] != want:
            raise DataError(
                f"Label-fraction file {path} was drawn with other settings:\n  {lines[0] if lines else '(empty)'}\n"
                f"but this run asks for\n  {want}\nDelete it, or point data.fraction_file elsewhere."
            )
        ids = [line for line in lines[1:] if line]
        known = {r.study_id for r in records}
        unknown = [s for s in ids if s not in known]
        if unknown:
            raise DataError(f"Label-fraction file {path} lists {len(unknown)} studies not in the train split (e.g. {unknown[0]}).")
    else:
        ids = draw(records, fraction, seed, sampling)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fraction-")
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join([want, *ids]) + "\n")
        os.replace(tmp, path)
        log.info("%s: drew a %g label fraction (%d of %d studies) into %s", dataset, fraction, len(ids), len(_studies(records)), path)
    keep = set(ids)
    return [r for r in records if r.study_id in keep]

"""CheXpert (v1.0 and v1.0-small) chest radiographs with the 14 CheXpert observations, as Stanford
distributes them.

Official files (``specs/datasets.md`` §2): ``train.csv``, ``valid.csv`` and the JPG tree
``{train,valid}/patient<5 digits>/study<N>/view<N>_{frontal,lateral}.jpg`` under the dataset folder
(``CheXpert-v1.0/`` or ``CheXpert-v1.0-small/``, which users often rename). The CSVs' ``Path``
starts with the release's top folder (``CheXpert-v1.0-small/train/...``); it is resolved from
the ``<train|valid|test>/patient.../study.../<file>`` tail, so any top folder name works (else the
first component is stripped, as MGCA does).

Config keys: see :class:`CheXpertConfig`. No reports: every record's text is ``""``.

Labels (``data.labels``): ``competition`` (the 5 competition labels, default), ``all`` (the 14 in
CSV order) or an explicit list. The CSV values are ``1.0`` / ``0.0`` / ``-1.0`` (uncertain) / blank
(not mentioned); ``data.uncertain`` then applies, per column, to the chosen labels only:

* ``mgca`` (default; GLoRIA / MGCA): blank -> 0 first (``fillna(0)``), then -1 -> 1 for
  Atelectasis, Edema and Pleural Effusion, -1 -> 0 for Cardiomegaly and Consolidation, and
  -1 -> 0 (U-Zeros) for every other chosen label;
* ``zeros`` (U-Zeros): -1 -> 0, blank stays NaN (unknown);
* ``ones`` (U-Ones): -1 -> 1, blank stays NaN;
* ``ignore`` (U-Ignore): -1 -> NaN, blank stays NaN (NaN = masked out of losses and metrics).

``valid.csv`` holds only 0 / 1 (radiologist consensus), so no policy changes it.

Splits (``data.split_protocol``):

* ``mgca`` (default): the 5x200 rows are removed from ``train.csv``; ``data.val_size`` (5,000)
  random rows of the remainder (``RandomState(data.val_seed).choice``, as MGCA's
  ``np.random.seed(0)`` + ``np.random.choice``) are ``val``, the rest ``train``; ``valid.csv`` is
  ``test`` (MGCA / GLoRIA evaluate on it). The view filter applies after the split, as in MGCA.
* ``official``: ``valid.csv`` (the radiologists' consensus labels) is ``test``; ``data.val_fraction`` of
  the patients of ``train.csv`` (drawn with ``RandomState(data.val_seed)``, whole patients, so no
  patient is in both) are ``val``, the rest ``train`` (5x200 rows included). No split validates on
  the images it is tested on.

``5x200`` (either protocol): the zero-shot set of GLoRIA / MGCA (spec §2.6): ``train.csv`` with
blanks as 0, frontal rows only; for each competition label the rows where it is 1 and every other
label but ``No Finding`` is 0; ``data.per_class`` (200) rows per class drawn with pandas
``DataFrame.sample(n, random_state=0)``, concatenated in competition-label order. The rows are
written to a CSV (MGCA's format: the pandas index as an unnamed first column, then every column of
``train.csv`` with blank labels as 0) and read back from it, so every method evaluates the same
images (see ``data.csv_5x200``). Its records carry the labels in ``label_names`` order (one-hot
over the 5 classes; ``label_names`` must include them) and ``meta["class"]``.

Differences from the official code (MGCA ``mgca/preprocess/chexpert.py``,
``mgca/datasets/classification_dataset.py``):
    * MGCA builds ``train_split.csv`` with ``df.drop(valid_ids)``, which drops rows by index *label*
      while ``valid_ids`` are *positions* (the index has gaps after removing the 5x200 rows), so
      its train and val overlap. Here train is the pool minus exactly the val rows (disjoint);
      val is the same 5,000 rows as MGCA's.
    * MGCA's 5x200 CSV also fills non-label columns (``AP/PA``) with 0; we leave them as read.
    * MGCA's ``data_pct`` train subsampling is not done here (label fractions are a shared concern).
    * Images are resized straight to ``image_size`` (no 256 resize + 224 crop); see
      :class:`~medvlp.datamodules.transforms.CXRTransform`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record
from medvlp.datamodules.radiograph import (
    RadiographConfig,
    RadiographDataModule,
    check_choice,
    read_gray,
    read_table,
)
from medvlp.registry import register_datamodule

if TYPE_CHECKING:  # heavy imports stay inside functions (base.py: check_root must not pay for them)
    import pandas as pd

log = logging.getLogger(__name__)

TRAIN_CSV = "train.csv"
VALID_CSV = "valid.csv"
PREFIXES = ("CheXpert-v1.0-small", "CheXpert-v1.0")  # top folder named in the CSVs' Path column
LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]  # fmt: skip  (CSV order)
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
MGCA_UNCERTAIN = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0, "Pleural Effusion": 1.0}
UNCERTAIN = ("mgca", "zeros", "ones", "ignore")
SPLIT_PROTOCOLS = ("mgca", "official")
SPLITS = ("train", "val", "test", "5x200")
VIEWS = ("Frontal", "Lateral")
VIEW_COL = "Frontal/Lateral"
SAMPLE_SEED_5X200 = 0  # MGCA: df_task.sample(n=200, random_state=0)
_TAIL = re.compile(r"(?:^|/)((?:train|valid|test)/patient\d+/study\d+/[^/]+)$")


@dataclass
class CheXpertConfig(RadiographConfig):
    """``data.*`` keys of the CheXpert datamodule (``configs/data/chexpert.yaml``)."""

    name: str = "chexpert"
    views: list[str] = field(default_factory=lambda: ["Frontal"])  # Frontal / Lateral kept; [] = both
    labels: Any = "competition"  # competition (5) | all (14) | an explicit list of CheXpert labels
    uncertain: str = "mgca"  # mgca | zeros | ones | ignore (see the module docstring)
    split_protocol: str = "mgca"  # mgca (val rows from train) | official (val patients from train); valid.csv = test
    val_size: int = bounded(5000, ge=0)  # mgca: rows of train.csv (minus 5x200) drawn as val
    val_fraction: float = bounded(0.1, gt=0.0, lt=1.0)  # official: fraction of train.csv's patients drawn as val
    val_seed: int = bounded(0, ge=0, le=2**32 - 1)  # seed of the val draw (MGCA: np.random.seed(0))
    per_class: int = bounded(200, gt=0)  # 5x200: images per competition class
    csv_5x200: str = ""  # 5x200 CSV: read if it exists, else built and written there; "" = see csv_path_5x200()


def relative_path(path: str) -> str:
    """``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` -> ``train/patient00001/...``.

    Works for either release prefix, a renamed top folder, an absolute path, or no prefix at all;
    a path without the ``<split>/patient/study/file`` tail loses its first component (MGCA's rule).
    """
    p = str(path).strip().replace("\\", "/")
    m = _TAIL.search(p)
    if m:
        return m.group(1)
    for prefix in PREFIXES:
        if p.startswith(prefix + "/"):
            return p[len(prefix) + 1 :]
    return p.lstrip("/").split("/", 1)[-1]


def labels_of(value: Any) -> list[str]:
    """The label names selected by ``data.labels``; ValueError naming the options otherwise."""
    if isinstance(value, str):
        names = {"competition": COMPETITION, "all": LABELS}.get(value)
        if names is None:
            raise ValueError(f"data.labels='{value}' is not valid; use competition, all or a list of {LABELS}.")
        return list(names)
    names = [str(v) for v in value]
    if len(names) == 1 and names[0] in ("competition", "all"):
        return labels_of(names[0])
    unknown = [n for n in names if n not in LABELS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"data.labels={names} is not valid; each entry must be one of {LABELS} (once).")
    return names


def apply_uncertain(raw: np.ndarray, names: list[str], policy: str) -> np.ndarray:
    """Map raw CheXpert values (1 / 0 / -1 / NaN) of the columns ``names`` through ``policy``.

    Args:
        raw: float ``[N, K]`` with 1.0, 0.0, -1.0 (uncertain) or NaN (blank).
        names: the label of each column (the MGCA mix is per column).
        policy: ``mgca`` | ``zeros`` | ``ones`` | ``ignore`` (module docstring).

    Returns:
        float32 ``[N, K]``: 1 / 0 / NaN (NaN only where the policy leaves a value unknown).
    """
    check_choice("data.uncertain", policy, UNCERTAIN)
    out = np.array(raw, dtype=np.float32, copy=True).reshape(len(raw), len(names))
    if policy == "mgca":
        out = np.nan_to_num(out, nan=0.0)  # fillna(0) first, so blank never becomes uncertain
        for j, name in enumerate(names):
            col = out[:, j]
            col[col == -1.0] = MGCA_UNCERTAIN.get(name, 0.0)
        return out
    out[out == -1.0] = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}[policy]
    return out


def parse_labels(df: pd.DataFrame, names: list[str], path: Path) -> np.ndarray:
    """Raw float32 ``[N, K]`` values of the columns ``names`` (1 / 0 / -1 / NaN); DataError on others."""
    import pandas as pd

    raw = df[names]
    values = raw.apply(pd.to_numeric, errors="coerce")
    bad = (values.isna() & raw.notna()) | (values.notna() & ~values.isin([1.0, 0.0, -1.0]))
    if bad.any().any():
        col = bad.any().idxmax()
        examples = sorted({str(v) for v in raw.loc[bad[col], col]})[:5]
        raise DataError(f"{path} column '{col}' has values {examples}; expected 1.0, 0.0, -1.0 or blank.")
    return np.array(values.to_numpy(dtype=np.float32), copy=True)


def select_5x200(train: pd.DataFrame, per_class: int, source: str = TRAIN_CSV) -> pd.DataFrame:
    """The CheXpert 5x``per_class`` zero-shot rows of ``train.csv`` (spec §2.6, MGCA's recipe).

    Args:
        train: ``train.csv`` as read (every cell a string, blank -> NaN), default RangeIndex.
        per_class: rows per competition class.
        source: file name for error messages.

    Returns:
        The selected rows (original index kept), classes in ``COMPETITION`` order; the 14 label
        columns as floats with blanks filled with 0, every other column as read.
    """
    import pandas as pd

    df = train.copy()
    values = df[LABELS].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    df[LABELS] = values
    frontal = df[VIEW_COL] == "Frontal"
    others = [n for n in LABELS if n != "No Finding"]
    parts = []
    for c in COMPETITION:
        rest = [n for n in others if n != c]
        mask = frontal & (values[c] == 1.0) & (values[rest] == 0.0).all(axis=1)
        pool = df[mask]
        if len(pool) < per_class:
            raise DataError(
                f"{source} has only {len(pool)} frontal rows with {c} = 1 and every other finding = 0; "
                f"the 5x{per_class} set needs {per_class} (data.per_class)."
            )
        parts.append(pool.sample(n=per_class, random_state=SAMPLE_SEED_5X200))
    return pd.concat(parts)


def classes_5x200(df: pd.DataFrame, path: Path) -> list[str]:
    """The class (competition label equal to 1) of each row of a 5x200 CSV; DataError if not one-hot."""
    import pandas as pd

    values = df[COMPETITION].apply(pd.to_numeric, errors="coerce").fillna(0.0).to_numpy()
    ones = values == 1.0
    bad = np.flatnonzero(ones.sum(axis=1) != 1)
    if len(bad):
        raise DataError(f"{path} row {int(bad[0]) + 2}: exactly one of {COMPETITION} must be 1 in a 5x200 CSV.")
    return [COMPETITION[i] for i in ones.argmax(axis=1)]


@register_datamodule("chexpert")
class CheXpertDataModule(RadiographDataModule):
    """CheXpert v1.0 / v1.0-small (2D chest X-ray, CheXpert observations, no text).

    Splits ``train`` / ``val`` / ``test`` follow ``data.split_protocol``; ``5x200`` is the zero-shot
    set (module docstring).
    """

    Config = CheXpertConfig
    modality = "2d"
    default_prompts = "cxr.yaml"
    demo_kind = "chexpert"  # data.root=demo: the synthetic world of demo/downstream.py
    label_names = list(COMPETITION)
    EXPECTED_LAYOUT = """\
<root>/                                  CheXpert-v1.0-small/ or CheXpert-v1.0/ (any folder name)
  train.csv                              Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Support Devices
  valid.csv
  train/patient00001/study1/view1_frontal.jpg
  valid/patient64541/study1/view1_frontal.jpg
"""

    def __init__(self, cfg: CheXpertConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        check_choice("data.uncertain", cfg.uncertain, UNCERTAIN)
        check_choice("data.split_protocol", cfg.split_protocol, SPLIT_PROTOCOLS)
        for view in cfg.views:
            check_choice("data.views entry", str(view), VIEWS)
        if int(cfg.per_class) < 1:
            raise ValueError(f"data.per_class must be a positive number of images, got {cfg.per_class}.")
        if cfg.split_protocol == "mgca" and int(cfg.val_size) < 1:
            raise ValueError(f"data.val_size must be >= 1 with data.split_protocol=mgca, got {cfg.val_size}.")
        self.label_names = labels_of(cfg.labels)
        self._tables: dict[str, Any] = {}

    # ------------------------------------------------------------------ layout
    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        root = Path(cfg.root)
        for name in (TRAIN_CSV, VALID_CSV):
            if not (root / name).is_file():
                hint = ""
                inner = [p.parent.name for p in sorted(root.glob(f"*/{name}"))]
                if inner:
                    hint = f" (but {root / inner[0]} has it: set data.root to that folder)"
                raise DataRootError(cls.root_message(cfg.root, f"has no {name}{hint}"))
        if not ((root / "train").is_dir() or (root / "valid").is_dir()):
            raise DataRootError(cls.root_message(cfg.root, "has neither a train/ nor a valid/ image folder"))

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    def split_key(self) -> str:
        """Everything that defines the train split (names the label-fraction file)."""
        c = self.cfg
        key = f"{type(self).__name__}|{c.split_protocol}|views={sorted(str(v) for v in c.views)}"
        if c.split_protocol == "mgca":
            return key + f"|val={c.val_size}@{c.val_seed}|5x{c.per_class}"
        return key + f"|valpatients={float(c.val_fraction):g}@{c.val_seed}"

    # ------------------------------------------------------------------ tables
    def table(self, name: str) -> pd.DataFrame:
        """``train.csv`` / ``valid.csv`` as strings plus ``rel`` (path under root); cached."""
        key = f"csv:{name}"
        if key not in self._tables:
            path = self.root / name
            if not path.is_file():
                raise DataRootError(self.root_message(self.cfg.root, f"has no {name}"))
            df = read_table(path, ["Path", VIEW_COL, *LABELS])
            if df["Path"].isna().any():
                raise DataError(f"{path} row {int(np.flatnonzero(df['Path'].isna())[0]) + 2} has an empty Path.")
            df["rel"] = df["Path"].map(relative_path)
            if df["rel"].duplicated().any():
                raise DataError(f"{path} lists {df.loc[df['rel'].duplicated(), 'Path'].iloc[0]} more than once.")
            self._tables[key] = df
        return self._tables[key]

    def csv_path_5x200(self) -> Path:
        """Where the 5x``per_class`` CSV is read from (or written to).

        ``data.csv_5x200`` if set; else ``<root>/chexpert_5x<per_class>.csv`` if that file exists
        (e.g. MGCA's own ``chexpert_5x200.csv`` placed there); else
        ``<medvlp cache>/chexpert/chexpert_5x<per_class>_<sha1 of train.csv>.csv``.
        """
        if "5x200_path" not in self._tables:
            self._tables["5x200_path"] = self._locate_5x200()
        return self._tables["5x200_path"]

    def _locate_5x200(self) -> Path:
        if self.cfg.csv_5x200:
            return Path(self.cfg.csv_5x200)
        name = f"chexpert_5x{int(self.cfg.per_class)}.csv"
        if (self.root / name).is_file():
            return self.root / name
        from medvlp.cache import cache_dir

        digest = hashlib.sha1()
        with open(self.root / TRAIN_CSV, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return cache_dir() / "chexpert" / f"chexpert_5x{int(self.cfg.per_class)}_{digest.hexdigest()[:12]}.csv"

    def write_5x200(self, path: Path) -> Path:
        """Build the 5x``per_class`` rows from ``train.csv`` and write them to ``path`` (atomically)."""
        rows = select_5x200(self.table(TRAIN_CSV).drop(columns="rel"), int(self.cfg.per_class), str(self.root / TRAIN_CSV))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            rows.to_csv(tmp, lineterminator="\n")
            os.replace(tmp, path)  # concurrent builders write identical bytes; the last rename wins
        except OSError as err:
            raise DataError(
                f"Could not write the 5x{self.cfg.per_class} CSV to {path} ({err}); set data.csv_5x200 to a writable path."
            ) from err
        log.info("chexpert: wrote the 5x%d zero-shot set (%d rows) to %s", self.cfg.per_class, len(rows), path)
        return path

    def table_5x200(self) -> pd.DataFrame:
        """The 5x200 rows (from its CSV, built first if missing): Path, rel, class, label columns."""
        if "5x200" not in self._tables:
            path = self.csv_path_5x200()
            if not path.is_file():
                self.write_5x200(path)
            else:
                log.info("chexpert: reading the 5x%d zero-shot set from %s", self.cfg.per_class, path)
            df = read_table(path, ["Path", *COMPETITION])
            df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed:")])
            df["rel"] = df["Path"].map(relative_path)
            df["class"] = classes_5x200(df, path)
            counts = df["class"].value_counts()
            wrong = {c: int(counts.get(c, 0)) for c in COMPETITION if counts.get(c, 0) != int(self.cfg.per_class)}
            if wrong:
                raise DataError(
                    f"{path} holds {wrong} rows for these classes; data.per_class={self.cfg.per_class} needs "
                    f"{self.cfg.per_class} each. Delete the file to rebuild it, or set data.per_class / data.csv_5x200."
                )
            known = set(self.table(TRAIN_CSV)["rel"])
            stray = [p for p, r in zip(df["Path"], df["rel"], strict=True) if r not in known]
            if stray:
                raise DataError(
                    f"{path} lists {len(stray)} image(s) that are not in {self.root / TRAIN_CSV} (first: {stray[0]}); "
                    f"it was built from another CheXpert train.csv. Delete it to rebuild it, or fix data.csv_5x200."
                )
            self._tables["5x200"] = df
        return self._tables["5x200"]

    def split_rows(self, split: str) -> tuple[pd.DataFrame, str]:
        """Rows of ``split`` (before the view filter) and the CSV they come from."""
        if split == "5x200":
            return self.table_5x200(), self.csv_path_5x200().name
        if split == "test":
            return self.table(VALID_CSV), VALID_CSV
        train = self.table(TRAIN_CSV)
        if self.cfg.split_protocol == "official":
            if "official_val" not in self._tables:
                patients = train["rel"].str.split("/").str[1].to_numpy()
                unique = np.unique(patients)
                n_val = int(round(float(self.cfg.val_fraction) * len(unique)))
                if len(unique) < 2 or not 1 <= n_val < len(unique):
                    raise DataError(
                        f"data.val_fraction={self.cfg.val_fraction} of the {len(unique)} patient(s) of {self.root / TRAIN_CSV} "
                        f"leaves no {'training' if n_val >= 1 else 'validation'} patient; change data.val_fraction.")
                held = set(unique[np.random.RandomState(int(self.cfg.val_seed)).permutation(len(unique))[:n_val]])
                is_val = np.fromiter((p in held for p in patients), bool, len(patients))
                self._tables["official_val"], self._tables["official_train"] = np.flatnonzero(is_val), np.flatnonzero(~is_val)
            return train.iloc[self._tables[f"official_{split}"]], TRAIN_CSV
        if "mgca_val" not in self._tables:
            held_out = set(self.table_5x200()["rel"])
            pool = np.flatnonzero(~train["rel"].isin(held_out).to_numpy())
            n_val = int(self.cfg.val_size)
            if n_val >= len(pool):
                raise DataError(
                    f"data.val_size={n_val} leaves no training rows: {TRAIN_CSV} has {len(pool)} rows outside the "
                    f"5x{self.cfg.per_class} set. Lower data.val_size."
                )
            picked = np.random.RandomState(int(self.cfg.val_seed)).choice(len(pool), size=n_val, replace=False)
            self._tables["mgca_val"] = pool[picked]  # MGCA's order (valid_df = df.iloc[valid_ids])
            self._tables["mgca_train"] = np.setdiff1d(pool, pool[picked])  # CSV order
        return train.iloc[self._tables[f"mgca_{split}"]], TRAIN_CSV

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        if split not in SPLITS:
            raise ValueError(f"Unknown split '{split}'; expected one of {list(SPLITS)}.")
        self.check_root(self.cfg)
        df, source = self.split_rows(split)
        if split == "5x200":
            missing = [c for c in COMPETITION if c not in self.label_names]
            if missing:
                raise DataError(f"The 5x200 split needs the labels {COMPETITION} in data.labels; {missing} are not selected.")
            present = [n for n in self.label_names if n in df.columns]
            labels = np.full((len(df), len(self.label_names)), np.nan, dtype=np.float32)
            raw = parse_labels(df, present, self.csv_path_5x200())
            labels[:, [self.label_names.index(n) for n in present]] = np.nan_to_num(raw, nan=0.0)
        else:
            views = [str(v) for v in self.cfg.views]
            n_all = len(df)
            if views:
                df = df[df[VIEW_COL].isin(views)]
            if len(df) < n_all:
                log.info("chexpert %s: kept %d of %d rows of %s with Frontal/Lateral in %s", split, len(df), n_all, source, views)
            raw = parse_labels(df, self.label_names, self.root / source)
            labels = apply_uncertain(raw, self.label_names, self.cfg.uncertain)
        root = str(self.root)
        columns = {key: self._column(df, col) for key, col in (("view", VIEW_COL), ("ap_pa", "AP/PA"), ("sex", "Sex"), ("age", "Age"))}
        classes = list(df["class"]) if split == "5x200" else None
        records = []
        for i, rel in enumerate(df["rel"]):
            parts = rel.split("/")
            patient, study = (parts[1], parts[2]) if len(parts) >= 4 else ("", "")
            meta = {"path": rel, "patient_id": patient, "split": split, **{k: v[i] for k, v in columns.items()}}
            if classes is not None:
                meta["class"] = classes[i]
            study_id = f"{patient}/{study}" if patient else rel
            records.append(Record(study_id, os.path.join(root, rel), "", labels[i].copy(), meta))
        log.info("chexpert %s: %d records (%s protocol, uncertain=%s)", split, len(records), self.cfg.split_protocol, self.cfg.uncertain)
        return records

    @staticmethod
    def _column(df: pd.DataFrame, col: str) -> list[str]:
        """A metadata column as strings (blank -> ""); all "" when the CSV lacks it."""
        if col not in df.columns:
            return [""] * len(df)
        return ["" if v != v else str(v) for v in df[col]]

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:
        return read_gray(record.image_path, draft_size=self.read_size)

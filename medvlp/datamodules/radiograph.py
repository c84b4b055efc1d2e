"""Shared machinery of the 2D chest-radiograph datamodules (MIMIC-CXR, CheXpert, RSNA, SIIM, ...).

A subclass reads its official files into :class:`~medvlp.datamodules.base.Record` s and provides
``read_pixels(record, train) -> uint8 [H, W]`` (JPEG / PNG / DICOM decoding). This class turns the
pixels, and a record's boxes (``Record.boxes``, original pixels) and mask (``Record.mask``), into
tensors of the same geometry through :class:`~medvlp.datamodules.transforms.CXRTransform`:
resize the longest side to ``data.image_size``, centre-pad to a square, (train) a light random
affine applied to image, boxes and mask alike.

Also here: :func:`read_gray` (PIL decode of JPEG / PNG, 16-bit aware), :func:`read_table` (CSV
with every column as a string) and :func:`check_choice`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.datamodules.base import DataConfig, DataError, Record, VLPDataModule

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from medvlp.datamodules.transforms import CXRTransform


@dataclass
class RadiographConfig(DataConfig):
    """``data.*`` keys shared by every 2D radiograph dataset."""

    image_size: int = 224
    channels: int = 3  # 1 or 3 (gray repeated)
    augment: bool = True  # train-time random affine (image, boxes and masks alike)
    aug_degrees: float = 10.0
    aug_translate: float = 0.05  # fraction of the image size
    aug_scale: list[float] = field(default_factory=lambda: [0.9, 1.1])


def check_choice(key: str, value: str, options: tuple[str, ...] | list[str]) -> None:
    """Raise ``ValueError`` naming ``key`` and the valid options if ``value`` is not one of them."""
    if value not in options:
        raise ValueError(f"{key}='{value}' is not valid; choose one of {', '.join(options)}.")


def read_table(path: Path, columns: list[str] | None = None, **kwargs: Any) -> pd.DataFrame:
    """Read an official CSV with every column as a string (IDs round-trip; blank -> NaN).

    Raises:
        DataError: naming the file when it cannot be parsed or lacks one of ``columns``.
    """
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], **kwargs)
    except FileNotFoundError as err:
        raise DataError(f"{path} does not exist.") from err
    except Exception as err:  # pandas raises many types on a truncated gzip or a bad row
        raise DataError(f"Could not read {path}: {type(err).__name__}: {err}") from err
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(f"{path} lacks the column(s) {missing}; found {list(df.columns)}.")
    return df


def read_gray(path: str | Path, draft_size: int | None = None) -> np.ndarray:
    """Decode a JPEG / PNG to a uint8 ``[H, W]`` array; DataError naming the file on failure.

    ``draft_size`` lets the JPEG decoder downscale by a power of two while keeping both sides
    >= ``draft_size`` (DCT-domain scaling: averaging, and several times faster on full-size X-rays).
    16-bit PNGs are scaled by their own maximum (``convert("L")`` would clip them to white);
    RGB / RGBA images are converted to luminance.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if draft_size and img.format == "JPEG":
                img.draft("L", (draft_size, draft_size))
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = arr.max()
                return (arr * (255.0 / top) if top > 0 else arr).round().clip(0, 255).astype(np.uint8)
            img = img.convert("L") if img.mode != "L" else img
            img.load()
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError as err:
        raise DataError(f"Image {path} does not exist.") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"Image {path} is corrupt or truncated ({err}); re-download it.") from err


class RadiographDataModule(VLPDataModule):
    """Base of the 2D datamodules: one gray image per record, optional boxes and mask."""

    Config = RadiographConfig
    box_label_names: list[str] = []  # classes of Record.box_labels (detection datasets)

    def __init__(self, cfg: RadiographConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        if int(cfg.channels) not in (1, 3):
            raise ValueError(f"data.channels={cfg.channels} is not valid; choose 1 or 3.")
        if int(cfg.image_size) < 1:
            raise ValueError(f"data.image_size must be a positive number of pixels, got {cfg.image_size}.")
        self._transform: CXRTransform | None = None

    @property
    def transform(self) -> CXRTransform:
        """The image pipeline (built on first use; imports torch)."""
        if self._transform is None:
            from medvlp.datamodules.transforms import CXRTransform

            cfg = self.cfg
            self._transform = CXRTransform(
                image_size=int(cfg.image_size),
                channels=int(cfg.channels),
                augment=bool(cfg.augment),
                degrees=float(cfg.aug_degrees),
                translate=float(cfg.aug_translate),
                scale=[float(v) for v in cfg.aug_scale],
            )
        return self._transform

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:  # pragma: no cover - abstract
        """The record's image as uint8 ``[H, W]`` (dense = bright)."""
        raise NotImplementedError

    def load_sample(self, record: Record, train: bool) -> dict[str, Any]:
        import torch

        gray = self.read_pixels(record, train)
        h, w = gray.shape
        mask = None
        if record.mask is not None:
            mask = record.mask(h, w)
            if mask.shape != (h, w):
                raise DataError(f"The mask of {record.study_id} is {mask.shape}, but its image {record.image_path} is {(h, w)}.")
        image, boxes, mask_t = self.transform.apply(gray, train=train, boxes=record.boxes, mask=mask)
        sample: dict[str, Any] = {"image": image}
        if record.boxes is not None:
            labels = record.box_labels if record.box_labels is not None else np.zeros(len(record.boxes), np.int64)
            sample["boxes"] = boxes
            sample["box_labels"] = torch.as_tensor(labels, dtype=torch.int64)
        if mask_t is not None:
            sample["mask"] = mask_t
        return sample

    def load_image(self, record: Record, train: bool) -> torch.Tensor:
        return self.load_sample(record, train)["image"]


def shuffle_split(n: int, test_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)`` of ``n`` rows, identical to scikit-learn's
    ``train_test_split(range(n), test_size=test_size, random_state=seed)`` (which the seed papers use).

    ``test_size`` is a fraction (rounded up) or a count; the rest is the train part.
    """
    if isinstance(test_size, float) and 0.0 < test_size < 1.0:
        n_test = int(np.ceil(test_size * n))
    else:
        n_test = int(test_size)
    if not 0 < n_test < n:
        raise ValueError(f"cannot split {n} rows into a test part of {test_size}")
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]

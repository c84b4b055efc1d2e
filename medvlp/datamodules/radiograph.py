"""Shared machinery of the 2D chest-radiograph datamodules (MIMIC-CXR, CheXpert, RSNA, SIIM, ...).

A subclass reads its official files into :class:`~medvlp.datamodules.base.Record` s and provides
``read_pixels(record, train) -> uint8 [H, W]`` (JPEG / PNG / DICOM decoding). This class turns the
pixels, and a record's boxes (``Record.boxes``, original pixels) and mask (``Record.mask``), into
tensors of the same geometry through :class:`~medvlp.datamodules.transforms.CXRTransform`:
resize the longest side to ``data.image_size``, centre-pad to a square, (train) a light random
affine applied to image, boxes and mask alike.

The array an image is read as may be smaller than the stored image: ``read_pixels`` may decode a
JPEG downscaled (DCT scaling, :func:`read_gray` with ``draft_size``), and ``medvlp preprocess``
(:mod:`medvlp.preprocess`) stores every image with its longest side at ``data.image_size``. The
hook :meth:`RadiographDataModule.original_size` reports the stored size of a decoded image (the
preprocessed cache keeps it per image); :meth:`RadiographDataModule.load_sample` then scales the
boxes from original pixels to those of the array read, and renders the mask at the original size
(``Record.mask(orig_h, orig_w)``) before a nearest resize to the array. A mask callable that also
has ``scaled(height, width, sx, sy)`` (Object-CXR's shapes) is rasterised at the array's size
directly instead.

Reading the preprocessed cache (``data.use_preprocessed``): ``auto`` (default) reads it when
its ``manifest.json`` matches the config and decodes on the fly otherwise (one info line says
why); ``true`` requires it (a DataError names the ``medvlp preprocess`` command to run);
``false`` always decodes. The cache lives in ``data.preprocessed_dir`` ("" = a folder under
:func:`~medvlp.cache.cache_dir` keyed by the dataset root, ``data.image_size`` and the dataset's
pixel settings, ``pixel_keys``).

Also here: :func:`read_gray` (PIL decode of JPEG / PNG, 16-bit aware), :func:`read_table` (CSV
with every column as a string) and :func:`check_choice`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, PreprocessedCacheMixin, Record, VLPDataModule
from medvlp.datamodules.errors import os_error

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from medvlp.datamodules.transforms import CXRTransform

log = logging.getLogger(__name__)


@dataclass
class RadiographConfig(DataConfig):
    """``data.*`` keys shared by every 2D radiograph dataset."""

    image_size: int = bounded(224, gt=0)
    channels: int = bounded(3, ge=1, le=3)  # 1 or 3 (gray repeated)
    augment: bool = True  # train-time random affine (image, boxes and masks alike)
    aug_degrees: float = bounded(10.0, ge=0, le=180)
    aug_translate: float = bounded(0.05, ge=0, lt=1)  # fraction of the image size
    aug_scale: list[float] = bounded(default_factory=lambda: [0.9, 1.1], gt=0, each=True)
    # > 0: letterbox to crop_from, then cut an image_size square (centre; random in training with augment):
    # MGCA's 256 -> 224 classification input, G2D's zero-shot input. 0: letterbox straight to image_size
    crop_from: int = bounded(0, ge=0)
    preprocessed_dir: str = ""  # cache written by `medvlp preprocess`; "" = <cache_dir>/preprocessed/<name>-<digest>
    use_preprocessed: str = "auto"  # auto (use the cache when its manifest matches) | true (require it) | false


def check_choice(key: str, value: str, options: tuple[str, ...] | list[str]) -> None:
    """Raise ``ValueError`` naming ``key`` and the valid options if ``value`` is not one of them."""
    if value not in options:
        raise ValueError(f"{key}='{value}' is not valid; choose one of {', '.join(options)}.")


def read_table(path: Path, columns: list[str] | None = None, **kwargs: Any) -> pd.DataFrame:
    """Read an official CSV with every column as a string (IDs round-trip; blank -> NaN).

    See :func:`~medvlp.datamodules.formats.tables.read_csv` (BOM and CRLF read as usual; extra
    columns ignored).

    Raises:
        DataError: naming the file when it cannot be read (missing, permission, not UTF-8, malformed,
            a column named twice) or lacks one of ``columns``.
    """
    from medvlp.datamodules.formats.tables import read_csv

    return read_csv(path, columns, **kwargs)


def _image_error(path: str | Path, err: BaseException) -> DataError:
    if isinstance(err, FileNotFoundError):
        return DataError(f"Image {path} does not exist.")
    return os_error(path, err) or DataError(f"Image {path} is corrupt or truncated ({err}); re-download it.")


def read_gray(path: str | Path, draft_size: int | None = None) -> np.ndarray:
    """Decode a JPEG / PNG to a uint8 ``[H, W]`` array; DataError naming the file on failure.

    ``draft_size`` lets the JPEG decoder downscale by a power of two while keeping both sides
    >= ``draft_size`` (DCT-domain scaling: averaging, and several times faster on full-size X-rays).
    16-bit PNGs are scaled by their own maximum (``convert("L")`` would clip them to white);
    RGB / RGBA images are converted to luminance. Floating-point images (TIFF mode ``F``) are
    min-max scaled; a non-finite pixel (NaN, inf) is an error, never a silent 0.
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
            if img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                bad = ~np.isfinite(arr)
                if bad.any():
                    y, x = (int(v) for v in np.argwhere(bad)[0])
                    raise DataError(f"Image {path} has {int(bad.sum())} non-finite pixel(s) (NaN or inf; the first at "
                                    f"row {y}, column {x}); expected finite intensities. Re-export the image.")
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
                return arr.round().clip(0, 255).astype(np.uint8)
            img = img.convert("L") if img.mode != "L" else img
            img.load()
            return np.asarray(img, dtype=np.uint8).copy()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise _image_error(path, err) from err


def stored_size(path: str | Path) -> tuple[int, int] | None:
    """``(H, W)`` of an image file from its header (PIL, no decoding); None if PIL cannot identify it.

    Raises:
        DataError: naming the file when it does not exist or its header is unreadable.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except UnidentifiedImageError:
        return None
    except (OSError, ValueError, SyntaxError) as err:
        raise _image_error(path, err) from err
    return int(height), int(width)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a ``[h, w]`` mask to ``[height, width]`` (the convention of
    ``F.interpolate(mode="nearest")``, which the letterbox transform applies to masks too)."""
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask

    def index(n_in: int, n_out: int) -> np.ndarray:  # float32 arithmetic, as torch's CPU kernel
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    return mask[index(h, height)][:, index(w, width)]


class RadiographDataModule(PreprocessedCacheMixin, VLPDataModule):
    """Base of the 2D datamodules: one gray image per record, optional boxes and mask."""

    Config = RadiographConfig
    box_label_names: list[str] = []  # classes of Record.box_labels (detection datasets)
    # config keys that change the pixels read_pixels returns (part of the preprocessed cache's key
    # and manifest); keys the config lacks are ignored. A subclass adds its own.
    pixel_keys: ClassVar[tuple[str, ...]] = ("voi",)

    def __init__(self, cfg: RadiographConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        if int(cfg.channels) not in (1, 3):
            raise ValueError(f"data.channels={cfg.channels} is not valid; choose 1 or 3.")
        if int(cfg.image_size) < 1:
            raise ValueError(f"data.image_size must be a positive number of pixels, got {cfg.image_size}.")
        if int(getattr(cfg, "crop_from", 0)) and int(cfg.crop_from) < int(cfg.image_size):
            raise ValueError(f"data.crop_from={cfg.crop_from} must be 0 (off) or at least data.image_size={cfg.image_size} "
                             f"(the letterbox the image_size crop is cut from).")
        self.init_preprocessed(cfg)
        self._transform: CXRTransform | None = None
        self.counts: dict[str, int] = {}  # items dropped or ignored while building records, by reason

    def drop_items(self, reason: str, items: list[str], message: str, split: str = "",
                   details: dict[str, str] | None = None) -> None:
        """Apply ``data.on_error`` to ``items`` (study ids) dropped for ``reason``: raise a DataError with
        ``message``, or (``skip``) count them in ``self.counts``, list each in :attr:`dropped` (with its
        entry of ``details``, else ``"<reason>: <message>"``) and warn."""
        self.counts[reason] = self.counts.get(reason, 0) + len(items)
        if not items:
            return
        if self.cfg.on_error != "skip":
            raise DataError(f"{message}. Set data.on_error=skip to skip (and count) them.")
        for item in items:
            self.note_dropped(split, item, (details or {}).get(item) or f"{reason}: {message}")
        logging.getLogger(type(self).__module__).warning("%s: skipped %s", self.cfg.name, message)

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
                crop_from=int(getattr(cfg, "crop_from", 0)),
            )
        return self._transform

    @property
    def read_size(self) -> int:
        """The letterbox size images are read and stored at: ``data.crop_from`` when set, else ``data.image_size``."""
        return int(getattr(self.cfg, "crop_from", 0) or self.cfg.image_size)

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:  # pragma: no cover - abstract
        """The record's image as uint8 ``[H, W]`` (dense = bright).

        It may be decoded smaller than stored (a DCT-downscaled JPEG); :meth:`original_size` then
        reports the stored size. For a record with several images (``image_path`` a list) the base
        class passes a copy holding the one path chosen by :meth:`pick_path`.
        """
        raise NotImplementedError

    def original_size(self, record: Record, pixels: np.ndarray) -> tuple[int, int]:
        """``(H, W)`` of the stored image that ``read_pixels(record)`` returned as ``pixels``:
        the frame of ``Record.boxes`` and ``Record.mask``.

        Default: the header size for a file PIL reads (a JPEG may have been decoded downscaled),
        else ``pixels.shape`` (DICOMs are decoded at full size). Override for a reader that crops
        or downscales otherwise.
        """
        path = record.image_path
        if isinstance(path, list) or Path(path).suffix.lower() in (".dcm", ".dicom"):
            return tuple(pixels.shape[:2])  # type: ignore[return-value]
        size = stored_size(path)
        return size if size is not None else tuple(pixels.shape[:2])  # type: ignore[return-value]

    def pick_path(self, record: Record, train: bool) -> str:
        """The image read for ``record``: its path, or for several images one drawn uniformly at
        random in training and the first at evaluation."""
        path = record.image_path
        if not isinstance(path, list):
            return str(path)
        if train and len(path) > 1:
            import torch

            return str(path[int(torch.randint(len(path), ()).item())])
        return str(path[0])

    def read_image(self, record: Record, train: bool) -> tuple[np.ndarray, tuple[int, int]]:
        """``(pixels uint8 [h, w], (H, W) of the stored image)``: from the preprocessed cache when it
        holds the image, else decoded by :meth:`read_pixels`."""
        path = self.pick_path(record, train)
        single = record if path == record.image_path else dataclasses.replace(record, image_path=path)
        cache = self.preprocessed()
        if cache is not None:
            hit = cache.read(path)
            if hit is not None:
                return hit
            if self.use_preprocessed == "true":
                raise DataError(f"Image {path} is not in the preprocessed cache {cache.directory}; complete it with:\n  "
                                f"{cache.command}")
        pixels = self.read_pixels(single, train)
        if record.boxes is None and record.mask is None:
            return pixels, tuple(pixels.shape[:2])  # type: ignore[return-value]
        return pixels, self.original_size(single, pixels)

    def load_sample(self, record: Record, train: bool) -> dict[str, Any]:
        """Read the image (cache or decode), bring boxes / mask from the original pixels to those of
        the array read, then letterbox (and augment) all alike."""
        import torch

        gray, (orig_h, orig_w) = self.read_image(record, train)
        h, w = gray.shape
        sx, sy = w / orig_w, h / orig_h
        boxes = None
        if record.boxes is not None:
            boxes = np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4)
            if (h, w) != (orig_h, orig_w):
                boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        mask = None
        if record.mask is not None:
            scaled = getattr(record.mask, "scaled", None)
            if callable(scaled) and (h, w) != (orig_h, orig_w):
                mask = scaled(h, w, sx, sy)
            else:
                mask = record.mask(orig_h, orig_w)
                if mask.shape != (orig_h, orig_w):
                    raise DataError(f"The mask of {record.study_id} is {mask.shape}, but its image {record.image_path} "
                                    f"is {(orig_h, orig_w)}.")
                mask = resize_nearest(mask, h, w)
        image, boxes_t, mask_t = self.transform.apply(gray, train=train, boxes=boxes, mask=mask)
        sample: dict[str, Any] = {"image": image}
        if record.boxes is not None:
            labels = record.box_labels if record.box_labels is not None else np.zeros(len(record.boxes), np.int64)
            sample["boxes"] = boxes_t
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

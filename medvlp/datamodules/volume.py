"""Shared base of the 3D (CT) datamodules: one HU pipeline, an in-memory LRU and the preprocessed cache.

A subclass provides ``hu_image(path, source) -> SimpleITK.Image``: the file at ``path`` in
Hounsfield units with its true geometry (spacing, origin, direction), before any reorientation.
``source`` is whatever the subclass needs besides the path (CT-RATE: the volume's metadata row).
This class then runs, per read::

    hu_image -> orient (data.orientation) -> resample (data.spacing, linear, padding = window floor)
    -> HU sanity check -> [stored here by `medvlp preprocess` as int16 HU]
    -> centre crop / pad (data.size) -> window (data.window) to [0, 1] -> (train: intensity jitter,
    translation) -> (x - mean) / std -> (train: flips)

and keeps up to ``data.cache_size`` finished volumes in memory. ``medvlp preprocess --data <name>``
stores the bracketed stage once per file (memory-mappable int16 with spacing and origin); reads then
crop first, so only the needed part of the file is touched.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import (
    DataConfig,
    DataError,
    DataRootError,
    MemoryLRUMixin,
    PreprocessedCacheMixin,
    Record,
    VLPDataModule,
)

if TYPE_CHECKING:
    import torch

    from medvlp.datamodules.transforms import VolumeTransform


@dataclass
class VolumeConfig(DataConfig):
    """``data.*`` keys shared by the CT datamodules."""

    hu_sanity_check: bool = True  # raise if the air/lung region of a converted volume is not plausible
    hu_check_range: list[float] = field(default_factory=lambda: [-1100.0, -500.0])
    spacing: list[float] = bounded(default_factory=lambda: [3.0, 1.0, 1.0], gt=0, each=True)  # target (z, y, x) mm; [] = keep
    size: list[int] = bounded(default_factory=lambda: [112, 336, 336], gt=0, each=True)  # (D, H, W) centre pad/crop; [] = keep
    window: list[float] = field(default_factory=lambda: [-1150.0, 350.0])  # HU -> [0, 1]
    mean: float = 0.449
    std: float = bounded(0.226, gt=0)
    flip_prob: float = bounded(0.0, ge=0, le=1)  # train-time flip of each axis (fVLM: 0.2)
    flip_axes: list[bool] = field(default_factory=lambda: [True, True, True])  # (d, h, w) flips may use; [true, true, false] keeps left / right
    intensity_scale: float = bounded(0.0, ge=0)  # train-time contrast jitter: x * (1 + U(-s, s)) on the windowed [0, 1] values
    intensity_shift: float = bounded(0.0, ge=0)  # train-time brightness jitter: + U(-t, t)
    max_shift: list[int] = bounded(default_factory=lambda: [0, 0, 0], ge=0, each=True)  # train-time translation, voxels (d, h, w)
    orientation: str = "LPS"  # canonical frame of the arrays; "" = stored order
    cache_size: int = bounded(0, ge=0)  # finished volumes kept in memory per process (0 = none)
    preprocessed_dir: str = ""  # cache written by `medvlp preprocess`; "" = <cache_dir>/preprocessed/<name>-<digest>
    use_preprocessed: str = "auto"  # auto (use the cache when its manifest matches) | true (require it) | false
    anatomy_dir: str = ""  # TotalSegmentator output per volume (see anatomy_file; relative to data.root); "" = none
    anatomy_groups: str = "none"  # none (TotalSegmentator v2 ids as they are) | fvlm4 (1 lung, 2 heart, 3 esophagus, 4 aorta) | custom
    anatomy_group_map: dict[int, int] = field(default_factory=dict)  # custom: TotalSegmentator id -> group label 1..A (rest -> 0)
    # with anatomy masks: center (pad / crop the volume's centre to data.size) | anatomy (fVLM: the box of every
    # labelled voxel grown by crop_margin, padded to at least data.size, then a random crop in training, the centre else)
    crop: str = "center"
    crop_margin: list[int] = bounded(default_factory=lambda: [5, 20, 20], ge=0, each=True)  # (d, h, w) voxels around the box
    eval_crop: str = "center"  # crop=anatomy at evaluation: center (data.size from the box) | full (the whole box, fVLM's eval; batch 1)


# TotalSegmentator v2 ``total`` ids of the structures the groupings use (specs/methods/fvlm.md §3.1).
TOTALSEG_V2 = {"liver": 5, "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11, "lung_upper_lobe_right": 12,
               "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14, "esophagus": 15, "trachea": 16, "heart": 51,
               "aorta": 52, "atrial_appendage_left": 61}
ANATOMY_GROUPS = {
    "fvlm4": {10: 1, 11: 1, 12: 1, 13: 1, 14: 1, 51: 2, 61: 2, 15: 3, 52: 4},  # fVLM's merge; the rest -> 0
}


class VolumeDataModule(PreprocessedCacheMixin, MemoryLRUMixin, VLPDataModule):
    """Base of the CT datamodules (see the module docstring)."""

    Config = VolumeConfig
    modality = "3d"
    # config keys the stored (preprocessed) volumes depend on; a subclass adds its own
    cache_keys: ClassVar[tuple[str, ...]] = ("orientation", "spacing", "window", "hu_sanity_check", "hu_check_range")

    def __init__(self, cfg: VolumeConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        from medvlp.datamodules.formats.nifti import validate_orientation

        if list(cfg.spacing) and (len(cfg.spacing) != 3 or min(float(s) for s in cfg.spacing) <= 0):
            raise ValueError(f"data.spacing must be 3 positive numbers (z, y, x) in mm or [], got {list(cfg.spacing)}")
        if list(cfg.size) and (len(cfg.size) != 3 or min(int(s) for s in cfg.size) <= 0):
            raise ValueError(f"data.size must be 3 positive integers (D, H, W) or [], got {list(cfg.size)}")
        if len(cfg.window) != 2 or float(cfg.window[0]) >= float(cfg.window[1]):
            raise ValueError(f"data.window must be [low, high] HU with low < high, got {list(cfg.window)}")
        if len(cfg.hu_check_range) != 2:
            raise ValueError(f"data.hu_check_range must be [low, high] HU, got {list(cfg.hu_check_range)}")
        if float(cfg.std) <= 0 or not 0.0 <= float(cfg.flip_prob) <= 1.0:
            raise ValueError(f"data.std must be > 0 and data.flip_prob in [0, 1], got {cfg.std} and {cfg.flip_prob}")
        if not (0.0 <= float(cfg.intensity_scale) < 1.0 and float(cfg.intensity_shift) >= 0.0):
            raise ValueError(f"data.intensity_scale must be in [0, 1) and data.intensity_shift >= 0, got "
                             f"{cfg.intensity_scale} and {cfg.intensity_shift}")
        if len(cfg.max_shift) != 3 or min(int(v) for v in cfg.max_shift) < 0:
            raise ValueError(f"data.max_shift must be 3 non-negative voxel counts (d, h, w), got {list(cfg.max_shift)}")
        try:
            validate_orientation(cfg.orientation)
        except ValueError as err:
            raise ValueError(f"data.orientation: {err}") from err
        if cfg.crop not in ("center", "anatomy") or (cfg.crop == "anatomy" and not cfg.anatomy_dir):
            raise ValueError(f"data.crop='{cfg.crop}': choose center, or anatomy together with data.anatomy_dir.")
        if cfg.eval_crop not in ("center", "full"):
            raise ValueError(f"data.eval_crop='{cfg.eval_crop}': choose center or full.")
        if len(cfg.crop_margin) != 3:
            raise ValueError(f"data.crop_margin must be 3 voxel counts (d, h, w), got {list(cfg.crop_margin)}")
        if cfg.anatomy_groups not in ("none", "custom", *ANATOMY_GROUPS):
            raise ValueError(f"data.anatomy_groups='{cfg.anatomy_groups}': choose none, custom or one of {list(ANATOMY_GROUPS)}.")
        self._groups = self.group_table(cfg)
        if len(cfg.flip_axes) != 3:
            raise ValueError(f"data.flip_axes must be 3 booleans (d, h, w), got {list(cfg.flip_axes)}")
        self.init_preprocessed(cfg)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._transform: VolumeTransform | None = None
        self._anatomy_index: dict[str, str] | None = None

    @property
    def transform(self) -> VolumeTransform:
        """Normalisation + train-time augmentations (built on first use; imports torch)."""
        if self._transform is None:
            from medvlp.datamodules.transforms import VolumeTransform

            cfg = self.cfg
            self._transform = VolumeTransform(
                mean=float(cfg.mean), std=float(cfg.std), flip_prob=float(cfg.flip_prob),
                flip_axes=[bool(v) for v in cfg.flip_axes],
                intensity_scale=float(cfg.intensity_scale), intensity_shift=float(cfg.intensity_shift),
                max_shift=[int(v) for v in cfg.max_shift])
        return self._transform

    @staticmethod
    def group_table(cfg: VolumeConfig) -> dict[int, int] | None:
        """TotalSegmentator id -> anatomy label of ``data.anatomy_groups`` (None: ids kept as they are)."""
        if cfg.anatomy_groups != "custom":
            if dict(cfg.anatomy_group_map):
                raise ValueError("data.anatomy_group_map is used with data.anatomy_groups=custom only.")
            return ANATOMY_GROUPS.get(cfg.anatomy_groups)
        table: dict[int, int] = {}
        for key, value in dict(cfg.anatomy_group_map).items():
            try:
                sid, label = int(key), int(value)
            except (TypeError, ValueError):
                raise ValueError(f"data.anatomy_group_map: {key!r}: {value!r} - expected a TotalSegmentator id (an "
                                 f"integer) mapped to a group label (an integer >= 1).") from None
            if sid <= 0 or not 1 <= label <= 255:
                raise ValueError(f"data.anatomy_group_map: {key}: {value} - ids are > 0 and labels in 1..255.")
            table[sid] = label
        if not table:
            raise ValueError("data.anatomy_groups=custom needs data.anatomy_group_map, e.g. {10: 1, 11: 1, 51: 2}.")
        labels = sorted(set(table.values()))
        if labels != list(range(1, len(labels) + 1)):
            raise ValueError(f"data.anatomy_group_map uses the labels {labels}; use 1..{len(labels)} without gaps "
                             f"(label k is the k-th of method.anatomies).")
        return table

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        if getattr(cfg, "anatomy_dir", ""):
            top = Path(cfg.anatomy_dir)
            top = top if top.is_absolute() else Path(cfg.root) / top
            if not top.is_dir():
                raise DataRootError(f"data.anatomy_dir: {top} does not exist or is not a folder. It should hold the "
                                    f"anatomy label map of every volume (TotalSegmentator output: <VolumeName>.nii.gz, "
                                    f"or a folder <VolumeName>/ of per-structure masks, at any depth below it); a "
                                    f"relative path is taken from data.root.")

    # ------------------------------------------------------------------ to implement
    def hu_image(self, path: str, source: Any) -> Any:  # pragma: no cover - abstract
        """The file at ``path`` as a SimpleITK image in HU with its true geometry (no reorientation)."""
        raise NotImplementedError

    def cache_source(self, record: Record) -> Any:
        """What :meth:`hu_image` needs besides the path, for the one file ``record.image_path`` names."""
        return None

    # ------------------------------------------------------------------ the pipeline
    def hu_volume(self, path: str, source: Any = None) -> tuple[np.ndarray, Any]:
        """``(HU float32 [D, H, W], SimpleITK image)``: oriented, resampled, sanity-checked.

        Raises:
            DataError: naming ``path`` for a volume that is not one (a single slice, a degenerate
                axis or spacing), non-finite values, or (``data.hu_sanity_check``) implausible HU.
        """
        from medvlp.datamodules.formats import nifti

        cfg = self.cfg
        img = self.hu_image(path, source)
        nifti.check_volume_geometry(img, path)
        img = nifti.orient(img, cfg.orientation)
        if list(cfg.spacing):
            img = nifti.resample(img, [float(s) for s in cfg.spacing], default_value=float(cfg.window[0]))
        hu = nifti.to_array(img)
        nifti.check_finite(hu, path)
        if cfg.hu_sanity_check:
            nifti.check_hu(hu, path, [float(v) for v in cfg.hu_check_range])
        return hu, img

    def hu_resampled(self, path: str, source: Any = None) -> np.ndarray:
        """HU ``[D, H, W]`` after orientation and resampling (before any crop): from the preprocessed
        cache when it holds the file, else decoded."""
        cache = self.preprocessed()
        if cache is not None:
            hit = cache.read(path)
            if hit is not None:
                return hit[0]
            if self.use_preprocessed == "true":
                raise DataError(f"Volume {path} is not in the preprocessed cache {cache.directory}; complete it "
                                f"with:\n  {cache.command}")
        return self.hu_volume(path, source)[0]

    def load_volume(self, path: str, source: Any = None) -> np.ndarray:
        """Windowed, resampled, cropped volume ``[D, H, W]`` in ``[0, 1]`` (kept in memory if
        ``data.cache_size``). Reads the preprocessed cache when it holds the file (memory-mapped:
        only the cropped part is read), else decodes the file."""
        from medvlp.datamodules.formats import nifti

        cached = self._recall(path)
        if cached is not None:
            return cached
        cfg = self.cfg
        hu = self.hu_resampled(path, source)
        low, high = float(cfg.window[0]), float(cfg.window[1])
        if list(cfg.size):  # crop first (reads only that part of a memory-mapped volume), pad with the window floor
            hu = nifti.center_crop_or_pad(hu, [int(s) for s in cfg.size], pad_value=low)
        vol = np.ascontiguousarray(nifti.window(hu, low, high))
        return self._remember(path, vol)

    def pick(self, record: Record, train: bool) -> tuple[str, Any]:
        """``(path, source)`` of the file read for ``record``: its only file, or, when it lists several
        (e.g. reconstructions), one drawn at random in training and the first at evaluation."""
        import torch

        if not isinstance(record.image_path, list):
            return str(record.image_path), self.cache_source(record)
        paths = record.image_path
        index = int(torch.randint(len(paths), ()).item()) if train and len(paths) > 1 else 0
        return str(paths[index]), self.cache_source(_with_path(record, paths[index]))

    def load_image(self, record: Record, train: bool) -> torch.Tensor:
        """The file :meth:`pick` chooses, as ``[1, D, H, W]``."""
        path, source = self.pick(record, train)
        return self.transform(self.load_volume(path, source), train=train)

    # ------------------------------------------------------------------ anatomy masks (TotalSegmentator)
    def anatomy_root(self) -> Path:
        """``data.anatomy_dir``, relative to ``data.root`` unless absolute."""
        top = Path(self.cfg.anatomy_dir)
        return top if top.is_absolute() else Path(self.cfg.root) / top

    def anatomy_file(self, path: str) -> str:
        """The TotalSegmentator output for the volume at ``path`` under ``data.anatomy_dir``, found by the
        volume's file name anywhere below it: a multi-label NIfTI ``<name>.nii.gz`` (``--ml``) or a
        folder ``<name>/`` of per-structure masks (TotalSegmentator's default output)."""
        if self._anatomy_index is None:
            import os

            index: dict[str, str] = {}
            top = self.anatomy_root()
            if not top.is_dir():
                raise DataError(f"data.anatomy_dir: {top} is not a folder. It should hold the anatomy label map of "
                                f"every volume (TotalSegmentator output: <VolumeName>.nii.gz or a folder <VolumeName>/ "
                                f"of per-structure masks, at any depth).")
            for dirpath, dirnames, filenames in os.walk(top):
                for f in filenames:
                    if f.endswith((".nii.gz", ".nii")):
                        index.setdefault(f, os.path.join(dirpath, f))
                for d in dirnames:
                    index.setdefault(d + ".nii.gz", os.path.join(dirpath, d))
            self._anatomy_index = index
        name = Path(path).name
        if name.endswith(".npz"):  # Rad-ChestCT: <id>.npz -> <id>.nii.gz
            name = name[: -len(".npz")]
        if not name.endswith((".nii.gz", ".nii")):
            name = name + ".nii.gz"
        found = self._anatomy_index.get(name)
        if found is None:
            raise DataError(f"No anatomy mask for {path} under data.anatomy_dir={self.cfg.anatomy_dir} (looked for "
                            f"{name} or a folder {name.split('.nii')[0]}/ of per-structure masks).")
        return found

    def anatomy_image(self, path: str, source: Any) -> Any:
        """The volume's anatomy label map as a SimpleITK image (ids per ``data.anatomy_groups``) with the
        volume's geometry (a subclass may set it from metadata, as for CT-RATE v1 files)."""
        import SimpleITK as sitk

        from medvlp.datamodules.formats import nifti

        where = Path(self.anatomy_file(path))
        groups = self._groups
        try:
            if where.is_dir():  # per-structure masks: combine the known structures
                if groups is None:
                    raise DataError(f"{where} holds per-structure masks; set data.anatomy_groups (e.g. fvlm4) to "
                                    f"merge them, or run TotalSegmentator with --ml for one label map.")
                img, arr = None, None
                for structure, sid in TOTALSEG_V2.items():
                    f = where / f"{structure}.nii.gz"
                    if sid in groups and f.is_file():
                        part = nifti.read_image(f)
                        a = sitk.GetArrayFromImage(part) > 0
                        if arr is None:
                            img, arr = part, np.zeros(a.shape, np.uint8)
                        arr[a] = groups[sid]
                if arr is None:
                    raise DataError(f"{where} holds none of the structures data.anatomy_groups={self.cfg.anatomy_groups} uses.")
                out = sitk.GetImageFromArray(arr)
                out.CopyInformation(img)
            else:
                out = nifti.read_image(where)
                if groups is not None:
                    lut = np.zeros(max(max(groups), int(sitk.GetArrayViewFromImage(out).max())) + 1, np.uint8)
                    for sid, g in groups.items():
                        lut[sid] = g
                    mapped = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(out).astype(np.int64)])
                    mapped.CopyInformation(out)
                    out = mapped
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - unreadable mask file
            raise DataError(f"Anatomy mask {where} cannot be read: {type(err).__name__}: {err}") from err
        return self.fix_anatomy_geometry(out, source, path)

    def fix_anatomy_geometry(self, img: Any, source: Any, path: str = "") -> Any:
        """Hook: give the mask of the volume at ``path`` the volume's true geometry (default: as stored)."""
        return img

    def load_anatomy(self, path: str, source: Any = None, crop: bool = True) -> np.ndarray:
        """``[D, H, W]`` label map aligned with :meth:`load_volume` (orient, nearest resampling, the same crop /
        pad with 0; ``crop=False``: the whole resampled map): uint8 with a grouping (``data.anatomy_groups``),
        else int64; kept in memory with the volumes (``data.cache_size``)."""
        import SimpleITK as sitk

        from medvlp.datamodules.formats import nifti

        cfg = self.cfg
        key = f"anatomy:{int(crop)}:{path}"
        cached = self._recall(key)
        if cached is not None:
            return cached
        cache = self.preprocessed()
        arr = cache.read_extra(path, "anatomy") if cache is not None else None
        if arr is None:
            img = nifti.orient(self.anatomy_image(path, source), cfg.orientation)
            if list(cfg.spacing):
                img = nifti.resample(img, [float(s) for s in cfg.spacing], label=True, default_value=0.0)
            arr = sitk.GetArrayFromImage(img).astype(self.anatomy_dtype())
        if list(cfg.size) and crop:
            arr = nifti.center_crop_or_pad(arr, [int(s) for s in cfg.size], pad_value=0)
        arr = np.ascontiguousarray(arr)
        return self._remember(key, arr) if crop else arr

    def anatomy_dtype(self) -> type:
        """uint8 with a grouping (a few labels), else int64 (TotalSegmentator ids as they are)."""
        return np.uint8 if self._groups is not None else np.int64

    def anatomy_box(self, path: str, source: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """fVLM's preprocessing (spec §3.3 steps 6-7): ``(windowed volume in [0, 1], label map)``, both cut to the
        box of every labelled voxel grown by ``data.crop_margin`` (clamped to the volume) and padded
        symmetrically to at least ``data.size`` (the image with the window floor, the map with 0); larger
        axes are kept. Kept in memory like :meth:`load_volume` (``data.cache_size``)."""
        from medvlp.datamodules.formats import nifti

        key = "anatomy-box:" + path
        cached = self._recall(key)
        if cached is not None:
            return cached
        cfg = self.cfg
        hu = self.hu_resampled(path, source)
        labels = self.load_anatomy(path, source, crop=False)
        if labels.shape != hu.shape:
            raise DataError(f"The anatomy mask of {path} comes out {labels.shape}, its volume {hu.shape}: their "
                            f"geometries differ.")
        where = np.nonzero(labels.reshape(labels.shape[0], -1).any(1))[0], np.nonzero(labels.any((0, 2)))[0], \
            np.nonzero(labels.any((0, 1)))[0]
        if not len(where[0]):
            raise DataError(f"The anatomy mask of {path} ({self.anatomy_file(path)}) labels no voxel of "
                            f"data.anatomy_groups={cfg.anatomy_groups}; data.crop=anatomy needs at least one.")
        box = tuple(slice(max(int(w[0]) - m, 0), min(int(w[-1]) + 1 + m, n))
                    for w, m, n in zip(where, (int(v) for v in cfg.crop_margin), hu.shape))
        low, high = float(cfg.window[0]), float(cfg.window[1])
        size = [max(int(s), n.stop - n.start) for s, n in zip(cfg.size or [0, 0, 0], box)]
        vol = nifti.window(nifti.center_crop_or_pad(np.asarray(hu[box]), size, pad_value=low), low, high)
        lab = nifti.center_crop_or_pad(labels[box], size, pad_value=0)
        out = (np.ascontiguousarray(vol), np.ascontiguousarray(lab))
        return self._remember(key, out)

    def anatomy_crop(self, path: str, source: Any, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """``data.crop=anatomy``: the :meth:`anatomy_box` volume and map cut to ``data.size`` - at a random
        position in training (fVLM's ``RandSpatialCrop``), at the centre otherwise, or whole at evaluation with
        ``data.eval_crop=full``."""
        import torch

        from medvlp.datamodules.formats import nifti

        vol, lab = self.anatomy_box(path, source)
        size = [int(s) for s in self.cfg.size] or list(vol.shape)
        if not train and self.cfg.eval_crop == "full":
            return vol, lab
        if not train:
            return nifti.center_crop_or_pad(vol, size), nifti.center_crop_or_pad(lab, size)
        starts = [int(torch.randint(n - s + 1, ()).item()) for n, s in zip(vol.shape, size)]
        box = tuple(slice(a, a + s) for a, s in zip(starts, size))
        return vol[box], lab[box]

    def load_sample(self, record: Record, train: bool) -> dict[str, Any]:
        """``{"image": [1, D, H, W]}`` plus, with ``data.anatomy_dir``, ``"anatomy"`` ``[1, D, H, W]`` int64
        moved and flipped together with the image."""
        path, source = self.pick(record, train)
        if not self.cfg.anatomy_dir:
            volume = self.load_volume(path, source)
            return {"image": self.transform(volume, train=train), **self.picked(record, path, train)}
        import torch

        if self.cfg.crop == "anatomy":
            volume, labels = self.anatomy_crop(path, source, train)
            image, anatomy = self.transform(np.ascontiguousarray(volume), train=train,
                                            mask=torch.from_numpy(labels.astype(np.int64))[None])
            return {"image": image, "anatomy": anatomy, **self.picked(record, path, train)}
        volume = self.load_volume(path, source)
        anatomy = torch.from_numpy(self.load_anatomy(path, source).astype(np.int64))[None]
        if tuple(anatomy.shape[1:]) != tuple(volume.shape):
            raise DataError(f"The anatomy mask of {path} comes out {tuple(anatomy.shape[1:])}, its volume "
                            f"{tuple(volume.shape)}: their geometries differ.")
        image, anatomy = self.transform(volume, train=train, mask=anatomy)
        return {"image": image, "anatomy": anatomy, **self.picked(record, path, train)}

    def picked(self, record: Record, path: str, train: bool) -> dict[str, Any]:
        """Hook: ``"text"`` / ``"labels"`` of the file :meth:`pick` drew when they differ per file (e.g.
        CT-RATE's per-reconstruction reports); ``{}`` = the record's own."""
        return {}

    # ------------------------------------------------------------------ preprocessed cache (medvlp preprocess)
    def volume_settings(self) -> dict[str, Any]:
        """Settings the stored HU volumes depend on, besides :attr:`cache_keys` (subclasses extend)."""
        cfg = self.cfg
        return {"orientation": cfg.orientation, "spacing": [float(v) for v in cfg.spacing],
                "pad_hu": float(cfg.window[0]), "hu_sanity_check": bool(cfg.hu_sanity_check),
                "hu_check_range": [float(v) for v in cfg.hu_check_range]}

    def cache_settings(self) -> dict[str, Any]:
        """What the cached volumes depend on (the manifest of ``medvlp preprocess``): everything up to
        resampling. Window, crop size, normalisation and flips apply at read time. With
        ``data.anatomy_dir`` the label maps stored beside the volumes depend on the mask folder and the
        grouping too."""
        out = {"dtype": "int16", "ndim": 3,
               "rule": "read -> HU -> orient -> resample (linear) -> round to int16 HU",
               "volume_settings": self.volume_settings()}
        if self.cfg.anatomy_dir:
            out["anatomy"] = {"dir": str(self.anatomy_root().resolve()), "groups": self.cfg.anatomy_groups,
                              "table": {str(k): v for k, v in sorted((self._groups or {}).items())},
                              "rule": "orient -> resample (nearest) onto the volume's grid"}
        return out

    def cache_extra_keys(self) -> tuple[str, ...]:
        """Config keys beyond :attr:`cache_keys` that the cache's command line must carry."""
        return ("anatomy_dir", "anatomy_groups") if self.cfg.anatomy_dir else ()

    def cache_item(self, record: Record) -> tuple[Any, ...]:
        """``(int16 HU [D, H, W], [spacing z, y, x (mm), origin x, y, z (mm)])`` of the one file
        ``record.image_path`` names (``medvlp preprocess`` passes one path at a time), and with
        ``data.anatomy_dir`` a third item ``{"anatomy": label map [D, H, W]}`` on the same grid."""
        from medvlp.datamodules.formats import nifti

        hu, img = self.hu_volume(str(record.image_path), self.cache_source(record))
        lo, hi = float(hu.min()), float(hu.max())
        if lo < -32768 or hi > 32767:
            raise DataError(f"{record.image_path}: values from {lo:.0f} to {hi:.0f} HU fall outside the int16 range "
                            f"[-32768, 32767] of the cache; its intensity rescale is probably wrong.")
        stored = np.rint(hu).astype(np.int16)
        meta = [*nifti.spacing_zyx(img), *(float(v) for v in img.GetOrigin())]
        if not self.cfg.anatomy_dir:
            return stored, meta
        labels = self.load_anatomy(str(record.image_path), self.cache_source(record), crop=False)
        if labels.shape != stored.shape:
            raise DataError(f"The anatomy mask of {record.image_path} comes out {labels.shape}, its volume "
                            f"{stored.shape}: their geometries differ.")
        return stored, meta, {"anatomy": labels}


def _with_path(record: Record, path: str) -> Record:
    import dataclasses

    return dataclasses.replace(record, image_path=path)


__all__ = ["VolumeConfig", "VolumeDataModule"]

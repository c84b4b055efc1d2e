"""Registries: lowercase name -> builder, for methods, datamodules, encoders and downstream tasks.

Built-in entries are declared lazily (``"module:attr"`` strings) so that ``medvlp list`` and
``medvlp --help`` never import torch. Classes register themselves with the decorator when their
module is imported; third-party packages add entries through the entry-point group
``medvlp.plugins``: each entry point names a module (or a callable) that is imported (or called)
once, before the first lookup, and registers what it provides with the same decorators.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "medvlp.plugins"
_plugins_loaded = False


class RegistryError(KeyError):
    """An unknown or conflicting registry key."""

    def __str__(self) -> str:  # KeyError quotes its message; users should read plain text
        return str(self.args[0])


def did_you_mean(name: str, options: list[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest option, or an empty string."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def load_plugins() -> None:
    """Import every module registered under the ``medvlp.plugins`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin must not hide the built-ins
            raise RegistryError(
                f"Plugin entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP}) failed to "
                f"import: {type(err).__name__}: {err}"
            ) from err
        if callable(obj) and not isinstance(obj, type):
            obj()


class Registry:
    """Maps a lowercase key to a class or factory.

    Example:
        >>> METHODS = Registry("method")
        >>> @METHODS.register("clip")
        ... class CLIP: ...
        >>> METHODS.get("clip")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._lazy: dict[str, str] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[Any], Any]:
        """Decorator registering ``obj`` under ``name``."""
        key = name.lower()

        def deco(obj: Any) -> Any:
            old = self._items.get(key)
            if old is not None and old is not obj and _qualname(old) != _qualname(obj):
                raise RegistryError(
                    f"{self.kind} '{key}' is already registered by {_qualname(old)}; "
                    f"{_qualname(obj)} cannot take the same name."
                )
            self._items[key] = obj
            if help or key not in self._help:
                self._help[key] = help or (obj.__doc__ or "").strip().split("\n")[0]
            return obj

        return deco

    def register_lazy(self, name: str, target: str, help: str = "") -> None:
        """Declare ``name`` as provided by ``"package.module:attr"``, imported on first use."""
        self._lazy[name.lower()] = target
        self._help[name.lower()] = help

    def names(self) -> list[str]:
        load_plugins()
        return sorted(set(self._items) | set(self._lazy))

    def describe(self, name: str) -> str:
        return self._help.get(name.lower(), "")

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.names()

    def get(self, name: str) -> Any:
        """Return the object registered under ``name``; unknown names fail with suggestions."""
        load_plugins()
        key = str(name).lower()
        if key in self._items:
            return self._items[key]
        if key in self._lazy:
            module, _, attr = self._lazy[key].partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._items.setdefault(key, obj)
            return self._items[key]
        options = self.names()
        raise RegistryError(
            f"Unknown {self.kind} '{name}'.{did_you_mean(key, options)} "
            f"Available: {', '.join(options) or '(none)'}."
        )


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


METHODS = Registry("method")
DATAMODULES = Registry("datamodule")
IMAGE_ENCODERS = Registry("image encoder")
TEXT_ENCODERS = Registry("text encoder")
TASKS = Registry("downstream task")

ALL = {
    "methods": METHODS,
    "datamodules": DATAMODULES,
    "image_encoders": IMAGE_ENCODERS,
    "text_encoders": TEXT_ENCODERS,
    "tasks": TASKS,
}

register_method = METHODS.register
register_datamodule = DATAMODULES.register
register_image_encoder = IMAGE_ENCODERS.register
register_text_encoder = TEXT_ENCODERS.register
register_task = TASKS.register

# Built-ins, imported on first use.
METHODS.register_lazy("clip", "medvlp.methods.clip:CLIP", "CLIP / ConVIRT baseline: symmetric InfoNCE on global features")
METHODS.register_lazy("mgca", "medvlp.methods.mgca:MGCA", "MGCA: instance (ITA) + token (CTA) + prototype (CPA) image-report alignment (2D)")
METHODS.register_lazy("g2d", "medvlp.methods.g2d:G2D", "G2D: global alignment (VLA) + parameter-free pseudo segmentation (PA) with a U-Net (2D)")
METHODS.register_lazy("hlip", "medvlp.methods.hlip:HLIP", "HLIP: CLIP on whole 3D studies with slice / scan / study attention (3D, multi-scan)")
DATAMODULES.register_lazy("mimic_cxr", "medvlp.datamodules.mimic_cxr:MimicCXRDataModule", "MIMIC-CXR-JPG images + MIMIC-CXR reports (2D)")
DATAMODULES.register_lazy("rsna_pneumonia", "medvlp.datamodules.rsna:RSNAPneumoniaDataModule", "RSNA Pneumonia (Kaggle stage 2) DICOMs: pneumonia label, boxes, box masks (2D)")
DATAMODULES.register_lazy("siim_pneumothorax", "medvlp.datamodules.siim:SIIMPneumothoraxDataModule", "SIIM-ACR Pneumothorax DICOMs + RLE masks, stage 1 or 2 layout (2D)")
DATAMODULES.register_lazy("object_cxr", "medvlp.datamodules.object_cxr:ObjectCXRDataModule", "Object-CXR foreign objects: JPGs with rectangle/ellipse/polygon boxes and masks (2D)")
DATAMODULES.register_lazy("chexpert", "medvlp.datamodules.chexpert:CheXpertDataModule", "CheXpert v1.0 / v1.0-small chest X-rays, 14 observations, 5x200 zero-shot split (2D)")
DATAMODULES.register_lazy("nih14", "medvlp.datamodules.nih14:NIH14DataModule", "NIH ChestX-ray14: 14 multi-hot labels + BBox_List boxes (2D)")
DATAMODULES.register_lazy("covidx", "medvlp.datamodules.covidx:COVIDxDataModule", "COVIDx CXR-2/3/4 or COVIDx<N> label files: COVID-19 classification (2D)")
DATAMODULES.register_lazy("ct_rate", "medvlp.datamodules.ct_rate:CTRateDataModule", "CT-RATE chest CT volumes + reports (3D)")
DATAMODULES.register_lazy("rad_chestct", "medvlp.datamodules.rad_chestct:RadChestCTDataModule", "Rad-ChestCT chest CT volumes (.npz) + abnormality labels, no reports (3D, zero-shot)")
DATAMODULES.register_lazy("cq500", "medvlp.datamodules.cq500:CQ500DataModule", "CQ500 head CT: DICOM series per scan + majority read of 14 findings (3D, evaluation)")
DATAMODULES.register_lazy("rsna_ich", "medvlp.datamodules.rsna_ich:RSNAICHDataModule", "RSNA intracranial haemorrhage slices regrouped into head CT series, 6 labels (3D)")
DATAMODULES.register_lazy("pub_brain5", "medvlp.datamodules.pub_brain5:PubBrain5DataModule", "Pub-Brain-5 brain MRI studies of several series (.pt), 5 classes; multi-scan batches (3D, evaluation)")
DATAMODULES.register_lazy("medblip_mri", "medvlp.datamodules.medblip_mri:MedBLIPMRIDataModule", "brain MRI + EHR text + CN/MCI/AD in MedBLIP's list format (ADNI, NACC, OASIS, AIBL, MIRIAD) (3D)")
DATAMODULES.register_lazy("brain_mri", "medvlp.datamodules.brain_mri:BrainMRIDataModule", "brain MRI studies of several series + report sentences in HLIP's study-JSON layout; multi-scan batches (3D)")
DATAMODULES.register_lazy("head_ct", "medvlp.datamodules.brain_mri:HeadCTDataModule", "head CT studies of several series + report sentences in HLIP's study-JSON layout; multi-scan batches (3D)")
IMAGE_ENCODERS.register_lazy("timm", "medvlp.encoders.image2d:TimmImageEncoder", "any timm model (ViT patch tokens / CNN feature-map cells)")
IMAGE_ENCODERS.register_lazy("vit3d", "medvlp.encoders.image3d:ViT3DEncoder", "ViT over volumes, 3D patches, optional 2D->3D inflation")
IMAGE_ENCODERS.register_lazy("hlip_vit", "medvlp.encoders.hlip_vit:HierarchicalViT", "HLIP's ViT over studies [B, N, C, D, H, W]: slice / scan / study attention per block")
TEXT_ENCODERS.register_lazy("hf", "medvlp.encoders.text:HFTextEncoder", "any BERT-family transformers model (hub name, local dir or 'tiny')")
TASKS.register_lazy("zeroshot", "medvlp.downstream.zero_shot:zero_shot_auc", "zero-shot classification with prompt pairs (AUROC)")
TASKS.register_lazy("retrieval", "medvlp.downstream.retrieval:retrieval_recall", "image<->text retrieval (recall@1/5/10)")
TASKS.register_lazy("classification", "medvlp.downstream.classification:run_classification",
                    "linear probe / fine-tuning of the image encoder (AUROC, accuracy)")
TASKS.register_lazy("segmentation", "medvlp.downstream.segmentation:run_segmentation",
                    "U-Net (CNN) or SETR (ViT) decoder on the image encoder (Dice)")
TASKS.register_lazy("detection", "medvlp.downstream.detection:run_detection",
                    "FCOS / RetinaNet / Faster R-CNN on a feature pyramid of the image encoder (mAP)")

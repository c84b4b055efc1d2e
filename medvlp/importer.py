"""``medvlp import``: the authors' released checkpoints of MGCA, G2D and HLIP as medvlp run directories.

A run directory written here is read like any trained run (``api.load_run``, ``medvlp zeroshot /
retrieve / downstream --run DIR``), so every evaluation runs on the authors' own weights:

* ``config.yaml`` - the method's parity preset: its experiment file (``configs/experiment``, chosen
  from the checkpoint's variant, or ``config``) plus the switches that reproduce how the released
  weights were run (:attr:`Layout.parity`, e.g. MGCA's position-blind text encoder, mgca.md Q19), plus
  the user's ``overrides``;
* ``text_encoder/`` - tokenizer and HF config of the preset's text model (its weights are in the checkpoint);
* ``checkpoints/imported.ckpt`` - ``{"state_dict": ...}`` under medvlp's module names;
* ``run_info.json`` - what was imported: source file and sha256, variant, config, and the mapping
  (tensors renamed, combined, ignored by design with the reason, filled by design).

The mapping is data: one :class:`Layout` per method (:data:`MGCA`, :data:`G2D`, :data:`HLIP`), each an
ordered table of :class:`Rename` / :class:`Combine` / :class:`Ignore` rules over the official state-dict
keys and :class:`Fill` rules for medvlp keys the official model has no tensor for. An official key
that no rule covers, a medvlp key left unfilled and a shape mismatch are errors that name the keys.

Checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain containers only). A
file that needs full unpickling (a Lightning checkpoint whose hyper-parameters are objects, an
``argparse.Namespace``) is refused unless the user trusts it (``trust_checkpoint`` /
``--trust-checkpoint``); then classes the file names but this environment lacks are read as inert
placeholders (only the tensors are used).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medvlp.checkpoints import CKPT_DIR, CheckpointError, UnsafeCheckpointError

CHECKPOINT_NAME = "imported.ckpt"
SHOWN = 40  # names listed per kind of problem in an error (the exception keeps every one)


class ImportMappingError(ValueError):
    """The official state dict does not map onto the medvlp method.

    Attributes:
        unknown: official keys no rule covers (with a note where one applies).
        unfilled: medvlp keys nothing fills (with the official name that would fill each, where known).
        mismatched: ``(official keys, official shapes, medvlp key, medvlp shape)`` per shape conflict.
    """

    def __init__(self, message: str, unknown: list[str], unfilled: list[str], mismatched: list[tuple]) -> None:
        super().__init__(message)
        self.unknown, self.unfilled, self.mismatched = unknown, unfilled, mismatched


class UntrustedCheckpointError(UnsafeCheckpointError):
    """The checkpoint needs full unpickling, which can run code stored in it; refused without trust."""


# --------------------------------------------------------------------------- the rules
@dataclass(frozen=True)
class Rename:
    """Official key -> medvlp key. A name ending in ``.`` is a prefix (the rest of the key is kept), otherwise
    one exact key. ``transform`` names an entry of :data:`TRANSFORMS`; ``hint`` explains a target the medvlp
    model may lack (shown in the error)."""

    official: str
    ours: str
    transform: str = ""
    hint: str = ""

    def target(self, key: str) -> str | None:
        if self.official.endswith("."):
            return self.ours + key[len(self.official):] if key.startswith(self.official) else None
        return self.ours if key == self.official else None

    def source(self, ours: str) -> str | None:
        """The official key that fills medvlp key ``ours`` (the inverse of :meth:`target`)."""
        if self.ours.endswith("."):
            return self.official + ours[len(self.ours):] if ours.startswith(self.ours) else None
        return self.official if ours == self.ours else None


@dataclass(frozen=True)
class Combine:
    """Several official keys -> several medvlp keys through ``transform`` (a :data:`TRANSFORMS` entry);
    ``note`` says why the layouts differ."""

    official: tuple[str, ...]
    ours: tuple[str, ...]
    transform: str
    note: str


@dataclass(frozen=True)
class Ignore:
    """Official keys (a regular expression, whole key) with no medvlp counterpart by design, and why."""

    official: str
    reason: str

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.official, key) is not None


@dataclass(frozen=True)
class Fill:
    """medvlp keys (a regular expression, whole key) the official model has no tensor for, filled by design
    with ``value`` (a :data:`FILLS` entry) when no official key fills them, and why."""

    ours: str
    value: str
    reason: str


@dataclass(frozen=True)
class Variant:
    """A released model of a method: its preset (``configs/experiment/<preset>.yaml``) and the official key
    whose presence identifies it ("" = the variant taken when no other marker is present)."""

    name: str
    preset: str
    marker: str = ""


@dataclass(frozen=True)
class Layout:
    """How one method's official checkpoints map onto its medvlp module (see the module docstring)."""

    method: str
    source: str  # the official repository, files and classes the key names come from
    rules: tuple[Rename | Combine | Ignore, ...]
    variants: tuple[Variant, ...]
    fills: tuple[Fill, ...] = ()
    parity: tuple[str, ...] = ()  # overrides on top of the preset: how the released weights were run
    derive: Callable[[dict[str, Any]], list[str]] | None = None  # overrides read off the weights (sizes)
    notes: tuple[str, ...] = ()  # recorded in run_info.json

    def variant_of(self, keys: Sequence[str]) -> Variant:
        present = set(keys)
        for v in self.variants:
            if v.marker and v.marker in present:
                return v
        default = [v for v in self.variants if not v.marker]
        if not default:
            markers = ", ".join(f"{v.name}: {v.marker}" for v in self.variants)
            raise ImportMappingError(f"This does not look like a {self.method} checkpoint: it has none of the keys "
                                     f"that identify its released models ({markers}).", [], [], [])
        return default[0]


# --------------------------------------------------------------------------- transforms and fills
@dataclass(frozen=True)
class Transform:
    """``apply``: official tensors -> medvlp tensors; ``official_shapes``: medvlp shapes -> the official shapes
    (documentation of the layout, and what tests build official-layout tensors from)."""

    apply: Callable[[list[Any]], list[Any]]
    official_shapes: Callable[[list[list[int]]], list[list[int]]]
    text: str


def _compose_linear(t: list[Any]) -> list[Any]:
    w_out, b_out, w_c, b_c = (x.double() for x in t)
    return [(w_c @ w_out).to(t[2].dtype), (w_c @ b_out + b_c).to(t[3].dtype)]


def _split3(t: list[Any]) -> list[Any]:
    if t[0].shape[0] % 3:
        raise ValueError(f"a packed q/k/v tensor of {t[0].shape[0]} rows does not split in 3")
    return [c.contiguous() for c in t[0].chunk(3, dim=0)]


TRANSFORMS: dict[str, Transform] = {
    "channels_first": Transform(
        lambda t: [t[0].permute(0, 4, 1, 2, 3).contiguous()],
        lambda s: [[s[0][0], *s[0][2:], s[0][1]]],
        "[1, d, h, w, C] -> [1, C, d, h, w]"),
    "drop_batch_axis": Transform(lambda t: [t[0][0]], lambda s: [[1, *s[0]]], "[1, N, C] -> [N, C]"),
    "split_qkv": Transform(_split3, lambda s: [[3 * s[0][0], *s[0][1:]]], "packed [3 d, ...] -> q, k, v [d, ...]"),
    "compose_linear": Transform(
        _compose_linear,
        lambda s: [[s[0][1], s[0][1]], [s[0][1]], list(s[0]), list(s[1])],
        "Linear(W_out, b_out) then Linear(W_c, b_c) -> Linear(W_c W_out, W_c b_out + b_c) (float64)"),
}


def _empty(ref: Any) -> Any:
    return ref.new_zeros(ref.shape) if ref.numel() == 0 else None


FILLS: dict[str, Callable[[Any], Any]] = {"zeros": lambda ref: ref.new_zeros(ref.shape), "empty": _empty}


# --------------------------------------------------------------------------- the three methods
_BERT_POSITION_IDS = ("buffer of the BERT embeddings (positions 0..511, saved by transformers < 4.31); medvlp "
                      "passes position ids at every call")

MGCA = Layout(
    method="mgca",
    source="HKU-MedAI/MGCA: mgca/models/mgca/mgca_module.py (class MGCA, a LightningModule, released as a Lightning "
           "checkpoint) with mgca/models/backbones/encoder.py (ImageEncoder, BertEncoder, GlobalEmbedding, "
           "LocalEmbedding), vits.py (VisionTransformer, ViT-B/16), cnn_backbones.py (torchvision ResNet-50, fc "
           "removed) and med.py (BLIP's BertModel, 6 layers of Bio_ClinicalBERT)",
    rules=(
        Rename("img_encoder_q.model.", "image_encoder.model."),  # ViT / torchvision ResNet names = timm's
        Rename("img_encoder_q.global_embed.head.", "img_global."),
        Rename("img_encoder_q.local_embed.head.", "img_local.head."),
        Ignore(r"text_encoder_q\.model\.embeddings\.position_ids", _BERT_POSITION_IDS + " (all zeros in the parity "
               "preset, mgca.md Q19)"),
        Ignore(r"text_encoder_q\.model\.encoder\.layer\.\d+\.crossattention\..+",
               "BLIP-BERT cross-attention sub-layers: created by mgca/configs/bert_config.json (add_cross_attention) "
               "but never run (the text encoder runs in text-only mode), untrained (mgca.md Q1, Q2)"),
        Rename("text_encoder_q.model.", "text_encoder.model."),
        Rename("text_encoder_q.global_embed.head.", "txt_global."),
        Rename("text_encoder_q.local_embed.head.", "txt_local.head."),
        Ignore(r"(patch|word)_local_atten_layer\..+",
               "nn.MultiheadAttention layers of the paper's learnable token attention; the released run used the "
               "parameter-free attention (use_local_atten=False), so they never trained (mgca.md D2)"),
        Rename("prototype_layer.weight", "prototypes.weight"),
    ),
    fills=(Fill(r"text_encoder\.model\.embeddings\.token_type_embeddings\.weight", "zeros",
                "BLIP's BertEmbeddings (med.py) has no token-type table: the released text encoder adds nothing for "
                "token types (mgca.md Q19)"),),
    variants=(Variant("vit", "mgca_vit_mimic", "img_encoder_q.model.blocks.0.attn.qkv.weight"),
              Variant("resnet", "mgca_resnet_mimic", "img_encoder_q.model.layer1.0.conv1.weight")),
    parity=("method.text_encoder.position_ids=zeros", "trainer.precision=32-true"),
)
"""MGCA's released ViT-B/16 and ResNet-50 checkpoints (Lightning checkpoints of ``mgca_module.MGCA``)."""

G2D = Layout(
    method="g2d",
    source="cheliu-computation/G2D-NeurIPS24: PRETRAIN/models/cnn_ae.py (class CNN_AE: smp.Unet('resnet50') as "
           "img_model, AttentionPool2d as attnpool, AutoModel Bio_ClinicalBERT as lm_model, proj_v, proj_t, "
           "pseudo_conv), saved by PRETRAIN/utils/trainer.py as {'epoch', 'model_state_dict', 'optimizer_state_dict'}",
    rules=(
        Rename("img_model.encoder.", "image_encoder.model."),  # smp's ResNet encoder: torchvision names = timm's
        Rename("img_model.decoder.", "decoder."),
        Rename("img_model.segmentation_head.", "segmentation_head."),
        Rename("attnpool.positional_embedding", "pool.positions"),
        Combine(("attnpool.mhsa.in_proj_weight",), ("pool.q_proj.weight", "pool.k_proj.weight", "pool.v_proj.weight"),
                "split_qkv", "nn.MultiheadAttention packs the query / key / value projections in one tensor"),
        Combine(("attnpool.mhsa.in_proj_bias",), ("pool.q_proj.bias", "pool.k_proj.bias", "pool.v_proj.bias"),
                "split_qkv", "nn.MultiheadAttention packs the query / key / value biases in one tensor"),
        Combine(("attnpool.mhsa.out_proj.weight", "attnpool.mhsa.out_proj.bias", "attnpool.c_proj.weight",
                 "attnpool.c_proj.bias"), ("pool.c_proj.weight", "pool.c_proj.bias"), "compose_linear",
                "the official pool applies nn.MultiheadAttention's out_proj and then c_proj, two linear maps in a "
                "row; medvlp's pool has one output layer, their product"),
        Ignore(r"lm_model\.embeddings\.position_ids", _BERT_POSITION_IDS),
        Ignore(r"lm_model\.pooler\..+", "BERT pooler of AutoModel: never used (the report feature is the projected "
               "[CLS] hidden state, g2d.md 2.2)"),
        Rename("lm_model.", "text_encoder.model."),
        Rename("proj_v.", "img_proj."),
        Rename("proj_t.", "txt_proj."),
        Ignore(r"pseudo_conv\..+", "1x1 conv defined in CNN_AE but never called (g2d.md 2.1)"),
    ),
    variants=(Variant("resnet50_unet", "g2d_code_mimic"),),
    parity=("trainer.precision=32-true",),
    notes=("The preset is the released code's recipe (configs/experiment/g2d_code_mimic.yaml): 256-px input, so "
           "the 8 x 8 attention-pool positions of the checkpoint load as trained.",),
)
"""G2D's full training checkpoint (``<name>_<epoch>_checkpoint.pth``); the ``_encoder.pth`` /
``_encoder_decoder.pth`` exports hold the image side only."""


def _hlip_sizes(official: dict[str, Any]) -> list[str]:
    """Patch size, scan grid and scan-index table of an HLIP checkpoint, read off its tensors."""
    out = []
    kernel = official.get("visual.trunk.patch_embed.proj.weight")
    spatial = official.get("visual.trunk.spatial_posemb")
    if kernel is not None and kernel.ndim == 5:
        patch = [int(p) for p in kernel.shape[2:]]
        out.append(f"method.image_encoder.patch_size=[{','.join(map(str, patch))}]")
        if spatial is not None and spatial.ndim == 5:
            size = [int(g) * p for g, p in zip(spatial.shape[1:4], patch, strict=True)]
            out.append(f"method.image_encoder.img_size=[{','.join(map(str, size))}]")
    seq = official.get("visual.trunk.sequential_posemb")
    out.append(f"method.image_encoder.sequence_pos_embed={'true' if seq is not None else 'false'}")
    if seq is not None and seq.ndim == 3:
        out.append(f"method.image_encoder.max_scans={int(seq.shape[1])}")
    return out


HLIP = Layout(
    method="hlip",
    source="Zch0414/hlip: src/hlip/visual_encoder.py (HLIPVisualEncoder, a timm VisionTransformer with "
           "spatial_posemb / sequential_posemb) inside open_clip's CustomTextCLIP (visual = TimmModel with a linear "
           "head, text = HFTextEncoder with a linear projection; src/hlip/model_configs/*.json), saved by "
           "src/hlip_train/main.py as open_clip's {'epoch', 'name', 'state_dict', 'optimizer'}",
    rules=(
        Rename("logit_scale", "logit_scale"),
        Rename("logit_bias", "logit_bias", hint="a SigLIP checkpoint: add method.loss=siglip"),
        Rename("visual.trunk.spatial_posemb", "image_encoder.spatial_pos", "channels_first"),
        Rename("visual.trunk.sequential_posemb", "image_encoder.sequence_pos", "drop_batch_axis"),
        Rename("visual.trunk.", "image_encoder."),  # cls_token, patch_embed.proj, blocks, norm: timm names
        Rename("visual.head.proj.weight", "img_proj.weight"),
        Ignore(r"text\.transformer\.embeddings\.(position_ids|token_type_ids)", _BERT_POSITION_IDS),
        Ignore(r"text\.transformer\.pooler\..+", "BERT pooler (kept only by some text trunks): HLIP pools the [CLS] "
               "hidden state (cls_last_hidden_state_pooler)"),
        Rename("text.transformer.", "text_encoder.model."),
        Rename("text.proj.weight", "txt_proj.weight"),
    ),
    fills=(Fill(r"image_encoder\.sequence_pos", "empty", "single-scan models (CT-RATE) have no scan-index table"),),
    variants=(Variant("brain_mri", "hlip_brainmri", "visual.trunk.sequential_posemb"), Variant("chest_ct", "hlip_ctrate")),
    parity=("trainer.precision=32-true",),
    derive=_hlip_sizes,
    notes=("The attention level of each block (slice / scan / study) is not stored in the weights: the preset's "
           "levels are used; a slice + scan + study model (vit_base_multiscan_h3_token1176) needs "
           "method.image_encoder.levels=[slice,scan,study,slice,scan,study,slice,scan,study,slice,scan,study].",),
)
"""HLIP's released models (CT-RATE: slice + scan blocks; brain MRI / head CT: scan + study blocks)."""

LAYOUTS: dict[str, Layout] = {"mgca": MGCA, "g2d": G2D, "hlip": HLIP}

# top-level entries of the official files other than the state dict, and why they are not read
ENTRIES_NOT_READ = {
    "optimizer_states": "optimizer state (training only)", "optimizer_state_dict": "optimizer state (training only)",
    "optimizer": "optimizer state (training only)", "lr_schedulers": "learning-rate scheduler state (training only)",
    "scaler": "AMP grad-scaler state (training only)", "callbacks": "Lightning callback state (training only)",
    "loops": "Lightning loop state (training only)",
    "hyper_parameters": "the official run's arguments; the medvlp config replaces them",
    "hparams_name": "the official run's arguments; the medvlp config replaces them",
    "epoch": "recorded in the imported checkpoint", "global_step": "recorded in the imported checkpoint",
    "pytorch-lightning_version": "version of the writer", "name": "the official model name",
}


def get_layout(method: str) -> Layout:
    if method not in LAYOUTS:
        from medvlp.config import ConfigError

        raise ConfigError(f"medvlp import: no official checkpoint layout for method '{method}'; "
                          f"importable: {', '.join(LAYOUTS)}.")
    return LAYOUTS[method]


# --------------------------------------------------------------------------- mapping
@dataclass
class Mapped:
    """The mapped state dict and what happened to every key."""

    state_dict: dict[str, Any]
    renamed: dict[str, str] = field(default_factory=dict)  # official -> medvlp
    combined: list[dict[str, Any]] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> official keys
    filled: dict[str, list[str]] = field(default_factory=dict)  # reason -> medvlp keys

    def counts(self) -> dict[str, int]:
        return {"renamed": len(self.renamed), "combined_official": sum(len(c["official"]) for c in self.combined),
                "combined_ours": sum(len(c["ours"]) for c in self.combined),
                "ignored": sum(map(len, self.ignored.values())), "filled": sum(map(len, self.filled.values())),
                "ours": len(self.state_dict)}


def _shape(t: Any) -> list[int]:
    return [int(s) for s in t.shape]


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {s}" for s in items[:SHOWN])
    more = f"\n    ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"  {title}:\n{shown}{more}"


def map_state_dict(layout: Layout, official: dict[str, Any], ours: dict[str, Any], source: str = "the checkpoint") -> Mapped:
    """Map ``official`` (official key -> tensor) onto ``ours`` (medvlp key -> tensor, e.g. ``method.state_dict()``;
    meta tensors work: only shapes and dtypes are read).

    Raises:
        ImportMappingError: official keys no rule covers, medvlp keys left unfilled, or shape mismatches,
            each listed by name (with shapes).
    """
    out: dict[str, Any] = {}
    mapped = Mapped(out)
    unknown: list[str] = []
    mismatched: list[tuple[list[str], list[list[int]], str, list[int]]] = []
    consumed: set[str] = set()

    def put(keys: list[str], shapes: list[list[int]], target: str, value: Any) -> bool:
        if target in out:
            unknown.append(f"{', '.join(keys)}: maps to {target}, which another official key already filled")
            return False
        if _shape(value) != _shape(ours[target]):
            mismatched.append((keys, shapes, target, _shape(ours[target])))
            return False
        out[target] = value.to(dtype=ours[target].dtype)
        return True

    for rule in layout.rules:  # groups first: their keys are exact names
        if not isinstance(rule, Combine):
            continue
        present = [k for k in rule.official if k in official]
        if not present:
            continue
        consumed.update(present)
        if len(present) < len(rule.official):
            lacking = [k for k in rule.official if k not in official]
            unknown.append(f"{', '.join(present)}: incomplete group (lacks {', '.join(lacking)})")
            continue
        absent = [o for o in rule.ours if o not in ours]
        if absent:
            unknown.append(f"{', '.join(rule.official)}: map to {', '.join(absent)}, which this model does not have")
            continue
        tensors = [official[k] for k in rule.official]
        shapes = [_shape(t) for t in tensors]
        try:
            values = TRANSFORMS[rule.transform].apply(tensors)
        except (RuntimeError, ValueError):  # shapes the transform cannot combine
            mismatched.append((list(rule.official), shapes, ", ".join(rule.ours), [_shape(ours[o]) for o in rule.ours]))
            continue
        if all([put(list(rule.official), shapes, o, v) for o, v in zip(rule.ours, values, strict=True)]):
            mapped.combined.append({"official": list(rule.official), "ours": list(rule.ours), "how": rule.note})

    for key, value in official.items():
        if key in consumed:
            continue
        rule = next((r for r in layout.rules if (isinstance(r, Ignore) and r.matches(key))
                     or (isinstance(r, Rename) and r.target(key) is not None)), None)
        if rule is None:
            unknown.append(f"{key} {_shape(value)}")
        elif isinstance(rule, Ignore):
            mapped.ignored.setdefault(rule.reason, []).append(key)
        else:
            target = rule.target(key)
            if target not in ours:
                hint = f" ({rule.hint})" if rule.hint else ""
                unknown.append(f"{key} {_shape(value)}: would be {target}, which this model does not have{hint}")
                continue
            try:
                result = TRANSFORMS[rule.transform].apply([value])[0] if rule.transform else value
            except (RuntimeError, ValueError, IndexError):  # a tensor of another rank than the transform expects
                mismatched.append(([key], [_shape(value)], target, _shape(ours[target])))
                continue
            if put([key], [_shape(value)], target, result):
                mapped.renamed[key] = target

    unfilled: list[str] = []
    mismatched_ours = {o for m in mismatched for o in m[2].split(", ")}
    for key, ref in ours.items():
        if key in out or key in mismatched_ours:
            continue
        fill = next((f for f in layout.fills if re.fullmatch(f.ours, key)), None)
        value = FILLS[fill.value](ref) if fill is not None else None
        if value is not None:
            out[key] = value
            mapped.filled.setdefault(fill.reason, []).append(key)
            continue
        wanted = next((s for r in layout.rules if isinstance(r, Rename) and (s := r.source(key))), None)
        wanted = wanted or next((", ".join(r.official) for r in layout.rules if isinstance(r, Combine) and key in r.ours), None)
        unfilled.append(f"{key} {_shape(ref)}" + (f" (official name: {wanted})" if wanted else ""))

    if unknown or unfilled or mismatched:
        parts = [f"Cannot import {source} as {layout.method}: its state dict does not match medvlp's {layout.method}."]
        if unknown:
            parts.append(_listing(f"{len(unknown)} official key(s) with no counterpart in medvlp", unknown))
        if unfilled:
            parts.append(_listing(f"{len(unfilled)} medvlp key(s) not filled by the checkpoint", unfilled))
        if mismatched:
            rows = [f"{', '.join(k)} {' '.join(map(str, s))} -> {o} expects {so}" for k, s, o, so in mismatched]
            parts.append(_listing(f"{len(mismatched)} shape mismatch(es)", rows))
        parts.append(_hint(layout, official, unknown, unfilled, mismatched))
        raise ImportMappingError("\n".join(p for p in parts if p), unknown, unfilled,
                                 [(k, s, o, so) for k, s, o, so in mismatched])
    return mapped


def _hint(layout: Layout, official: dict[str, Any], unknown: list, unfilled: list, mismatched: list) -> str:
    keys = list(official)
    if (layout is G2D and not any(k.startswith(("img_model.", "lm_model.", "attnpool.")) for k in keys)
            and any(k.startswith(("encoder.", "decoder.", "conv1.", "layer1.")) for k in keys)):
        return ("Hint: this is G2D's image-only export (<name>_encoder.pth or <name>_encoder_decoder.pth); import the "
                "full training checkpoint <name>_<epoch>_checkpoint.pth, which also holds the text tower, the "
                "projections and the attention pool.")
    if len(unknown) > 0.8 * max(len(keys), 1):
        tops = sorted({k.split(".")[0] for k in keys})[:8]
        return (f"Hint: almost no key is known - is this a {layout.method} checkpoint? Its keys start with: "
                f"{', '.join(tops)}.")
    if mismatched or unfilled or any("which this model does not have" in u for u in unknown):
        return ("Hint: medvlp's model is built from the preset config; when the checkpoint has other sizes (depth, "
                "width, patch size, image size), pick the matching experiment file (--config) or override those keys.")
    return ""


def official_shapes(layout: Layout, ours: dict[str, Any], keys: Sequence[str]) -> dict[str, list[int]]:
    """The shape each official key in ``keys`` has when it maps onto the medvlp tensors ``ours`` (the inverse of
    the table, for building official-layout tensors at another size); official keys that map onto a medvlp key
    ``ours`` lacks, or that are ignored, are left out."""
    out: dict[str, list[int]] = {}
    for rule in layout.rules:
        if isinstance(rule, Combine) and all(o in ours for o in rule.ours) and all(k in keys for k in rule.official):
            shapes = TRANSFORMS[rule.transform].official_shapes([_shape(ours[o]) for o in rule.ours])
            out.update(zip(rule.official, shapes, strict=True))
    for key in keys:
        if key in out:
            continue
        rule = next((r for r in layout.rules if (isinstance(r, Ignore) and r.matches(key))
                     or (isinstance(r, Rename) and r.target(key) is not None)), None)
        if isinstance(rule, Rename) and rule.target(key) in ours:
            shape = _shape(ours[rule.target(key)])
            out[key] = TRANSFORMS[rule.transform].official_shapes([shape])[0] if rule.transform else shape
    return out


# --------------------------------------------------------------------------- reading the official file
class _Placeholder:
    """Stands in for a class the checkpoint names but this environment lacks (its tensors are still read)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _lenient_pickle(missing: list[str]) -> Any:
    """A ``pickle_module`` for ``torch.load`` whose unpickler reads classes it cannot import as placeholders
    (listed in ``missing``), e.g. the hyper-parameter classes of an older Lightning."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                missing.append(f"{module}.{name}")
                return type(name, (_Placeholder,), {"__module__": module})

    return SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")


def read_official(path: str | Path, trust_checkpoint: bool = False) -> tuple[Any, dict[str, Any]]:
    """The contents of an official checkpoint file, and how it was read.

    ``torch.load(weights_only=True)`` first; a file that needs full unpickling is refused unless
    ``trust_checkpoint`` (then ``weights_only=False``; classes this environment lacks become inert placeholders).

    Returns:
        ``(contents, {"full_unpickling": bool, "placeholder_classes": [...]})``.

    Raises:
        UntrustedCheckpointError: the file needs full unpickling and is not trusted.
        CheckpointError: missing, unreadable or corrupt.
    """
    import torch

    from medvlp.checkpoints import check_archive

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist (or is not a file).")
    if zipfile.is_zipfile(path):
        check_archive(path)  # a damaged file is named as such, not read as wrong weights
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {"full_unpickling": False, "placeholder_classes": []}
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[0] if lines else type(err).__name__)
        if not trust_checkpoint:
            raise UntrustedCheckpointError(
                f"Refusing to load {path} with full unpickling: it holds objects other than tensors and plain "
                f"containers ({reason}; e.g. the hyper-parameters of a Lightning checkpoint or an argparse Namespace), "
                f"and unpickling such a file can run code stored in it. Nothing in it was run. If you trust this file "
                f"(e.g. you downloaded it from the authors' release), pass --trust-checkpoint (trust_checkpoint=True) "
                f"to allow full unpickling.") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types on a damaged file
        raise CheckpointError(f"Checkpoint {path} could not be read ({type(err).__name__}: {err}).") from None
    missing: list[str] = []
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle(missing))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"Checkpoint {path} could not be read even with full unpickling "
                              f"({type(err).__name__}: {err}).") from None
    return obj, {"full_unpickling": True, "placeholder_classes": sorted(set(missing))}


def _is_state_dict(node: Any) -> bool:
    import torch

    return (isinstance(node, dict) and bool(node) and all(isinstance(k, str) for k in node)
            and all(isinstance(v, torch.Tensor) for v in node.values()))


CONTAINERS = ("state_dict", "model_state_dict", "model", "module")


def unwrap(obj: Any, path: str | Path = "the checkpoint") -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict inside an official file: the file itself, or under ``state_dict`` (Lightning, open_clip),
    ``model_state_dict`` (G2D's trainer), ``model`` or ``module``; a ``module.`` prefix on every key (DDP) and
    ``_orig_mod.`` (torch.compile) are removed. Returns ``(state_dict, info)``."""
    node, where = obj, []
    while not _is_state_dict(node):
        key = next((k for k in CONTAINERS if isinstance(node, dict) and isinstance(node.get(k), dict)), None)
        if key is None or len(where) > 3:
            found = ", ".join(map(str, list(node)[:12])) if isinstance(node, dict) else type(node).__name__
            raise CheckpointError(f"{path} holds no state dict (tensors by name); found {found}"
                                  f"{' under ' + '/'.join(where) if where else ''}.")
        where.append(key)
        node = node[key]
    info: dict[str, Any] = {"container": "/".join(where) or "(the file itself)", "stripped_prefix": ""}
    state = dict(node)
    if any("._orig_mod." in k or k.startswith("_orig_mod.") for k in state):
        state = {k.replace("._orig_mod.", ".").removeprefix("_orig_mod."): v for k, v in state.items()}
        info["stripped_prefix"] += "_orig_mod."
    while state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        info["stripped_prefix"] += "module."
    if isinstance(obj, dict):
        for k in ("epoch", "global_step"):
            if isinstance(obj.get(k), int):
                info[k] = int(obj[k])
        top = where[0] if where else None
        info["not_read"] = {str(k): ENTRIES_NOT_READ.get(str(k), "other metadata of the file")
                            for k in obj if k != top}
    return state, info


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- config and model
def import_config(layout: Layout, variant: Variant, official: dict[str, Any] | None = None, config: str = "",
                  overrides: Sequence[str] = ()) -> Any:
    """The run config of an import: the variant's preset (or ``config``) + :attr:`Layout.parity` + the sizes read
    off the weights (:attr:`Layout.derive`) + ``overrides``, composed and checked."""
    from omegaconf import OmegaConf

    from medvlp import config as C

    file = C.group_file("experiment", config or variant.preset)
    derived = layout.derive(official) if layout.derive is not None and official is not None else []
    cfg = C.compose(config_file=str(file), overrides=[*layout.parity, *derived, *overrides])
    if cfg.method.name != layout.method:
        raise C.ConfigError(f"{file} composes method '{cfg.method.name}', but the checkpoint is imported as "
                            f"{layout.method}; pick a {layout.method} experiment file with --config.")
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # noqa: BLE001 - omegaconf's resolver errors
        raise C.ConfigError(f"Could not resolve the import config ({file}): {err}") from None
    C.check_values(cfg)
    return cfg


def build_offline(cfg: Any) -> Any:
    """The method of ``cfg`` with no pretrained weights downloaded (they come from the checkpoint); the text
    encoder's tokenizer and HF config are still read from ``method.text_encoder.model``."""
    from medvlp import api

    offline = cfg.copy()
    offline.method.text_encoder.pretrained = False
    offline.method.image_encoder.pretrained = False
    for key in ("inflate_from", "trunk_checkpoint"):
        if offline.method.image_encoder.get(key):
            offline.method.image_encoder[key] = ""
    return api.build_method(offline)


# --------------------------------------------------------------------------- the run directory
def import_checkpoint(method: str, checkpoint: str | Path, out: str | Path, *, config: str = "",
                      overrides: Sequence[str] = (), trust_checkpoint: bool = False) -> Path:
    """Turn an official checkpoint of ``method`` into a medvlp run directory ``out``; returns its path.

    Args:
        method: ``mgca``, ``g2d`` or ``hlip``.
        checkpoint: the authors' file (MGCA: a Lightning ``.ckpt``; G2D: ``<name>_<epoch>_checkpoint.pth``;
            HLIP: open_clip's ``.pt``).
        out: the run directory to write (created; must not hold a run yet).
        config: an experiment file (name in ``configs/experiment`` or path) instead of the variant's preset.
        overrides: ``key=value`` items applied last (e.g. ``data.root=/data/mimic-cxr-jpg/2.0.0``).
        trust_checkpoint: allow full unpickling of a file that needs it (it can run code stored in the file).

    Raises:
        UntrustedCheckpointError, CheckpointError: the file could not (or may not) be read.
        ImportMappingError: its tensors do not map onto the method (keys named).
        ConfigError: a bad config, or ``out`` already holds a run.
    """
    import torch

    from medvlp import api
    from medvlp import config as C
    from medvlp.cache import write_atomic

    layout = get_layout(method)
    path, out = Path(checkpoint), Path(out)
    if (out / api.CONFIG_NAME).exists():
        raise C.ConfigError(f"{out} already holds a run ({api.CONFIG_NAME}); choose another --out.")
    raw, how = read_official(path, trust_checkpoint)
    official, info = unwrap(raw, path)
    del raw
    variant = layout.variant_of(list(official))
    cfg = import_config(layout, variant, official, config, overrides)
    model = build_offline(cfg)
    mapped = map_state_dict(layout, official, model.state_dict(), source=str(path))
    model.load_state_dict(mapped.state_dict)  # strict: every key, right shapes

    out.mkdir(parents=True, exist_ok=True)
    if (out / api.CONFIG_NAME).exists():
        raise C.ConfigError(f"{out} already holds a run ({api.CONFIG_NAME}); choose another --out.")
    api.save_text_encoder(model, out)
    digest = sha256(path)
    ckdir = out / CKPT_DIR
    ckdir.mkdir(exist_ok=True)
    tmp = ckdir / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    torch.save({"state_dict": {k: v.detach().contiguous() for k, v in mapped.state_dict.items()},
                "epoch": info.get("epoch", 0), "global_step": info.get("global_step", 0),
                "imported_from": {"file": str(path.resolve()), "sha256": digest, "method": method,
                                  "variant": variant.name}}, tmp)
    os.replace(tmp, ckdir / CHECKPOINT_NAME)
    preset = str(C.group_file("experiment", config or variant.preset))
    record = api.run_info(cfg)
    record["import"] = {
        "method": method, "variant": variant.name, "source": str(path.resolve()), "sha256": digest,
        "size_bytes": path.stat().st_size, "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "official_code": layout.source, "config": preset,
        "overrides": {"parity": list(layout.parity), "from_weights": layout.derive(official) if layout.derive else [],
                      "user": list(overrides)},
        **how, **info,
        "counts": {"official": len(official), **mapped.counts()},
        "renamed": mapped.renamed, "combined": mapped.combined, "ignored": mapped.ignored, "filled": mapped.filled,
        "notes": list(layout.notes),
    }
    write_atomic(out / "run_info.json", json.dumps(record, indent=2))
    tmp_cfg = out / f".{api.CONFIG_NAME}.{os.getpid()}.tmp"
    C.save(cfg, tmp_cfg)
    os.replace(tmp_cfg, out / api.CONFIG_NAME)  # last: a directory with config.yaml is a complete run
    return out.resolve()


# --------------------------------------------------------------------------- command line
HELP = "turn the authors' released MGCA / G2D / HLIP checkpoint into a run directory"
DESCRIPTION = (
    "Turn an official checkpoint (MGCA: the Lightning .ckpt; G2D: <name>_<epoch>_checkpoint.pth; HLIP: open_clip's "
    ".pt) into a medvlp run directory: the method's parity preset config, the weights under medvlp's names, the "
    "text encoder's tokenizer and config (downloaded from the preset's model name), and run_info.json recording "
    "the import. Then: medvlp zeroshot / retrieve / downstream --run OUT. Overrides are key=value, applied last "
    "(e.g. data.root=/data/mimic-cxr-jpg/2.0.0).")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``medvlp import`` to the sub-command parsers ``sub`` (``ArgumentParser.add_subparsers()``)."""
    p = sub.add_parser("import", help=HELP, description=DESCRIPTION)
    p.add_argument("--method", required=True, choices=sorted(LAYOUTS), help="the method the checkpoint is of")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="the authors' checkpoint file")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory to write (must not hold a run)")
    p.add_argument("--config", default="", metavar="FILE",
                   help="an experiment file (configs/experiment name or path) instead of the method's parity preset")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a file that needs it (it can run code stored in the file: only for "
                        "files you trust)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, applied last")
    return p


def cmd_import(args: argparse.Namespace) -> None:
    run_dir = import_checkpoint(args.method, args.checkpoint, args.out, config=args.config or "",
                                overrides=list(args.overrides or []), trust_checkpoint=bool(args.trust_checkpoint))
    info = json.loads((run_dir / "run_info.json").read_text())["import"]
    c = info["counts"]
    print(f"imported {args.checkpoint} ({info['method']}, {info['variant']}): {c['official']} official tensors -> "
          f"{c['ours']} medvlp tensors ({c['renamed']} renamed, {c['combined_official']} combined, {c['ignored']} "
          f"ignored by design, {c['filled']} filled by design)")
    print(f"run directory: {run_dir}\nnext: medvlp zeroshot --run {run_dir} data.root=...   |   "
          f"medvlp downstream --run {run_dir} --data ...")


__all__ = ["import_checkpoint", "map_state_dict", "official_shapes", "read_official", "unwrap", "import_config",
           "build_offline", "add_parser", "cmd_import", "get_layout", "Layout", "Rename", "Combine", "Ignore", "Fill",
           "Variant", "MGCA", "G2D", "HLIP", "LAYOUTS", "ImportMappingError", "UntrustedCheckpointError"]

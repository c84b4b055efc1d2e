"""Config schemas and composition.

A run's config has five sections, each validated against a dataclass schema:

* ``method``  - the method's ``Config`` (a :class:`MethodConfig` subclass), chosen by ``method.name``;
* ``data``    - the datamodule's ``Config`` (a :class:`~medvlp.datamodules.base.DataConfig` subclass);
* ``trainer`` - :class:`TrainerConfig` (Lightning ``Trainer`` arguments we expose);
* ``optim``   - :class:`OptimConfig` (AdamW, warm-up + cosine);
* ``run``     - :class:`RunConfig` (output directory, name, seed).

Layers merge in this order: schema defaults -> ``configs/method/<m>.yaml`` -> ``configs/data/<d>.yaml``
-> ``configs/trainer/<t>.yaml`` -> ``--config FILE`` -> command-line dot-list. Every file is a partial
config with those top-level keys; a ``compose:`` key in a ``--config`` file names the group files
to start from (``compose: {method: mgca, data: mimic_cxr, trainer: gpu, image_encoder: vit_b16}``), and
one in a method file names its default data and its encoders (``configs/encoder/<name>.yaml``, merged
into ``method.image_encoder`` / ``method.text_encoder`` before the file's own keys; a method file that
names no encoder gets the CPU demo encoders, ``resnet_demo`` + ``tiny_bert``). Group files are looked
for in the built-in ``configs/``, then ``$MEDVLP_CONFIG_PATH`` and the folders plug-ins add
(:func:`add_config_dir`). Struct mode is on:
an unknown key fails with its full path and the closest valid key; a wrong type fails with the
expected type. This module does not import torch.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

SECTIONS = ("method", "data", "trainer", "optim", "run")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key, the value and the fix."""


# --------------------------------------------------------------------------- value checks
def bounded(default: Any = MISSING, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, each: bool = False, default_factory: Any = MISSING) -> Any:
    """A dataclass field whose value (every item of a list with ``each``) must lie in the given bounds;
    :func:`check_values` enforces them, naming the key, after the config is composed and resolved."""
    meta = {"bounds": {k: v for k, v in {"gt": gt, "ge": ge, "lt": lt, "le": le}.items() if v is not None}, "each": each}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


_BOUND_TEXT = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_BOUND_OK = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b, "lt": lambda v, b: v < b, "le": lambda v, b: v <= b}


def _number(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else f"{b:g}"


def check_values(cfg: DictConfig, prefix: str = "") -> None:
    """Check every value against the bounds declared on its schema field (:func:`bounded`).

    Raises:
        ConfigError: naming the key, the value and the allowed range.
    """
    schema = OmegaConf.get_type(cfg)
    declared: dict[str, Any] = {}
    for cls in reversed(getattr(schema, "__mro__", ())):  # a subclass that redefines a field keeps its bounds
        if is_dataclass(cls):
            declared.update({f.name: f.metadata for f in fields(cls) if f.metadata or f.name not in declared})
    for key in cfg:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(cfg, key) or OmegaConf.is_interpolation(cfg, key):
            continue
        value = cfg[key]
        if isinstance(value, DictConfig):
            check_values(value, path)
            continue
        meta = declared.get(str(key)) or {}
        bounds = meta.get("bounds") or {}
        if not bounds or value is None:
            continue
        items = list(value) if meta.get("each") else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int | float):
                continue
            bad = [k for k, b in bounds.items() if not _BOUND_OK[k](item, b)]
            if bad:
                allowed = " and ".join(f"{_BOUND_TEXT[k]} {_number(b)}" for k, b in bounds.items())
                shown = list(value) if meta.get("each") else value
                raise ConfigError(f"Config key '{path}' = {shown} is out of range: expected {allowed}"
                                  f"{' for every item' if meta.get('each') else ''}.")


# --------------------------------------------------------------------------- schemas
@dataclass
class ImageEncoderConfig:
    """``method.image_encoder``: the fields every image encoder shares. ``name`` picks a registered encoder,
    and its ``Config`` (a subclass of this one) is the schema of the block: :class:`TimmEncoderConfig`
    (``timm``), :class:`ViT3DEncoderConfig` (``vit3d``), :class:`HierarchicalViTConfig` (``hlip_vit``),
    :class:`AnatomyViTConfig` (``fvlm_vit``),
    :class:`FrozenTrunkViTConfig` (``medblip_vit``).
    ``configs/encoder/*.yaml`` hold ready-made blocks."""

    name: str = "timm"
    pretrained: bool = True
    in_chans: int = bounded(3, gt=0)
    img_size: list[int] = bounded(default_factory=lambda: [224], gt=0, each=True)
    drop_path: float = bounded(0.0, ge=0, lt=1)
    grad_checkpointing: bool = False


@dataclass
class TimmEncoderConfig(ImageEncoderConfig):
    """``timm``: any timm model (``model``; ``kwargs`` go to ``timm.create_model``), 2D."""

    name: str = "timm"
    model: str = "vit_base_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # CNNs: weights and inputs in channels-last (NHWC) memory order, the layout oneDNN's and cuDNN's fastest
    # convolutions use (test_resnet forward + backward on 2 CPU cores: 1.3-1.6x); no effect on ViTs
    channels_last: bool = True


@dataclass
class ViT3DEncoderConfig(ImageEncoderConfig):
    """``vit3d``: a ViT over volumes (``img_size`` D, H, W; ``patch_size`` per axis), optionally inflated
    from a 2D timm ViT (``inflate_from``)."""

    name: str = "vit3d"
    img_size: list[int] = bounded(default_factory=lambda: [32, 64, 64], gt=0, each=True)
    patch_size: list[int] = bounded(default_factory=lambda: [16, 16, 16], gt=0, each=True)
    width: int = bounded(768, gt=0)
    depth: int = bounded(12, gt=0)
    heads: int = bounded(12, gt=0)
    mlp_ratio: float = bounded(4.0, gt=0)
    pos_embed: Literal["learned", "sincos"] = "learned"  # learned (interpolated to the grid) | sincos (fixed)
    global_pool: Literal["cls", "mean"] = "cls"  # pooled feature: [CLS] token | mean of the patch tokens
    stem: Literal["patch", "conv"] = "patch"  # patch embedding: one strided conv | stride-2 conv stem
    inflate_from: str = ""  # timm ViT name, e.g. vit_base_patch16_224.mae; "" = random init


@dataclass
class HierarchicalViTConfig(ViT3DEncoderConfig):
    """``hlip_vit``: HLIP's ViT over studies, one attention level per block, scans per study, patch dropout."""

    name: str = "hlip_vit"
    levels: list[str] = field(default_factory=lambda: ["slice", "scan", "study"] * 4)  # slice | scan | study
    max_scans: int = bounded(40, ge=1)  # rows of the fixed sequence (scan index) table
    sequence_pos_embed: bool = False  # add the scan-index table (HLIP's multi-scan models)
    patch_dropout: float = bounded(0.0, ge=0, lt=1)  # training: drop this fraction of the tokens of every window


@dataclass
class AnatomyViTConfig(ViT3DEncoderConfig):
    """``fvlm_vit``: fVLM's 3D ViT (MONAI layout): no [CLS], learned positions, dropout, and the raw residual
    stream of some blocks returned beside the final normalised tokens (the anatomy pooling reads all)."""

    name: str = "fvlm_vit"
    in_chans: int = bounded(1, gt=0)
    img_size: list[int] = bounded(default_factory=lambda: [112, 256, 352], gt=0, each=True)
    patch_size: list[int] = bounded(default_factory=lambda: [16, 16, 32], gt=0, each=True)
    global_pool: Literal["cls", "mean"] = "mean"  # no [CLS]: the pooled feature is the mean token
    out_blocks: list[int] = bounded(default_factory=lambda: [4, 7, 10], gt=0, each=True)  # 1-indexed blocks also returned
    dropout: float = bounded(0.1, ge=0, lt=1)  # after the positions, on attention probabilities, projections, MLP
    norm_eps: float = bounded(1e-5, gt=0)  # LayerNorm eps (MONAI: PyTorch's default)
    pos_init: Literal["mae_sincos", "random"] = "mae_sincos"  # MAE's 2D sin-cos table resized to (h, w), tiled over d


@dataclass
class FrozenTrunkViTConfig(ImageEncoderConfig):
    """``medblip_vit``: MedBLIP's image branch - a trainable 3D patch embedding (one strided Conv3d) and 3D
    position table in front of the blocks of a frozen 2D ViT trunk (BLIP-2's EVA ViT-g), then a trainable
    LayerNorm (``ln_vision``). Gradients reach the patch embedding through the frozen blocks.

    ``trunk``: ``eva_vit_g`` (timm ``eva_giant_patch14_clip_224``, 1408 wide), ``eva`` (timm's EVA block at
    ``width`` / ``depth`` / ``heads`` / ``mlp_ratio``: the CPU stand-in), or any timm ViT name. The trunk keeps
    its first ``trunk_depth`` blocks (0 = all; BLIP-2 drops the last of 40 -> 39)."""

    name: str = "medblip_vit"
    in_chans: int = bounded(1, gt=0)
    img_size: list[int] = bounded(default_factory=lambda: [224, 224, 224], gt=0, each=True)
    patch_size: list[int] = bounded(default_factory=lambda: [32, 32, 32], gt=0, each=True)
    trunk: str = "eva_vit_g"  # eva_vit_g | eva (sized by width / depth / heads / mlp_ratio) | a timm ViT name
    trunk_depth: int = bounded(39, ge=0)  # keep the first N blocks (0 = all)
    trunk_checkpoint: str = ""  # a state dict file for the trunk (e.g. BLIP-2's eva_vit_g.pth); "" = timm's weights when pretrained
    trunk_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # cast of the frozen blocks (official: fp16)
    freeze_trunk: bool = True  # the official rule: every trunk parameter (cls token included) frozen
    width: int = bounded(1408, gt=0)  # eva stand-in only (eva_vit_g and timm names bring their own)
    depth: int = bounded(39, gt=0)
    heads: int = bounded(16, gt=0)
    mlp_ratio: float = bounded(6144 / 1408, gt=0)
    pos_std: float = bounded(0.02, gt=0)  # trunc-normal std of the 3D position table


@dataclass
class TextEncoderConfig:
    """``method.text_encoder``: a transformers encoder (hub name, local directory or ``tiny``)."""

    name: str = "hf"
    model: str = "emilyalsentzer/Bio_ClinicalBERT"
    pretrained: bool = True
    tokenizer: str = ""  # "" = the model's own tokenizer (a run directory stores a copy)
    num_layers: int = bounded(0, ge=0)  # >0 keeps only the first N transformer layers (MGCA keeps 6)
    freeze_layers: int = bounded(0, ge=0)  # >0 freezes the first N layers (and the embeddings, see freeze_embeddings)
    freeze_embeddings: bool = True  # with freeze_layers > 0, freeze the embedding layer too (G2D's code does not)
    attn_implementation: str = "sdpa"
    # auto (the checkpoint's own model class) | bert (load the BERT trunk, e.g. of CXR-BERT)
    architecture: Literal["auto", "bert"] = "auto"
    # pooled feature: cls ([CLS] token) | mean | max (over unmasked tokens; ConVIRT max-pools)
    pool: Literal["cls", "mean", "max"] = "cls"
    grad_checkpointing: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)  # fields of the HF config
    # sequential: positions 0..T-1 (BERT); zeros: every token at position row 0 and no token-type embedding - how
    # MGCA's released text encoder ran (spec mgca.md Q19), for parity with its checkpoints
    position_ids: Literal["sequential", "zeros"] = "sequential"


@dataclass
class QFormerConfig(TextEncoderConfig):
    """``qformer``: BLIP-2's Q-Former (LAVIS design): a BERT whose every ``cross_attention_freq``-th layer
    (0, 2, ...) cross-attends from learned query tokens to image tokens, with a second feed-forward block for
    the query positions; text runs through the same self-attention layers (its [CLS] is the text feature).

    ``model``: a BERT checkpoint for the self-attention and text feed-forward weights (``bert-base-uncased``;
    a hub name or local directory), or ``tiny`` (random weights sized by ``hidden_size`` ... ``intermediate_size``,
    with a WordPiece tokenizer trained on the synthetic EHR texts). Cross-attention, query feed-forward
    blocks and query tokens are always new (std 0.02)."""

    name: str = "qformer"
    model: str = "bert-base-uncased"
    num_query_tokens: int = bounded(32, gt=0)
    cross_attention_freq: int = bounded(2, gt=0)
    encoder_width: int = bounded(1408, gt=0)  # width of the image tokens (the image encoder's)
    hidden_size: int = bounded(768, gt=0)  # tiny only (a checkpoint brings its own)
    num_hidden_layers: int = bounded(12, gt=0)
    num_attention_heads: int = bounded(12, gt=0)
    intermediate_size: int = bounded(3072, gt=0)
    max_position_embeddings: int = bounded(512, gt=0)
    dropout: float = bounded(0.1, ge=0, lt=1)  # hidden and attention-probability dropout (BERT's 0.1)


@dataclass
class LLMConfig:
    """``method.llm``: a frozen Hugging Face language model (MedBLIP's decoder).

    ``model``: a hub name or local directory (``google/flan-t5-xl``, ``stanford-crfm/BioMedLM``), or an offline
    stand-in built from its config: ``tiny_t5`` (encoder-decoder) / ``tiny_gpt2`` (decoder-only), with a
    word-level tokenizer trained on the synthetic EHR texts; ``config_overrides`` resize them (any field of
    the HF config). ``pretrained=false`` builds a hub model from its config with random weights."""

    model: str = "tiny_t5"
    kind: Literal["auto", "seq2seq", "causal"] = "auto"  # auto = from the model's config
    pretrained: bool = True
    tokenizer: str = ""  # "" = the model's own
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # the frozen weights' dtype
    config_overrides: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    lora: bool = False  # LoRA adapters (peft) on the frozen LLM, trainable
    lora_r: int = bounded(8, gt=0)
    lora_alpha: float = bounded(16.0, gt=0)
    lora_dropout: float = bounded(0.05, ge=0, lt=1)
    lora_targets: list[str] = field(default_factory=list)  # module names; [] = the model type's attention projections
    grad_checkpointing: bool = False


@dataclass
class MethodConfig:
    """Fields every method shares (``method.*``). Methods extend this dataclass."""

    name: str = MISSING
    image_encoder: ImageEncoderConfig = field(default_factory=TimmEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = bounded(512, gt=0)
    loss_weights: dict[str, float] = field(default_factory=dict)  # loss term -> weight (missing = 1)


def encoder_schema(kind: str, name: str, default: Any) -> Any:
    """The schema instance of ``method.<kind>`` for the encoder ``name``: the method's own default when it
    is of that encoder, else the registered encoder's ``Config()``."""
    from medvlp.registry import IMAGE_ENCODERS, TEXT_ENCODERS

    if name == getattr(default, "name", None):
        return default
    registry = IMAGE_ENCODERS if kind == "image_encoder" else TEXT_ENCODERS
    cls = getattr(registry.get(name), "Config", None)
    return cls() if cls is not None else default


def method_schema(method_cls: type, image_encoder: str | None = None, text_encoder: str | None = None) -> Any:
    """An instance of ``method_cls.Config`` whose encoder blocks are the schemas of the named encoders."""
    schema = method_cls.Config()
    for kind, name in (("image_encoder", image_encoder), ("text_encoder", text_encoder)):
        if name:
            setattr(schema, kind, encoder_schema(kind, str(name), getattr(schema, kind)))
    return schema


def encoder_names(value: Any) -> tuple[str | None, str | None]:
    """``(method.image_encoder.name, method.text_encoder.name)`` of a method section (mapping or dataclass);
    None where it is not given."""
    out = []
    for kind in ("image_encoder", "text_encoder"):
        node = value.get(kind) if hasattr(value, "get") else getattr(value, kind, None)
        name = node.get("name") if hasattr(node, "get") else getattr(node, "name", None)
        out.append(None if name in (None, MISSING, "???") else str(name))
    return out[0], out[1]


@dataclass
class OptimConfig:
    """``optim.*``: AdamW with linear warm-up and cosine decay, stepped every optimiser step."""

    lr: float = bounded(1e-4, gt=0)
    weight_decay: float = bounded(0.05, ge=0)
    betas: list[float] = bounded(default_factory=lambda: [0.9, 0.999], ge=0, lt=1, each=True)
    eps: float = bounded(1e-8, gt=0)
    warmup_steps: int = bounded(0, ge=0)
    warmup_ratio: float = bounded(0.0, ge=0, lt=1)  # used when warmup_steps == 0: fraction of the total steps
    warmup_start_ratio: float = bounded(0.0, ge=0, lt=1)  # > 0: the warm-up rises linearly from lr * this (LAVIS / fVLM: 0.01)
    # cosine | constant | cosine_restarts (SGDR: cosine over every restart_steps) | cosine_epoch (one value per epoch, LAVIS / fVLM)
    schedule: Literal["cosine", "constant", "cosine_restarts", "cosine_epoch"] = "cosine"
    restart_steps: int = bounded(0, ge=0)  # cosine_restarts: period in optimiser steps (G2D's code: 200)
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)  # final lr = lr * min_lr_ratio
    no_decay_norm_bias: bool = True  # no weight decay on norms, biases and 1-d parameters
    text_lr_mult: float = bounded(1.0, ge=0)  # lr multiplier of the text encoder
    # AdamW's fused kernel (one launch for every parameter); null = on when training on a GPU
    fused: bool | None = None


@dataclass
class TrainerConfig:
    """``trainer.*``: the Lightning Trainer arguments medvlp exposes."""

    max_epochs: int = bounded(10, ge=-1)
    max_steps: int = bounded(-1, ge=-1)
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = bounded(1, ge=1)
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = bounded(1, ge=1)
    gradient_clip_val: float = bounded(0.0, ge=0)
    log_every_n_steps: int = bounded(10, ge=1)
    val_check_interval: float = bounded(1.0, gt=0)
    check_val_every_n_epoch: int = bounded(1, ge=1)
    limit_val_batches: float = bounded(1.0, ge=0)
    num_sanity_val_steps: int = bounded(0, ge=-1)
    checkpoint_every_n_steps: int = bounded(0, ge=0)  # 0 = at the end of every epoch only
    keep_checkpoints: int = bounded(2, ge=1)  # newest step checkpoints kept (plus last.ckpt at the end)
    enable_progress_bar: bool = True
    deterministic: bool = False
    compile: bool = False
    # strategy fsdp (Lightning's FSDP, CUDA) or model_parallel (Lightning's FSDP2 strategy, also on CPU / gloo):
    # the module classes, by name, sharded as their own units (e.g. FrozenLLM, T5Block); the rest is one root unit
    fsdp_wrap: list[str] = field(default_factory=list)
    fsdp_sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD"  # fsdp only


@dataclass
class RunConfig:
    """``run.*``: where the run directory goes."""

    out_dir: str = "runs"
    name: str = ""  # "" = <method>-<data>-<timestamp>
    seed: int = bounded(0, ge=0, le=2**32 - 1)


# --------------------------------------------------------------------------- files
def config_dir() -> Path:
    """The ``configs/`` folder: ``$MEDVLP_CONFIG_DIR``, else the copy inside the package (``medvlp/configs``,
    shipped in the wheel; a source checkout links ``configs/`` at its root to it)."""
    env = os.environ.get("MEDVLP_CONFIG_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent / "configs"
    if not here.is_dir():
        raise ConfigError(f"No configs/ folder found at {here}; reinstall medvlp or set MEDVLP_CONFIG_DIR.")
    return here


_extra_dirs: list[Path] = []
ENCODER_GROUPS = ("image_encoder", "text_encoder")
DEFAULT_ENCODERS = {"image_encoder": "resnet_demo", "text_encoder": "tiny_bert"}


def add_config_dir(path: str | Path) -> None:
    """Add a folder laid out like ``configs/`` (``method/``, ``data/``, ``encoder/``, ...) to the search
    path; a plug-in package calls this from its registration hook to ship its own YAML files."""
    p = Path(path).resolve()
    if p not in _extra_dirs:
        _extra_dirs.append(p)


def config_dirs() -> list[Path]:
    """Every folder searched for group files: the built-in one, then ``$MEDVLP_CONFIG_PATH`` (a
    ``os.pathsep``-separated list) and the folders plug-ins added, in that order."""
    from medvlp.registry import load_plugins

    load_plugins()
    env = [Path(p) for p in os.environ.get("MEDVLP_CONFIG_PATH", "").split(os.pathsep) if p]
    return [config_dir(), *env, *_extra_dirs]


def group_file(group: str, name: str, required: bool = True) -> Path | None:
    """``configs/<group>/<name>.yaml`` (first match on the search path); a path to an existing file is
    accepted as is. A missing file is an error naming the options, or ``None`` with ``required=False``."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for folder in config_dirs():
        path = folder / group / f"{name}.yaml"
        if path.is_file():
            return path
    if not required:
        return None
    options = group_options(group)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"No {group} config '{name}' (looked in {', '.join(str(d / group) for d in config_dirs())})."
                      f"{hint} Available: {', '.join(options)}.")


def group_options(group: str) -> list[str]:
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist.")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping, got {type(cfg).__name__}.")
    return cfg


# --------------------------------------------------------------------------- composition
def _schema_keys(schema: Any, prefix: str) -> list[str]:
    """Every valid dotted key under a dataclass schema (for suggestions)."""
    out = []
    for f in fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        out.append(key)
        val = getattr(schema, f.name, None)
        if is_dataclass(val):
            out.extend(_schema_keys(val, key))
    return out


def _translate(err: OmegaConfBaseException, source: str, schemas: dict[str, Any]) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError | ConfigAttributeError):
        all_keys = [k for sec, sch in schemas.items() for k in [sec, *_schema_keys(sch, sec)]]
        close = difflib.get_close_matches(key, all_keys, n=1, cutoff=0.6)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k.rsplit(".", 1)[-1] for k in all_keys if k.rsplit(".", 1)[0] == parent and "." in k)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        valid = f" Valid keys under '{parent}': {', '.join(siblings)}." if siblings else ""
        return ConfigError(f"Unknown config key '{key}' (from {source}).{hint}{valid}")
    if isinstance(err, ValidationError):
        expected = _expected_type(schemas, key)
        return ConfigError(
            f"Config key '{key or '?'}' (from {source}) expects {expected}, got {str(err.msg or err).splitlines()[0]}"
        )
    return ConfigError(f"Invalid config (from {source}) at '{key or '?'}': {getattr(err, 'msg', None) or err}")


def _expected_type(schemas: dict[str, Any], key: str) -> str:
    parts = key.split(".")
    obj: Any = schemas.get(parts[0])
    for part in parts[1:]:
        if not is_dataclass(obj):
            return "a valid value"
        fmap = {f.name: f for f in fields(obj)}
        if part not in fmap:
            return "a valid value"
        if part == parts[-1]:
            t = fmap[part].type
            return f"type {t if isinstance(t, str) else getattr(t, '__name__', t)}"
        obj = getattr(obj, part)
    return "a valid value"


def _merge(base: DictConfig, layer: DictConfig | dict, source: str, schemas: dict[str, Any]) -> DictConfig:
    layer = OmegaConf.create(layer) if isinstance(layer, dict) else layer
    unknown = [k for k in layer if k not in SECTIONS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SECTIONS, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"Unknown config section '{unknown[0]}' (from {source}).{hint} Sections: {', '.join(SECTIONS)}."
        )
    misplaced = _value_for_section(base, layer)
    if misplaced:
        key, value, section = misplaced
        names = [str(k) for k in section]
        example = next((k for k in ("model", "root", "name") if k in names), names[0] if names else "name")
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(
            f"Config key '{key}' (from {source}) is a section ({shown}), got the single value {value!r}; "
            f"set one of its keys instead, e.g. {key}.{example}={value}."
        )
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise _translate(err, source, schemas) from None


def _value_for_section(base: Any, layer: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first ``(key, value, section)`` where ``layer`` gives a plain value for a section of ``base``."""
    if not isinstance(layer, DictConfig) or not isinstance(base, DictConfig):
        return None
    for key in layer:
        if key not in base or OmegaConf.is_missing(layer, key) or OmegaConf.is_interpolation(layer, key):
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        below, value = base._get_node(key), layer[key]
        if isinstance(below, DictConfig) and not isinstance(value, DictConfig) and value is not None:
            return path, value, below
        found = _value_for_section(below, value, path)
        if found:
            return found
    return None


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Dot-list ``key=value`` arguments to a config (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key=value (e.g. trainer.max_steps=50).")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"Could not parse the overrides {overrides}: {err}") from None


def _name_in(layers: list[DictConfig], section: str) -> str | None:
    """The last ``name`` the layers give the (dotted) section, e.g. ``method`` or ``method.image_encoder``."""
    name = None
    for layer in layers:
        sec: Any = layer
        for part in section.split("."):
            sec = sec.get(part) if isinstance(sec, DictConfig) else None
        if isinstance(sec, DictConfig) and sec.get("name") not in (None, MISSING, "???"):
            name = str(sec.get("name"))
    return name


def _restart_encoder_blocks(layers: list[tuple[str, DictConfig]]) -> list[tuple[str, DictConfig]]:
    """A layer that switches ``method.<image|text>_encoder`` to another encoder starts that block afresh:
    the block is dropped from every layer before the first one naming the final encoder after the last
    one naming another (e.g. an experiment's ``vit3d`` block replaces the method file's ``timm`` one
    instead of inheriting its ``model``)."""
    out = [(source, layer) for source, layer in layers]
    for kind in ("image_encoder", "text_encoder"):
        names = [_name_in([layer], f"method.{kind}") for _, layer in out]
        final = next((n for n in reversed(names) if n), None)
        other = [i for i, n in enumerate(names) if n and n != final]
        if not other:
            continue
        start = next(i for i in range(other[-1] + 1, len(names)) if names[i] == final)
        for i in range(start):
            method = out[i][1].get("method") if isinstance(out[i][1], DictConfig) else None
            if isinstance(method, DictConfig) and kind in method:
                layer = out[i][1].copy()
                layer.method.pop(kind)
                out[i] = (out[i][0], layer)
    return out


def _prune_to_schema(node: Any, schema: Any) -> None:
    """Drop the keys of a saved config's encoder block that its encoder's schema does not have (run
    directories written when every encoder family shared one flat schema)."""
    if not isinstance(node, DictConfig) or not is_dataclass(schema):
        return
    allowed = {f.name for f in fields(schema)}
    for key in [k for k in node if k not in allowed]:
        node.pop(key)


def compose(
    method: str | None = None,
    data: str | None = None,
    trainer: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    sections: tuple[str, ...] = SECTIONS,
) -> DictConfig:
    """Compose and validate a run config (see the module docstring for the layer order).

    Args:
        method: a ``configs/method`` name (defaults to ``method.name`` of the config file, or clip).
        data: a ``configs/data`` name (defaults to the config file's, else the method file's ``compose: {data: ...}``, else ``demo_cxr``).
        trainer: a ``configs/trainer`` name (default ``default``).
        config_file: a saved or experiment config; with a ``compose:`` key it names its groups.
        overrides: command-line ``key=value`` items.
        sections: compose only these sections (``medvlp fit`` checks ``data`` before it imports
            the method, so that a wrong path fails fast).

    Returns:
        The merged config in struct mode, interpolations unresolved.
    """
    from medvlp.registry import DATAMODULES, METHODS

    file_cfg = load_yaml(config_file) if config_file else OmegaConf.create({})
    groups = file_cfg.pop("compose", None) or {}
    _check_groups(groups, ("method", "data", "trainer", *ENCODER_GROUPS), str(config_file))
    dot = parse_overrides(overrides or [])
    # A full saved config (no compose key) already holds every section: merge no group files.
    saved = bool(config_file) and not groups and all(s in file_cfg for s in ("method", "data"))
    method = method or groups.get("method") or (None if saved else _name_in([file_cfg, dot], "method")) or (None if saved else "clip")
    method_layer, method_source = _method_layer(method) if method else (None, "")
    method_groups = (method_layer.pop("compose", None) or {}) if method_layer is not None else {}
    _check_groups(method_groups, ("data", *ENCODER_GROUPS), method_source)
    data = data or groups.get("data") or (None if saved else method_groups.get("data", "demo_cxr"))
    trainer = trainer or groups.get("trainer") or (None if saved else "default")

    layers: list[tuple[str, DictConfig]] = []
    if method_layer is not None:
        own = method_layer.get("method") or {}
        for key in ENCODER_GROUPS:  # a method file naming no encoder gets the CPU demo encoders
            name = method_groups.get(key) or (None if key in own else DEFAULT_ENCODERS[key])
            if name:
                layers.append(_encoder_layer(key, name))
        layers.append((method_source, method_layer))
    if data:
        layers.append((f"configs/data/{data}.yaml", load_yaml(group_file("data", data))))
    if trainer:
        layers.append((f"configs/trainer/{trainer}.yaml", load_yaml(group_file("trainer", trainer))))
    layers.extend(_encoder_layer(key, groups[key]) for key in ENCODER_GROUPS if groups.get(key))
    if config_file:
        layers.append((str(config_file), file_cfg))
    layers.append(("the command line", dot))

    all_layers = [layer for _, layer in layers]
    schemas: dict[str, Any] = {"trainer": TrainerConfig(), "optim": OptimConfig(), "run": RunConfig()}
    if "data" in sections:
        data_name = _name_in(all_layers, "data") or "mimic_cxr"
        schemas["data"] = DATAMODULES.get(data_name).Config()
    if "method" in sections:
        method_name = _name_in(all_layers, "method")
        if not method_name:
            raise ConfigError("No method given: use --method NAME (see `medvlp list methods`).")
        schemas["method"] = method_schema(METHODS.get(method_name), _name_in(all_layers, "method.image_encoder"),
                                          _name_in(all_layers, "method.text_encoder"))
        if saved:
            for kind in ("image_encoder", "text_encoder"):
                _prune_to_schema((file_cfg.get("method") or {}).get(kind), getattr(schemas["method"], kind))

    if "method" in sections:
        layers = _restart_encoder_blocks(layers)
    cfg = OmegaConf.structured({k: v for k, v in schemas.items() if k in sections or k in ("trainer", "optim", "run")})
    OmegaConf.set_struct(cfg, True)
    for sec, schema in schemas.items():
        if sec in cfg:
            open_dict_fields(cfg[sec], schema)
    for source, layer in layers:
        layer = OmegaConf.masked_copy(layer, [k for k in layer if k in cfg]) if _sections_only(layer) else layer
        cfg = _merge(cfg, layer, source, schemas)
    return cfg


def _check_groups(groups: Any, allowed: tuple[str, ...], source: str) -> None:
    bad = [k for k in groups if k not in allowed]
    if bad:
        raise ConfigError(f"compose: in {source} names unknown group(s) {bad}; allowed: {', '.join(allowed)}.")


def _method_layer(method: str) -> tuple[DictConfig, str]:
    """``configs/method/<method>.yaml``; a registered method without one starts from its schema alone."""
    path = group_file("method", method, required=False)
    if path is not None:
        return load_yaml(path), str(path)
    from medvlp.registry import METHODS, RegistryError

    try:
        METHODS.get(method)
    except RegistryError as err:  # names the registered methods and where they are looked for
        raise ConfigError(f"{err} (There is no configs/method/{method}.yaml either.)") from None
    return OmegaConf.create({"method": {"name": method}}), f"the {method} method's defaults"


def _encoder_layer(key: str, name: str) -> tuple[str, DictConfig]:
    """``configs/encoder/<name>.yaml`` as the ``method.<key>`` block."""
    path = group_file("encoder", str(name))
    return str(path), OmegaConf.create({"method": {key: load_yaml(path)}})


def open_dict_fields(node: DictConfig, schema: Any) -> None:
    """Let free-form ``dict`` fields (``kwargs``, ``loss_weights``, ...) take new keys in struct mode."""
    for f in fields(schema):
        value = getattr(schema, f.name)
        if is_dataclass(value):
            open_dict_fields(node[f.name], value)
        elif isinstance(value, dict):
            OmegaConf.set_struct(node[f.name], False)


def _sections_only(layer: DictConfig) -> bool:
    """True when every key of the layer is a known section (unknown ones are reported by _merge)."""
    return all(k in SECTIONS for k in layer)


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations, check that no required value (``???``) is left and that every value lies
    in its field's bounds (:func:`check_values`)."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"Could not resolve the config: {err}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"Required config values are not set: {', '.join(missing)} (set them as key=value).")
    check_values(cfg)
    return cfg


def save(cfg: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

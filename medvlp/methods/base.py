"""``VLPMethod``: the one interface every pre-training method implements.

A method declares ``Config`` (its ``method.*`` schema) and ``terms`` (the names of the loss terms
it may return), and writes ``build()`` (its heads, prototypes, decoders), ``losses(batch)`` (a dict
of named terms), ``embed_image`` / ``embed_text`` (the retrieval / zero-shot embeddings) and
``temperature()``. Optional hooks: ``validate_config`` (config checks before anything is built),
``similarity``, ``embed_images`` (studies of several scans), ``embed_batch`` (evaluation embeddings
that need more of the batch than its images), ``param_groups``; optional
capabilities, ``None`` unless a method implements them and asked for explicitly through
:meth:`VLPMethod.supports`: ``token_alignment`` (``medvlp explain``), ``dense_outputs``, ``dense_embeddings`` (grounding),
``export_decoder`` (transfer), ``generate`` (generative methods).

The base class owns the rest: encoders built from config through the registries, the check of
``method.loss_weights`` against ``terms``, the weighted sum and logging of every term
(``train/loss_<name>``) and of any extra value (:meth:`log_terms`), AdamW with warm-up + cosine per
optimiser step, parameter groups, skipped-item reporting, ``export_encoder`` and rebuilding a
trained method from its run directory alone (:func:`medvlp.api.load_run`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from medvlp.batch import ImageFeatures, ImageTextBatch, TextFeatures, TokenAlignment
from medvlp.config import ConfigError, MethodConfig, OptimConfig, encoder_names, method_schema
from medvlp.registry import IMAGE_ENCODERS, TEXT_ENCODERS

log = logging.getLogger(__name__)


def as_config(schema: type, value: Any) -> Any:
    """Validate ``value`` (dataclass, dict or DictConfig) against ``schema``; returns a DictConfig."""
    base = OmegaConf.structured(schema)
    if value is None:
        return base
    return OmegaConf.merge(base, value if isinstance(value, DictConfig) else OmegaConf.structured(value))


def method_config(method_cls: type, value: Any) -> Any:
    """``method.*`` validated against the method's schema with the schemas of the encoders it names."""
    if value is not None and not isinstance(value, DictConfig):
        value = OmegaConf.structured(value)
    names = encoder_names(value) if value is not None else (None, None)
    try:
        return OmegaConf.merge(OmegaConf.structured(method_schema(method_cls, *names)), value or {})
    except OmegaConfBaseException as err:  # a key the chosen encoder's schema lacks, a wrong type
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"method.{key}: {str(err).splitlines()[0]} (image encoder '{names[0]}', text encoder "
                          f"'{names[1]}'; each encoder's keys are those of its Config).") from None


CAPABILITIES = ("token_alignment", "dense_outputs", "dense_embeddings", "export_decoder", "generate")


@dataclass
class EncoderExport:
    """A method's pretrained image encoder and the input it expects (``VLPMethod.export_encoder``).

    Attributes:
        module: the encoder (``forward(images) -> ImageFeatures``; ``out_dim``, ``local_dim``).
        modality: ``2d`` (images ``[B, C, H, W]``) or ``3d`` (volumes ``[B, C, D, H, W]``).
        in_chans: input channels.
        img_size: input size per spatial axis.
    """

    module: nn.Module
    modality: str
    in_chans: int
    img_size: tuple[int, ...]


class VLPMethod(L.LightningModule):
    """Base class of every vision-language pre-training method.

    Args:
        cfg: the method section (``method.*``) - an instance of ``Config`` or a mapping.
        optim: the optimiser section (``optim.*``).

    Class attributes:
        Config: the dataclass schema of ``method.*`` (a :class:`MethodConfig` subclass).
        terms: every loss term :meth:`losses` may return; ``method.loss_weights`` may name only these.
        global_batch_keys: the boolean ``method.*`` keys that, all true, make every term under DDP the
            loss of the global batch (negatives / codes gathered from every process); the contract
            suite checks that 2 processes then equal 1 process on the whole batch.
        may_skip_batches: :meth:`losses` may return no term for a batch that holds nothing to learn
            from (fVLM: no anatomy with an abnormal sample); the batch then trains nothing - no backward,
            no parameter changes - while the step counter and the learning-rate schedule advance (as the
            iteration counter of fVLM's loop does); counted in ``train/skipped_batches``. All processes
            must agree.
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    shard_classes: list[str] = []  # trainer.fsdp_wrap: classes sharded as units under the model_parallel strategy
    # the entry points Lightning calls instead of forward: FSDP2 gathers the root unit's parameters around them
    fsdp_forward_methods: ClassVar[tuple[str, ...]] = ("training_step", "validation_step")
    terms: ClassVar[tuple[str, ...]] = ()
    global_batch_keys: ClassVar[tuple[str, ...]] = ()
    may_skip_batches: ClassVar[bool] = False

    def __init__(self, cfg: Any, optim: Any = None) -> None:
        super().__init__()
        self.cfg = method_config(type(self), cfg)
        self.check_config(self.cfg)  # before anything is built
        self.optim_cfg = as_config(OptimConfig, optim)
        self.save_hyperparameters(
            {"method": OmegaConf.to_container(self.cfg, resolve=True), "optim": OmegaConf.to_container(self.optim_cfg, resolve=True)}
        )
        self.image_encoder = IMAGE_ENCODERS.get(self.cfg.image_encoder.name)(self.cfg.image_encoder)
        self.text_encoder = TEXT_ENCODERS.get(self.cfg.text_encoder.name)(self.cfg.text_encoder)
        self._skipped = 0
        self._skipped_ids: list[str] = []  # study ids of those items (this rank, this epoch)
        self.build()

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """The checks every method gets, then the method's own :meth:`validate_config`.

        Raises:
            ValueError: naming the key, the value received and what is expected.
        """
        if not cls.terms:
            raise TypeError(f"{cls.__name__} must declare its loss terms: terms = ('name', ...).")
        missing = [k for k in cls.global_batch_keys if k not in cfg]
        if missing:
            raise TypeError(f"{cls.__name__}.global_batch_keys names {missing}, which are not keys of {cls.Config.__name__}.")
        for key, weight in dict(cfg.loss_weights).items():
            if key not in cls.terms:
                raise ValueError(f"method.loss_weights.{key}: {cls.__name__} has no loss term '{key}'; "
                                 f"its terms are {list(cls.terms)}.")
            if not math.isfinite(float(weight)) or float(weight) < 0:
                raise ValueError(f"method.loss_weights.{key}={weight}: expected a finite weight >= 0.")
        if int(cfg.embed_dim) <= 0:
            raise ValueError(f"method.embed_dim={cfg.embed_dim}: expected a positive width.")
        cls.validate_config(cfg)

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Hook: the method's own checks of ``method.*`` (run before the encoders are built)."""

    # ------------------------------------------------------------------ to implement
    def build(self) -> None:
        """Create the method's own modules (projection heads, prototypes, decoders)."""

    def losses(self, batch: ImageTextBatch) -> dict[str, Tensor]:
        """The method: every loss term by name (weighted by ``method.loss_weights`` in the base)."""
        raise NotImplementedError

    def embed_image(self, images: Tensor) -> Tensor:
        """Retrieval / zero-shot image embedding ``[B, D]`` (or ``[B, Q, D]`` if ``similarity`` says so)."""
        raise NotImplementedError

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Retrieval / zero-shot text embedding ``[B, D]``."""
        raise NotImplementedError

    def embed_images(self, images: Tensor, scan_mask: Tensor | None = None) -> Tensor:
        """Image embeddings of a batch as the loaders give it.

        Images / volumes go to :meth:`embed_image`. Studies of several scans ``[B, S, C, D, H, W]``
        (with ``scan_mask`` ``[B, S]``, True = real scan) are embedded scan by scan and averaged over
        the real scans (re-normalised); a method that attends across scans (HLIP) overrides this.
        """
        if images.ndim != 6:
            return self.embed_image(images)
        b, s = images.shape[:2]
        real = torch.ones(b, s, dtype=torch.bool, device=images.device) if scan_mask is None else scan_mask.to(images.device)
        emb = self.embed_image(images.flatten(0, 1)[real.flatten()])
        if emb.ndim != 2:
            raise ValueError(f"{type(self).__name__} embeds an image as {tuple(emb.shape[1:])}; averaging over scans needs [D].")
        full = emb.new_zeros(b * s, emb.shape[-1])
        full[real.flatten()] = emb
        w = real.to(emb.dtype)
        mean = (full.view(b, s, -1) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        return torch.nn.functional.normalize(mean, dim=-1)

    def embed_batch(self, batch: ImageTextBatch) -> Tensor:
        """The image embeddings of a batch as the evaluation loaders give it (zero-shot, retrieval):
        :meth:`embed_images` of ``images`` and ``scan_mask``. A method that needs more of the batch
        overrides it (fVLM: the anatomy label map)."""
        return self.embed_images(batch.images, batch.scan_mask)

    def similarity(self, img_emb: Tensor, txt_emb: Tensor, anatomy: str | None = None) -> Tensor:
        """Scores ``[B_img, B_txt]`` used by every zero-shot and retrieval evaluation (cosine).

        ``anatomy``: the anatomy a zero-shot prompt is about, when its prompt file names one; methods with
        one embedding per anatomy (fVLM) score that anatomy's, the others ignore it."""
        return img_emb @ txt_emb.T

    def temperature(self) -> float:
        """The temperature ``tau`` of the method's image-text logits (``similarity / tau``), as trained.

        Zero-shot turns similarity differences into probabilities with it; every method says its
        own (a learned one is read from its parameter, clamped as in training).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement temperature() (the tau of its logits).")

    # ------------------------------------------------------------------ optional capabilities
    @classmethod
    def supports(cls, capability: str) -> bool:
        """Whether the method implements an optional capability (one of :data:`CAPABILITIES`)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"Unknown capability '{capability}'; capabilities: {', '.join(CAPABILITIES)}.")
        return getattr(cls, capability) is not getattr(VLPMethod, capability)

    def token_alignment(self, batch: ImageTextBatch) -> TokenAlignment | None:
        """Capability: which image tokens each report word attends to (``medvlp explain``)."""
        return None

    def dense_outputs(self, images: Tensor) -> dict[str, Tensor] | None:
        """Capability: per-pixel outputs for inspection, e.g. ``{"target", "prediction"}`` ``[B, K, H, W]``."""
        return None

    def dense_embeddings(self, images: Tensor) -> Tensor | None:
        """Capability: a dense map ``[B, D, h, w]`` in the joint image-text space, comparable by cosine with
        :meth:`embed_text` at every position (zero-shot grounding)."""
        return None

    def export_decoder(self) -> dict[str, Any] | None:
        """Capability: a pretrained dense decoder with the settings that rebuild it (transfer)."""
        return None

    def generate(self, batch: ImageTextBatch, prompts: list[str] | None = None, **kwargs: Any) -> list[str] | None:
        """Capability: text generated from the images (generative methods: report, answer, diagnosis)."""
        return None

    def pretrained_parts(self) -> dict[str, Any]:
        """Components besides the text encoder whose tokenizer and architecture files a run directory keeps
        (``<run>/<name>``, written by ``save_pretrained_parts(directory)``), so that :func:`medvlp.api.load_run`
        rebuilds the method offline (MedBLIP: its LLM). Name -> component; none here."""
        return {}

    @classmethod
    def offline_config(cls, cfg: Any, run_dir: Any, saved: Any) -> None:
        """Point ``cfg.method`` (the run's config ``saved``, made offline: no pretrained downloads) at the parts
        :meth:`pretrained_parts` saved in ``run_dir``; the weights come from the checkpoint. Nothing to do here."""

    def export_encoder(self) -> EncoderExport:
        """The pretrained image encoder and its input contract (what transfer tasks build on)."""
        c = self.cfg.image_encoder
        modality = "2d" if c.name == "timm" else "3d"
        size = tuple(int(v) for v in c.img_size)
        return EncoderExport(self.image_encoder, modality, int(c.in_chans), size)

    # ------------------------------------------------------------------ shared
    @property
    def tokenizer(self) -> Any:
        return self.text_encoder.tokenizer

    def encode_image(self, images: Tensor, return_attention: bool = False) -> ImageFeatures:
        return self.image_encoder(images, return_attention=return_attention)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, return_attention: bool = False) -> TextFeatures:
        return self.text_encoder(input_ids, attention_mask, return_attention=return_attention)

    def loss_weight(self, name: str) -> float:
        return float(self.cfg.loss_weights.get(name, 1.0))

    @property
    def attached(self) -> bool:
        """True while a Lightning ``Trainer`` runs a training or validation loop of the method (logging is
        possible); False outside one, e.g. when a trained method is evaluated after ``fit`` returned."""
        from lightning.pytorch.trainer.states import TrainerStatus

        try:
            t = self.trainer
        except RuntimeError:  # not attached to a Trainer
            return False
        if t is None or t.state.status != TrainerStatus.RUNNING:
            return False
        return bool(t.training or t.validating or t.sanity_checking)

    def log_terms(self, values: dict[str, Tensor | float], batch_size: int | None = None) -> None:
        """Log extra values of a step as ``<stage>/<name>`` (train: per step and epoch; val: per epoch,
        synchronised across processes). A no-op outside a ``Trainer``, so ``losses`` can always call it."""
        if not self.attached:
            return
        stage = "train" if self.training else "val"
        for k, v in values.items():
            v = v.detach() if isinstance(v, Tensor) else float(v)
            self.log(f"{stage}/{k}", v, batch_size=batch_size, on_step=self.training, on_epoch=True,
                     sync_dist=not self.training)

    def _step(self, batch: ImageTextBatch, stage: str) -> Tensor | None:
        terms = self.losses(batch)
        if not terms:
            if not self.may_skip_batches:
                raise RuntimeError(f"{type(self).__name__}.losses returned no terms")
            if stage == "train":
                self.log("train/skipped_batches", 1.0, batch_size=len(batch), on_step=False, on_epoch=True, reduce_fx="sum")
            return None  # no backward: the optimiser finds no gradient and changes nothing
        undeclared = sorted(set(terms) - set(self.terms))
        if undeclared:
            raise RuntimeError(f"{type(self).__name__}.losses returned {undeclared}, which are not in its terms "
                               f"{list(self.terms)}; declare them.")
        total = sum(self.loss_weight(k) * v for k, v in terms.items())
        bs = len(batch)
        on_step = stage == "train"
        for k, v in terms.items():
            self.log(f"{stage}/loss_{k}", v.detach(), batch_size=bs, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        self.log(f"{stage}/loss", total.detach(), batch_size=bs, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        return total

    def _count_skipped(self, batch: ImageTextBatch) -> None:
        self._skipped += batch.skipped
        self._skipped_ids += [i for i in getattr(batch, "skipped_ids", ()) if i not in self._skipped_ids]

    def training_step(self, batch: ImageTextBatch, batch_idx: int) -> Tensor | None:
        self._count_skipped(batch)
        return self._step(batch, "train")

    def validation_step(self, batch: ImageTextBatch, batch_idx: int) -> Tensor | None:
        self._count_skipped(batch)
        return self._step(batch, "val")

    def on_train_epoch_end(self) -> None:
        if self._skipped:
            ids = self._skipped_ids
            named = f": {', '.join(ids[:5])}{f' and {len(ids) - 5} more' if len(ids) > 5 else ''}" if ids else ""
            log.warning("%d unreadable items were skipped this epoch (data.on_error=skip)%s.", self._skipped, named)
            self.log("data/skipped", float(self._skipped), reduce_fx="sum", sync_dist=True)
            self._skipped = 0
            self._skipped_ids = []

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``trainer.strategy=model_parallel``): FSDP2 over the data-parallel
        mesh, each module of a class in :attr:`shard_classes` (``trainer.fsdp_wrap``) its own unit."""
        mesh = self._device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        from medvlp.distributed import shard_modules

        shard_modules(self, list(self.shard_classes), mesh["data_parallel"] if mesh.mesh_dim_names else mesh)
        self._sharded = True

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on norms / biases / 1-d tensors; text lr multiplier."""
        o = self.optim_cfg
        text_ids = {id(p) for p in self.text_encoder.parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = o.no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias") or "logit_scale" in name)
            groups.setdefault((no_decay, id(p) in text_ids), []).append(p)
        out = []
        for (no_decay, is_text), params in groups.items():
            out.append({
                "params": params,
                "weight_decay": 0.0 if no_decay else o.weight_decay,
                "lr": o.lr * (o.text_lr_mult if is_text else 1.0),
            })
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        fused = bool(o.fused) if o.fused is not None else self.device.type == "cuda"
        opt = torch.optim.AdamW(self.param_groups(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                **({"fused": True} if fused else {}))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = o.warmup_steps or int(o.warmup_ratio * total)
        period = int(o.restart_steps)
        if o.schedule == "cosine_restarts" and period <= 0:
            raise ValueError(f"optim.schedule=cosine_restarts needs optim.restart_steps > 0, got {o.restart_steps}.")
        if o.schedule == "cosine_epoch":  # the length of an epoch in optimiser steps
            period = max(1, total // max(1, int(self.trainer.max_epochs or 1)))
        start = float(o.warmup_start_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, warmup, total, o.schedule, o.min_lr_ratio, period, start))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float, period: int = 0,
              warmup_start: float = 0.0) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine (or constant) down to ``min_ratio``.

    The warm-up gives ``(step + 1) / warmup``, or with ``warmup_start`` > 0 rises from it:
    ``warmup_start + (1 - warmup_start) * step / warmup`` (LAVIS). ``cosine_restarts`` restarts the
    cosine every ``period`` steps after the warm-up (PyTorch's ``CosineAnnealingWarmRestarts`` with
    ``T_0 = period``, ``T_mult = 1``). ``cosine_epoch`` (LAVIS, fVLM) holds one value per epoch of
    ``period`` steps: epoch ``e`` of ``E = total / period`` gets ``min + (1 - min) (1 + cos(pi e / E)) / 2``,
    the warm-up running over the first steps of epoch 0.
    """
    if step < warmup:
        return warmup_start + (1 - warmup_start) * step / warmup if warmup_start > 0 else (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine_epoch":
        epochs = max(1, round(total / max(period, 1)))
        epoch = min(step // max(period, 1), epochs)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "cosine_restarts":
        progress = ((step - warmup) % period) / period
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule != "cosine":
        raise ValueError(f"optim.schedule must be 'cosine', 'constant', 'cosine_restarts' or 'cosine_epoch', got '{schedule}'")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

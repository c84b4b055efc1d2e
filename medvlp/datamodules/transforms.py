"""Image transforms shared by the datamodules (pure torch / numpy, deterministic at eval).

2D (chest X-ray): 8-bit gray -> resize the longest side -> centred zero-pad to a square ->
(train) light random affine -> Normalize(0.5, 0.5) -> 1 or 3 channels, ``[C, S, S]``.

3D: a volume in ``[0, 1]`` -> (train) intensity jitter, translation -> (x - mean) / std -> (train)
random flips -> ``[1, D, H, W]``; HLIP's shape normalisation of brain-MRI scans
(:func:`square_resize_crop`).

Randomness comes from torch's generator (seeded per DataLoader worker by torch), or from an
explicit ``generator`` argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator).item())


def to_float_image(gray: np.ndarray | Tensor) -> Tensor:
    """``[H, W]`` uint8 (or ``[1, H, W]``) -> ``[1, H, W]`` float32 in ``[0, 1]``."""
    t = torch.as_tensor(np.asarray(gray) if not isinstance(gray, Tensor) else gray)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] != 1:
        raise ValueError(f"expected a gray image [H, W] or [1, H, W], got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    return t.float()


def resize_longest_side(img: Tensor, size: int) -> Tensor:
    """Resize ``[C, H, W]`` so that ``max(H, W) == size``, keeping the aspect ratio.

    Downsampling averages areas (like OpenCV ``INTER_AREA`` used by MGCA); upsampling is bilinear.
    """
    h, w = img.shape[-2:]
    scale = size / max(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new == (h, w):
        return img
    if scale < 1:
        out = F.interpolate(img[None], size=new, mode="area")
    else:
        out = F.interpolate(img[None], size=new, mode="bilinear", align_corners=False)
    return out[0]


def pad_to_square(img: Tensor, value: float = 0.0) -> Tensor:
    """Centre-pad ``[C, H, W]`` to ``[C, S, S]`` with ``S = max(H, W)`` (extra pixel at the end)."""
    h, w = img.shape[-2:]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    return F.pad(img, (left, s - w - left, top, s - h - top), value=value)


def sample_affine(degrees: float, translate: float, scale: Sequence[float],
                  generator: torch.Generator | None = None) -> Tensor:
    """Draw a random rotation (+-``degrees``), shift (+-``translate`` of the size) and zoom.

    Returns ``theta`` ``[2, 3]`` in the convention of ``F.affine_grid`` (``align_corners=False``):
    it maps normalised *output* coordinates ``(x, y, 1)`` in ``[-1, 1]`` to *input* coordinates.
    """
    angle = math.radians(_uniform(-degrees, degrees, generator))
    zoom = _uniform(float(scale[0]), float(scale[1]), generator)
    tx = _uniform(-translate, translate, generator) * 2  # normalised coordinates span 2
    ty = _uniform(-translate, translate, generator) * 2
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    return torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)


def warp(img: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
    """Resample ``[C, H, W]`` with ``theta`` (see :func:`sample_affine`); outside pixels are 0."""
    grid = F.affine_grid(theta.to(img.dtype)[None], [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def warp_boxes(boxes: Tensor, theta: Tensor, height: int, width: int) -> Tensor:
    """Map ``[N, 4]`` pixel boxes ``(x1, y1, x2, y2)`` through the image warp of ``theta``.

    The four corners go through the inverse of ``theta`` (input -> output); the result is their
    axis-aligned hull, clipped to the image. Boxes that leave the image become empty (x1 == x2).
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    a = torch.cat([theta.double(), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    inv = torch.linalg.inv(a)[:2]
    b = boxes.double()
    xs = torch.stack([b[:, 0], b[:, 2], b[:, 2], b[:, 0]], 1)
    ys = torch.stack([b[:, 1], b[:, 1], b[:, 3], b[:, 3]], 1)
    nx, ny = xs * 2 / width - 1, ys * 2 / height - 1  # pixel edges -> normalised (align_corners=False)
    ox = inv[0, 0] * nx + inv[0, 1] * ny + inv[0, 2]
    oy = inv[1, 0] * nx + inv[1, 1] * ny + inv[1, 2]
    px, py = (ox + 1) * width / 2, (oy + 1) * height / 2
    out = torch.stack([px.amin(1).clamp(0, width), py.amin(1).clamp(0, height),
                       px.amax(1).clamp(0, width), py.amax(1).clamp(0, height)], 1)  # fmt: skip
    return out.float()


def random_affine(
    img: Tensor,
    degrees: float,
    translate: float,
    scale: Sequence[float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random rotation (+-``degrees``), shift (+-``translate`` of the size) and zoom of ``[C, H, W]``.

    Bilinear sampling; pixels from outside the image are 0.
    """
    return warp(img, sample_affine(degrees, translate, scale, generator))


def letterbox_params(height: int, width: int, size: int) -> tuple[float, float, int, int]:
    """Geometry of resize-longest-side + centre pad: ``(scale_y, scale_x, pad_top, pad_left)``.

    A pixel edge coordinate ``x`` of the original maps to ``x * scale_x + pad_left`` in the
    ``size`` x ``size`` output (the same rounding as :func:`resize_longest_side` / :func:`pad_to_square`).
    """
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return new_h / height, new_w / width, (size - new_h) // 2, (size - new_w) // 2


@dataclass
class CXRTransform:
    """Chest X-ray pipeline: gray uint8 ``[H, W]`` -> float ``[channels, image_size, image_size]``.

    By default the image is letterboxed straight to ``image_size`` and the train-time augmentation is a
    light random affine, so evaluation sees the whole padded image. With ``crop_from`` (> ``image_size``)
    it is letterboxed to ``crop_from`` and an ``image_size`` square is cut out: the centre one at
    evaluation (torchvision's ``CenterCrop`` offsets), a random one in training with ``augment`` (MGCA's
    ``mgca/datasets/transforms.py``: 256, then ``RandomCrop`` / ``CenterCrop`` 224; G2D's zero-shot
    input). Boxes are shifted with the crop and clipped to it, masks cut alike; the affine, if its ranges
    are not zero, follows the crop.
    """

    image_size: int = 224
    channels: int = 3
    augment: bool = True
    degrees: float = 10.0
    translate: float = 0.05
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    mean: float = 0.5
    std: float = 0.5
    crop_from: int = 0  # > image_size: letterbox to this size, then crop image_size (centre; random in training)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.crop_from and self.crop_from < self.image_size:
            raise ValueError(f"crop_from={self.crop_from} must be 0 (off) or at least image_size={self.image_size}")

    def crop_offset(self, train: bool, generator: torch.Generator | None = None) -> tuple[int, int]:
        """``(top, left)`` of the ``image_size`` crop in the ``crop_from`` square."""
        room = self.crop_from - self.image_size if self.crop_from else 0
        if room <= 0:
            return 0, 0
        if train and self.augment:
            top, left = (int(v) for v in torch.randint(0, room + 1, (2,), generator=generator))
            return top, left
        centre = int(round(room / 2.0))
        return centre, centre

    def __call__(self, gray: np.ndarray | Tensor, train: bool = False, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(gray, train=train, generator=generator)[0]

    def apply(
        self,
        gray: np.ndarray | Tensor,
        train: bool = False,
        generator: torch.Generator | None = None,
        boxes: np.ndarray | Tensor | None = None,
        mask: np.ndarray | Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Transform an image and, with the same geometry, its boxes and mask.

        Args:
            gray: ``[H, W]`` uint8 (or float in [0, 1]) image.
            boxes: ``[N, 4]`` ``(x1, y1, x2, y2)`` in the pixels of ``gray`` (origin top-left).
            mask: ``[H, W]`` {0, 1} mask aligned to ``gray``.

        Returns:
            ``(image [C, S, S], boxes [N, 4] in output pixels or None, mask [S, S] uint8 or None)``.
        """
        img = to_float_image(gray)
        h, w = img.shape[-2:]
        size = self.crop_from or self.image_size  # the letterbox; cropped to image_size below
        img = pad_to_square(resize_longest_side(img, size))
        if img.shape[-1] != size:  # rounding of a 1-pixel-wide image
            img = F.interpolate(img[None], size=(size, size), mode="bilinear")[0]
        out_boxes = out_mask = None
        if boxes is not None:
            sy, sx, top, left = letterbox_params(h, w, size)
            b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
            out_boxes = b * torch.tensor([sx, sy, sx, sy]) + torch.tensor([left, top, left, top], dtype=torch.float32)
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask)).float()[None]
            if tuple(m.shape[-2:]) != (h, w):
                raise ValueError(f"mask shape {tuple(m.shape[-2:])} does not match the image ({h}, {w})")
            sy, sx, top, left = letterbox_params(h, w, size)
            new = (max(1, round(h * sy)), max(1, round(w * sx)))
            m = F.interpolate(m[None], size=new, mode="nearest")[0]
            out_mask = F.pad(m, (left, size - new[1] - left, top, size - new[0] - top))
        if size != self.image_size:
            top, left = self.crop_offset(train, generator)
            size = self.image_size
            img = img[..., top:top + size, left:left + size]
            if out_boxes is not None:
                out_boxes = (out_boxes - torch.tensor([left, top, left, top], dtype=torch.float32)).clamp(0, size)
            if out_mask is not None:
                out_mask = out_mask[..., top:top + size, left:left + size]
        identity = self.degrees == 0 and self.translate == 0 and all(float(v) == 1.0 for v in self.scale)
        if train and self.augment and not identity:  # (zero ranges: no warp, no resampling)
            theta = sample_affine(self.degrees, self.translate, self.scale, generator)
            img = warp(img, theta)
            if out_boxes is not None:
                out_boxes = warp_boxes(out_boxes, theta, size, size)
            if out_mask is not None:
                out_mask = warp(out_mask, theta, mode="nearest")
        img = (img - self.mean) / self.std
        if self.channels == 3:
            img = img.expand(3, -1, -1).contiguous()
        if out_mask is not None:
            out_mask = (out_mask[0] > 0.5).to(torch.uint8)
        return img, out_boxes, out_mask


@dataclass
class VolumeTransform:
    """3D pipeline: volume ``[D, H, W]`` in ``[0, 1]`` -> normalised ``[1, D, H, W]``.

    Train-time augmentations, each off by default (HLIP uses none; fVLM flips with p = 0.2):

    * ``intensity_scale`` / ``intensity_shift``: ``x * (1 + a) + b`` with ``a ~ U(-s, s)``, ``b ~ U(-t, t)``
      on the ``[0, 1]`` values (contrast / brightness);
    * ``max_shift``: a random translation of up to that many voxels per axis, ``(d, h, w)``; voxels
      that enter are filled with 0 (the window floor), labels with 0;
    * ``flip_prob``: flips each axis independently (only those of ``flip_axes``).

    A label volume (``mask``) passed along receives the same translation and flips.
    """

    mean: float = 0.449
    std: float = 0.226
    flip_prob: float = 0.0
    flip_axes: Sequence[bool] = (True, True, True)  # (d, h, w) the flips may use (the draws are made for all three)
    intensity_scale: float = 0.0
    intensity_shift: float = 0.0
    max_shift: Sequence[int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if not (0.0 <= self.intensity_scale < 1.0 and self.intensity_shift >= 0.0):
            raise ValueError(f"intensity_scale must be in [0, 1) and intensity_shift >= 0, got "
                             f"{self.intensity_scale} and {self.intensity_shift}")
        self.max_shift = tuple(int(v) for v in self.max_shift)
        if len(self.max_shift) != 3 or min(self.max_shift) < 0:
            raise ValueError(f"max_shift must be 3 non-negative voxel counts (d, h, w), got {list(self.max_shift)}")

    def __call__(self, volume: np.ndarray | Tensor, train: bool = False, generator: torch.Generator | None = None,
                 mask: Tensor | None = None) -> Any:
        """The normalised ``[1, D, H, W]`` volume, or ``(volume, mask)`` when a ``mask`` ``[1, D, H, W]`` is given."""
        t = torch.as_tensor(np.ascontiguousarray(volume) if not isinstance(volume, Tensor) else volume).float()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"expected a volume [D, H, W] or [1, D, H, W], got shape {tuple(t.shape)}")
        if mask is not None and tuple(mask.shape[-3:]) != tuple(t.shape[-3:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match the volume {tuple(t.shape)}")
        if train and (self.intensity_scale > 0 or self.intensity_shift > 0):
            a = _uniform(-self.intensity_scale, self.intensity_scale, generator)
            b = _uniform(-self.intensity_shift, self.intensity_shift, generator)
            t = t * (1.0 + a) + b  # a new tensor: the caller's volume (possibly cached) is untouched
        if train and any(self.max_shift):
            offsets = [int(torch.randint(-m, m + 1, (), generator=generator).item()) if m else 0 for m in self.max_shift]
            t = translate(t, offsets, 0.0)
            if mask is not None:
                mask = translate(mask, offsets, 0)
        t = (t - self.mean).div_(self.std)
        if train and self.flip_prob > 0:
            draws = [torch.rand((), generator=generator).item() < self.flip_prob for _ in range(3)]
            dims = [d for d, hit, allowed in zip((1, 2, 3), draws, self.flip_axes, strict=True) if hit and allowed]
            if dims:
                t = torch.flip(t, dims)
                if mask is not None:
                    mask = torch.flip(mask, dims)
        return t.contiguous() if mask is None else (t.contiguous(), mask.contiguous())


def translate(t: Tensor, offsets: Sequence[int], fill: float) -> Tensor:
    """``t`` ``[..., D, H, W]`` moved by ``offsets`` voxels along the last three axes (positive = towards
    higher indices); the voxels that enter take ``fill``. The shape is unchanged."""
    out = torch.full_like(t, fill)
    src, dst = [slice(None)] * (t.ndim - 3), [slice(None)] * (t.ndim - 3)
    for size, off in zip(t.shape[-3:], offsets, strict=True):
        if abs(off) >= size:
            return out
        src.append(slice(max(0, -off), size - max(0, off)))
        dst.append(slice(max(0, off), size - max(0, -off)))
    out[tuple(dst)] = t[tuple(src)]
    return out


def square_resize_crop(t: Tensor, num_slices: int, resize: int, crop: int, slice_mode: str = "nearest-exact") -> Tensor:
    """HLIP's shape normalisation of one scan ``[D, H, W]`` (no physical resampling): zero-pad ``H, W``
    to a centred square, bilinear resize to ``resize`` x ``resize``, resize ``D`` to ``num_slices`` with
    ``slice_mode`` (``nearest-exact`` in training, ``nearest`` in the Pub-Brain-5 scripts), centre crop
    ``crop`` x ``crop``. Returns ``[num_slices, crop, crop]`` float32."""
    if t.ndim != 3:
        raise ValueError(f"expected a scan [D, H, W], got shape {tuple(t.shape)}")
    t = t.float()
    _, h, w = t.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    t = F.pad(t, (left, side - w - left, top, side - h - top))
    if side != resize:
        t = F.interpolate(t[None], size=(resize, resize), mode="bilinear", align_corners=False)[0]
    if t.shape[0] != num_slices:
        t = F.interpolate(t[None, None], size=(num_slices, resize, resize), mode=slice_mode)[0, 0]
    c = (resize - crop) // 2
    return t[:, c : c + crop, c : c + crop].contiguous()

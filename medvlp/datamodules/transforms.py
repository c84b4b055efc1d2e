"""Image transforms shared by the datamodules (pure torch / numpy, deterministic at eval).

2D (chest X-ray): 8-bit gray -> resize the longest side -> centred zero-pad to a square ->
(train) light random affine -> Normalize(0.5, 0.5) -> 1 or 3 channels, ``[C, S, S]``.

3D (CT): a windowed volume in ``[0, 1]`` -> (x - mean) / std -> (train) random flips ->
``[1, D, H, W]``.

Randomness comes from torch's generator (seeded per DataLoader worker by torch), or from an
explicit ``generator`` argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    angle = math.radians(_uniform(-degrees, degrees, generator))
    zoom = _uniform(float(scale[0]), float(scale[1]), generator)
    tx = _uniform(-translate, translate, generator) * 2  # normalised coordinates span 2
    ty = _uniform(-translate, translate, generator) * 2
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=img.dtype)[None]
    grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


@dataclass
class CXRTransform:
    """Chest X-ray pipeline: gray uint8 ``[H, W]`` -> float ``[channels, image_size, image_size]``.

    Differences from MGCA (``mgca/datasets/transforms.py``): MGCA resizes to 256 and random-crops
    224 (centre-crops at eval); here the image is resized straight to ``image_size`` and the
    train-time augmentation is a light random affine, so eval sees the whole padded image.
    """

    image_size: int = 224
    channels: int = 3
    augment: bool = True
    degrees: float = 10.0
    translate: float = 0.05
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    mean: float = 0.5
    std: float = 0.5

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def __call__(self, gray: np.ndarray | Tensor, train: bool = False, generator: torch.Generator | None = None) -> Tensor:
        img = pad_to_square(resize_longest_side(to_float_image(gray), self.image_size))
        if img.shape[-1] != self.image_size:  # rounding of a 1-pixel-wide image
            img = F.interpolate(img[None], size=(self.image_size, self.image_size), mode="bilinear")[0]
        if train and self.augment:
            img = random_affine(img, self.degrees, self.translate, self.scale, generator)
        img = (img - self.mean) / self.std
        if self.channels == 3:
            img = img.expand(3, -1, -1).contiguous()
        return img


@dataclass
class VolumeTransform:
    """CT pipeline: windowed volume ``[D, H, W]`` in ``[0, 1]`` -> normalised ``[1, D, H, W]``.

    ``flip_prob`` flips each axis independently at train time (fVLM uses 0.2; HLIP none).
    """

    mean: float = 0.449
    std: float = 0.226
    flip_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def __call__(self, volume: np.ndarray | Tensor, train: bool = False, generator: torch.Generator | None = None) -> Tensor:
        t = torch.as_tensor(np.ascontiguousarray(volume) if not isinstance(volume, Tensor) else volume).float()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"expected a volume [D, H, W] or [1, D, H, W], got shape {tuple(t.shape)}")
        t = (t - self.mean) / self.std
        if train and self.flip_prob > 0:
            dims = [d for d in (1, 2, 3) if torch.rand((), generator=generator).item() < self.flip_prob]
            if dims:
                t = torch.flip(t, dims)
        return t.contiguous()

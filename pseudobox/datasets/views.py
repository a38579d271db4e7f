"""PreDet's two views of an image (MoCo-v2 augmentations) with query boxes mapped exactly.

Each view is a random resized crop (``crop_size`` square, area fraction in ``scale``,
aspect in ``ratio``, torchvision's sampling), a random horizontal flip, then MoCo-v2's
photometric ops: colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2 and
Gaussian blur (sigma in [0.1, 2]) p 0.5. The geometry is recorded in a
``pseudobox.ssod.augment.Geometry`` and replayed with ``torchvision.transforms.v2``
functional ops on the image and on ``tv_tensors.BoundingBoxes``; the photometric ops are
``pseudobox.ssod.augment.photometric`` (the same recipe without random erasing).

A query must show the same image content in both views. So each box is first reduced
to the part of it both crops see (box ∩ crop 1 ∩ crop 2, in image pixels), and that
region is mapped into each view: the two view boxes are then exactly the same pixels of
the original image. A box stays usable (``valid``) when that common part keeps at least
``min_visible`` of the box's area (clipped to the image) and is at least ``min_box_size``
pixels wide and high in both views.

All randomness comes from the caller's ``torch.Generator`` (parameters are drawn from it
and the v2 functional ops are called with them; the v2 transform classes would draw from
the global RNG), so a seeded generator reproduces the views exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

from pseudobox.config import require
from pseudobox.ssod.augment import Geometry, StrongAugConfig, photometric


@dataclass
class ViewConfig:
    """MoCo-v2 view augmentation at PreDet's input size (section ``views``)."""

    crop_size: int = 480
    scale: tuple[float, float] = (0.2, 1.0)       # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)   # RandomResizedCrop aspect (w / h), log-uniform
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # A query box is usable when the part both views see keeps this share of its area ...
    min_visible: float = 0.5
    # ... and is at least this many pixels wide and high in each view.
    min_box_size: float = 4.0

    def validate(self, prefix: str = "views") -> None:
        def key(name: str) -> str:
            return f"{prefix}.{name}"

        require(self.crop_size >= 32, f"{key('crop_size')} must be >= 32, got {self.crop_size}")
        require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
                f"{key('scale')} must be [low, high] with 0 < low <= high <= 1, got {list(self.scale)}")
        require(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1],
                f"{key('ratio')} must be [low, high] with 0 < low <= high, got {list(self.ratio)}")
        require(0 <= self.flip_prob <= 1, f"{key('flip_prob')} must be a probability, got {self.flip_prob}")
        require(0 < self.min_visible <= 1, f"{key('min_visible')} must be in (0, 1], got {self.min_visible}")
        require(self.min_box_size >= 0, f"{key('min_box_size')} must be >= 0, got {self.min_box_size}")
        self.photometric().validate(prefix)

    def photometric(self) -> StrongAugConfig:
        """The photometric part as the shared strong-augmentation config (no erasing, no geometry)."""
        return StrongAugConfig(color_jitter_prob=self.color_jitter_prob, brightness=self.brightness,
                               contrast=self.contrast, saturation=self.saturation, hue=self.hue,
                               grayscale_prob=self.grayscale_prob, blur_prob=self.blur_prob,
                               blur_sigma=tuple(self.blur_sigma), erase_probs=(), erase_scales=(),
                               erase_ratios=(), geometric=False)


def _uniforms(generator: torch.Generator, n: int) -> list[float]:
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).tolist()


def resized_crop_params(height: int, width: int, scale, ratio, generator: torch.Generator
                        ) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as ``RandomResizedCrop.get_params`` draws them (10 tries of area
    fraction × log-uniform aspect, then a central crop), from ``generator``."""
    u = _uniforms(generator, 40)
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(10):
        a, r, ut, ul = u[4 * attempt: 4 * attempt + 4]
        target = area * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + r * (log_hi - log_lo))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(ut * (height - h + 1)), height - h)
            left = min(int(ul * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def view_geometry(size, cfg: ViewConfig, generator: torch.Generator) -> Geometry:
    """One view's geometry for an image of ``size`` (H, W): crop, resize to the square, maybe flip."""
    h, w = int(size[0]), int(size[1])
    top, left, ch, cw = resized_crop_params(h, w, cfg.scale, cfg.ratio, generator)
    geometry = Geometry.identity((h, w)).crop(top, left, ch, cw).resize(cfg.crop_size, cfg.crop_size)
    (u,) = _uniforms(generator, 1)
    return geometry.hflip() if u < cfg.flip_prob else geometry


def crop_window(geometry: Geometry) -> torch.Tensor:
    """The crop of a ``view_geometry`` as an xyxy box in the input image's pixels."""
    crop = next(p for name, p in geometry.ops if name == "crop")
    return torch.tensor([crop["left"], crop["top"], crop["left"] + crop["width"], crop["top"] + crop["height"]],
                        dtype=torch.float32)


def _make_view(image_u8: torch.Tensor, geometry: Geometry, cfg: ViewConfig, generator: torch.Generator
               ) -> torch.Tensor:
    view = F.to_dtype(geometry.apply_image(image_u8), torch.float32, scale=True)
    return photometric(view, cfg.photometric(), generator)


def two_views_with_geometry(image: torch.Tensor, boxes: torch.Tensor, cfg: ViewConfig,
                            generator: torch.Generator):
    """``two_views`` plus the two views' ``Geometry`` (for exact inverse mapping in tests and debugging).

    Returns ``(view1, boxes1, view2, boxes2, valid, geometry1, geometry2)``.
    """
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"two_views takes a [3, H, W] uint8 image, got {image.dtype} {tuple(image.shape)}")
    size = image.shape[-2:]
    with torch.autocast(image.device.type, enabled=False):  # image ops in full precision under AMP
        g1 = view_geometry(size, cfg, generator)
        g2 = view_geometry(size, cfg, generator)
        view1 = _make_view(image, g1, cfg, generator)
        view2 = _make_view(image, g2, cfg, generator)
        boxes = boxes.reshape(-1, 4).to(device=image.device, dtype=torch.float32)
        h, w = float(size[0]), float(size[1])
        limit = torch.tensor([w, h, w, h], device=boxes.device)
        clipped = torch.minimum(boxes.clamp_min(0), limit)
        c1, c2 = crop_window(g1).to(boxes.device), crop_window(g2).to(boxes.device)
        common = torch.cat([torch.maximum(torch.maximum(clipped[:, :2], c1[:2]), c2[:2]),
                            torch.minimum(torch.minimum(clipped[:, 2:], c1[2:]), c2[2:])], dim=1)
        common[:, 2:] = torch.maximum(common[:, 2:], common[:, :2])  # empty → zero-area, never negative
        boxes1, boxes2 = g1.map_boxes(common), g2.map_boxes(common)

        def area(b):
            return (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)

        full = area(clipped)
        valid = (full > 0) & (area(common) >= cfg.min_visible * full)
        for b in (boxes1, boxes2):
            valid &= ((b[:, 2] - b[:, 0]) >= cfg.min_box_size) & ((b[:, 3] - b[:, 1]) >= cfg.min_box_size)
    return view1, boxes1, view2, boxes2, valid, g1, g2


def two_views(image: torch.Tensor, boxes: torch.Tensor, cfg: ViewConfig, generator: torch.Generator):
    """Two MoCo-v2 views of a ``[3, H, W]`` uint8 ``image`` and its ``[N, 4]`` xyxy pixel ``boxes``.

    Returns ``(view1, boxes1, view2, boxes2, valid)``: views are float32 ``[3, S, S]`` in
    [0, 1] (not normalised), ``boxes1`` / ``boxes2`` the part of each box both views see, in
    each view's pixels, ``valid [N]`` bool (see the module docstring for the threshold).
    """
    return two_views_with_geometry(image, boxes, cfg, generator)[:5]


__all__ = ["ViewConfig", "two_views", "two_views_with_geometry", "view_geometry", "resized_crop_params",
           "crop_window"]

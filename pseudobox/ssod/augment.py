"""Weak and strong views for teacher-student training, with their geometry recorded.

The teacher sees the weak view (a random horizontal flip); the student sees a strong view
made from the weak one: photometric noise (colour jitter, grayscale, blur, random erasing,
Unbiased Teacher's recipe) and, optionally, scale jitter and a random crop. Every geometric
op is recorded in a ``Geometry`` so the teacher's boxes, predicted on the weak view, map
exactly into the student's coordinates. The maths is torchvision's: ops are replayed with
``torchvision.transforms.v2.functional`` on ``tv_tensors.BoundingBoxes``.

Images are CHW float tensors in [0, 1] on any device; boxes are xyxy absolute pixels
float32 ``[N, 4]`` on the same device. Randomness comes only from the caller's
``torch.Generator`` (seed it per worker): parameters are drawn from it and the v2
*functional* ops are called with them, because the v2 transform classes draw from the
global RNG and would not be reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from pseudobox.config import require

GEOMETRIC_OPS = ("hflip", "resize", "crop")


@dataclass
class StrongAugConfig:
    """The student's strong augmentation (config section ``ssod.strong``).

    Photometric defaults are Unbiased Teacher's (``build_strong_augmentation``): colour
    jitter (brightness, contrast, saturation 0.4, hue 0.1) with p 0.8, grayscale p 0.2,
    Gaussian blur with sigma in [0.1, 2] with p 0.5, then three random-erasing passes
    (p 0.7 / 0.5 / 0.3, area fraction and aspect ranges per pass) filled with random values.

    Geometric jitter (off by default, as in Unbiased Teacher) rescales the weak view by a
    factor drawn from ``scale_range`` (both sides, aspect kept) and, with ``crop_prob``,
    crops a window whose height and width are each a fraction in ``[min_crop, 1]`` of the
    rescaled image. Boxes a crop removes are dropped; see ``Geometry.map_boxes_with_keep``.
    """
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    erase_probs: tuple[float, ...] = (0.7, 0.5, 0.3)
    erase_scales: tuple[tuple[float, float], ...] = ((0.05, 0.2), (0.02, 0.2), (0.02, 0.2))
    erase_ratios: tuple[tuple[float, float], ...] = ((0.3, 3.3), (0.1, 6.0), (0.05, 8.0))
    geometric: bool = False
    scale_range: tuple[float, float] = (0.5, 1.5)
    crop_prob: float = 0.5
    min_crop: float = 0.5

    def validate(self, prefix: str = "ssod.strong") -> None:
        def key(name: str) -> str:
            return f"{prefix}.{name}"

        for name in ("color_jitter_prob", "grayscale_prob", "blur_prob", "crop_prob"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"{key(name)} must be a probability in [0, 1], got {value}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{key(name)} must be in [0, 1) (factor drawn in [1-x, 1+x]), got {value}")
        require(0.0 <= self.hue <= 0.5, f"{key('hue')} must be in [0, 0.5], got {self.hue}")
        lo, hi = _pair(self.blur_sigma, key("blur_sigma"))
        require(0.0 < lo <= hi, f"{key('blur_sigma')} must be [low, high] with 0 < low <= high, got {self.blur_sigma}")
        n = len(self.erase_probs)
        require(len(self.erase_scales) == n and len(self.erase_ratios) == n,
                f"{key('erase_probs')}, {key('erase_scales')} and {key('erase_ratios')} need one entry per "
                f"erasing pass, got {n}, {len(self.erase_scales)} and {len(self.erase_ratios)}")
        for i, (p, scale, ratio) in enumerate(zip(self.erase_probs, self.erase_scales, self.erase_ratios)):
            require(0.0 <= p <= 1.0, f"{key('erase_probs')}[{i}] must be a probability in [0, 1], got {p}")
            lo, hi = _pair(scale, f"{key('erase_scales')}[{i}]")
            require(0.0 < lo <= hi < 1.0,
                    f"{key('erase_scales')}[{i}] must be an area fraction [low, high] with 0 < low <= high < 1, "
                    f"got {list(scale)}")
            lo, hi = _pair(ratio, f"{key('erase_ratios')}[{i}]")
            require(0.0 < lo <= hi, f"{key('erase_ratios')}[{i}] must be [low, high] with 0 < low <= high, "
                                    f"got {list(ratio)}")
        lo, hi = _pair(self.scale_range, key("scale_range"))
        require(0.0 < lo <= hi,
                f"{key('scale_range')} must be [low, high] with 0 < low <= high, got {list(self.scale_range)}")
        require(0.0 < self.min_crop <= 1.0, f"{key('min_crop')} must be in (0, 1], got {self.min_crop}")


def _pair(value: Sequence[float], key: str) -> tuple[float, float]:
    require(len(value) == 2, f"{key} must have two numbers [low, high], got {list(value)}")
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class Geometry:
    """The geometric ops of one view, in order, applied to an image of ``input_size``.

    ``ops`` is a tuple of ``(name, params)`` with ``name`` in ``GEOMETRIC_OPS`` and params
    plain Python numbers (so a Geometry logs as JSON via ``to_dict``):
    ``("hflip", {})``, ``("resize", {"height", "width"})``, ``("crop", {"top", "left",
    "height", "width"})``. Replayed with torchvision v2 functional ops on images
    (``apply_image``) and on ``tv_tensors.BoundingBoxes`` (``map_boxes``).
    """
    input_size: tuple[int, int]  # (H, W) of the image the ops apply to
    ops: tuple[tuple[str, dict[str, Any]], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", (int(self.input_size[0]), int(self.input_size[1])))
        object.__setattr__(self, "ops", tuple((str(name), dict(params)) for name, params in self.ops))
        for name, _ in self.ops:
            if name not in GEOMETRIC_OPS:
                raise ValueError(f"unknown geometric op {name!r}; known: {GEOMETRIC_OPS}")

    @classmethod
    def identity(cls, size: Sequence[int]) -> Geometry:
        return cls((int(size[0]), int(size[1])))

    @property
    def is_identity(self) -> bool:
        return not self.ops

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) after all ops."""
        h, w = self.input_size
        for name, p in self.ops:
            if name in ("resize", "crop"):
                h, w = p["height"], p["width"]
        return h, w

    @property
    def area_scale(self) -> float:
        """How much an (uncropped) box's area grows through the ops: the resize ratios' product."""
        scale, (h, w) = 1.0, self.input_size
        for name, p in self.ops:
            if name == "resize":
                scale *= (p["height"] / h) * (p["width"] / w)
            if name in ("resize", "crop"):
                h, w = p["height"], p["width"]
        return scale

    def hflip(self) -> Geometry:
        return Geometry(self.input_size, self.ops + (("hflip", {}),))

    def resize(self, height: int, width: int) -> Geometry:
        return Geometry(self.input_size, self.ops + (("resize", {"height": int(height), "width": int(width)}),))

    def crop(self, top: int, left: int, height: int, width: int) -> Geometry:
        """Append a crop; the window must lie inside the current output (no implicit padding)."""
        h, w = self.output_size
        if not (0 <= top and 0 <= left and 0 < height and 0 < width and top + height <= h and left + width <= w):
            raise ValueError(f"crop (top={top}, left={left}, height={height}, width={width}) "
                             f"outside the {h}x{w} image")
        params = {"top": int(top), "left": int(left), "height": int(height), "width": int(width)}
        return Geometry(self.input_size, self.ops + (("crop", params),))

    def then(self, other: Geometry) -> Geometry:
        """This geometry followed by ``other`` (whose input is this one's output)."""
        if other.input_size != self.output_size:
            raise ValueError(f"cannot compose: {other.input_size} input after {self.output_size} output")
        return Geometry(self.input_size, self.ops + other.ops)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        for name, p in self.ops:
            if name == "hflip":
                x = F.horizontal_flip(x)
            elif name == "resize":
                x = F.resize(x, [p["height"], p["width"]], antialias=True)
            else:
                x = F.crop(x, p["top"], p["left"], p["height"], p["width"])
        return x

    def apply_image(self, image: torch.Tensor) -> torch.Tensor:
        """Replay the ops on a ``[C, H, W]`` image of ``input_size``."""
        if tuple(image.shape[-2:]) != self.input_size:
            raise ValueError(f"image is {tuple(image.shape[-2:])}, geometry expects {self.input_size}")
        return self._replay(image)

    def map_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """xyxy boxes ``[N, 4]`` in input coordinates → output coordinates, clipped to the output
        canvas. Boxes a crop removed come out degenerate (zero width or height): use
        ``map_boxes_with_keep`` to drop them."""
        bb = tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format=tv_tensors.BoundingBoxFormat.XYXY,
                                      canvas_size=self.input_size)
        bb = self._replay(bb)
        bb = F.clamp_bounding_boxes(bb)
        return bb.as_subclass(torch.Tensor).to(boxes.dtype)

    def map_boxes_with_keep(self, boxes: torch.Tensor, min_visible: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``map_boxes`` plus a bool keep mask ``[N]``: False for boxes with no area left in the
        output, or (``min_visible`` > 0) with less than that fraction of their area visible."""
        mapped = self.map_boxes(boxes)
        area = (mapped[:, 2:] - mapped[:, :2]).clamp_min(0).prod(dim=1)
        keep = (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
        if min_visible > 0:
            full = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0).prod(dim=1) * self.area_scale
            keep &= area >= min_visible * full
        return mapped, keep

    def to_dict(self) -> dict:
        return {"input_size": list(self.input_size), "ops": [[name, dict(p)] for name, p in self.ops]}

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(tuple(data["input_size"]), tuple((name, p) for name, p in data["ops"]))


def _uniforms(generator: torch.Generator, n: int) -> list[float]:
    """``n`` uniform [0, 1) numbers from ``generator`` as Python floats (one draw, one transfer)."""
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).tolist()


def _randint(u: float, low: int, high: int) -> int:
    """An integer in [low, high) from a uniform ``u``."""
    return min(low + int(u * (high - low)), high - 1)


def weak_view(image: torch.Tensor, generator: torch.Generator, flip_prob: float = 0.5
              ) -> tuple[torch.Tensor, Geometry]:
    """The teacher's view: a random horizontal flip (probability ``flip_prob``).

    No resize here: the detector's own transform (``GeneralizedRCNNTransform``) resizes
    both views and their targets, so resizing here would only cost time.
    """
    (u,) = _uniforms(generator, 1)
    geometry = Geometry.identity(image.shape[-2:])
    if u < flip_prob:
        geometry = geometry.hflip()
        image = F.horizontal_flip(image)
    return image, geometry


def random_geometry(size: Sequence[int], cfg: StrongAugConfig, generator: torch.Generator) -> Geometry:
    """Scale jitter then (with ``cfg.crop_prob``) a random crop, for an image of ``size`` (H, W)."""
    u_scale, u_crop, u_fh, u_fw, u_top, u_left = _uniforms(generator, 6)
    geometry = Geometry.identity(size)
    h, w = geometry.input_size
    s = cfg.scale_range[0] + u_scale * (cfg.scale_range[1] - cfg.scale_range[0])
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) != (h, w):
        geometry = geometry.resize(nh, nw)
    if u_crop < cfg.crop_prob:
        ch = max(1, round(nh * (cfg.min_crop + u_fh * (1.0 - cfg.min_crop))))
        cw = max(1, round(nw * (cfg.min_crop + u_fw * (1.0 - cfg.min_crop))))
        if (ch, cw) != (nh, nw):
            geometry = geometry.crop(_randint(u_top, 0, nh - ch + 1), _randint(u_left, 0, nw - cw + 1), ch, cw)
    return geometry


def _blur_kernel_size(sigma: float, h: int, w: int) -> int:
    """An odd kernel covering ±3 sigma (PIL's GaussianBlur radius is sigma), within the image
    (reflect padding needs half the kernel < the image side)."""
    half = min(math.ceil(3.0 * sigma), min(h, w) - 1)
    return 2 * half + 1


def _erase_box(u: list[float], h: int, w: int, scale: Sequence[float], ratio: Sequence[float]
               ) -> tuple[int, int, int, int] | None:
    """RandomErasing's box search (10 tries of area fraction × log-uniform aspect) from 22 uniforms."""
    area, log_lo, log_hi = h * w, math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(10):
        erase_area = area * (scale[0] + u[2 * attempt] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[2 * attempt + 1] * (log_hi - log_lo))
        eh, ew = round(math.sqrt(erase_area * aspect)), round(math.sqrt(erase_area / aspect))
        if 0 < eh < h and 0 < ew < w:
            return _randint(u[20], 0, h - eh + 1), _randint(u[21], 0, w - ew + 1), eh, ew
    return None


_ERASE_DRAWS = 23  # apply + 10 × (area, aspect) + top + left


def photometric(image: torch.Tensor, cfg: StrongAugConfig, generator: torch.Generator) -> torch.Tensor:
    """Unbiased Teacher's photometric strong augmentation; boxes do not move.

    Colour jitter (brightness, contrast, saturation, hue in a random order, like
    ``ColorJitter``), grayscale, Gaussian blur, then the random-erasing passes. Erased
    patches get uniform [0, 1) noise: Unbiased Teacher draws N(0, 1) values and converts back
    to a PIL image, which wraps them into [0, 255]; uniform noise keeps the image in [0, 1]
    for the detector's normalisation.
    """
    n_erase = len(cfg.erase_probs)
    u = _uniforms(generator, 12 + _ERASE_DRAWS * n_erase)
    h, w = image.shape[-2:]
    if u[0] < cfg.color_jitter_prob:
        adjust = (
            (F.adjust_brightness, 1.0 + cfg.brightness * (2.0 * u[1] - 1.0)),
            (F.adjust_contrast, 1.0 + cfg.contrast * (2.0 * u[2] - 1.0)),
            (F.adjust_saturation, 1.0 + cfg.saturation * (2.0 * u[3] - 1.0)),
            (F.adjust_hue, cfg.hue * (2.0 * u[4] - 1.0)),
        )
        for i in sorted(range(4), key=lambda i: u[5 + i]):  # a random order, like ColorJitter
            fn, factor = adjust[i]
            image = fn(image, factor)
    if u[9] < cfg.grayscale_prob and image.shape[-3] == 3:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if u[10] < cfg.blur_prob and min(h, w) > 1:
        sigma = cfg.blur_sigma[0] + u[11] * (cfg.blur_sigma[1] - cfg.blur_sigma[0])
        k = _blur_kernel_size(sigma, h, w)
        image = F.gaussian_blur(image, [k, k], [sigma, sigma])
    noise_generator = None
    for i in range(n_erase):
        draws = u[12 + _ERASE_DRAWS * i: 12 + _ERASE_DRAWS * (i + 1)]
        if draws[0] >= cfg.erase_probs[i]:
            continue
        box = _erase_box(draws[1:], h, w, cfg.erase_scales[i], cfg.erase_ratios[i])
        if box is None:
            continue
        if noise_generator is None:
            noise_generator = _device_generator(generator, image.device)
        top, left, eh, ew = box
        noise = torch.rand((image.shape[-3], eh, ew), generator=noise_generator, device=image.device,
                           dtype=image.dtype)
        image = F.erase(image, top, left, eh, ew, noise)
    return image


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself when it lives on ``device``; else a generator there seeded from it."""
    own, wanted = torch.device(generator.device), torch.device(device)
    if own.type == wanted.type and wanted.index in (None, own.index):
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator(device=device).manual_seed(seed)


def strong_view(image: torch.Tensor, cfg: StrongAugConfig, generator: torch.Generator
                ) -> tuple[torch.Tensor, Geometry]:
    """The student's view of a weak-view ``image``: with ``cfg.geometric``, scale jitter and a
    random crop (recorded: the Geometry maps weak-view boxes into this view), then the
    photometric ops, which never move boxes (identity Geometry without ``cfg.geometric``)."""
    geometry = Geometry.identity(image.shape[-2:])
    if cfg.geometric:
        geometry = random_geometry(image.shape[-2:], cfg, generator)
        image = geometry.apply_image(image)
    return photometric(image, cfg, generator), geometry


def apply_strong_batch(images: Sequence[torch.Tensor], cfg: StrongAugConfig, generator: torch.Generator
                       ) -> tuple[list[torch.Tensor], list[Geometry]]:
    """``strong_view`` on each image: (strong images, their geometries)."""
    out = [strong_view(image, cfg, generator) for image in images]
    return [image for image, _ in out], [geometry for _, geometry in out]


def apply_weak_batch(images: Sequence[torch.Tensor], generator: torch.Generator, flip_prob: float = 0.5
                     ) -> tuple[list[torch.Tensor], list[Geometry]]:
    """``weak_view`` on each image: (weak images, their geometries)."""
    out = [weak_view(image, generator, flip_prob) for image in images]
    return [image for image, _ in out], [geometry for _, geometry in out]


__all__ = ["StrongAugConfig", "Geometry", "weak_view", "strong_view", "photometric", "random_geometry",
           "apply_strong_batch", "apply_weak_batch", "GEOMETRIC_OPS"]

"""Image transforms that carry xyxy pixel boxes exactly through every step.

Images are ``[3, H, W]`` tensors (or HWC arrays where noted); boxes ``[N, 4]`` float32
xyxy in absolute pixels, continuous convention (a pixel spans [j, j+1]).

Only boxes are carried. Per-box flags (crowd, difficult) do not change under these
transforms; COCO's per-box ``area`` would scale by ``sx * sy`` under ``resize``, but
nothing here needs it: these transforms feed training, and evaluation
(``pipelines/evaluate.py``) scores predictions in the original image coordinates
(torchvision detectors map their boxes back), where the stored ``area`` applies as is.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the image left-right; x maps to W - x, so x1/x2 swap roles."""
    w = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return image.flip(-1), flipped


def resize(image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to ``size=(H, W)``; boxes scale by the exact per-axis ratios."""
    h, w = image.shape[-2:]
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    scale = boxes.new_tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h])
    return out, boxes * scale


def resize_short_side(image: torch.Tensor, boxes: torch.Tensor, short: int, max_size: int | None = None):
    """Resize so the short side is ``short`` (long side capped at ``max_size``)."""
    h, w = image.shape[-2:]
    s = short / min(h, w)
    if max_size is not None and max(h, w) * s > max_size:
        s = max_size / max(h, w)
    return resize(image, boxes, (max(1, round(h * s)), max(1, round(w * s))))


def crop(image: torch.Tensor, boxes: torch.Tensor, top: int, left: int, height: int, width: int,
         min_visible: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop a window; boxes shift and clip to it. Returns ``(image, boxes, keep)`` where
    ``keep`` marks boxes whose visible area fraction exceeds ``min_visible``."""
    out = image[..., top: top + height, left: left + width]
    shifted = boxes - boxes.new_tensor([left, top, left, top])
    clipped = torch.stack([shifted[:, 0].clamp(0, width), shifted[:, 1].clamp(0, height),
                           shifted[:, 2].clamp(0, width), shifted[:, 3].clamp(0, height)], dim=1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0).prod(1)
    visible = (clipped[:, 2:] - clipped[:, :2]).clamp_min(0).prod(1)
    keep = (visible > 0) & (visible > min_visible * area)
    return out, clipped, keep


def random_resized_crop(image: torch.Tensor, size: int, rng: np.random.Generator,
                        scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Classification augmentation: a random area/aspect crop resized to ``size``×``size``."""
    h, w = image.shape[-2:]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            image = image[..., top: top + ch, left: left + cw]
            break
    return F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]


def classification_batch(batch: dict, size: int, num_classes: int, train: bool, seed: int | None = None) -> dict:
    """CPU stage for classifier training: HWC images → fixed ``size`` crops + multi-hot targets."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for im, labels in zip(batch["image"], batch["labels"]):
        t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
        if train:
            t = random_resized_crop(t, size, rng)
            if rng.random() < 0.5:
                t = t.flip(-1)
        else:
            t = F.interpolate(t[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
        images.append(t.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        target = np.zeros(num_classes, np.float32)
        target[np.asarray(labels, np.int64)] = 1.0
        targets.append(target)
    return {"image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
            "target": np.stack(targets) if targets else np.zeros((0, num_classes), np.float32)}

"""How well a model's RoI features track box overlap (PreDet, Fig. 5b).

A model pre-trained for detection should give two boxes on the same image similar RoI
features when they overlap a lot and dissimilar ones when they barely overlap. This
module measures it:

* ``sample_box_pairs``: box pairs on the images with their IoU spread evenly over IoU
  bins (default 0.05–0.95 in steps of 0.1). Each pair is a reference box (a ground-truth
  box of the image, or a random box) and a second box made from it by
  ``jitter_to_iou``: random rescaling per axis, then a shift along a random direction
  whose length is found by bisection so the IoU equals a target drawn uniformly inside
  the bin. The second box is clipped to the image and the pair's IoU recomputed exactly
  with ``torchvision.ops.box_iou``; pairs that clipping moved out of their bin are
  redrawn.
* RoI feature extractors (``features(images, boxes) -> Tensor[sum N_i, D]``) for every
  checkpoint kind: a ResNet classifier (RoIAlign on C5 or C4, then mean-pooled or
  flattened), a Faster R-CNN (FPN + its MultiScaleRoIAlign + its box head, as its RoI
  head sees boxes), RetinaNet / FCOS (FPN + a MultiScaleRoIAlign over P3–P5, pooled),
  and PreDet (``PreDet.roi_features``).
* ``pearson`` of IoU against the cosine similarity of the two features, overall and per
  box-size bin (``size_bin_of``: COCO's small/medium/large, scaled to the image), in
  ``correlation_rows``; ``markdown_table`` and ``plot_png`` render them.

Box-size bins: COCO calls a box small below 32² px² and large above 96² px², on images
whose longer side is 640 px. Here the thresholds are relative: a box of side
``s = sqrt(w·h)`` is small when ``s < 0.05·L``, large when ``s >= 0.15·L`` (``L`` the
image's longer side), medium between; the pair's bin is its reference box's.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, roi_align

DEFAULT_IOU_BINS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
DEFAULT_SIZE_THRESHOLDS = (0.05, 0.15)  # COCO's 32 and 96 px over a 640-px longer side
SIZE_NAMES = ("small", "medium", "large")
MAX_ASPECT = 2.0  # random reference boxes: aspect ratio (w/h) log-uniform in [1/2, 2]
MAX_SAMPLING_ROUNDS = 200


class RoiFeatureExtractor(Protocol):
    """What the analysis needs from a model: one feature vector per box."""

    def features(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """``images``: CHW float in [0, 1]; ``boxes``: per image ``[N_i, 4]`` xyxy pixels of
        that image. Returns ``[sum N_i, D]``, image by image, boxes in order."""
        ...


# ---------------------------------------------------------------------------- box pairs


@dataclass
class BoxPairs:
    """``P`` box pairs: ``box_a`` (the reference) and ``box_b`` on image ``image_index``."""

    image_index: np.ndarray   # [P] int64
    box_a: np.ndarray         # [P, 4] float32 xyxy pixels
    box_b: np.ndarray         # [P, 4] float32 xyxy pixels
    iou: np.ndarray           # [P] float64, torchvision.ops.box_iou of the two (float32) boxes
    iou_bin: np.ndarray       # [P] int64, index into the IoU bins
    size_bin: np.ndarray      # [P] int64, index into the size names (of box_a)
    from_gt: np.ndarray       # [P] bool, whether box_a is a ground-truth box

    def __len__(self) -> int:
        return len(self.iou)


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (``[N, 4]`` xyxy each): the diagonal of
    ``torchvision.ops.box_iou``, taken in chunks so memory stays O(N)."""
    out = [box_iou(a[i:i + 1024], b[i:i + 1024]).diagonal() for i in range(0, len(a), 1024)]
    return torch.cat(out) if out else a.new_zeros(0)


def _elementwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same IoU, elementwise (for the bisection's many evaluations)."""
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter)


def _boxes_from(cx, cy, w, h) -> torch.Tensor:
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def jitter_to_iou(reference: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
                  iterations: int = 60) -> torch.Tensor:
    """Boxes whose IoU with ``reference`` (``[N, 4]`` xyxy) is ``target`` (``[N]``, in (0, 1]).

    Each box is the reference rescaled per axis by a random factor (kept small enough
    that the concentric IoU is at least the target), then shifted along a random
    direction by the distance (bisection: IoU falls monotonically with the distance)
    that brings the IoU to the target. Not clipped to any image. float64 inside.
    """
    ref = reference.double()
    t = target.double().clamp(1e-6, 1.0)
    n = len(ref)
    w, h = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    cx, cy = (ref[:, 0] + ref[:, 2]) / 2, (ref[:, 1] + ref[:, 3]) / 2
    bound = -torch.log(t) / 2  # equal log-scales of ±bound on both axes alone give IoU = t
    log_sw = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    log_sh = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    for _ in range(60):  # shrink the rescaling where the concentric IoU is below the target
        concentric = _elementwise_iou(ref, _boxes_from(cx, cy, w * log_sw.exp(), h * log_sh.exp()))
        low = concentric < t
        if not low.any():
            break
        log_sw = torch.where(low, log_sw / 2, log_sw)
        log_sh = torch.where(low, log_sh / 2, log_sh)
    w2, h2 = w * log_sw.exp(), h * log_sh.exp()
    angle = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    dx, dy = torch.cos(angle) * w, torch.sin(angle) * h  # shift per unit distance, in box units
    # At distance ``hi`` the boxes are disjoint along the dominant axis of the direction.
    hi = 2 * (1 + torch.maximum(log_sw.exp(), log_sh.exp())) / torch.maximum(angle.cos().abs(), angle.sin().abs())
    lo = torch.zeros_like(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        iou = _elementwise_iou(ref, _boxes_from(cx + mid * dx, cy + mid * dy, w2, h2))
        too_close = iou > t
        lo = torch.where(too_close, mid, lo)
        hi = torch.where(too_close, hi, mid)
    s = (lo + hi) / 2
    return _boxes_from(cx + s * dx, cy + s * dy, w2, h2).to(reference.dtype)


def size_bin_of(boxes: np.ndarray, image_hw: np.ndarray, thresholds: Sequence[float] = DEFAULT_SIZE_THRESHOLDS
                ) -> np.ndarray:
    """Size-bin index of each box: ``sqrt(w·h) / L`` (``L`` the longer side of the box's
    image, ``image_hw`` ``[N, 2]``) against ``thresholds`` (0 below the first...)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    side = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    longer = np.asarray(image_hw, np.float64).reshape(-1, 2).max(axis=1)
    return np.searchsorted(np.asarray(thresholds, np.float64), side / longer, side="right").astype(np.int64)


def random_reference_boxes(n: int, image_hw: tuple[int, int], rng: np.random.Generator,
                           thresholds: Sequence[float] = DEFAULT_SIZE_THRESHOLDS,
                           min_box_size: float = 4.0) -> np.ndarray:
    """``n`` random boxes inside an image, their size bin drawn uniformly among the bins
    the image can hold, their relative side uniform within the bin, aspect ratio
    log-uniform in [1/2, 2], position uniform. ``[n, 4]`` float32 xyxy."""
    h, w = image_hw
    longer = max(h, w)
    edges = [min_box_size / longer, *thresholds, 0.9 * min(h, w) / longer]
    ranges = [(max(lo, edges[0]), min(hi, edges[-1])) for lo, hi in pairwise(edges)]
    ranges = [(lo, hi) for lo, hi in ranges if hi > lo]
    if not ranges:
        raise ValueError(f"an image of {w}x{h} px cannot hold a box of min_box_size {min_box_size}")
    pick = rng.integers(len(ranges), size=n)
    lo = np.asarray([ranges[i][0] for i in pick])
    hi = np.asarray([ranges[i][1] for i in pick])
    side = (lo + rng.random(n) * (hi - lo)) * longer
    aspect = np.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT), size=n))
    bw = np.clip(side * np.sqrt(aspect), min_box_size, 0.95 * w)
    bh = np.clip(side / np.sqrt(aspect), min_box_size, 0.95 * h)
    x1 = rng.random(n) * (w - bw)
    y1 = rng.random(n) * (h - bh)
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)


def _usable_gt(boxes, min_box_size: float) -> np.ndarray | None:
    if boxes is None:
        return None
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_box_size)
    return boxes[keep] if keep.any() else None


def iou_bin_of(iou: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """IoU-bin index of each value: bin k is ``[edges[k], edges[k+1])``, the last bin closed;
    -1 outside ``[edges[0], edges[-1]]``."""
    edges = np.asarray(edges, np.float64)
    iou = np.asarray(iou, np.float64)
    k = np.searchsorted(edges, iou, side="right") - 1
    k[iou == edges[-1]] = len(edges) - 2
    k[(iou < edges[0]) | (iou > edges[-1])] = -1
    return k.astype(np.int64)


def sample_box_pairs(image_sizes: Sequence[tuple[int, int]], gt_boxes: Sequence[np.ndarray | None], num_pairs: int,
                     rng: np.random.Generator, iou_bins: Sequence[float] = DEFAULT_IOU_BINS,
                     size_thresholds: Sequence[float] = DEFAULT_SIZE_THRESHOLDS, min_box_size: float = 4.0,
                     reference: str = "auto") -> BoxPairs:
    """``num_pairs`` box pairs, the same number in every IoU bin (the first ``num_pairs %
    bins`` bins get one more), on images chosen uniformly.

    ``image_sizes``: ``(h, w)`` per image; ``gt_boxes``: per image its ground-truth boxes
    (or None). ``reference``: ``auto`` (a random usable GT box of the image — both sides
    >= ``min_box_size`` — where it has one, else a random box), ``gt`` (images without a
    usable GT box are never chosen) or ``random``. Both boxes lie inside the image with
    both sides >= ``min_box_size``. ``ValueError`` when a bin cannot be filled.
    """
    if reference not in ("auto", "gt", "random"):
        raise ValueError(f"reference must be auto, gt or random, got {reference!r}")
    n_bins = len(iou_bins) - 1
    if n_bins < 1 or num_pairs < 1:
        raise ValueError("need at least one IoU bin (two edges) and num_pairs >= 1")
    usable = [None if reference == "random" else _usable_gt(b, min_box_size) for b in gt_boxes]
    candidates = np.arange(len(image_sizes))
    if reference == "gt":
        candidates = np.asarray([i for i, b in enumerate(usable) if b is not None], np.int64)
        if not len(candidates):
            raise ValueError(f"reference=gt but no image has a ground-truth box of side >= {min_box_size} px")
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    sizes = np.asarray(image_sizes, np.float64).reshape(-1, 2)
    quotas = [num_pairs // n_bins + (1 if k < num_pairs % n_bins else 0) for k in range(n_bins)]
    parts: list[tuple] = []
    for k, quota in enumerate(quotas):
        lo, hi = float(iou_bins[k]), float(iou_bins[k + 1])
        got = 0
        for _ in range(MAX_SAMPLING_ROUNDS):
            need = quota - got
            if need <= 0:
                break
            draw = max(2 * need, 8)  # extra draws: some leave the bin when clipped
            images = candidates[rng.integers(len(candidates), size=draw)]
            refs, from_gt = np.zeros((draw, 4), np.float32), np.zeros(draw, bool)
            for j, i in enumerate(images):
                if usable[i] is not None:
                    refs[j] = usable[i][rng.integers(len(usable[i]))]
                    from_gt[j] = True
                else:
                    refs[j] = random_reference_boxes(1, tuple(sizes[i].astype(int)), rng, size_thresholds,
                                                     min_box_size)[0]
            target = torch.from_numpy(lo + rng.random(draw) * (hi - lo))
            other = jitter_to_iou(torch.from_numpy(refs), target, generator).numpy()
            hw = sizes[images]
            other[:, 0::2] = other[:, 0::2].clip(0, hw[:, 1:2])
            other[:, 1::2] = other[:, 1::2].clip(0, hw[:, 0:1])
            iou = paired_iou(torch.from_numpy(refs), torch.from_numpy(other)).double().numpy()
            ok = ((iou_bin_of(iou, iou_bins) == k) & ((other[:, 2] - other[:, 0]) >= min_box_size)
                  & ((other[:, 3] - other[:, 1]) >= min_box_size))
            take = np.flatnonzero(ok)[:need]
            parts.append((images[take], refs[take], other[take], iou[take], from_gt[take]))
            got += len(take)
        if got < quota:
            raise ValueError(f"could only place {got} of {quota} box pairs with IoU in [{lo}, {hi}); "
                             f"the images may be too small for min_box_size {min_box_size}")
    image_index = np.concatenate([p[0] for p in parts]).astype(np.int64)
    box_a = np.concatenate([p[1] for p in parts]).astype(np.float32)
    iou = np.concatenate([p[3] for p in parts])
    return BoxPairs(image_index=image_index, box_a=box_a, box_b=np.concatenate([p[2] for p in parts]),
                    iou=iou, iou_bin=iou_bin_of(iou, iou_bins),
                    size_bin=size_bin_of(box_a, sizes[image_index], size_thresholds),
                    from_gt=np.concatenate([p[4] for p in parts]))


# ---------------------------------------------------------------------------- features


def _resize(images: list[torch.Tensor], boxes: list[torch.Tensor], short_side: int
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Images resized (bilinear, antialiased) to short side ``short_side`` (0: unchanged),
    boxes scaled with them."""
    if not short_side:
        return images, boxes
    out_im, out_boxes = [], []
    for im, b in zip(images, boxes):
        h, w = im.shape[-2:]
        scale = short_side / min(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        out_im.append(F.interpolate(im[None], size=(nh, nw), mode="bilinear", align_corners=False,
                                    antialias=True)[0])
        out_boxes.append(b * b.new_tensor([nw / w, nh / h, nw / w, nh / h]))
    return out_im, out_boxes


def _pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    """RoI-aligned ``[N, C, k, k]`` → ``[N, C]`` (mean) or ``[N, C·k·k]`` (flatten)."""
    return x.mean(dim=(2, 3)) if pool == "mean" else x.flatten(1)


def _batches_of_equal_size(images: list[torch.Tensor]) -> list[list[int]]:
    """Consecutive runs of images of the same size (each run can be stacked)."""
    runs: list[list[int]] = []
    for i, im in enumerate(images):
        if runs and images[runs[-1][0]].shape == im.shape:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _normalize(x: torch.Tensor) -> torch.Tensor:
    from pseudobox.models.classifier import IMAGENET_MEAN, IMAGENET_STD

    mean = x.new_tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(-1, 3, 1, 1)
    return (x - mean) / std


class ClassifierRoiFeatures:
    """A ResNet classifier's RoI features: RoIAlign (``roi_output_size``², sampling ratio 2,
    aligned) on ``layer4`` (C5, stride 32) or ``layer3`` (C4, stride 16) of the
    ImageNet-normalised image, then mean-pooled (``pool="mean"``, ``[N, C]``) or flattened."""

    STRIDES: ClassVar[dict[str, int]] = {"layer3": 16, "layer4": 32}

    def __init__(self, model: nn.Module, layer: str = "layer4", pool: str = "mean", roi_output_size: int = 7,
                 image_size: int = 0):
        if layer not in self.STRIDES:
            raise ValueError(f"layer must be layer3 or layer4, got {layer!r}")
        self.model, self.layer, self.pool, self.size, self.image_size = model.eval(), layer, pool, roi_output_size, image_size

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))
        return m.layer4(x) if self.layer == "layer4" else x

    @torch.inference_mode()
    def features(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        images, boxes = _resize(images, boxes, self.image_size)
        out = []
        for run in _batches_of_equal_size(images):
            fmap = self._trunk(_normalize(torch.stack([images[i] for i in run])))
            rois = roi_align(fmap, [boxes[i].to(fmap) for i in run], self.size, 1.0 / self.STRIDES[self.layer],
                             sampling_ratio=2, aligned=True)
            out.append(_pool(rois, self.pool))
        return torch.cat(out).float()


class DetectorRoiFeatures:
    """A torchvision detector's RoI features, on its own transform (normalisation and
    resize to ``test_size``; boxes resized with the images) and FPN. Faster R-CNN: its RoI
    head's MultiScaleRoIAlign and box head (TwoMLPHead, ``[N, 1024]``), so exactly what its
    classifier sees. RetinaNet / FCOS have no RoI head: a MultiScaleRoIAlign over P3–P5
    (``roi_output_size``², sampling ratio 2), mean-pooled (``[N, 256]``) or flattened."""

    def __init__(self, model: nn.Module, pool: str = "mean", roi_output_size: int = 7):
        from torchvision.models.detection import FasterRCNN
        from torchvision.ops import MultiScaleRoIAlign

        self.model, self.pool = model.eval(), pool
        self.is_rcnn = isinstance(model, FasterRCNN)
        self.pooler = None if self.is_rcnn else MultiScaleRoIAlign(["0", "1", "2"], roi_output_size, 2)

    @torch.inference_mode()
    def features(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        batch, targets = self.model.transform(images, [{"boxes": b.float()} for b in boxes])
        feats = self.model.backbone(batch.tensors)
        rois = [t["boxes"].to(batch.tensors.device) for t in targets]
        if self.is_rcnn:
            heads = self.model.roi_heads
            return heads.box_head(heads.box_roi_pool(feats, rois, batch.image_sizes)).float()
        return _pool(self.pooler(feats, rois, batch.image_sizes), self.pool).float()


class PredetRoiFeatures:
    """A PreDet model's RoI features: ``PreDet.roi_features`` (FPN, MultiScaleRoIAlign and
    the box head shared by queries and proposals) on the normalised images."""

    def __init__(self, model: nn.Module, normalize=None, image_size: int = 0):
        self.model, self.normalize, self.image_size = model.eval(), normalize or _normalize, image_size

    @torch.inference_mode()
    def features(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        images, boxes = _resize(images, boxes, self.image_size)
        out = []
        for run in _batches_of_equal_size(images):
            x = self.normalize(torch.stack([images[i] for i in run]))
            out.append(self.model.roi_features(x, [boxes[i].to(x) for i in run]))
        return torch.cat(out).float()


def load_roi_feature_extractor(checkpoint_uri: str, device="cpu", *, image_size: int = 0, pool: str = "mean",
                               classifier_layer: str = "layer4", roi_output_size: int = 7
                               ) -> tuple[RoiFeatureExtractor, dict]:
    """The RoI feature extractor of any pseudobox checkpoint (classifier, detector, predet),
    loaded weights-only, on ``device``, in eval mode; returns ``(extractor, checkpoint)``.

    ``image_size``: short side the images are resized to (0: the detector's ``test_size``,
    PreDet's ``crop_size``, the classifier's images as they are). ``pool`` and ``classifier_layer``
    apply where documented on the extractors (not to Faster R-CNN's or PreDet's box head).
    """
    from pseudobox.config import from_dict
    from pseudobox.models.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(checkpoint_uri)
    kind, arch, classes = ckpt.get("model_type"), ckpt["arch"], ckpt["class_names"]
    if kind == "classifier":
        from pseudobox.models.classifier import build_resnet

        model = build_resnet(arch["depth"], num_classes=len(classes))
        model.load_state_dict(ckpt["model_state"])  # the head is unused: a random one is fine here
        return ClassifierRoiFeatures(model.to(device), classifier_layer, pool, roi_output_size, image_size), ckpt
    if kind == "detector":
        from pseudobox.models.detectors import DetectorArch, build_detector

        det_arch = from_dict(DetectorArch, arch)
        model = build_detector(det_arch, len(classes))
        model.load_state_dict(ckpt["model_state"])
        model.transform.min_size = (image_size or det_arch.test_size,)
        model.transform.max_size = max(det_arch.max_size, 2 * (image_size or det_arch.test_size))
        return DetectorRoiFeatures(model.to(device), pool, roi_output_size), ckpt
    if kind == "predet":
        try:
            from pseudobox.models import predet
        except ImportError as e:
            raise CheckpointError(f"{checkpoint_uri} is a PreDet checkpoint, but pseudobox.models.predet is not "
                                  f"available in this installation ({e})") from e
        model = predet.build_predet(from_dict(predet.PredetArch, arch), len(classes))
        model.load_state_dict(ckpt["model_state"])
        size = image_size or int(arch.get("crop_size", 0))  # the pre-training views' size
        return PredetRoiFeatures(model.to(device), getattr(predet, "predet_normalize", None), size), ckpt
    raise CheckpointError(f"{checkpoint_uri} holds a {kind!r} model; RoI features need a classifier, "
                          "detector or predet checkpoint")


@torch.inference_mode()
def pair_cosine_similarities(extractor: RoiFeatureExtractor, images: list[torch.Tensor], pairs: BoxPairs,
                             batch_size: int = 8, device="cpu") -> np.ndarray:
    """Cosine similarity ``[P]`` (float64) of the RoI features of each pair's two boxes,
    ``batch_size`` images per ``features`` call (both boxes of a pair in the same call)."""
    cosine = np.full(len(pairs), np.nan)
    used = np.unique(pairs.image_index)
    for start in range(0, len(used), batch_size):
        chunk = used[start:start + batch_size]
        rows = [np.flatnonzero(pairs.image_index == i) for i in chunk]
        boxes = [torch.from_numpy(np.concatenate([pairs.box_a[r], pairs.box_b[r]])).to(device) for r in rows]
        feats = extractor.features([images[i].to(device) for i in chunk], boxes)
        offset = 0
        for r in rows:
            a, b = feats[offset:offset + len(r)], feats[offset + len(r):offset + 2 * len(r)]
            cosine[r] = F.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12).cpu().numpy()
            offset += 2 * len(r)
    return cosine


# ---------------------------------------------------------------------------- statistics


def pearson(x, y) -> float:
    """Pearson's r of two equally long sequences; NaN with fewer than 2 values or a
    constant one."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"pearson needs equally long inputs, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else math.nan


def linear_fit(x, y) -> tuple[float, float]:
    """Least-squares ``y ≈ intercept + slope·x``: ``(slope, intercept)``; NaN when undefined."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def correlation_rows(iou, cosine, size_bin, iou_bins: Sequence[float] = DEFAULT_IOU_BINS,
                     size_names: Sequence[str] = SIZE_NAMES) -> list[dict]:
    """One row per size bin, then ``all``: ``{size, pairs, pearson, slope, intercept,
    mean_cosine, mean_cosine_per_iou_bin}`` (per-IoU-bin means NaN where a bin is empty)."""
    iou, cosine, size_bin = np.asarray(iou, np.float64), np.asarray(cosine, np.float64), np.asarray(size_bin)
    k = iou_bin_of(iou, iou_bins)
    rows = []
    for name, mask in [*((n, size_bin == s) for s, n in enumerate(size_names)), ("all", np.ones(len(iou), bool))]:
        x, y = iou[mask], cosine[mask]
        slope, intercept = linear_fit(x, y)
        per_bin = [float(y[k[mask] == b].mean()) if (k[mask] == b).any() else math.nan
                   for b in range(len(iou_bins) - 1)]
        rows.append({"size": name, "pairs": int(mask.sum()), "pearson": pearson(x, y), "slope": slope,
                     "intercept": intercept, "mean_cosine": float(y.mean()) if len(y) else math.nan,
                     "mean_cosine_per_iou_bin": per_bin})
    return rows


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown_table(rows: list[dict], iou_bins: Sequence[float] = DEFAULT_IOU_BINS) -> str:
    """The rows as a markdown table: pairs, Pearson r, fitted line, and the mean cosine
    similarity per IoU bin."""
    bins = [f"{iou_bins[i]:g}–{iou_bins[i + 1]:g}" for i in range(len(iou_bins) - 1)]
    head = ["size", "pairs", "Pearson r", "slope", "intercept", *(f"cos @ IoU {b}" for b in bins)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [r["size"], str(r["pairs"]), _fmt(r["pearson"]), _fmt(r["slope"]), _fmt(r["intercept"]),
                 *(_fmt(m) for m in r["mean_cosine_per_iou_bin"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plot

PANEL_SIZE = (360, 300)  # width, height of one size bin's scatter plot
_MARGIN = {"left": 52, "right": 12, "top": 24, "bottom": 40}
_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189))


def plot_size(num_panels: int) -> tuple[int, int]:
    """Width and height of ``plot_png``'s image for ``num_panels`` size bins."""
    return PANEL_SIZE[0] * num_panels, PANEL_SIZE[1]


def _y_range(cosine: np.ndarray) -> tuple[float, float]:
    """The cosine axis: the data's range (shared by the panels), padded, within [-1, 1]."""
    finite = cosine[np.isfinite(cosine)]
    if not len(finite):
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = max(0.05 * (hi - lo), 0.005)
    return max(-1.0, lo - pad), min(1.0, hi + pad)


def _clipped_line(slope: float, intercept: float, y_lo: float, y_hi: float):
    """The part of ``y = intercept + slope·x``, x in [0, 1], with y in [y_lo, y_hi]: two
    (x, y) points, or None when it is undefined or outside."""
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        return None
    xa, xb = 0.0, 1.0
    if slope != 0:
        ends = sorted(((y_lo - intercept) / slope, (y_hi - intercept) / slope))
        xa, xb = max(xa, ends[0]), min(xb, ends[1])
    elif not y_lo <= intercept <= y_hi:
        return None
    if xa > xb:
        return None
    return (xa, intercept + slope * xa), (xb, intercept + slope * xb)


def plot_png(iou, cosine, size_bin, rows: list[dict], size_names: Sequence[str] = SIZE_NAMES,
             title: str = "") -> bytes:
    """PNG: one scatter plot of cosine similarity against IoU per size bin, side by side
    (the same axes in each), with the least-squares line, axes, ticks, and the bin's pair
    count and Pearson r. Drawn with Pillow (no plotting library)."""
    from PIL import Image, ImageDraw, ImageFont

    iou, cosine, size_bin = np.asarray(iou, np.float64), np.asarray(cosine, np.float64), np.asarray(size_bin)
    y_lo, y_hi = _y_range(cosine)
    digits = 1 if y_hi - y_lo >= 0.5 else (2 if y_hi - y_lo >= 0.2 else 3)
    width, height = plot_size(len(size_names))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11)
    by_name = {r["size"]: r for r in rows}
    pw, ph = PANEL_SIZE
    for s, name in enumerate(size_names):
        x0 = s * pw
        left, right = x0 + _MARGIN["left"], x0 + pw - _MARGIN["right"]
        top, bottom = _MARGIN["top"], ph - _MARGIN["bottom"]

        def px(x, y, left=left, right=right, top=top, bottom=bottom):
            return left + x * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

        for t in np.linspace(0, 1, 6):  # x ticks
            x, _ = px(t, y_lo)
            draw.line([x, bottom, x, bottom + 4], fill="black")
            draw.text((x, bottom + 6), f"{t:.1f}", fill="black", font=font, anchor="mt")
        for t in np.linspace(y_lo, y_hi, 6):  # y ticks
            _, y = px(0, t)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((left - 6, y), f"{t:.{digits}f}", fill="black", font=font, anchor="rm")
        draw.text(((left + right) / 2, ph - 4), "IoU", fill="black", font=font, anchor="mb")
        draw.text((x0 + 4, top - 6), "cosine", fill="black", font=font, anchor="lb")
        colour = _COLOURS[s % len(_COLOURS)]
        mask = (size_bin == s) & np.isfinite(cosine)
        for x, y in zip(iou[mask], cosine[mask]):
            cx, cy = px(x, y)
            draw.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=colour)
        row = by_name.get(name, {})
        slope, intercept = row.get("slope", math.nan), row.get("intercept", math.nan)
        segment = _clipped_line(slope, intercept, y_lo, y_hi)
        if segment is not None:
            (xa, ya), (xb, yb) = segment
            draw.line([px(xa, ya), px(xb, yb)], fill="black", width=2)
        draw.rectangle([left, top, right, bottom], outline="black")
        label = f"{name}: n={row.get('pairs', 0)}, Pearson r={_fmt(row.get('pearson', math.nan), 2)}"
        draw.text(((left + right) / 2, top - 6), label, fill="black", font=font, anchor="mb")
        legend_y = ph - 10  # legend: a short black line, as drawn above
        draw.line([right - 110, legend_y, right - 92, legend_y], fill="black", width=2)
        draw.text((right - 88, legend_y), "least-squares fit", fill="black", font=font, anchor="lm")
    if title:
        draw.text((4, ph - 4), title, fill=(90, 90, 90), font=font, anchor="lb")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

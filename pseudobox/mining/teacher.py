"""Teacher pseudo-boxes: offline self-training (DAP Table 9) with a trained detector.

``mine source=teacher checkpoint=<detector model.pt>`` labels an unlabeled corpus on the
same actor pool as CAM mining. Per batch, on the actor's device:

1. the detector runs on every image and, with ``flip``, on its mirror, in one forward;
2. the mirror's boxes are flipped back (``unflip_boxes``: x ↦ W − x);
3. both views' detections are merged per image and class with NMS
   (``merge_views``, ``torchvision.ops.batched_nms`` at ``nms_iou``);
4. boxes with score ≥ ``score_threshold`` are kept, and the top box of an image where
   none reaches it (``select_pseudo_boxes``; DAP keeps score ≥ 0.6 or the top one).

NMS rather than weighted box fusion: the two views are the same model on the same
pixels, so their boxes for one object nearly coincide and averaging them moves a box
by little; NMS keeps one real detection with its own score (fusion averages a box seen
in one view only with nothing, or inflates a score seen in both), needs no extra
parameters, and is the merge detectron2's test-time augmentation uses. The score a
kept box carries is the higher of its two views'.

Everything stays on the device until one copy back per batch; parts are the same as
CAM mining's (``mining/outputs.py``) with ``source = "teacher"``.

``join_pseudo_boxes`` is the other half of self-training: ``finetune pseudo_boxes=...``
gives each unlabeled image its teacher boxes while labeled images keep their ground truth.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms

from pseudobox.config import require
from pseudobox.pipelines.predict import DetectorPredictor

SOURCE = "teacher"


@dataclass
class TeacherMiningConfig:
    """``mine source=teacher``'s settings (DAP Table 9's self-training by default)."""

    score_threshold: float = 0.6  # keep boxes scored at least this ...
    keep_top1: bool = True        # ... or, where an image has none, its top box
    flip: bool = True             # horizontal-flip test-time augmentation
    nms_iou: float = 0.5          # merging the two views: per-class NMS IoU
    test_size: int = 0            # short side at test time; 0 = the checkpoint's model.test_size

    def validate(self) -> None:
        require(0.0 <= self.score_threshold <= 1.0, "teacher.score_threshold must be in [0, 1]")
        require(0.0 < self.nms_iou <= 1.0, "teacher.nms_iou must be in (0, 1]")
        require(self.test_size == 0 or self.test_size >= 32, "teacher.test_size must be 0 or >= 32")

    def actor_kwargs(self, checkpoint: str) -> dict:
        return {"checkpoint_uri": checkpoint, "score_threshold": self.score_threshold, "keep_top1": self.keep_top1,
                "flip": self.flip, "nms_iou": self.nms_iou, "test_size": self.test_size}


# ---------------------------------------------------------------- plain functions


def unflip_boxes(boxes: torch.Tensor, widths: torch.Tensor | float) -> torch.Tensor:
    """Boxes ``[N, 4]`` xyxy found on mirrored images → the original images' frame.

    ``widths`` (scalar or ``[N]``) are the images' widths; x ↦ W − x, so x1 and x2 swap
    (the inverse of ``datasets.transforms.hflip``'s box map, which is its own inverse)."""
    widths = torch.as_tensor(widths, dtype=boxes.dtype, device=boxes.device)
    return torch.stack([widths - boxes[:, 2], boxes[:, 1], widths - boxes[:, 0], boxes[:, 3]], dim=1)


def merge_views(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, image_idx: torch.Tensor,
                nms_iou: float = 0.5) -> torch.Tensor:
    """Indices of the detections kept by NMS within each (image, class), best first.

    Flat inputs over a batch (both views of every image, mirrored boxes already flipped
    back): boxes ``[N, 4]``, scores ``[N]``, labels ``[N]`` (0-based), image_idx ``[N]``."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    groups = image_idx * (labels.max() + 1) + labels
    return batched_nms(boxes, scores, groups, nms_iou)


def select_pseudo_boxes(scores: torch.Tensor, image_idx: torch.Tensor, threshold: float = 0.6,
                        keep_top1: bool = True) -> torch.Tensor:
    """Bool mask ``[N]``: scores ≥ ``threshold``, plus with ``keep_top1`` the one best box
    of every image in ``image_idx`` (so an image with any detection keeps at least one;
    ties go to the earlier box)."""
    keep = scores >= threshold
    if keep_top1 and scores.numel():
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(image_idx[order], stable=True)]  # by image, best first
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = image_idx[order][1:] != image_idx[order][:-1]
        keep[order[first]] = True
    return keep


@torch.inference_mode()
def detect_with_flip(model, images: list[torch.Tensor], flip: bool = True) -> tuple[torch.Tensor, ...]:
    """Eval-mode detections of ``images`` (CHW float in [0, 1]) and, with ``flip``, of
    their mirrors flipped back, in one forward: flat ``(boxes [N, 4], scores [N],
    labels [N] 0-based, image_idx [N])`` on the images' device."""
    model.eval()
    views = list(images) + ([im.flip(-1) for im in images] if flip else [])
    outs = model(views)
    n = len(images)
    device = images[0].device
    boxes, scores, labels, image_idx = [], [], [], []
    for v, out in enumerate(outs):
        fg = out["labels"] > 0  # RetinaNet scores the never-trained background slot too
        b = out["boxes"][fg].float()
        if v >= n:
            b = unflip_boxes(b, images[v - n].shape[-1])
        boxes.append(b)
        scores.append(out["scores"][fg].float())
        labels.append(out["labels"][fg] - 1)
        image_idx.append(torch.full((int(fg.sum()),), v % n, dtype=torch.int64, device=device))
    return torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(image_idx)


def teacher_pseudo_boxes(model, images: list[torch.Tensor], score_threshold: float = 0.6, keep_top1: bool = True,
                         flip: bool = True, nms_iou: float = 0.5) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image ``(boxes [N, 4] f32 pixels, labels [N] int64, scores [N] f32)``: flip TTA,
    per-class NMS merge, score filter with the top-1 fallback; one copy to the host."""
    if not images:
        return []
    boxes, scores, labels, image_idx = detect_with_flip(model, images, flip)
    if flip:
        kept = merge_views(boxes, scores, labels, image_idx, nms_iou)
        boxes, scores, labels, image_idx = boxes[kept], scores[kept], labels[kept], image_idx[kept]
    keep = select_pseudo_boxes(scores, image_idx, score_threshold, keep_top1)
    boxes, scores, labels, image_idx = boxes[keep], scores[keep], labels[keep], image_idx[keep]
    order = torch.argsort(image_idx, stable=True)  # by image, best first within it (NMS order kept)
    boxes, scores, labels, image_idx = (t[order].cpu().numpy() for t in (boxes, scores, labels, image_idx))
    cuts = np.searchsorted(image_idx, np.arange(1, len(images)))
    return [(b.astype(np.float32).reshape(-1, 4), c.astype(np.int64), s.astype(np.float32))
            for b, c, s in zip(np.split(boxes, cuts), np.split(labels, cuts), np.split(scores, cuts))]


def mine_batch(model, batch: dict, device, score_threshold: float = 0.6, keep_top1: bool = True,
               flip: bool = True, nms_iou: float = 0.5) -> dict:
    """Decoded batch (``ray_io.decode_batch`` rows: HWC uint8 numpy, or tensors on the
    actor's device) → output rows (``outputs.mined_rows``) with ``source = "teacher"``;
    error rows pass through without boxes."""
    from pseudobox.mining.cam import host_to_device
    from pseudobox.mining.outputs import mined_rows

    ok = [i for i in range(len(batch["key"])) if not batch["error"][i]]
    images = [t.permute(2, 0, 1).float().div_(255)
              for t in host_to_device([batch["image"][i] for i in ok], torch.device(device))]
    mined = teacher_pseudo_boxes(model, images, score_threshold, keep_top1, flip, nms_iou)
    return mined_rows(batch, dict(zip(ok, mined)), SOURCE)


class TeacherBoxMiner(DetectorPredictor):
    """Ray Data actor: ``predict``'s detector actor (loads the checkpoint once, at its
    test size, on CUDA when the pool reserved a GPU), labelling batches with
    ``mine_batch``."""

    source = SOURCE

    def __init__(self, checkpoint_uri: str, score_threshold: float = 0.6, keep_top1: bool = True, flip: bool = True,
                 nms_iou: float = 0.5, test_size: int = 0, device: str = "cpu", threads: int | None = None):
        super().__init__(checkpoint_uri, score_threshold=0.0, test_size=test_size, device=device, threads=threads)
        self.settings = dict(score_threshold=score_threshold, keep_top1=keep_top1, flip=flip, nms_iou=nms_iou)

    def __call__(self, batch: dict) -> dict:
        return mine_batch(self.model, batch, self.device, **self.settings)


# ---------------------------------------------------------------- self-training data


@functools.lru_cache(maxsize=8)
def _mined_part(boxes_uri: str, shard: str) -> dict:
    from pseudobox.mining.outputs import load_mined_boxes

    return load_mined_boxes(boxes_uri, shard)


def join_pseudo_boxes(batch: dict, boxes_uri: str, labeled_keys: frozenset | set = frozenset()) -> dict:
    """CPU stage for ``finetune pseudo_boxes=...``: rows whose key is labeled keep their
    ground-truth boxes; every other row gets its mined boxes (looked up per shard in the
    mining output's part, cached per worker process). Rows left without a valid box are
    dropped (``train_detector.drop_images_without_boxes``)."""
    from pseudobox.datasets.ray_io import object_array
    from pseudobox.pipelines.train_detector import drop_images_without_boxes

    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    boxes, labels = [], []
    for i, (key, shard) in enumerate(zip(batch["key"], batch["shard"])):
        if str(key) in labeled_keys:
            boxes.append(batch["boxes"][i])
            labels.append(batch["box_labels"][i])
        else:
            b, c, _ = _mined_part(boxes_uri, str(shard)).get(str(key), empty)
            boxes.append(b)
            labels.append(c)
    return drop_images_without_boxes({**batch, "boxes": object_array(boxes), "box_labels": object_array(labels)})

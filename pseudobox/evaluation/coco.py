"""COCO-style box evaluation via ``pycocotools``.

Inside pseudobox boxes are float32 ``xyxy`` pixel tensors; COCO JSON uses
``xywh``. This module owns that boundary conversion and the validation of
the ground-truth / prediction formats shared with :mod:`pseudobox.evaluation.voc`.

Formats
-------
``gts``: list of ``{"key": str, "boxes": [N, 4] xyxy, "labels": [N] 0-based,
"width": int, "height": int}`` with optional ``"iscrowd"`` / ``"difficult"``
bool ``[N]`` and optional ``"area"`` float ``[N]``: COCO's annotation area (of
the segmentation), which decides the small / medium / large bucket of a box as
in official COCO evaluation; missing (or NaN entries), the box's w·h stands in.
Boxes and areas are in the image's original pixel coordinates (the detectors map
their predictions back to them), so areas never need rescaling here.

``preds``: list of ``{"key": str, "boxes": [M, 4] xyxy, "scores": [M],
"labels": [M]}``. A GT image without a prediction entry has no detections;
a prediction whose key is not a GT key is an error.

Tensors, numpy arrays and (nested) lists are all accepted.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# COCO's standard area ranges (inclusive bounds, as in COCOeval).
_SMALL_MAX_AREA = 32.0**2
_MEDIUM_MAX_AREA = 96.0**2


# ---------------------------------------------------------------------------
# Input normalisation (shared with voc.py)
# ---------------------------------------------------------------------------


def as_tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
    """Convert a tensor, numpy array or list to a CPU tensor of ``dtype``."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def _as_boxes(values: Any, what: str) -> torch.Tensor:
    """Convert to a float32 ``[N, 4]`` tensor; an empty input becomes ``[0, 4]``."""
    boxes = as_tensor(values, torch.float32)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what}: boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    return boxes


def _as_vector(values: Any, dtype: torch.dtype, length: int, what: str) -> torch.Tensor:
    """Convert to a 1-D tensor and check it has one entry per box."""
    vector = as_tensor(values, dtype).reshape(-1)
    if vector.shape[0] != length:
        raise ValueError(f"{what}: expected {length} entries, got {vector.shape[0]}")
    return vector


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{what}: labels must lie in [0, {num_classes}), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )


def prepare_gts(gts: Iterable[Mapping[str, Any]], num_classes: int) -> list[dict[str, Any]]:
    """Validate ground truths and convert their fields to CPU tensors.

    Missing ``iscrowd`` / ``difficult`` flags default to all-False, a missing ``area``
    (or its NaN entries) to the box's w·h. Keys must be unique.
    """
    prepared: list[dict[str, Any]] = []
    seen_keys: set[str] = set()
    for gt in gts:
        key = str(gt["key"])
        if key in seen_keys:
            raise ValueError(f"duplicate ground-truth key {key!r}")
        seen_keys.add(key)
        what = f"ground truth {key!r}"
        boxes = _as_boxes(gt["boxes"], what)
        count = boxes.shape[0]
        labels = _as_vector(gt["labels"], torch.int64, count, what + " labels")
        _check_labels(labels, num_classes, what)
        flags = {}
        for flag in ("iscrowd", "difficult"):
            raw = gt.get(flag)
            flags[flag] = (
                torch.zeros(count, dtype=torch.bool)
                if raw is None
                else _as_vector(raw, torch.bool, count, f"{what} {flag}")
            )
        box_area = (boxes[:, 2] - boxes[:, 0]).double() * (boxes[:, 3] - boxes[:, 1]).double()
        raw_area = gt.get("area")
        if raw_area is None:
            area = box_area
        else:
            area = _as_vector(raw_area, torch.float64, count, f"{what} area")
            if bool((area < 0).any()) or bool(torch.isinf(area).any()):
                raise ValueError(f"{what}: area must be finite and >= 0")
            area = torch.where(torch.isnan(area), box_area, area)
        prepared.append(
            {
                "key": key,
                "boxes": boxes,
                "labels": labels,
                "width": int(gt["width"]),
                "height": int(gt["height"]),
                "area": area,
                **flags,
            }
        )
    return prepared


def prepare_preds(
    preds: Iterable[Mapping[str, Any]], gt_keys: Iterable[str], num_classes: int
) -> dict[str, dict[str, Any]]:
    """Validate predictions and index them by key, one entry per GT key.

    GT images without a prediction entry get an empty one, so callers can
    treat "no entry" and "no detections" alike. Unknown or duplicate keys
    raise ``ValueError``.
    """
    gt_keys = list(gt_keys)
    known = set(gt_keys)
    by_key: dict[str, dict[str, Any]] = {}
    for pred in preds:
        key = str(pred["key"])
        if key not in known:
            raise ValueError(f"prediction key {key!r} does not match any ground-truth key")
        if key in by_key:
            raise ValueError(f"duplicate prediction key {key!r}")
        what = f"prediction {key!r}"
        boxes = _as_boxes(pred["boxes"], what)
        count = boxes.shape[0]
        labels = _as_vector(pred["labels"], torch.int64, count, what + " labels")
        _check_labels(labels, num_classes, what)
        scores = _as_vector(pred["scores"], torch.float32, count, what + " scores")
        by_key[key] = {"key": key, "boxes": boxes, "scores": scores, "labels": labels}

    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    return {key: by_key.get(key, {"key": key, **empty}) for key in gt_keys}


def gt_from_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The ground truth of one decoded corpus sample (``datasets.corpus.decode_sample``).

    Carries the boxes, their labels, COCO ``area`` and the ignore flags: COCO
    ignores crowd regions; VOC ignores difficult objects, and crowd ones too,
    so ``difficult`` here is ``difficult | iscrowd``. Width and height are the
    decoded image's, the coordinates of the boxes and of the predictions.
    """
    height, width = sample["image"].shape[:2]
    boxes = as_tensor(sample.get("boxes", np.zeros((0, 4), np.float32)), torch.float32).reshape(-1, 4)
    count = boxes.shape[0]
    labels = as_tensor(sample.get("box_labels", np.zeros(0, np.int64)), torch.int64)

    def flag(name: str) -> torch.Tensor:
        value = sample.get(name)
        return torch.zeros(count, dtype=torch.bool) if value is None else as_tensor(value, torch.bool)

    crowd = flag("iscrowd")
    area = sample.get("area")
    return {
        "key": str(sample["key"]), "boxes": boxes, "labels": labels, "width": int(width), "height": int(height),
        "iscrowd": crowd, "difficult": flag("difficult") | crowd,
        "area": None if area is None else as_tensor(area, torch.float64),
    }


# ---------------------------------------------------------------------------
# COCO JSON conversion
# ---------------------------------------------------------------------------


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[x1, y1, x2, y2]`` -> ``[x, y, w, h]`` (COCO's box format)."""
    xywh = boxes.clone()
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    return xywh


def to_coco_gt(gts: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict:
    """Build a COCO ground-truth dataset dict.

    Image ids are ``1 + position in gts`` and ``file_name`` is the key;
    category ids are ``1 + class index``; ``area`` is the GT's ``area`` (box
    w·h where it has none). ``difficult`` has no COCO
    counterpart and is not used here (mark such boxes ``iscrowd`` to have
    COCOeval ignore them).
    """
    gts = prepare_gts(gts, len(class_names))
    images, annotations = [], []
    for image_id, gt in enumerate(gts, start=1):
        images.append(
            {"id": image_id, "file_name": gt["key"], "width": gt["width"], "height": gt["height"]}
        )
        xywh = xyxy_to_xywh(gt["boxes"]).tolist()
        rows = zip(xywh, gt["labels"].tolist(), gt["iscrowd"].tolist(), gt["area"].tolist())
        for box, label, crowd, area in rows:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": box,
                    "area": area,
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(class_names)]
    return {"info": {}, "images": images, "annotations": annotations, "categories": categories}


def coco_image_ids(coco_gt: Mapping[str, Any]) -> dict[str, int]:
    """Map each key (``file_name``) of a :func:`to_coco_gt` dict to its image id."""
    return {image["file_name"]: image["id"] for image in coco_gt["images"]}


def to_coco_dets(
    preds: Iterable[Mapping[str, Any]], image_ids: Mapping[str, int]
) -> list[dict]:
    """Build a COCO results list (one dict per detection) from predictions.

    ``image_ids`` maps keys to COCO image ids, e.g. ``coco_image_ids(to_coco_gt(...))``.
    """
    results: list[dict] = []
    for pred in preds:
        key = str(pred["key"])
        if key not in image_ids:
            raise ValueError(f"prediction key {key!r} does not match any ground-truth key")
        what = f"prediction {key!r}"
        boxes = _as_boxes(pred["boxes"], what)
        count = boxes.shape[0]
        labels = _as_vector(pred["labels"], torch.int64, count, what + " labels").tolist()
        scores = _as_vector(pred["scores"], torch.float32, count, what + " scores").tolist()
        for box, label, score in zip(xyxy_to_xywh(boxes).tolist(), labels, scores):
            results.append(
                {"image_id": image_ids[key], "category_id": label + 1, "bbox": box, "score": score}
            )
    return results


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _results_without_detections(gts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """What COCOeval would report for zero detections (it crashes instead).

    0 where there is scorable GT, NaN for area ranges (or the whole set) without it.
    """
    areas = [gt["area"][~gt["iscrowd"]] for gt in gts]
    area = torch.cat(areas) if areas else torch.zeros(0)

    def zero_if_any(mask: torch.Tensor) -> float:
        return 0.0 if bool(mask.any()) else math.nan

    return {
        "AP": zero_if_any(area >= 0),
        "AP50": zero_if_any(area >= 0),
        "AP75": zero_if_any(area >= 0),
        "APs": zero_if_any(area <= _SMALL_MAX_AREA),
        "APm": zero_if_any((area >= _SMALL_MAX_AREA) & (area <= _MEDIUM_MAX_AREA)),
        "APl": zero_if_any(area >= _MEDIUM_MAX_AREA),
    }


def evaluate_coco(
    gts: Sequence[Mapping[str, Any]],
    preds: Iterable[Mapping[str, Any]],
    class_names: Sequence[str],
) -> dict[str, float]:
    """COCO bbox mAP of ``preds`` against ``gts``, in percent.

    Returns ``AP`` (IoU .50:.95), ``AP50``, ``AP75`` and the small / medium /
    large ``APs``, ``APm``, ``APl``. A metric COCOeval cannot compute (no GT
    in that range) is NaN. pycocotools' console output is swallowed.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    num_classes = len(class_names)
    gts = prepare_gts(gts, num_classes)
    preds_by_key = prepare_preds(preds, [gt["key"] for gt in gts], num_classes)

    coco_gt_dict = to_coco_gt(gts, class_names)
    detections = to_coco_dets(preds_by_key.values(), coco_image_ids(coco_gt_dict))
    if not detections:
        return _results_without_detections(gts)

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = coco_gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    # stats[0:6] are AP, AP50, AP75, APs, APm, APl at maxDets=100; -1 means "undefined".
    return {
        name: (math.nan if value < 0 else float(value) * 100.0)
        for name, value in zip(COCO_METRIC_NAMES, evaluator.stats[:6])
    }

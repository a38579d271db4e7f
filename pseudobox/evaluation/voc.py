"""PASCAL VOC-style AP50 evaluation.

Follows the VOC devkit's rules: detections of a class are ranked by score
over the whole set; each one is compared with the GT box of that class it
overlaps most in its image; IoU above the threshold with a not-yet-matched
GT is a true positive, with an already-matched GT a false positive (a
duplicate), and with a ``difficult`` GT it is ignored (neither TP nor FP).
IoU uses continuous ``xyxy`` coordinates (no +1 pixel convention).

Input formats are those documented in :mod:`pseudobox.evaluation.coco`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from pseudobox.evaluation.coco import prepare_gts, prepare_preds

# Outcome of one detection after matching.
_TRUE_POSITIVE, _FALSE_POSITIVE, _IGNORED = 1, 0, -1


def voc_ap(recall: Any, precision: Any, use_07_metric: bool = False) -> float:
    """Area under the interpolated precision/recall curve, as a fraction in [0, 1].

    ``recall`` / ``precision`` are cumulative values over detections ranked
    by descending score. Precision is interpolated as the best precision at
    any recall >= r. ``use_07_metric`` averages it at the 11 recalls
    0, 0.1, ..., 1 (VOC2007); otherwise the exact area is used (VOC2010+).
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError("recall and precision must have the same length")

    if use_07_metric:
        # i / 10 hits 0.3 etc. exactly, so recall 3/10 counts for threshold 0.3.
        thresholds = np.arange(11) / 10.0
        total = 0.0
        for threshold in thresholds:
            reached = recall >= threshold
            total += precision[reached].max() if reached.any() else 0.0
        return float(total / len(thresholds))

    # Pad so the curve spans recall 0..1, then make precision non-increasing in
    # recall (the interpolation) and sum rectangles where recall changes.
    padded_recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.concatenate(([0.0], precision, [0.0]))
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    steps = np.flatnonzero(padded_recall[1:] != padded_recall[:-1])
    return float(np.sum((padded_recall[steps + 1] - padded_recall[steps]) * envelope[steps + 1]))


def _match_image(
    det_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_difficult: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """Outcome per detection of one class in one image; detections sorted by score."""
    outcomes = torch.full((det_boxes.shape[0],), _FALSE_POSITIVE, dtype=torch.int64)
    if gt_boxes.shape[0] == 0 or det_boxes.shape[0] == 0:
        return outcomes
    best_iou, best_gt = box_iou(det_boxes, gt_boxes).max(dim=1)
    matched = torch.zeros(gt_boxes.shape[0], dtype=torch.bool)
    # Sequential because whether a GT is still free depends on earlier detections.
    for det_index, (iou, gt_index) in enumerate(zip(best_iou.tolist(), best_gt.tolist())):
        if iou <= iou_threshold:
            continue
        if gt_difficult[gt_index]:
            outcomes[det_index] = _IGNORED
        elif not matched[gt_index]:
            matched[gt_index] = True
            outcomes[det_index] = _TRUE_POSITIVE
    return outcomes


def _class_precision_recall(
    gts: Sequence[Mapping[str, Any]],
    preds_by_key: Mapping[str, Mapping[str, Any]],
    class_index: int,
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Cumulative precision and recall over ranked detections of one class, and its GT count."""
    num_positives = 0
    all_scores, all_outcomes = [], []
    for gt in gts:
        gt_mask = gt["labels"] == class_index
        gt_difficult = gt["difficult"][gt_mask]
        num_positives += int((~gt_difficult).sum())

        pred = preds_by_key[gt["key"]]
        pred_mask = pred["labels"] == class_index
        scores = pred["scores"][pred_mask]
        # Stable sort keeps ties in input order, matching the global ranking below.
        order = torch.argsort(scores, descending=True, stable=True)
        all_scores.append(scores[order])
        det_boxes = pred["boxes"][pred_mask][order]
        all_outcomes.append(
            _match_image(det_boxes, gt["boxes"][gt_mask], gt_difficult, iou_threshold)
        )

    scores = torch.cat(all_scores) if all_scores else torch.zeros(0)
    outcomes = torch.cat(all_outcomes) if all_outcomes else torch.zeros(0, dtype=torch.int64)
    ranked = outcomes[torch.argsort(scores, descending=True, stable=True)]
    ranked = ranked[ranked != _IGNORED].numpy()

    true_positives = np.cumsum(ranked == _TRUE_POSITIVE)
    false_positives = np.cumsum(ranked == _FALSE_POSITIVE)
    precision = true_positives / np.maximum(true_positives + false_positives, 1)
    recall = true_positives / max(num_positives, 1)
    return precision, recall, num_positives


def evaluate_voc(
    gts: Sequence[Mapping[str, Any]],
    preds: Iterable[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """VOC AP at ``iou_threshold`` per class and averaged, in percent.

    Returns ``AP50`` (all-point, VOC2010+), ``AP50_07`` (11-point, VOC2007)
    - both means over classes with at least one non-difficult GT, NaN if
    there is none - and ``per_class`` (all-point AP per class, NaN for
    classes without non-difficult GT).
    """
    gts = prepare_gts(gts, num_classes)
    preds_by_key = prepare_preds(preds, [gt["key"] for gt in gts], num_classes)

    per_class, per_class_07 = [], []
    for class_index in range(num_classes):
        precision, recall, num_positives = _class_precision_recall(
            gts, preds_by_key, class_index, iou_threshold
        )
        if num_positives == 0:
            per_class.append(math.nan)
            per_class_07.append(math.nan)
            continue
        per_class.append(100.0 * voc_ap(recall, precision))
        per_class_07.append(100.0 * voc_ap(recall, precision, use_07_metric=True))

    def mean_over_defined(values: list[float]) -> float:
        defined = [value for value in values if not math.isnan(value)]
        return float(np.mean(defined)) if defined else math.nan

    return {
        "AP50": mean_over_defined(per_class),
        "AP50_07": mean_over_defined(per_class_07),
        "per_class": per_class,
    }

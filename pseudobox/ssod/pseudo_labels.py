"""Pseudo-labels: the teacher's detections filtered, mapped into the student's view, and watched.

Detections and pseudo-labels are ``list[dict]`` per image with ``boxes [N, 4]`` (xyxy
pixels, float32), ``scores [N]`` and ``labels [N]`` (int64, 0-based), all on one device.
Everything here is tensor code without per-box Python loops or host round trips, so it
runs unchanged on CUDA; the monitor syncs with the host only when asked for a summary or
a warning.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Protocol, Sequence

import torch
from torchvision.ops import box_iou

from pseudobox.ssod.augment import Geometry

PER_BOX_KEYS = ("boxes", "scores", "labels")


def _select(detection: dict, keep: torch.Tensor) -> dict:
    """Index every per-box entry (a tensor whose first dimension is the box count) by ``keep``;
    other entries pass through."""
    n = detection["boxes"].shape[0]
    return {k: v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in detection.items()}


class PseudoLabelFilter(Protocol):
    """The replaceable filter step between the teacher's detections and the student's targets.

    A filter may keep state that changes during training (a GMM's fitted scores, per-class
    dynamic thresholds); it lives in the checkpoint through ``state_dict``/``load_state_dict``.
    """

    def __call__(self, detections: list[dict]) -> list[dict]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ScoreThresholdFilter:
    """Keep the teacher's boxes with ``score >= threshold`` (Unbiased Teacher: 0.7).

    Stateless: ``state_dict()`` is empty. To replace it (per-class dynamic thresholds, a
    GMM on the scores), write a class with the same three methods (``PseudoLabelFilter``):
    ``__call__`` maps detections to pseudo-labels in the same format, and any statistics it
    updates go in ``state_dict()`` so that a resumed run filters exactly as before.
    """

    def __init__(self, threshold: float = 0.7):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"score threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def __call__(self, detections: list[dict]) -> list[dict]:
        return [_select(d, d["scores"] >= self.threshold) for d in detections]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"ScoreThresholdFilter keeps no state, got keys {sorted(state)}")


def map_pseudo_labels(detections: list[dict], geometries: Sequence[Geometry], min_visible: float = 0.0
                      ) -> list[dict]:
    """Teacher detections on the weak views → targets in the strong views.

    Boxes go through each image's ``Geometry`` (clipped to the view); boxes a crop removed
    (or left with less than ``min_visible`` of their area) are dropped, with their scores and
    labels.
    """
    if len(detections) != len(geometries):
        raise ValueError(f"{len(detections)} detections for {len(geometries)} geometries")
    out = []
    for detection, geometry in zip(detections, geometries):
        if geometry.is_identity:
            out.append(dict(detection))
            continue
        boxes, keep = geometry.map_boxes_with_keep(detection["boxes"], min_visible)
        mapped = _select(detection, keep)
        mapped["boxes"] = boxes[keep]
        out.append(mapped)
    return out


def greedy_true_positives(pseudo: list[dict], gt: list[dict], iou_threshold: float = 0.5) -> torch.Tensor:
    """Bool mask per pseudo-label (concatenated over images, in input order): matched a GT box
    of its class at IoU >= ``iou_threshold``, greedily by descending score, each GT at most once
    (the rule of COCO/VOC evaluation). Vectorised over images and classes; the only loop is
    over score rank, up to the largest per-image pseudo-label count."""
    if iou_threshold <= 0:
        raise ValueError("iou_threshold must be > 0")
    counts = [int(p["boxes"].shape[0]) for p in pseudo]
    device = pseudo[0]["boxes"].device if pseudo else torch.device("cpu")
    n_pred, n_gt = max(counts, default=0), max((int(g["boxes"].shape[0]) for g in gt), default=0)
    if n_pred == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    if n_gt == 0:
        return torch.zeros(sum(counts), dtype=torch.bool, device=device)
    iou = torch.zeros(len(pseudo), n_pred, n_gt, device=device)
    orders = []
    for i, (p, g) in enumerate(zip(pseudo, gt)):
        order = torch.argsort(p["scores"], descending=True, stable=True)
        orders.append(order)
        gt_boxes, gt_labels = g["boxes"].to(device), g["labels"].to(device)
        if order.numel() and gt_boxes.shape[0]:
            same_class = p["labels"][order][:, None] == gt_labels[None, :]
            iou[i, :order.numel(), :gt_boxes.shape[0]] = box_iou(p["boxes"][order].float(),
                                                                  gt_boxes.float()) * same_class
    available = torch.ones(len(pseudo), n_gt, dtype=torch.bool, device=device)
    matched = torch.zeros(len(pseudo), n_pred, dtype=torch.bool, device=device)
    rows = torch.arange(len(pseudo), device=device)
    for rank in range(n_pred):
        candidates = torch.where(available, iou[:, rank], torch.full_like(iou[:, rank], -1.0))
        best_iou, best = candidates.max(dim=1)
        hit = best_iou >= iou_threshold
        matched[:, rank] = hit
        available[rows, best] &= ~hit
    # Back to each image's input order.
    out = []
    for i, order in enumerate(orders):
        per_image = torch.empty_like(matched[i, :order.numel()])
        per_image[order] = matched[i, :order.numel()]
        out.append(per_image)
    return torch.cat(out)


def _class_counts(labels: torch.Tensor, num_classes: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class counts (float64 ``[C]``) without a host sync (unlike bincount on CUDA)."""
    values = torch.ones_like(labels, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    return torch.zeros(num_classes, dtype=torch.float64, device=labels.device).scatter_add_(0, labels.long(), values)


class PseudoLabelMonitor:
    """Pseudo-label quality over training: is the teacher helping?

    ``update(pseudo, gt, raw_scores)`` once per step accumulates, per class, the
    pseudo-labels, the GT boxes and the true positives (greedy match at IoU >=
    ``iou_threshold``), plus a histogram of the teacher's raw scores (before filtering).
    ``gt`` is ``None`` when the unlabelled images have no ground truth: then only the counts
    and scores are kept. Accumulators stay on the detections' device; ``summary()`` and
    ``warn_if_empty()`` are the only host syncs.
    """

    def __init__(self, num_classes: int, window: int = 100, iou_threshold: float = 0.5, score_bins: int = 20):
        if num_classes < 1 or window < 1 or score_bins < 1:
            raise ValueError("num_classes, window and score_bins must be >= 1")
        self.num_classes, self.window = int(num_classes), int(window)
        self.iou_threshold, self.score_bins = float(iou_threshold), int(score_bins)
        self._recent: deque = deque(maxlen=self.window)  # per step: (pseudo count, raw hist, raw max, given)
        self.reset()

    def reset(self) -> None:
        """Start new statistics for ``summary()``. The last ``window`` steps that
        ``warn_if_empty`` looks at are kept: reporting periods do not cut the warning window."""
        self.images = 0
        self.images_with_gt = 0
        self.steps = 0
        self._stats: torch.Tensor | None = None  # [4, C]: pseudo, pseudo on GT images, TP, GT
        self._hist: torch.Tensor | None = None   # [bins] raw-score histogram since reset

    def _zeros(self, device: torch.device) -> None:
        if self._stats is None:
            self._stats = torch.zeros(4, self.num_classes, dtype=torch.float64, device=device)
            self._hist = torch.zeros(self.score_bins, dtype=torch.float64, device=device)

    def update(self, pseudo: list[dict], gt: list[dict] | None = None,
               raw_scores: torch.Tensor | Sequence[torch.Tensor] | None = None) -> None:
        """One step: ``pseudo`` (filtered, in the frame of ``gt``), ``gt`` (``boxes``,
        ``labels`` 0-based, per image; or None) and the teacher's unfiltered scores."""
        if gt is not None and len(gt) != len(pseudo):
            raise ValueError(f"{len(pseudo)} pseudo-labelled images but {len(gt)} ground truths")
        if not pseudo:
            return
        device = pseudo[0]["boxes"].device
        self._zeros(device)
        labels = torch.cat([p["labels"].reshape(-1).to(device) for p in pseudo])
        self._stats[0] += _class_counts(labels, self.num_classes)
        self.images += len(pseudo)
        self.steps += 1
        if gt is not None:
            tp = greedy_true_positives(pseudo, gt, self.iou_threshold)
            self._stats[1] += _class_counts(labels, self.num_classes)
            self._stats[2] += _class_counts(labels, self.num_classes, tp)
            gt_labels = torch.cat([g["labels"].reshape(-1).to(device) for g in gt])
            self._stats[3] += _class_counts(gt_labels, self.num_classes)
            self.images_with_gt += len(gt)
        hist, top = torch.zeros_like(self._hist), torch.zeros((), dtype=torch.float64, device=device)
        if raw_scores is not None:
            scores = raw_scores if isinstance(raw_scores, torch.Tensor) else (
                torch.cat([s.reshape(-1).to(device) for s in raw_scores]) if len(raw_scores)
                else torch.zeros(0, device=device))
            scores = scores.reshape(-1).to(device=device, dtype=torch.float64)
            if scores.numel():
                hist = torch.histc(scores.clamp(0.0, 1.0), bins=self.score_bins, min=0.0, max=1.0)
                top = scores.max()
            self._hist += hist
        count = torch.full((), labels.numel(), dtype=torch.float64, device=device)
        self._recent.append((count, hist, top, raw_scores is not None))

    def summary(self) -> dict[str, Any]:
        """Counts, precision/recall (overall and per class; None where undefined) since
        ``reset()``, pseudo-labels per image, and the raw-score histogram."""
        c = self.num_classes
        if self._stats is None:
            stats, hist = [[0.0] * c for _ in range(4)], [0.0] * self.score_bins
        else:
            both = torch.cat([self._stats.reshape(-1), self._hist]).tolist()
            stats = [both[i * c:(i + 1) * c] for i in range(4)]
            hist = both[4 * c:]
        pseudo, judged, tp, n_gt = stats

        def ratio(a: float, b: float) -> float | None:
            return a / b if b > 0 else None

        has_gt = self.images_with_gt > 0
        return {
            "steps": self.steps,
            "images": self.images,
            "images_with_gt": self.images_with_gt,
            "pseudo_labels": int(sum(pseudo)),
            "pseudo_per_image": ratio(sum(pseudo), self.images),
            "precision": ratio(sum(tp), sum(judged)) if has_gt else None,
            "recall": ratio(sum(tp), sum(n_gt)) if has_gt else None,
            "precision_per_class": [ratio(tp[k], judged[k]) if has_gt else None for k in range(c)],
            "recall_per_class": [ratio(tp[k], n_gt[k]) if has_gt else None for k in range(c)],
            "pseudo_per_class": [int(x) for x in pseudo],
            "tp_per_class": [int(x) for x in tp],
            "gt_per_class": [int(x) for x in n_gt],
            "iou_threshold": self.iou_threshold,
            "score_bin_edges": [i / self.score_bins for i in range(self.score_bins + 1)],
            "score_hist": [int(x) for x in hist],
        }

    def warn_if_empty(self) -> str | None:
        """A warning when each of the last ``window`` steps produced no pseudo-label at all
        (mmdetection #10223: a teacher below the threshold everywhere trains the student on
        negatives only), with the raw-score distribution of that window; else None. After a
        warning the window starts afresh, so it repeats at most once per window."""
        if len(self._recent) < self.window:
            return None
        counts, hists, tops, given = zip(*self._recent)
        total = torch.stack(counts).sum()
        hist = torch.stack(hists).sum(0)
        top = torch.stack(tops).max()
        values = torch.cat([total[None], top[None], hist]).tolist()
        if values[0] > 0:
            return None
        self._recent.clear()
        text = f"no pseudo-labels in the last {self.window} steps"
        if not any(given):
            return text + " (no raw teacher scores were given to describe them)"
        hist = values[2:]
        n = sum(hist)
        if n == 0:
            return text + ": the teacher produced no detections at all (before the score filter)"
        quantiles = ", ".join(f"p{int(q * 100)}<={_hist_quantile(hist, q):.2f}" for q in (0.5, 0.9, 0.99))
        return (f"{text}: {int(n)} raw teacher scores, max {values[1]:.3f}, {quantiles}; "
                f"lower the score threshold or lengthen the burn-in")


def _hist_quantile(hist: list[float], q: float) -> float:
    """Upper edge of the histogram bin that holds quantile ``q`` (an upper bound on it)."""
    target, seen = q * sum(hist), 0.0
    for i, count in enumerate(hist):
        seen += count
        if seen >= target and count > 0:
            return (i + 1) / len(hist)
    return 1.0

"""Dense Teacher's unsupervised loss: the teacher's dense FCOS outputs as pseudo-labels.

No NMS, no score threshold. The teacher's post-sigmoid class scores at every position are
the targets; a learning region, the top ``ratio`` of positions by the teacher's maximum
class score over all FPN levels and all images of the batch, keeps the teacher's scores
as soft targets while every other position is pushed to 0 (quality focal loss). The
region also carries a GIoU loss between student and teacher boxes and a BCE between
their centerness branches.

Student and teacher must see pixel-aligned views of the same images (the strong view
photometric only, or replayed with the same geometry) at the same size, so position i
means the same place for both; ``dense_teacher_loss`` checks the shapes match.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from pseudobox.models.detectors import FcosRaw
from pseudobox.ssod.losses import quality_focal_loss


def select_region(scores: torch.Tensor, ratio: float = 0.01) -> torch.Tensor:
    """Bool mask ``[M]`` of the top ⌊ratio·M⌋ rows of ``scores [M, C]`` (post-sigmoid) by
    their maximum over classes, at least one row (none only when M == 0). Ties go to the
    lower index (stable sort), so the region is the same on every run and device."""
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [M, C] with C >= 1, got {tuple(scores.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    m = scores.shape[0]
    mask = torch.zeros(m, dtype=torch.bool, device=scores.device)
    if m == 0:
        return mask
    k = max(1, math.floor(ratio * m))
    order = torch.sort(scores.max(dim=1).values, descending=True, stable=True).indices
    mask[order[:k]] = True
    return mask


def _flat(raw: FcosRaw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All positions of all images as rows: class logits without the background slot
    ``[M, K]``, ltrb regressions ``[M, 4]``, centerness logits ``[M]``, anchors ``[M, 4]``."""
    logits = raw.cls_logits[..., 1:]
    return (logits.reshape(-1, logits.shape[-1]), raw.bbox_regression.reshape(-1, 4),
            raw.bbox_ctrness.reshape(-1), torch.cat(raw.anchors))


def dense_teacher_loss(student: FcosRaw, teacher: FcosRaw, ratio: float = 0.01, *,
                       beta: float = 2.0, min_normaliser: float = 1.0) -> dict[str, torch.Tensor]:
    """Dense Teacher's three unsupervised losses for one batch (unweighted).

    * ``loss_dense_cls``: QFL (``beta``) over every position and class; targets are the
      teacher's scores inside the region, 0 elsewhere; divided by the sum of the region's
      teacher max scores, floored at ``min_normaliser`` so an unconfident teacher cannot
      blow the loss up.
    * ``loss_dense_box``: GIoU loss between student and teacher boxes, mean over the region.
    * ``loss_dense_quality``: BCE of the student's centerness against σ(teacher centerness),
      mean over the region.

    The background slot (column 0 of ``cls_logits``) is not a class: it is left out. The
    teacher side is detached (it may come from ``torch.inference_mode``). The region has at
    least one position, so every term is finite.
    """
    if student.cls_logits.shape != teacher.cls_logits.shape:
        raise ValueError(f"student {tuple(student.cls_logits.shape)} and teacher {tuple(teacher.cls_logits.shape)} "
                         "outputs cover different positions: feed both the same image sizes and resize")
    s_logits, s_deltas, s_quality, s_anchors = _flat(student)
    with torch.no_grad():
        t_logits, t_deltas, t_quality, t_anchors = (t.detach().float() for t in _flat(teacher))
        t_scores = t_logits.sigmoid()
        region = select_region(t_scores, ratio)
        targets = t_scores * region.unsqueeze(1)
        normaliser = t_scores.max(dim=1).values[region].sum().clamp_min(min_normaliser)
        t_boxes = teacher.box_coder.decode(t_deltas[region], t_anchors[region])
        t_quality = t_quality[region].sigmoid()
    s_boxes = student.box_coder.decode(s_deltas[region], s_anchors[region])
    return {
        "loss_dense_cls": quality_focal_loss(s_logits, targets, beta) / normaliser,
        "loss_dense_box": generalized_box_iou_loss(s_boxes, t_boxes, reduction="mean"),
        "loss_dense_quality": F.binary_cross_entropy_with_logits(s_quality[region], t_quality, reduction="mean"),
    }


@torch.no_grad()
def dense_teacher_stats(teacher: FcosRaw, ratio: float = 0.01) -> dict[str, torch.Tensor]:
    """What the learning region looked like (0-dim tensors, no host sync): its size, the
    sum and mean of its teacher max scores, and its lowest score (the effective threshold
    this batch), for logging next to the losses."""
    logits = teacher.cls_logits[..., 1:].detach().float()
    max_scores = logits.reshape(-1, logits.shape[-1]).sigmoid().max(dim=1).values
    region = select_region(max_scores.unsqueeze(1), ratio)
    selected = max_scores[region]
    return {"region_size": region.sum(), "region_score_sum": selected.sum(),
            "region_score_mean": selected.mean(), "region_score_min": selected.min()}

"""Losses of the semi-supervised methods, as plain functions on tensors.

* ``quality_focal_loss``: Generalized Focal Loss's QFL, the soft-target focal loss Dense
  Teacher trains the student's classifier with (teacher scores as targets).
* ``softmax_focal_loss``: Unbiased Teacher's multi-class focal loss on the RoI classifier,
  which counters the foreground/background and class imbalance of pseudo-labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Sum over all elements of BCE(σ(logits), targets) · |targets − σ(logits)|^beta.

    ``logits`` are raw, ``targets`` soft labels in [0, 1], both ``[M, C]``. Unnormalised:
    the caller divides by its own normaliser. The modulating factor is not detached (as in
    GFL and Dense Teacher), so it also carries gradient.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    targets = targets.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    modulation = (targets - logits.sigmoid()).abs().pow(beta)
    return (bce * modulation).sum()


def softmax_focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 1.5) -> torch.Tensor:
    """Mean over the R rows of (1 − p_y)^gamma · CE, with p_y = softmax(logits)[label].

    ``logits [R, K+1]`` (background included), ``labels [R]`` int64. Unbiased Teacher's
    RoI classifier loss (gamma 1.5, no alpha, divided by the number of RoIs). With R == 0
    it is an exact 0 still attached to the graph, never NaN. gamma = 0 is cross-entropy.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    p_label = torch.exp(-ce)
    # The floor keeps the gradient finite for gamma < 1 at p_label == 1 (value unchanged: ce is 0 there).
    return ((1.0 - p_label).clamp_min(1e-12).pow(gamma) * ce).mean()

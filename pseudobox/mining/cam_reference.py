"""The naive per-image reference for ``cam_to_boxes``: scipy labelling and a Python loop
per CAM and component. It defines the expected output in tests and is the baseline the
mining benchmark measures the batched version against."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import nms

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def cam_to_boxes_reference(cam: np.ndarray, thresholds=(0.2, 0.3, 0.4, 0.5), nms_iou: float = 0.8,
                           min_component_ratio: float = 0.5, max_components: int = 4,
                           min_side: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One ``[H, W]`` CAM → ``(boxes [N, 4], scores [N])``, same conventions as ``cam_to_boxes``."""
    cam = cam.astype(np.float64)
    lo, hi = cam.min(), cam.max()
    norm = (cam - lo) / max(hi - lo, 1e-12)
    h, w = norm.shape
    boxes, scores = [], []
    for tau in thresholds:
        labels, n = ndimage.label(norm > tau, structure=EIGHT_CONNECTED)
        if n == 0:
            continue
        areas = [int((labels == k).sum()) for k in range(1, n + 1)]
        masses = [norm[labels == k].sum() for k in range(1, n + 1)]
        largest = max(areas)
        ranked = sorted(range(1, n + 1), key=lambda k: (-areas[k - 1], -masses[k - 1]))
        ranked = [k for k in ranked if areas[k - 1] >= min_component_ratio * largest][:max_components]
        for k in ranked:
            ys, xs = np.nonzero(labels == k)
            m = norm[ys, xs]
            cx, cy = xs + 0.5, ys + 0.5
            xc, yc = (m * cx).sum() / m.sum(), (m * cy).sum() / m.sum()
            bw = max(np.sqrt(12 * (m * (cx - xc) ** 2).sum() / m.sum()), min_side)
            bh = max(np.sqrt(12 * (m * (cy - yc) ** 2).sum() / m.sum()), min_side)
            boxes.append([np.clip(xc - bw / 2, 0, w), np.clip(yc - bh / 2, 0, h),
                          np.clip(xc + bw / 2, 0, w), np.clip(yc + bh / 2, 0, h)])
            scores.append(m.mean())
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    b = torch.tensor(boxes, dtype=torch.float32)
    s = torch.tensor(scores, dtype=torch.float32)
    keep = nms(b, s, nms_iou)
    return b[keep].numpy(), s[keep].numpy()

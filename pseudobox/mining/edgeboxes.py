"""EdgeBoxes (Zitnick & Dollár, ECCV 2014): class-agnostic box proposals from edges.

Two public steps, both batched torch on the input's device:

``edge_maps(images) -> (E, O)``
    Thinned edge magnitude and edge-normal orientation in [0, π). The default detector
    (``GradientEdges``) takes, per pixel, the colour channel with the strongest gradient
    of the triangle-smoothed image; any callable with the ``EdgeDetector`` signature can
    replace it (the structured-forest model of the paper can't be downloaded here).
    Thinning is non-maximum suppression along the orientation.

``edge_boxes(E, O, max_boxes=1000, **params) -> [(boxes [N, 4] xyxy, scores [N])]``
    The box search, with OpenCV's defaults (``EdgeBoxesConfig``). Boxes are in pixels:
    a box whose edge pixels span columns x..x+w is ``[x, y, x + w, y + h]``, the same
    frame as OpenCV's ``getBoundingBoxes`` after removing its +1 offset
    (``opencv_edge_boxes``).

The paper's greedy, per-box parts are reformulated for parallel hardware
(docs/methods.md, "EdgeBoxes"):

* edge groups: connected components of 8-neighbour edge pixels whose orientations
  differ by less than ``link_orientation`` (in units of π), cut by a ``group_tile``
  grid, instead of growing each chain until its summed orientation change passes
  ``edge_merge_thr``; small groups (magnitude ≤ ``cluster_min_mag``) are merged into
  the neighbour of most similar orientation, as in the paper;
* straddling weight w_b: the paper's max-product path weight from the groups that
  cross a box's border is replaced by the bottleneck (max-min) path weight, averaged
  over ``affinity_levels`` thresholds: at each level the groups linked by affinity ≥ τ
  form contours, and a contour counts for a box only when it lies strictly inside. A
  box's score is then a sum over contours, which for all windows of one size is one
  scatter into a difference image and two cumulative sums;
* window search: every pixel position of OpenCV's α-step window sizes is scored and
  the best position within each α-step cell is kept; the greedy side refinement runs
  batched over all candidates (both trial moves scored together), then β-NMS.

``backend`` = auto | torch | opencv: auto runs the torch search on CUDA and OpenCV's
C++ implementation (``cv2.ximgproc``) on CPU, which measured about 10× faster per core
there (benchmarks/edgeboxes.py; docs/benchmarks.md). Edge maps are torch on both.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou

from pseudobox.config import require

BACKENDS = ("auto", "torch", "opencv")


@dataclass
class EdgeBoxesConfig:
    """EdgeBoxes parameters: OpenCV's ``createEdgeBoxes`` defaults, plus the knobs of the
    parallel reformulation (module docstring) and the backend."""

    alpha: float = 0.65            # step of the sliding window (IoU between neighbouring windows)
    beta: float = 0.75             # NMS IoU
    eta: float = 1.0               # NMS threshold decay per kept box (1 = none)
    min_score: float = 0.01
    max_boxes: int = 1000
    edge_min_mag: float = 0.1      # edge pixels: magnitude above this
    edge_merge_thr: float = 0.5    # OpenCV's summed orientation change of a group (units of π)
    cluster_min_mag: float = 0.5   # groups with less magnitude merge into a neighbour
    max_aspect_ratio: float = 3.0
    min_box_area: float = 1000.0
    gamma: float = 2.0             # affinity exponent
    kappa: float = 1.5             # perimeter normalisation exponent
    # parallel reformulation (torch backend)
    group_tile: int = 8            # edge groups never span two cells of this grid (pixels)
    link_orientation: float = 0.125  # max orientation change between linked pixels (units of π)
    affinity_levels: int = 4       # thresholds averaged for the soft straddling weight
    refine: bool = True            # greedy side refinement of the candidates ...
    refine_top: int = 0            # ... the best this many per image (0 = all, as OpenCV)
    cell_best: bool = True         # a window's best position in its α-step cell (else the cell's start)
    backend: str = "auto"

    def validate(self) -> None:
        require(0 < self.alpha < 1, "edgebox.alpha must be in (0, 1)")
        require(0 < self.beta <= 1, "edgebox.beta must be in (0, 1]")
        require(0 < self.eta <= 1, "edgebox.eta must be in (0, 1]")
        require(self.min_score >= 0, "edgebox.min_score must be >= 0")
        require(self.max_boxes >= 1, "edgebox.max_boxes must be >= 1")
        require(self.edge_min_mag >= 0, "edgebox.edge_min_mag must be >= 0")
        require(0 < self.edge_merge_thr <= 1, "edgebox.edge_merge_thr must be in (0, 1]")
        require(self.cluster_min_mag >= 0, "edgebox.cluster_min_mag must be >= 0")
        require(self.max_aspect_ratio >= 1, "edgebox.max_aspect_ratio must be >= 1")
        require(self.min_box_area >= 16, "edgebox.min_box_area must be >= 16 (pixels)")
        require(self.gamma > 0, "edgebox.gamma must be > 0")
        require(self.kappa >= 0, "edgebox.kappa must be >= 0")
        require(self.group_tile >= 2, "edgebox.group_tile must be >= 2 (pixels)")
        require(0 < self.link_orientation <= 0.5, "edgebox.link_orientation must be in (0, 0.5]")
        require(self.refine_top >= 0, "edgebox.refine_top must be >= 0 (0 = all)")
        require(self.affinity_levels >= 1, "edgebox.affinity_levels must be >= 1")
        require(self.backend in BACKENDS, f"edgebox.backend must be one of {BACKENDS}, got {self.backend!r}")


def make_config(max_boxes: int | None = None, **params) -> EdgeBoxesConfig:
    """``EdgeBoxesConfig`` from keyword parameters (unknown names fail, naming the key)."""
    known = {f.name for f in fields(EdgeBoxesConfig)}
    unknown = sorted(set(params) - known)
    require(not unknown, f"unknown EdgeBoxes parameters: {unknown}")
    cfg = EdgeBoxesConfig(**params)
    if max_boxes is not None:
        cfg.max_boxes = int(max_boxes)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- edge maps


class EdgeDetector(Protocol):
    """Images ``[B, 3, H, W]`` in [0, 1] → (magnitude ``[B, H, W]`` in [0, 1], orientation
    ``[B, H, W]`` of the edge normal in [0, π)), before thinning."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _triangle_weights(radius: int) -> list[float]:
    k = [float(i) for i in range(1, radius + 2)] + [float(i) for i in range(radius, 0, -1)]
    return [v / sum(k) for v in k]


def triangle_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable triangle filter over the last two dims (replicate padding), as weighted
    sums of shifted views (faster than a depthwise convolution on CPU); radius 0 = identity."""
    if radius <= 0:
        return x
    k = _triangle_weights(radius)
    h, w = x.shape[-2:]
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w)
    p = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    y = sum(k[i] * p[..., :, i:i + w] for i in range(2 * radius + 1))
    p = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = sum(k[i] * p[..., i:i + h, :] for i in range(2 * radius + 1))
    return y.reshape(*lead, h, w)


@dataclass
class GradientEdges:
    """Default ``EdgeDetector``: per pixel, the gradient of the colour channel where it is
    strongest, on the triangle-smoothed image. Central differences; the magnitude is
    scaled by ``gain`` and clipped to [0, 1] (a step of contrast ≥ 0.9 reaches 1 with the
    defaults), then smoothed by a small triangle so that thinning sees one ridge per edge."""

    smooth_radius: int = 2
    gain: float = 4.0
    mag_smooth_radius: int = 1

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = triangle_blur(images.float(), self.smooth_radius)
        xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
        best_gx = best_gy = best_m2 = None
        for c in range(x.shape[1]):  # channels one at a time: contiguous maps, no strided argmax
            ch = xp[:, c]
            gx = (ch[:, 1:-1, 2:] - ch[:, 1:-1, :-2]) * 0.5
            gy = (ch[:, 2:, 1:-1] - ch[:, :-2, 1:-1]) * 0.5
            m2 = gx * gx + gy * gy
            if best_m2 is None:
                best_gx, best_gy, best_m2 = gx, gy, m2
            else:
                stronger = m2 > best_m2
                best_gx = torch.where(stronger, gx, best_gx)
                best_gy = torch.where(stronger, gy, best_gy)
                best_m2 = torch.maximum(m2, best_m2)
        mag = (best_m2.sqrt() * self.gain).clamp_(max=1.0)
        mag = triangle_blur(mag, self.mag_smooth_radius)
        orientation = torch.remainder(torch.atan2(best_gy, best_gx), math.pi)
        return mag, orientation


def thin_edges(mag: torch.Tensor, orientation: torch.Tensor, border: int = 1) -> torch.Tensor:
    """Non-maximum suppression along the edge normal: a pixel keeps its magnitude only if
    it exceeds the bilinearly interpolated neighbour one pixel ahead along ``orientation``
    and is at least the one behind; ``border`` pixels at the image edge are zeroed."""
    _, h, w = mag.shape
    ys = torch.arange(h, device=mag.device, dtype=mag.dtype).view(1, h, 1)
    xs = torch.arange(w, device=mag.device, dtype=mag.dtype).view(1, 1, w)
    dx, dy = torch.cos(orientation), torch.sin(orientation)
    src = mag[:, None]
    keep = torch.ones_like(mag, dtype=torch.bool)
    for sign in (1.0, -1.0):
        gx = (xs + sign * dx) * (2.0 / max(w - 1, 1)) - 1.0
        gy = (ys + sign * dy) * (2.0 / max(h - 1, 1)) - 1.0
        neighbour = F.grid_sample(src, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border",
                                  align_corners=True)[:, 0]
        # strict on one side: a two-pixel plateau (a step between pixels) keeps one pixel
        # (1e-5: grid_sample's coordinate round trip is not exact)
        keep &= (mag > neighbour + 1e-5) if sign > 0 else (mag >= neighbour - 1e-5)
    out = mag * keep
    if border > 0:
        out[:, :border], out[:, -border:], out[:, :, :border], out[:, :, -border:] = 0, 0, 0, 0
    return out


def edge_maps(images: torch.Tensor, detector: EdgeDetector | Callable | None = None,
              thin: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images ``[B, 3, H, W]`` in [0, 1] → (E, O): ``[B, H, W]`` float32 on the
    images' device; E the thinned edge magnitude, O the edge-normal orientation in [0, π)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"edge_maps takes images [B, 3, H, W], got {tuple(images.shape)}")
    with torch.inference_mode():
        mag, orientation = (detector or GradientEdges())(images)
        mag, orientation = mag.float(), orientation.float()
        if thin:
            mag = thin_edges(mag, orientation)
    return mag.contiguous(), orientation.contiguous()


# ---------------------------------------------------------------- graph helpers


def connected_components(num_nodes: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Component of every node of an undirected graph: the smallest node index in it.

    Min-label hooking with pointer jumping: each round, every node's root takes the
    smallest label among the root's members' neighbours, then all nodes jump to their
    root; O(log n) rounds in practice, each a few scatters over the edges."""
    label = torch.arange(num_nodes, device=src.device)
    if src.numel() == 0:
        return label
    a = torch.cat([src, dst])
    b = torch.cat([dst, src])
    while True:
        lowest = label.clone().scatter_reduce_(0, a, label[b], reduce="amin")
        parent = label.clone().scatter_reduce_(0, label, lowest, reduce="amin")
        parent = torch.minimum(parent, lowest)
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
        if torch.equal(parent, label):
            return label
        label = parent


def _orientation_change(o1: torch.Tensor, o2: torch.Tensor) -> torch.Tensor:
    """Angle between two orientations in [0, π), in units of π, in [0, 0.5]."""
    v = (o1 - o2).abs() / math.pi
    return torch.minimum(v, 1.0 - v)


# ---------------------------------------------------------------- edge groups and contours


@dataclass
class Contours:
    """Per-level contours of all images of a batch, flattened: strict pixel extents, the
    magnitude each contributes (already divided by the number of levels) and its image."""

    x0: torch.Tensor
    y0: torch.Tensor
    x1: torch.Tensor
    y1: torch.Tensor
    mag: torch.Tensor
    image: torch.Tensor


_HALF_NEIGHBOURS = ((0, 1), (1, -1), (1, 0), (1, 1))


def edge_groups(E: torch.Tensor, O: torch.Tensor, cfg: EdgeBoxesConfig):
    """Group edge pixels (module docstring); returns the group label image ``[B, H, W]``
    (−1 where no group) and per group: image, magnitude, mean x, mean y, mean orientation
    and pixel extents (x0, y0, x1, y1)."""
    b, h, w = E.shape
    device = E.device
    valid = E > cfg.edge_min_mag
    valid[:, 0], valid[:, -1], valid[:, :, 0], valid[:, :, -1] = False, False, False, False
    flat_valid = valid.flatten()
    pix = flat_valid.nonzero().squeeze(1)
    n = pix.numel()
    index = torch.full((b * h * w,), -1, dtype=torch.int64, device=device)
    index[pix] = torch.arange(n, device=device)
    index = index.view(b, h, w)
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    tile = (ys // cfg.group_tile) * ((w + cfg.group_tile - 1) // cfg.group_tile) + xs // cfg.group_tile
    tile = tile.expand(b, h, w)
    # 8-neighbour pairs of edge pixels (each once), with their orientation change
    pa, pb, linked = [], [], []
    for dy, dx in _HALF_NEIGHBOURS:
        ya, yb = slice(0, h - dy), slice(dy, h)
        xa, xb = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        both = valid[:, ya, xa] & valid[:, yb, xb]
        ia, ib = index[:, ya, xa][both], index[:, yb, xb][both]
        same_tile = (tile[:, ya, xa] == tile[:, yb, xb])[both]
        change = _orientation_change(O[:, ya, xa][both], O[:, yb, xb][both])
        pa.append(ia)
        pb.append(ib)
        linked.append(same_tile & (change <= cfg.link_orientation))
    pa, pb, linked = torch.cat(pa), torch.cat(pb), torch.cat(linked)
    label = connected_components(n, pa[linked], pb[linked])
    mags = E.flatten()[pix]
    orients = O.flatten()[pix]
    group_mag = torch.zeros(n, device=device).index_add_(0, label, mags)
    # small groups: pixels join the neighbouring group of most similar orientation
    assigned = group_mag[label] > cfg.cluster_min_mag
    label = torch.where(assigned, label, torch.full_like(label, -1))
    if not bool(assigned.all()) and pa.numel():
        src, dst = torch.cat([pa, pb]), torch.cat([pb, pa])
        change = _orientation_change(orients[src], orients[dst])
        key_change = (change * 1e6).long()
        for _ in range(64):
            cand = (label[src] < 0) & (label[dst] >= 0)
            if not bool(cand.any()):
                break
            key = key_change[cand] * (n + 1) + label[dst][cand]
            best = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
            best.scatter_reduce_(0, src[cand], key, reduce="amin")
            took = (label < 0) & (best < torch.iinfo(torch.int64).max)
            label = torch.where(took, best % (n + 1), label)
    keep = label >= 0
    pix, label, mags, orients = pix[keep], label[keep], mags[keep], orients[keep]
    roots, gid = torch.unique(label, return_inverse=True)
    g = roots.numel()
    img = pix // (h * w)
    y = (pix // w) % h
    x = pix % w
    group_image = torch.zeros(g, dtype=torch.int64, device=device).scatter_reduce_(0, gid, img, "amax",
                                                                                     include_self=False)
    gm = torch.zeros(g, device=device).index_add_(0, gid, mags)
    mx = torch.zeros(g, device=device).index_add_(0, gid, mags * x) / gm
    my = torch.zeros(g, device=device).index_add_(0, gid, mags * y) / gm
    oc = torch.zeros(g, device=device).index_add_(0, gid, mags * torch.cos(2 * orients))
    os_ = torch.zeros(g, device=device).index_add_(0, gid, mags * torch.sin(2 * orients))
    mo = torch.atan2(os_, oc) / 2
    big = torch.iinfo(torch.int64).max
    ext = [torch.full((g,), big if red == "amin" else -1, dtype=torch.int64, device=device)
           .scatter_reduce_(0, gid, v, red) for v, red in ((x, "amin"), (y, "amin"), (x, "amax"), (y, "amax"))]
    label_image = torch.full((b * h * w,), -1, dtype=torch.int64, device=device)
    label_image[pix] = gid
    return label_image.view(b, h, w), group_image, gm, mx, my, mo, ext


def group_affinities(label_image: torch.Tensor, mx, my, mo, gamma: float, radius: int = 2):
    """Pairs of groups with pixels within ``radius`` (Chebyshev) of each other, and their
    affinity |cos(θi − θij)·cos(θj − θij)|^γ, θij the normal of the line joining the groups'
    mean positions."""
    _, h, w = label_image.shape
    pairs = []
    for dy in range(radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx <= 0:
                continue
            ya, yb = slice(0, h - dy), slice(dy, h)
            xa, xb = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
            la, lb = label_image[:, ya, xa], label_image[:, yb, xb]
            m = (la >= 0) & (lb >= 0) & (la != lb)
            la, lb = la[m], lb[m]
            pairs.append(torch.stack([torch.minimum(la, lb), torch.maximum(la, lb)], 1))
    pairs = torch.cat(pairs)
    g = mx.numel()
    if pairs.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=label_image.device)
        return empty, empty, torch.zeros(0, device=label_image.device)
    code = torch.unique(pairs[:, 0] * g + pairs[:, 1])
    i, j = code // g, code % g
    theta = torch.atan2(my[i] - my[j], mx[i] - mx[j]) + math.pi / 2
    aff = (torch.cos(mo[i] - theta) * torch.cos(mo[j] - theta)).abs().pow(gamma)
    return i, j, aff


def contours(E: torch.Tensor, O: torch.Tensor, cfg: EdgeBoxesConfig) -> Contours:
    """Edge groups → per-level contours (groups linked by affinity ≥ τ, τ the centres of
    ``affinity_levels`` equal bins of (0, 1], and never below OpenCV's 0.05 cut-off)."""
    label_image, group_image, gm, mx, my, mo, (gx0, gy0, gx1, gy1) = edge_groups(E, O, cfg)
    i, j, aff = group_affinities(label_image, mx, my, mo, cfg.gamma)
    g = gm.numel()
    levels = cfg.affinity_levels
    parts = {k: [] for k in ("x0", "y0", "x1", "y1", "mag", "image")}
    big = torch.iinfo(torch.int64).max
    for level in range(levels):
        tau = max((level + 0.5) / levels, 0.05)
        strong = aff >= tau
        comp = connected_components(g, i[strong], j[strong])
        roots, cid = torch.unique(comp, return_inverse=True)
        c = roots.numel()
        for key, v, red, init in (("x0", gx0, "amin", big), ("y0", gy0, "amin", big),
                                  ("x1", gx1, "amax", -1), ("y1", gy1, "amax", -1)):
            parts[key].append(torch.full((c,), init, dtype=torch.int64, device=E.device).scatter_reduce_(0, cid, v, red))
        parts["mag"].append(torch.zeros(c, device=E.device).index_add_(0, cid, gm) / levels)
        parts["image"].append(group_image[roots])
    cat = {k: torch.cat(v) for k, v in parts.items()}
    # A contour found at several levels (an isolated group is one at every level) counts
    # once with its summed share: fewer contours for every box to test.
    keys = torch.stack([cat[k] for k in ("image", "x0", "y0", "x1", "y1")], 1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    mag = torch.zeros(unique.shape[0], device=E.device).index_add_(0, inverse, cat["mag"])
    return Contours(x0=unique[:, 1], y0=unique[:, 2], x1=unique[:, 3], y1=unique[:, 4], mag=mag, image=unique[:, 0])


# ---------------------------------------------------------------- window search


def window_sizes(h: int, w: int, cfg: EdgeBoxesConfig) -> list[tuple[int, int, int, int]]:
    """OpenCV's sliding-window grid: (box h, box w, y step, x step) per scale and aspect."""
    sx_step = math.sqrt(1 / cfg.alpha)
    ay_step = (1 + cfg.alpha) / (2 * cfg.alpha)
    xy_ratio = (1 - cfg.alpha) / (1 + cfg.alpha)
    min_size = math.sqrt(cfg.min_box_area)
    ay_rad = int(math.log(cfg.max_aspect_ratio) / math.log(ay_step * ay_step))
    sx_num = math.ceil(math.log(max(w, h) / min_size) / math.log(sx_step))
    out = []
    for s in range(sx_num):
        for a in range(2 * ay_rad + 1):
            ay = ay_step ** (a - ay_rad)
            sx = min_size * sx_step ** s
            bh, bw = int(sx / ay), int(sx * ay)
            out.append((bh, bw, max(2, int(bh * xy_ratio)), max(2, int(bw * xy_ratio))))
    return out


def _pad_per_image(per_image: list) -> list[torch.Tensor]:
    """Per-image contour tensors → ``[B, Cmax]`` each; padding lies outside every box."""
    cmax = max(1, max(len(p[-1]) for p in per_image))
    out = []
    for j, fill in enumerate((-1, -1, 1 << 14, 1 << 14, 0.0)):  # never strictly inside a box
        ref = per_image[0][j]
        t = torch.full((len(per_image), cmax), fill, dtype=ref.dtype, device=ref.device)
        for i, p in enumerate(per_image):
            t[i, : len(p[j])] = p[j]
        out.append(t)
    return out


class _Scorer:
    """Scores boxes of one batch: contour magnitude strictly inside, minus the edge
    magnitude in the central half, over (w/2 + h/2)^κ (OpenCV's scale; boxes are integer
    (x0, y0, x1, y1) with x1 = x0 + w, clamped to the image)."""

    def __init__(self, E: torch.Tensor, c: Contours, cfg: EdgeBoxesConfig, padded: bool = False):
        self.b, self.h, self.w = E.shape
        self.cfg, self.c = cfg, c
        mag = torch.where(E > cfg.edge_min_mag, E, torch.zeros_like(E))
        self.integral = F.pad(mag.cumsum(1).cumsum(2), (1, 0, 1, 0))  # [B, H+1, W+1]
        # (w/2 + h/2)^−κ for every half-perimeter a box of this image can have
        self.norm_table = torch.arange(self.h + self.w + 2, device=E.device).clamp_min(1).float().pow(-cfg.kappa)
        order = torch.argsort(c.image, stable=True)
        counts = torch.bincount(c.image, minlength=self.b).tolist()
        small = torch.int16 if max(self.h, self.w) < 32000 else torch.int32  # less memory per comparison
        self.coord_dtype = small
        cols = [v[order].to(small).split(counts) for v in (c.x0, c.y0, c.x1, c.y1)] + [c.mag[order].split(counts)]
        self.per_image = list(zip(*cols))
        self.padded = None if E.device.type == "cpu" and not padded else _pad_per_image(self.per_image)

    def _box_sum(self, img, y0, x0, y1, x1):
        """Sum of thresholded magnitude over inclusive pixel ranges (broadcasting)."""
        ii = self.integral
        return ii[img, y1 + 1, x1 + 1] - ii[img, y0, x1 + 1] - ii[img, y1 + 1, x0] + ii[img, y0, x0]

    def _central_and_norm(self, img, y0, x0, y1, x1):
        bh, bw = (y1 - y0) // 2, (x1 - x0) // 2
        y0m, x0m = y0 + bh // 2, x0 + bw // 2
        central = self._box_sum(img, y0m, x0m, y0m + bh, x0m + bw)
        return central, self.norm_table[bw + bh]

    def dense(self, bh: int, bw: int, ky: int, kx: int):
        """All windows of one size, one candidate per α-step cell (its best position):
        (scores [B, ny, nx], y0, x0) with y0/x0 ``[B, ny, nx]`` integer positions."""
        b, h, w, c = self.b, self.h, self.w, self.c
        dev = self.integral.device
        # contour strictly inside [x0, x0+bw] ⇔ x0 ∈ [x1c − bw + 1, x0c − 1] (same for y)
        lx, hx = (c.x1 - bw + 1).clamp_min(0), c.x0 - 1
        ly, hy = (c.y1 - bh + 1).clamp_min(0), c.y0 - 1
        ok = (lx <= hx) & (ly <= hy)
        diff = torch.zeros(b, h + 1, w + 1, device=dev)
        if bool(ok.any()):
            im, m = c.image[ok], c.mag[ok]
            lx, hx, ly, hy = lx[ok], hx[ok] + 1, ly[ok], hy[ok] + 1
            for yy, xx, sign in ((ly, lx, 1.0), (ly, hx, -1.0), (hy, lx, -1.0), (hy, hx, 1.0)):
                diff.index_put_((im, yy, xx), m * sign, accumulate=True)
        # OpenCV's starts: y = 0, ky, 2ky, ... while y < h − bh + ky (none if that is ≤ 0);
        # every position of a start's α-step cell is scored and the best one kept
        ny, nx = max(0, -(-(h - bh + ky) // ky)), max(0, -(-(w - bw + kx) // kx))
        if ny == 0 or nx == 0:
            return None
        limit_y, limit_x = min(h, ny * ky), min(w, nx * kx)
        inside = diff.cumsum(1).cumsum(2)[:, :limit_y, :limit_x]
        y0 = torch.arange(limit_y, device=dev)
        x0 = torch.arange(limit_x, device=dev)
        y1 = (y0 + bh).clamp(max=h - 1)
        x1 = (x0 + bw).clamp(max=w - 1)
        hh, hw = (y1 - y0) // 2, (x1 - x0) // 2
        y0m, x0m = y0 + hh // 2, x0 + hw // 2
        ii = self.integral
        rows_lo, rows_hi = ii.index_select(1, y0m), ii.index_select(1, y0m + hh + 1)
        central = (rows_hi.index_select(2, x0m + hw + 1) - rows_lo.index_select(2, x0m + hw + 1)
                   - rows_hi.index_select(2, x0m) + rows_lo.index_select(2, x0m))
        score = (inside - central) * self.norm_table[hh.view(-1, 1) + hw.view(1, -1)]
        if self.cfg.cell_best:
            score = F.pad(score, (0, nx * kx - limit_x, 0, ny * ky - limit_y), value=-math.inf)
            best, arg = F.max_pool2d(score[:, None], (ky, kx), stride=(ky, kx), return_indices=True)
            best, arg = best[:, 0], arg[:, 0]
            return best, arg // (nx * kx), arg % (nx * kx)
        grid = score[:, ::ky, ::kx]  # OpenCV's own starts
        ys = (torch.arange(grid.shape[1], device=dev) * ky).view(1, -1, 1).expand_as(grid)
        xs = (torch.arange(grid.shape[2], device=dev) * kx).view(1, 1, -1).expand_as(grid)
        return grid, ys, xs

    def _clamp(self, box: torch.Tensor) -> torch.Tensor:
        box = box.clone()
        box[:, 0::2] = box[:, 0::2].clamp(0, self.w - 1)
        box[:, 1::2] = box[:, 1::2].clamp(0, self.h - 1)
        return box

    def _inside(self, img, box, side: int | None = None, values: tuple = ()) -> list[torch.Tensor]:
        """Contour magnitude strictly inside each box (``box`` ``[K, 4]`` clamped integers).
        With ``side``, one result per entry of ``values`` (``[K]`` each): the box with that
        side moved there, sharing the test of the other three sides. Each box is compared
        with every contour of its image, in chunks of about 2^22 comparisons: per image on
        the CPU; on other devices all images at once, contours padded per image and
        gathered per box (no per-image loop, no host sync)."""
        moved = [] if side is None else [v.to(self.coord_dtype) for v in values]
        out = [torch.zeros(img.numel(), device=img.device) for _ in (moved or [None])]
        box = box.to(self.coord_dtype)
        if self.padded is not None:
            *sides, mag = self.padded
            step = max(1, (1 << 24) // max(1, mag.shape[1]))
            for lo in range(0, img.numel(), step):
                k = slice(lo, lo + step)
                i = img[k]
                self._sums(out, k, box[k], [v[k] for v in moved], side, [t[i] for t in sides], mag[i])
            return out
        order = torch.argsort(img, stable=True)
        counts = torch.bincount(img, minlength=self.b).tolist()
        start = 0
        for i, n in enumerate(counts):
            *sides, mag = self.per_image[i]
            if n and mag.numel():
                step = max(1, (1 << 22) // mag.numel())
                for lo in range(start, start + n, step):
                    k = order[lo:min(lo + step, start + n)]
                    self._sums(out, k, box[k], [v[k] for v in moved], side, sides, mag)
            start += n
        return out

    @staticmethod
    def _sums(out, k, box, moved, side, contour_sides, mag):
        """``out[j][k]`` = magnitude of the contours strictly inside ``box`` (with ``side`` at
        ``moved[j]``); contour tensors are ``[C]`` (one image) or ``[len(k), C]`` (gathered)."""

        def test(which, value):  # sides 0, 1 lie before the contour, sides 2, 3 after it
            c = contour_sides[which]
            return value[:, None] < c if which < 2 else c < value[:, None]

        fixed = None
        for which in range(4):
            if which != side:
                t = test(which, box[:, which])
                fixed = t if fixed is None else fixed.logical_and_(t)
        masks = [fixed] if side is None else [test(side, v).logical_and_(fixed) for v in moved]
        for o, m in zip(out, masks):
            o[k] = m.to(mag.dtype) @ mag if mag.dim() == 1 else (m.to(mag.dtype) * mag).sum(1)

    def _finish(self, img, box, inside):
        central, norm = self._central_and_norm(img, box[:, 1], box[:, 0], box[:, 3], box[:, 2])
        return (inside - central) * norm

    def score(self, img, box) -> torch.Tensor:
        """Scores of arbitrary boxes ``[K, 4]`` (x0, y0, x1, y1) integers, clamped like OpenCV."""
        box = self._clamp(box)
        return self._finish(img, box, self._inside(img, box)[0])

    def side_trials(self, img, box, side: int, values: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(clamped box, score) for ``box`` with ``side`` moved to each of ``values``."""
        box = self._clamp(box)
        lim = self.w - 1 if side in (0, 2) else self.h - 1
        values = tuple(v.clamp(0, lim) for v in values)
        insides = self._inside(img, box, side, values)
        out = []
        for v, inside in zip(values, insides):
            trial = box.clone()
            trial[:, side] = v
            out.append((trial, self._finish(img, trial, inside)))
        return out


def _refine(scorer: _Scorer, img, box, score, xy_ratio: float):
    """OpenCV's greedy side search, batched: per halving step and side, try moving the
    side out and in by the step; keep the outward move if it scores higher, else the
    inward one if it does. ``box`` is ``[K, 4]`` (x0, y0, x1, y1) integers."""
    box = box.clone()
    ystep = ((box[:, 3] - box[:, 1]).float() * xy_ratio).long()
    xstep = ((box[:, 2] - box[:, 0]).float() * xy_ratio).long()
    active = torch.ones_like(score, dtype=torch.bool)
    while True:
        ystep, xstep = ystep // 2, xstep // 2
        active &= ~((ystep <= 2) & (xstep <= 2))
        if not bool(active.any()):
            return box, score
        ystep, xstep = ystep.clamp_min(1), xstep.clamp_min(1)
        idx = active.nonzero().squeeze(1)
        for side, step, out_sign in ((1, ystep, -1), (3, ystep, 1), (0, xstep, -1), (2, xstep, 1)):
            cur, cur_s = box[idx], score[idx]
            move = out_sign * step[idx]
            (out_box, s_out), (in_box, s_in) = scorer.side_trials(img[idx], cur, side,
                                                                   (cur[:, side] + move, cur[:, side] - move))
            s_out = torch.where(s_out < scorer.cfg.min_score, torch.zeros_like(s_out), s_out)
            s_in = torch.where(s_in < scorer.cfg.min_score, torch.zeros_like(s_in), s_in)
            take_out = s_out > cur_s
            take_in = ~take_out & (s_in > cur_s)
            box[idx] = torch.where(take_out[:, None], out_box, torch.where(take_in[:, None], in_box, cur))
            score[idx] = torch.where(take_out, s_out, torch.where(take_in, s_in, cur_s))


def _nms_with_decay(boxes: torch.Tensor, scores: torch.Tensor, beta: float, eta: float, max_boxes: int):
    """Greedy NMS whose threshold shrinks by ``eta`` after every kept box while above 0.5
    (OpenCV's adaptive NMS); sequential, used only when eta < 1."""
    order = torch.argsort(scores, descending=True)
    boxes, scores = boxes[order], scores[order]
    iou = box_iou(boxes, boxes)
    kept, thr = [], beta
    for i in range(boxes.shape[0]):
        if len(kept) >= max_boxes:
            break
        if not kept or bool((iou[i, kept] <= thr).all()):
            kept.append(i)
            if thr > 0.5:
                thr *= eta
    kept = torch.as_tensor(kept, dtype=torch.int64, device=boxes.device)
    return boxes[kept], scores[kept]


def _torch_edge_boxes(E: torch.Tensor, O: torch.Tensor, cfg: EdgeBoxesConfig):
    b, h, w = E.shape
    dev = E.device
    c = contours(E, O, cfg)
    scorer = _Scorer(E, c, cfg)
    xy_ratio = (1 - cfg.alpha) / (1 + cfg.alpha)
    cand_img, cand_box, cand_score = [], [], []
    for bh, bw, ky, kx in window_sizes(h, w, cfg):
        found = scorer.dense(bh, bw, ky, kx)
        if found is None:
            continue
        best, y0, x0 = found
        keep = best >= max(cfg.min_score, 1e-12)
        img = torch.arange(b, device=dev).view(b, 1, 1).expand_as(best)[keep]
        y0, x0 = y0[keep], x0[keep]
        cand_img.append(img)
        cand_box.append(torch.stack([x0, y0, (x0 + bw).clamp(max=w - 1), (y0 + bh).clamp(max=h - 1)], 1))
        cand_score.append(best[keep])
    if not cand_img:  # the image is smaller than the smallest window
        empty = (torch.zeros(0, 4, device=dev), torch.zeros(0, device=dev))
        return [empty for _ in range(b)]
    img, box, score = torch.cat(cand_img), torch.cat(cand_box), torch.cat(cand_score)
    if cfg.refine and score.numel():
        todo = torch.arange(score.numel(), device=dev)
        if cfg.refine_top:
            # rank within image: sort by score, then stably by image
            order = torch.argsort(score, descending=True)
            order = order[torch.argsort(img[order], stable=True)]
            counts = torch.bincount(img, minlength=b)
            rank = torch.arange(order.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[img[order]]
            todo = order[rank < cfg.refine_top]
        box[todo], score[todo] = _refine(scorer, img[todo], box[todo], score[todo], xy_ratio)
        keep = score > 0
        img, box, score = img[keep], box[keep], score[keep]
    boxes = box.float()
    order = torch.argsort(img, stable=True)
    counts = torch.bincount(img, minlength=b).tolist()
    results = []
    for sel in order.split(counts):
        bi, si = boxes[sel], score[sel]
        if cfg.beta >= 0.99:  # OpenCV: no NMS
            top = torch.argsort(si, descending=True)[: cfg.max_boxes]
            bi, si = bi[top], si[top]
        elif cfg.eta < 1.0:
            bi, si = _nms_with_decay(bi, si, cfg.beta, cfg.eta, cfg.max_boxes)
        else:
            bi, si = _nms_first(bi, si, cfg.beta, cfg.max_boxes)
        results.append((bi.contiguous(), si.contiguous()))
    return results


def _nms_first(boxes: torch.Tensor, scores: torch.Tensor, iou: float, max_boxes: int):
    """The first ``max_boxes`` boxes greedy NMS keeps, best first. Greedy NMS over the best
    n boxes keeps exactly the full run's survivors among them, so it runs on a prefix of
    4·max_boxes, doubled until enough survive (OpenCV also stops at max_boxes)."""
    order = torch.argsort(scores, descending=True)
    boxes, scores = boxes[order], scores[order]
    n = min(len(scores), 4 * max_boxes)
    while True:
        keep = batched_nms(boxes[:n], scores[:n], torch.zeros(n, dtype=torch.int64, device=boxes.device), iou)
        if len(keep) >= max_boxes or n == len(scores):
            keep = keep[:max_boxes]
            return boxes[keep], scores[keep]
        n = min(len(scores), 2 * n)


# ---------------------------------------------------------------- OpenCV backend and entry point


def opencv_available() -> bool:
    try:
        import cv2

        return hasattr(cv2, "ximgproc")
    except ImportError:
        return False


def opencv_edge_boxes(E: torch.Tensor, O: torch.Tensor, cfg: EdgeBoxesConfig):
    """OpenCV's ``cv2.ximgproc`` EdgeBoxes on each map, converted to this module's frame
    (xyxy pixels, +1 offset removed: ``[X − 1, Y − 1, X − 1 + W, Y − 1 + H]``)."""
    import cv2

    eb = cv2.ximgproc.createEdgeBoxes(alpha=cfg.alpha, beta=cfg.beta, eta=cfg.eta, minScore=cfg.min_score,
                                      maxBoxes=cfg.max_boxes, edgeMinMag=cfg.edge_min_mag,
                                      edgeMergeThr=cfg.edge_merge_thr, clusterMinMag=cfg.cluster_min_mag,
                                      maxAspectRatio=cfg.max_aspect_ratio, minBoxArea=cfg.min_box_area,
                                      gamma=cfg.gamma, kappa=cfg.kappa)
    out = []
    e_np, o_np = E.detach().float().cpu().numpy(), O.detach().float().cpu().numpy()
    for e, o in zip(e_np, o_np):
        boxes, scores = eb.getBoundingBoxes(np.ascontiguousarray(e), np.ascontiguousarray(o))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)[: len(boxes)]  # an empty result has one stray score
        xyxy = np.concatenate([boxes[:, :2] - 1, boxes[:, :2] - 1 + boxes[:, 2:]], axis=1)
        out.append((torch.from_numpy(xyxy).to(E.device), torch.from_numpy(scores).to(E.device)))
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto → torch on CUDA; on CPU OpenCV when installed (faster there per core,
    docs/benchmarks.md), else torch."""
    if backend != "auto":
        return backend
    if device.type == "cpu" and opencv_available():
        return "opencv"
    return "torch"


def edge_boxes(E: torch.Tensor, O: torch.Tensor, max_boxes: int = 1000, **params):
    """Edge maps ``[B, H, W]`` (or one ``[H, W]``) → a list of B ``(boxes [N, 4] float32
    xyxy pixels, scores [N] float32)``, best first, on E's device. ``params``:
    ``EdgeBoxesConfig`` fields (a ``config=EdgeBoxesConfig`` may be passed instead)."""
    cfg = params.pop("config", None)
    if cfg is None:
        cfg = make_config(max_boxes=max_boxes, **params)
    else:
        require(not params, "edge_boxes: pass either config= or parameters, not both")
        cfg.validate()
    if E.dim() == 2:
        E, O = E[None], O[None]
    if E.shape != O.shape or E.dim() != 3:
        raise ValueError(f"edge_boxes takes E and O of one shape [B, H, W], got {tuple(E.shape)}, {tuple(O.shape)}")
    E, O = E.float(), O.float()
    if resolve_backend(cfg.backend, E.device) == "opencv":
        return opencv_edge_boxes(E, O, cfg)
    with torch.inference_mode():
        return _torch_edge_boxes(E, O, cfg)


# ---------------------------------------------------------------- mining actor

SOURCE = "edgebox"


def _image_tensors(images: list, device: torch.device) -> list[torch.Tensor]:
    """HWC uint8 arrays (or tensors) → CHW float [0, 1] tensors on ``device``, one transfer."""
    from pseudobox.mining.cam import host_to_device

    return [t.permute(2, 0, 1).float().div_(255) for t in host_to_device(list(images), device)]


class EdgeBoxMiner:
    """Ray Data actor for ``mine source=edgebox``: decoded batch → class-agnostic EdgeBoxes
    (label −1) in image pixels. Needs no checkpoint and no image labels: every decoded
    row is mined; rows with a decode error pass through without boxes. Same-size images
    share one ``edge_maps``/``edge_boxes`` call; everything stays on the actor's device
    (the torch search on CUDA; on CPU the backend ``auto`` picks OpenCV)."""

    source = SOURCE

    def __init__(self, config: dict | EdgeBoxesConfig | None = None, device: str = "auto",
                 threads: int | None = None):
        from pseudobox.config import from_dict

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        cfg = config if isinstance(config, EdgeBoxesConfig) else from_dict(EdgeBoxesConfig, config or {})
        cfg.validate()
        self.cfg = cfg

    @torch.inference_mode()
    def mine(self, images: list, labels: list | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: (boxes [N, 4] float32 pixels, labels [N] int64 all −1, scores [N] float32),
        best first. ``labels`` (image-level) are ignored: proposals are class-agnostic."""
        results: list = [None] * len(images)
        tensors = _image_tensors(images, self.device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tensors):
            by_size.setdefault(tuple(t.shape[-2:]), []).append(i)
        for idx in by_size.values():
            E, O = edge_maps(torch.stack([tensors[i] for i in idx]))
            for i, (boxes, scores) in zip(idx, edge_boxes(E, O, config=self.cfg)):
                boxes = boxes.cpu().numpy().astype(np.float32).reshape(-1, 4)
                results[i] = (boxes, np.full(len(boxes), -1, np.int64), scores.cpu().numpy().astype(np.float32))
        return results

    def __call__(self, batch: dict) -> dict:
        from pseudobox.mining.outputs import mined_rows

        ok = [i for i in range(len(batch["key"])) if not batch["error"][i]]
        mined = self.mine([batch["image"][i] for i in ok])
        return mined_rows(batch, dict(zip(ok, mined)), self.source)


def proposal_recall(results: list, gt_boxes: list, top_k: int, iou: float) -> float:
    """Share of ground-truth boxes that one of an image's first ``top_k`` proposals
    covers at IoU ≥ ``iou`` (class-agnostic; the EdgeBoxes paper's recall)."""
    hit = total = 0
    for (boxes, _), gt in zip(results, gt_boxes):
        gt = torch.as_tensor(gt, dtype=torch.float32).reshape(-1, 4)
        total += len(gt)
        boxes = boxes[:top_k].float().cpu()
        if len(gt) and len(boxes):
            hit += int((box_iou(gt, boxes).max(dim=1).values >= iou).sum())
    return hit / total if total else float("nan")

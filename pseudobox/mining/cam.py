"""CAM pseudo-boxes (DAP step 2), batched as tensors on the actor's device.

``cam_to_boxes`` turns raw class activation maps into boxes: min-max normalise,
threshold at several τ, label connected components (8-connectivity), drop components
smaller than ``min_component_ratio`` of the largest one, fit a box to each by weighted
moments, then merge the boxes of all thresholds with NMS. There are no per-pixel Python
loops: components are found by iterated max-pool label propagation and moments by
scatter-adds, for the whole batch at once.

``CamBoxMiner`` is the per-batch callable that Ray Data runs in an actor pool: it loads
the classifier once, computes multi-scale + flip CAMs for every image-level label and
returns boxes in image pixels. Its backbone runs in reduced precision where the device
has fast units for it (``resolve_precision``), channels_last, in forward batches of
same-size images (optionally padded, ``plan_forward_batches``); everything after the
backbone is fp32 and stays on the device until one copy of the boxes back.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function
from torchvision.ops import batched_nms, box_iou

from pseudobox.engine import cpu_supports_bf16

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)


def normalize_cams(cams: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalise each map of ``[B, H, W]`` to [0, 1]; a constant map becomes 0.

    With ``valid`` (bool, broadcastable to ``cams``) the minimum and maximum are taken over
    the valid cells only, so that padding never sets a map's range.
    """
    if valid is None:
        flat = cams.flatten(1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    else:
        valid = valid.expand_as(cams)
        lo = cams.masked_fill(~valid, float("inf")).flatten(1).min(dim=1).values
        hi = cams.masked_fill(~valid, float("-inf")).flatten(1).max(dim=1).values
    lo, hi = lo[:, None, None], hi[:, None, None]
    return (cams - lo) / (hi - lo).clamp_min(1e-12)


def connected_components(mask: torch.Tensor, check_every: int = 4) -> torch.Tensor:
    """8-connected component labels of ``mask [N, H, W]`` (bool).

    Returns int64 labels in ``[0, H*W]`` per map, 0 for background; a component's label
    is the largest ``1 + flat index`` among its pixels (max propagation by 3×3 max-pool
    until nothing changes).
    """
    n, h, w = mask.shape
    if n == 0 or h * w == 0:
        return torch.zeros_like(mask, dtype=torch.int64)
    # float32 holds integers exactly up to 2**24, far above any CAM's H*W; float64 otherwise.
    dtype = torch.float32 if h * w < 2**24 else torch.float64
    seeds = torch.arange(1, h * w + 1, device=mask.device, dtype=dtype).view(1, h, w)
    fmask = mask.to(dtype)
    labels = (seeds * fmask).unsqueeze(1)
    fmask = fmask.unsqueeze(1)
    while True:
        for _ in range(check_every):
            new = F.max_pool2d(labels, kernel_size=3, stride=1, padding=1) * fmask
            labels, prev = new, labels
        if torch.equal(labels, prev):
            break
    return labels.squeeze(1).to(torch.int64)


def _rank_within_map(comp_map: torch.Tensor, area: torch.Tensor, mass: torch.Tensor,
                     num_maps: int) -> torch.Tensor:
    """Each component's 0-based rank among the components of its map: by descending
    area, ties by descending CAM mass."""
    order = torch.argsort(-mass, stable=True)
    order = order[torch.argsort(-area[order], stable=True)]
    order = order[torch.argsort(comp_map[order], stable=True)]  # by map, then area, then mass
    counts = torch.bincount(comp_map, minlength=num_maps)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(comp_map)
    rank[order] = torch.arange(len(order), device=comp_map.device) - starts[comp_map[order]]
    return rank


def cam_to_boxes(cams: torch.Tensor, thresholds=DEFAULT_THRESHOLDS, nms_iou: float = 0.8,
                 min_component_ratio: float = 0.5, max_components: int = 4,
                 min_side: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Raw CAMs ``[B, H, W]`` → B pairs ``(boxes [N, 4] xyxy, scores [N])`` in CAM cells.

    Cell (i, j) has centre (j + 0.5, i + 0.5). For each threshold τ, M = CAM·1{CAM > τ}
    on the min-max normalised CAM; 8-connected components smaller than
    ``min_component_ratio`` of the map's largest are dropped, and of the rest at most
    ``max_components`` are kept, largest first. Each gets the box centred on its
    M-weighted mean with side sqrt(12·weighted variance), at least ``min_side`` cells,
    clipped to the map. A box's score is the mean normalised CAM inside its component.
    Boxes from all thresholds are merged with NMS at ``nms_iou``, best score first.
    """
    boxes, scores, map_of_box = cam_to_boxes_flat(cams, thresholds, nms_iou, min_component_ratio,
                                                  max_components, min_side)
    return [(boxes[map_of_box == i], scores[map_of_box == i]) for i in range(cams.shape[0])]


def cam_to_boxes_flat(cams: torch.Tensor, thresholds=DEFAULT_THRESHOLDS, nms_iou: float = 0.8,
                      min_component_ratio: float = 0.5, max_components: int = 4,
                      min_side: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cam_to_boxes`` for the whole batch as three flat tensors, with no per-map loop:
    ``(boxes [N, 4], scores [N], map index [N])``, ordered by map, then best score first."""
    if cams.dim() != 3:
        raise ValueError(f"cams must be [B, H, W], got shape {tuple(cams.shape)}")
    if max_components < 1 or min_side < 0:
        raise ValueError(f"need max_components >= 1 and min_side >= 0, got {max_components}, {min_side}")
    b, h, w = cams.shape
    device = cams.device
    empty = (torch.zeros((0, 4), device=device), torch.zeros((0,), device=device),
             torch.zeros((0,), dtype=torch.int64, device=device))
    if b == 0 or h == 0 or w == 0:
        return empty
    cams = normalize_cams(cams.float())
    taus = torch.as_tensor(thresholds, dtype=cams.dtype, device=device)
    t = taus.numel()
    # One map per (image, threshold): index m = image * T + threshold.
    values = cams.unsqueeze(1).expand(b, t, h, w).reshape(b * t, h, w)
    mask = values > taus.repeat(b).view(-1, 1, 1)
    local = connected_components(mask)

    fg = local > 0
    if not fg.any():
        return empty
    map_idx = torch.arange(b * t, device=device).view(-1, 1, 1).expand_as(local)
    global_label = map_idx[fg] * (h * w + 1) + local[fg]
    comp_ids, comp_of_pixel = torch.unique(global_label, return_inverse=True)
    num_comp = comp_ids.numel()
    comp_map = comp_ids // (h * w + 1)

    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=cams.dtype) + 0.5,
                            torch.arange(w, device=device, dtype=cams.dtype) + 0.5, indexing="ij")
    x = xs.expand_as(values)[fg]
    y = ys.expand_as(values)[fg]
    m = values[fg]  # M = CAM inside the mask

    def per_comp(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_comp, device=device, dtype=v.dtype).index_add_(0, comp_of_pixel, v)

    area = per_comp(torch.ones_like(m))
    mass = per_comp(m).clamp_min(1e-12)
    xc = per_comp(m * x) / mass
    yc = per_comp(m * y) / mass
    var_x = per_comp(m * (x - xc[comp_of_pixel]) ** 2) / mass
    var_y = per_comp(m * (y - yc[comp_of_pixel]) ** 2) / mass
    half_w = torch.sqrt(12.0 * var_x).clamp_min(min_side) / 2
    half_h = torch.sqrt(12.0 * var_y).clamp_min(min_side) / 2
    scores = per_comp(m) / area

    largest = torch.zeros(b * t, device=device, dtype=area.dtype).scatter_reduce(
        0, comp_map, area, reduce="amax", include_self=True)
    keep = area >= min_component_ratio * largest[comp_map]
    # Among the components that pass the ratio filter, the largest few per map.
    kept_rank = _rank_within_map(comp_map[keep], area[keep], mass[keep], b * t)
    keep[keep.clone()] = kept_rank < max_components

    boxes = torch.stack([(xc - half_w).clamp(0, w), (yc - half_h).clamp(0, h),
                         (xc + half_w).clamp(0, w), (yc + half_h).clamp(0, h)], dim=1)
    boxes, scores, image_of_box = boxes[keep], scores[keep], (comp_map // t)[keep]
    kept = batched_nms(boxes, scores, image_of_box, nms_iou)  # sorted by descending score
    kept = kept[torch.argsort(image_of_box[kept], stable=True)]  # by map, each best first
    return boxes[kept], scores[kept], image_of_box[kept]


# ---------------------------------------------------------------- the mining actor

def scaled_size(h: int, w: int, short: int, stride: int = 32) -> tuple[int, int]:
    """The size for short side ``short``, each side rounded to a multiple of ``stride``.

    Rounding changes the aspect ratio by at most ``stride / 2`` pixels a side and lets
    images of similar shape share one unpadded batch.
    """
    s = short / min(h, w)
    return (max(stride, round(h * s / stride) * stride), max(stride, round(w * s / stride) * stride))


def resize_short_side(image: torch.Tensor, size: int, stride: int = 32) -> torch.Tensor:
    """Resize ``[3, H, W]`` to ``scaled_size`` (short side ``size``, sides on the stride),
    antialiased so that downscaling does not alias fine texture into the CAM."""
    return F.interpolate(image[None], size=scaled_size(*image.shape[-2:], size, stride),
                         mode="bilinear", align_corners=False, antialias=True)[0]


# Where the receptive field of the last feature map's cell j is centred, in continuous
# input pixels (pixel i spans [i, i + 1)): stride·j + RESNET_CELL_CENTRE. Every
# downsampling layer of a torchvision ResNet (7×7/2 pad 3, 3×3/2 pad 1, 1×1/2 pad 0,
# max-pool 3/2 pad 1) maps output j to input 2j, so cell j sits on input pixel 32j, not
# at the cell's middle 32j + 16 (tests/unit/test_cam_geometry.py measures it by gradients).
RESNET_CELL_CENTRE = 0.5


def cell_centres(flip: bool, stride: int = 32, centre: float = RESNET_CELL_CENTRE) -> tuple[float, float]:
    """``(y, x)`` input-pixel offsets of cell 0 of a (flip-averaged) CAM: cell j sits at
    stride·j + offset. A mirrored image's cell j, flipped back, sits at stride·j + stride
    − centre, so averaging it with the unflipped CAM centres x on the cell's middle."""
    return centre, (stride / 2 if flip else centre)


def resample_cam(cam: torch.Tensor, size: tuple[int, int], offsets: tuple[float, float],
                 stride: int = 32) -> torch.Tensor:
    """Resample ``cam [h, w]`` (cells of an input of ``stride·h × stride·w`` pixels) to
    ``size`` cells of another resize of the same image, matching cells by where their
    receptive fields sit in the image (``offsets`` from ``cell_centres``), bilinearly."""
    if tuple(cam.shape) == tuple(size):
        return cam
    axes = []
    for n_src, n_dst, off in zip(cam.shape, size, offsets):
        k = torch.arange(n_dst, device=cam.device, dtype=torch.float32)
        src = ((stride * k + off) * n_src / n_dst - off) / stride  # fractional source cell
        axes.append(2 * src / max(n_src - 1, 1) - 1 if n_src > 1 else torch.zeros_like(src))
    gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    return F.grid_sample(cam[None, None].float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=True)[0, 0]


def cam_boxes_to_image(boxes: torch.Tensor, cam_size, image_size, flip: bool, stride: int = 32) -> torch.Tensor:
    """Boxes in CAM cells (cell k centred at k + 0.5) → image pixels, clipped to the image.

    ``cam_size`` is the CAM's ``(hc, wc)`` for an input of ``stride·hc × stride·wc`` pixels
    resized from an image of ``image_size`` ``(h, w)``; either may also be a ``[N, 2]``
    tensor giving each box its own sizes.
    """
    cam_hw = torch.as_tensor(cam_size, dtype=boxes.dtype, device=boxes.device)
    image_hw = torch.as_tensor(image_size, dtype=boxes.dtype, device=boxes.device)
    oy, ox = cell_centres(flip, stride)
    offset = boxes.new_tensor([ox, oy, ox, oy]) - stride / 2
    scale = (image_hw / (cam_hw * stride)).flip(-1)  # (x, y) factors
    image_boxes = (boxes * stride + offset) * torch.cat([scale, scale], dim=-1)
    image_wh = image_hw.flip(-1)
    return torch.minimum(image_boxes.clamp_min(0), torch.cat([image_wh, image_wh], dim=-1))


def matched_boxes(reference: list[tuple], other: list[tuple], iou: float = 0.9) -> tuple[int, int]:
    """Agreement of two minings of the same images (per image ``(boxes, labels, scores)``):
    how many of ``reference``'s boxes have a box of the same label in ``other`` at IoU ≥
    ``iou``, and how many boxes ``reference`` has."""
    matched = total = 0
    for (ref_boxes, ref_labels, _), (boxes, labels, _) in zip(reference, other):
        total += len(ref_boxes)
        if len(ref_boxes) and len(boxes):
            ious = box_iou(torch.as_tensor(ref_boxes), torch.as_tensor(boxes))
            same = torch.as_tensor(ref_labels)[:, None] == torch.as_tensor(labels)[None]
            matched += int(((ious >= iou) & same).any(dim=1).sum())
    return matched, total


# ------------------------------------------------------- precision and forward batches

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device) -> torch.dtype:
    """The backbone's forward dtype for ``cam.precision`` on ``device``.

    ``auto``: bf16 on CUDA when supported (fp16 otherwise), bf16 on CPUs with bf16 units,
    fp32 elsewhere. The CAM itself, its normalisation and the box fitting are always fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return _DTYPES[precision]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def plan_forward_batches(sizes: list[tuple[int, int]], max_images: int, max_padding: float) -> list[list[int]]:
    """Group images by their resized ``(h, w)`` into forward batches, each padded to its
    largest h and w.

    Images are taken in order of size; an image joins the current batch while the batch
    holds fewer than ``max_images`` and its padded pixels stay within ``max_padding`` of
    its real ones (0: only images of one size share a batch).
    """
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(sizes)), key=lambda k: sizes[k]):
        h, w = sizes[i]
        if current:
            ph = max(h, max(sizes[k][0] for k in current))
            pw = max(w, max(sizes[k][1] for k in current))
            if len(current) < max_images and (len(current) + 1) * ph * pw <= (1 + max_padding) * (real + h * w):
                current.append(i)
                real += h * w
                continue
            batches.append(current)
        current, real = [i], h * w
    if current:
        batches.append(current)
    return batches


def host_to_device(arrays: list, device: torch.device) -> list[torch.Tensor]:
    """Copy uint8 HWC arrays to ``device`` in one transfer; on CUDA through pinned memory, so
    the copy runs asynchronously. Images that are already tensors (decoded on the actor's
    device by ``ray_io.decode_images``) only move if they are elsewhere."""
    if arrays and all(isinstance(a, torch.Tensor) for a in arrays):
        return [a.to(device) for a in arrays]
    arrays = [a.cpu().numpy() if isinstance(a, torch.Tensor) else a for a in arrays]
    arrays = [a if a.flags.c_contiguous and a.flags.writeable else np.array(a) for a in arrays]
    if device.type != "cuda":
        return [torch.from_numpy(a).to(device) for a in arrays]
    sizes = [a.size for a in arrays]
    staging = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    for part, a in zip(staging.split(sizes), arrays):
        part.copy_(torch.from_numpy(a).view(-1))
    flat = staging.to(device, non_blocking=True)
    return [part.view(a.shape) for part, a in zip(flat.split(sizes), arrays)]


def _resample_grid(src_hw: torch.Tensor, dst_hw: torch.Tensor, map_hw: tuple[int, int], out_hw: tuple[int, int],
                   offsets: tuple[float, float], stride: int) -> torch.Tensor:
    """``grid_sample`` grid ``[P, out_h, out_w, 2]`` that resamples each pair's valid
    ``src_hw`` cells of a padded ``map_hw`` map to ``dst_hw`` cells (``resample_cam``'s
    mapping, with the border clamped at the valid cells, not the padded map's)."""
    axes = []
    for a in (0, 1):
        n_src, n_dst = src_hw[:, a:a + 1].float(), dst_hw[:, a:a + 1].float()
        k = torch.arange(out_hw[a], device=src_hw.device, dtype=torch.float32)[None]
        src = ((stride * k + offsets[a]) * n_src / n_dst - offsets[a]) / stride
        src = torch.minimum(src.clamp_min(0), n_src - 1)
        axes.append(2 * src / max(map_hw[a] - 1, 1) - 1 if map_hw[a] > 1 else torch.zeros_like(src))
    gy = axes[0][:, :, None].expand(-1, -1, out_hw[1])
    gx = axes[1][:, None, :].expand(-1, out_hw[0], -1)
    return torch.stack([gx, gy], dim=-1)


def _cell_mask(hw: torch.Tensor, map_hw: tuple[int, int]) -> torch.Tensor:
    """``[P, H, W]`` bool: the cells inside each pair's valid ``(h, w)``."""
    rows = torch.arange(map_hw[0], device=hw.device)[None, :, None] < hw[:, 0, None, None]
    cols = torch.arange(map_hw[1], device=hw.device)[None, None, :] < hw[:, 1, None, None]
    return rows & cols


def _view_averaged_cams(model, feats: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, src_hw: torch.Tensor,
                        mirror_offset: int) -> torch.Tensor:
    """fp32 CAMs ``[P, H, W]`` of the pairs' feature rows, averaged with their mirrored
    views' (rows + ``mirror_offset``, flipped back within each pair's valid width) when
    ``mirror_offset`` > 0, and min-max normalised over the valid cells ``src_hw``."""
    from pseudobox.models.classifier import cams_from_features

    cams = cams_from_features(model, feats, rows, labels).float()
    map_hw = tuple(cams.shape[-2:])
    if mirror_offset:
        cols = torch.arange(map_hw[1], device=cams.device)[None]
        back = torch.where(cols < src_hw[:, 1:], src_hw[:, 1:] - 1 - cols, cols)
        mirrored = cams_from_features(model, feats, rows + mirror_offset, labels).float()
        cams = (cams + mirrored.gather(2, back[:, None, :].expand_as(mirrored))) / 2
    return normalize_cams(cams, _cell_mask(src_hw, map_hw))  # per scale, after flip averaging


def multiscale_cams(model, images: list[torch.Tensor], image_idx, labels: torch.Tensor,
                    scales=(288, 576), flip: bool = True, stride: int = 32, dtype: torch.dtype = torch.float32,
                    max_images: int = 16, max_padding: float = 0.0) -> tuple[torch.Tensor, list]:
    """CAMs for (image, label) pairs, averaged over scales and horizontal flip.

    ``images`` are normalised ``[3, H, W]`` tensors. At each scale, images are resized
    (antialiased, short side ``scale``, sides on the stride) and run in forward batches
    of up to ``max_images`` images with their flips (``plan_forward_batches``: padded at
    the bottom and right within ``max_padding``; 0 pads nothing). The backbone runs in
    ``dtype`` (autocast, channels_last); its features are cast to fp32 before the CAM.
    Each scale's flip-averaged CAM is min-max normalised over its valid cells, resampled
    to the largest scale's cells, and the scales are averaged (as the public DAP code
    does). Returns ``[P, Hc, Wc]`` CAMs padded with each map's own minimum (padding never
    survives normalisation) and, per pair, the valid CAM size ``(hc, wc)`` spanning its
    image.
    """
    from pseudobox.models.classifier import backbone_features

    device = labels.device
    pair_image = [int(i) for i in image_idx]
    top = max(scales)
    valid = [tuple(d // stride for d in scaled_size(*im.shape[1:], top, stride)) for im in images]
    pair_sizes = [valid[i] for i in pair_image]
    hc, wc = max(v[0] for v in pair_sizes), max(v[1] for v in pair_sizes)
    pairs_of_image: dict[int, list[int]] = {}
    for p, i in enumerate(pair_image):
        pairs_of_image.setdefault(i, []).append(p)
    used = sorted(pairs_of_image)
    offsets = cell_centres(flip, stride)
    sums = torch.zeros((len(pair_image), hc, wc), device=device)
    for size in scales:
        resized = [scaled_size(*images[i].shape[1:], size, stride) for i in used]
        for batch_members in plan_forward_batches(resized, max_images, max_padding):
            members = [used[k] for k in batch_members]
            shapes = [resized[k] for k in batch_members]
            ph, pw = max(s[0] for s in shapes), max(s[1] for s in shapes)
            n = len(members)
            with record_function("cam.resize"):
                batch = images[members[0]].new_zeros((2 * n if flip else n, 3, ph, pw))
                for k, (i, (h, w)) in enumerate(zip(members, shapes)):
                    r = F.interpolate(images[i][None], size=(h, w), mode="bilinear", align_corners=False,
                                      antialias=True)[0]
                    batch[k, :, :h, :w] = r
                    if flip:  # each view padded at its right, so its cells stay at stride·j from the left
                        batch[n + k, :, :h, :w] = r.flip(-1)
            with record_function("cam.forward"):
                feats = backbone_features(model, batch, dtype)  # fp32 [V, C, ph/stride, pw/stride]
            slot = {i: k for k, i in enumerate(members)}
            pair_ids = [p for i in members for p in pairs_of_image[i]]
            rows = torch.as_tensor([slot[pair_image[p]] for p in pair_ids], device=device)
            src_hw = torch.as_tensor([[d // stride for d in shapes[slot[pair_image[p]]]] for p in pair_ids],
                                     device=device)
            dst_hw = torch.as_tensor([pair_sizes[p] for p in pair_ids], device=device)
            pair_ids = torch.as_tensor(pair_ids, device=device)
            with record_function("cam.cams"):
                cams = _view_averaged_cams(model, feats, rows, labels[pair_ids], src_hw, n if flip else 0)
                grid = _resample_grid(src_hw, dst_hw, tuple(feats.shape[-2:]), (hc, wc), offsets, stride)
                sums.index_add_(0, pair_ids, F.grid_sample(cams[:, None], grid, mode="bilinear",
                                                           padding_mode="border", align_corners=True)[:, 0])
    cams = sums / len(scales)
    inside = _cell_mask(torch.as_tensor(pair_sizes, device=device).view(-1, 2), (hc, wc))
    lowest = cams.masked_fill(~inside, float("inf")).flatten(1).min(dim=1).values
    return torch.where(inside, cams, lowest[:, None, None]), pair_sizes


class CamBoxMiner:
    """Ray Data actor: decoded batch → CAM pseudo-boxes in image pixels.

    Loaded once per actor from a classifier checkpoint on storage; runs on CUDA when the
    actor was given a GPU. The backbone runs in ``precision`` (``resolve_precision``;
    ``fp32`` turns reduced precision off) with channels_last; CAMs and boxes are fp32.
    Rows with a decode error pass through with no boxes.
    """

    source = "cam"

    def __init__(self, checkpoint_uri: str, scales=(288, 576), flip: bool = True,
                 thresholds=DEFAULT_THRESHOLDS, nms_iou: float = 0.8, min_component_ratio: float = 0.5,
                 max_components: int = 4, min_side: float = 1.0, device: str = "auto", threads: int | None = None,
                 precision: str = "auto", max_images: int = 16, max_padding: float = 0.0):
        from pseudobox.models.classifier import load_classifier

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.dtype = resolve_precision(precision, self.device)
        self.model, self.meta = load_classifier(checkpoint_uri, device=self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.scales, self.flip = tuple(scales), flip
        self.batching = dict(max_images=max_images, max_padding=max_padding)
        self.box_args = dict(thresholds=tuple(thresholds), nms_iou=nms_iou, min_component_ratio=min_component_ratio,
                             max_components=max_components, min_side=min_side)

    @torch.inference_mode()
    def mine(self, images: list[np.ndarray], labels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: (boxes [N,4] image pixels, box labels [N], scores [N])."""
        from pseudobox.models.classifier import normalize_images

        results = [(np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0,), np.float32))
                   for _ in images]
        pair_image = [i for i, ls in enumerate(labels) for _ in ls]
        if not pair_image:
            return results
        with record_function("cam.to_device"):
            tensors = [normalize_images(t) for t in host_to_device(list(images), self.device)]
        pair_labels = torch.as_tensor([int(c) for ls in labels for c in ls], dtype=torch.int64)
        cams, sizes = multiscale_cams(self.model, tensors, pair_image, pair_labels.to(self.device), self.scales,
                                      self.flip, dtype=self.dtype, **self.batching)
        with record_function("cam.boxes"):
            boxes, scores, pair_of_box = cam_to_boxes_flat(cams, **self.box_args)
        cam_hw = torch.as_tensor(sizes, dtype=torch.float32, device=self.device).view(-1, 2)
        image_hw = torch.as_tensor([im.shape[:2] for im in images], dtype=torch.float32, device=self.device)
        image_of_pair = torch.as_tensor(pair_image, device=self.device)
        boxes = cam_boxes_to_image(boxes, cam_hw[pair_of_box], image_hw[image_of_pair[pair_of_box]], self.flip)
        # One transfer back; boxes are ordered by pair, so by image.
        boxes, scores, pair_of_box = boxes.cpu().numpy(), scores.cpu().numpy(), pair_of_box.cpu().numpy()
        image_of_box = np.asarray(pair_image)[pair_of_box]
        box_labels = pair_labels.numpy()[pair_of_box]
        splits = np.searchsorted(image_of_box, np.arange(1, len(images)))
        for i, (b, c, s) in enumerate(zip(np.split(boxes, splits), np.split(box_labels, splits),
                                          np.split(scores, splits))):
            if len(b):
                results[i] = (b.astype(np.float32), c.astype(np.int64), s.astype(np.float32))
        return results

    def __call__(self, batch: dict) -> dict:
        from pseudobox.mining.outputs import mined_rows

        ok = [i for i in range(len(batch["key"])) if not batch["error"][i]]
        mined = self.mine([batch["image"][i] for i in ok], [batch["labels"][i] for i in ok])
        return mined_rows(batch, dict(zip(ok, mined)), self.source)

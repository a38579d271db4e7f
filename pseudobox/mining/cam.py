"""CAM pseudo-boxes (DAP step 2), batched as tensors on the actor's device.

``cam_to_boxes`` turns raw class activation maps into boxes: min-max normalise,
threshold at several τ, label connected components (8-connectivity), drop components
smaller than ``min_component_ratio`` of the largest one, fit a box to each by weighted
moments, then merge the boxes of all thresholds with NMS. There are no per-pixel Python
loops: components are found by iterated max-pool label propagation and moments by
scatter-adds, for the whole batch at once.

``CamBoxMiner`` is the per-batch callable that Ray Data runs in an actor pool: it loads
the classifier once, computes multi-scale + flip CAMs for every image-level label and
returns boxes in image pixels.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of ``[B, H, W]`` to [0, 1]; a constant map becomes 0."""
    flat = cams.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
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
    if cams.dim() != 3:
        raise ValueError(f"cams must be [B, H, W], got shape {tuple(cams.shape)}")
    if max_components < 1 or min_side < 0:
        raise ValueError(f"need max_components >= 1 and min_side >= 0, got {max_components}, {min_side}")
    b, h, w = cams.shape
    device = cams.device
    empty = [(torch.zeros((0, 4), device=device), torch.zeros((0,), device=device)) for _ in range(b)]
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
    boxes, scores, image_of_box = boxes[kept], scores[kept], image_of_box[kept]
    return [(boxes[image_of_box == i], scores[image_of_box == i]) for i in range(b)]


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


def cam_boxes_to_image(boxes: torch.Tensor, cam_size: tuple[int, int], image_size: tuple[int, int],
                       flip: bool, stride: int = 32) -> torch.Tensor:
    """Boxes in CAM cells (cell k centred at k + 0.5) → image pixels, clipped to the image.

    ``cam_size`` is the CAM's ``(hc, wc)`` for an input of ``stride·hc × stride·wc`` pixels
    resized from an image of ``image_size`` ``(h, w)``.
    """
    (hc, wc), (h, w) = cam_size, image_size
    oy, ox = cell_centres(flip, stride)
    offset = boxes.new_tensor([ox, oy, ox, oy]) - stride / 2
    scale = boxes.new_tensor([w / (wc * stride), h / (hc * stride)] * 2)
    image_boxes = (boxes * stride + offset) * scale
    return torch.minimum(image_boxes.clamp_min(0), boxes.new_tensor([w, h, w, h]))


def multiscale_cams(model, images: list[torch.Tensor], image_idx: torch.Tensor, labels: torch.Tensor,
                    scales=(288, 576), flip: bool = True, stride: int = 32) -> tuple[torch.Tensor, list]:
    """CAMs for (image, label) pairs, averaged over scales and horizontal flip.

    ``images`` are normalised ``[3, H, W]`` tensors. At each scale, images that resize
    to the same size run as one batch (with their flips), so nothing is padded. Each
    scale's flip-averaged CAM is min-max normalised on its own, resampled to the largest
    scale's cells, and the scales are averaged (as the public DAP code does). Returns
    ``[P, Hc, Wc]`` CAMs padded with each map's own minimum (padding never survives
    normalisation) and, per pair, the valid CAM size ``(hc, wc)`` spanning its image.
    """
    from pseudobox.models.classifier import cams_from_features, resnet_features

    top = max(scales)
    valid = [tuple(d // stride for d in scaled_size(*im.shape[1:], top, stride)) for im in images]
    offsets = cell_centres(flip, stride)
    pairs_of_image: dict[int, list[int]] = {}
    for p, i in enumerate(image_idx.tolist()):
        pairs_of_image.setdefault(i, []).append(p)
    sums: list = [None] * len(labels)
    for size in scales:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            if i in pairs_of_image:
                groups.setdefault(scaled_size(*im.shape[1:], size, stride), []).append(i)
        for hw, members in groups.items():
            batch = torch.stack([F.interpolate(images[i][None], size=hw, mode="bilinear", align_corners=False,
                                               antialias=True)[0] for i in members])
            if flip:
                batch = torch.cat([batch, batch.flip(-1)])
            pair_ids = [p for i in members for p in pairs_of_image[i]]
            slot = {i: k for k, i in enumerate(members)}
            rows = torch.as_tensor([slot[int(image_idx[p])] for p in pair_ids], device=labels.device)
            pair_labels = labels[pair_ids]
            feats = resnet_features(model, batch)
            cams = cams_from_features(model, feats, rows, pair_labels).float()
            if flip:
                cams = (cams + cams_from_features(model, feats, rows + len(members), pair_labels).float().flip(-1)) / 2
            cams = normalize_cams(cams)  # per scale, after flip averaging
            for k, p in enumerate(pair_ids):
                cam = resample_cam(cams[k], valid[int(image_idx[p])], offsets, stride)
                sums[p] = cam if sums[p] is None else sums[p] + cam
    hc = max(v[0] for v in valid)
    wc = max(v[1] for v in valid)
    out = torch.empty((len(labels), hc, wc), device=labels.device)
    pair_sizes = []
    for p in range(len(labels)):
        cam = sums[p] / len(scales)
        out[p] = cam.min()
        out[p, : cam.shape[0], : cam.shape[1]] = cam
        pair_sizes.append(tuple(cam.shape))
    return out, pair_sizes


class CamBoxMiner:
    """Ray Data actor: decoded batch → CAM pseudo-boxes in image pixels.

    Loaded once per actor from a classifier checkpoint on storage; runs on CUDA when the
    actor was given a GPU. Rows with a decode error pass through with no boxes.
    """

    source = "cam"

    def __init__(self, checkpoint_uri: str, scales=(288, 576), flip: bool = True,
                 thresholds=DEFAULT_THRESHOLDS, nms_iou: float = 0.8, min_component_ratio: float = 0.5,
                 max_components: int = 4, min_side: float = 1.0, device: str = "auto", threads: int | None = None):
        from pseudobox.models.classifier import load_classifier

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.model, self.meta = load_classifier(checkpoint_uri, device=self.device)
        self.scales, self.flip = tuple(scales), flip
        self.box_args = dict(thresholds=tuple(thresholds), nms_iou=nms_iou, min_component_ratio=min_component_ratio,
                             max_components=max_components, min_side=min_side)

    @torch.inference_mode()
    def mine(self, images: list[np.ndarray], labels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: (boxes [N,4] image pixels, box labels [N], scores [N])."""
        from pseudobox.models.classifier import normalize_images

        if not images:
            return []
        tensors = [normalize_images(torch.tensor(im, device=self.device)) for im in images]
        image_idx = torch.as_tensor([i for i, ls in enumerate(labels) for _ in ls], dtype=torch.int64, device=self.device)
        pair_labels = torch.as_tensor([int(c) for ls in labels for c in ls], dtype=torch.int64, device=self.device)
        results = [(np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0,), np.float32))
                   for _ in images]
        if len(pair_labels) == 0:
            return results
        cams, sizes = multiscale_cams(self.model, tensors, image_idx, pair_labels, self.scales, self.flip)
        per_pair = cam_to_boxes(cams, **self.box_args)
        collected: list[list] = [[] for _ in images]
        for p, (boxes, scores) in enumerate(per_pair):
            i = int(image_idx[p])
            boxes = cam_boxes_to_image(boxes, sizes[p], images[i].shape[:2], self.flip)
            collected[i].append((boxes, torch.full_like(scores, int(pair_labels[p]), dtype=torch.int64), scores))
        for i, parts in enumerate(collected):
            if parts:
                results[i] = tuple(torch.cat(x).cpu().numpy() for x in zip(*parts))
                results[i] = (results[i][0].astype(np.float32), results[i][1], results[i][2].astype(np.float32))
        return results

    def __call__(self, batch: dict) -> dict:
        from pseudobox.mining.outputs import mined_rows

        ok = [i for i in range(len(batch["key"])) if not batch["error"][i]]
        mined = self.mine([batch["image"][i] for i in ok], [batch["labels"][i] for i in ok])
        return mined_rows(batch, dict(zip(ok, mined)), self.source)

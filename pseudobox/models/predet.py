"""PreDet (Ramanathan et al.): a ResNet-FPN with a classification head, a contrastive RPN
(CRPN) and a contrastive RoI head (CROI), for weakly supervised detection pre-training.

The model returns raw outputs (``PredetRaw``); the losses are in ``predet_loss``.

* Backbone: torchvision's ResNet-FPN extractor (``backbone.body``, ``backbone.fpn``, the
  names Faster R-CNN uses), P2-P6 with 256 channels.
* Classification: one linear head shared by every FPN level, on each level's global
  average pool (``cls_head``), for both views.
* Queries: RoIAlign of view 2 (``MultiScaleRoIAlign`` picks the level by box size) through
  the shared box head ``roi_heads.box_head`` (torchvision ``TwoMLPHead``) gives ``b_q``.
* CRPN (``rpn``): a torchvision ``RegionProposalNetwork`` whose head is ``CrpnHead``: the
  3×3 trunk ``rpn.head.conv`` (exactly torchvision ``RPNHead.conv``, so Faster R-CNN loads
  it by name) on view-1 features, then 1×1 convs giving a D-dim embedding per anchor (A×D
  channels) for scores and per anchor coordinate (4A×D') for regressions. Each query gives
  A score vectors and 4A regression vectors (linear layers on ``b_q``); the per-anchor dot
  products for all Q queries are one grouped 1×1 convolution (``query_conditioned``).
  Proposals: per anchor the best query's score and its regression, then torchvision's
  ``filter_proposals`` (top-K per level, clip, NMS, top ``rpn_post_nms_top_n``).
* CROI (``roi_heads``): per query one positive (a random candidate with IoU > 0.5 to it)
  and up to ``max_negatives`` candidates with IoU < 0.5 to every query are pooled from view
  1 (candidates: the CRPN proposals plus the view-1 query boxes themselves, as Faster R-CNN
  adds ground truth to its proposals), through the same box head, then a shared FC
  (``roi_heads.embed``) and L2 normalisation (cosine similarity in the loss). Regression:
  ``b_q`` projected to 4×D (``reg_query``) dotted with ``b_p`` projected to D
  (``reg_proposal``): 4 deltas that move the positive proposal onto the query.

Under autocast the convolutions and linear layers run in reduced precision; FPN features,
scores, deltas and embeddings are cast to fp32 before any box math (anchors, decoding,
IoU, NMS, RoIAlign boxes) and the losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, box_iou, clip_boxes_to_image

from pseudobox.config import require
from pseudobox.models.classifier import IMAGENET_MEAN, IMAGENET_STD, build_resnet

CRPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)     # torchvision RPN's box coding
CROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)   # torchvision Faster R-CNN RoI head's box coding
FPN_CHANNELS = 256
ROI_LEVELS = ["0", "1", "2", "3"]           # P2-P5, as Faster R-CNN pools


@dataclass
class PredetArch:
    """What a PreDet model is; stored in checkpoints (``to_dict``) so later stages can rebuild it."""

    depth: int = 50
    frozen_bn: bool = True   # the classifier's BN statistics, frozen (small per-worker batches)
    freeze_at: int = 0       # 0: train the whole backbone (pre-training); as DetectorArch.freeze_at
    num_queries: int = 16
    crop_size: int = 480
    embed_dim: int = 256          # CROI contrastive projection (cosine similarity)
    box_head_dim: int = 1024      # TwoMLPHead representation size, as torchvision Faster R-CNN
    crpn_embed_dim: int = 128     # D of the per-anchor score embedding
    crpn_reg_dim: int = 32        # D' of the per-anchor-coordinate regression embedding
    croi_reg_dim: int = 256       # D of the CROI regression projections (4×D and 1×D)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)   # one per FPN level, P2-P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n: int = 2000    # per FPN level, before NMS
    rpn_post_nms_top_n: int = 1000   # per image, after NMS
    rpn_nms_thresh: float = 0.7
    temperature: float = 0.07        # InfoNCE tau; the loss config must agree

    def validate(self, prefix: str = "model") -> None:
        require(self.depth in (18, 34, 50, 101, 152), f"{prefix}.depth must be 18, 34, 50, 101 or 152")
        require(0 <= self.freeze_at <= 5, f"{prefix}.freeze_at must be in 0..5")
        require(self.num_queries >= 1, f"{prefix}.num_queries must be >= 1")
        require(self.crop_size >= 64 and self.crop_size % 32 == 0,
                f"{prefix}.crop_size must be a multiple of 32 and >= 64, got {self.crop_size}: anchors take "
                "their strides from input size // feature size")
        for name in ("embed_dim", "box_head_dim", "crpn_embed_dim", "crpn_reg_dim", "croi_reg_dim",
                     "rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            require(getattr(self, name) >= 1, f"{prefix}.{name} must be >= 1")
        require(len(self.anchor_sizes) == 5, f"{prefix}.anchor_sizes needs one size per FPN level (5: P2-P6)")
        require(len(self.aspect_ratios) >= 1 and min(self.aspect_ratios) > 0,
                f"{prefix}.aspect_ratios must be positive numbers")
        require(0 < self.rpn_nms_thresh <= 1, f"{prefix}.rpn_nms_thresh must be in (0, 1]")
        require(self.temperature > 0, f"{prefix}.temperature must be > 0")

    @property
    def num_anchors(self) -> int:
        """A: anchors per location and level."""
        return len(self.aspect_ratios)


def predet_normalize(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` float images in [0, 1] → ImageNet-normalised model input."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def query_conditioned(anchor_features: torch.Tensor, query_vectors: torch.Tensor) -> torch.Tensor:
    """Dot products of per-anchor embeddings with per-query vectors, as one grouped 1×1 conv.

    ``anchor_features [B, G*D, H, W]`` (G embeddings of D channels per location: anchors,
    or anchor coordinates), ``query_vectors [B, Q, G, D]`` → ``[B, G, Q, H, W]`` with
    ``out[b, g, q, y, x] = <anchor_features[b, g*D:(g+1)*D, y, x], query_vectors[b, q, g]>``.
    Images have their own queries, so the batch is folded into the groups (B×G groups).
    """
    b, q, g, d = query_vectors.shape
    h, w = anchor_features.shape[-2:]
    weight = query_vectors.permute(0, 2, 1, 3).reshape(b * g * q, d, 1, 1).to(anchor_features.dtype)
    out = Fn.conv2d(anchor_features.reshape(1, b * g * d, h, w), weight, groups=b * g)
    return out.view(b, g, q, h, w)


class CrpnHead(nn.Module):
    """The CRPN's layers: ``conv`` is torchvision ``RPNHead.conv`` (same names, shapes, init)."""

    def __init__(self, num_anchors: int, query_dim: int, embed_dim: int, reg_dim: int):
        super().__init__()
        self.num_anchors, self.embed_dim, self.reg_dim = num_anchors, embed_dim, reg_dim
        self.conv = RPNHead(FPN_CHANNELS, num_anchors).conv
        self.anchor_score = nn.Conv2d(FPN_CHANNELS, num_anchors * embed_dim, kernel_size=1)
        self.anchor_reg = nn.Conv2d(FPN_CHANNELS, num_anchors * 4 * reg_dim, kernel_size=1)
        self.query_score = nn.Linear(query_dim, num_anchors * embed_dim)
        self.query_reg = nn.Linear(query_dim, num_anchors * 4 * reg_dim)

    def forward(self, features: list[torch.Tensor], query_features: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features``: view-1 FPN levels ``[B, 256, H_l, W_l]``; ``query_features [B, Q, F]``
        (``b_q``). Returns fp32 ``scores [B, N, Q]`` and ``deltas [B, N, Q, 4]`` over the N
        anchors of all levels, in torchvision's anchor order (level, y, x, anchor)."""
        b, q, _ = query_features.shape
        a, d, dr = self.num_anchors, self.embed_dim, self.reg_dim
        score_vectors = self.query_score(query_features).view(b, q, a, d)
        reg_vectors = self.query_reg(query_features).view(b, q, a * 4, dr)
        scores, deltas = [], []
        for feature in features:
            t = self.conv(feature)
            h, w = t.shape[-2:]
            s = query_conditioned(self.anchor_score(t), score_vectors) / math.sqrt(d)   # [B, A, Q, H, W]
            r = query_conditioned(self.anchor_reg(t), reg_vectors) / math.sqrt(dr)      # [B, 4A, Q, H, W]
            scores.append(s.permute(0, 3, 4, 1, 2).reshape(b, h * w * a, q))
            deltas.append(r.view(b, a, 4, q, h, w).permute(0, 4, 5, 1, 3, 2).reshape(b, h * w * a, q, 4))
        return torch.cat(scores, 1).float(), torch.cat(deltas, 1).float()


class CroiHead(nn.Module):
    """RoI pooling, the shared box head (``box_head``: torchvision ``TwoMLPHead``, Faster R-CNN's
    names), the contrastive projection and the query-conditioned regression projections."""

    def __init__(self, box_head_dim: int, embed_dim: int, reg_dim: int):
        super().__init__()
        self.reg_dim = reg_dim
        self.box_roi_pool = MultiScaleRoIAlign(featmap_names=ROI_LEVELS, output_size=7, sampling_ratio=2)
        self.box_head = TwoMLPHead(FPN_CHANNELS * 7 * 7, box_head_dim)
        self.embed = nn.Linear(box_head_dim, embed_dim)
        self.reg_query = nn.Linear(box_head_dim, 4 * reg_dim)
        self.reg_proposal = nn.Linear(box_head_dim, reg_dim)

    def box_features(self, features: dict, boxes: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """``[sum N_i, box_head_dim]`` box-head features of ``boxes`` (per image) on ``features``."""
        pooled = self.box_roi_pool(features, [b.float() for b in boxes], [image_size] * len(boxes))
        return self.box_head(pooled)

    def project(self, box_features: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 contrastive embeddings."""
        return Fn.normalize(self.embed(box_features).float(), dim=-1)

    def regress(self, query_features: torch.Tensor, proposal_features: torch.Tensor) -> torch.Tensor:
        """``[..., 4]`` fp32 deltas: ``b_q`` → 4×D, ``b_p`` → D, dot products."""
        q = self.reg_query(query_features).unflatten(-1, (4, self.reg_dim))
        p = self.reg_proposal(proposal_features).unsqueeze(-2)
        return (q * p).sum(-1).float() / math.sqrt(self.reg_dim)


@dataclass
class PredetRaw:
    """Everything PreDet's losses need, for a batch of B images with Q query slots.

    Boxes are xyxy fp32 in view pixels. ``croi_boxes`` are the RoIs the CROI head pooled
    from view 1: slot q < Q is query q's sampled positive, slots Q.. are the negatives.
    """

    cls_logits: list[torch.Tensor]      # per FPN level [2B, C]: view-1 images, then view-2 images
    anchors: torch.Tensor               # [N, 4], the same for every image (all views are S×S)
    num_anchors_per_level: list[int]
    crpn_scores: torch.Tensor           # [B, N, Q] logits: anchor n matches query q
    crpn_deltas: torch.Tensor           # [B, N, Q, 4] anchor n → query q (CRPN_BOX_WEIGHTS coding)
    proposals: list[torch.Tensor]       # per image [K_i, 4] CRPN proposals after NMS (detached)
    croi_boxes: torch.Tensor            # [B, Q + M, 4] pooled RoIs: Q positives, then M negative slots
    croi_pos_valid: torch.Tensor        # [B, Q] bool: query valid (and so has a positive)
    croi_neg_valid: torch.Tensor        # [B, M] bool: negative slot filled
    query_embed: torch.Tensor           # [B, Q, E] L2-normalised, from view 2
    proposal_embed: torch.Tensor        # [B, Q + M, E] L2-normalised, from view 1
    croi_deltas: torch.Tensor           # [B, Q, 4] positive q → query q (CROI_BOX_WEIGHTS coding)
    queries1: torch.Tensor              # [B, Q, 4] query boxes in view 1
    queries2: torch.Tensor              # [B, Q, 4] the same regions in view 2
    query_valid: torch.Tensor           # [B, Q] bool
    image_size: tuple[int, int]


def random_proposals(queries: torch.Tensor, valid: torch.Tensor, image_size: tuple[int, int], count: int,
                     generator: torch.Generator | None = None, jitter_per_query: int = 4) -> torch.Tensor:
    """Candidate boxes without a CRPN (the paper's ablation without L_crpn "randomly sampled
    positive and negative boxes for each query"): ``jitter_per_query`` jittered copies of each
    valid query (shift up to 10% of its size, scale ×[0.85, 1.18]) plus ``count`` boxes with
    uniform centres and log-uniform sides in [5%, 100%] of the image, clipped."""
    device = queries.device
    h, w = image_size
    q = queries[valid].float()
    parts = []
    if q.numel():
        u = torch.rand((q.shape[0], jitter_per_query, 4), generator=generator, device=device)
        cx, cy = (q[:, 0] + q[:, 2]) / 2, (q[:, 1] + q[:, 3]) / 2
        bw, bh = (q[:, 2] - q[:, 0]).clamp_min(1), (q[:, 3] - q[:, 1]).clamp_min(1)
        ncx = cx[:, None] + (u[..., 0] - 0.5) * 0.2 * bw[:, None]
        ncy = cy[:, None] + (u[..., 1] - 0.5) * 0.2 * bh[:, None]
        nw = bw[:, None] * torch.exp((u[..., 2] - 0.5) * 0.33)
        nh = bh[:, None] * torch.exp((u[..., 3] - 0.5) * 0.33)
        parts.append(torch.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2], -1).reshape(-1, 4))
    u = torch.rand((count, 4), generator=generator, device=device)
    side = torch.exp(math.log(0.05) * (1 - u[:, 2:]))  # log-uniform fraction in [0.05, 1]
    bw, bh = side[:, 0] * w, side[:, 1] * h
    cx, cy = u[:, 0] * w, u[:, 1] * h
    parts.append(torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1))
    return clip_boxes_to_image(torch.cat(parts), (h, w))


def sample_croi_rois(candidates: torch.Tensor, queries: torch.Tensor, valid: torch.Tensor, max_negatives: int,
                     positive_iou: float, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's CROI RoIs. ``candidates [K, 4]`` (the query boxes are appended here, so every
    valid query has a positive), ``queries [Q, 4]``, ``valid [Q]``.

    Returns ``(boxes [Q + M, 4], pos_valid [Q], neg_valid [M])`` with M = ``max_negatives``:
    slot q holds a uniformly random candidate with IoU > ``positive_iou`` to query q (the
    query box itself for invalid slots), the negative slots up to M random candidates with
    IoU < ``positive_iou`` to every valid query (zero boxes where there are fewer).
    """
    device = queries.device
    n_q = queries.shape[0]
    candidates = torch.cat([candidates.float(), queries[valid].float()])
    boxes = torch.zeros((n_q + max_negatives, 4), device=device)
    boxes[:n_q] = queries.float()
    neg_valid = torch.zeros(max_negatives, dtype=torch.bool, device=device)
    if valid.any():
        iou = box_iou(queries.float(), candidates)                       # [Q, K]
        positive = (iou > positive_iou) & valid[:, None]
        draw = torch.rand(iou.shape, generator=generator, device=device)
        pick = torch.where(positive, draw, torch.full_like(draw, -1.0)).argmax(1)
        has_pos = positive.any(1)
        boxes[:n_q][has_pos] = candidates[pick[has_pos]]
        negative = (iou.masked_fill(~valid[:, None], 0.0) < positive_iou).all(0)
        pos_valid = has_pos
    else:
        negative = torch.ones(candidates.shape[0], dtype=torch.bool, device=device)
        pos_valid = torch.zeros(n_q, dtype=torch.bool, device=device)
    neg_index = torch.where(negative)[0]
    order = torch.randperm(neg_index.numel(), generator=generator, device=device)[:max_negatives]
    chosen = neg_index[order]
    boxes[n_q:n_q + chosen.numel()] = candidates[chosen]
    neg_valid[:chosen.numel()] = True
    return boxes, pos_valid, neg_valid


class PreDet(nn.Module):
    """See the module docstring. ``forward`` returns ``PredetRaw``; no losses inside."""

    def __init__(self, arch: PredetArch, num_classes: int):
        super().__init__()
        arch.validate()
        self.arch, self.num_classes = arch, num_classes
        resnet = build_resnet(arch.depth, norm_layer=FrozenBatchNorm2d if arch.frozen_bn else nn.BatchNorm2d)
        self.backbone = _resnet_fpn_extractor(resnet, 5 - arch.freeze_at)
        self.cls_head = nn.Linear(FPN_CHANNELS, num_classes)
        anchors = AnchorGenerator(tuple((s,) for s in arch.anchor_sizes),
                                  (tuple(arch.aspect_ratios),) * len(arch.anchor_sizes))
        head = CrpnHead(arch.num_anchors, arch.box_head_dim, arch.crpn_embed_dim, arch.crpn_reg_dim)
        top_n = {"pre": {"training": arch.rpn_pre_nms_top_n, "testing": arch.rpn_pre_nms_top_n},
                 "post": {"training": arch.rpn_post_nms_top_n, "testing": arch.rpn_post_nms_top_n}}
        # torchvision's RPN for its anchors, box coder and proposal filtering (forward unused:
        # CRPN scores are query-conditioned); its matcher / sampler settings live in the loss config.
        self.rpn = RegionProposalNetwork(anchors, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                                         batch_size_per_image=256, positive_fraction=0.5,
                                         pre_nms_top_n=top_n["pre"], post_nms_top_n=top_n["post"],
                                         nms_thresh=arch.rpn_nms_thresh)
        self.roi_heads = CroiHead(arch.box_head_dim, arch.embed_dim, arch.croi_reg_dim)

    def features(self, images: torch.Tensor) -> dict:
        """FPN levels (fp32, see the module docstring) of normalised ``[B, 3, H, W]`` images."""
        return {k: v.float() for k, v in self.backbone(images).items()}

    @torch.no_grad()
    def _proposals(self, images: ImageList, scores: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                   valid: torch.Tensor, num_anchors_per_level: list[int]) -> list[torch.Tensor]:
        """Per anchor the best valid query's score and regression, decoded, then torchvision's
        top-K per level, clipping, NMS and top ``rpn_post_nms_top_n``."""
        b, n, _ = scores.shape
        masked = scores.masked_fill(~valid[:, None, :], -1e4)
        best_score, best = masked.max(2)                                                   # [B, N]
        best_deltas = deltas.gather(2, best[:, :, None, None].expand(b, n, 1, 4)).squeeze(2)
        boxes = self.rpn.box_coder.decode_single(best_deltas.reshape(-1, 4), anchors.repeat(b, 1))
        proposals, _ = self.rpn.filter_proposals(boxes.view(b, n, 4), best_score, images.image_sizes,
                                                 num_anchors_per_level)
        return proposals

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, queries1: torch.Tensor, queries2: torch.Tensor,
                query_valid: torch.Tensor, *, proposal_source: str = "crpn", max_negatives: int = 512,
                positive_iou: float = 0.5, generator: torch.Generator | None = None) -> PredetRaw:
        """Raw PreDet outputs for ``view1``/``view2`` ``[B, 3, S, S]`` (normalised), queries
        ``[B, Q, 4]`` in each view's pixels and ``query_valid [B, Q]``.

        ``proposal_source``: ``"crpn"`` (the method) or ``"random"`` (the no-L_crpn ablation:
        ``random_proposals``). ``generator`` (on the images' device) draws the CROI samples.
        """
        if proposal_source not in ("crpn", "random"):
            raise ValueError(f"proposal_source must be crpn or random, got {proposal_source!r}")
        b = view1.shape[0]
        size = (int(view1.shape[-2]), int(view1.shape[-1]))
        if tuple(view2.shape[-2:]) != size:
            raise ValueError(f"both views must have the same size, got {size} and {tuple(view2.shape[-2:])}")
        queries1, queries2 = queries1.float(), queries2.float()
        query_valid = query_valid.bool()
        n_q = queries1.shape[1]
        both = self.features(torch.cat([view1, view2]))
        feats1 = {k: v[:b] for k, v in both.items()}
        feats2 = {k: v[b:] for k, v in both.items()}
        cls_logits = [self.cls_head(v.mean(dim=(2, 3))).float() for v in both.values()]

        # queries: view-2 RoI features through the shared box head
        query_features = self.roi_heads.box_features(feats2, list(queries2), size).view(b, n_q, -1)

        # CRPN on view 1
        levels = list(feats1.values())
        image_list = ImageList(view1, [size] * b)
        anchors = self.rpn.anchor_generator(image_list, levels)[0]
        num_anchors_per_level = [lvl.shape[-2] * lvl.shape[-1] * self.arch.num_anchors for lvl in levels]
        scores, deltas = self.rpn.head(levels, query_features)
        if proposal_source == "crpn":
            proposals = self._proposals(image_list, scores, deltas, anchors, query_valid, num_anchors_per_level)
        else:
            proposals = [random_proposals(queries1[i], query_valid[i], size, 2 * max_negatives, generator)
                         for i in range(b)]

        # CROI: positives and negatives from view 1
        sampled = [sample_croi_rois(proposals[i], queries1[i], query_valid[i], max_negatives, positive_iou,
                                    generator) for i in range(b)]
        croi_boxes = torch.stack([s[0] for s in sampled])
        pos_valid = torch.stack([s[1] for s in sampled])
        neg_valid = torch.stack([s[2] for s in sampled])
        proposal_features = self.roi_heads.box_features(feats1, list(croi_boxes), size).view(b, croi_boxes.shape[1], -1)
        return PredetRaw(
            cls_logits=cls_logits, anchors=anchors, num_anchors_per_level=num_anchors_per_level,
            crpn_scores=scores, crpn_deltas=deltas, proposals=proposals, croi_boxes=croi_boxes,
            croi_pos_valid=pos_valid, croi_neg_valid=neg_valid,
            query_embed=self.roi_heads.project(query_features),
            proposal_embed=self.roi_heads.project(proposal_features),
            croi_deltas=self.roi_heads.regress(query_features, proposal_features[:, :n_q]),
            queries1=queries1, queries2=queries2, query_valid=query_valid, image_size=size)

    def roi_features(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """``[sum N_i, box_head_dim]`` box-head features of ``boxes`` (xyxy pixels, per image) on
        normalised ``images [B, 3, H, W]``: backbone, FPN, MultiScaleRoIAlign, box head (the
        IoU-similarity analysis). Call under ``torch.no_grad()``."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return self.roi_heads.box_features(self.features(images), list(boxes), size).float()


def build_predet(arch: PredetArch, num_classes: int) -> PreDet:
    """A randomly initialised PreDet for ``num_classes`` (multi-label) classes."""
    require(num_classes >= 1, "PreDet needs at least one class")
    return PreDet(arch, num_classes)


__all__ = ["PredetArch", "PreDet", "PredetRaw", "build_predet", "predet_normalize", "query_conditioned",
           "sample_croi_rois", "random_proposals", "CRPN_BOX_WEIGHTS", "CROI_BOX_WEIGHTS"]

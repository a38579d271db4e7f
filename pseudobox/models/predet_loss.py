"""PreDet's losses: L = L_cls + L_crpn + L_info + L_croi-reg, each switchable (Table 1).

* ``loss_cls``: multi-label classification on every FPN level of both views, averaged
  over levels. ``cls_loss="softmax"`` is the multi-label cross-entropy of Mahajan et al.
  (the paper's [34]): softmax over classes against the multi-hot target divided by the
  number of labels; ``"bce"`` is per-class sigmoid BCE (mean over classes and images).
* ``loss_crpn_cls`` / ``loss_crpn_reg``: every anchor is matched to the valid query it
  overlaps most (a random valid query when it overlaps none); torchvision's ``Matcher``
  (IoU ≥ 0.7 positive, < 0.3 negative, Faster R-CNN's low-quality matches by default) and
  ``BalancedPositiveNegativeSampler`` (256 per image, half positive at most, the rest
  negative); BCE on the matched query's score, smooth-L1 (beta 1/9) of the positives'
  deltas toward their query, both normalised as torchvision's RPN does.
* ``loss_info``: InfoNCE at temperature tau: per valid query, its sampled positive against
  the image's negatives (``PreDet`` samples them), averaged over queries.
* ``loss_croi_reg``: smooth-L1 (beta 1/9) of the CROI deltas moving each query's positive
  proposal onto the query's view-1 box, summed over coordinates, averaged over queries.

``PredetLoss`` is the ``loss_fn(model, batch)`` of ``engine.train_loop``: it makes the two
views, samples the queries, runs the model and returns ``predet_losses``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as Fn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import box_iou

from pseudobox.config import require
from pseudobox.datasets.views import ViewConfig, two_views
from pseudobox.models.predet import CROI_BOX_WEIGHTS, CRPN_BOX_WEIGHTS, PredetRaw, predet_normalize

TERMS = ("cls", "crpn", "info", "croi_reg")
CLS_LOSSES = ("softmax", "bce")


@dataclass
class PredetLossConfig:
    """Which PreDet loss terms run and their settings (section ``loss``)."""

    cls: bool = True
    crpn: bool = True
    info: bool = True
    croi_reg: bool = True
    cls_weight: float = 1.0
    crpn_weight: float = 1.0      # both CRPN terms
    info_weight: float = 1.0
    croi_reg_weight: float = 1.0
    cls_loss: str = "softmax"
    crpn_fg_iou: float = 0.7
    crpn_bg_iou: float = 0.3
    crpn_low_quality_matches: bool = True   # Faster R-CNN RPN: each query's best anchors are positive too
    crpn_batch_per_image: int = 256
    crpn_positive_fraction: float = 0.5
    positive_iou: float = 0.5     # CROI: positive > this IoU to the query; negatives < it to every query
    max_negatives: int = 512
    temperature: float = 0.07

    def validate(self, prefix: str = "loss") -> None:
        require(any(getattr(self, t) for t in TERMS),
                f"{prefix}: at least one of {', '.join(f'{prefix}.{t}' for t in TERMS)} must be on")
        require(self.cls_loss in CLS_LOSSES, f"{prefix}.cls_loss must be one of {CLS_LOSSES}, got {self.cls_loss!r}")
        for name in ("cls_weight", "crpn_weight", "info_weight", "croi_reg_weight"):
            require(getattr(self, name) >= 0, f"{prefix}.{name} must be >= 0")
        require(0 <= self.crpn_bg_iou <= self.crpn_fg_iou <= 1,
                f"{prefix}.crpn_bg_iou <= {prefix}.crpn_fg_iou must both be in [0, 1]")
        require(self.crpn_batch_per_image >= 1, f"{prefix}.crpn_batch_per_image must be >= 1")
        require(0 < self.crpn_positive_fraction <= 1, f"{prefix}.crpn_positive_fraction must be in (0, 1]")
        require(0 < self.positive_iou < 1, f"{prefix}.positive_iou must be in (0, 1)")
        require(self.max_negatives >= 1, f"{prefix}.max_negatives must be >= 1")
        require(self.temperature > 0, f"{prefix}.temperature must be > 0")


# ------------------------------------------------------------------------------------------ terms

def classification_loss(cls_logits: list[torch.Tensor], labels_multi_hot: torch.Tensor, kind: str = "softmax"
                        ) -> torch.Tensor:
    """Multi-label loss of each level's ``[2B, C]`` logits (both views) against ``[B, C]``
    multi-hot labels, averaged over levels (see the module docstring for ``kind``)."""
    target = labels_multi_hot.float()
    target = torch.cat([target] * (cls_logits[0].shape[0] // target.shape[0]))
    losses = []
    for logits in cls_logits:
        logits = logits.float()
        if kind == "bce":
            losses.append(Fn.binary_cross_entropy_with_logits(logits, target))
        else:
            share = target / target.sum(1, keepdim=True).clamp_min(1)
            losses.append(-(share * Fn.log_softmax(logits, dim=1)).sum(1).mean())
    return torch.stack(losses).mean()


def match_anchors(anchors: torch.Tensor, queries: torch.Tensor, valid: torch.Tensor, matcher: Matcher,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's anchor → query matching.

    Returns ``(labels [N], matched [N])``: labels 1 positive, 0 negative, -1 ignored
    (between the thresholds, or no valid query at all); ``matched`` the index of the valid
    query the anchor overlaps most, or a uniformly random valid query when it overlaps none.
    """
    n = anchors.shape[0]
    index = torch.where(valid)[0]
    if index.numel() == 0:
        return (torch.full((n,), -1.0, device=anchors.device),
                torch.zeros(n, dtype=torch.long, device=anchors.device))
    iou = box_iou(queries[index].float(), anchors.float())          # [Qv, N]
    matches = matcher(iou)
    best_iou, best = iou.max(0)
    none = best_iou <= 0
    if none.any():
        best[none] = torch.randint(index.numel(), (int(none.sum()),), generator=generator,
                                   device=anchors.device)
    labels = (matches >= 0).float()
    labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1.0
    return labels, index[best]


def sample_anchors(labels: list[torch.Tensor], cfg: PredetLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` over per-image anchor labels: up to
    ``crpn_batch_per_image × crpn_positive_fraction`` positives per image, negatives filling
    the rest. Returns (positive, negative) indices into the images' concatenated anchors."""
    sampler = BalancedPositiveNegativeSampler(cfg.crpn_batch_per_image, cfg.crpn_positive_fraction)
    pos_masks, neg_masks = sampler(labels)
    return torch.where(torch.cat(pos_masks).bool())[0], torch.where(torch.cat(neg_masks).bool())[0]


def crpn_losses(raw: PredetRaw, cfg: PredetLossConfig, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_crpn_cls, loss_crpn_reg)`` as torchvision's RPN computes them, with each
    anchor's score and deltas taken for its matched query."""
    matcher = Matcher(cfg.crpn_fg_iou, cfg.crpn_bg_iou, allow_low_quality_matches=cfg.crpn_low_quality_matches)
    coder = BoxCoder(CRPN_BOX_WEIGHTS)
    scores, deltas = raw.crpn_scores.float(), raw.crpn_deltas.float()
    b, n, _ = scores.shape
    labels, matched = zip(*(match_anchors(raw.anchors, raw.queries1[i], raw.query_valid[i], matcher, generator)
                            for i in range(b)))
    pos, neg = sample_anchors(list(labels), cfg)
    sampled = torch.cat([pos, neg])
    matched = torch.stack(matched)                                           # [B, N]
    if sampled.numel() == 0:
        zero = 0.0 * (scores.sum() + deltas.sum())
        return zero, zero
    flat_scores = scores.gather(2, matched[:, :, None]).reshape(-1)           # [B*N]
    flat_labels = torch.cat(labels)
    cls = Fn.binary_cross_entropy_with_logits(flat_scores[sampled], flat_labels[sampled])
    flat_deltas = deltas.gather(2, matched[:, :, None, None].expand(b, n, 1, 4)).reshape(-1, 4)
    image = pos // n
    target_boxes = raw.queries1[image, matched.reshape(-1)[pos]]
    targets = coder.encode_single(target_boxes, raw.anchors[pos % n])
    reg = Fn.smooth_l1_loss(flat_deltas[pos], targets, beta=1 / 9, reduction="sum") / sampled.numel()
    return cls, reg


def info_nce(query_embed: torch.Tensor, positive_embed: torch.Tensor, negative_embed: torch.Tensor,
             query_valid: torch.Tensor, negative_valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over queries: ``query_embed`` / ``positive_embed [B, Q, E]`` (row q: query q and
    its positive), ``negative_embed [B, M, E]`` (each image's shared negatives), masks
    ``[B, Q]`` / ``[B, M]``. Scores are dot products (cosines for unit vectors) over
    ``temperature``; the mean over valid queries of -log softmax of the positive."""
    q, p, neg = query_embed.float(), positive_embed.float(), negative_embed.float()
    s_pos = (q * p).sum(-1) / temperature                                    # [B, Q]
    s_neg = torch.einsum("bqe,bme->bqm", q, neg) / temperature                # [B, Q, M]
    s_neg = s_neg.masked_fill(~negative_valid[:, None, :], float("-inf"))
    logits = torch.cat([s_pos[..., None], s_neg], dim=-1)
    per_query = torch.logsumexp(logits, dim=-1) - s_pos
    if not query_valid.any():
        return 0.0 * (q.sum() + p.sum() + neg.sum())
    return per_query[query_valid].mean()


def croi_regression_loss(raw: PredetRaw) -> torch.Tensor:
    """Smooth-L1 of the CROI deltas toward each query's view-1 box from its positive proposal."""
    deltas = raw.croi_deltas.float()
    n_q = deltas.shape[1]
    valid = raw.croi_pos_valid
    if not valid.any():
        return 0.0 * deltas.sum()
    coder = BoxCoder(CROI_BOX_WEIGHTS)
    targets = coder.encode_single(raw.queries1[valid], raw.croi_boxes[:, :n_q][valid].float())
    return Fn.smooth_l1_loss(deltas[valid], targets, beta=1 / 9, reduction="sum") / valid.sum()


def predet_losses(raw: PredetRaw, labels_multi_hot: torch.Tensor, cfg: PredetLossConfig,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The enabled terms: ``loss_cls``, ``loss_crpn_cls``, ``loss_crpn_reg``, ``loss_info``,
    ``loss_croi_reg`` (weighted; their sum is the training loss). Computed in fp32 with
    autocast off. ``generator`` draws the random query of anchors that overlap none."""
    device_type = raw.crpn_scores.device.type
    out: dict[str, torch.Tensor] = {}
    with torch.autocast(device_type, enabled=False):
        if cfg.cls:
            out["loss_cls"] = cfg.cls_weight * classification_loss(raw.cls_logits, labels_multi_hot, cfg.cls_loss)
        if cfg.crpn:
            cls, reg = crpn_losses(raw, cfg, generator)
            out["loss_crpn_cls"] = cfg.crpn_weight * cls
            out["loss_crpn_reg"] = cfg.crpn_weight * reg
        if cfg.info:
            n_q = raw.query_embed.shape[1]
            out["loss_info"] = cfg.info_weight * info_nce(
                raw.query_embed, raw.proposal_embed[:, :n_q], raw.proposal_embed[:, n_q:], raw.croi_pos_valid,
                raw.croi_neg_valid, cfg.temperature)
        if cfg.croi_reg:
            out["loss_croi_reg"] = cfg.croi_reg_weight * croi_regression_loss(raw)
        # Switched-off terms stay in the graph at weight 0: every parameter gets a gradient
        # on every rank, which DDP needs (its unused-parameter search cannot see into the
        # PredetRaw dataclass); those parameters see weight decay only. nan_to_num: an
        # overflowing unused branch must not turn the loss into 0 × inf = NaN.
        unused = []
        if not cfg.cls:
            unused += raw.cls_logits
        if not cfg.crpn:
            unused += [raw.crpn_scores, raw.crpn_deltas]
        if not cfg.info:
            unused += [raw.query_embed, raw.proposal_embed]
        if not cfg.croi_reg:
            unused += [raw.croi_deltas]
        if unused:
            first = next(iter(out))
            out[first] = out[first] + 0.0 * sum(torch.nan_to_num(t.float(), 0.0, 0.0, 0.0).sum() for t in unused)
    return out


# ------------------------------------------------------------------------------- the training loss_fn

def multi_hot(labels, num_classes: int, device=None) -> torch.Tensor:
    """``[B, C]`` float multi-hot rows from per-image class-index lists."""
    out = torch.zeros((len(labels), num_classes), device=device)
    for i, row in enumerate(labels):
        idx = np.asarray(row, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
            raise ValueError(f"image {i} has label(s) {idx.tolist()} outside 0..{num_classes - 1}")
        out[i, torch.as_tensor(idx, device=device)] = 1.0
    return out


def sample_queries(boxes1: torch.Tensor, boxes2: torch.Tensor, valid: torch.Tensor, num_queries: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_queries`` boxes drawn uniformly without replacement among the usable ones; with
    fewer usable boxes all are taken and the remaining slots are zero boxes, masked off."""
    device = boxes1.device
    usable = torch.where(valid)[0]
    pick = usable[torch.randperm(usable.numel(), generator=generator)[:num_queries].to(device)]
    q1 = torch.zeros((num_queries, 4), device=device)
    q2 = torch.zeros((num_queries, 4), device=device)
    mask = torch.zeros(num_queries, dtype=torch.bool, device=device)
    q1[:pick.numel()], q2[:pick.numel()], mask[:pick.numel()] = boxes1[pick], boxes2[pick], True
    return q1, q2, mask


class PredetLoss:
    """``loss_fn(model, batch)`` for ``engine.train_loop``.

    ``batch`` (numpy, as Ray Data gives it): ``"image"`` object array of HWC uint8 images,
    ``"labels"`` object array of class-index lists, ``"queries"`` object array of ``[N, 4]``
    float32 EdgeBoxes in image pixels. Per image: two views (``two_views``), then
    ``model.arch.num_queries`` queries drawn among the usable boxes (``sample_queries``).
    ``rng`` (a numpy Generator or a seed) seeds each call's torch generators, so a run with
    the same seed sees the same views, queries and CROI samples (the anchor sampler draws
    from torch's global RNG, as torchvision's does).
    """

    def __init__(self, view_cfg: ViewConfig, loss_cfg: PredetLossConfig, num_classes: int, device=None, rng=0):
        view_cfg.validate()
        loss_cfg.validate()
        self.view_cfg, self.loss_cfg, self.num_classes = view_cfg, loss_cfg, num_classes
        self.device = torch.device(device or "cpu")
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.last_stats: dict[str, float] = {}

    def _generators(self) -> tuple[torch.Generator, torch.Generator]:
        seeds = self.rng.integers(0, 2 ** 62, size=2)
        cpu = torch.Generator().manual_seed(int(seeds[0]))
        dev = torch.Generator(device=self.device).manual_seed(int(seeds[1]))
        return cpu, dev

    def inputs(self, batch: dict, num_queries: int, generator: torch.Generator) -> dict:
        """The model's inputs for a numpy ``batch``: normalised views, queries, masks, labels."""
        v1, v2, q1, q2, qv = [], [], [], [], []
        for image, queries in zip(batch["image"], batch["queries"]):
            # torch.tensor copies: Ray Data hands out read-only arrays
            img = torch.tensor(np.asarray(image), dtype=torch.uint8, device=self.device).permute(2, 0, 1)
            boxes = torch.tensor(np.asarray(queries, dtype=np.float32).reshape(-1, 4), device=self.device)
            a, b1, b, b2, valid = two_views(img, boxes, self.view_cfg, generator)
            s1, s2, m = sample_queries(b1, b2, valid, num_queries, generator)
            v1.append(a), v2.append(b), q1.append(s1), q2.append(s2), qv.append(m)
        return {"view1": predet_normalize(torch.stack(v1)), "view2": predet_normalize(torch.stack(v2)),
                "queries1": torch.stack(q1), "queries2": torch.stack(q2), "query_valid": torch.stack(qv),
                "labels": multi_hot(batch["labels"], self.num_classes, self.device)}

    def __call__(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        inner = model.module if hasattr(model, "module") else model
        arch = inner.arch
        if arch.crop_size != self.view_cfg.crop_size:
            raise ValueError(f"model.crop_size {arch.crop_size} != views.crop_size {self.view_cfg.crop_size}")
        if abs(arch.temperature - self.loss_cfg.temperature) > 1e-12:
            raise ValueError(f"model.temperature {arch.temperature} != loss.temperature {self.loss_cfg.temperature}")
        cpu_gen, dev_gen = self._generators()
        with torch.autocast(self.device.type, enabled=False):
            x = self.inputs(batch, arch.num_queries, cpu_gen)
        raw = model(x["view1"], x["view2"], x["queries1"], x["queries2"], x["query_valid"],
                    proposal_source="crpn" if self.loss_cfg.crpn else "random",
                    max_negatives=self.loss_cfg.max_negatives, positive_iou=self.loss_cfg.positive_iou,
                    generator=dev_gen)
        valid = x["query_valid"]
        self.last_stats = {"queries_per_image": float(valid.sum()) / max(1, valid.shape[0]),
                           "negatives_per_image": float(raw.croi_neg_valid.sum()) / max(1, valid.shape[0]),
                           "proposals_per_image": sum(p.shape[0] for p in raw.proposals) / max(1, valid.shape[0])}
        return predet_losses(raw, x["labels"], self.loss_cfg, dev_gen)


__all__ = ["PredetLossConfig", "predet_losses", "PredetLoss", "classification_loss", "match_anchors",
           "crpn_losses", "sample_anchors", "info_nce", "croi_regression_loss", "multi_hot", "sample_queries", "TERMS"]

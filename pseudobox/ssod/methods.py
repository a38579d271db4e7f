"""Semi-supervised methods: what each brings to the one training loop (``engine.train_loop``).

A method is a supervised loss, an unsupervised loss, and the state they need. The loop
around it is the same for all of them:

* ``SemiSupervisedLoss`` is the loop's ``loss_fn``: labelled images get the weak view
  (flip) and the strong photometric view and train the student with the method's
  supervised loss; once the teacher is active, unlabelled images get a weak view for the
  teacher and a strong view (of that weak view) for the student, and the method's
  unsupervised loss, times ``unsup_weight`` and the ramp, is added.
* its ``after_step`` is the loop's hook after each optimizer step: the EMA teacher update.
* the guards (non-finite losses are the loop's; an exploding unsupervised/supervised
  ratio and a silent teacher are here) and the pseudo-label monitor live here too.

A method class brings: the detector it trains (``detector``), ``supervised_losses``,
``unsupervised_losses`` and ``state_dict``/``load_state_dict`` for any state it keeps
(thresholds, statistics). The next methods (Consistent-Teacher, certainty-aware
pseudo-labels) add their own head through the detector builder, their assignment inside
``unsupervised_losses`` and their thresholds through ``pseudo_filter``.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from pseudobox.config import require
from pseudobox.ssod.augment import StrongAugConfig, strong_view
from pseudobox.ssod.pseudo_labels import PseudoLabelMonitor, ScoreThresholdFilter, map_pseudo_labels
from pseudobox.ssod.teacher import EmaTeacher

log = logging.getLogger("pseudobox")

MIN_BOX_SIDE = 1.0  # pixels; degenerate pseudo-boxes would give infinite regression targets
ROI_CLS_LOSSES = ("focal", "ce")


@dataclass
class SsodConfig:
    """The semi-supervised settings of ``finetune-ssod`` (``ssod.*``)."""

    unlabeled_ratio: int = 4          # unlabelled images per labelled image in a step (1:4)
    burn_in_iters: int = 2000         # labelled-only steps before the unsupervised loss starts
    teacher_copy_iters: int = -1      # the step after which the teacher copies the student; -1: end of burn-in
    ema_momentum: float = 0.9996
    unsup_weight: float = 4.0         # Unbiased Teacher: 4; Dense Teacher: 4 (10% COCO) or 2
    unsup_ramp_iters: int = 0         # linear ramp of the unsupervised weight after burn-in
    flip_prob: float = 0.5            # the weak view's horizontal flip
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    # mean-teacher (Faster R-CNN)
    score_threshold: float = 0.7      # pseudo-labels: teacher detections after NMS at or above it
    teacher_proposals: int = 0        # RPN proposals the teacher's RoI head scores; 0: the test setting (1000)
    unsup_box_regression: bool = False  # Unbiased Teacher drops the unsupervised regression losses
    roi_cls_loss: str = "focal"       # RoI classifier loss, supervised and unsupervised: focal (UT) or ce
    focal_gamma: float = 1.5
    # dense-teacher (FCOS)
    region_ratio: float = 0.01        # the top share of positions by teacher max score
    # guards and monitoring
    max_unsup_ratio: float = 50.0     # stop when mean weighted unsup loss / mean sup loss exceeds it ...
    guard_window: int = 20            # ... over this many steps (0: off)
    monitor_window: int = 50          # steps per pseudo-label statistics window (warns on a silent teacher)

    def validate(self) -> None:
        require(self.unlabeled_ratio >= 1, "ssod.unlabeled_ratio must be >= 1")
        require(self.burn_in_iters >= 0, "ssod.burn_in_iters must be >= 0")
        require(self.teacher_copy_iters == -1 or 0 <= self.teacher_copy_iters <= self.burn_in_iters,
                "ssod.teacher_copy_iters must be -1 (end of burn-in) or in [0, ssod.burn_in_iters]")
        require(0.0 <= self.ema_momentum < 1.0, "ssod.ema_momentum must be in [0, 1)")
        require(self.unsup_weight >= 0, "ssod.unsup_weight must be >= 0")
        require(self.unsup_ramp_iters >= 0, "ssod.unsup_ramp_iters must be >= 0")
        require(0.0 <= self.flip_prob <= 1.0, "ssod.flip_prob must be in [0, 1]")
        require(0.0 < self.score_threshold < 1.0, "ssod.score_threshold must be in (0, 1)")
        require(self.teacher_proposals >= 0, "ssod.teacher_proposals must be >= 0 (0: the detector's test setting)")
        require(self.roi_cls_loss in ROI_CLS_LOSSES, f"ssod.roi_cls_loss must be one of {ROI_CLS_LOSSES}")
        require(self.focal_gamma >= 0, "ssod.focal_gamma must be >= 0")
        require(0.0 < self.region_ratio <= 1.0, "ssod.region_ratio must be in (0, 1]")
        require(self.max_unsup_ratio > 0, "ssod.max_unsup_ratio must be > 0")
        require(self.guard_window >= 0 and self.monitor_window >= 1,
                "ssod.guard_window must be >= 0 and ssod.monitor_window >= 1")
        self.strong.validate()

    @property
    def copy_iters(self) -> int:
        return self.burn_in_iters if self.teacher_copy_iters < 0 else self.teacher_copy_iters


def detector_targets(boxes: torch.Tensor, labels: torch.Tensor) -> dict:
    """Detector targets (label + 1) from 0-based boxes and labels: plain tensors (not
    inference tensors, which autograd refuses to save), boxes thinner than a pixel dropped
    (torchvision refuses them; their regression targets would be infinite)."""
    boxes, labels = boxes.clone(), labels.clone()
    ok = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)
    return {"boxes": boxes[ok], "labels": labels[ok] + 1}


def faster_rcnn_losses(raw, roi_cls_loss: str = "ce", gamma: float = 1.5) -> dict:
    """Faster R-CNN's four losses from its raw training outputs (``detectors.FasterRcnnRaw``):
    torchvision's RPN losses and ``fastrcnn_loss``, the RoI classifier's cross-entropy
    replaced by the softmax focal loss with ``roi_cls_loss="focal"`` (Unbiased Teacher)."""
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    from pseudobox.ssod.losses import softmax_focal_loss

    cross_entropy, box_loss = fastrcnn_loss(raw.class_logits, raw.box_regression, [raw.labels],
                                            [raw.regression_targets])
    classifier = softmax_focal_loss(raw.class_logits, raw.labels, gamma) if roi_cls_loss == "focal" else cross_entropy
    return {**raw.rpn_losses, "loss_classifier": classifier, "loss_box_reg": box_loss}


@torch.inference_mode()
def teacher_detections(detector: torch.nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """The teacher's post-processed detections (after NMS) on the images' device, labels
    0-based; RetinaNet/FCOS's never-trained background slot is dropped."""
    from pseudobox.models.detectors import foreground_detections

    return foreground_detections(detector(images))


class Method:
    """The method interface, and itself ``supervised``: the labelled-only baseline of every
    table (same views, schedule and supervised loss as the teacher-student methods)."""

    name = "supervised"
    detector: str | None = None  # None: any detector
    uses_teacher = False

    def __init__(self, cfg: SsodConfig):
        self.cfg = cfg

    def supervised_losses(self, student, images: list[torch.Tensor], targets: list[dict]) -> dict:
        """Torchvision's own detector losses (Faster R-CNN: with the focal RoI classifier
        when ``ssod.roi_cls_loss`` says so, so that the baseline matches mean-teacher's
        supervised half)."""
        from pseudobox.models.detectors import is_faster_rcnn

        if is_faster_rcnn(student) and self.cfg.roi_cls_loss == "focal":
            raw = student(images, targets, outputs="faster_rcnn_raw")
            return faster_rcnn_losses(raw, roi_cls_loss="focal", gamma=self.cfg.focal_gamma)
        return student(images, targets)

    def unsupervised_losses(self, student, teacher: torch.nn.Module, weak: list[torch.Tensor],
                            generator: torch.Generator, monitor: PseudoLabelMonitor,
                            gt: list[dict] | None) -> dict:
        """A teacher-student method's loss terms on the weak views ``weak`` (unweighted; the
        caller applies ``unsup_weight`` × ramp), after feeding ``monitor`` its pseudo-labels.
        ``supervised`` has none (``uses_teacher`` False: it is never asked)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MeanTeacher(Method):
    """Unbiased Teacher's Mean Teacher on Faster R-CNN: teacher detections after NMS,
    filtered at ``score_threshold``, are the student's targets on the strong view; the
    unsupervised loss is the RPN objectness and the (focal) RoI classification, without
    box regression unless ``unsup_box_regression``."""

    name = "mean-teacher"
    detector = "faster_rcnn"
    uses_teacher = True

    def __init__(self, cfg: SsodConfig):
        super().__init__(cfg)
        self.pseudo_filter = ScoreThresholdFilter(cfg.score_threshold)

    def unsupervised_losses(self, student, teacher, weak, generator, monitor, gt):
        with teacher_proposals(teacher, self.cfg.teacher_proposals):
            detections = teacher_detections(teacher, weak)
        pseudo = self.pseudo_filter(detections)
        monitor.update(pseudo, gt, raw_scores=torch.cat([d["scores"] for d in detections]))
        strong, geometries = zip(*(strong_view(im, self.cfg.strong, generator) for im in weak))
        pseudo = map_pseudo_labels(pseudo, list(geometries))
        targets = [detector_targets(p["boxes"], p["labels"]) for p in pseudo]
        raw = student(list(strong), targets, outputs="faster_rcnn_raw")
        losses = faster_rcnn_losses(raw, roi_cls_loss=self.cfg.roi_cls_loss, gamma=self.cfg.focal_gamma)
        keep = ("loss_objectness", "loss_classifier") + (
            ("loss_rpn_box_reg", "loss_box_reg") if self.cfg.unsup_box_regression else ())
        return {k: v for k, v in losses.items() if k in keep}

    def state_dict(self) -> dict:
        return {"pseudo_filter": self.pseudo_filter.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pseudo_filter.load_state_dict(state.get("pseudo_filter", {}))


class DenseTeacher(Method):
    """Dense Teacher on FCOS: the teacher's raw post-sigmoid scores are the targets, no NMS
    and no threshold; QFL everywhere, GIoU and quality BCE on the top ``region_ratio`` of
    positions across levels and images (``ssod.dense_teacher.dense_teacher_loss``).

    Teacher and student must see the same positions, so the strong view is photometric
    only (``ssod.strong.geometric`` is refused) and both run at one short side per step."""

    name = "dense-teacher"
    detector = "fcos"
    uses_teacher = True

    def __init__(self, cfg: SsodConfig):
        super().__init__(cfg)
        self.monitor_filter = ScoreThresholdFilter(cfg.score_threshold)

    def unsupervised_losses(self, student, teacher, weak, generator, monitor, gt):
        from pseudobox.models.detectors import fcos_raw_outputs, inner_detector
        from pseudobox.ssod.dense_teacher import dense_teacher_loss

        detector = inner_detector(student)
        sizes = detector.transform.min_size
        size = sizes[int(torch.randint(len(sizes), (1,), generator=generator))]
        with fixed_short_side(detector, size), fixed_short_side(teacher, size):
            with torch.inference_mode():
                teacher_raw = fcos_raw_outputs(teacher, weak)
                detections = fcos_detections(teacher, teacher_raw)
            # The monitor sees what a thresholded teacher would give; training uses the dense scores.
            pseudo = self.monitor_filter(detections)
            monitor.update(pseudo, gt, raw_scores=torch.cat([d["scores"] for d in detections]))
            strong = [strong_view(im, self.cfg.strong, generator)[0] for im in weak]
            student_raw = student(strong, outputs="fcos_raw")
        return dense_teacher_loss(student_raw, teacher_raw, ratio=self.cfg.region_ratio)


METHODS = {cls.name: cls for cls in (Method, MeanTeacher, DenseTeacher)}


class teacher_proposals:
    """Context: a Faster R-CNN scores ``count`` RPN proposals per image at inference (0: as
    configured). The RoI head's cost is linear in it: at 1000 proposals it outweighs a
    ResNet-18 backbone on small images many times over."""

    def __init__(self, detector, count: int):
        self.rpn, self.count = detector.rpn, count

    def __enter__(self):
        self.saved = dict(self.rpn._post_nms_top_n)
        if self.count:
            self.rpn._post_nms_top_n = {**self.saved, "testing": self.count}

    def __exit__(self, *exc):
        self.rpn._post_nms_top_n = self.saved


class fixed_short_side:
    """Context: a torchvision detector's transform resizes to one short side (train and eval)."""

    def __init__(self, detector, size: int):
        self.transform, self.size = detector.transform, size

    def __enter__(self):
        self.saved = self.transform.min_size
        self.transform.min_size = (self.size,)

    def __exit__(self, *exc):
        self.transform.min_size = self.saved


def fcos_detections(detector, raw) -> list[dict]:
    """Post-processed FCOS detections from raw outputs (torchvision's own per-level
    post-processing and mapping back to the input frame), 0-based labels, background dropped."""
    from pseudobox.models.detectors import foreground_detections

    split = {"cls_logits": list(raw.cls_logits.split(raw.num_anchors_per_level, dim=1)),
             "bbox_regression": list(raw.bbox_regression.split(raw.num_anchors_per_level, dim=1)),
             "bbox_ctrness": list(raw.bbox_ctrness.split(raw.num_anchors_per_level, dim=1))}
    anchors = [list(a.split(raw.num_anchors_per_level)) for a in raw.anchors]
    outs = detector.postprocess_detections(split, anchors, raw.image_sizes)
    return foreground_detections(detector.transform.postprocess(outs, raw.image_sizes, raw.original_sizes))


class SemiSupervisedLoss:
    """The training loop's ``loss_fn`` and ``after_step`` for every method.

    A batch is ``{"labeled": (images, targets), "unlabeled": (weak images, gt or None)}``
    with images as CHW float tensors on the device; ``unlabeled`` is None for
    ``supervised``. Loss terms come back prefixed ``sup_`` / ``unsup_``; the unsupervised
    ones already carry ``unsup_weight`` × ramp.
    """

    def __init__(self, method: Method, teacher: EmaTeacher | None, class_names: list[str], start_step: int,
                 generator: torch.Generator):
        self.method, self.teacher, self.cfg = method, teacher, method.cfg
        self.step, self.generator, self.class_names = start_step, generator, list(class_names)
        self.monitor = PseudoLabelMonitor(len(class_names), window=self.cfg.monitor_window)
        self.ratios: deque = deque(maxlen=max(1, self.cfg.guard_window))
        self.collapsed_steps = 0

    def __call__(self, student, batch) -> dict:
        images, targets = batch["labeled"]
        losses = {f"sup_{k.removeprefix('loss_')}": v
                  for k, v in self.method.supervised_losses(student, images, targets).items()}
        self.check_box_regression(losses)
        weight = self.teacher.weight(self.step) * self.cfg.unsup_weight if self.teacher is not None else 0.0
        if weight > 0 and batch.get("unlabeled") is not None:
            weak, gt = batch["unlabeled"]
            unsup = self.method.unsupervised_losses(student, self.teacher.module, weak, self.generator,
                                                    self.monitor, gt)
            unsup = {f"unsup_{k.removeprefix('loss_')}": v * weight for k, v in unsup.items()}
            self.check_ratio(losses, unsup)
            losses.update(unsup)
        return losses

    def check_ratio(self, sup: dict, unsup: dict) -> None:
        """Stop a run whose unsupervised loss explodes against the supervised one
        (``unbiased-teacher-v2`` #7): the mean ratio over ``guard_window`` steps."""
        if not self.cfg.guard_window:
            return
        s = float(sum(v.detach().float() for v in sup.values()))
        u = float(sum(v.detach().float() for v in unsup.values()))
        self.ratios.append(u / max(s, 1e-8))
        if len(self.ratios) == self.ratios.maxlen:
            mean = sum(self.ratios) / len(self.ratios)
            if not math.isfinite(mean) or mean > self.cfg.max_unsup_ratio:
                raise FloatingPointError(
                    f"the unsupervised loss exploded: weighted unsupervised / supervised loss averaged "
                    f"{mean:.1f} over the last {len(self.ratios)} steps (limit ssod.max_unsup_ratio="
                    f"{self.cfg.max_unsup_ratio:g}) at step {self.step}; lower ssod.unsup_weight or optim.lr, "
                    f"raise ssod.burn_in_iters or ssod.score_threshold")

    def check_box_regression(self, sup: dict) -> None:
        """Stop a run whose FCOS box branch has died: torchvision's FCOS puts its ltrb
        regressions through a ReLU, and one large early step can push every output below 0.
        Then every box has zero size, the GIoU loss is exactly 1 and no gradient revives it
        (seen at lr 0.01 with 2 images per step). A teacher copied from such a student
        would give only degenerate boxes."""
        giou = sup.get("sup_bbox_regression")
        if giou is None or not self.cfg.guard_window:
            return
        self.collapsed_steps = self.collapsed_steps + 1 if float(giou.detach()) >= 0.9999 else 0
        if self.collapsed_steps >= self.cfg.guard_window:
            raise FloatingPointError(
                f"the box regression has collapsed: the supervised GIoU loss was 1.0 for {self.collapsed_steps} "
                f"steps at step {self.step} (every ltrb output is 0 after FCOS's ReLU, so every box has zero "
                f"size); lower optim.lr or raise optim.warmup_iters")

    def after_step(self, step: int, student) -> None:
        """After optimizer step ``step`` (steps completed): EMA teacher update, monitor window."""
        self.step = step
        if self.teacher is not None:
            from pseudobox.models.detectors import inner_detector

            self.teacher.after_step(step, inner_detector(student))
            if self.teacher.active(step) and step % self.cfg.monitor_window == 0:
                warning = self.monitor.warn_if_empty()
                if warning:
                    log.warning("step %d: %s", step, warning)

    def metrics(self) -> dict:
        """The pseudo-label statistics since the last row, for the history: ``pseudo/precision``,
        ``pseudo/recall`` (IoU 0.5, when the unlabelled images carry ground truth),
        ``pseudo/per_image``, and per class ``pseudo/precision/<class>``, ``pseudo/recall/<class>``."""
        if self.teacher is None or not self.teacher.active(self.step):
            return {}
        summary = self.monitor.summary()
        self.monitor.reset()
        row = {"pseudo/per_image": summary.get("pseudo_per_image"), "pseudo/precision": summary.get("precision"),
               "pseudo/recall": summary.get("recall")}
        for kind in ("precision", "recall"):
            for name, value in zip(self.class_names, summary.get(f"{kind}_per_class") or []):
                row[f"pseudo/{kind}/{name}"] = value
        return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "ratios": list(self.ratios),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state.get("method") or {})
        self.ratios.extend(state.get("ratios") or [])
        if self.teacher is not None and state.get("teacher"):
            self.teacher.load_state_dict(state["teacher"])

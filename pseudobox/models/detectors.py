"""Detector builders: torchvision Faster R-CNN / RetinaNet / FCOS on a ResNet-FPN of any depth.

Built the way torchvision's own ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn`` /
``fcos_resnet50_fpn`` are, but for any ResNet depth and with our initialisation paths:

* ``init_backbone_from_classifier``: DAP pre-training and the CLS baseline start the
  backbone from the step-1 classifier; FPN and heads start random.
* ``transfer_detector_weights``: fine-tuning starts from a pre-trained detector and
  re-initialises the class-dependent layers (always, unless asked to keep them for
  the very same classes).

Both report the weights the checkpoint did not provide and refuse a checkpoint that
lacks any backbone weight.

Detector label = class index + 1 (0 is background for Faster R-CNN; RetinaNet and FCOS
never train slot 0). ``predict`` maps outputs back to class indices.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pseudobox.config import require
from pseudobox.models.checkpoint import CheckpointError
from pseudobox.models.classifier import IMAGENET_MEAN, IMAGENET_STD, build_resnet

log = logging.getLogger(__name__)

DETECTORS = ("faster_rcnn", "retinanet", "fcos")
# Parameters whose meaning (and shape) depends on the classes, per detector: output k is class k.
CLASS_DEPENDENT = {
    "faster_rcnn": ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred."),
    "retinanet": ("head.classification_head.cls_logits.",),
    "fcos": ("head.classification_head.cls_logits.",),
}


@dataclass
class DetectorArch:
    """What a detector is; stored in checkpoints so later stages can rebuild it."""

    detector: str = "faster_rcnn"
    depth: int = 50
    frozen_bn: bool = True
    freeze_at: int = 2  # 0: train everything; 1: freeze the stem; 2: stem + res2 (detectron2's default)
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    test_size: int = 800
    detections_per_image: int = 100
    score_thresh: float = 0.05
    # Faster R-CNN sampling; the RoI head's cost grows with these (smaller for small images).
    rpn_post_nms_top_n_train: int = 2000
    box_batch_size_per_image: int = 512

    def validate(self) -> None:
        require(self.detector in DETECTORS, f"model.detector must be one of {DETECTORS}, got {self.detector!r}")
        require(self.depth in (18, 34, 50, 101, 152), "model.depth must be 18, 34, 50, 101 or 152")
        require(0 <= self.freeze_at <= 5, "model.freeze_at must be in 0..5")
        require(len(self.min_size) > 0 and min(self.min_size) >= 32, "model.min_size must be short sides >= 32")
        require(self.max_size >= max(self.min_size), "model.max_size must be >= every model.min_size")

    def identity(self) -> dict:
        """The fields that must match for weights to transfer."""
        return {"detector": self.detector, "depth": self.depth}


def build_detector(arch: DetectorArch, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision detector for ``num_classes`` foreground classes."""
    resnet = build_resnet(arch.depth, norm_layer=FrozenBatchNorm2d if arch.frozen_bn else nn.BatchNorm2d)
    trainable = 5 - arch.freeze_at
    common = dict(min_size=arch.min_size, max_size=arch.max_size, image_mean=list(IMAGENET_MEAN),
                  image_std=list(IMAGENET_STD))
    if arch.detector == "faster_rcnn":
        backbone = _resnet_fpn_extractor(resnet, trainable)
        model = FasterRCNN(backbone, num_classes=num_classes + 1, box_score_thresh=arch.score_thresh,
                           box_detections_per_img=arch.detections_per_image,
                           rpn_post_nms_top_n_train=arch.rpn_post_nms_top_n_train,
                           box_batch_size_per_image=arch.box_batch_size_per_image, **common)
    else:
        # P3-P7, P6 from P5 (256 channels at any depth), as torchvision's retinanet / fcos builders.
        backbone = _resnet_fpn_extractor(resnet, trainable, returned_layers=[2, 3, 4],
                                         extra_blocks=LastLevelP6P7(256, 256))
        one_stage = RetinaNet if arch.detector == "retinanet" else FCOS
        model = one_stage(backbone, num_classes=num_classes + 1, score_thresh=arch.score_thresh,
                          detections_per_img=arch.detections_per_image, **common)
    return keep_box_math_fp32(model)


def _floats_to_fp32(value):
    """``value`` (a tensor, or a list / tuple / dict of them) with reduced-precision floats cast to fp32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):
        return type(value)((k, _floats_to_fp32(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_floats_to_fp32(v) for v in value)
    return value


def _fp32_output_hook(module, inputs, output):
    return _floats_to_fp32(output)


# The modules whose outputs feed box math: FPN features (anchors take their dtype, RoI
# pooling reads them), the heads' scores and box deltas (box coding, NMS, the losses).
FP32_OUTPUTS = {"faster_rcnn": ("backbone", "rpn.head", "roi_heads.box_predictor"),
                "retinanet": ("backbone", "head.classification_head", "head.regression_head"),
                "fcos": ("backbone", "head.classification_head", "head.regression_head")}


def keep_box_math_fp32(model: nn.Module) -> nn.Module:
    """Under autocast (bf16 / fp16), convolutions and linear layers run in reduced precision
    but anchors, proposals, box encoding/decoding, RoI pooling, NMS and the losses stay in
    fp32. Torchvision's detectors take those dtypes from the features, so without this a
    bf16 forward builds bf16 anchors (8 significant bits: 2 px steps at 300 px) and bf16
    regression targets. Forward hooks cast the ``FP32_OUTPUTS`` modules' outputs to fp32
    (a no-op outside autocast); parameter names and checkpoints are unchanged."""
    kinds = {FasterRCNN: "faster_rcnn", RetinaNet: "retinanet", FCOS: "fcos"}
    kind = next(k for cls, k in kinds.items() if isinstance(model, cls))
    for name in FP32_OUTPUTS[kind]:
        model.get_submodule(name).register_forward_hook(_fp32_output_hook)
    return model


def _is_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: a step counter, not a weight (FrozenBatchNorm has none)."""
    return key.endswith("num_batches_tracked")


def _shape_compatible_copy(model: nn.Module, source: dict, rename) -> tuple[int, list[str]]:
    """Copy ``source`` tensors into ``model`` under ``rename(key)``; returns (copied, mismatched)."""
    target = model.state_dict()
    copied, mismatched = 0, []
    with torch.no_grad():
        for key, value in source.items():
            if _is_counter(key):
                continue
            name = rename(key)
            if name is None or name not in target:
                continue
            if target[name].shape != value.shape:
                mismatched.append(f"{name}: {tuple(value.shape)} vs {tuple(target[name].shape)}")
                continue
            target[name].copy_(value)
            copied += 1
    model.load_state_dict(target)
    return copied, mismatched


def _not_provided(model: nn.Module, source: dict, rename, scope: str = "") -> list[str]:
    """The model's weights under ``scope`` that ``source`` (renamed) has no tensor for."""
    provided = {rename(k) for k in source}
    return sorted(k for k in model.state_dict()
                  if k.startswith(scope) and not _is_counter(k) and k not in provided)


def _refuse_missing_backbone(missing: list[str], what: str) -> None:
    backbone = [k for k in missing if k.startswith("backbone.")]
    if backbone:
        raise CheckpointError(f"{what} lacks {len(backbone)} backbone weights, e.g. {backbone[:5]}; "
                              "it is not a checkpoint of this architecture (or was truncated)")


def init_backbone_from_classifier(model: nn.Module, classifier_ckpt: dict, arch: DetectorArch) -> dict:
    """Load a classifier checkpoint's ResNet into the detector's backbone body.

    Returns ``{"copied": n, "missing": [...]}``; every body weight must come from the
    classifier (``CheckpointError`` naming the missing ones otherwise). The FPN and
    heads start random, by design.
    """
    src_depth = classifier_ckpt["arch"].get("depth")
    if src_depth != arch.depth:
        raise CheckpointError(f"classifier is ResNet-{src_depth} but the detector wants ResNet-{arch.depth}")
    state = classifier_ckpt["model_state"]

    def rename(k):
        return None if k.startswith("fc.") else f"backbone.body.{k}"

    copied, mismatched = _shape_compatible_copy(model, state, rename)
    if mismatched or copied == 0:
        raise CheckpointError(f"classifier weights do not fit the backbone: {copied} copied, "
                              f"mismatched {mismatched[:3]}")
    missing = _not_provided(model, state, rename, scope="backbone.body.")
    _refuse_missing_backbone(missing, "the classifier checkpoint")
    log.info("backbone from classifier: %d tensors copied; FPN and heads start random", copied)
    return {"copied": copied, "missing": missing}


def init_backbone_from_detector(model: nn.Module, detector_ckpt: dict, arch: DetectorArch) -> dict:
    """Load only the ResNet body of a detector checkpoint, of any detector kind: a DAP
    Faster R-CNN pre-training starts an FCOS (``init=backbone``). FPN and heads start
    random, since their layout differs between kinds. Every body weight must come from the
    checkpoint (``CheckpointError`` otherwise). Returns ``{"copied", "missing"}``."""
    src_depth = detector_ckpt["arch"].get("depth")
    if src_depth != arch.depth:
        raise CheckpointError(f"the detector checkpoint is ResNet-{src_depth}; set model.depth={src_depth}")
    state = {k: v for k, v in detector_ckpt["model_state"].items() if k.startswith("backbone.body.")}

    def same(k):
        return k

    copied, mismatched = _shape_compatible_copy(model, state, same)
    if mismatched or copied == 0:
        raise CheckpointError(f"the detector's ResNet does not fit the backbone: {copied} copied, "
                              f"mismatched {mismatched[:3]}")
    missing = _not_provided(model, state, same, scope="backbone.body.")
    _refuse_missing_backbone(missing, "the detector checkpoint")
    log.info("backbone from a %s checkpoint: %d tensors copied; FPN and heads start random",
             detector_ckpt["arch"].get("detector"), copied)
    return {"copied": copied, "missing": missing}


PREDET_TRANSFERRED = ("backbone.body.", "backbone.fpn.", "rpn.head.conv.", "roi_heads.box_head.")


def _fpn_level_count(state: dict) -> int:
    return len({k.split(".")[3] for k in state if k.startswith("backbone.fpn.inner_blocks.")})


def init_from_predet(model: nn.Module, predet_ckpt: dict, arch: DetectorArch) -> dict:
    """Fine-tuning init from a PreDet pre-training: the ResNet, the FPN and, where the
    detector has them with the same shapes (Faster R-CNN), the CRPN's 3×3 trunk as its RPN
    trunk and the shared box head (fc6/fc7) as its RoI box head. The output layers start
    random: PreDet has no class-specific detection head. RetinaNet and FCOS build their FPN
    on C3-C5 (PreDet's on C2-C5): each FPN level takes the weights of the same ResNet stage;
    their P6/P7 blocks start random. Returns ``{"copied", "missing", "random",
    "mismatched"}``; a missing or mismatched ResNet weight is a ``CheckpointError``, a
    head of another size (``predet.arch.box_head_dim``) stays random, with a warning."""
    src_depth = predet_ckpt["arch"].get("depth")
    if src_depth != arch.depth:
        raise CheckpointError(f"the PreDet checkpoint is ResNet-{src_depth}; set model.depth={src_depth}")
    state = {k: v for k, v in predet_ckpt["model_state"].items() if k.startswith(PREDET_TRANSFERRED)}
    shift = _fpn_level_count(state) - _fpn_level_count(model.state_dict())

    def rename(k):  # source FPN level i feeds target level i - shift (the same ResNet stage)
        parts = k.split(".")
        if k.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
            level = int(parts[3]) - shift
            if level < 0:
                return None
            parts[3] = str(level)
        return ".".join(parts)

    copied, mismatched = _shape_compatible_copy(model, state, rename)
    if copied == 0 or any(m.startswith("backbone.") for m in mismatched):
        raise CheckpointError(f"the PreDet weights do not fit the {arch.detector}: {copied} copied, "
                              f"mismatched {mismatched[:3]}")
    if mismatched:
        log.warning("fine-tuning init from PreDet: %d head tensors have other shapes and start random: %s",
                    len(mismatched), mismatched[:4])
    missing = _not_provided(model, state, rename, scope="backbone.body.")
    _refuse_missing_backbone(missing, "the PreDet checkpoint")
    mismatched_names = {m.split(":")[0] for m in mismatched}
    provided = {rename(k) for k in state} - {None} - mismatched_names
    random = sorted(k for k in model.state_dict() if not _is_counter(k) and k not in provided)
    parts = [name for prefix, name in (("rpn.head.conv.", "RPN trunk"), ("roi_heads.box_head.", "box head"))
             if any(k.startswith(prefix) for k in provided)]
    log.info("fine-tuning init from PreDet: %d tensors copied (backbone, FPN%s); %d start random",
             copied, "".join(f", {p}" for p in parts), len(random))
    return {"copied": copied, "missing": missing, "random": random, "mismatched": mismatched}


def check_keep_class_layers(source_classes: list[str], class_names: list[str]) -> None:
    """Keeping the checkpoint's class layers is only meaningful for the very same classes,
    in the same order (output k is class k)."""
    if list(source_classes) != list(class_names):
        diffs = [i for i in range(max(len(source_classes), len(class_names)))
                 if i >= len(source_classes) or i >= len(class_names) or source_classes[i] != class_names[i]]
        raise CheckpointError(f"keep_class_layers needs the checkpoint's classes, in order: it has "
                              f"{len(source_classes)}, fine-tuning has {len(class_names)}, first difference "
                              f"at index {diffs[0]}; turn keep_class_layers off to re-initialise them")


def transfer_detector_weights(model: nn.Module, detector_ckpt: dict, arch: DetectorArch,
                              class_names: list[str] | None = None, keep_class_layers: bool = False) -> dict:
    """Fine-tuning init: copy everything but the class-dependent layers, which start fresh.

    The class layers (``CLASS_DEPENDENT``) are re-initialised even when the class counts
    match, since output k of a pre-trained detector means the pre-training corpus's
    class k. ``keep_class_layers`` copies them too, only when ``class_names`` equal the
    checkpoint's (``CheckpointError`` otherwise). Returns ``{"copied", "reinitialised",
    "missing"}``, ``missing`` being the model weights the checkpoint did not provide; a
    missing backbone weight is a ``CheckpointError``.
    """
    src = detector_ckpt["arch"]
    for key, want in arch.identity().items():
        if src.get(key) != want:
            raise CheckpointError(f"checkpoint is a {src.get('detector')} ResNet-{src.get('depth')}, "
                                  f"but fine-tuning builds a {arch.detector} ResNet-{arch.depth}: set model.{key}={src.get(key)}")
    if keep_class_layers:
        if class_names is None:
            raise CheckpointError("keep_class_layers needs the fine-tuning class names, "
                                  "to compare them with the checkpoint's")
        check_keep_class_layers(detector_ckpt["class_names"], class_names)
    class_dependent = CLASS_DEPENDENT[arch.detector]
    state = detector_ckpt["model_state"]
    target = model.state_dict()
    reinitialised = [] if keep_class_layers else sorted(k for k in target if k.startswith(class_dependent))

    def rename(k):
        return None if k in reinitialised else k

    copied, mismatched = _shape_compatible_copy(model, state, rename)
    if mismatched:
        raise CheckpointError(f"checkpoint does not fit the detector: {mismatched[:3]}")
    missing = [k for k in _not_provided(model, state, lambda k: k) if k not in reinitialised]
    _refuse_missing_backbone(missing, "the detector checkpoint")
    if missing:
        log.warning("fine-tuning init: the checkpoint has no weights for %d tensors, left at their fresh "
                    "init: %s", len(missing), missing[:10])
    log.info("fine-tuning init: %d tensors copied, re-initialised %s", copied, reinitialised or "none")
    return {"copied": copied, "reinitialised": reinitialised, "missing": missing}


def detector_images(images: list, device) -> list[torch.Tensor]:
    """HWC uint8 arrays → CHW float [0, 1] tensors (the detector normalises internally)."""
    out = []
    for im in images:
        t = torch.tensor(im, device=device)
        out.append(t.permute(2, 0, 1).float().div_(255))
    return out


@torch.inference_mode()
def predict(model: nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """Eval-mode detections per image: boxes xyxy pixels, scores, class indices (0-based)."""
    model.eval()
    return [{k: v.cpu() for k, v in d.items()} for d in foreground_detections(model(images))]


def foreground_detections(outs: list[dict]) -> list[dict]:
    """Torchvision detector outputs → ours, on their device: fp32 boxes and scores, 0-based
    labels. RetinaNet and FCOS score the (never trained) background slot 0 too: dropped."""
    keep = [o["labels"] > 0 for o in outs]
    return [{"boxes": o["boxes"][k].float(), "scores": o["scores"][k].float(), "labels": o["labels"][k] - 1}
            for o, k in zip(outs, keep)]


# ---------------------------------------------------------------- FCOS raw outputs (dense teachers)

@dataclass
class FcosRaw:
    """FCOS's dense head outputs for a batch, before any loss or post-processing.

    Positions are all FPN levels of all images: ``A = sum(num_anchors_per_level)`` per image,
    levels in order P3..P7, row-major within a level. ``cls_logits`` has ``num_classes + 1``
    columns, column 0 being the never-trained background slot (detector label = class + 1).
    Everything is in the frame of the transformed (resized, padded) batch; ``targets`` are
    the given targets resized into that frame (or None).
    """

    cls_logits: torch.Tensor       # [N, A, K+1] raw logits
    bbox_regression: torch.Tensor  # [N, A, 4] ltrb distances / anchor (= stride) size, >= 0
    bbox_ctrness: torch.Tensor     # [N, A, 1] raw centerness logits
    anchors: list[torch.Tensor]    # per image [A, 4] xyxy: one stride-sized square per position
    num_anchors_per_level: list[int]
    image_sizes: list[tuple[int, int]]     # (h, w) of each resized image inside the padded batch
    original_sizes: list[tuple[int, int]]  # (h, w) of each input image
    targets: list[dict] | None = None
    box_coder: BoxLinearCoder = field(default_factory=lambda: BoxLinearCoder(normalize_by_size=True), repr=False)

    def decode_boxes(self) -> torch.Tensor:
        """[N, A, 4] xyxy boxes (transformed frame) from the ltrb regressions, as FCOS decodes them."""
        return self.box_coder.decode(self.bbox_regression, torch.stack(self.anchors))


def fcos_raw_outputs(model: FCOS, images: list[torch.Tensor], targets: list[dict] | None = None) -> FcosRaw:
    """Run an FCOS model's transform, backbone, head and anchor generator exactly as
    ``FCOS.forward`` does, returning the raw head outputs instead of losses or detections.

    Works in train or eval mode (only the transform's size choice differs: a random
    ``min_size`` in training, the last one in eval). Two calls on images of the same sizes
    with the same resize give the same positions and anchors, which dense teacher-student
    losses rely on. ``targets`` are as for ``model(images, targets)`` (detector labels, i.e.
    class index + 1) and come back resized into the batch's frame; ``fcos_supervised_losses``
    turns them into torchvision's FCOS losses without a second forward.
    """
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    batch, targets = model.transform(images, targets)
    features = model.backbone(batch.tensors)
    features = list(features.values()) if isinstance(features, dict) else [features]
    head = model.head(features)
    anchors = model.anchor_generator(batch, features)
    return FcosRaw(cls_logits=head["cls_logits"], bbox_regression=head["bbox_regression"],
                   bbox_ctrness=head["bbox_ctrness"], anchors=anchors,
                   num_anchors_per_level=[f.shape[-2] * f.shape[-1] for f in features],
                   image_sizes=list(batch.image_sizes), original_sizes=original_sizes, targets=targets,
                   box_coder=model.box_coder)


def fcos_supervised_losses(model: FCOS, raw: FcosRaw) -> dict:
    """torchvision's FCOS training losses (focal classification, GIoU, centerness BCE) on
    raw outputs computed with targets: the same numbers ``model(images, targets)`` gives."""
    if raw.targets is None:
        raise ValueError("fcos_supervised_losses needs raw outputs computed with targets")
    head = {"cls_logits": raw.cls_logits, "bbox_regression": raw.bbox_regression, "bbox_ctrness": raw.bbox_ctrness}
    return model.compute_loss(raw.targets, head, raw.anchors, raw.num_anchors_per_level)


# --------------------------------------------------------------------------- raw outputs for methods

def inner_detector(model: nn.Module) -> nn.Module:
    """The torchvision detector inside a DDP- and/or ``DetectorForward``-wrapped model."""
    model = model.module if hasattr(model, "module") else model
    return model.detector if isinstance(model, DetectorForward) else model


def is_faster_rcnn(model: nn.Module) -> bool:
    """Whether ``model`` (possibly DDP- and ``DetectorForward``-wrapped) is a Faster R-CNN."""
    return isinstance(inner_detector(model), FasterRCNN)


@dataclass
class FasterRcnnRaw:
    """Faster R-CNN's training outputs before its losses: what a method needs to replace the
    RoI classifier's loss (Unbiased Teacher's focal loss) or to drop terms.

    ``rpn_losses``: torchvision's ``loss_objectness`` and ``loss_rpn_box_reg``; the RoI head's
    ``class_logits [R, K+1]``, ``box_regression [R, 4(K+1)]`` over the R sampled RoIs of all
    images, with their ``labels [R]`` (0 = background) and ``regression_targets [R, 4]``."""

    rpn_losses: dict
    class_logits: torch.Tensor
    box_regression: torch.Tensor
    labels: torch.Tensor
    regression_targets: torch.Tensor


def faster_rcnn_train_outputs(model: nn.Module, images: list[torch.Tensor], targets: list[dict]) -> FasterRcnnRaw:
    """Torchvision's ``GeneralizedRCNN.forward`` in training, stopped before ``fastrcnn_loss``:
    the same transform, backbone, RPN (with its losses), RoI sampling, pooling and box head."""
    images, targets = model.transform(images, targets)
    features = model.backbone(images.tensors)
    proposals, rpn_losses = model.rpn(images, features, targets)
    heads = model.roi_heads
    proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, images.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    return FasterRcnnRaw(rpn_losses, class_logits, box_regression, torch.cat(labels), torch.cat(regression_targets))


class DetectorForward(nn.Module):
    """The module DDP wraps in the semi-supervised stage: the detector, with a choice of
    forward. Methods that need raw outputs must still go through DDP's forward (its
    gradient hooks are armed there), so the choice is an argument, not a side door:

    * ``outputs="losses"``: torchvision's own (training: loss dict; eval: detections);
    * ``"faster_rcnn_raw"``: ``faster_rcnn_train_outputs``;
    * ``"fcos_raw"``: ``fcos_raw_outputs``.

    Its ``state_dict`` keys carry a ``detector.`` prefix; checkpoints store
    ``.detector.state_dict()``."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None, outputs: str = "losses"):
        if outputs == "losses":
            return self.detector(images, targets)
        if outputs == "faster_rcnn_raw":
            return faster_rcnn_train_outputs(self.detector, images, targets)
        if outputs == "fcos_raw":
            return fcos_raw_outputs(self.detector, images, targets)
        raise ValueError(f"outputs must be losses, faster_rcnn_raw or fcos_raw, got {outputs!r}")

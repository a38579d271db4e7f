"""Detector builders: torchvision Faster R-CNN / RetinaNet on a ResNet-FPN of any depth.

Built the way torchvision's own ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn``
are, but for any ResNet depth and with our initialisation paths:

* ``init_backbone_from_classifier``: DAP pre-training and the CLS baseline start the
  backbone from the step-1 classifier; FPN and heads start random.
* ``transfer_detector_weights``: fine-tuning starts from a pre-trained detector and
  re-initialises only the layers whose shape depends on the class count.

Detector label = class index + 1 (0 is background for Faster R-CNN; RetinaNet simply
never predicts it). ``predict`` maps outputs back to class indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pseudobox.config import require
from pseudobox.models.checkpoint import CheckpointError
from pseudobox.models.classifier import IMAGENET_MEAN, IMAGENET_STD, build_resnet

DETECTORS = ("faster_rcnn", "retinanet")
# Parameters whose shape depends on the number of classes, per detector.
CLASS_DEPENDENT = {
    "faster_rcnn": ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred."),
    "retinanet": ("head.classification_head.cls_logits.",),
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
        return FasterRCNN(backbone, num_classes=num_classes + 1, box_score_thresh=arch.score_thresh,
                          box_detections_per_img=arch.detections_per_image,
                          rpn_post_nms_top_n_train=arch.rpn_post_nms_top_n_train,
                          box_batch_size_per_image=arch.box_batch_size_per_image, **common)
    backbone = _resnet_fpn_extractor(resnet, trainable, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=num_classes + 1, score_thresh=arch.score_thresh,
                     detections_per_img=arch.detections_per_image, **common)


def _shape_compatible_copy(model: nn.Module, source: dict, rename) -> tuple[int, list[str]]:
    """Copy ``source`` tensors into ``model`` under ``rename(key)``; returns (copied, mismatched)."""
    target = model.state_dict()
    copied, mismatched = 0, []
    with torch.no_grad():
        for key, value in source.items():
            if key.endswith("num_batches_tracked"):
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


def init_backbone_from_classifier(model: nn.Module, classifier_ckpt: dict, arch: DetectorArch) -> int:
    """Load a classifier checkpoint's ResNet into the detector's backbone body."""
    src_depth = classifier_ckpt["arch"].get("depth")
    if src_depth != arch.depth:
        raise CheckpointError(f"classifier is ResNet-{src_depth} but the detector wants ResNet-{arch.depth}")
    copied, mismatched = _shape_compatible_copy(
        model, classifier_ckpt["model_state"],
        lambda k: None if k.startswith("fc.") else f"backbone.body.{k}")
    if mismatched or copied == 0:
        raise CheckpointError(f"classifier weights do not fit the backbone: {copied} copied, mismatched {mismatched[:3]}")
    return copied


def transfer_detector_weights(model: nn.Module, detector_ckpt: dict, arch: DetectorArch) -> dict:
    """Fine-tuning init: copy everything, re-initialise only class-count-dependent layers."""
    src = detector_ckpt["arch"]
    for key, want in arch.identity().items():
        if src.get(key) != want:
            raise CheckpointError(f"checkpoint is a {src.get('detector')} ResNet-{src.get('depth')}, "
                                  f"but fine-tuning builds a {arch.detector} ResNet-{arch.depth}: set model.{key}={src.get(key)}")
    class_dependent = CLASS_DEPENDENT[arch.detector]
    copied, mismatched = _shape_compatible_copy(model, detector_ckpt["model_state"], lambda k: k)
    unexpected = [m for m in mismatched if not m.startswith(class_dependent)]
    if unexpected:
        raise CheckpointError(f"checkpoint does not fit the detector: {unexpected[:3]}")
    return {"copied": copied, "reinitialised": [m.split(":")[0] for m in mismatched]}


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
    outs = model(images)
    # RetinaNet scores the (never trained) background slot 0 too: drop it.
    keep = [o["labels"] > 0 for o in outs]
    return [{"boxes": o["boxes"][k].float().cpu(), "scores": o["scores"][k].float().cpu(),
             "labels": (o["labels"][k] - 1).cpu()} for o, k in zip(outs, keep)]

"""FCOS as the third detector: building, raw head outputs, initialisation paths, prediction."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FCOS

from pseudobox.models.checkpoint import load_checkpoint, make_checkpoint
from pseudobox.models.detectors import (
    CLASS_DEPENDENT, DetectorArch, FcosRaw, build_detector, fcos_raw_outputs, fcos_supervised_losses,
    init_backbone_from_classifier, predict, transfer_detector_weights,
)
from tests.conftest import make_classifier_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["a", "b", "c"]
REINIT = {"head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"}


def small_arch(**kw) -> DetectorArch:
    return DetectorArch(**{"detector": "fcos", "depth": 18, "min_size": (64,), "max_size": 128, "test_size": 64,
                           "detections_per_image": 10, "score_thresh": 0.0, **kw})


def fcos(seed: int = 0, num_classes: int = 3, **kw) -> FCOS:
    torch.manual_seed(seed)
    return build_detector(small_arch(**kw), num_classes)


def batch():
    """Two 64x64 images, one with two boxes (labels = class + 1) and one with none."""
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 30.0, 60.0, 62.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


# ---------------------------------------------------------------- building

def test_fcos_arch_validates_and_builds_the_torchvision_structure():
    small_arch().validate()
    model = fcos()
    assert isinstance(model, FCOS)
    assert model.head.classification_head.cls_logits.out_channels == 4  # 3 classes + the unused slot 0
    fpn = model.backbone.fpn
    assert [b[0].in_channels for b in fpn.inner_blocks] == [128, 256, 512]  # C3-C5 of ResNet-18
    assert fpn.extra_blocks.p6.in_channels == 256 and fpn.extra_blocks.use_P5  # P6 from P5, as torchvision
    assert model.score_thresh == 0.0 and model.detections_per_img == 10
    assert CLASS_DEPENDENT["fcos"] == ("head.classification_head.cls_logits.",)


def test_fcos_builds_on_resnet50():
    model = build_detector(DetectorArch(detector="fcos", depth=50, min_size=(64,), max_size=128), 5)
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == [512, 1024, 2048]
    assert model.head.classification_head.cls_logits.out_channels == 6
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # freeze_at=2 default


def test_fcos_trains_with_finite_losses_including_an_image_without_boxes():
    model = fcos()
    model.train()
    images, targets = batch()
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.classification_head.cls_logits.weight.grad is not None
    assert model.backbone.fpn.inner_blocks[0][0].weight.grad is not None
    # a batch of images without any box: only negatives, still finite
    empty = [targets[1], targets[1]]
    assert all(torch.isfinite(v) for v in model(images, empty).values())


# ---------------------------------------------------------------- raw outputs

def test_fcos_raw_outputs_shapes_and_levels():
    model = fcos()
    model.eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with torch.no_grad():
        raw = fcos_raw_outputs(model, images)
    assert isinstance(raw, FcosRaw)
    assert raw.num_anchors_per_level == [64, 16, 4, 1, 1]  # P3..P7 of a 64x64 batch: strides 8..128
    a = sum(raw.num_anchors_per_level)
    assert raw.cls_logits.shape == (2, a, 4)
    assert raw.bbox_regression.shape == (2, a, 4) and (raw.bbox_regression >= 0).all()
    assert raw.bbox_ctrness.shape == (2, a, 1)
    assert len(raw.anchors) == 2 and all(anc.shape == (a, 4) for anc in raw.anchors)
    sizes = (raw.anchors[0][:, 2] - raw.anchors[0][:, 0]).tolist()
    assert sizes[0] == 8 and sizes[64] == 16 and sizes[-1] == 128
    assert raw.image_sizes == [(64, 64), (64, 64)] and raw.original_sizes == [(64, 64), (64, 64)]
    assert raw.targets is None
    boxes = raw.decode_boxes()
    assert boxes.shape == (2, a, 4)
    assert torch.allclose(boxes, model.box_coder.decode(raw.bbox_regression, torch.stack(raw.anchors)))


def test_fcos_raw_outputs_resize_targets_and_give_torchvisions_losses():
    """Raw outputs with targets give exactly the losses of ``model(images, targets)``."""
    model = fcos()
    model.train()
    images, targets = batch()
    small = [im[:, ::2, ::2].contiguous() for im in images]  # 32x32: the transform doubles them to 64
    half = [{"boxes": t["boxes"] / 2, "labels": t["labels"]} for t in targets]
    raw = fcos_raw_outputs(model, small, half)
    assert raw.original_sizes == [(32, 32), (32, 32)] and raw.image_sizes == [(64, 64), (64, 64)]
    assert torch.allclose(raw.targets[0]["boxes"], targets[0]["boxes"])
    ours = fcos_supervised_losses(model, raw)
    reference = model(small, half)
    assert set(ours) == set(reference)
    for name in reference:
        assert torch.allclose(ours[name], reference[name]), name
    sum(ours.values()).backward()
    assert model.head.regression_head.bbox_reg.weight.grad is not None
    with pytest.raises(ValueError, match="with targets"):
        fcos_supervised_losses(model, fcos_raw_outputs(model, small))


def test_fcos_raw_outputs_align_for_teacher_and_student():
    """An eval-mode teacher and a train-mode student on images of the same size share positions."""
    student, teacher = fcos(0), fcos(1)
    student.train()
    teacher.eval()
    images = [torch.rand(3, 48, 64), torch.rand(3, 48, 64)]
    s = fcos_raw_outputs(student, images)
    with torch.inference_mode():
        t = fcos_raw_outputs(teacher, images)
    assert s.cls_logits.shape == t.cls_logits.shape
    assert s.num_anchors_per_level == t.num_anchors_per_level
    assert all(torch.equal(x, y) for x, y in zip(s.anchors, t.anchors))
    assert s.cls_logits.requires_grad and not t.cls_logits.requires_grad


def test_fcos_box_math_stays_fp32_under_autocast():
    model = fcos()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = fcos_raw_outputs(model, [torch.rand(3, 64, 64)])
    assert raw.cls_logits.dtype == raw.bbox_regression.dtype == raw.bbox_ctrness.dtype == torch.float32
    assert raw.anchors[0].dtype == torch.float32


# ---------------------------------------------------------------- initialisation paths

def test_fcos_backbone_from_classifier(tmp_path):
    uri = make_classifier_checkpoint(str(tmp_path / "cls" / "model.pt"), CLASSES, depth=18, seed=1)
    ckpt = load_checkpoint(uri, expect_type="classifier")
    model = fcos()
    info = init_backbone_from_classifier(model, ckpt, small_arch())
    state = ckpt["model_state"]
    assert info["missing"] == []
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_fcos_transfer_reinitialises_only_the_class_logits():
    src_model = fcos(seed=1, num_classes=8)
    src = make_checkpoint("detector", {"detector": "fcos", "depth": 18}, [f"c{i}" for i in range(8)],
                          src_model.state_dict(), step=3)
    model = fcos(seed=2, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = transfer_detector_weights(model, src, small_arch(), class_names=CLASSES)
    assert set(info["reinitialised"]) == REINIT and info["missing"] == []
    for name, value in model.state_dict().items():
        if name in REINIT:
            assert torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, src["model_state"][name]), name
    assert any(k.startswith("head.regression_head.bbox_ctrness") for k in model.state_dict())


def test_fcos_transfer_refuses_a_retinanet_checkpoint():
    from pseudobox.models.checkpoint import CheckpointError

    src = make_checkpoint("detector", {"detector": "retinanet", "depth": 18}, CLASSES, {}, step=1)
    with pytest.raises(CheckpointError, match="model.detector=retinanet"):
        transfer_detector_weights(fcos(), src, small_arch())


# ---------------------------------------------------------------- prediction

def test_fcos_predict_returns_zero_based_labels_never_the_background_slot():
    model = fcos()
    with torch.no_grad():
        bias = model.head.classification_head.cls_logits.bias
        bias.fill_(-8.0)
        bias[0] = 8.0  # the background slot scores highest everywhere: it must never come out
        bias[3] = 6.0  # detector label 3 = class index 2
    outs = predict(model, [torch.rand(3, 64, 64), torch.rand(3, 48, 80)])
    assert not model.training
    for o, (h, w) in zip(outs, [(64, 64), (48, 80)]):
        assert 0 < len(o["labels"]) <= 10
        assert (o["labels"] == 2).all(), o["labels"]
        assert (o["boxes"][:, 2] <= w).all() and (o["boxes"][:, 3] <= h).all()
        assert (o["scores"][:-1] >= o["scores"][1:]).all()


def test_a_faster_rcnn_dap_checkpoint_initialises_the_fcos_backbone(tmp_path):
    """init=backbone: the ResNet of a detector of another kind (DAP pre-trains Faster R-CNN)."""
    from pseudobox.models.checkpoint import CheckpointError, save_checkpoint
    from pseudobox.pipelines.train_detector import initialise

    torch.manual_seed(3)
    frcnn_arch = DetectorArch(detector="faster_rcnn", depth=18, min_size=(64,), max_size=128, test_size=64)
    source = build_detector(frcnn_arch, 2)
    uri = str(tmp_path / "dap.pt")
    save_checkpoint(make_checkpoint("detector", {"detector": "faster_rcnn", "depth": 18}, ["x", "y"],
                                    source.state_dict(), step=1), uri)
    model = fcos()
    fpn_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.fpn.")}
    info = initialise(model, small_arch(), {"backbone": uri}, CLASSES)
    assert info["from"] == "backbone" and info["missing"] == []
    body = {k: v for k, v in source.state_dict().items() if k.startswith("backbone.body.")}
    assert info["copied"] == len(body)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fpn_before.items())  # FPN stays fresh
    deeper = make_checkpoint("detector", {"detector": "faster_rcnn", "depth": 50}, ["x"], {}, step=1)
    save_checkpoint(deeper, str(tmp_path / "r50.pt"))
    with pytest.raises(CheckpointError, match="model.depth=50"):
        initialise(fcos(), small_arch(), {"backbone": str(tmp_path / "r50.pt")}, CLASSES)

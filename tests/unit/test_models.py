"""Unit tests for models: detectors, weight transfer, checkpoints, CAMs."""
from __future__ import annotations

import os

import pytest
import torch

from pseudobox import storage
from pseudobox.models.checkpoint import (
    CheckpointError, load_checkpoint, make_checkpoint, resolve_checkpoint, save_checkpoint,
)
from pseudobox.models.classifier import (
    build_resnet, class_activation_maps, load_classifier, normalize_images, resnet_features,
)
from pseudobox.models.detectors import (
    DetectorArch, build_detector, detector_images, init_backbone_from_classifier, predict, transfer_detector_weights,
)
from tests.conftest import make_classifier_checkpoint

CLASSES8 = [f"c{i}" for i in range(8)]
CLASSES16 = [f"c{i}" for i in range(16)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_arch(detector: str, **kw) -> DetectorArch:
    return DetectorArch(detector=detector, depth=18, min_size=(64,), max_size=128, test_size=64,
                        detections_per_image=10, score_thresh=0.0, **kw)


def detector_ckpt(detector: str, classes: list[str], seed: int = 0) -> dict:
    torch.manual_seed(seed)
    arch = small_arch(detector)
    model = build_detector(arch, len(classes))
    return make_checkpoint("detector", {"detector": detector, "depth": 18}, classes, model.state_dict(), step=3)


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory) -> dict:
    uri = make_classifier_checkpoint(str(tmp_path_factory.mktemp("cls") / "model.pt"), CLASSES8, depth=18, seed=1)
    return load_checkpoint(uri, expect_type="classifier")


# ---------------------------------------------------------------- building detectors

@pytest.mark.parametrize("detector, loss_names", [
    ("faster_rcnn", {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}),
    ("retinanet", {"classification", "bbox_regression"}),
])
def test_build_detector_train_and_eval(detector, loss_names):
    torch.manual_seed(0)
    model = build_detector(small_arch(detector), num_classes=3)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 20.0, 20.0]]),
                "labels": torch.tensor([3, 2])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == loss_names
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.fpn.inner_blocks[0][0].weight.grad is not None

    outs = predict(model, images)
    assert not model.training
    assert len(outs) == 2
    for o in outs:
        assert o["boxes"].shape[1] == 4 and len(o["boxes"]) == len(o["scores"]) == len(o["labels"]) > 0
        assert (o["labels"] < 3).all()
        assert (o["boxes"] >= 0).all() and (o["boxes"] <= 64).all()
        assert (o["scores"][:-1] >= o["scores"][1:]).all()


def test_faster_rcnn_predicts_only_foreground_classes():
    torch.manual_seed(0)
    model = build_detector(small_arch("faster_rcnn"), num_classes=3)
    for o in predict(model, [torch.rand(3, 64, 64)]):
        assert len(o["labels"]) > 0 and (o["labels"] >= 0).all()


def test_faster_rcnn_respects_detections_per_image():
    torch.manual_seed(0)
    model = build_detector(small_arch("faster_rcnn"), num_classes=3)  # detections_per_image=10
    (o,) = predict(model, [torch.rand(3, 64, 64)])
    assert 0 < len(o["boxes"]) <= 10


def test_retinanet_respects_detections_per_image():
    torch.manual_seed(0)
    model = build_detector(small_arch("retinanet"), num_classes=3)
    (o,) = predict(model, [torch.rand(3, 64, 64)])
    assert 0 < len(o["boxes"]) <= 10


def test_retinanet_predict_never_returns_background():
    torch.manual_seed(0)
    model = build_detector(small_arch("retinanet"), num_classes=3)  # score_thresh=0.0
    (o,) = predict(model, [torch.rand(3, 64, 64)])
    assert len(o["labels"]) > 0
    assert (o["labels"] >= 0).all(), o["labels"]


def test_build_detector_freezes_stem_and_res2():
    model = build_detector(small_arch("retinanet", freeze_at=2), num_classes=2)
    body = model.backbone.body
    assert not body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"
    model = build_detector(small_arch("faster_rcnn", freeze_at=0, frozen_bn=False), num_classes=2)
    assert model.backbone.body.conv1.weight.requires_grad
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)


def test_detector_images_hwc_uint8_to_chw_float():
    import numpy as np

    im = np.full((5, 7, 3), 255, np.uint8)
    (t,) = detector_images([im], "cpu")
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and torch.allclose(t, torch.ones_like(t))


def test_detector_arch_validate():
    from pseudobox.config import ConfigError

    small_arch("faster_rcnn").validate()
    with pytest.raises(ConfigError, match="model.detector"):
        DetectorArch(detector="ssd").validate()
    with pytest.raises(ConfigError, match="model.max_size"):
        DetectorArch(min_size=(800,), max_size=700).validate()


# ---------------------------------------------------------------- classifier → detector backbone

def test_init_backbone_from_classifier_copies_weights(classifier_ckpt):
    arch = small_arch("faster_rcnn")
    model = build_detector(arch, num_classes=8)
    state = classifier_ckpt["model_state"]
    assert not torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])
    copied = init_backbone_from_classifier(model, classifier_ckpt, arch)
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.backbone.body.bn1.running_mean, state["bn1.running_mean"])
    body_keys = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert copied == len(body_keys)


def test_init_backbone_depth_mismatch(classifier_ckpt):
    arch = small_arch("retinanet")
    model = build_detector(arch, num_classes=8)
    wrong = {**classifier_ckpt, "arch": {"depth": 34}}
    with pytest.raises(CheckpointError, match="ResNet-34.*ResNet-18"):
        init_backbone_from_classifier(model, wrong, arch)


def test_init_backbone_wrong_shapes(classifier_ckpt):
    arch = small_arch("retinanet")
    model = build_detector(arch, num_classes=8)
    state = dict(classifier_ckpt["model_state"])
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(CheckpointError, match="do not fit"):
        init_backbone_from_classifier(model, {**classifier_ckpt, "model_state": state}, arch)


# ---------------------------------------------------------------- detector → detector (fine-tuning)

@pytest.mark.parametrize("detector, reinit", [
    ("faster_rcnn", {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                     "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"}),
    ("retinanet", {"head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"}),
])
def test_transfer_detector_weights(detector, reinit):
    src = detector_ckpt(detector, CLASSES16, seed=1)
    arch = small_arch(detector)
    torch.manual_seed(2)
    model = build_detector(arch, num_classes=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = transfer_detector_weights(model, src, arch)
    assert set(info["reinitialised"]) == reinit
    after = model.state_dict()
    for name, value in after.items():
        if name in reinit:
            assert torch.equal(value, before[name]), name  # left at the fresh init
        else:
            assert torch.equal(value, src["model_state"][name]), name
    assert info["copied"] == len([k for k in after if k not in reinit])
    prefixes = {k.split(".")[0] for k in after if k not in reinit}
    assert "backbone" in prefixes
    assert any(k.startswith("backbone.fpn.") for k in after)
    if detector == "faster_rcnn":
        assert "rpn" in prefixes


def test_transfer_detector_same_classes_copies_everything():
    src = detector_ckpt("retinanet", CLASSES8, seed=1)
    arch = small_arch("retinanet")
    model = build_detector(arch, num_classes=8)
    info = transfer_detector_weights(model, src, arch)
    assert info["reinitialised"] == []
    for name, value in model.state_dict().items():
        assert torch.equal(value, src["model_state"][name])


def test_transfer_detector_type_mismatch():
    src = detector_ckpt("faster_rcnn", CLASSES8)
    arch = small_arch("retinanet")
    with pytest.raises(CheckpointError, match="model.detector=faster_rcnn"):
        transfer_detector_weights(build_detector(arch, 8), src, arch)


def test_transfer_detector_depth_mismatch():
    src = detector_ckpt("retinanet", CLASSES8)
    src["arch"] = {"detector": "retinanet", "depth": 50}
    arch = small_arch("retinanet")
    with pytest.raises(CheckpointError, match="model.depth=50"):
        transfer_detector_weights(build_detector(arch, 8), src, arch)


# ---------------------------------------------------------------- checkpoint files

def test_save_load_checkpoint_round_trip(tmp_path):
    state = {"w": torch.ones(2)}
    save_checkpoint(make_checkpoint("classifier", {"depth": 18}, ["a"], state, step=5), str(tmp_path / "model.pt"))
    for uri in (str(tmp_path / "model.pt"), str(tmp_path)):
        ckpt = load_checkpoint(uri, expect_type="classifier")
        assert ckpt["step"] == 5 and ckpt["class_names"] == ["a"] and torch.equal(ckpt["model_state"]["w"], state["w"])


def test_load_checkpoint_corrupt_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(str(path))


def test_load_checkpoint_not_pseudobox(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="not a pseudobox checkpoint"):
        load_checkpoint(str(tmp_path / "a.pt"))
    torch.save(torch.ones(3), tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="not a pseudobox checkpoint"):
        load_checkpoint(str(tmp_path / "b.pt"))


def test_load_checkpoint_wrong_type(tmp_path):
    uri = str(tmp_path / "model.pt")
    save_checkpoint(make_checkpoint("detector", {"detector": "retinanet", "depth": 18}, ["a"], {}), uri)
    with pytest.raises(CheckpointError, match="holds a detector but a classifier is needed"):
        load_checkpoint(uri, expect_type="classifier")
    assert load_checkpoint(uri, expect_type="detector")["model_type"] == "detector"


def test_load_checkpoint_wrong_version_and_missing_field(tmp_path):
    uri = str(tmp_path / "model.pt")
    ckpt = make_checkpoint("classifier", {"depth": 18}, ["a"], {})
    save_checkpoint({**ckpt, "format_version": 99}, uri)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(uri)
    del ckpt["class_names"]
    save_checkpoint(ckpt, uri)
    with pytest.raises(CheckpointError, match="lacks 'class_names'"):
        load_checkpoint(uri)


def test_resolve_checkpoint_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="does not exist or is empty"):
        resolve_checkpoint(str(tmp_path / "no-run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="no model.pt"):
        resolve_checkpoint(str(tmp_path / "run"))


def test_resolve_checkpoint_picks_newest(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint_000002", "checkpoint_000010", "checkpoint_000009"):
        (run / name).mkdir(parents=True)
        (run / name / "model.pt").write_bytes(b"x")
    (run / "checkpoint_000011").mkdir()  # an incomplete (newest) one without model.pt is skipped
    (run / "result.json").write_text("{}")
    assert resolve_checkpoint(str(run)) == f"{run}/checkpoint_000010/model.pt"
    # The final export wins over checkpoints.
    (run / "model.pt").write_bytes(b"x")
    assert resolve_checkpoint(str(run)) == f"{run}/model.pt"
    # A checkpoint directory itself.
    assert resolve_checkpoint(str(run / "checkpoint_000002")) == f"{run}/checkpoint_000002/model.pt"


def test_resolve_checkpoint_on_s3(s3_bucket):
    uri = storage.join(s3_bucket, "run")
    save_checkpoint(make_checkpoint("classifier", {"depth": 18}, ["a"], {}, step=1),
                    storage.join(uri, "checkpoint_000001", "model.pt"))
    save_checkpoint(make_checkpoint("classifier", {"depth": 18}, ["a"], {}, step=2),
                    storage.join(uri, "checkpoint_000002", "model.pt"))
    assert resolve_checkpoint(uri) == storage.join(uri, "checkpoint_000002", "model.pt")


# ---------------------------------------------------------------- classifier and CAMs

def test_build_resnet_errors_and_state_dict_weights(tmp_path):
    with pytest.raises(ValueError, match="unsupported ResNet depth"):
        build_resnet(20)
    torch.manual_seed(0)
    src = build_resnet(18)  # a 1000-class state dict, like torchvision's
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_resnet(18, num_classes=5, weights=str(tmp_path / "w.pt"))
    assert torch.equal(model.conv1.weight, src.conv1.weight) and model.fc.out_features == 5
    torch.save({"state_dict": {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}},
               tmp_path / "nofc.pt")
    model = build_resnet(18, num_classes=5, weights=str(tmp_path / "nofc.pt"))
    assert torch.equal(model.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    torch.save({"something": torch.ones(1)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not look like a ResNet-18"):
        build_resnet(18, weights=str(tmp_path / "bad.pt"))


def test_build_resnet_state_dict_with_other_fc_size(tmp_path):
    torch.manual_seed(0)
    src = build_resnet(18, num_classes=5)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_resnet(18, num_classes=5, weights=str(tmp_path / "w.pt"))
    assert torch.equal(model.conv1.weight, src.conv1.weight)


def test_load_classifier(tmp_path):
    uri = make_classifier_checkpoint(str(tmp_path / "model.pt"), ["a", "b", "c"], depth=18, seed=3)
    model, ckpt = load_classifier(str(tmp_path))
    assert not model.training
    assert model.fc.out_features == 3 and ckpt["class_names"] == ["a", "b", "c"]
    assert torch.equal(model.conv1.weight, storage.torch_load(uri)["model_state"]["conv1.weight"])


def test_normalize_images():
    images = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    images[..., 0] = 255
    x = normalize_images(images)
    assert x.shape == (2, 3, 4, 5) and x.is_contiguous()
    assert torch.allclose(x[:, 0], torch.full((2, 4, 5), (1 - 0.485) / 0.229))
    assert torch.allclose(x[:, 2], torch.full((2, 4, 5), -0.406 / 0.225))


def test_cams_match_manual_computation():
    torch.manual_seed(0)
    model = build_resnet(18, num_classes=4).eval()
    images = normalize_images(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    image_idx = torch.tensor([0, 1, 1])
    labels = torch.tensor([2, 0, 3])
    with torch.no_grad():
        cams = class_activation_maps(model, images, image_idx, labels)
        feats = resnet_features(model, images)  # [2, 512, 2, 2]
        assert feats.shape == (2, 512, 2, 2)
        assert cams.shape == (3, 2, 2)
        for p, (i, c) in enumerate(zip(image_idx.tolist(), labels.tolist())):
            manual = (model.fc.weight[c] @ feats[i].reshape(512, -1)).reshape(2, 2)
            assert torch.allclose(cams[p], manual, atol=1e-5)
        # CAM theory: the average-pooled CAM plus the bias is the class logit.
        logits = model(images)
        pooled = cams.mean(dim=(1, 2)) + model.fc.bias[labels]
        assert torch.allclose(pooled, logits[image_idx, labels], atol=1e-4)

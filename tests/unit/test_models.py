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
    info = init_backbone_from_classifier(model, classifier_ckpt, arch)
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.backbone.body.bn1.running_mean, state["bn1.running_mean"])
    body_keys = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert info == {"copied": len(body_keys), "missing": []}


def test_init_backbone_depth_mismatch(classifier_ckpt):
    arch = small_arch("retinanet")
    model = build_detector(arch, num_classes=8)
    wrong = {**classifier_ckpt, "arch": {"depth": 34}}
    with pytest.raises(CheckpointError, match="ResNet-34.*ResNet-18"):
        init_backbone_from_classifier(model, wrong, arch)


@pytest.mark.parametrize("dropped", ["layer3.0.conv1.weight", "bn1.running_var"])
def test_init_backbone_refuses_a_classifier_missing_body_weights(classifier_ckpt, dropped):
    arch = small_arch("faster_rcnn")
    model = build_detector(arch, num_classes=8)
    state = {k: v for k, v in classifier_ckpt["model_state"].items() if k != dropped}
    with pytest.raises(CheckpointError, match=rf"lacks 1 backbone weights.*backbone\.body\.{dropped}"):
        init_backbone_from_classifier(model, {**classifier_ckpt, "model_state": state}, arch)


def test_init_backbone_tolerates_missing_batch_counters(classifier_ckpt):
    """num_batches_tracked is a step counter, not a weight: BatchNorm-trained detectors start it at 0."""
    arch = small_arch("retinanet", frozen_bn=False)
    model = build_detector(arch, num_classes=8)
    state = {k: v for k, v in classifier_ckpt["model_state"].items() if not k.endswith("num_batches_tracked")}
    info = init_backbone_from_classifier(model, {**classifier_ckpt, "model_state": state}, arch)
    assert info["missing"] == [] and info["copied"] == len([k for k in state if not k.startswith("fc.")])


def test_init_backbone_wrong_shapes(classifier_ckpt):
    arch = small_arch("retinanet")
    model = build_detector(arch, num_classes=8)
    state = dict(classifier_ckpt["model_state"])
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(CheckpointError, match="do not fit"):
        init_backbone_from_classifier(model, {**classifier_ckpt, "model_state": state}, arch)


# ---------------------------------------------------------------- detector → detector (fine-tuning)

REINIT = {
    "faster_rcnn": {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                    "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"},
    "retinanet": {"head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"},
}


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("source_classes", [CLASSES16, CLASSES8], ids=["other-count", "same-count"])
def test_transfer_detector_weights_reinitialises_class_layers(detector, source_classes):
    """Class layers start fresh even when the class counts match: output k of the
    pre-trained detector is the pre-training corpus's class k, not the fine-tuning one's."""
    reinit = REINIT[detector]
    src = detector_ckpt(detector, source_classes, seed=1)
    arch = small_arch(detector)
    torch.manual_seed(2)
    model = build_detector(arch, num_classes=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = transfer_detector_weights(model, src, arch, class_names=CLASSES8)
    assert set(info["reinitialised"]) == reinit
    assert info["missing"] == []
    after = model.state_dict()
    for name, value in after.items():
        if name in reinit:
            assert torch.equal(value, before[name]), name  # left at the fresh init
            if value.shape == src["model_state"][name].shape and value.dim() > 1:
                assert not torch.equal(value, src["model_state"][name]), name
        else:
            assert torch.equal(value, src["model_state"][name]), name
    assert info["copied"] == len([k for k in after if k not in reinit])
    prefixes = {k.split(".")[0] for k in after if k not in reinit}
    assert "backbone" in prefixes
    assert any(k.startswith("backbone.fpn.") for k in after)
    if detector == "faster_rcnn":
        assert "rpn" in prefixes


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
def test_transfer_detector_keep_class_layers_with_identical_classes(detector):
    src = detector_ckpt(detector, CLASSES8, seed=1)
    arch = small_arch(detector)
    model = build_detector(arch, num_classes=8)
    info = transfer_detector_weights(model, src, arch, class_names=list(CLASSES8), keep_class_layers=True)
    assert info["reinitialised"] == [] and info["missing"] == []
    for name, value in model.state_dict().items():
        assert torch.equal(value, src["model_state"][name]), name


@pytest.mark.parametrize("names", [
    [f"d{i}" for i in range(8)],               # same count, other classes
    CLASSES8[1:] + CLASSES8[:1],               # same classes, other order
    CLASSES16,                                 # other count
    None,                                      # names not given
], ids=["other-names", "other-order", "other-count", "no-names"])
def test_transfer_detector_keep_class_layers_refuses_other_classes(names):
    src = detector_ckpt("retinanet", CLASSES8, seed=1)
    arch = small_arch("retinanet")
    model = build_detector(arch, num_classes=len(names or CLASSES8))
    with pytest.raises(CheckpointError, match="keep_class_layers"):
        transfer_detector_weights(model, src, arch, class_names=names, keep_class_layers=True)


def test_transfer_detector_reports_weights_the_checkpoint_lacks(caplog):
    src = detector_ckpt("faster_rcnn", CLASSES8, seed=1)
    gone = ["rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.bias"]
    src["model_state"] = {k: v for k, v in src["model_state"].items() if k not in gone}
    arch = small_arch("faster_rcnn")
    torch.manual_seed(2)
    model = build_detector(arch, num_classes=8)
    before = {k: model.state_dict()[k].clone() for k in gone}
    with caplog.at_level("WARNING", logger="pseudobox"):
        info = transfer_detector_weights(model, src, arch, class_names=CLASSES8)
    assert info["missing"] == sorted(gone)
    assert all(name in caplog.text for name in gone)
    for name in gone:
        assert torch.equal(model.state_dict()[name], before[name])


@pytest.mark.parametrize("dropped", ["backbone.body.layer2.0.conv1.weight", "backbone.fpn.layer_blocks.0.0.bias"])
def test_transfer_detector_refuses_missing_backbone_weights(dropped):
    src = detector_ckpt("retinanet", CLASSES8, seed=1)
    src["model_state"] = {k: v for k, v in src["model_state"].items() if k != dropped}
    arch = small_arch("retinanet")
    with pytest.raises(CheckpointError, match=rf"lacks 1 backbone weights.*{dropped.replace('.', '[.]')}"):
        transfer_detector_weights(build_detector(arch, 8), src, arch, class_names=CLASSES8)


def test_initialise_passes_class_names_and_keep_flag(tmp_path):
    from pseudobox.pipelines.train_detector import initialise

    uri = str(tmp_path / "det" / "model.pt")
    save_checkpoint(detector_ckpt("retinanet", CLASSES8, seed=1), uri)
    arch = small_arch("retinanet")
    info = initialise(build_detector(arch, 8), arch, {"detector": uri}, CLASSES8)
    assert info["from"] == "detector" and set(info["reinitialised"]) == REINIT["retinanet"]
    info = initialise(build_detector(arch, 8), arch, {"detector": uri, "keep_class_layers": True}, CLASSES8)
    assert info["reinitialised"] == [] and info["missing"] == []
    with pytest.raises(CheckpointError, match="keep_class_layers"):
        initialise(build_detector(arch, 8), arch, {"detector": uri, "keep_class_layers": True},
                   [f"d{i}" for i in range(8)])


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


def test_build_resnet_refuses_a_state_dict_missing_backbone_weights(tmp_path):
    """One missing layer would otherwise stay random without a word."""
    state = build_resnet(18).state_dict()
    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"ResNet-18.*layer4\.1\.conv2\.weight"):
        build_resnet(18, num_classes=5, weights=str(tmp_path / "w.pt"))


def test_build_resnet_warns_when_the_head_starts_random(tmp_path, caplog):
    from pseudobox.models.classifier import build_resnet_with_head

    torch.manual_seed(0)
    src = build_resnet(18)  # 1000 classes
    torch.save(src.state_dict(), tmp_path / "w.pt")
    with caplog.at_level("WARNING", logger="pseudobox"):
        model, head_loaded = build_resnet_with_head(18, num_classes=5, weights=str(tmp_path / "w.pt"))
    assert not head_loaded and model.fc.out_features == 5
    assert "1000-class head" in caplog.text and "randomly initialised" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pseudobox"):
        model, head_loaded = build_resnet_with_head(18, num_classes=1000, weights=str(tmp_path / "w.pt"))
    assert head_loaded and torch.equal(model.fc.weight, src.fc.weight)
    assert "randomly initialised" not in caplog.text


def test_build_resnet_state_dict_with_other_fc_size(tmp_path):
    torch.manual_seed(0)
    src = build_resnet(18, num_classes=5)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_resnet(18, num_classes=5, weights=str(tmp_path / "w.pt"))
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert torch.equal(model.fc.weight, src.fc.weight)
    assert build_resnet(18, weights=str(tmp_path / "w.pt")).fc.out_features == 5  # sized by the weights' head


def test_load_classifier(tmp_path):
    uri = make_classifier_checkpoint(str(tmp_path / "model.pt"), ["a", "b", "c"], depth=18, seed=3)
    model, ckpt = load_classifier(str(tmp_path))
    assert not model.training
    assert model.fc.out_features == 3 and ckpt["class_names"] == ["a", "b", "c"]
    assert torch.equal(model.conv1.weight, storage.torch_load(uri)["model_state"]["conv1.weight"])


def test_load_classifier_refuses_a_random_head_for_cams(tmp_path):
    from pseudobox.models.classifier import require_trained_head

    model = build_resnet(18, num_classes=3)
    uri = str(tmp_path / "model.pt")
    save_checkpoint(make_checkpoint("classifier", {"depth": 18}, ["a", "b", "c"], model.state_dict(),
                                    head="random"), uri)
    with pytest.raises(CheckpointError, match="final layer is randomly initialised.*class activation maps"):
        load_classifier(uri)
    with pytest.raises(CheckpointError, match="never trained"):
        require_trained_head(load_checkpoint(uri))
    loaded, _ = load_classifier(uri, allow_random_head=True)  # e.g. to inspect the backbone
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)
    require_trained_head({"head": "trained"})
    require_trained_head({})  # checkpoints from before the field


def test_normalize_images():
    images = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    images[..., 0] = 255
    x = normalize_images(images)
    assert x.shape == (2, 3, 4, 5) and x.is_contiguous()
    assert torch.allclose(x[:, 0], torch.full((2, 4, 5), (1 - 0.485) / 0.229))
    assert torch.allclose(x[:, 2], torch.full((2, 4, 5), -0.406 / 0.225))


def test_cams_match_an_independent_computation():
    """CAM_c = sum_k w_ck f_k over the feature map the model's own forward pass pools.

    The feature map is caught with a hook on ``layer4`` during torchvision's forward (not
    ``resnet_features``), and the CAM is an explicit sum over the fc weight; average-pooling
    a CAM and adding the bias must then give the model's logit for that class.
    """
    torch.manual_seed(0)
    model = build_resnet(18, num_classes=4).eval()
    images = normalize_images(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    image_idx = torch.tensor([0, 1, 1])
    labels = torch.tensor([2, 0, 3])
    caught = {}
    hook = model.layer4.register_forward_hook(lambda m, i, out: caught.setdefault("feats", out.detach().clone()))
    with torch.no_grad():
        logits = model(images)
        hook.remove()
        feats = caught["feats"]
        assert feats.shape == (2, 512, 2, 2)
        cams = class_activation_maps(model, images, image_idx, labels)
    assert cams.shape == (3, 2, 2)
    w = model.fc.weight.detach()
    for p, (i, c) in enumerate(zip(image_idx.tolist(), labels.tolist())):
        manual = torch.zeros(2, 2)
        for k in range(512):
            manual += w[c, k] * feats[i, k]
        assert torch.allclose(cams[p], manual, atol=1e-5)
        # CAM theory: the average-pooled CAM plus the bias is the class logit.
        assert torch.allclose(cams[p].mean() + model.fc.bias[c], logits[i, c], atol=1e-4)
    assert torch.allclose(resnet_features(model, images), feats, atol=1e-5)


# ---------------------------------------------------------------- torchvision weights → classifier checkpoint

WNIDS = [f"n{i:08d}" for i in range(1000)]  # ImageNet-like synset ids, sorted as torchvision's index


def write_corpus_manifest(uri: str, classes: list[str]) -> str:
    """A corpus with only its manifest: converting reads the class names, never images."""
    from pseudobox.datasets.corpus import CorpusWriter

    CorpusWriter(uri, classes).close()
    return uri


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory):
    """A 1000-class ResNet-18 state dict with non-default BatchNorm statistics, as a file."""
    torch.manual_seed(5)
    model = build_resnet(18)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(12345)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return str(path), model.state_dict()


def assert_same_state(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_classifier_from_state_dict_weights_is_exact(resnet18_state):
    from pseudobox.models.classifier import classifier_from_weights

    path, state = resnet18_state
    ckpt = classifier_from_weights(18, path, WNIDS)
    assert_same_state(ckpt["model_state"], state)  # BatchNorm statistics and counters included
    assert ckpt["head"] == "trained" and ckpt["step"] == 0 and ckpt["class_names"] == WNIDS
    assert ckpt["init"] == {"from": "state_dict", "weights": path}


def test_classifier_from_torchvision_weights_name(resnet18_state, monkeypatch):
    """The weights-name path, with torchvision's download replaced by the test's state dict."""
    import torchvision

    from pseudobox.models.classifier import classifier_from_weights

    _, state = resnet18_state
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append((self, kwargs))
        return {k: v.clone() for k, v in state.items()}

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", fake_get_state_dict)
    ckpt = classifier_from_weights(18, "IMAGENET1K_V1", WNIDS)
    assert_same_state(ckpt["model_state"], state)
    (weights, kwargs), = calls
    assert weights is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert kwargs["weights_only"] is True and kwargs["check_hash"] is True
    assert ckpt["init"] == {"from": "torchvision", "weights": "IMAGENET1K_V1"}
    # torchvision's own category names are accepted as class names too.
    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert classifier_from_weights(18, "IMAGENET1K_V1", names)["class_names"] == names


def test_classifier_from_weights_refuses_other_classes(resnet18_state, monkeypatch):
    import torchvision

    from pseudobox.models.classifier import classifier_from_weights

    path, state = resnet18_state
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict",
                        lambda self, *a, **k: pytest.fail("must refuse before downloading"))
    with pytest.raises(CheckpointError, match="1000-class head but the corpus has 5 classes"):
        classifier_from_weights(18, "IMAGENET1K_V1", CLASSES8[:5])
    with pytest.raises(CheckpointError, match="1000-class head but the corpus has 999 classes"):
        classifier_from_weights(18, path, WNIDS[:999])
    with pytest.raises(CheckpointError, match="not sorted"):
        classifier_from_weights(18, path, WNIDS[1:] + WNIDS[:1])
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, path + ".nofc")
    with pytest.raises(CheckpointError, match="no final layer"):
        classifier_from_weights(18, path + ".nofc", WNIDS)


def classifier_stage_config(tmp_path, corpus: str, weights: str, *overrides):
    from pseudobox.config import load_config
    from pseudobox.pipelines.train_classifier import TrainClassifierConfig

    return load_config(TrainClassifierConfig, overrides=[f"corpus={corpus}", f"output={tmp_path / 'cls'}",
                                                         "model.depth=18", f"model.weights={weights}",
                                                         "optim.max_iters=0", *overrides])


def test_train_classifier_converts_without_ray_or_a_forward_pass(tmp_path, resnet18_state, monkeypatch):
    from pseudobox.config import ConfigError
    from pseudobox.pipelines import train_classifier, trainer

    path, state = resnet18_state
    corpus = write_corpus_manifest(str(tmp_path / "corpus"), WNIDS)
    cfg = classifier_stage_config(tmp_path, corpus, path)
    assert cfg.converts_weights()

    def forbidden(*a, **k):
        raise AssertionError("converting must not start Ray or train")

    monkeypatch.setattr(train_classifier, "init_ray", forbidden)
    monkeypatch.setattr(trainer, "fit", forbidden)
    monkeypatch.setattr(torch.nn.BatchNorm2d, "forward", forbidden)
    train_classifier.run(cfg)
    ckpt = load_checkpoint(str(tmp_path / "cls"), expect_type="classifier")
    assert_same_state(ckpt["model_state"], state)
    assert ckpt["class_names"] == WNIDS and ckpt["head"] == "trained" and ckpt["stage"] == "train-classifier"
    assert ckpt["config"]["optim"]["max_iters"] == 0
    # Converting never replaces a training run's export.
    (tmp_path / "cls" / "checkpoint_000010").mkdir()
    with pytest.raises(ConfigError, match="holds a training run"):
        train_classifier.run(cfg)


def test_train_classifier_convert_config_checks(tmp_path, resnet18_state, caplog):
    from pseudobox.config import ConfigError

    path, _ = resnet18_state
    with pytest.raises(ConfigError, match="optim.max_iters=0 converts model.weights"):
        classifier_stage_config(tmp_path, "/c", "")
    small = write_corpus_manifest(str(tmp_path / "small"), ["a", "b", "c"])
    # A torchvision name is checked against the corpus from the weights' metadata: no download.
    with pytest.raises(ConfigError, match="1000-class head but the corpus has 3 classes"):
        classifier_stage_config(tmp_path, small, "IMAGENET1K_V1").check_paths()
    with pytest.raises(ConfigError, match="unknown torchvision weights"):
        classifier_stage_config(tmp_path, small, "IMAGENET9K").check_paths()
    # Training instead of converting: allowed, with a warning that the head starts random.
    with caplog.at_level("WARNING", logger="pseudobox"):
        classifier_stage_config(tmp_path, small, "IMAGENET1K_V1", "optim.max_iters=10").check_paths()
    assert "final layer starts random" in caplog.text
    # A state-dict file with the wrong head size is refused when converting.
    from pseudobox.pipelines import train_classifier

    with pytest.raises(ConfigError, match="model.weights: .*1000-class head but the corpus has 3 classes"):
        train_classifier.run(classifier_stage_config(tmp_path, small, path))
    assert not (tmp_path / "cls" / "model.pt").exists()
    assert not (tmp_path / "cls" / "run.json").exists()  # a refused conversion leaves the output as it was


def test_imagenet_classifier_config_converts():
    from pseudobox.config import load_config
    from pseudobox.pipelines.train_classifier import TrainClassifierConfig

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(TrainClassifierConfig, os.path.join(root, "configs", "imagenet-dap", "train-classifier.yaml"))
    assert cfg.converts_weights() and cfg.model.weights == "IMAGENET1K_V1" and cfg.model.depth == 50

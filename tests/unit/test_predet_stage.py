"""``pretrain method=predet`` without Ray: the query join, the config checks, the worker with
its checkpoint and resume, and the handoff into fine-tuning's detectors."""
import numpy as np
import pytest
import torch

from pseudobox.config import ConfigError
from pseudobox.datasets.ray_io import object_array
from pseudobox.datasets.views import ViewConfig
from pseudobox.engine import OptimConfig
from pseudobox.models.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from pseudobox.models.detectors import DetectorArch, build_detector, init_from_predet
from pseudobox.models.predet import PredetArch, build_predet
from pseudobox.pipelines import pretrain
from tests.conftest import make_classifier_checkpoint, make_corpus

TINY = dict(depth=18, crop_size=64, anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n=100,
            rpn_post_nms_top_n=50, box_head_dim=64, embed_dim=32, crpn_embed_dim=16, crpn_reg_dim=8,
            croi_reg_dim=16, num_queries=4)


def _batch(keys):
    return {"key": np.array(keys), "shard": np.array(["s.tar"] * len(keys)),
            "image": object_array([np.zeros((8, 8, 3), np.uint8)] * len(keys)),
            "labels": object_array([np.array([0])] * len(keys))}


def test_attach_queries_keeps_the_best_valid_boxes_and_drops_images_without_any(monkeypatch):
    part = {
        "a": (np.array([[0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 5.5, 9], [1, 1, 30, 30]], np.float32),
              np.full(4, -1), np.array([0.2, 0.9, 0.95, 0.5], np.float32)),
        "b": (np.array([[0, 0, 0.5, 10]], np.float32), np.full(1, -1), np.array([0.9], np.float32)),  # degenerate
    }
    monkeypatch.setattr(pretrain, "_mined_part", lambda uri, shard: part)
    out = pretrain.attach_queries(_batch(["a", "b", "c"]), "boxes", max_queries=2, min_score=0.1)
    assert list(out["key"]) == ["a"]  # b: no valid box, c: not mined
    np.testing.assert_array_equal(out["queries"][0], [[0, 0, 20, 20], [1, 1, 30, 30]])  # best two, sorted
    assert "boxes" not in out


def test_predet_config_needs_no_classifier_but_dap_does(tmp_path):
    clipped = OptimConfig(grad_clip=10.0)
    cfg = pretrain.PretrainConfig(corpus="c", boxes="b", output="o", method="predet", optim=clipped,
                                  classifier="cls.pt")
    cfg.validate()
    with pytest.raises(ConfigError, match="optim.grad_clip"):
        pretrain.PretrainConfig(corpus="c", boxes="b", output="o", method="predet", classifier="c.pt").validate()
    mismatch = pretrain.PredetSettings(views=ViewConfig(crop_size=224))
    with pytest.raises(ConfigError, match="predet.arch.frozen_bn=false"):
        pretrain.PretrainConfig(corpus="c", boxes="b", output="o", method="predet", optim=clipped,
                                predet=pretrain.PredetSettings(arch=PredetArch(frozen_bn=True))).validate()
    with pytest.raises(ConfigError, match="predet.views.crop_size"):
        pretrain.PretrainConfig(corpus="c", boxes="b", output="o", method="predet", optim=clipped,
                                classifier="c.pt", predet=mismatch).validate()
    with pytest.raises(ConfigError, match="classifier is required"):
        pretrain.PretrainConfig(corpus="c", boxes="b", output="o", method="dap").validate()
    bad = pretrain.PretrainConfig(corpus="c", boxes="b", output="o", method="predet", optim=clipped,
                                  classifier="c.pt", predet=pretrain.PredetSettings(max_queries=0))
    with pytest.raises(ConfigError, match="predet.max_queries"):
        bad.validate()


def test_predet_refuses_boxes_of_another_source(tmp_path):
    from pseudobox import storage

    corpus = str(tmp_path / "corpus")
    make_corpus(corpus, num_images=4, size=48, samples_per_shard=4)
    boxes = tmp_path / "boxes"
    (boxes / "parts").mkdir(parents=True)
    storage.write_json(str(boxes / "mining.json"), {"source": "cam", "classes": []})
    cfg = pretrain.PretrainConfig(corpus=corpus, boxes=str(boxes), output=str(tmp_path / "o"), method="predet")
    with pytest.raises(ConfigError, match="source=cam.*mine source=edgebox"):
        cfg.check_paths()


def _predet_checkpoint(uri, seed=0):
    torch.manual_seed(seed)
    arch = PredetArch(**TINY)
    model = build_predet(arch, 3)
    from pseudobox.config import to_dict

    save_checkpoint(make_checkpoint("predet", to_dict(arch), ["a", "b", "c"], model.state_dict(), method="predet"),
                    uri)
    return model.state_dict()


@pytest.mark.parametrize("detector", ["faster_rcnn", "fcos"])
def test_handoff_copies_backbone_fpn_and_the_rpn_trunk_where_it_fits(tmp_path, detector, one_torch_thread):
    source = _predet_checkpoint(str(tmp_path / "predet.pt"))
    arch = DetectorArch(detector=detector, depth=18, min_size=(64,), max_size=128, test_size=64)
    model = build_detector(arch, 2)
    info = init_from_predet(model, load_checkpoint(str(tmp_path / "predet.pt"), expect_type="predet"), arch)
    target = model.state_dict()
    for k, v in source.items():
        if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(target[k], v), k
    if detector == "faster_rcnn":  # same FPN levels (C2-C5), the RPN's 3×3 trunk; box head of another size
        assert torch.equal(target["backbone.fpn.inner_blocks.0.0.weight"], source["backbone.fpn.inner_blocks.0.0.weight"])
        trunk = [k for k in source if k.startswith("rpn.head.conv.")]
        assert trunk and all(torch.equal(target[k], source[k]) for k in trunk)
        assert "roi_heads.box_head.fc6.weight" in info["random"] and info["mismatched"]
    else:  # FCOS's FPN starts at C3: its level 0 is PreDet's level 1
        assert torch.equal(target["backbone.fpn.inner_blocks.0.0.weight"], source["backbone.fpn.inner_blocks.1.0.weight"])
        assert torch.equal(target["backbone.fpn.layer_blocks.2.0.weight"], source["backbone.fpn.layer_blocks.3.0.weight"])
        assert any(k.startswith("backbone.fpn.extra_blocks.") for k in info["random"])
    assert any(k.startswith(("roi_heads.", "head.")) for k in info["random"])  # heads start fresh
    assert not any(k.startswith("backbone.body.") for k in info["random"])


def test_handoff_takes_the_box_head_when_its_shape_fits(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    arch = PredetArch(**{**TINY, "box_head_dim": 1024})
    from pseudobox.config import to_dict

    source = build_predet(arch, 3).state_dict()
    save_checkpoint(make_checkpoint("predet", to_dict(arch), ["a", "b", "c"], source), str(tmp_path / "p.pt"))
    det_arch = DetectorArch(depth=18, min_size=(64,), max_size=128, test_size=64)
    model = build_detector(det_arch, 2)
    info = init_from_predet(model, load_checkpoint(str(tmp_path / "p.pt")), det_arch)
    assert torch.equal(model.state_dict()["roi_heads.box_head.fc7.weight"], source["roi_heads.box_head.fc7.weight"])
    assert not info["mismatched"] and "roi_heads.box_predictor.cls_score.weight" in info["random"]


def test_handoff_refuses_another_depth(tmp_path):
    _predet_checkpoint(str(tmp_path / "predet.pt"))
    arch = DetectorArch(depth=34, min_size=(64,), max_size=128, test_size=64)
    with pytest.raises(CheckpointError, match="model.depth=18"):
        init_from_predet(build_detector(arch, 2), load_checkpoint(str(tmp_path / "predet.pt")), arch)


def test_finetune_accepts_a_predet_checkpoint_as_init_detector(tmp_path):
    from pseudobox.pipelines import finetune

    _predet_checkpoint(str(tmp_path / "predet.pt"))
    arch = DetectorArch(detector="retinanet", depth=18)
    ckpt = finetune.check_init_checkpoint("detector", str(tmp_path / "predet.pt"), arch)
    assert ckpt["model_type"] == "predet"
    with pytest.raises(ConfigError, match="model.depth=18"):
        finetune.check_init_checkpoint("detector", str(tmp_path / "predet.pt"), DetectorArch(depth=50))


def _worker_config(tmp_path, max_iters, classifier=None):
    from pseudobox.config import to_dict
    from pseudobox.models.predet_loss import PredetLossConfig

    optim = OptimConfig(lr=0.01, max_iters=max_iters, batch_size=2, warmup_iters=1, checkpoint_every=2, log_every=1,
                        grad_clip=10.0)
    return {"arch": to_dict(PredetArch(**TINY)), "optim": to_dict(optim), "class_names": ["a", "b", "c"],
            "init": {"classifier": classifier} if classifier else {}, "stage": "pretrain", "seed": 0,
            "loss": to_dict(PredetLossConfig(max_negatives=32)), "views": to_dict(ViewConfig(crop_size=64)),
            "config": {"method": "predet"}}


def _image_batches():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (72, 80, 3), dtype=np.uint8) for _ in range(2)]
    queries = [np.array([[4, 4, 40, 40], [20, 10, 70, 60], [0, 30, 50, 70], [30, 0, 79, 35]], np.float32)] * 2
    batch = {"image": object_array(images), "labels": object_array([np.array([0, 2]), np.array([1])]),
             "queries": object_array(queries)}
    return lambda: iter([batch])


def test_worker_checkpoints_a_predet_model_and_resumes(tmp_path, one_torch_thread):
    from pseudobox.pipelines import train_predet

    cls = make_classifier_checkpoint(str(tmp_path / "cls.pt"), ["a", "b", "c"], depth=18)
    hist = train_predet.worker(_worker_config(tmp_path, 2, cls), local_dir=str(tmp_path / "run"),
                               batches=_image_batches())
    assert hist and all(np.isfinite(row["loss"]) for row in hist)
    ckpt = load_checkpoint(str(tmp_path / "run"), expect_type="predet")
    assert ckpt["step"] == 2 and ckpt["method"] == "predet" and ckpt["init"]["from"] == "classifier"
    classifier = load_checkpoint(cls)["model_state"]
    # The ResNet started from the classifier: frozen stem weights (freeze_at) or moved ones,
    # but never a fresh random init; the stem's BN statistics are the classifier's.
    assert torch.equal(ckpt["model_state"]["backbone.body.bn1.running_mean"], classifier["bn1.running_mean"])

    hist2 = train_predet.worker(_worker_config(tmp_path, 4, cls), local_dir=str(tmp_path / "run"),
                                batches=_image_batches())
    assert [row["step"] for row in hist2][-1] == 4
    resumed = load_checkpoint(str(tmp_path / "run"), expect_type="predet")
    assert resumed["step"] == 4 and resumed["init"]["from"] == "classifier"  # restored, not re-initialised
    assert hist2[: len(hist)] == hist

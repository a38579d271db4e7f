"""``analyze iou-similarity`` (PreDet Fig. 5b): the IoU-spread pair sampler, Pearson's r,
the correlation on hand-made features, and the stage end to end on tiny checkpoints."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
import yaml

from pseudobox import cli
from pseudobox.config import ConfigError, load_config
from pseudobox.evaluation import feature_similarity as fs
from pseudobox.pipelines.analyze import IouSimilarityConfig

BINS = fs.DEFAULT_IOU_BINS


def numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise-aligned IoU written out independently of torchvision (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a) + area(b) - inter)


# ---------------------------------------------------------------- pair sampling


def test_jitter_reaches_the_target_iou():
    g = torch.Generator().manual_seed(0)
    ref = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 7.0, 90.0], [100.0, 100.0, 300.0, 250.0]]).repeat(300, 1)
    target = 0.02 + torch.rand(len(ref), generator=g, dtype=torch.float64) * 0.97
    other = fs.jitter_to_iou(ref, target, g)
    got = numpy_iou(ref.numpy(), other.numpy())
    assert np.abs(got - target.numpy()).max() < 1e-4
    assert not torch.allclose(other, ref)  # a shifted / rescaled box, not the reference itself


def test_pairs_fill_every_iou_bin_with_exact_ious():
    rng = np.random.default_rng(0)
    sizes = [(96, 128), (128, 96), (64, 64), (200, 300)]
    gt = [None, np.array([[10, 10, 60, 50], [1, 1, 3, 3]], np.float32), None, None]  # the 2-px box is unusable
    pairs = fs.sample_box_pairs(sizes, gt, 92, rng, BINS, min_box_size=4.0, reference="auto")
    assert len(pairs) == 92
    counts = np.bincount(pairs.iou_bin, minlength=len(BINS) - 1)
    assert counts.tolist() == [11, 11] + [10] * 7  # even quotas, the remainder to the first bins
    # the recorded IoU is the boxes' exact IoU, inside its bin, and the bins span 0.05-0.95
    np.testing.assert_allclose(pairs.iou, numpy_iou(pairs.box_a, pairs.box_b), atol=1e-6)
    edges = np.asarray(BINS)
    assert np.all(pairs.iou >= edges[pairs.iou_bin]) and np.all(pairs.iou <= edges[pairs.iou_bin + 1])
    assert pairs.iou.min() < 0.15 and pairs.iou.max() > 0.85
    # both boxes inside their image, both sides >= min_box_size
    hw = np.asarray(sizes, np.float64)[pairs.image_index]
    for boxes in (pairs.box_a, pairs.box_b):
        assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= hw[:, 1] + 1e-4)
        assert np.all(boxes[:, 3] <= hw[:, 0] + 1e-4)
        assert np.all(boxes[:, 2:] - boxes[:, :2] >= 4.0 - 1e-4)
    # image 1's references are its usable GT box; the other images' are random
    on_gt = pairs.image_index == 1
    assert on_gt.any() and np.all(pairs.from_gt == on_gt)
    np.testing.assert_array_equal(pairs.box_a[on_gt], np.tile([[10, 10, 60, 50]], (on_gt.sum(), 1)))
    # random references cover all three size bins
    assert set(pairs.size_bin[~on_gt].tolist()) == {0, 1, 2}


def test_pairs_reference_modes():
    rng = np.random.default_rng(1)
    sizes = [(100, 100), (100, 100)]
    gt = [np.array([[20, 20, 70, 80]], np.float32), None]
    only_gt = fs.sample_box_pairs(sizes, gt, 18, rng, reference="gt")
    assert np.all(only_gt.image_index == 0) and np.all(only_gt.from_gt)
    none_gt = fs.sample_box_pairs(sizes, gt, 18, rng, reference="random")
    assert not none_gt.from_gt.any() and set(none_gt.image_index.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="no image has a ground-truth box"):
        fs.sample_box_pairs(sizes, [None, None], 18, rng, reference="gt")


def test_size_bins_scale_with_the_image():
    # COCO-like: side/longer side below 0.05 small, below 0.15 medium, else large
    boxes = np.array([[0, 0, 30, 30], [0, 0, 31, 31], [0, 0, 100, 100], [0, 0, 30, 30]], np.float32)
    hw = np.array([[480, 640], [480, 640], [480, 640], [48, 64]])
    assert fs.size_bin_of(boxes, hw).tolist() == [0, 0, 2, 2]
    assert fs.size_bin_of(np.array([[0, 0, 64, 64]]), np.array([[480, 640]])).tolist() == [1]


# ---------------------------------------------------------------- statistics


def test_pearson_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.random(200)
    y = 0.3 * x + rng.normal(0, 0.2, 200)
    assert fs.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert fs.pearson(x, -2 * x + 1) == pytest.approx(-1.0)
    assert np.isnan(fs.pearson(x, np.ones_like(x))) and np.isnan(fs.pearson([1.0], [2.0]))


class MaskFeatures:
    """Features that are a known function of the box: its indicator on a 1-px grid, so the
    cosine similarity of two boxes is inter / sqrt(area_a · area_b)."""

    def features(self, images, boxes):
        out = []
        for im, b in zip(images, boxes):
            h, w = im.shape[-2:]
            ys, xs = torch.arange(h) + 0.5, torch.arange(w) + 0.5
            for x1, y1, x2, y2 in b.tolist():
                m = ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]
                out.append(m.flatten().float())
        return torch.stack(out)


class RandomFeatures:
    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def features(self, images, boxes):
        return torch.randn(sum(len(b) for b in boxes), 64, generator=self.g)


def test_correlation_is_high_for_box_features_and_near_zero_for_random_ones():
    rng = np.random.default_rng(3)
    images = [torch.zeros(3, 96, 96) for _ in range(6)]
    pairs = fs.sample_box_pairs([(96, 96)] * 6, [None] * 6, 270, rng, reference="random", min_box_size=8)
    cos_mask = fs.pair_cosine_similarities(MaskFeatures(), images, pairs, batch_size=4)
    cos_random = fs.pair_cosine_similarities(RandomFeatures(), images, pairs, batch_size=4)
    assert np.isfinite(cos_mask).all() and np.isfinite(cos_random).all()
    # the features belong to the right pair: cosine of indicator masks ~ inter/sqrt(a·b) >= IoU
    assert np.all(cos_mask >= pairs.iou - 0.05)
    rows = fs.correlation_rows(pairs.iou, cos_mask, pairs.size_bin)
    assert [r["size"] for r in rows] == ["small", "medium", "large", "all"]
    assert sum(r["pairs"] for r in rows[:3]) == rows[-1]["pairs"] == 270
    assert rows[-1]["pearson"] > 0.9 and rows[-1]["slope"] > 0
    assert abs(fs.correlation_rows(pairs.iou, cos_random, pairs.size_bin)[-1]["pearson"]) < 0.15
    means = rows[-1]["mean_cosine_per_iou_bin"]
    assert len(means) == len(BINS) - 1 and means[-1] > means[0]
    table = fs.markdown_table(rows)
    assert table.count("\n") == 2 + 4 and "| all | 270 |" in table


def test_plot_has_the_documented_size():
    from PIL import Image

    rng = np.random.default_rng(4)
    iou = rng.random(60)
    cos = iou + rng.normal(0, 0.1, 60)
    size = rng.integers(3, size=60)
    png = fs.plot_png(iou, cos, size, fs.correlation_rows(iou, cos, size), title="t")
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == fs.plot_size(3)
        assert len(set(im.convert("RGB").getdata())) > 3  # points, lines and text, not a blank canvas


# ---------------------------------------------------------------- config and command line


def _cfg(**kw) -> IouSimilarityConfig:
    return IouSimilarityConfig(**{"checkpoint": "c.pt", "corpus": "k", "output": "o", **kw})


@pytest.mark.parametrize("kw, key", [
    ({"checkpoint": ""}, "checkpoint is required"),
    ({"output": ""}, "output is required"),
    ({"num_pairs": 0}, "num_pairs"),
    ({"iou_bins": [0.5, 0.3, 0.9]}, "iou_bins"),
    ({"iou_bins": [0.5]}, "iou_bins"),
    ({"iou_bins": [0.0, 0.5]}, "iou_bins"),
    ({"size_thresholds": [0.2, 0.1]}, "size_thresholds"),
    ({"reference": "gtt"}, "reference"),
    ({"pool": "max"}, "pool"),
    ({"device": "tpu"}, "device"),
    ({"num_images": 0}, "num_images"),
])
def test_config_is_validated_naming_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(**kw).validate()
    _cfg().validate()


def test_cli_parses_analyze_like_bench(capsys):
    cmd = cli.parse_command(["analyze", "iou-similarity", "--checkpoint", "run/model.pt", "--corpus", "s3://b/c",
                             "--output", "out", "num_pairs=90"])
    assert cmd == cli.Command("analyze iou-similarity", None,
                              ["checkpoint=run/model.pt", "corpus=s3://b/c", "output=out", "num_pairs=90"])
    assert cli.load_stage("analyze iou-similarity")[0] is IouSimilarityConfig
    assert cli.main(["analyze", "iou-similarity", "--print-config", "checkpoint=/c.pt", "num_pairs=90"]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert (resolved["checkpoint"], resolved["num_pairs"], resolved["pool"]) == ("/c.pt", 90, "mean")
    assert IouSimilarityConfig(**resolved) == load_config(IouSimilarityConfig, validate=False,
                                                          overrides=["checkpoint=/c.pt", "num_pairs=90"])
    assert cli.main(["analyze", "iou-similarity", "checkpoint=/c.pt", "corpus=/k", "output=/o", "num_pairs=0"]) == 2
    assert "num_pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["analyze", "iou-similarity", "--help"])
    helped = capsys.readouterr().out
    assert "num_pairs: 2000" in helped and "--checkpoint" in helped


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_detection_corpus(tmp_path_factory):
    from tests.conftest import make_corpus

    uri = str(tmp_path_factory.mktemp("analyze") / "corpus")
    manifest = make_corpus(uri, num_images=4, size=96, samples_per_shard=4, style="detection", classes="downstream")
    return uri, manifest.classes


def _check_outputs(out: str, summary: dict, num_pairs: int) -> dict:
    from PIL import Image

    with Image.open(os.path.join(out, "iou_similarity.png")) as im:
        assert im.format == "PNG" and im.size == fs.plot_size(3)
    with open(os.path.join(out, "iou_similarity.json")) as f:
        data = json.load(f)
    assert data["pairs"] == summary["pairs"] == num_pairs
    assert len(data["per_pair"]["cosine"]) == num_pairs
    cos = np.asarray(data["per_pair"]["cosine"], np.float64)
    assert np.isfinite(cos).all() and np.all(np.abs(cos) <= 1 + 1e-6) and np.ptp(cos) > 0
    iou = np.asarray(data["per_pair"]["iou"])
    assert data["rows"][-1]["pearson"] == pytest.approx(np.corrcoef(iou, cos)[0, 1], abs=1e-6)
    assert data["pairs_with_gt_reference"] > 0  # the corpus has boxes: references come from them
    with open(os.path.join(out, "iou_similarity.md")) as f:
        table = f.read()
    assert f"| all | {num_pairs} |" in table
    return data


@pytest.mark.parametrize("detector", ["faster_rcnn", "fcos"])
def test_stage_on_a_random_detector(tmp_path, tiny_detection_corpus, detector, one_torch_thread):
    from pseudobox.config import to_dict
    from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint
    from pseudobox.models.detectors import DetectorArch, build_detector
    from pseudobox.pipelines.analyze import run

    corpus, classes = tiny_detection_corpus
    torch.manual_seed(0)
    arch = DetectorArch(detector=detector, depth=18, min_size=(96,), max_size=160, test_size=96)
    ckpt = str(tmp_path / "det" / "model.pt")
    save_checkpoint(make_checkpoint("detector", to_dict(arch), classes, build_detector(arch, len(classes)).state_dict(),
                                    method="random"), ckpt)
    out = str(tmp_path / "out")
    summary = run(_cfg(checkpoint=ckpt, corpus=corpus, output=out, num_pairs=27, num_images=3, device="cpu"))
    data = _check_outputs(out, summary, 27)
    assert data["model_type"] == "detector" and data["arch"]["detector"] == detector


def test_command_on_a_random_classifier(tmp_path, tiny_detection_corpus, capsys, one_torch_thread):
    from tests.conftest import make_classifier_checkpoint

    corpus, classes = tiny_detection_corpus
    ckpt = make_classifier_checkpoint(str(tmp_path / "cls" / "model.pt"), classes, depth=18)
    out = str(tmp_path / "out")
    rc = cli.main(["analyze", "iou-similarity", "--checkpoint", ckpt, "--corpus", corpus, "--output", out,
                   "num_pairs=18", "num_images=2", "image_size=128", "classifier_layer=layer3", "device=cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| all | 18 |" in printed  # the table is printed
    assert _check_outputs(out, {"pairs": 18}, 18)["model_type"] == "classifier"


def test_stage_on_a_random_predet(tmp_path, tiny_detection_corpus, one_torch_thread):
    predet = pytest.importorskip("pseudobox.models.predet")
    from pseudobox.config import to_dict
    from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint
    from pseudobox.pipelines.analyze import run

    corpus, classes = tiny_detection_corpus
    torch.manual_seed(0)
    arch = predet.PredetArch(depth=18, crop_size=96, box_head_dim=64)
    ckpt = str(tmp_path / "predet" / "model.pt")
    save_checkpoint(make_checkpoint("predet", to_dict(arch), classes, predet.build_predet(arch, len(classes)).state_dict(),
                                    method="predet"), ckpt)
    out = str(tmp_path / "out")
    summary = run(_cfg(checkpoint=ckpt, corpus=corpus, output=out, num_pairs=18, num_images=2, device="cpu"))
    assert _check_outputs(out, summary, 18)["model_type"] == "predet"
    extractor, _ = fs.load_roi_feature_extractor(ckpt)
    feats = extractor.features([torch.rand(3, 80, 100)], [torch.tensor([[5.0, 5.0, 50.0, 60.0], [0, 0, 99, 79]])])
    assert feats.shape == (2, 64)  # box_head_dim, image resized to crop_size with its boxes

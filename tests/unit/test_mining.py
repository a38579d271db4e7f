"""The mining actor and its outputs, without Ray."""
import numpy as np
import pytest
import torch

from pseudobox import storage
from pseudobox.datasets import ray_io
from pseudobox.datasets.corpus import iter_shard, load_manifest, shard_uris
from pseudobox.mining import outputs
from pseudobox.mining.cam import CamBoxMiner, multiscale_cams
from tests.conftest import make_classifier_checkpoint


def _raw_batch(corpus_uri):
    manifest = load_manifest(corpus_uri)
    rows = [r for u in shard_uris(corpus_uri, manifest) for r in iter_shard(u)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return ray_io.decode_batch(batch, manifest.classes), manifest


@pytest.fixture
def miner(tmp_path, tiny_corpus):
    uri, manifest = tiny_corpus
    ckpt = make_classifier_checkpoint(str(tmp_path / "cls" / "model.pt"), manifest.classes)
    return CamBoxMiner(ckpt, scales=(64, 96), threads=1)


def test_miner_outputs_boxes_in_image_pixels_with_image_labels(miner, tiny_corpus):
    batch, _ = _raw_batch(tiny_corpus[0])
    out = miner(batch)
    assert list(out["key"]) == list(batch["key"])
    n_boxes = 0
    for i in range(len(out["key"])):
        boxes, labels = out["boxes"][i], out["labels"][i]
        h, w = batch["image"][i].shape[:2]
        assert (out["width"][i], out["height"][i]) == (w, h)
        assert boxes.dtype == np.float32 and boxes.shape[1] == 4
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
        assert set(labels.tolist()) <= set(batch["labels"][i].tolist())
        assert (np.diff(out["scores"][i]) <= 1e-6).all() or len(set(labels.tolist())) > 1
        n_boxes += len(boxes)
    assert n_boxes >= len(out["key"])  # every image gets at least one box on average
    assert set(out["source"]) == {"cam"}


@pytest.mark.parametrize("scales", [(64,), (64, 96)])
def test_flip_averaged_cam_of_the_mirror_is_the_mirrored_cam(miner, scales):
    # An asymmetric, non-square image: the flip-averaged CAM of its mirror image, flipped
    # back, must equal its own. Swapping or forgetting the flip-back breaks this.
    torch.manual_seed(0)
    img = torch.rand(3, 80, 112)
    img[:, 10:40, 5:50] += 2.0  # a bright block on the left only
    mirror = img.flip(-1)
    idx, lab = torch.tensor([0]), torch.tensor([1])
    cam, (size,) = multiscale_cams(miner.model, [img], idx, lab, scales=scales, flip=True)
    cam_m, (size_m,) = multiscale_cams(miner.model, [mirror], idx, lab, scales=scales, flip=True)
    assert size == size_m
    a, b = cam[0, :size[0], :size[1]], cam_m[0, :size[0], :size[1]].flip(-1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Without flip averaging the property does not hold: the test is not vacuous.
    plain, _ = multiscale_cams(miner.model, [img], idx, lab, scales=scales, flip=False)
    plain_m, _ = multiscale_cams(miner.model, [mirror], idx, lab, scales=scales, flip=False)
    assert (plain[0] - plain_m[0].flip(-1)).abs().max() > 1e-2


def test_each_scale_is_normalised_before_averaging(miner):
    # One scale's CAM scaled by 1000 must not drown the other: after per-scale min-max
    # normalisation, the average of two scales lies in [0, 1] whatever the raw ranges.
    torch.manual_seed(1)
    img = torch.rand(3, 64, 96)
    cams, (size,) = multiscale_cams(miner.model, [img], torch.tensor([0]), torch.tensor([2]), scales=(64, 96))
    valid = cams[0, :size[0], :size[1]]
    assert valid.min() >= -1e-6 and valid.max() <= 1 + 1e-6
    assert valid.max() > 0.5  # the two normalised maps share some of their peak


def test_error_rows_pass_through_without_boxes(miner, tiny_corpus):
    batch, _ = _raw_batch(tiny_corpus[0])
    batch["error"][0] = "corrupt_image: test"
    batch["image"][0] = ray_io.PLACEHOLDER_IMAGE
    out = miner(batch)
    assert out["error"][0] == "corrupt_image: test" and len(out["boxes"][0]) == 0


def test_box_quality_counts():
    gt = np.array([[10, 10, 50, 50], [60, 60, 90, 90]], np.float32)
    gt_labels = np.array([1, 1])
    mined = np.array([[12, 12, 50, 48], [0, 0, 5, 5]], np.float32)
    q = outputs.box_quality(mined, np.array([1, 1]), np.array([0.9, 0.5], np.float32), [1], gt, gt_labels)
    assert q == {"corloc_hits": 1, "corloc_images": 1, "gt_boxes": 2, "gt_recalled": 1}
    q = outputs.box_quality(mined, np.array([1, 1]), np.array([0.1, 0.5], np.float32), [1], gt, gt_labels)
    assert q["corloc_hits"] == 0  # the top-scoring box misses


def test_part_writer_is_resumable_and_reports(tmp_path, miner, tiny_corpus):
    batch, manifest = _raw_batch(tiny_corpus[0])
    out_uri = str(tmp_path / "mined")
    writer = outputs.ShardPartWriter(out_uri, {s.name: s.num_samples for s in manifest.shards}, "cam")
    out = miner(batch)
    completed = writer.add_batch(out)
    assert sorted(completed) == sorted(s.name for s in manifest.shards)
    assert outputs.done_shards(out_uri) == {s.name for s in manifest.shards}
    reports = outputs.load_reports(out_uri)
    summary = outputs.summarize(reports)
    assert summary["ok"] == manifest.num_samples and summary["boxes"] == sum(len(b) for b in out["boxes"])
    assert summary["corloc_images"] == manifest.num_samples  # synthetic corpus has GT for every label
    mined = outputs.load_mined_boxes(out_uri, manifest.shards[0].name)
    key = str(out["key"][0])
    np.testing.assert_allclose(mined[key][0], out["boxes"][0])
    coco = outputs.export_coco(out_uri, manifest.classes, str(tmp_path / "coco.json"))
    assert len(coco["images"]) == manifest.num_samples
    assert len(coco["annotations"]) == summary["boxes"]
    ann = coco["annotations"][0]
    assert ann["bbox"][2] >= 0 and ann["category_id"] >= 1


def test_part_is_atomic_under_failure(tmp_path, monkeypatch):
    out_uri = str(tmp_path / "mined")
    writer = outputs.ShardPartWriter(out_uri, {"shard-000000.tar": 1}, "cam")
    writer.buffers["shard-000000.tar"] = [{"key": "a", "shard": "shard-000000.tar", "boxes": np.zeros((0, 4)),
                                           "labels": np.zeros(0), "scores": np.zeros(0), "width": 1, "height": 1,
                                           "source": "cam", "error": "", "corloc_hits": 0, "corloc_images": 0,
                                           "gt_boxes": 0, "gt_recalled": 0}]

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(outputs.pq, "write_table", boom)
    with pytest.raises(OSError):
        writer.flush("shard-000000.tar")
    assert outputs.done_shards(out_uri) == set()
    assert storage.listdir(str(tmp_path / "mined" / "parts")) == []


def _row(key, error=""):
    return {"key": key, "shard": "s.tar", "boxes": np.zeros((1, 4), np.float32), "labels": np.zeros(1, np.int64),
            "scores": np.ones(1, np.float32), "width": 4, "height": 4, "source": "cam", "error": error,
            "corloc_hits": 0, "corloc_images": 0, "gt_boxes": 0, "gt_recalled": 0}


def _batch(rows):
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


@pytest.mark.parametrize("order", ["error_last", "error_first"])
def test_shard_error_record_in_any_order_never_overwrites_the_part(tmp_path, order):
    out_uri = str(tmp_path / "mined")
    writer = outputs.ShardPartWriter(out_uri, {"s.tar": 2}, "cam")
    rows = [_row("a"), _row("b"), _row("__s.tar__truncated", "truncated_shard: cut")]
    if order == "error_first":
        rows = rows[::-1]
    for r in rows:
        writer.add_batch(_batch([r]))
    writer.close()
    part = outputs.read_part(outputs.part_uri(out_uri, "s.tar")).to_pydict()
    assert sorted(part["key"]) == ["a", "b"]
    report = outputs.load_reports(out_uri)["s.tar"]
    assert report["rows"] == 2 and report["ok"] == 2 and report["boxes"] == 2
    assert report["errors"] == {"truncated_shard": 1}


def test_missing_samples_are_reported(tmp_path):
    out_uri = str(tmp_path / "mined")
    writer = outputs.ShardPartWriter(out_uri, {"s.tar": 5}, "cam")
    writer.add_batch(_batch([_row("a"), _row("__s.tar__truncated", "truncated_shard: cut")]))
    writer.close()
    assert outputs.load_reports(out_uri)["s.tar"]["errors"] == {"truncated_shard": 1, "missing_samples": 4}

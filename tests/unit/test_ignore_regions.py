"""COCO crowd and VOC difficult boxes: kept for evaluation, left out of training targets."""
import json

import numpy as np
import pytest
import torch

from pseudobox.datasets import ray_io
from pseudobox.datasets.corpus import encode_image, iter_corpus, iter_shard, parse_meta, shard_uris, load_manifest
from pseudobox.pipelines.build_corpus import BuildCorpusConfig, build_coco
from pseudobox.pipelines.evaluate import evaluate_detector

CLASSES = ["cat", "dog"]
META = {"labels": [0], "boxes": [[2, 2, 10, 10], [20, 20, 30, 30]], "box_labels": [0, 1], "iscrowd": [0, 1]}


def test_flags_are_parsed_and_validated():
    out = parse_meta(json.dumps(META).encode(), CLASSES, (40, 40))
    assert out["iscrowd"].tolist() == [False, True] and out["difficult"].tolist() == [False, False]
    with pytest.raises(ValueError, match="^invalid_json"):
        parse_meta(json.dumps({**META, "difficult": [1]}).encode(), CLASSES, (40, 40))


@pytest.fixture
def coco_corpus(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(encode_image(np.zeros((40, 40, 3), np.uint8)))
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 40}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 8, 8], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 20, 10, 10], "iscrowd": 1}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = str(tmp_path / "corpus")
    build_coco(BuildCorpusConfig(builder="coco", output=out, source=str(tmp_path / "images"),
                                 annotations=str(tmp_path / "ann.json")))
    return out


def test_coco_builder_keeps_crowd_boxes_flagged(coco_corpus):
    (sample,) = list(iter_corpus(coco_corpus))
    assert sample["box_labels"].tolist() == [0, 1] and sample["iscrowd"].tolist() == [False, True]
    assert sample["labels"] == [0]  # image-level labels come from non-crowd objects only


def test_coco_builder_keeps_area_or_leaves_it_to_the_box(tmp_path, coco_corpus):
    (sample,) = list(iter_corpus(coco_corpus))
    assert sample["area"].tolist() == [64.0, 100.0]  # the fixture's annotations have no area: w·h
    coco = json.loads((tmp_path / "ann.json").read_text())
    coco["annotations"][0]["area"] = 30.5
    coco["annotations"][1]["area"] = 2000
    (tmp_path / "ann2.json").write_text(json.dumps(coco))
    out = str(tmp_path / "corpus2")
    build_coco(BuildCorpusConfig(builder="coco", output=out, source=str(tmp_path / "images"),
                                 annotations=str(tmp_path / "ann2.json")))
    (sample,) = list(iter_corpus(out))
    assert sample["area"].tolist() == [30.5, 2000.0] and sample["iscrowd"].tolist() == [False, True]


def test_training_targets_leave_out_crowd_boxes(coco_corpus):
    manifest = load_manifest(coco_corpus)
    rows = [r for u in shard_uris(coco_corpus, manifest) for r in iter_shard(u)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = ray_io.decode_batch(batch, manifest.classes)
    assert out["boxes"][0].tolist() == [[2, 2, 10, 10]] and out["box_labels"][0].tolist() == [0]


@pytest.mark.parametrize("crowd", [False, True])
def test_an_undetected_crowd_region_is_not_a_miss(coco_corpus, crowd):
    samples = list(iter_corpus(coco_corpus))
    samples[0]["iscrowd"][:] = [False, crowd]

    def predict(images):  # finds the cat, not the (crowd) dog region
        return [{"boxes": torch.tensor([[2.0, 2, 10, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]

    metrics = evaluate_detector(predict, samples, CLASSES)
    expected = 100.0 if crowd else 50.0  # unflagged, the dog is a missed object: its class AP is 0
    assert metrics["AP50"] == pytest.approx(expected) and metrics["VOC_AP50"] == pytest.approx(expected)

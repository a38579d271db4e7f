"""COCO metrics as COCO computes them: a hand-written COCO JSON goes through the COCO
builder into a corpus, is read back and evaluated; pycocotools' COCOeval run directly on
the same JSON and detections is the oracle.

COCO's small / medium / large buckets use each annotation's ``area`` (the segmentation's),
not the box's w·h, and a detection on a crowd region is ignored.
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from pseudobox.datasets.corpus import encode_image, iter_corpus
from pseudobox.evaluation import evaluate_coco, gt_from_sample
from pseudobox.evaluation.coco import COCO_METRIC_NAMES
from pseudobox.pipelines.build_corpus import BuildCorpusConfig, build_coco

# Category ids deliberately unsorted and sparse: the corpus indexes them by sorted id.
CATEGORIES = [{"id": 5, "name": "person"}, {"id": 2, "name": "bike"}]
CLASSES = ["bike", "person"]
IMAGES = [
    {"id": 1, "file_name": "a.jpg", "width": 200, "height": 200},
    {"id": 2, "file_name": "b.png", "width": 100, "height": 80},
    {"id": 3, "file_name": "c.jpg", "width": 64, "height": 64},  # no objects
]
ANNOTATIONS = [
    # w·h 14400 (large) but area 500 (small): COCO counts it small.
    {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 120, 120], "area": 500.0, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 5, "bbox": [130, 130, 60, 60], "area": 2000.0, "iscrowd": 1},
    {"id": 3, "image_id": 1, "category_id": 2, "bbox": [100, 0, 100, 100], "area": 10000.0, "iscrowd": 0},
    # w·h 400 (small) but area 5000 (medium).
    {"id": 4, "image_id": 2, "category_id": 5, "bbox": [5, 5, 20, 20], "area": 5000.0, "iscrowd": 0},
    {"id": 5, "image_id": 2, "category_id": 2, "bbox": [40, 10, 50, 50], "area": 2500.0, "iscrowd": 0},
    {"id": 6, "image_id": 2, "category_id": 2, "bbox": [60, 62, 30, 16], "area": 100.5, "iscrowd": 0},
]
DETECTIONS = [
    {"image_id": 1, "category_id": 5, "bbox": [10, 10, 120, 120], "score": 0.9},   # perfect on ann 1
    {"image_id": 1, "category_id": 5, "bbox": [135, 135, 50, 50], "score": 0.95},  # inside the crowd region
    {"image_id": 2, "category_id": 5, "bbox": [60, 40, 15, 15], "score": 0.97},    # false positive
    {"image_id": 2, "category_id": 5, "bbox": [5, 5, 20, 20], "score": 0.7},       # perfect on ann 4
    {"image_id": 2, "category_id": 5, "bbox": [30, 40, 40, 35], "score": 0.75},    # false positive (medium)
    {"image_id": 3, "category_id": 5, "bbox": [30, 30, 20, 20], "score": 0.8},     # false positive (small)
    {"image_id": 2, "category_id": 2, "bbox": [40, 10, 50, 50], "score": 0.8},     # perfect on ann 5
    {"image_id": 2, "category_id": 2, "bbox": [61, 63, 30, 15], "score": 0.6},     # IoU 0.9375 with ann 6
    {"image_id": 3, "category_id": 2, "bbox": [0, 0, 30, 30], "score": 0.85},      # false positive
]


def write_coco(tmp_path, images, annotations, categories=CATEGORIES) -> tuple[str, str]:
    """Writes the images (JPEG / PNG by name) and the JSON; builds the corpus.
    Returns ``(annotations path, corpus uri)``."""
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for im in images:
        pixels = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
        fmt = "png" if im["file_name"].endswith(".png") else "jpg"
        (src / im["file_name"]).write_bytes(encode_image(pixels, fmt=fmt))
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    corpus = str(tmp_path / "corpus")
    build_coco(BuildCorpusConfig(builder="coco", output=corpus, source=str(src), annotations=str(ann_path)))
    return str(ann_path), corpus


def sample_key(image: dict) -> str:
    return f"{image['id']}_{image['file_name'].rsplit('.', 1)[0]}"


def to_preds(detections, images, categories=CATEGORIES) -> list[dict]:
    """COCO results (xywh, category ids) → pseudobox predictions (xyxy, class indices)."""
    index_of = {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
    preds = []
    for im in images:
        dets = [d for d in detections if d["image_id"] == im["id"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
        preds.append({"key": sample_key(im), "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
                      "labels": torch.tensor([index_of[d["category_id"]] for d in dets], dtype=torch.int64)})
    return preds


def oracle(ann_path: str, detections: list[dict]) -> dict[str, float]:
    """pycocotools' COCOeval straight on the JSON file and the results list, in percent."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(ann_path)
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in detections]), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (math.nan if v < 0 else float(v) * 100.0) for name, v in zip(COCO_METRIC_NAMES, evaluator.stats[:6])}


def ours(corpus: str, preds: list[dict], keys: set[str] | None = None) -> dict[str, float]:
    gts = [gt_from_sample(s) for s in iter_corpus(corpus, keys=keys)]
    keep = {g["key"] for g in gts}
    return evaluate_coco(gts, [p for p in preds if p["key"] in keep], CLASSES)


def assert_same_metrics(got: dict, expected: dict) -> None:
    for name in COCO_METRIC_NAMES:
        if math.isnan(expected[name]):
            assert math.isnan(got[name]), (name, got, expected)
        else:
            assert got[name] == pytest.approx(expected[name], abs=1e-6), (name, got, expected)


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path, IMAGES, ANNOTATIONS)


def test_area_and_crowd_flags_survive_the_round_trip(coco):
    _, corpus = coco
    samples = {s["key"]: s for s in iter_corpus(corpus)}
    assert sorted(samples) == sorted(sample_key(im) for im in IMAGES)
    for im in IMAGES:
        s = samples[sample_key(im)]
        anns = [a for a in ANNOTATIONS if a["image_id"] == im["id"]]
        assert s["image"].shape[:2] == (im["height"], im["width"])
        assert s["area"].tolist() == [a["area"] for a in anns]
        assert s["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
        assert s["boxes"].tolist() == [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        gt = gt_from_sample(s)
        assert gt["area"].tolist() == [a["area"] for a in anns]
        assert gt["iscrowd"].tolist() == gt["difficult"].tolist() == [bool(a["iscrowd"]) for a in anns]


def test_metrics_match_cocoeval_on_the_original_json(coco):
    ann_path, corpus = coco
    expected = oracle(ann_path, DETECTIONS)
    assert_same_metrics(ours(corpus, to_preds(DETECTIONS, IMAGES)), expected)


def test_the_oracle_tells_area_from_box_size(coco, tmp_path):
    """Guard for the test above: with w·h as area the buckets come out differently, so
    the match is not by accident."""
    ann_path, _ = coco
    by_box = [{**a, "area": a["bbox"][2] * a["bbox"][3]} for a in ANNOTATIONS]
    wh_path = tmp_path / "by_box.json"
    wh_path.write_text(json.dumps({"images": IMAGES, "annotations": by_box, "categories": CATEGORIES}))
    with_area, with_wh = oracle(ann_path, DETECTIONS), oracle(str(wh_path), DETECTIONS)
    for name in ("APs", "APm", "APl"):
        assert not with_area[name] == pytest.approx(with_wh[name], nan_ok=True), name


def test_a_small_area_box_counts_in_aps_not_apl(coco):
    """Image 1: the person has a large box (120x120) but a small area (500); it is found
    perfectly; the bike (large area) is missed; a detection sits on the crowd region."""
    _, corpus = coco
    metrics = ours(corpus, to_preds(DETECTIONS, IMAGES), keys={"1_a"})
    assert metrics["APs"] == pytest.approx(100.0)  # the person, found
    assert metrics["APl"] == pytest.approx(0.0)    # only the missed bike is large
    assert math.isnan(metrics["APm"])              # the crowd region is no medium GT


def test_a_detection_on_a_crowd_region_is_not_a_false_positive(tmp_path):
    images = [{"id": 7, "file_name": "x.png", "width": 100, "height": 100}]
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 10, 20, 30], "area": 400.0, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 5, "bbox": [50, 50, 40, 40], "area": 1200.0, "iscrowd": 1},
    ]
    detections = [
        {"image_id": 7, "category_id": 5, "bbox": [55, 55, 30, 30], "score": 0.9},  # on the crowd region
        {"image_id": 7, "category_id": 5, "bbox": [10, 10, 20, 30], "score": 0.5},
    ]
    ann_path, corpus = write_coco(tmp_path, images, annotations)
    metrics = ours(corpus, to_preds(detections, images))
    # Counted as a false positive, the top-scored crowd detection would halve precision.
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert_same_metrics(metrics, oracle(ann_path, detections))


def test_annotations_without_area_fall_back_to_box_size(tmp_path):
    """COCO-style JSON without ``area`` (hand-made sets): the box's w·h is used."""
    images = [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 200}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 120, 120], "iscrowd": 0},
                   {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 150, 20, 20], "area": 900.0}]
    _, corpus = write_coco(tmp_path, images, annotations)
    (sample,) = iter_corpus(corpus)
    assert sample["area"].tolist() == [14400.0, 900.0]
    assert sample["iscrowd"].tolist() == [False, False]


def test_evaluate_detector_uses_the_area(coco):
    from pseudobox.pipelines.evaluate import evaluate_detector

    ann_path, corpus = coco
    preds = {p["key"]: p for p in to_preds(DETECTIONS, IMAGES)}
    samples = list(iter_corpus(corpus))
    batches = iter([[preds[s["key"]] for s in samples]])

    def predict(images):  # one batch holding every image, in corpus order
        return [{k: p[k] for k in ("boxes", "scores", "labels")} for p in next(batches)]

    metrics = evaluate_detector(predict, samples, CLASSES, batch_size=len(samples))
    assert_same_metrics(metrics, oracle(ann_path, DETECTIONS))

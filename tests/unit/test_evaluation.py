"""Tests for pseudobox.evaluation (COCO via pycocotools, VOC AP50)."""

import math

import numpy as np
import pytest
import torch

from pseudobox.evaluation import (
    coco_image_ids,
    evaluate_coco,
    evaluate_voc,
    gt_from_sample,
    to_coco_dets,
    to_coco_gt,
    voc_ap,
)

CLASS_NAMES = ["cat", "dog"]


def make_gt(key, boxes, labels, difficult=None, width=640, height=480, area=None, iscrowd=None):
    gt = {
        "key": key,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "width": width,
        "height": height,
    }
    if difficult is not None:
        gt["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    if area is not None:
        gt["area"] = area
    if iscrowd is not None:
        gt["iscrowd"] = torch.tensor(iscrowd, dtype=torch.bool)
    return gt


def make_pred(key, boxes, scores, labels):
    return {
        "key": key,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def perfect_preds(gts):
    return [
        {
            "key": gt["key"],
            "boxes": gt["boxes"],
            "scores": torch.ones(len(gt["labels"])),
            "labels": gt["labels"],
        }
        for gt in gts
    ]


@pytest.fixture
def sized_gts():
    """Two images with one small (20x20), one medium (50x50) and one large (200x200) box."""
    return [
        make_gt("img_a", [[10, 10, 30, 30], [100, 100, 150, 150]], [0, 1]),
        make_gt("img_b", [[0, 0, 200, 200]], [1]),
    ]


# --- COCO ---------------------------------------------------------------------


def test_to_coco_gt_converts_xyxy_to_xywh_and_one_based_ids(sized_gts):
    coco = to_coco_gt(sized_gts, CLASS_NAMES)
    assert [img["file_name"] for img in coco["images"]] == ["img_a", "img_b"]
    first = coco["annotations"][0]
    assert first["bbox"] == [10.0, 10.0, 20.0, 20.0]
    assert first["area"] == 400.0
    assert first["category_id"] == 1 and first["iscrowd"] == 0
    assert [c["id"] for c in coco["categories"]] == [1, 2]
    assert len({a["id"] for a in coco["annotations"]}) == 3


def test_to_coco_dets_converts_boxes_and_maps_image_ids(sized_gts):
    image_ids = coco_image_ids(to_coco_gt(sized_gts, CLASS_NAMES))
    dets = to_coco_dets([make_pred("img_b", [[5, 6, 15, 26]], [0.25], [1])], image_ids)
    expected = {"image_id": image_ids["img_b"], "category_id": 2, "bbox": [5.0, 6.0, 10.0, 20.0]}
    assert dets == [{**expected, "score": 0.25}]
    with pytest.raises(ValueError, match="nope"):
        to_coco_dets([make_pred("nope", [[0, 0, 1, 1]], [1.0], [0])], image_ids)


def test_coco_perfect_predictions_score_100(sized_gts, capsys):
    metrics = evaluate_coco(sized_gts, perfect_preds(sized_gts), CLASS_NAMES)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for name, value in metrics.items():
        assert isinstance(value, float)
        assert value == pytest.approx(100.0), name
    assert capsys.readouterr().out == ""  # pycocotools' printing is swallowed


def test_coco_shifted_boxes_keep_ap50_but_lose_ap75():
    gts = [make_gt("img", [[0, 0, 100, 100]], [0])]
    # Shift by 20 px: IoU = 8000 / 12000 = 0.667, between 0.5 and 0.75.
    preds = [make_pred("img", [[20, 0, 120, 100]], [0.9], [0])]
    metrics = evaluate_coco(gts, preds, CLASS_NAMES)
    assert metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert 0.0 < metrics["AP"] < 100.0


def test_coco_area_range_without_gt_is_nan():
    gts = [make_gt("img", [[0, 0, 200, 200]], [0])]  # only a large box
    metrics = evaluate_coco(gts, perfect_preds(gts), CLASS_NAMES)
    assert metrics["APl"] == pytest.approx(100.0)
    assert math.isnan(metrics["APs"]) and math.isnan(metrics["APm"])


def test_coco_empty_predictions_give_zero(sized_gts):
    for preds in ([], [make_pred("img_a", [], [], [])]):
        metrics = evaluate_coco(sized_gts, preds, CLASS_NAMES)
        assert metrics == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0}


def test_coco_missing_pred_entry_means_no_detections(sized_gts):
    # Only img_a is predicted (perfectly); img_b's large box is missed.
    metrics = evaluate_coco(sized_gts, perfect_preds(sized_gts)[:1], CLASS_NAMES)
    assert metrics["APs"] == pytest.approx(100.0)
    assert metrics["APl"] == pytest.approx(0.0)
    assert metrics["AP50"] < 100.0


def test_coco_unknown_key_raises(sized_gts):
    preds = perfect_preds(sized_gts) + [make_pred("ghost_image", [[0, 0, 5, 5]], [0.5], [0])]
    with pytest.raises(ValueError, match="ghost_image"):
        evaluate_coco(sized_gts, preds, CLASS_NAMES)


def test_coco_accepts_numpy_and_lists(sized_gts):
    preds = [
        {
            "key": "img_a",
            "boxes": np.array([[10, 10, 30, 30], [100, 100, 150, 150]]),
            "scores": [1.0, 1.0],
            "labels": [0, 1],
        },
        {
            "key": "img_b",
            "boxes": [[0, 0, 200, 200]],
            "scores": np.array([0.5]),
            "labels": np.array([1]),
        },
    ]
    assert evaluate_coco(sized_gts, preds, CLASS_NAMES)["AP"] == pytest.approx(100.0)


# --- COCO area -----------------------------------------------------------------


def coco_oracle(gts, preds):
    """pycocotools' COCOeval on the dicts to_coco_gt / to_coco_dets build, in percent."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict = to_coco_gt(gts, CLASS_NAMES)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(to_coco_dets(preds, coco_image_ids(gt_dict))), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [math.nan if v < 0 else v * 100 for v in ev.stats[:6]]


def test_to_coco_gt_takes_the_given_area():
    gts = [make_gt("img", [[0, 0, 100, 100], [0, 0, 10, 20], [5, 5, 6, 6]], [0, 1, 0],
                   area=[500.0, float("nan"), 0.0])]
    areas = [a["area"] for a in to_coco_gt(gts, CLASS_NAMES)["annotations"]]
    assert areas == [500.0, 200.0, 0.0]  # NaN: the box's w·h stands in
    for tensor_like in (torch.tensor([500.0, 1.0, 2.0]), np.array([500.0, 1.0, 2.0])):
        gts[0]["area"] = tensor_like
        assert [a["area"] for a in to_coco_gt(gts, CLASS_NAMES)["annotations"]] == [500.0, 1.0, 2.0]


@pytest.mark.parametrize("area", [[1.0, 2.0], [-1.0, 1.0, 1.0], [float("inf"), 1.0, 1.0]])
def test_bad_area_raises(area):
    gts = [make_gt("img", [[0, 0, 100, 100], [0, 0, 10, 20], [5, 5, 6, 6]], [0, 1, 0], area=area)]
    with pytest.raises(ValueError, match="area"):
        to_coco_gt(gts, CLASS_NAMES)


def test_coco_size_buckets_follow_area_not_box_size():
    # A 200x200 box whose area is small, found perfectly; a 20x20 box whose area is
    # large, missed. By w·h it would be APs 0 / APl 100; COCO's way is the opposite.
    gts = [make_gt("img", [[0, 0, 200, 200], [300, 300, 320, 320]], [0, 1], area=[500.0, 20000.0])]
    preds = [make_pred("img", [[0, 0, 200, 200]], [0.9], [0])]
    metrics = evaluate_coco(gts, preds, CLASS_NAMES)
    assert metrics["APs"] == pytest.approx(100.0)
    assert metrics["APl"] == pytest.approx(0.0)
    assert math.isnan(metrics["APm"])
    assert [metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(
        coco_oracle(gts, preds), nan_ok=True)


def test_coco_without_detections_buckets_follow_area():
    gts = [make_gt("img", [[0, 0, 200, 200]], [0], area=[500.0])]
    metrics = evaluate_coco(gts, [], CLASS_NAMES)
    assert metrics["APs"] == 0.0 and math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])


def test_coco_crowd_region_ignores_its_detections():
    gts = [make_gt("img", [[0, 0, 20, 20], [100, 100, 200, 200]], [0, 0], iscrowd=[False, True])]
    preds = [make_pred("img", [[110, 110, 190, 190], [0, 0, 20, 20]], [0.9, 0.5], [0, 0])]
    assert evaluate_coco(gts, preds, CLASS_NAMES)["AP"] == pytest.approx(100.0)


def test_voc_ignores_area(sized_gts):
    preds = perfect_preds(sized_gts)[:1]
    plain = evaluate_voc(sized_gts, preds, num_classes=2)
    with_area = [{**gt, "area": torch.full((len(gt["labels"]),), 7.0)} for gt in sized_gts]
    assert evaluate_voc(with_area, preds, num_classes=2) == plain


def test_gt_from_sample():
    sample = {"key": "k", "image": np.zeros((30, 40, 3), np.uint8),
              "boxes": np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32), "box_labels": np.array([1, 0]),
              "iscrowd": np.array([False, True]), "difficult": np.array([True, False]),
              "area": np.array([50.0, 60.0], np.float32)}
    gt = gt_from_sample(sample)
    assert (gt["key"], gt["width"], gt["height"]) == ("k", 40, 30)
    assert gt["labels"].tolist() == [1, 0] and gt["area"].tolist() == [50.0, 60.0]
    assert gt["iscrowd"].tolist() == [False, True]
    assert gt["difficult"].tolist() == [True, True]  # VOC ignores crowd regions too
    assert to_coco_gt([gt], CLASS_NAMES)["annotations"][0]["area"] == 50.0
    bare = gt_from_sample({"key": "c", "image": np.zeros((8, 9, 3), np.uint8), "labels": [0]})
    assert bare["boxes"].shape == (0, 4) and bare["area"] is None
    assert math.isnan(evaluate_coco([bare], [], CLASS_NAMES)["AP"])  # nothing to score


# --- VOC ----------------------------------------------------------------------


def test_voc_perfect_predictions_score_100(sized_gts):
    metrics = evaluate_voc(sized_gts, perfect_preds(sized_gts), num_classes=2)
    assert metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP50_07"] == pytest.approx(100.0)
    assert metrics["per_class"] == pytest.approx([100.0, 100.0])


def test_voc_hand_computed_case():
    # 2 GT boxes; ranked detections TP (0.9), FP (0.8), TP (0.7).
    # Cumulative precision = [1, 1/2, 2/3], recall = [1/2, 1/2, 1].
    # Interpolated precision: 1 for recall in (0, 1/2], 2/3 for recall in (1/2, 1].
    # All-point AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # 11-point AP: thresholds 0..0.5 (6 of them) -> 1, 0.6..1.0 (5) -> 2/3,
    #   so (6 + 5 * 2/3) / 11 = 28/33.
    gts = [make_gt("img", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    boxes = [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]
    preds = [make_pred("img", boxes, [0.9, 0.8, 0.7], [0, 0, 0])]
    metrics = evaluate_voc(gts, preds, num_classes=1)
    assert metrics["AP50"] == pytest.approx(100 * 5 / 6, abs=1e-6)
    assert metrics["AP50_07"] == pytest.approx(100 * 28 / 33, abs=1e-6)

    precision, recall = [1, 1 / 2, 2 / 3], [1 / 2, 1 / 2, 1]
    assert voc_ap(recall, precision) == pytest.approx(5 / 6, abs=1e-6)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(28 / 33, abs=1e-6)


def test_voc_ranking_is_global_across_images():
    # Same detections as the hand-computed case, spread over two images: the FP
    # (0.8) in img_2 ranks between the TPs (0.9 in img_1, 0.7 in img_2).
    gts = [make_gt("img_1", [[0, 0, 10, 10]], [0]), make_gt("img_2", [[20, 20, 30, 30]], [0])]
    preds = [
        make_pred("img_1", [[0, 0, 10, 10]], [0.9], [0]),
        make_pred("img_2", [[50, 50, 60, 60], [20, 20, 30, 30]], [0.8, 0.7], [0, 0]),
    ]
    assert evaluate_voc(gts, preds, num_classes=1)["AP50"] == pytest.approx(100 * 5 / 6, abs=1e-6)


def test_voc_duplicate_detection_is_false_positive():
    # The duplicate of the first GT (0.8) is a FP ranked between the two TPs, so this
    # is the hand-computed case again: AP = 5/6. Were the duplicate a TP, AP would be 100.
    gts = [make_gt("img", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]
    preds = [make_pred("img", boxes, [0.9, 0.8, 0.7], [0, 0, 0])]
    assert evaluate_voc(gts, preds, num_classes=1)["AP50"] == pytest.approx(100 * 5 / 6, abs=1e-6)


def test_voc_difficult_gt_is_ignored():
    # A detection on a difficult box is neither TP nor FP, and the difficult box is not
    # a positive. Treating it as absent would give 50 below (a FP ranked first);
    # treating it as a normal GT would give 50 in the second case (recall 1/2).
    gts = [make_gt("img", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], difficult=[False, True])]
    boxes = [[20, 20, 30, 30], [20, 20, 30, 30], [0, 0, 10, 10]]
    preds = [make_pred("img", boxes, [0.9, 0.85, 0.8], [0, 0, 0])]
    assert evaluate_voc(gts, preds, num_classes=1)["AP50"] == pytest.approx(100.0)
    only_difficult_found = [make_pred("img", [[20, 20, 30, 30]], [0.9], [0])]
    assert evaluate_voc(gts, only_difficult_found, num_classes=1)["AP50"] == pytest.approx(0.0)


def test_voc_shifted_boxes_and_iou_threshold():
    gts = [make_gt("img", [[0, 0, 100, 100]], [0])]
    preds = [make_pred("img", [[20, 0, 120, 100]], [0.9], [0])]  # IoU 0.667
    assert evaluate_voc(gts, preds, num_classes=1)["AP50"] == pytest.approx(100.0)
    assert evaluate_voc(gts, preds, num_classes=1, iou_threshold=0.75)["AP50"] == pytest.approx(0.0)


def test_voc_wrong_class_is_not_a_match_and_class_without_gt_is_nan():
    gts = [make_gt("img", [[0, 0, 10, 10]], [0])]
    preds = [make_pred("img", [[0, 0, 10, 10]], [0.9], [1])]
    metrics = evaluate_voc(gts, preds, num_classes=2)
    assert metrics["per_class"][0] == pytest.approx(0.0)
    assert math.isnan(metrics["per_class"][1])
    assert metrics["AP50"] == pytest.approx(0.0)  # mean over class 0 only


def test_voc_empty_predictions_give_zero(sized_gts):
    metrics = evaluate_voc(sized_gts, [], num_classes=2)
    assert metrics["AP50"] == 0.0 and metrics["AP50_07"] == 0.0
    assert metrics["per_class"] == [0.0, 0.0]


def test_voc_unknown_key_raises(sized_gts):
    with pytest.raises(ValueError, match="ghost_image"):
        preds = [make_pred("ghost_image", [[0, 0, 5, 5]], [0.5], [0])]
        evaluate_voc(sized_gts, preds, num_classes=2)


def test_voc_rejects_out_of_range_labels(sized_gts):
    with pytest.raises(ValueError, match="labels"):
        evaluate_voc(sized_gts, [make_pred("img_a", [[0, 0, 5, 5]], [0.5], [7])], num_classes=2)


def test_voc_ap_edge_cases():
    assert voc_ap([], []) == 0.0
    assert voc_ap([], [], use_07_metric=True) == 0.0
    # Reaching only half the recall at full precision gives half the area.
    assert voc_ap([0.5], [1.0]) == pytest.approx(0.5)
    assert voc_ap([0.5], [1.0], use_07_metric=True) == pytest.approx(6 / 11)

"""Pseudo-label filtering, mapping into the strong view, and the quality monitor."""
import pytest
import torch

from pseudobox.ssod.augment import Geometry
from pseudobox.ssod.pseudo_labels import (PseudoLabelMonitor, ScoreThresholdFilter, greedy_true_positives,
                                          map_pseudo_labels)


def det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def empty():
    return det([], [], [])


def test_filter_keeps_exactly_the_boxes_at_or_above_threshold():
    d = det([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3], [3, 3, 4, 4]], [0.9, 0.7, 0.69, 0.1], [0, 1, 2, 1])
    d["extra"] = "kept as is"
    (out, out_empty) = ScoreThresholdFilter(0.7)([d, empty()])
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert out["labels"].tolist() == [0, 1]
    assert out["boxes"].tolist() == [[0, 0, 1, 1], [1, 1, 2, 2]]
    assert out["extra"] == "kept as is"
    assert out_empty["boxes"].shape == (0, 4) and out_empty["labels"].dtype == torch.int64
    f = ScoreThresholdFilter()
    assert f.threshold == 0.7 and f.state_dict() == {}
    f.load_state_dict({})
    with pytest.raises(ValueError):
        f.load_state_dict({"thresholds": torch.zeros(3)})
    with pytest.raises(ValueError):
        ScoreThresholdFilter(1.5)


def test_map_pseudo_labels_drops_cropped_boxes_with_scores_and_labels():
    d = det([[10, 10, 20, 20], [60, 60, 80, 80], [0, 0, 100, 100]], [0.9, 0.8, 0.75], [1, 2, 0])
    geometries = [Geometry.identity((100, 100)).hflip().crop(0, 0, 50, 50), Geometry.identity((100, 100))]
    crop, same = map_pseudo_labels([d, empty()], geometries)
    # hflip: x -> 100 - x; crop keeps x, y < 50. Box 0 -> [80, 10, 90, 20]: outside. Box 1 -> [20, 60, ..]: outside.
    assert crop["boxes"].tolist() == [[0, 0, 50, 50]]
    assert crop["scores"].tolist() == pytest.approx([0.75])
    assert crop["labels"].tolist() == [0]
    assert same["boxes"].shape == (0, 4)
    none = map_pseudo_labels([empty()], [Geometry.identity((10, 10)).crop(0, 0, 5, 5)])[0]
    assert none["boxes"].shape == (0, 4) and none["scores"].shape == (0,)
    with pytest.raises(ValueError):
        map_pseudo_labels([d], [])


def test_greedy_matching_each_gt_once_highest_score_first():
    gt = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])}]
    # Two predictions on GT 0 (the lower-scored one listed first), one on GT 1 with the wrong class.
    pseudo = [det([[0, 0, 10, 11], [0, 0, 10, 10], [20, 20, 30, 30]], [0.8, 0.95, 0.9], [0, 0, 0])]
    assert greedy_true_positives(pseudo, gt).tolist() == [False, True, False]
    # A second-best GT is still available to the next prediction.
    gt2 = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12]]), "labels": torch.tensor([0, 0])}]
    pseudo2 = [det([[0, 0, 10, 10], [0, 0, 10, 11]], [0.9, 0.8], [0, 0])]
    assert greedy_true_positives(pseudo2, gt2).tolist() == [True, True]
    # IoU below 0.5 is no match; images without GT or predictions are fine.
    far = [det([[0, 0, 10, 10]], [0.9], [0])]
    assert greedy_true_positives(far, [{"boxes": torch.tensor([[5.0, 5, 15, 15]]), "labels": torch.tensor([0])}]
                                 ).tolist() == [False]
    assert greedy_true_positives([empty()], gt).shape == (0,)
    no_gt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    assert greedy_true_positives(far, no_gt).tolist() == [False]


def test_monitor_precision_recall_on_hand_made_case():
    monitor = PseudoLabelMonitor(num_classes=2, window=5)
    gt = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])}]
    # 3 predictions: one true positive on GT 0, a duplicate of it, and a miss of class 1 far away.
    pseudo = [det([[0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.75], [0, 0, 1])]
    monitor.update(pseudo, gt, raw_scores=[torch.tensor([0.92, 0.81, 0.76, 0.3, 0.02])])
    s = monitor.summary()
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["precision_per_class"] == pytest.approx([1 / 2, 0.0])
    assert s["recall_per_class"] == pytest.approx([1.0, 0.0])
    assert s["pseudo_per_class"] == [2, 1] and s["tp_per_class"] == [1, 0] and s["gt_per_class"] == [1, 1]
    assert s["pseudo_per_image"] == 3.0
    assert sum(s["score_hist"]) == 5 and s["score_hist"][0] == 1 and s["score_hist"][-2] == 1  # 0.02, 0.92
    # A second step: both predictions hit (GT 0 and GT 1); a second image has only a class-1 GT.
    pseudo2 = [det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 1]), empty()]
    gt2 = gt + [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1])}]
    monitor.update(pseudo2, gt2)
    s = monitor.summary()
    assert s["tp_per_class"] == [2, 1] and s["gt_per_class"] == [2, 3] and s["pseudo_per_class"] == [3, 2]
    assert s["precision"] == pytest.approx(3 / 5) and s["recall"] == pytest.approx(3 / 5)
    assert s["images"] == 3 and s["pseudo_per_image"] == pytest.approx(5 / 3)
    monitor.reset()
    s = monitor.summary()
    assert s["images"] == 0 and s["precision"] is None and s["pseudo_per_image"] is None
    # 2 GT, 3 predictions: both GT found plus a duplicate → precision 2/3, recall 1.
    pseudo3 = [det([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]], [0.9, 0.95, 0.8], [0, 0, 1])]
    monitor.update(pseudo3, gt)
    s = monitor.summary()
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == 1.0
    monitor.reset()
    s = monitor.summary()
    assert s["images"] == 0 and s["precision"] is None and s["pseudo_per_image"] is None


def test_monitor_without_ground_truth_counts_only():
    monitor = PseudoLabelMonitor(num_classes=3)
    monitor.update([det([[0, 0, 1, 1]], [0.9], [2])], None)
    s = monitor.summary()
    assert s["pseudo_per_class"] == [0, 0, 1] and s["precision"] is None and s["recall"] is None
    assert s["precision_per_class"] == [None, None, None]


def test_warn_if_empty_only_on_a_whole_empty_window():
    monitor = PseudoLabelMonitor(num_classes=2, window=3)
    low = [torch.tensor([0.1, 0.2, 0.3, 0.45])]
    for _ in range(2):
        monitor.update([empty(), empty()], raw_scores=low)
        assert monitor.warn_if_empty() is None  # window not full yet
    monitor.update([det([[0, 0, 1, 1]], [0.9], [0])], raw_scores=low)
    assert monitor.warn_if_empty() is None  # one pseudo-label in the window
    for _ in range(2):
        monitor.update([empty()], raw_scores=low)
        assert monitor.warn_if_empty() is None  # the pseudo-label is still in the last 3 steps
    monitor.reset()  # a reporting period ends: the summary restarts, the warning window does not
    assert monitor.summary()["images"] == 0
    monitor.update([empty()], raw_scores=low)
    text = monitor.warn_if_empty()
    assert text is not None and "no pseudo-labels in the last 3 steps" in text
    assert "max 0.450" in text and "12 raw teacher scores" in text
    assert monitor.warn_if_empty() is None  # warned once; the window starts afresh
    # Without raw scores, or with a teacher that detects nothing, the warning says so.
    bare = PseudoLabelMonitor(num_classes=1, window=1)
    bare.update([empty()])
    assert "no raw teacher scores" in bare.warn_if_empty()
    bare.update([empty()], raw_scores=[torch.zeros(0)])
    assert "no detections at all" in bare.warn_if_empty()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_filter_map_and_monitor_stay_on_device():
    d = {k: v.cuda() for k, v in det([[10, 10, 20, 20], [60, 60, 80, 80]], [0.9, 0.5], [1, 0]).items()}
    (kept,) = ScoreThresholdFilter(0.7)([d])
    (mapped,) = map_pseudo_labels([kept], [Geometry.identity((100, 100)).resize(50, 50)])
    assert mapped["boxes"].is_cuda and mapped["boxes"].tolist() == [[5, 5, 10, 10]]
    monitor = PseudoLabelMonitor(num_classes=2, window=1)
    monitor.update([mapped], [{"boxes": torch.tensor([[5.0, 5, 10, 10]]).cuda(), "labels": torch.tensor([1]).cuda()}],
                   raw_scores=d["scores"])
    assert monitor.summary()["precision"] == 1.0 and monitor.warn_if_empty() is None

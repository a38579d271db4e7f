"""cam_to_boxes against hand-computed moments, the scipy reference, and edge cases."""
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pseudobox.mining.cam import cam_to_boxes, connected_components, normalize_cams
from pseudobox.mining.cam_reference import cam_to_boxes_reference


def test_uniform_rectangle_matches_hand_computed_moments():
    # A 3-row × 5-column block of ones at rows 2..4, cols 3..7 of a 10×12 map.
    cam = torch.zeros(1, 10, 12)
    cam[0, 2:5, 3:8] = 1.0
    (boxes, scores), = cam_to_boxes(cam)
    # Centres: x = 3.5..7.5 → xc = 5.5; y = 2.5..4.5 → yc = 3.5.
    # Uniform weights: var_x = mean((x - 5.5)^2) = (4+1+0+1+4)/5 = 2 → w = sqrt(24);
    # var_y = (1+0+1)/3 = 2/3 → h = sqrt(8). All thresholds give the same box; NMS keeps one.
    w, h = math.sqrt(24), math.sqrt(8)
    expected = torch.tensor([[5.5 - w / 2, 3.5 - h / 2, 5.5 + w / 2, 3.5 + h / 2]])
    assert boxes.shape == (1, 4)
    torch.testing.assert_close(boxes, expected, atol=1e-5, rtol=0)
    assert scores.item() == pytest.approx(1.0)


def test_weighted_moments_and_score():
    # Two columns with weights 1.0 and 0.5 (after normalisation the background is 0).
    cam = torch.zeros(1, 6, 6)
    cam[0, 2, 2] = 1.0
    cam[0, 2, 3] = 0.5
    (boxes, scores), = cam_to_boxes(cam, thresholds=(0.2,))
    # x centres 2.5 (w=1) and 3.5 (w=.5): xc = (2.5 + 1.75)/1.5 = 17/6;
    # var = (1*(2.5-xc)^2 + .5*(3.5-xc)^2)/1.5 = 2/9 → width = sqrt(12*2/9)
    xc, width = 17 / 6, math.sqrt(12 * 2 / 9)
    assert boxes[0, 0].item() == pytest.approx(xc - width / 2, abs=1e-5)
    assert boxes[0, 2].item() == pytest.approx(xc + width / 2, abs=1e-5)
    # A single row has zero variance: the box gets the minimum side, one cell, around yc = 2.5.
    assert boxes[0, 1].item() == pytest.approx(2.0) and boxes[0, 3].item() == pytest.approx(3.0)
    assert scores[0].item() == pytest.approx(0.75)  # mean normalised CAM inside the component


def test_one_cell_components_get_boxes_of_at_least_min_side():
    cam = torch.zeros(1, 8, 8)
    cam[0, 3, 4] = 1.0  # one cell: zero variance along both axes
    cam[0, 6, 1:6] = 0.9  # one row, five cells wide
    (boxes, scores), = cam_to_boxes(cam, thresholds=(0.5,), min_component_ratio=0.0)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert len(boxes) == 2 and (widths >= 1 - 1e-6).all() and (heights >= 1 - 1e-6).all()
    torch.testing.assert_close(boxes[0], torch.tensor([4.0, 3.0, 5.0, 4.0]))  # the peak cell, exactly
    (wide, _), = cam_to_boxes(cam, thresholds=(0.5,), min_component_ratio=0.0, min_side=2.0)
    assert ((wide[:, 3] - wide[:, 1]) >= 2 - 1e-6).all()
    (degenerate, _), = cam_to_boxes(cam, thresholds=(0.5,), min_component_ratio=0.0, min_side=0.0)
    assert ((degenerate[:, 3] - degenerate[:, 1]) == 0).all()  # the old behaviour, only on request


def test_at_most_max_components_per_threshold_largest_first():
    cam = torch.zeros(1, 24, 24)
    sizes = [(2, 5), (5, 5), (3, 5), (4, 5), (1, 5), (5, 5)]  # (rows, cols): areas 10, 25, 15, 20, 5, 25
    for k, (r, c) in enumerate(sizes):
        top, left = (k // 3) * 12, (k % 3) * 8
        cam[0, top:top + r, left:left + c] = 1.0 if k != 5 else 0.95
    # No ratio filter and one threshold: the 4 largest components (25, 25, 20, 15) remain.
    (boxes, _), = cam_to_boxes(cam, thresholds=(0.5,), min_component_ratio=0.0, max_components=4, nms_iou=1.0)
    # A uniform block of r rows has height sqrt(r² − 1): 5 rows → 4.9, 4 → 3.9, 3 → 2.8.
    heights = sorted(round(h, 1) for h in (boxes[:, 3] - boxes[:, 1]).tolist())
    assert heights == [2.8, 3.9, 4.9, 4.9]
    (two, _), = cam_to_boxes(cam, thresholds=(0.5,), min_component_ratio=0.0, max_components=2, nms_iou=1.0)
    assert len(two) == 2 and ((two[:, 3] - two[:, 1]) > 4).all()  # the two 5-row blocks
    # The ratio filter applies first: half of 25 drops the areas 10 and 5, leaving 4 anyway.
    (filtered, _), = cam_to_boxes(cam, thresholds=(0.5,), max_components=10, nms_iou=1.0)
    assert len(filtered) == 4


def test_small_components_are_dropped_relative_to_the_largest():
    cam = torch.zeros(1, 20, 20)
    cam[0, 1:7, 1:7] = 1.0   # area 36
    cam[0, 12:16, 12:16] = 1.0  # area 16 < 18 → dropped
    cam[0, 10:15, 1:6] = 1.0  # area 25 ≥ 18 → kept
    (boxes, _), = cam_to_boxes(cam)
    assert len(boxes) == 2
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).tolist()
    assert sorted(centres) == sorted([[4.0, 4.0], [3.5, 12.5]])


def test_diagonal_pixels_are_one_component():
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 2] = True
    mask[0, 4, 0] = True
    labels = connected_components(mask)
    assert labels[0, 0, 0] == labels[0, 1, 1] == labels[0, 2, 2] != 0
    assert labels[0, 4, 0] not in (0, labels[0, 0, 0])
    assert (labels[~mask] == 0).all()


def test_snake_component_needs_many_propagation_steps():
    # A serpentine path forces label propagation over its full length.
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    for r in range(0, 9, 2):
        mask[0, r, :] = True
    for k, r in enumerate(range(1, 9, 2)):
        mask[0, r, 8 if k % 2 == 0 else 0] = True
    labels = connected_components(mask)
    assert len(torch.unique(labels[mask])) == 1


def test_thresholds_give_nested_boxes_merged_by_nms():
    # A peaked blob: a low threshold gives a big box, a high one a smaller box (IoU < 0.8).
    y, x = np.mgrid[0:32, 0:32]
    cam = np.exp(-((x - 16) ** 2 + (y - 14) ** 2) / (2 * 5.0 ** 2))
    (boxes, scores), = cam_to_boxes(torch.tensor(cam[None], dtype=torch.float32))
    assert len(boxes) >= 2
    assert (scores[:-1] >= scores[1:]).all()  # sorted by score
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert areas.max() > 1.5 * areas.min()
    (single, _), = cam_to_boxes(torch.tensor(cam[None], dtype=torch.float32), nms_iou=0.0)
    assert len(single) == 1  # NMS at IoU 0 keeps only the best box


def test_constant_and_empty_inputs():
    out = cam_to_boxes(torch.ones(2, 8, 8))
    assert [len(b) for b, _ in out] == [0, 0]
    assert cam_to_boxes(torch.zeros(0, 8, 8)) == []
    with pytest.raises(ValueError):
        cam_to_boxes(torch.zeros(8, 8))


def test_normalisation_is_per_map():
    cams = torch.stack([torch.linspace(0, 1, 16).view(4, 4), 5 + 10 * torch.linspace(0, 1, 16).view(4, 4)])
    norm = normalize_cams(cams)
    torch.testing.assert_close(norm[0], norm[1])
    assert norm.min() == 0 and norm.max() == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_matches_scipy_reference(seed):
    rng = np.random.default_rng(seed)
    cams = np.stack([gaussian_filter(rng.normal(size=(18, 24)), sigma) for sigma in (1.0, 1.5, 2.0, 3.0) * 4])
    batched = cam_to_boxes(torch.tensor(cams, dtype=torch.float32))
    total = 0
    for cam, (boxes, scores) in zip(cams, batched):
        ref_boxes, ref_scores = cam_to_boxes_reference(cam)
        assert boxes.shape == ref_boxes.shape
        np.testing.assert_allclose(boxes.numpy(), ref_boxes, atol=1e-4)
        np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5)
        total += len(boxes)
    assert total > len(cams)  # several boxes per noisy CAM: the comparison is not vacuous


def test_boxes_are_clipped_to_the_map():
    cam = torch.zeros(1, 6, 6)
    cam[0, :, 0] = 1.0  # a column on the left border
    cam[0, 0, :] = 1.0  # and a row on the top border
    (boxes, _), = cam_to_boxes(cam)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 6).all() and (boxes[:, 3] <= 6).all()

"""Tests for the procedural shape dataset (pseudobox.datasets.synthetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pseudobox.datasets import synthetic
from pseudobox.datasets.synthetic import (
    DOWNSTREAM_CLASSES,
    PRETRAIN_CLASSES,
    class_names,
    classification_sample,
    detection_sample,
    num_classes,
    render_scene,
)

ALL_DESIGNS = synthetic._PRETRAIN_DESIGNS + synthetic._DOWNSTREAM_DESIGNS


def _mask_box(mask: np.ndarray) -> list[float]:
    """Tight continuous xyxy box of a boolean mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area[:, None] + area[None, :] - inter)


# --------------------------------------------------------------------------- #
# Class catalogue
# --------------------------------------------------------------------------- #


def test_class_sets_are_disjoint_and_large_enough():
    assert len(PRETRAIN_CLASSES) >= 10
    assert len(DOWNSTREAM_CLASSES) >= 5
    assert len(PRETRAIN_CLASSES) + len(DOWNSTREAM_CLASSES) >= 16
    assert not set(PRETRAIN_CLASSES) & set(DOWNSTREAM_CLASSES)
    assert len(set(PRETRAIN_CLASSES)) == len(PRETRAIN_CLASSES)
    assert len(set(DOWNSTREAM_CLASSES)) == len(DOWNSTREAM_CLASSES)


def test_class_names_matches_constants_and_rejects_unknown_kind():
    assert class_names("pretrain") == list(PRETRAIN_CLASSES)
    assert class_names("downstream") == list(DOWNSTREAM_CLASSES)
    assert num_classes("pretrain") == len(PRETRAIN_CLASSES)
    with pytest.raises(ValueError):
        class_names("imagenet")


def test_every_class_has_a_distinct_shape_and_fill_combination():
    """No two classes share the same (shape, fill, colour family) triple."""
    signatures = {(d.shape, d.fill, d.primary, d.secondary) for d in ALL_DESIGNS}
    assert len(signatures) == len(ALL_DESIGNS)
    assert all(d.fill in synthetic.FILL_STYLES for d in ALL_DESIGNS)


@pytest.mark.parametrize("design", ALL_DESIGNS, ids=lambda d: d.name)
def test_shapes_stay_inside_the_unit_box(design):
    """The size normalisation in _draw_object relies on shapes living in [-1, 1]^2."""
    grid = np.linspace(-3.0, 3.0, 241)
    u, v = np.meshgrid(grid, grid)
    for seed in range(3):
        mask = np.broadcast_to(design.shape(u, v, np.random.default_rng(seed)), u.shape)
        assert mask.any()
        assert not (mask & ((np.abs(u) > 1.0) | (np.abs(v) > 1.0))).any()


# --------------------------------------------------------------------------- #
# Single objects
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("design", ALL_DESIGNS, ids=lambda d: d.name)
def test_draw_object_mask_is_tight_and_sized(design):
    rng = np.random.default_rng(7)
    for size_px in (6.0, 17.5, 40.0, 75.3):
        mask, rgb = synthetic._draw_object(rng, design, size_px)
        assert mask.dtype == bool and mask.ndim == 2
        assert rgb.shape == mask.shape + (3,)
        # Tight: every border row / column of the crop contains object pixels.
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert max(mask.shape) <= math.ceil(size_px)
        if size_px >= 40:
            assert max(mask.shape) >= 0.7 * size_px, "object should roughly fill its nominal size"


def test_draw_object_is_deterministic():
    design = synthetic._PRETRAIN_DESIGNS[5]
    mask_a, rgb_a = synthetic._draw_object(np.random.default_rng(3), design, 33.0)
    mask_b, rgb_b = synthetic._draw_object(np.random.default_rng(3), design, 33.0)
    np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_array_equal(rgb_a, rgb_b)


# --------------------------------------------------------------------------- #
# Scenes
# --------------------------------------------------------------------------- #


def test_render_scene_output_types_and_shapes():
    image, boxes, labels = render_scene(np.random.default_rng(0), [0, 3, 5], "pretrain", (96, 112))
    assert image.shape == (96, 112, 3) and image.dtype == np.uint8
    assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4)
    assert labels.dtype == np.int64
    assert 1 <= len(labels) <= 3


def test_render_scene_empty_class_list():
    image, boxes, labels = render_scene(np.random.default_rng(0), [], "downstream", (64, 64))
    assert image.shape == (64, 64, 3)
    assert boxes.shape == (0, 4) and labels.shape == (0,)


def test_render_scene_rejects_bad_class_id():
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), [len(DOWNSTREAM_CLASSES)], "downstream", (64, 64))


@pytest.mark.parametrize("kind", ["pretrain", "downstream"])
def test_boxes_are_tight_to_drawn_pixels_on_flat_background(kind):
    """On a flat grey background, every non-grey pixel belongs to an object mask
    and each box equals the bounding box of its object's pixels."""
    rng = np.random.default_rng(11)
    count = num_classes(kind)
    for _ in range(15):
        class_ids = rng.integers(0, count, size=int(rng.integers(1, 5))).tolist()
        image, boxes, labels, masks = render_scene(
            rng, class_ids, kind, (100, 120), background="flat", return_masks=True
        )
        assert masks.shape == (len(labels), 100, 120)
        union = masks.any(axis=0)
        background_pixels = np.all(image == 128, axis=-1)
        # Outside the objects the image is untouched background.
        assert background_pixels[~union].all()
        for box, mask in zip(boxes, masks):
            assert mask.any()
            assert box.tolist() == _mask_box(mask)
            assert box.tolist() == _mask_box(mask & ~background_pixels)
        # Kept labels are the requested ones, in order (dropped ones removed).
        remaining = iter(class_ids)
        assert all(any(label == wanted for wanted in remaining) for label in labels.tolist())


def test_single_object_box_matches_non_background_pixels():
    for class_id in range(num_classes("pretrain")):
        image, boxes, _ = render_scene(
            np.random.default_rng(class_id), [class_id], "pretrain", (80, 80), background="flat"
        )
        assert len(boxes) == 1, "a lone object always fits"
        drawn = ~np.all(image == 128, axis=-1)
        assert boxes[0].tolist() == _mask_box(drawn)


def test_objects_do_not_overlap_much():
    rng = np.random.default_rng(5)
    for _ in range(30):
        _, boxes, labels, masks = render_scene(
            rng, rng.integers(0, 8, size=6).tolist(), "downstream", (128, 128),
            max_scale=0.5, return_masks=True,
        )
        if len(boxes) > 1:
            iou = _pairwise_iou(boxes.astype(np.float64))
            np.fill_diagonal(iou, 0.0)
            assert iou.max() < 0.3
        assert masks.sum(axis=0).max() <= 1, "object masks are disjoint"


def test_crowded_scenes_drop_objects_instead_of_overlapping():
    rng = np.random.default_rng(2)
    _, boxes, labels = render_scene(rng, [0] * 12, "pretrain", (64, 64), min_scale=0.6, max_scale=0.7)
    assert 1 <= len(labels) < 12
    assert len(boxes) == len(labels)


# --------------------------------------------------------------------------- #
# Determinism
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "sample",
    [
        lambda rng: render_scene(rng, [1, 2, 3], "pretrain", (90, 100)),
        lambda rng: classification_sample(rng),
        lambda rng: detection_sample(rng, vary_size=True),
    ],
    ids=["render_scene", "classification_sample", "detection_sample"],
)
def test_deterministic_given_seed(sample):
    first = sample(np.random.default_rng(1234))
    again = sample(np.random.default_rng(1234))
    other = sample(np.random.default_rng(4321))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


# --------------------------------------------------------------------------- #
# Samplers
# --------------------------------------------------------------------------- #


def _check_boxes_in_bounds(image, boxes):
    height, width = image.shape[:2]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    np.testing.assert_array_equal(boxes, np.round(boxes))


def test_classification_sample_dominant_object_and_labels():
    rng = np.random.default_rng(0)
    distractors = 0
    trials = 300
    for _ in range(trials):
        image, label, boxes, labels = classification_sample(rng, "pretrain", (96, 96))
        assert isinstance(label, int) and 0 <= label < len(PRETRAIN_CLASSES)
        assert labels[0] == label
        assert ((labels >= 0) & (labels < len(PRETRAIN_CLASSES))).all()
        _check_boxes_in_bounds(image, boxes)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert np.argmax(areas) == 0, "the dominant object has the largest box"
        short_side = min(image.shape[:2])
        assert max(boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]) <= math.ceil(0.7 * short_side)
        if len(labels) == 2:
            distractors += 1
            assert labels[1] != label
            longest = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            # Nominally <= 1/3; drawn extents lose up to ~25% to shape geometry.
            assert longest[1] <= 0.45 * longest[0] + 1
        assert len(labels) <= 2
    assert 0.18 < distractors / trials < 0.42


def test_classification_sample_sizes_vary_with_bounded_aspect():
    rng = np.random.default_rng(1)
    shapes = set()
    for _ in range(60):
        image, *_ = classification_sample(rng, "downstream", (128, 128))
        height, width = image.shape[:2]
        shapes.add((height, width))
        assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02
        assert 0.7 * 128 <= math.sqrt(height * width) <= 1.3 * 128
    assert len(shapes) > 20
    fixed, *_ = classification_sample(rng, size=(70, 90), vary_size=False)
    assert fixed.shape == (70, 90, 3)


def test_classification_sample_respects_requested_class():
    rng = np.random.default_rng(3)
    for class_id in range(len(DOWNSTREAM_CLASSES)):
        _, label, _, labels = classification_sample(rng, "downstream", class_id=class_id)
        assert label == class_id == labels[0]


@pytest.mark.parametrize("kind", ["pretrain", "downstream"])
def test_detection_sample_labels_bounds_and_counts(kind):
    rng = np.random.default_rng(9)
    seen = set()
    for _ in range(100):
        image, boxes, labels = detection_sample(rng, kind, (128, 128), min_objects=1, max_objects=4)
        assert image.shape == (128, 128, 3)
        assert 1 <= len(labels) <= 4
        assert ((labels >= 0) & (labels < num_classes(kind))).all()
        _check_boxes_in_bounds(image, boxes)
        seen.update(labels.tolist())
        longest = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        assert (longest <= math.ceil(0.45 * 128)).all()
    assert seen == set(range(num_classes(kind))), "all classes appear"


def test_textured_backgrounds_are_not_flat_and_vary():
    rng = np.random.default_rng(4)
    empties = [render_scene(rng, [], "pretrain", (64, 64))[0].astype(np.float64) for _ in range(5)]
    for image in empties:
        assert image.std() > 5.0
    assert not np.allclose(empties[0].mean(axis=(0, 1)), empties[1].mean(axis=(0, 1)), atol=2.0)


def test_preview_grid_writes_png(tmp_path):
    out = tmp_path / "preview.png"
    synthetic.write_preview_grid(str(out), tile=48)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_placement_rule_rejects_high_iou_even_with_disjoint_masks():
    occupied = np.zeros((40, 40), dtype=bool)
    occupied[0:20, 0:20] = True  # placed object: the full box [0, 0, 20, 20]
    placed = np.array([[0.0, 0.0, 20.0, 20.0]])
    empty_mask = np.zeros((20, 20), dtype=bool)
    empty_mask[-1, -1] = True  # only touches a pixel outside the placed object
    # IoU([10, 0, 30, 20], placed) = 1/3 >= 0.3 -> rejected although masks are disjoint.
    assert not synthetic._placement_is_free(np.array([10.0, 0.0, 30.0, 20.0]), empty_mask, placed, occupied)
    # IoU([14, 0, 34, 20], placed) = 0.176 and the mask pixel (19, 33) is free -> accepted.
    assert synthetic._placement_is_free(np.array([14.0, 0.0, 34.0, 20.0]), empty_mask, placed, occupied)
    # Low IoU but a shared pixel -> rejected.
    full_mask = np.ones((20, 20), dtype=bool)
    assert not synthetic._placement_is_free(np.array([14.0, 0.0, 34.0, 20.0]), full_mask, placed, occupied)

"""Unit tests for pseudobox.datasets.transforms: boxes follow the pixels exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pseudobox.datasets.transforms import (
    classification_batch, crop, hflip, random_resized_crop, resize, resize_short_side,
)


def rect_image(h: int, w: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """A [3, H, W] float image, 0 everywhere but 255 on pixels [x1, x2) × [y1, y2)."""
    x1, y1, x2, y2 = box
    im = torch.zeros(3, h, w)
    im[:, y1:y2, x1:x2] = 255.0
    return im


def tight_box(image: torch.Tensor, thresh: float = 127.5) -> list[float]:
    """The continuous xyxy box of pixels brighter than ``thresh`` (pixel j spans [j, j+1])."""
    mask = image[0] > thresh
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


# ---------------------------------------------------------------- hflip

def test_hflip_maps_known_box_exactly():
    im = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    out, b = hflip(im, boxes([1, 0, 3, 2], [0, 1, 5, 3]))
    assert torch.equal(b, boxes([2, 0, 4, 2], [0, 1, 5, 3]))
    assert torch.equal(out[..., 0], im[..., 4])
    assert torch.equal(out[..., 4], im[..., 0])


def test_hflip_twice_is_identity():
    g = torch.Generator().manual_seed(0)
    im = torch.rand(3, 17, 23, generator=g)
    b = torch.rand(5, 4, generator=g) * 10
    b[:, 2:] += b[:, :2]
    im2, b2 = hflip(*hflip(im, b))
    assert torch.equal(im2, im)
    assert torch.allclose(b2, b)


def test_hflip_does_not_modify_inputs():
    b = boxes([1, 2, 3, 4])
    hflip(torch.zeros(3, 4, 10), b)
    assert torch.equal(b, boxes([1, 2, 3, 4]))


def test_hflip_box_tracks_rectangle():
    im = rect_image(20, 30, (3, 4, 11, 9))
    out, b = hflip(im, boxes([3, 4, 11, 9]))
    assert tight_box(out) == b[0].tolist() == [19, 4, 27, 9]


def test_hflip_empty_boxes():
    _, b = hflip(torch.zeros(3, 4, 4), torch.zeros(0, 4))
    assert b.shape == (0, 4)


# ---------------------------------------------------------------- resize

def test_resize_scales_boxes_by_exact_ratios():
    im = torch.zeros(3, 40, 60)
    out, b = resize(im, boxes([6, 4, 30, 20], [0, 0, 60, 40]), (30, 90))
    assert out.shape == (3, 30, 90)
    assert torch.equal(b, boxes([9, 3, 45, 15], [0, 0, 90, 30]))


def test_resize_uint8_input_returns_float():
    out, _ = resize(torch.full((3, 8, 8), 200, dtype=torch.uint8), boxes([0, 0, 8, 8]), (4, 4))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 200.0))


@pytest.mark.parametrize("size", [(40, 60), (37, 91), (120, 80), (25, 25)])
def test_resize_box_tracks_rectangle(size):
    src = (12, 8, 36, 30)
    im = rect_image(40, 60, src)
    out, b = resize(im, boxes(src), size)
    got = tight_box(out)
    assert np.allclose(got, b[0].tolist(), atol=1.0), (got, b[0].tolist())


@pytest.mark.parametrize("hw, short, max_size, expected", [
    ((40, 80), 20, None, (20, 40)),
    ((80, 40), 20, None, (40, 20)),
    ((40, 160), 20, 60, (15, 60)),     # long side capped
    ((30, 45), 64, 1000, (64, 96)),    # upscaling
])
def test_resize_short_side(hw, short, max_size, expected):
    h, w = hw
    out, b = resize_short_side(torch.zeros(3, h, w), boxes([0, 0, w, h]), short, max_size)
    assert tuple(out.shape[-2:]) == expected
    assert torch.allclose(b, boxes([0, 0, expected[1], expected[0]]))


def test_resize_short_side_box_tracks_rectangle():
    src = (5, 10, 25, 30)
    out, b = resize_short_side(rect_image(40, 50, src), boxes(src), 64)
    assert tuple(out.shape[-2:]) == (64, 80)
    assert np.allclose(tight_box(out), b[0].tolist(), atol=1.0)


def test_flip_then_resize_compose():
    src = (2, 3, 14, 10)
    im, b = hflip(rect_image(16, 20, src), boxes(src))
    im, b = resize(im, b, (32, 30))
    assert np.allclose(tight_box(im), b[0].tolist(), atol=1.0)


# ---------------------------------------------------------------- crop

def test_crop_shifts_and_clips_boxes():
    im = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30)
    b = boxes([12, 6, 18, 10],    # inside the window
              [2, 2, 14, 8],      # partly outside left/top
              [25, 15, 40, 30],   # sticks out right/bottom
              [0, 0, 5, 5])       # entirely outside
    out, cb, keep = crop(im, b, top=5, left=10, height=10, width=12)
    assert out.shape == (3, 10, 12)
    assert torch.equal(out, im[:, 5:15, 10:22])
    assert torch.equal(cb, boxes([2, 1, 8, 5], [0, 0, 4, 3], [12, 10, 12, 10], [0, 0, 0, 0]))
    assert keep.tolist() == [True, True, False, False]


def test_crop_keep_threshold_is_visible_area_fraction():
    b = boxes([0, 0, 10, 10], [5, 0, 15, 10])  # fully visible; half visible in a 10-wide window
    _, _, keep = crop(torch.zeros(3, 10, 20), b, 0, 0, 10, 10, min_visible=0.0)
    assert keep.tolist() == [True, True]
    _, _, keep = crop(torch.zeros(3, 10, 20), b, 0, 0, 10, 10, min_visible=0.5)
    assert keep.tolist() == [True, False]  # exactly 0.5 visible is not "more than" 0.5
    _, _, keep = crop(torch.zeros(3, 10, 20), b, 0, 0, 10, 10, min_visible=0.49)
    assert keep.tolist() == [True, True]


def test_crop_box_tracks_rectangle():
    src = (4, 6, 20, 18)
    out, cb, keep = crop(rect_image(24, 24, src), boxes(src), top=10, left=8, height=14, width=16)
    assert keep.tolist() == [True]
    assert tight_box(out) == cb[0].tolist() == [0, 0, 12, 8]


# ---------------------------------------------------------------- classification batches

def test_random_resized_crop_size():
    out = random_resized_crop(torch.zeros(3, 50, 70, dtype=torch.uint8), 32, np.random.default_rng(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("train", [False, True])
def test_classification_batch_shapes_and_targets(train):
    rng = np.random.default_rng(0)
    images = np.empty(3, dtype=object)
    for i, (h, w) in enumerate([(40, 60), (64, 64), (31, 17)]):
        images[i] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    labels = np.empty(3, dtype=object)
    for i, lab in enumerate([[0, 2], [3], []]):
        labels[i] = np.asarray(lab, np.int64)
    out = classification_batch({"image": images, "labels": labels}, size=32, num_classes=4, train=train, seed=1)
    assert out["image"].shape == (3, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["target"].shape == (3, 4) and out["target"].dtype == np.float32
    np.testing.assert_array_equal(out["target"], [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_classification_batch_eval_is_a_plain_resize():
    im = np.full((20, 40, 3), 77, np.uint8)
    out = classification_batch({"image": [im], "labels": [[1]]}, size=16, num_classes=2, train=False)
    assert (out["image"] == 77).all()


def test_classification_batch_train_is_seeded():
    rng = np.random.default_rng(3)
    batch = {"image": [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(4)],
             "labels": [[0]] * 4}
    a = classification_batch(batch, size=24, num_classes=1, train=True, seed=5)
    b = classification_batch(batch, size=24, num_classes=1, train=True, seed=5)
    assert np.array_equal(a["image"], b["image"])


def test_classification_batch_empty():
    out = classification_batch({"image": [], "labels": []}, size=8, num_classes=3, train=True)
    assert out["image"].shape == (0, 8, 8, 3) and out["image"].dtype == np.uint8
    assert out["target"].shape == (0, 3) and out["target"].dtype == np.float32

"""EdgeBoxes: edge maps on hand-made edges, the grouping helpers, the box search on a
drawn rectangle, and a small recall parity case against OpenCV's implementation."""
import math

import numpy as np
import pytest
import torch

from pseudobox.config import ConfigError
from pseudobox.mining import edgeboxes as eb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def step_image(h=40, w=48, vertical=True):
    image = torch.zeros(1, 3, h, w)
    if vertical:
        image[..., :, w // 2:] = 1.0
    else:
        image[..., h // 2:, :] = 1.0
    return image


def rectangle_image(h=120, w=160, box=(40, 30, 120, 90)):
    image = torch.full((1, 3, h, w), 0.2)
    x0, y0, x1, y1 = box
    image[:, 0, y0:y1, x0:x1] = 0.9  # a red rectangle: one channel carries the edge
    return image


def test_edge_maps_thin_a_step_to_one_pixel_with_its_normal():
    for vertical in (True, False):
        E, O = eb.edge_maps(step_image(vertical=vertical))
        assert E.shape == O.shape == (1, 40, 48) and E.dtype == O.dtype == torch.float32
        assert float(E.min()) >= 0 and float(E.max()) <= 1 and float(O.min()) >= 0 and float(O.max()) < math.pi
        strong = E[0] > 0.1
        profile = strong.any(dim=0) if vertical else strong.any(dim=1)
        assert int(profile.sum()) == 1  # thinned: one column (row) of edge pixels
        where = profile.nonzero().item()
        half = (48 if vertical else 40) // 2
        assert where in (half - 1, half)  # at the step, between pixels half − 1 and half
        normal = O[0][strong]
        expected = 0.0 if vertical else math.pi / 2  # the gradient's direction, mod π
        diff = torch.remainder(normal - expected + math.pi / 2, math.pi) - math.pi / 2
        assert float(diff.abs().max()) < 1e-3
    # the strongest channel decides: an edge in blue alone is found like one in all channels
    blue = torch.zeros(1, 3, 40, 48)
    blue[:, 2, :, 24:] = 1.0
    assert torch.allclose(eb.edge_maps(blue)[0], eb.edge_maps(step_image())[0])


def test_edge_maps_take_a_pluggable_detector():
    calls = []

    def detector(images):
        calls.append(images.shape)
        return images.mean(1), torch.zeros_like(images[:, 0])

    E, O = eb.edge_maps(torch.rand(2, 3, 16, 20), detector=detector, thin=False)
    assert calls == [(2, 3, 16, 20)] and E.shape == (2, 16, 20) and float(O.abs().sum()) == 0
    with pytest.raises(ValueError, match="B, 3, H, W"):
        eb.edge_maps(torch.rand(3, 16, 20))


def test_connected_components_labels_each_component_by_its_smallest_node():
    src = torch.tensor([0, 1, 5, 6, 8])
    dst = torch.tensor([1, 2, 6, 3, 9])
    labels = eb.connected_components(10, src, dst)
    assert labels.tolist() == [0, 0, 0, 3, 4, 3, 3, 7, 8, 8]
    # a long chain given in the worst order still converges
    n = 200
    chain = torch.arange(n - 1).flip(0)
    assert (eb.connected_components(n, chain, chain + 1) == 0).all()


def test_edge_boxes_find_a_drawn_rectangle_with_both_backends():
    E, O = eb.edge_maps(rectangle_image())
    # edge pixels sit on the inner side of the step: the box spans them
    truth = torch.tensor([[39.0, 29.0, 120.0, 90.0]])
    for backend in ("torch", "opencv"):
        if backend == "opencv" and not eb.opencv_available():
            continue
        (boxes, scores), = eb.edge_boxes(E, O, max_boxes=50, backend=backend)
        assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and 0 < len(boxes) <= 50
        assert (scores[:-1] >= scores[1:]).all()
        from torchvision.ops import box_iou

        assert float(box_iou(truth, boxes[:5]).max()) > 0.9, backend


def test_edge_boxes_params_are_checked_and_nms_decay_runs():
    E, O = eb.edge_maps(rectangle_image())
    with pytest.raises(ConfigError, match="unknown EdgeBoxes parameters"):
        eb.edge_boxes(E, O, alhpa=0.5)
    with pytest.raises(ConfigError, match="edgebox.beta"):
        eb.edge_boxes(E, O, beta=0.0)
    (plain, _), = eb.edge_boxes(E, O, max_boxes=1000, backend="torch")
    (decayed, _), = eb.edge_boxes(E, O, max_boxes=1000, backend="torch", eta=0.9)
    # a shrinking threshold suppresses more
    assert 0 < len(decayed) < len(plain)
    from torchvision.ops import box_iou

    iou = box_iou(plain, plain).fill_diagonal_(0)
    assert float(iou.max()) <= 0.75 + 1e-6  # β-NMS


@pytest.mark.skipif(not eb.opencv_available(), reason="opencv-contrib not installed")
def test_recall_parity_with_opencv_on_synthetic_scenes():
    """Same E and O into both: recall at IoU 0.7 with 1,000 boxes ≥ 97% of OpenCV's."""
    from pseudobox.datasets.synthetic import detection_sample

    rng = np.random.default_rng(1)
    samples = [detection_sample(rng, size=(150, 200), min_objects=2, max_objects=5) for _ in range(6)]
    images = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _, _ in samples])
    gts = [torch.from_numpy(b) for _, b, _ in samples]
    E, O = eb.edge_maps(images)
    ours = eb.edge_boxes(E, O, max_boxes=1000, backend="torch")
    ref = eb.edge_boxes(E, O, max_boxes=1000, backend="opencv")
    r_ours = eb.proposal_recall(ours, gts, 1000, 0.7)
    r_ref = eb.proposal_recall(ref, gts, 1000, 0.7)
    assert r_ref > 0.5  # the scenes are not trivial for the oracle either
    assert r_ours >= 0.97 * r_ref, (r_ours, r_ref)


def test_box_scores_agree_between_per_image_and_padded_contours():
    """The CPU loop over images and the all-images-at-once path other devices take score
    any box the same; and a box's score falls when its border cuts a contour."""
    torch.manual_seed(0)
    images = torch.cat([rectangle_image(), rectangle_image(box=(20, 20, 70, 100))])
    E, O = eb.edge_maps(images)
    cfg = eb.make_config(backend="torch")
    contours = eb.contours(E, O, cfg)
    per_image, padded = eb._Scorer(E, contours, cfg), eb._Scorer(E, contours, cfg, padded=True)
    assert per_image.padded is None and padded.padded is not None
    img = torch.randint(0, 2, (300,))
    xy = torch.randint(0, 120, (300, 2))
    box = torch.cat([xy, xy + torch.randint(20, 100, (300, 2))], 1)
    assert torch.allclose(per_image.score(img, box), padded.score(img, box), atol=1e-6)
    for scorer in (per_image, padded):
        trials = scorer.side_trials(img, box, 2, (box[:, 2] + 5, box[:, 2] - 5))
        direct = scorer.score(img, trials[0][0])
        assert torch.allclose(trials[0][1], direct, atol=1e-6)
    whole = torch.tensor([[38, 28, 121, 91]])
    cut = torch.tensor([[38, 28, 80, 91]])  # right side through the rectangle
    s = per_image.score(torch.tensor([0, 0]), torch.cat([whole, cut]))
    assert float(s[0]) > 0.1 and float(s[1]) < 0.5 * float(s[0]), s.tolist()


def test_blank_and_tiny_images_give_no_boxes():
    for shape in ((2, 3, 64, 64), (1, 3, 20, 20)):  # no edges; smaller than the smallest window
        E, O = eb.edge_maps(torch.zeros(shape) if shape[-1] == 64 else torch.rand(shape))
        for backend in ("torch", "opencv") if eb.opencv_available() else ("torch",):
            results = eb.edge_boxes(E, O, max_boxes=10, backend=backend)
            assert len(results) == shape[0]
            assert all(b.shape == (0, 4) and s.shape == (0,) for b, s in results), backend

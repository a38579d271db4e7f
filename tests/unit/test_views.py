"""PreDet's two views: boxes mapped exactly (checked by inverting the recorded crop / resize /
flip), pixels where the boxes say, usability threshold, reproducibility."""
import pytest
import torch

from pseudobox.config import ConfigError
from pseudobox.datasets.views import ViewConfig, crop_window, resized_crop_params, two_views, two_views_with_geometry

torch.set_num_threads(1)

NO_PHOTO = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def _crop_and_flip(geometry):
    ops = dict(geometry.ops)
    return ops["crop"], "hflip" in ops


def _view_to_image(boxes, geometry, size):
    """Invert crop → resize to size×size → optional flip, by hand."""
    crop, flipped = _crop_and_flip(geometry)
    b = boxes.clone().double()
    if flipped:
        b[:, [0, 2]] = size - b[:, [2, 0]]
    sx, sy = crop["width"] / size, crop["height"] / size
    return torch.stack([crop["left"] + b[:, 0] * sx, crop["top"] + b[:, 1] * sy,
                        crop["left"] + b[:, 2] * sx, crop["top"] + b[:, 3] * sy], 1)


def _random_boxes(g, n, h, w):
    xy = torch.rand((n, 2), generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 8 + torch.rand((n, 2), generator=g) * torch.tensor([w * 0.5, h * 0.5])
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("seed", range(6))
def test_boxes_map_back_exactly_to_the_common_region(seed):
    h, w, size = 150, 210, 96
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    boxes = _random_boxes(g, 40, h, w)
    boxes[0] = torch.tensor([-10.0, -5.0, 300.0, 200.0])  # beyond the image: clipped first
    cfg = ViewConfig(crop_size=size)
    v1, b1, v2, b2, valid, g1, g2 = two_views_with_geometry(image, boxes, cfg, g)
    assert v1.shape == v2.shape == (3, size, size) and v1.dtype == torch.float32
    assert 0.0 <= float(v1.min()) and float(v1.max()) <= 1.0
    clipped = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                           boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)
    c1, c2 = crop_window(g1), crop_window(g2)
    common = torch.cat([torch.maximum(torch.maximum(clipped[:, :2], c1[:2]), c2[:2]),
                        torch.minimum(torch.minimum(clipped[:, 2:], c1[2:]), c2[2:])], 1)
    nonempty = (common[:, 2] > common[:, 0]) & (common[:, 3] > common[:, 1])
    assert nonempty.any()
    for mapped, geometry in ((b1, g1), (b2, g2)):
        back = _view_to_image(mapped, geometry, size)
        assert torch.allclose(back[nonempty], common[nonempty].double(), atol=1e-3)
    # usability: the common part keeps >= min_visible of the (clipped) box and >= min_box_size px per view
    area = lambda b: (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    sides = torch.stack([b1[:, 2] - b1[:, 0], b1[:, 3] - b1[:, 1], b2[:, 2] - b2[:, 0], b2[:, 3] - b2[:, 1]], 1)
    expected = nonempty & (area(common) >= cfg.min_visible * area(clipped)) & (sides >= cfg.min_box_size).all(1)
    assert torch.equal(valid, expected)


def test_flip_and_crop_are_both_exercised_and_views_differ():
    cfg = ViewConfig(crop_size=64)
    flips, crops = set(), set()
    image = torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        *_, g1, g2 = two_views_with_geometry(image, torch.zeros((0, 4)), cfg, g)
        for geometry in (g1, g2):
            crop, flipped = _crop_and_flip(geometry)
            flips.add(flipped)
            crops.add(tuple(crop.values()))
            assert 0.2 * 100 * 120 * 0.9 <= crop["height"] * crop["width"] <= 100 * 120
    assert flips == {True, False} and len(crops) > 12


def test_painted_box_lands_where_its_view_box_says():
    h, w, size = 120, 160, 80
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    box = torch.tensor([[50.0, 30.0, 110.0, 90.0]])
    image[0, 30:90, 50:110] = 255  # a red rectangle exactly covering the box
    cfg = ViewConfig(crop_size=size, scale=(0.6, 1.0), **NO_PHOTO)
    g = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(10):
        v1, b1, v2, b2, valid, g1, g2 = two_views_with_geometry(image, box, cfg, g)
        for view, mapped, geometry in ((v1, b1, g1), (v2, b2, g2)):
            # the full box in this view (not the common part): where the red paint must be
            full = geometry.map_boxes(box)[0]
            if float(full[2] - full[0]) < 6 or float(full[3] - full[1]) < 6:
                continue
            x1, y1, x2, y2 = full.tolist()
            red = view[0] > 0.5
            inner = red[int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2]
            assert inner.all()
            outside = torch.ones_like(red)
            outside[max(0, int(y1) - 2):int(y2) + 3, max(0, int(x1) - 2):int(x2) + 3] = False
            assert not red[outside].any()
            # the common part lies inside the painted region
            if valid[0]:
                mx1, my1, mx2, my2 = mapped[0].tolist()
                assert x1 - 1e-4 <= mx1 and y1 - 1e-4 <= my1 and mx2 <= x2 + 1e-4 and my2 <= y2 + 1e-4
            checked += 1
    assert checked >= 10


def test_box_outside_one_crop_is_not_usable():
    h, w = 100, 100
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    # scale (0.25, 0.25) with ratio 1: 50x50 crops; a 10x10 box can't be in every pair of crops
    cfg = ViewConfig(crop_size=64, scale=(0.25, 0.25), ratio=(1.0, 1.0), **NO_PHOTO)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [90.0, 90.0, 100.0, 100.0]])
    g = torch.Generator().manual_seed(0)
    seen_invalid = False
    for _ in range(10):
        *_, valid, g1, g2 = two_views_with_geometry(image, boxes, cfg, g)
        c1, c2 = crop_window(g1), crop_window(g2)
        for i, b in enumerate(boxes):
            inside_both = all(bool((c[:2] <= b[:2]).all() and (b[2:] <= c[2:]).all()) for c in (c1, c2))
            if inside_both:
                assert valid[i]
            disjoint = any(bool((b[2:] <= c[:2]).any() or (c[2:] <= b[:2]).any()) for c in (c1, c2))
            if disjoint:
                assert not valid[i]
                seen_invalid = True
    assert seen_invalid


def test_same_seed_same_views_other_seed_other_views():
    image = torch.randint(0, 256, (3, 90, 110), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0]])
    cfg = ViewConfig(crop_size=48)
    a = two_views(image, boxes, cfg, torch.Generator().manual_seed(7))
    b = two_views(image, boxes, cfg, torch.Generator().manual_seed(7))
    c = two_views(image, boxes, cfg, torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_crop_params_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = resized_crop_params(200, 300, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and 0 <= left and top + h <= 200 and left + w <= 300
        assert 0.2 * 60000 * 0.95 <= h * w <= 60000
    # an impossible aspect range falls back to the central crop with the closest ratio
    top, left, h, w = resized_crop_params(100, 400, (0.9, 1.0), (1.0, 1.0), g)
    assert (h, w) == (100, 100) and (top, left) == (0, 150)


def test_view_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="views.scale"):
        ViewConfig(scale=(0.5, 1.5)).validate()
    with pytest.raises(ConfigError, match="views.min_visible"):
        ViewConfig(min_visible=0.0).validate()
    with pytest.raises(ConfigError, match="views.color_jitter_prob"):
        ViewConfig(color_jitter_prob=2.0).validate()
    ViewConfig().validate()

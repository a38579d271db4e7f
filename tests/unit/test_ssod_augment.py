"""Weak/strong views and the recorded geometry that maps teacher boxes into the student view."""
import json

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from pseudobox.config import ConfigError, load_config
from pseudobox.ssod.augment import (Geometry, StrongAugConfig, apply_strong_batch, photometric, strong_view,
                                    weak_view)

NO_PHOTOMETRIC = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, erase_probs=(0.0, 0.0, 0.0))


def square_image(h=96, w=128, box=(30, 20, 70, 50)):
    """Black image with a white rectangle covering pixels [x1, x2) × [y1, y2)."""
    image = torch.zeros(3, h, w)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    return image


def bright_bbox(image, level=0.5):
    """xyxy box of the pixels brighter than ``level`` (pixel j spans [j, j + 1]), or None."""
    ys, xs = torch.nonzero(image.mean(0) > level, as_tuple=True)
    if ys.numel() == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_flip_maps_x_to_width_minus_x():
    g = Geometry.identity((50, 100)).hflip()
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 50.0]])
    expected = torch.tensor([[70.0, 5.0, 90.0, 25.0], [0.0, 0.0, 100.0, 50.0]])
    assert torch.equal(g.map_boxes(boxes), expected)
    assert g.output_size == (50, 100)


def test_resize_then_crop_known_coordinates_and_matches_v2_jointly():
    image = torch.rand(3, 40, 60)
    boxes = torch.tensor([[6.0, 4.0, 30.0, 20.0], [50.0, 30.0, 60.0, 40.0]])
    g = Geometry.identity((40, 60)).hflip().resize(80, 90).crop(top=10, left=20, height=50, width=60)
    # By hand: flip x -> 60 - x; resize x * 1.5, y * 2; crop shifts by (20, 10) and clips to 60x50.
    expected = torch.tensor([[25.0, -2.0, 61.0, 30.0], [-20.0, 50.0, -5.0, 70.0]])
    expected = torch.stack([expected[:, 0].clamp(0, 60), expected[:, 1].clamp(0, 50),
                            expected[:, 2].clamp(0, 60), expected[:, 3].clamp(0, 50)], 1)
    mapped, keep = g.map_boxes_with_keep(boxes)
    assert torch.allclose(mapped, expected)
    assert keep.tolist() == [True, False]  # the second box is outside the crop window
    assert g.output_size == (50, 60)

    # The same ops as torchvision v2 transform classes on (image, BoundingBoxes) together.
    pipeline = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.Resize([80, 90], antialias=True),
                           v2.CenterCrop([50, 60])])  # CenterCrop of 80x90 → top 15, left 15
    g_center = Geometry.identity((40, 60)).hflip().resize(80, 90).crop(15, 15, 50, 60)
    out_image, out_boxes = pipeline(image, tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(40, 60)))
    assert torch.allclose(g_center.map_boxes(boxes), out_boxes.as_subclass(torch.Tensor))
    assert torch.allclose(g_center.apply_image(image), out_image)


def test_then_composes_and_geometry_logs_as_json():
    a = Geometry.identity((40, 60)).hflip()
    b = Geometry.identity((40, 60)).resize(20, 30).crop(2, 3, 10, 12)
    boxes = torch.tensor([[5.0, 6.0, 25.0, 30.0]])
    assert torch.allclose(a.then(b).map_boxes(boxes), b.map_boxes(a.map_boxes(boxes)))
    assert a.then(b).output_size == (10, 12)
    with pytest.raises(ValueError):
        b.then(a)  # b's output is 10x12, a expects 40x60
    logged = json.loads(json.dumps(a.then(b).to_dict()))
    assert Geometry.from_dict(logged) == a.then(b)
    with pytest.raises(ValueError):
        Geometry.identity((10, 10)).crop(5, 5, 10, 10)  # window outside the image


def test_crop_that_removes_a_box_drops_it_and_min_visible():
    g = Geometry.identity((100, 100)).crop(top=0, left=0, height=50, width=50)
    boxes = torch.tensor([[60.0, 60.0, 80.0, 80.0],   # outside: dropped
                          [10.0, 10.0, 20.0, 20.0],   # inside
                          [40.0, 10.0, 80.0, 20.0]])  # a quarter visible
    mapped, keep = g.map_boxes_with_keep(boxes)
    assert keep.tolist() == [False, True, True]
    assert mapped[2].tolist() == [40.0, 10.0, 50.0, 20.0]
    _, keep = g.map_boxes_with_keep(boxes, min_visible=0.5)
    assert keep.tolist() == [False, True, False]
    # min_visible accounts for resizing (area scale) before the crop.
    g2 = Geometry.identity((100, 100)).resize(200, 200).crop(0, 0, 100, 100)
    box = torch.tensor([[20.0, 10.0, 60.0, 20.0]])  # resized: x 40..120, cropped to 40..100: 3/4 visible
    assert g2.map_boxes_with_keep(box, min_visible=0.7)[1].tolist() == [True]
    assert g2.map_boxes_with_keep(box, min_visible=0.8)[1].tolist() == [False]


def test_weak_boxes_land_on_the_same_object_in_geometric_strong_view():
    cfg = StrongAugConfig(geometric=True, scale_range=(0.6, 1.4), crop_prob=1.0, min_crop=0.5, **NO_PHOTOMETRIC)
    cfg.validate()
    generator = torch.Generator().manual_seed(3)
    checked = clipped = 0
    for _ in range(30):
        weak, g_weak = weak_view(square_image(), generator)
        teacher_box = bright_bbox(weak)[None]  # the teacher "detects" the square in the weak view
        assert torch.equal(g_weak.map_boxes(torch.tensor([[30.0, 20.0, 70.0, 50.0]])), teacher_box)
        strong, g_strong = strong_view(weak, cfg, generator)
        assert tuple(strong.shape[-2:]) == g_strong.output_size
        mapped, keep = g_strong.map_boxes_with_keep(teacher_box)
        seen = bright_bbox(strong)
        if not keep[0]:
            assert seen is None
            continue
        assert seen is not None
        assert (mapped[0] - seen).abs().max() <= 1.0, (mapped, seen, g_strong)
        checked += 1
        full_area = (teacher_box[0, 2:] - teacher_box[0, :2]).prod() * g_strong.area_scale
        clipped += bool((mapped[0, 2:] - mapped[0, :2]).prod() < full_area - 1e-3)
    assert checked >= 20 and clipped >= 3  # some views cut the square: clipped boxes checked too


def test_photometric_ops_keep_geometry_shape_and_range():
    cfg = StrongAugConfig(color_jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0, erase_probs=(1.0, 1.0, 1.0))
    cfg.validate()
    image = torch.rand(3, 48, 64)
    out, g = strong_view(image, cfg, torch.Generator().manual_seed(0))
    assert g.is_identity and g.output_size == (48, 64)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.allclose(out, image)
    # Grayscale: the three channels are equal outside the erased (random-colour) patches.
    assert (out[0] == out[1]).float().mean() > 0.5
    # Tiny images (blur kernel larger than the image) still work.
    tiny, _ = strong_view(torch.rand(3, 3, 2), cfg, torch.Generator().manual_seed(0))
    assert tiny.shape == (3, 3, 2)


def test_same_seed_same_views_different_seed_differs():
    cfg = StrongAugConfig(geometric=True)
    images = [torch.rand(3, 40, 50), torch.rand(3, 30, 60)]

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        weak = [weak_view(image, generator)[0] for image in images]
        return apply_strong_batch(weak, cfg, generator)

    (a, ga), (b, gb), (c, gc) = run(7), run(7), run(8)
    assert ga == gb and all(torch.equal(x, y) for x, y in zip(a, b))
    assert ga != gc or not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    # The global RNG plays no part.
    torch.manual_seed(123)
    d, _ = run(7)
    assert all(torch.equal(x, y) for x, y in zip(a, d))


def test_default_config_is_unbiased_teachers_and_validate_names_keys():
    cfg = StrongAugConfig()
    cfg.validate()
    assert (cfg.color_jitter_prob, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.8, 0.4, 0.4, 0.4, 0.1)
    assert (cfg.grayscale_prob, cfg.blur_prob, cfg.blur_sigma) == (0.2, 0.5, (0.1, 2.0))
    assert cfg.erase_probs == (0.7, 0.5, 0.3)
    assert cfg.erase_scales == ((0.05, 0.2), (0.02, 0.2), (0.02, 0.2))
    assert cfg.erase_ratios == ((0.3, 3.3), (0.1, 6.0), (0.05, 8.0))
    assert cfg.geometric is False
    with pytest.raises(ConfigError, match=r"ssod\.strong\.blur_prob"):
        StrongAugConfig(blur_prob=1.5).validate()
    with pytest.raises(ConfigError, match=r"ssod\.strong\.erase_scales\[1\]"):
        StrongAugConfig(erase_scales=((0.05, 0.2), (0.3, 0.2), (0.02, 0.2))).validate()
    with pytest.raises(ConfigError, match=r"ssod\.strong\.erase_probs"):
        load_config(StrongAugConfig, overrides=["erase_probs=[0.5]"])
    loaded = load_config(StrongAugConfig, overrides=["geometric=true", "scale_range=[0.8, 1.2]",
                                                     "erase_ratios=[[0.3, 3.3], [0.1, 6], [0.05, 8]]"])
    assert loaded.geometric and loaded.scale_range == (0.8, 1.2) and loaded.erase_ratios == cfg.erase_ratios


def test_photometric_alone_is_reproducible_from_generator():
    image = torch.rand(3, 32, 32)
    before = image.clone()
    cfg = StrongAugConfig(erase_probs=(1.0, 1.0, 1.0))
    a = photometric(image, cfg, torch.Generator().manual_seed(5))
    b = photometric(image, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(image, before)  # the input is untouched (no in-place erasing)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_run_on_cuda_from_a_cpu_generator():
    cfg = StrongAugConfig(geometric=True, erase_probs=(1.0, 1.0, 1.0))
    image = square_image().cuda()

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        weak, g_weak = weak_view(image, generator)
        strong, g_strong = strong_view(weak, cfg, generator)
        return strong, g_weak.then(g_strong)

    (a, ga), (b, gb) = run(1), run(1)
    assert a.is_cuda and torch.equal(a, b) and ga == gb
    assert 0.0 <= a.min() and a.max() <= 1.0 and tuple(a.shape[-2:]) == ga.output_size
    boxes = torch.tensor([[30.0, 20.0, 70.0, 50.0]], device="cuda")
    mapped, keep = ga.map_boxes_with_keep(boxes)
    assert mapped.is_cuda and keep.is_cuda
    assert torch.allclose(mapped.cpu(), ga.map_boxes(boxes.cpu()))

"""Reduced-precision CAM mining and padded forward batches: the precision switch is
honoured, bf16 boxes match fp32 ones, and batching images of different sizes together
gives the boxes of mining them one at a time."""
import numpy as np
import pytest
import torch

from pseudobox.config import ConfigError
from pseudobox.mining.cam import (
    CamBoxMiner, host_to_device, matched_boxes, multiscale_cams, plan_forward_batches, resolve_precision,
)
from pseudobox.pipelines.mine import CamConfig
from tests.conftest import make_classifier_checkpoint

CLASSES = [f"c{i}" for i in range(4)]


def _images(seed: int, sizes) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 HWC images with one bright textured block each on a dim background, and a
    label per image (two for the first)."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        im = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        im[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(150, 255, size=(h // 3, w // 3, 3))
        images.append(im)
    labels = [np.array([0, 2])] + [np.array([int(rng.integers(4))]) for _ in sizes[1:]]
    return images, labels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_classifier_checkpoint(str(tmp_path_factory.mktemp("cls") / "model.pt"), CLASSES)


def _conv_output_dtypes(miner: CamBoxMiner) -> set:
    seen = set()
    for module in (miner.model.conv1, miner.model.layer4[-1].conv2):
        module.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    return seen


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_backbone_runs_in_the_requested_dtype_and_cams_in_fp32(checkpoint, one_torch_thread, precision, dtype):
    miner = CamBoxMiner(checkpoint, scales=(64,), precision=precision)
    seen = _conv_output_dtypes(miner)
    images, labels = _images(0, [(64, 80)])
    out = miner.mine(images, labels)
    assert seen == {dtype}
    assert out[0][0].dtype == np.float32 and len(out[0][0]) > 0
    with torch.inference_mode():
        x = torch.rand(3, 64, 80)
        cams, _ = multiscale_cams(miner.model, [x], torch.tensor([0]), torch.tensor([1]), scales=(64,), dtype=dtype)
    assert cams.dtype == torch.float32


def test_auto_precision_follows_the_device():
    from pseudobox.engine import cpu_supports_bf16

    assert resolve_precision("auto", "cpu") == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert resolve_precision("fp32", "cpu") == torch.float32
    assert resolve_precision("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError):
        resolve_precision("int8", "cpu")
    CamConfig(precision="bf16").validate()
    with pytest.raises(ConfigError, match="cam.precision"):
        CamConfig(precision="half").validate()


def test_bf16_boxes_match_fp32_boxes(checkpoint, one_torch_thread):
    images, labels = _images(1, [(96, 128), (112, 96), (96, 96), (128, 160)])
    fp32 = CamBoxMiner(checkpoint, scales=(96, 160), precision="fp32").mine(images, labels)
    bf16 = CamBoxMiner(checkpoint, scales=(96, 160), precision="bf16").mine(images, labels)
    matched, total = matched_boxes(fp32, bf16, iou=0.9)
    assert total >= len(images)
    assert matched >= 0.9 * total, (matched, total)
    # The boxes differ somewhat (the comparison is not of identical runs) but not much.
    for (a, _, _), (b, _, _) in zip(fp32, bf16):
        assert abs(len(a) - len(b)) <= 2


def test_batched_forwards_give_the_boxes_of_one_image_at_a_time(checkpoint, one_torch_thread):
    images, labels = _images(2, [(96, 128), (96, 128), (128, 96), (100, 140)])
    one_by_one = CamBoxMiner(checkpoint, scales=(96, 160), precision="fp32", max_images=1)
    exact = CamBoxMiner(checkpoint, scales=(96, 160), precision="fp32", max_images=16, max_padding=0.0)
    reference = one_by_one.mine(images, labels)
    batched = exact.mine(images, labels)
    for (a, la, sa), (b, lb, sb) in zip(reference, batched):
        np.testing.assert_allclose(a, b, atol=1e-3)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_allclose(sa, sb, atol=1e-5)


def test_padded_batches_keep_most_boxes(checkpoint, one_torch_thread):
    # Sizes that pad: the same short side, long sides one or two strides apart.
    images, labels = _images(3, [(192, 256), (192, 288), (192, 256), (192, 320)])
    reference = CamBoxMiner(checkpoint, scales=(192, 256), precision="fp32", max_images=1).mine(images, labels)
    padded_miner = CamBoxMiner(checkpoint, scales=(192, 256), precision="fp32", max_images=16, max_padding=0.5)
    assert len(plan_forward_batches([(192, 256), (192, 288), (192, 320)], 16, 0.5)) == 1
    padded = padded_miner.mine(images, labels)
    matched, total = matched_boxes(reference, padded, iou=0.7)
    assert total >= len(images) and matched >= 0.7 * total, (matched, total)
    for (a, _, _), im in zip(padded, images):
        assert (a[:, 2] <= im.shape[1] + 1e-3).all() and (a[:, 3] <= im.shape[0] + 1e-3).all()


def test_forward_batch_plan():
    sizes = [(288, 384), (288, 352), (384, 288), (288, 384), (288, 384)]
    # Without padding only equal sizes share a batch, at most max_images each.
    exact = plan_forward_batches(sizes, max_images=2, max_padding=0.0)
    assert sorted(map(sorted, exact)) == [[0, 3], [1], [2], [4]]
    # With padding a near size joins; the portrait image would pad too much.
    padded = plan_forward_batches(sizes, max_images=16, max_padding=0.15)
    assert sorted(map(sorted, padded)) == [[0, 1, 3, 4], [2]]
    assert sorted(i for b in padded for i in b) == list(range(len(sizes)))


def test_host_to_device_copies_read_only_arrays():
    a = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    a.flags.writeable = False
    (t,) = host_to_device([a], torch.device("cpu"))
    assert t.shape == (2, 4, 3) and torch.equal(t, torch.from_numpy(a.copy()))


def test_host_to_device_passes_decoded_tensors_through():
    """Images decoded on the actor's device (``ray_io.decode_images``) are not copied back
    through the host; numpy and tensors mixed still arrive as tensors of the same pixels."""
    image = torch.randint(0, 255, (5, 7, 3), dtype=torch.uint8)
    (same,) = host_to_device([image], torch.device("cpu"))
    assert same.data_ptr() == image.data_ptr()
    mixed = host_to_device([image, image.numpy().copy()], torch.device("cpu"))
    assert all(torch.equal(m, image) for m in mixed)

"""Where CAM cells sit in the image: receptive-field centres measured by gradients, and
the mapping of CAM boxes and multi-scale CAMs that follows from them."""
import pytest
import torch
import torchvision

from pseudobox.mining.cam import (
    RESNET_CELL_CENTRE, cam_boxes_to_image, cell_centres, resample_cam,
)
from pseudobox.models.classifier import resnet_features


def _gradient_centroid(model, size: int, cell: tuple[int, int], flip: bool, inputs: int = 3) -> torch.Tensor:
    """(y, x) centroid, in continuous input pixels, of |d feature[cell] / d input|,
    averaged over random inputs; with ``flip`` the feature map of the mirrored input is
    flipped back first, as the CAM averaging does."""
    torch.manual_seed(0)
    total = torch.zeros(size, size)
    for _ in range(inputs):
        x = torch.randn(1, 3, size, size, requires_grad=True)
        feats = resnet_features(model, x.flip(-1) if flip else x)
        if flip:
            feats = feats.flip(-1)
        feats[0, :, cell[0], cell[1]].sum().backward()
        total += x.grad[0].abs().sum(0)
    ys = torch.arange(size, dtype=torch.float64) + 0.5
    w = total.double()
    return torch.stack([(w.sum(1) * ys).sum() / w.sum(), (w.sum(0) * ys).sum() / w.sum()])


@pytest.mark.parametrize("depth", [18, 50])
def test_last_feature_cell_is_centred_on_input_pixel_stride_times_index(depth):
    torch.set_num_threads(1)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    size, cell = 448, (7, 6)  # interior cell, far from the padded borders
    centroid = _gradient_centroid(model, size, cell, flip=False)
    expected = torch.tensor([32 * cell[0] + RESNET_CELL_CENTRE, 32 * cell[1] + RESNET_CELL_CENTRE], dtype=torch.float64)
    assert (centroid - expected).abs().max() < 3.0, centroid
    # The "cell middle" convention stride·(i + 0.5) is off by 15.5 px.
    assert (centroid - (expected + 15.5)).abs().min() > 10


def test_flip_averaged_cells_are_centred_on_the_cell_middle_in_x():
    torch.set_num_threads(1)
    model = torchvision.models.resnet18(weights=None).eval()
    size, cell = 448, (7, 6)
    flipped = _gradient_centroid(model, size, cell, flip=True)
    oy, ox = cell_centres(flip=True)
    assert ox == 16 and oy == RESNET_CELL_CENTRE
    # The flipped-back cell sits at 32·j + 32 − 0.5: mirrored about the cell middle.
    assert abs(flipped[1].item() - (32 * cell[1] + 32 - RESNET_CELL_CENTRE)) < 3.0
    assert abs(flipped[0].item() - (32 * cell[0] + RESNET_CELL_CENTRE)) < 3.0


def test_cam_boxes_map_to_the_receptive_field_positions():
    # A box of exactly cell k (k .. k+1 in cell units) on a 4×6 CAM of a 128×192 input,
    # resized from a 64×96 image (factor 0.5).
    boxes = torch.tensor([[2.0, 1.0, 3.0, 2.0]])
    no_flip = cam_boxes_to_image(boxes, (4, 6), (64, 96), flip=False)
    # Cell (1, 2) centre sits at input (32 + 0.5, 64 + 0.5) → image (16.25, 32.25); side 32 → 16.
    torch.testing.assert_close(no_flip, torch.tensor([[32.25 - 8, 16.25 - 8, 32.25 + 8, 16.25 + 8]]))
    flip = cam_boxes_to_image(boxes, (4, 6), (64, 96), flip=True)
    torch.testing.assert_close(flip, torch.tensor([[32.0, 16.25 - 8, 48.0, 16.25 + 8]]))
    # Boxes never leave the image.
    big = cam_boxes_to_image(torch.tensor([[0.0, 0.0, 6.0, 4.0]]), (4, 6), (64, 96), flip=False)
    assert big.min() >= 0 and big[0, 2] <= 96 and big[0, 3] <= 64


def test_resample_matches_cells_by_receptive_field_position():
    # A 3×4 grid (input 96×128) resampled to 6×8 (input 192×256) of the same image.
    src = torch.arange(12, dtype=torch.float32).view(3, 4)
    off = (0.5, 0.5)
    out = resample_cam(src, (6, 8), off)
    # Target cell k sits at input 32k + .5, i.e. image (32k + .5)/2; source cell j at image
    # 32j + .5. So target k ↔ source j = (16k + .25 − .5)/32 = k/2 − 1/128 (clamped at 0),
    # clamped to the source grid, and the value of the ramp 4·row + col is 4·j_row + j_col.
    def src_index(k, n):
        return min(n - 1.0, max(0.0, k / 2 - 1 / 128))

    for r in range(6):
        for k in range(8):
            assert out[r, k].item() == pytest.approx(4 * src_index(r, 3) + src_index(k, 4), abs=1e-4)
    # With the flip offsets in x, the x-axis follows align_corners=False bilinear resizing.
    ref = torch.nn.functional.interpolate(src[None, None], size=(6, 8), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(resample_cam(src, (6, 8), (16.0, 16.0))[1:-1, 1:-1], ref[1:-1, 1:-1])
    assert resample_cam(src, (3, 4), off) is src

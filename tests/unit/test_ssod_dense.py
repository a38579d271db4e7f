"""Dense Teacher and semi-supervised losses on hand-made tensors with known answers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pseudobox.models.detectors import FcosRaw
from pseudobox.ssod.dense_teacher import dense_teacher_loss, dense_teacher_stats, select_region
from pseudobox.ssod.losses import quality_focal_loss, softmax_focal_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def qfl_by_hand(logit: float, target: float, beta: float = 2.0) -> float:
    p = sigmoid(logit)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p)) * abs(target - p) ** beta


# ---------------------------------------------------------------- quality focal loss

@pytest.mark.parametrize("logit, target", [(0.0, 0.8), (1.0, 0.3), (-2.0, 0.0), (0.5, 1.0)])
def test_qfl_value_on_one_element(logit, target):
    loss = quality_focal_loss(torch.tensor([[logit]]), torch.tensor([[target]]))
    assert loss.item() == pytest.approx(qfl_by_hand(logit, target), rel=1e-5)


def test_qfl_value_at_logit_zero_by_hand():
    # σ(0) = 0.5, target 0.8: BCE = log 2 for any target when p = 0.5; |0.8 − 0.5|² = 0.09.
    loss = quality_focal_loss(torch.zeros(1, 1), torch.full((1, 1), 0.8))
    assert loss.item() == pytest.approx(math.log(2) * 0.09, rel=1e-6)


def test_qfl_beta_changes_the_modulation():
    logits, targets = torch.zeros(1, 1), torch.full((1, 1), 0.8)
    assert quality_focal_loss(logits, targets, beta=1.0).item() == pytest.approx(math.log(2) * 0.3, rel=1e-6)
    assert quality_focal_loss(logits, targets, beta=0.0).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("target, sign", [(0.9, -1.0), (0.05, 1.0)])
def test_qfl_gradient_pushes_the_score_towards_the_target(target, sign):
    """Target above σ(logit): negative gradient (gradient descent raises the logit); below: positive."""
    logit = torch.zeros(1, 1, requires_grad=True)
    quality_focal_loss(logit, torch.full((1, 1), target)).backward()
    assert torch.sign(logit.grad).item() == sign
    # d/dz of BCE·|t − σ|² at z = 0: (σ − t)·(t − σ)² + log2 · 2|t − σ| · sign(σ − t) · σ(1 − σ)
    d = 0.5 - target
    assert logit.grad.item() == pytest.approx(d * d * d + math.log(2) * 2 * abs(d) * math.copysign(1, d) * 0.25,
                                              rel=1e-5)


def test_qfl_is_zero_with_zero_gradient_when_target_equals_score():
    logits = torch.tensor([[-3.0, 0.0, 2.5], [1.0, -1.0, 0.3]], requires_grad=True)
    loss = quality_focal_loss(logits, logits.detach().sigmoid())
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert torch.allclose(logits.grad, torch.zeros_like(logits), atol=1e-7)


def test_qfl_is_the_unnormalised_sum_over_elements():
    torch.manual_seed(0)
    logits, targets = torch.randn(7, 3), torch.rand(7, 3)
    each = [qfl_by_hand(z, t) for z, t in zip(logits.flatten().tolist(), targets.flatten().tolist())]
    assert quality_focal_loss(logits, targets).item() == pytest.approx(sum(each), rel=1e-5)


def test_qfl_refuses_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        quality_focal_loss(torch.zeros(4, 3), torch.zeros(4, 2))


# ---------------------------------------------------------------- softmax focal loss (Unbiased Teacher)

def test_softmax_focal_is_cross_entropy_at_gamma_zero():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 3, 1, 1, 2, 0])
    assert torch.allclose(softmax_focal_loss(logits, labels, gamma=0.0), F.cross_entropy(logits, labels))


def test_softmax_focal_value_by_hand_and_down_weights_easy_rois():
    # two classes, equal logits: CE = log 2, p = 0.5, (1 − 0.5)^1.5 · log 2
    loss = softmax_focal_loss(torch.zeros(1, 2), torch.tensor([1]))
    assert loss.item() == pytest.approx(0.5 ** 1.5 * math.log(2), rel=1e-6)
    easy = torch.tensor([[5.0, 0.0, 0.0]])
    ce = F.cross_entropy(easy, torch.tensor([0]))
    assert softmax_focal_loss(easy, torch.tensor([0])) < 0.05 * ce


def test_softmax_focal_is_zero_not_nan_without_rois():
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = softmax_focal_loss(logits, torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 5)


def test_softmax_focal_gradient_is_finite_on_confident_rois():
    logits = torch.tensor([[80.0, -80.0]], requires_grad=True)
    softmax_focal_loss(logits, torch.tensor([0]), gamma=0.5).backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- region selection

LEVELS = (16, 4, 1)  # positions per FPN level of one image (4x4, 2x2, 1x1)


def test_select_region_picks_across_levels_and_images():
    """The top position is image 1's last level: flattened over images and levels it is the last row."""
    torch.manual_seed(0)
    n, a, c = 2, sum(LEVELS), 3
    scores = torch.rand(n, a, c) * 0.5
    scores[1, a - 1, 2] = 0.9  # image 1, level P(last), its only position
    mask = select_region(scores.reshape(-1, c), ratio=0.01)  # floor(0.42) = 0 -> at least one
    assert mask.shape == (n * a,) and mask.dtype == torch.bool
    assert mask.nonzero().flatten().tolist() == [n * a - 1]


def test_select_region_counts_floor_of_ratio_and_takes_the_top_max_scores():
    torch.manual_seed(1)
    scores = torch.rand(42, 3)
    mask = select_region(scores, ratio=0.1)  # floor(4.2) = 4
    assert mask.sum().item() == 4
    best = scores.max(dim=1).values
    assert best[mask].min() > best[~mask].max()
    assert select_region(scores, ratio=1.0).all()
    assert select_region(torch.rand(1000, 2), ratio=0.01).sum().item() == 10


def test_select_region_uses_the_maximum_over_classes():
    scores = torch.tensor([[0.5, 0.5], [0.0, 0.9], [0.8, 0.1], [0.3, 0.2]])
    assert select_region(scores, ratio=0.5).tolist() == [False, True, True, False]


def test_select_region_breaks_ties_by_position():
    scores = torch.full((10, 2), 0.25)
    assert select_region(scores, ratio=0.3).nonzero().flatten().tolist() == [0, 1, 2]


def test_select_region_at_least_one_and_empty_input():
    assert select_region(torch.rand(5, 2), ratio=0.01).sum().item() == 1
    assert select_region(torch.zeros(0, 4)).shape == (0,)
    with pytest.raises(ValueError, match="ratio"):
        select_region(torch.rand(5, 2), ratio=0.0)
    with pytest.raises(ValueError, match=r"\[M, C\]"):
        select_region(torch.rand(5))


# ---------------------------------------------------------------- dense teacher loss

def level_anchors(sides=(4, 2, 1), strides=(8, 16, 32)) -> torch.Tensor:
    """One stride-sized square per position, level by level, row-major (as torchvision's FCOS)."""
    out = []
    for side, s in zip(sides, strides):
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        cx, cy = (xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s
        out.append(torch.stack([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], dim=1).float())
    return torch.cat(out)


def make_raw(seed: int, n: int = 2, k: int = 3, requires_grad: bool = False, cls_logits=None) -> FcosRaw:
    g = torch.Generator().manual_seed(seed)
    anchors = level_anchors()
    a = len(anchors)
    tensors = [torch.randn(n, a, k + 1, generator=g) - 2.0 if cls_logits is None else cls_logits.clone(),
               torch.rand(n, a, 4, generator=g) * 2 + 0.1, torch.randn(n, a, 1, generator=g)]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return FcosRaw(cls_logits=tensors[0], bbox_regression=tensors[1], bbox_ctrness=tensors[2],
                   anchors=[anchors.clone() for _ in range(n)], num_anchors_per_level=list(LEVELS),
                   image_sizes=[(32, 32)] * n, original_sizes=[(32, 32)] * n)


def teacher_region(teacher: FcosRaw, ratio: float) -> torch.Tensor:
    k = teacher.cls_logits.shape[-1] - 1
    return select_region(teacher.cls_logits[..., 1:].reshape(-1, k).sigmoid(), ratio)


def test_dense_loss_terms_and_gradients_by_region():
    student, teacher = make_raw(0, requires_grad=True), make_raw(1)
    ratio = 0.15  # 42 positions -> 6
    losses = dense_teacher_loss(student, teacher, ratio=ratio)
    assert set(losses) == {"loss_dense_cls", "loss_dense_box", "loss_dense_quality"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    region = teacher_region(teacher, ratio)
    assert region.sum().item() == 6

    (losses["loss_dense_box"] + losses["loss_dense_quality"]).backward(retain_graph=True)
    reg_grad = student.bbox_regression.grad.reshape(-1, 4).abs().sum(1)
    ctr_grad = student.bbox_ctrness.grad.reshape(-1).abs()
    assert (reg_grad[~region] == 0).all() and (ctr_grad[~region] == 0).all()
    assert (reg_grad[region] > 0).any() and (ctr_grad[region] > 0).all()
    assert student.cls_logits.grad is None

    student.bbox_regression.grad = None
    losses["loss_dense_cls"].backward()
    cls_grad = student.cls_logits.grad.reshape(-1, 4)
    # negatives everywhere: positions outside the region are pushed down (positive gradient)
    assert (cls_grad[~region, 1:] > 0).all()
    assert (cls_grad[:, 0] == 0).all()  # the background slot is no class
    assert student.bbox_regression.grad is None


def test_dense_cls_loss_value_and_normaliser():
    """QFL with the teacher's scores inside the region and 0 outside, over the region's teacher max scores."""
    student, teacher = make_raw(0), make_raw(1)
    ratio = 0.1
    s_logits = student.cls_logits[..., 1:].reshape(-1, 3)
    teacher.cls_logits[1, -1, 2] = 4.0  # one confident position: the normaliser is above 1
    region = teacher_region(teacher, ratio)
    t_scores = teacher.cls_logits[..., 1:].reshape(-1, 3).sigmoid()
    targets = torch.where(region[:, None], t_scores, torch.zeros_like(t_scores))
    normaliser = t_scores.max(1).values[region].sum()
    assert normaliser > 1
    expected = quality_focal_loss(s_logits, targets) / normaliser
    got = dense_teacher_loss(student, teacher, ratio=ratio)["loss_dense_cls"]
    assert torch.allclose(got, expected)


def test_dense_loss_finite_when_the_teacher_is_unconfident():
    student = make_raw(0, requires_grad=True)
    teacher = make_raw(1, cls_logits=torch.full((2, sum(LEVELS), 4), -40.0))  # scores ~ 4e-18
    losses = dense_teacher_loss(student, teacher)
    assert all(torch.isfinite(v) for v in losses.values())
    # normaliser floored at 1: the loss is the plain sum pushing the student's scores to ~0
    s_logits = student.cls_logits.detach()[..., 1:].reshape(-1, 3)
    t_scores = teacher.cls_logits[..., 1:].reshape(-1, 3).sigmoid()
    targets = t_scores * teacher_region(teacher, 0.01)[:, None]
    assert torch.allclose(losses["loss_dense_cls"], quality_focal_loss(s_logits, targets))
    sum(losses.values()).backward()
    for t in (student.cls_logits, student.bbox_regression, student.bbox_ctrness):
        assert torch.isfinite(t.grad).all()


def test_dense_loss_with_identical_student_and_teacher():
    """Same outputs: no box loss, quality loss at its minimum (the teacher's entropy, zero gradient)."""
    teacher = make_raw(3)
    student = make_raw(3, requires_grad=True)
    losses = dense_teacher_loss(student, teacher, ratio=0.2)
    assert losses["loss_dense_box"].item() == pytest.approx(0.0, abs=1e-6)
    losses["loss_dense_quality"].backward()
    assert torch.allclose(student.bbox_ctrness.grad, torch.zeros_like(student.bbox_ctrness), atol=1e-7)


def test_dense_loss_box_term_is_giou_of_decoded_boxes():
    from torchvision.ops import generalized_box_iou_loss

    student, teacher = make_raw(0), make_raw(1)
    region = teacher_region(teacher, 0.2)
    s_boxes = student.decode_boxes().reshape(-1, 4)[region]
    t_boxes = teacher.decode_boxes().reshape(-1, 4)[region]
    assert (s_boxes[:, 2:] >= s_boxes[:, :2]).all()
    expected = generalized_box_iou_loss(s_boxes, t_boxes, reduction="mean")
    assert torch.allclose(dense_teacher_loss(student, teacher, ratio=0.2)["loss_dense_box"], expected)


def test_dense_loss_accepts_an_inference_mode_teacher():
    student = make_raw(0, requires_grad=True)
    with torch.inference_mode():
        teacher = make_raw(1)
        teacher = FcosRaw(**{**teacher.__dict__, "cls_logits": teacher.cls_logits * 1.0,
                             "anchors": [a * 1.0 for a in teacher.anchors]})
        assert teacher.cls_logits.is_inference()
    losses = dense_teacher_loss(student, teacher)
    sum(losses.values()).backward()
    assert student.cls_logits.grad is not None


def test_dense_loss_refuses_misaligned_outputs():
    with pytest.raises(ValueError, match="different positions"):
        dense_teacher_loss(make_raw(0, n=2), make_raw(1, n=1))


def test_dense_teacher_stats():
    teacher = make_raw(1)
    stats = dense_teacher_stats(teacher, ratio=0.1)
    scores = teacher.cls_logits[..., 1:].reshape(-1, 3).sigmoid().max(1).values
    top = scores.sort(descending=True).values[:4]
    assert stats["region_size"].item() == 4
    assert stats["region_score_min"].item() == pytest.approx(top[-1].item())
    assert stats["region_score_sum"].item() == pytest.approx(top.sum().item(), rel=1e-6)


def test_dense_loss_on_real_fcos_outputs_trains_the_student_only():
    """End to end on torchvision FCOS: an inference-mode teacher, a train-mode student."""
    from pseudobox.models.detectors import DetectorArch, build_detector, fcos_raw_outputs

    arch = DetectorArch(detector="fcos", depth=18, min_size=(64,), max_size=128, test_size=64)
    torch.manual_seed(0)
    student, teacher = build_detector(arch, 3), build_detector(arch, 3)
    teacher.load_state_dict(student.state_dict())
    teacher.eval()
    student.train()
    weak = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    strong = [(im * 0.8 + 0.1) for im in weak]  # photometric only: pixel-aligned with the weak view
    with torch.inference_mode():
        t_raw = fcos_raw_outputs(teacher, weak)
    losses = dense_teacher_loss(fcos_raw_outputs(student, strong), t_raw)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert student.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    assert student.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0
    assert student.backbone.fpn.inner_blocks[0][0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())

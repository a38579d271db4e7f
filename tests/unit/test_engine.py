"""Unit tests for the shared training loop and the training workers, without Ray."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pseudobox.config import to_dict
from pseudobox.engine import OptimConfig, WorkerCheckpointer, build_optimizer, build_scheduler, lr_factor, train_loop
from pseudobox.models.checkpoint import MODEL_FILE, load_checkpoint
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import train_classifier, train_detector
from pseudobox.pipelines.train_classifier import ClassifierModelConfig, TrainClassifierConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- learning rate schedule

def test_lr_factor_warmup_and_decay():
    cfg = OptimConfig(warmup_iters=10, warmup_factor=0.001, max_iters=100, lr_steps=(0.75, 0.9), gamma=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(5, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(9, cfg) == pytest.approx(0.001 * 0.1 + 0.9)
    assert lr_factor(10, cfg) == 1.0
    assert lr_factor(74, cfg) == 1.0
    assert lr_factor(75, cfg) == pytest.approx(0.1)
    assert lr_factor(89, cfg) == pytest.approx(0.1)
    assert lr_factor(90, cfg) == pytest.approx(0.01)
    assert lr_factor(100, cfg) == pytest.approx(0.01)


def test_lr_factor_without_warmup_and_monotone_warmup():
    cfg = OptimConfig(warmup_iters=0, max_iters=10, lr_steps=(0.5,), gamma=0.5)
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(5, cfg) == 0.5
    cfg = OptimConfig(warmup_iters=20, max_iters=1000)
    values = [lr_factor(s, cfg) for s in range(21)]
    assert values == sorted(values) and values[-1] == 1.0


def test_scheduler_follows_lr_factor():
    cfg = OptimConfig(lr=0.1, warmup_iters=4, warmup_factor=0.1, max_iters=10, lr_steps=(0.5,), gamma=0.1)
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for step in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(s, cfg) for s in range(8)])


def test_build_optimizer_skips_frozen_params():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(lr=0.5, momentum=0.8, weight_decay=0.01))
    params = opt.param_groups[0]["params"]
    assert len(params) == 3 and all(p is not model[0].weight for p in params)
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["weight_decay"] == 0.01


# ---------------------------------------------------------------- train_loop on a tiny model

class RecordingCheckpointer(WorkerCheckpointer):
    def __init__(self, local_dir):
        super().__init__(local_dir)
        self.reports = []

    def report(self, metrics, checkpoint=None):
        ckpt = checkpoint() if checkpoint is not None else None
        self.reports.append((metrics["step"], None if ckpt is None else ckpt["step"]))
        super().report(metrics, (lambda: ckpt) if ckpt is not None else None)


def linear_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]  # 4 batches per epoch


def run_linear(tmp_path, cfg: OptimConfig, model=None, start_step=0, history=None):
    torch.manual_seed(0)
    model = model or torch.nn.Linear(3, 1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    data = linear_problem()
    epochs = []

    def batches():
        epochs.append(1)
        return iter(data)

    def loss_fn(m, batch):
        x, y = batch
        return {"loss_mse": torch.nn.functional.mse_loss(m(x), y)}

    def make_ckpt(step, hist):
        return {"step": step, "history": list(hist), "model_state": model.state_dict()}

    ckpt = RecordingCheckpointer(str(tmp_path))
    hist = train_loop(model, opt, sched, cfg, batches, loss_fn, make_ckpt, ckpt,
                      start_step=start_step, history=history)
    return model, hist, ckpt, epochs


def test_train_loop_learns_logs_and_checkpoints(tmp_path):
    cfg = OptimConfig(lr=0.05, momentum=0.9, weight_decay=0.0, warmup_iters=2, max_iters=22, lr_steps=(0.9,),
                      checkpoint_every=10, log_every=4, amp=False)
    model, hist, ckpt, epochs = run_linear(tmp_path, cfg)
    steps = [r["step"] for r in hist]
    assert steps == [4, 8, 10, 12, 16, 20, 22]  # every log_every, every checkpoint_every, and the end
    assert [s for s, c in ckpt.reports if c is not None] == [10, 20, 22]
    assert all(c in (None, s) for s, c in ckpt.reports)
    assert len(epochs) == 6  # 22 steps over 4-batch epochs
    assert hist[-1]["loss"] < 0.25 * hist[0]["loss"]
    for row in hist:
        assert row["loss"] == pytest.approx(row["loss_mse"])
        assert {"lr", "s_per_iter"} <= set(row)
    saved = torch.load(os.path.join(tmp_path, MODEL_FILE), weights_only=True)
    assert saved["step"] == 22 and [r["step"] for r in saved["history"]] == steps
    assert torch.equal(saved["model_state"]["weight"], model.weight)


def test_train_loop_resume_continues(tmp_path):
    cfg = OptimConfig(lr=0.05, warmup_iters=0, max_iters=8, checkpoint_every=4, log_every=4, amp=False)
    _, hist, _, _ = run_linear(tmp_path, cfg)
    cfg2 = OptimConfig(**{**to_dict(cfg), "max_iters": 12, "lr_steps": tuple(cfg.lr_steps)})
    _, hist2, ckpt2, _ = run_linear(tmp_path, cfg2, start_step=8, history=hist)
    assert [r["step"] for r in hist2] == [4, 8, 12]
    assert [s for s, _ in ckpt2.reports] == [12]


def test_resume_with_a_longer_schedule_uses_the_new_lr_from_the_first_step(tmp_path):
    # 8 steps with a decay at 75% (step 6), then resumed to 16 steps: the decay moves to
    # step 12, so step 8 must run at the full lr, not the restored 0.1×.
    cfg = OptimConfig(lr=0.1, warmup_iters=0, max_iters=8, lr_steps=(0.75,), gamma=0.1, amp=False,
                      checkpoint_every=8, log_every=8)
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(8):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    longer = OptimConfig(**{**to_dict(cfg), "max_iters": 16, "lr_steps": (0.75,)})
    opt2 = build_optimizer(model, longer)
    sched2 = build_scheduler(opt2, longer)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    seen = []

    def loss_fn(m, batch):
        seen.append(opt2.param_groups[0]["lr"])
        x, y = batch
        return {"loss_mse": torch.nn.functional.mse_loss(m(x), y)}

    train_loop(model, opt2, sched2, longer, lambda: iter(linear_problem()), loss_fn,
               lambda step, hist: {"step": step}, RecordingCheckpointer(str(tmp_path)), start_step=8)
    assert seen[0] == pytest.approx(0.1)  # step 8 < 12: before the moved decay
    assert seen[4] == pytest.approx(0.01)  # step 12: decayed


def test_train_loop_nan_loss_raises(tmp_path):
    cfg = OptimConfig(max_iters=3, amp=False)
    model = torch.nn.Linear(1, 1)
    opt = build_optimizer(model, cfg)

    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train_loop(model, opt, build_scheduler(opt, cfg), cfg, lambda: iter([1]),
                   lambda m, b: {"l": m.weight.sum() * float("nan")}, lambda s, h: {}, WorkerCheckpointer(str(tmp_path)))


def test_train_loop_empty_stream_raises(tmp_path):
    cfg = OptimConfig(max_iters=3, amp=False)
    model = torch.nn.Linear(1, 1)
    opt = build_optimizer(model, cfg)
    with pytest.raises(RuntimeError, match="yielded no batches"):
        train_loop(model, opt, build_scheduler(opt, cfg), cfg, lambda: iter([]),
                   lambda m, b: {}, lambda s, h: {}, WorkerCheckpointer(str(tmp_path)))


def test_worker_checkpointer_local(tmp_path):
    cp = WorkerCheckpointer(str(tmp_path))
    assert not cp.in_ray and cp.rank == 0
    assert cp.restore() is None
    cp.report({"step": 1})  # metrics only: nothing written
    assert not (tmp_path / MODEL_FILE).exists()
    cp.report({"step": 2}, lambda: {"step": 2, "w": torch.ones(2)})
    restored = cp.restore()
    assert restored["step"] == 2 and torch.equal(restored["w"], torch.ones(2))


# ---------------------------------------------------------------- classifier worker, resumed

NUM_CLASSES = 3


def classifier_config(max_iters: int, multi_label: bool = False) -> dict:
    # gamma=1: the schedule does not depend on max_iters, so a 4+2 run can match a 6 run.
    cfg = TrainClassifierConfig(corpus="/c", output="/o", model=ClassifierModelConfig(depth=18),
                                optim=OptimConfig(lr=0.01, warmup_iters=2, max_iters=max_iters, batch_size=4,
                                                  gamma=1.0, checkpoint_every=2, log_every=1, amp=False),
                                image_size=32)
    return {"config": to_dict(cfg), "class_names": [f"c{i}" for i in range(NUM_CLASSES)],
            "multi_label": multi_label, "use_gpu": False, "threads": 1}


def classifier_batches(num_batches: int = 3):
    rng = np.random.default_rng(0)
    data = []
    for _ in range(num_batches):
        labels = rng.integers(0, NUM_CLASSES, 4)
        data.append({"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                     "target": np.eye(NUM_CLASSES, dtype=np.float32)[labels]})
    return lambda: iter(data)


def test_classifier_worker_resumes(tmp_path):
    torch.manual_seed(0)
    hist = train_classifier.worker(classifier_config(4), local_dir=str(tmp_path), batches=classifier_batches())
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert all("loss_ce" in r for r in hist)
    first = load_checkpoint(str(tmp_path / MODEL_FILE), expect_type="classifier")
    assert first["step"] == 4 and first["arch"] == {"depth": 18} and first["stage"] == "train-classifier"
    assert first["class_names"] == ["c0", "c1", "c2"] and first["multi_label"] is False

    hist2 = train_classifier.worker(classifier_config(6), local_dir=str(tmp_path), batches=classifier_batches())
    assert [r["step"] for r in hist2] == [1, 2, 3, 4, 5, 6]  # continues at the saved step
    assert hist2[:4] == hist
    second = load_checkpoint(str(tmp_path), expect_type="classifier")
    assert second["step"] == 6 and len(second["history"]) == 6
    assert second["scheduler_state"]["last_epoch"] == 6
    assert not torch.equal(second["model_state"]["conv1.weight"], first["model_state"]["conv1.weight"])

    # Nothing left to do: a third run returns at once with the same history.
    hist3 = train_classifier.worker(classifier_config(6), local_dir=str(tmp_path), batches=classifier_batches())
    assert [r["step"] for r in hist3] == [1, 2, 3, 4, 5, 6]


def test_classifier_resume_matches_uninterrupted_run(tmp_path):
    """Model, optimizer (momentum) and scheduler state all come back: 4 + 2 steps equal 6."""
    one_batch = classifier_batches(num_batches=1)
    torch.manual_seed(0)
    train_classifier.worker(classifier_config(4), local_dir=str(tmp_path / "a"), batches=one_batch)
    train_classifier.worker(classifier_config(6), local_dir=str(tmp_path / "a"), batches=one_batch)
    torch.manual_seed(0)
    train_classifier.worker(classifier_config(6), local_dir=str(tmp_path / "b"), batches=one_batch)
    resumed = load_checkpoint(str(tmp_path / "a"))
    straight = load_checkpoint(str(tmp_path / "b"))
    assert resumed["step"] == straight["step"] == 6
    for name, value in straight["model_state"].items():
        assert torch.allclose(resumed["model_state"][name].float(), value.float(), atol=1e-6), name
    assert [r["loss"] for r in resumed["history"]] == pytest.approx([r["loss"] for r in straight["history"]], rel=1e-5)


def test_classifier_worker_multi_label_uses_bce(tmp_path):
    torch.manual_seed(0)
    hist = train_classifier.worker(classifier_config(1, multi_label=True), local_dir=str(tmp_path),
                                   batches=classifier_batches())
    assert len(hist) == 1 and "loss_bce" in hist[0] and "loss_ce" not in hist[0]
    assert load_checkpoint(str(tmp_path))["multi_label"] is True


# ---------------------------------------------------------------- detector worker

def test_keep_valid_boxes():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5.5, 20], [1, 1, 2, 2], [3, 3, 1, 8]], np.float32)
    b, lab = train_detector.keep_valid_boxes(boxes, np.array([0, 1, 2, 3]))
    assert b.tolist() == [[0, 0, 10, 10], [1, 1, 2, 2]] and lab.tolist() == [0, 2]
    assert lab.dtype == np.int64 and b.dtype == np.float32
    b, lab = train_detector.keep_valid_boxes(np.zeros((0, 4)), np.zeros(0))
    assert b.shape == (0, 4) and lab.shape == (0,)


def obj_array(items) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def test_drop_images_without_boxes():
    batch = {"key": np.array(["a", "b", "c"], dtype=object),
             "image": obj_array([np.zeros((4, 4, 3), np.uint8)] * 3),
             "labels": obj_array([np.array([0]), np.array([1]), np.array([2])]),
             "boxes": obj_array([np.array([[0, 0, 3, 3]], np.float32), np.array([[0, 0, 0.5, 3]], np.float32),
                                 np.array([[0, 0, 2, 2], [1, 1, 1, 1]], np.float32)]),
             "box_labels": obj_array([np.array([0]), np.array([1]), np.array([2, 1])])}
    out = train_detector.drop_images_without_boxes(batch)
    assert list(out["key"]) == ["a", "c"]
    assert [lab.tolist() for lab in out["labels"]] == [[0], [2]]
    assert out["boxes"][1].tolist() == [[0, 0, 2, 2]] and out["box_labels"][1].tolist() == [2]
    empty = train_detector.drop_images_without_boxes({**batch, "boxes": obj_array([np.zeros((0, 4))] * 3)})
    assert len(empty["key"]) == 0 and len(empty["boxes"]) == 0 and len(empty["image"]) == 0


def test_detection_targets_flip_and_label_offset():
    batch = {"image": [np.zeros((8, 10, 3), np.uint8)], "boxes": [np.array([[1, 2, 4, 6]], np.float32)],
             "box_labels": [np.array([0])]}
    images, targets = train_detector.detection_targets(batch, "cpu", np.random.default_rng(0), flip_prob=1.0)
    assert images[0].shape == (3, 8, 10)
    assert targets[0]["boxes"].tolist() == [[6, 2, 9, 6]]
    assert targets[0]["labels"].tolist() == [1]  # detector label = class index + 1
    _, targets = train_detector.detection_targets(batch, "cpu", np.random.default_rng(0), flip_prob=0.0)
    assert targets[0]["boxes"].tolist() == [[1, 2, 4, 6]]


def detector_config(max_iters: int, init: dict | None = None) -> dict:
    arch = DetectorArch(detector="retinanet", depth=18, min_size=(64,), max_size=128, test_size=64)
    optim = OptimConfig(lr=0.001, warmup_iters=1, max_iters=max_iters, batch_size=2, checkpoint_every=1,
                        log_every=1, amp=False)
    return {"arch": to_dict(arch), "optim": to_dict(optim), "class_names": ["a", "b"], "init": init or {},
            "method": "dap", "stage": "pretrain", "seed": 0, "config": {"note": "test"}, "use_gpu": False,
            "threads": 1}


def detector_batches():
    rng = np.random.default_rng(0)
    batch = {"key": np.array(["x", "y"], dtype=object),
             "image": obj_array([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]),
             "boxes": obj_array([np.array([[4, 4, 40, 30]], np.float32),
                                 np.array([[10, 12, 60, 62], [0, 0, 16, 16]], np.float32)]),
             "box_labels": obj_array([np.array([0]), np.array([1, 0])])}
    return lambda: iter([batch])


def test_detector_worker_trains_and_resumes(tmp_path):
    torch.manual_seed(0)
    hist = train_detector.worker(detector_config(2), local_dir=str(tmp_path), batches=detector_batches())
    assert [r["step"] for r in hist] == [1, 2]
    assert {"classification", "bbox_regression", "loss"} <= set(hist[0])
    ckpt = load_checkpoint(str(tmp_path), expect_type="detector")
    assert ckpt["step"] == 2 and ckpt["init"] == {"from": "random"} and ckpt["stage"] == "pretrain"
    assert ckpt["arch"]["detector"] == "retinanet" and ckpt["class_names"] == ["a", "b"]

    hist2 = train_detector.worker(detector_config(3), local_dir=str(tmp_path), batches=detector_batches())
    assert [r["step"] for r in hist2] == [1, 2, 3]
    ckpt2 = load_checkpoint(str(tmp_path), expect_type="detector")
    assert ckpt2["step"] == 3 and ckpt2["history"][:2] == ckpt["history"]
    assert not torch.equal(ckpt2["model_state"]["head.classification_head.cls_logits.weight"],
                           ckpt["model_state"]["head.classification_head.cls_logits.weight"])


def test_detector_worker_init_from_classifier(tmp_path):
    from tests.conftest import make_classifier_checkpoint

    cls_uri = make_classifier_checkpoint(str(tmp_path / "cls" / MODEL_FILE), ["a", "b"], depth=18, seed=4)
    run = tmp_path / "run"
    run.mkdir()
    train_detector.worker(detector_config(1, {"classifier": cls_uri}), local_dir=str(run), batches=detector_batches())
    ckpt = load_checkpoint(str(run))
    assert ckpt["init"]["from"] == "classifier" and ckpt["init"]["copied"] > 0
    # conv1 is frozen (freeze_at=2), so it still holds the classifier's weights after a step.
    cls_state = load_checkpoint(cls_uri)["model_state"]
    assert torch.equal(ckpt["model_state"]["backbone.body.conv1.weight"], cls_state["conv1.weight"])

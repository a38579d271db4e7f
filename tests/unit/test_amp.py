"""Mixed precision in training: what ``optim.amp`` / ``optim.amp_dtype`` select per device,
that the shared loop honours it (convolutions in bf16, losses and box math in fp32), and
that a detector learns under CPU bf16. No timing here: speed is in ``benchmarks/train_dap.py``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pseudobox import engine
from pseudobox.config import ConfigError
from pseudobox.engine import OptimConfig, WorkerCheckpointer, amp_settings, build_optimizer, build_scheduler, train_loop
from pseudobox.models.detectors import DetectorArch, build_detector
from pseudobox.pipelines.train_detector import detection_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- what the config selects

@pytest.mark.parametrize("native", [True, False])
def test_auto_uses_bf16_only_on_cpus_with_bf16_units(monkeypatch, native):
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: native)
    assert amp_settings(OptimConfig(), "cpu") == ((torch.bfloat16, False) if native else (None, False))
    assert amp_settings(OptimConfig(), None) == amp_settings(OptimConfig(), "cpu")


def test_auto_is_fp16_with_a_scaler_on_cuda_and_off_means_fp32(monkeypatch):
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: True)
    assert amp_settings(OptimConfig(), torch.device("cuda", 0)) == (torch.float16, True)
    assert amp_settings(OptimConfig(amp=False), "cuda") == (None, False)
    assert amp_settings(OptimConfig(amp=False, amp_dtype="bf16"), "cpu") == (None, False)


def test_explicit_dtype_applies_on_any_device(monkeypatch):
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: False)
    assert amp_settings(OptimConfig(amp_dtype="bf16"), "cpu") == (torch.bfloat16, False)
    assert amp_settings(OptimConfig(amp_dtype="bf16"), "cuda") == (torch.bfloat16, False)
    assert amp_settings(OptimConfig(amp_dtype="fp16"), "cuda") == (torch.float16, True)


def test_bad_amp_dtype_fails_validation_naming_the_key():
    with pytest.raises(ConfigError, match="optim.amp_dtype"):
        OptimConfig(amp_dtype="float8").validate()


# ---------------------------------------------------------------- a tiny detector under the loop

ARCH = DetectorArch(depth=18, freeze_at=1, min_size=(64,), max_size=128, test_size=64,
                    rpn_post_nms_top_n_train=50, box_batch_size_per_image=16)


def overfit_batch() -> dict:
    """Two 64-px images, each with one bright square object on a dark background."""
    images, boxes = [], []
    for x0, y0 in ((8, 12), (30, 20)):
        im = np.full((64, 64, 3), 20, np.uint8)
        im[y0:y0 + 24, x0:x0 + 24] = (230, 200, 40)
        images.append(im)
        boxes.append(np.array([[x0, y0, x0 + 24, y0 + 24]], np.float32))
    obj = np.empty(2, object)
    obj[:] = images
    b, lab = np.empty(2, object), np.empty(2, object)
    b[:] = boxes
    lab[:] = [np.zeros(1, np.int64)] * 2
    return {"image": obj, "boxes": b, "box_labels": lab}


def train_tiny_detector(tmp_path, cfg: OptimConfig):
    """``cfg.max_iters`` steps of ``engine.train_loop`` on one fixed batch; returns
    (history, the dtypes seen per step: stem conv output, anchors, RoI features, losses)."""
    torch.manual_seed(0)
    model = build_detector(ARCH, num_classes=1)
    seen: dict[str, set] = {"conv": set(), "anchors": set(), "roi_features": set(), "losses": set()}
    model.backbone.body.conv1.register_forward_hook(lambda m, i, o: seen["conv"].add(o.dtype))
    model.roi_heads.box_roi_pool.register_forward_hook(lambda m, i, o: seen["roi_features"].add(o.dtype))
    model.rpn.anchor_generator.register_forward_hook(lambda m, i, o: seen["anchors"].add(o[0].dtype))
    opt = build_optimizer(model, cfg)
    batch, rng = overfit_batch(), np.random.default_rng(0)

    def loss_fn(m, b):
        images, targets = detection_targets(b, "cpu", rng, flip_prob=0.0)
        losses = m(images, targets)
        seen["losses"] |= {v.dtype for v in losses.values()}
        return losses

    history = train_loop(model, opt, build_scheduler(opt, cfg), cfg, lambda: iter([batch]), loss_fn,
                         lambda step, hist: {"step": step}, WorkerCheckpointer(str(tmp_path)), device="cpu")
    return history, seen


def optim(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 0.01, "warmup_iters": 2, "max_iters": 12, "lr_steps": (0.95,), "grad_clip": 10.0,
                          "checkpoint_every": 1000, "log_every": 1, **kw})


def test_bf16_runs_convs_in_bf16_keeps_box_math_and_losses_fp32_and_learns(tmp_path):
    history, seen = train_tiny_detector(tmp_path, optim(amp=True, amp_dtype="bf16"))
    assert seen["conv"] == {torch.bfloat16}
    assert seen["anchors"] == {torch.float32} and seen["roi_features"] == {torch.float32}
    assert seen["losses"] == {torch.float32}
    losses = [r["loss"] for r in history]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_amp_off_runs_everything_in_fp32(tmp_path):
    history, seen = train_tiny_detector(tmp_path, optim(amp=False, amp_dtype="bf16", max_iters=2))
    assert seen["conv"] == {torch.float32} and seen["anchors"] == {torch.float32}
    assert seen["losses"] == {torch.float32}
    assert all(math.isfinite(r["loss"]) for r in history)

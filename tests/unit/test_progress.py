"""Watching a run: linear lr scaling, the progress line, TensorBoard event files, and
evaluation during fine-tuning (model_best.pt), all without Ray."""
from __future__ import annotations

import glob
import logging
import os
import re
import struct

import numpy as np
import pytest
import torch

from pseudobox import storage
from pseudobox.config import ConfigError, to_dict
from pseudobox.datasets.ray_io import object_array
from pseudobox.engine import (
    OptimConfig, ScalarLog, WorkerCheckpointer, build_optimizer, build_scheduler, format_duration,
    lr_scaling_note, progress_line, scaled_lr, train_loop,
)
from pseudobox.models.checkpoint import load_checkpoint
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import finetune, train_detector, trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- linear lr scaling

def test_scaled_lr_is_linear_in_the_total_batch():
    assert scaled_lr(0.02, 16, 8) == pytest.approx(0.01)
    assert scaled_lr(0.008, 64, 32) == pytest.approx(0.004)
    assert scaled_lr(0.01, 16, 64) == pytest.approx(0.04)
    assert scaled_lr(0.02, 0, 8) == 0.02  # reference_batch 0: off
    assert lr_scaling_note(0.02, 16, 8) == "lr 0.02 at batch 16 → 0.01 at batch 8 (linear scaling)"
    assert "not scaled" in lr_scaling_note(0.02, 0, 8)


def test_reference_batch_is_validated():
    with pytest.raises(ConfigError, match="optim.reference_batch"):
        OptimConfig(reference_batch=-1).validate()


def test_stage_scales_lr_to_its_workers_and_logs_both(caplog):
    optim = OptimConfig(lr=0.02, batch_size=4, reference_batch=16)
    with caplog.at_level(logging.INFO, logger="pseudobox"):
        used = trainer.scaled_optim(optim, trainer.WorkersConfig(num_workers=2), "pretrain")
    assert used.lr == pytest.approx(0.01) and used.batch_size == 4 and optim.lr == 0.02
    assert "pretrain: lr 0.02 at batch 16 → 0.01 at batch 8 (linear scaling)" in caplog.messages
    unscaled = trainer.scaled_optim(OptimConfig(lr=0.02, batch_size=4), trainer.WorkersConfig(num_workers=2), "x")
    assert unscaled.lr == 0.02


def test_resume_with_more_workers_uses_the_newly_scaled_lr(tmp_path):
    # 4 steps on 1 worker at the scaled lr 0.05, then resumed on 2 workers: lr 0.1 from the first step.
    ref = OptimConfig(lr=0.1, batch_size=8, reference_batch=16, warmup_iters=0, max_iters=4, gamma=1.0,
                      lr_steps=(0.9,), amp=False, checkpoint_every=4, log_every=4)
    one = OptimConfig(**{**to_dict(ref), "lr": scaled_lr(ref.lr, ref.reference_batch, 8), "lr_steps": (0.9,)})
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, one)
    sched = build_scheduler(opt, one)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    two = OptimConfig(**{**to_dict(one), "lr": scaled_lr(ref.lr, ref.reference_batch, 16), "max_iters": 8,
                         "lr_steps": (0.9,)})
    opt2 = build_optimizer(model, two)
    sched2 = build_scheduler(opt2, two)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())  # restores the old base lr 0.05
    seen = []

    def loss_fn(m, batch):
        seen.append(opt2.param_groups[0]["lr"])
        return {"loss_mse": m(batch[0]).pow(2).mean()}

    train_loop(model, opt2, sched2, two, lambda: iter([(torch.ones(2, 3),)] * 4), loss_fn,
               lambda step, hist: {"step": step}, WorkerCheckpointer(str(tmp_path)), start_step=4)
    assert seen == pytest.approx([0.1] * 4)
    assert sched2.base_lrs == [pytest.approx(0.1)]


# ---------------------------------------------------------------- progress lines

def test_format_duration():
    assert format_duration(0) == "0s"
    assert format_duration(45.4) == "45s"
    assert format_duration(192) == "3m12s"
    assert format_duration(3600 + 5 * 60 + 59) == "1h05m"
    assert format_duration(-3) == "0s"


def test_progress_line_format():
    row = {"step": 120, "lr": 0.02, "s_per_iter": 0.5, "loss_classifier": 0.1,
           "loss_box_reg": 0.25, "loss": 1.234}
    line = progress_line("pretrain", row, 1000, 38.2, 192)
    assert line == ("pretrain  step 120/1000  loss 1.2340 (classifier 0.1000, box_reg 0.2500)  lr 0.02  "
                    "38.2 img/s  ETA 3m12s")
    with_eval = progress_line("finetune", {**row, "eval/AP": 12.345, "eval/images": 4}, 1000, 38.2, 0)
    assert with_eval.endswith("ETA 0s  eval/AP 12.35")


class RankCheckpointer(WorkerCheckpointer):
    """A local checkpointer that pretends to be one rank of a ``world_size`` group."""

    def __init__(self, local_dir, rank, world_size):
        super().__init__(local_dir)
        self.rank, self.world_size = rank, world_size


def linear_run(tmp_path, rank=0, world_size=1, max_iters=6, log_every=2, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    cfg = OptimConfig(lr=0.05, warmup_iters=0, max_iters=max_iters, batch_size=16, checkpoint_every=100,
                      log_every=log_every, amp=False)
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    data = [(x[:16], x[:16].sum(1, keepdim=True)), (x[16:], x[16:].sum(1, keepdim=True))]

    def loss_fn(m, batch):
        return {"loss_mse": torch.nn.functional.mse_loss(m(batch[0]), batch[1])}

    return train_loop(model, opt, build_scheduler(opt, cfg), cfg, lambda: iter(data), loss_fn,
                      lambda step, hist: {"step": step, "history": list(hist)},
                      RankCheckpointer(str(tmp_path), rank, world_size), stage="pretrain", **kwargs)


STEP_LINE = re.compile(r"^pretrain  step (\d+)/6  loss [\d.]+ \(mse [\d.]+\)  lr [\d.e-]+  ([\d.]+) img/s  ETA \d+s$")


def test_rank0_prints_one_line_per_log_step(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pseudobox"):
        history = linear_run(tmp_path, rank=0, world_size=2)
    lines = [m for m in caplog.messages if m.startswith("pretrain  step")]
    assert [int(STEP_LINE.match(m).group(1)) for m in lines] == [2, 4, 6] == [r["step"] for r in history]
    # images/s are global: batch_size x world_size per step.
    for line, row in zip(lines, history):
        assert float(STEP_LINE.match(line).group(2)) == pytest.approx(16 * 2 / row["s_per_iter"], abs=0.06)


def test_other_ranks_print_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pseudobox"):
        history = linear_run(tmp_path, rank=1, world_size=2)
    assert len(history) == 3
    assert not [m for m in caplog.messages if "step" in m]


# ---------------------------------------------------------------- TensorBoard

def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``: {tag: [(step, value)]}.

    Event files are TFRecords (u64 length, u32 crc, data, u32 crc) of ``Event`` protos."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    assert files, f"no event file under {logdir}"
    for path in files:
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_train_loop_writes_tensorboard_scalars_on_rank0(tmp_path):
    tb = tmp_path / "out" / "tensorboard"
    history = linear_run(tmp_path, tensorboard=str(tb))
    scalars = read_scalars(str(tb))
    assert {"train/loss", "train/loss_mse", "train/lr", "train/img_per_s", "train/s_per_iter"} <= set(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    other = tmp_path / "rank1" / "tensorboard"
    linear_run(tmp_path, rank=1, world_size=2, tensorboard=str(other))
    assert not other.exists()


def test_scalar_log_uploads_to_s3_at_each_sync(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/run/tensorboard"
    scalars = ScalarLog(uri)
    scalars.add(1, {"train/loss": 2.0, "eval/AP": float("nan")})  # NaN is skipped, not written
    scalars.sync()
    names = storage.listdir(uri)
    assert len(names) == 1 and names[0].startswith("events.out.tfevents.")
    scalars.add(2, {"train/loss": 1.5})
    scalars.close()
    assert not os.path.exists(scalars.local_dir)
    local = tmp_path / "copy"
    local.mkdir()
    (local / names[0]).write_bytes(storage.read_bytes(storage.join(uri, names[0])))
    assert read_scalars(str(local)) == {"train/loss": [(1, 2.0), (2, 1.5)]}


# ---------------------------------------------------------------- eval_every in fine-tuning

def test_finetune_eval_every_is_validated():
    base = dict(corpus="/c", output="/o", init="random")
    finetune.FinetuneConfig(**base, eval_every=10, eval_corpus="/e").validate()
    with pytest.raises(ConfigError, match="eval_every needs eval_corpus"):
        finetune.FinetuneConfig(**base, eval_every=10).validate()
    with pytest.raises(ConfigError, match="best_metric"):
        finetune.FinetuneConfig(**base, eval_every=10, eval_corpus="/e", best_metric="mAP").validate()
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        finetune.FinetuneConfig(**base, eval_every=-1).validate()


def test_detector_worker_evaluates_every_n_steps_and_keeps_the_best(tmp_path, caplog):
    from tests.conftest import make_corpus

    corpus = str(tmp_path / "eval")
    manifest = make_corpus(corpus, num_images=4, size=64, samples_per_shard=4, style="detection",
                           classes="downstream")
    classes = manifest.classes if hasattr(manifest, "classes") else manifest["classes"]
    arch = DetectorArch(detector="retinanet", depth=18, min_size=(64,), max_size=128, test_size=64)
    optim = OptimConfig(lr=0.001, warmup_iters=1, max_iters=3, batch_size=2, checkpoint_every=3, log_every=1,
                        amp=False)
    best_uri = str(tmp_path / "out" / train_detector.BEST_MODEL_FILE)
    config = {"arch": to_dict(arch), "optim": to_dict(optim), "class_names": classes, "init": {},
              "method": "finetune-from-random", "stage": "finetune", "seed": 0, "config": {"note": "test"},
              "use_gpu": False, "threads": 1, "tensorboard": str(tmp_path / "out" / "tensorboard"),
              "eval": {"every": 2, "corpus": corpus, "metric": "AP50", "best": best_uri, "batch_size": 4}}
    rng = np.random.default_rng(0)
    batch = {"key": np.array(["x", "y"], dtype=object),
             "image": object_array([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]),
             "boxes": object_array([np.array([[4, 4, 40, 30]], np.float32), np.array([[10, 12, 60, 62]], np.float32)]),
             "box_labels": object_array([np.array([0]), np.array([1])])}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="pseudobox"):
        history = train_detector.worker(config, local_dir=str(run_dir), batches=lambda: iter([batch]))
    evaluated = [r["step"] for r in history if "eval/AP" in r]
    assert evaluated == [2, 3]  # every 2 steps, and the last step
    assert [r["step"] for r in history] == [1, 2, 3]
    for row in history:
        if "eval/AP" in row:
            assert {"eval/AP50", "eval/VOC_AP50", "eval/images"} <= set(row) and row["eval/images"] == 4
    best = load_checkpoint(best_uri, expect_type="detector")
    assert "optimizer_state" not in best and best["class_names"] == classes
    assert best["best"]["metric"] == "AP50" and best["best"]["step"] in (2, 3)
    values = [r["eval/AP50"] for r in history if "eval/AP50" in r]
    assert best["best"]["value"] == pytest.approx(max(values))
    assert best["metrics"]["AP50"] == pytest.approx(best["best"]["value"])
    lines = [m for m in caplog.messages if m.startswith("finetune  step")]
    assert len(lines) == 3 and "eval/AP50" in lines[1] and "ETA" in lines[0]
    scalars = read_scalars(str(tmp_path / "out" / "tensorboard"))
    assert [s for s, _ in scalars["eval/AP50"]] == [2, 3] and "train/loss" in scalars
    # The finetune driver's metrics.json is the last step's evaluation, not a second one.
    metrics = finetune.last_step_metrics({"step": 3, "history": history})
    assert metrics["AP50"] == history[-1]["eval/AP50"] and metrics["images"] == 4 and "loss" not in metrics
    assert finetune.last_step_metrics({"step": 4, "history": history}) is None

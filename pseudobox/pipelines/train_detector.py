"""The detector training worker shared by ``pretrain`` and ``finetune``.

Each worker builds the torchvision detector, initialises it (from a classifier
backbone, a pre-trained detector, or a restored Ray Train checkpoint), wraps it in DDP
and runs the shared ``train_loop`` over its shard of the Ray dataset. Multi-scale
training is torchvision's own: ``min_size`` is a tuple and each image draws one.

With ``config["eval"]`` (fine-tuning's ``eval_every``), rank 0 evaluates the model on a
held-out corpus every N steps with ``evaluate.evaluate_detector`` and keeps the best
weights so far as ``model_best.pt``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pseudobox import storage
from pseudobox.config import from_dict
from pseudobox.datasets.ray_io import object_array
from pseudobox.datasets.transforms import hflip
from pseudobox.engine import (
    OptimConfig, WorkerCheckpointer, build_optimizer, build_scheduler, resume_record, resume_training, run_init,
    train_loop, unwrap,
)
from pseudobox.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from pseudobox.models.detectors import (
    DetectorArch, build_detector, detector_images, init_backbone_from_classifier, transfer_detector_weights,
)
from pseudobox.pipelines import trainer

# What ``init=detector`` starts from: a detector, or a PreDet pre-training (its backbone).
DETECTOR_INIT_TYPES = ("detector", "predet")
MIN_BOX_SIDE = 1.0  # pixels; torchvision rejects boxes without positive width and height
BEST_MODEL_FILE = "model_best.pt"
log = logging.getLogger("pseudobox")


def keep_valid_boxes(boxes: np.ndarray, labels: np.ndarray, min_side: float = MIN_BOX_SIDE):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    ok = ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)
    return boxes[ok], np.asarray(labels, np.int64)[ok]


def drop_images_without_boxes(batch: dict) -> dict:
    """CPU stage: drop degenerate boxes, then images left without any box."""
    keep, boxes, labels = [], [], []
    for i in range(len(batch["key"])):
        b, lab = keep_valid_boxes(batch["boxes"][i], batch["box_labels"][i])
        if len(b):
            keep.append(i)
            boxes.append(b)
            labels.append(lab)
    out = {k: v[keep] for k, v in batch.items() if k not in ("boxes", "box_labels")}
    out["boxes"], out["box_labels"] = object_array(boxes), object_array(labels)
    return out


def detection_targets(batch: dict, device, rng: np.random.Generator, flip_prob: float = 0.5):
    """Numpy batch → (images, targets) for torchvision detectors, with random h-flip."""
    images = detector_images(batch["image"], device)
    targets = []
    for k, im in enumerate(images):
        boxes = torch.as_tensor(np.asarray(batch["boxes"][k], np.float32).reshape(-1, 4), device=device)
        if rng.random() < flip_prob:
            im, boxes = hflip(im, boxes)
            images[k] = im
        labels = torch.as_tensor(np.asarray(batch["box_labels"][k], np.int64), device=device) + 1
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def initialise(model, arch: DetectorArch, init: dict, class_names: list[str] | None = None) -> dict:
    """Apply the stage's initialisation; returns a short description for the logs and the
    checkpoint (what was copied, re-initialised, and not provided by the checkpoint).

    ``init``: ``{"detector": uri, "keep_class_layers": bool}`` (a detector, or a PreDet
    pre-training: backbone, FPN and RPN trunk), ``{"backbone": uri}`` (the
    ResNet of a detector of any kind), ``{"classifier": uri}`` or ``{}`` (random).
    The description names the checkpoint (``checkpoint``: its URI) it started from.
    """
    if init.get("detector"):
        ckpt = load_checkpoint(init["detector"], expect_type=DETECTOR_INIT_TYPES)
        if ckpt["model_type"] == "predet":  # the checkpoint says what it holds
            from pseudobox.models.detectors import init_from_predet

            return {"from": "predet", "checkpoint": init["detector"], **init_from_predet(model, ckpt, arch)}
        info = transfer_detector_weights(model, ckpt, arch,
                                         class_names=class_names,
                                         keep_class_layers=bool(init.get("keep_class_layers", False)))
        return {"from": "detector", "checkpoint": init["detector"], **info}
    if init.get("backbone"):
        from pseudobox.models.detectors import init_backbone_from_detector

        info = init_backbone_from_detector(model, load_checkpoint(init["backbone"], expect_type="detector"), arch)
        return {"from": "backbone", "checkpoint": init["backbone"], **info}
    if init.get("classifier"):
        info = init_backbone_from_classifier(model, load_checkpoint(init["classifier"], expect_type="classifier"), arch)
        return {"from": "classifier", "checkpoint": init["classifier"], **info}
    return {"from": "random"}


def evaluate_during_training(model: torch.nn.Module, corpus: str, class_names: list[str], test_size: int,
                             device, batch_size: int = 8) -> dict:
    """COCO + VOC metrics of the model being trained, at the test-time short side; the
    model is back in training mode with its training sizes afterwards."""
    from pseudobox.datasets.corpus import iter_corpus
    from pseudobox.models.detectors import predict
    from pseudobox.pipelines.evaluate import evaluate_detector

    model = unwrap(model)
    train_sizes = model.transform.min_size
    model.transform.min_size = (test_size,)
    try:
        with torch.no_grad():
            return evaluate_detector(lambda ims: predict(model, ims), iter_corpus(corpus), class_names,
                                     batch_size, device)
    finally:
        model.transform.min_size = train_sizes
        model.train()


class BestModelKeeper:
    """Evaluates on ``eval["corpus"]`` and keeps the best weights by ``eval["metric"]``
    (higher is better) as ``eval["best"]``, a checkpoint without optimizer state that
    also records ``best: {metric, value, step}`` and the evaluation's metrics.

    The best value so far comes from that file, so a restarted worker does not replace
    a better model saved after its last training checkpoint."""

    def __init__(self, eval_cfg: dict, class_names: list[str], test_size: int, device, export):
        self.corpus, self.metric, self.uri = eval_cfg["corpus"], eval_cfg["metric"], eval_cfg["best"]
        self.batch_size = int(eval_cfg.get("batch_size", 8))
        self.class_names, self.test_size, self.device, self.export = class_names, test_size, device, export
        self.best = None
        if storage.exists(self.uri):
            recorded = load_checkpoint(self.uri, expect_type="detector").get("best") or {}
            if recorded.get("metric") == self.metric:
                self.best = recorded.get("value")

    def __call__(self, step: int, model: torch.nn.Module) -> dict:
        metrics = evaluate_during_training(model, self.corpus, self.class_names, self.test_size, self.device,
                                           self.batch_size)
        value = metrics.get(self.metric)
        if value is not None and math.isfinite(value) and (self.best is None or value > self.best):
            self.best = value
            save_checkpoint({**self.export(step), "metrics": metrics,
                             "best": {"metric": self.metric, "value": value, "step": step}}, self.uri)
            log.info("step %d: best %s so far (%.2f) → %s", step, self.metric, value, self.uri)
        return metrics


def worker(config: dict, local_dir: str | None = None, batches=None) -> list:
    """One DDP training worker (inside Ray Train unless ``local_dir`` is given)."""
    arch = from_dict(DetectorArch, config["arch"])
    optim = from_dict(OptimConfig, config["optim"])
    class_names = config["class_names"]
    device = trainer.worker_device(config.get("use_gpu", False), config.get("threads", 1))
    model = build_detector(arch, len(class_names))
    checkpointer = WorkerCheckpointer(local_dir)
    restored = checkpointer.restore()
    init_info = run_init(restored, lambda: initialise(model, arch, config["init"], class_names))
    resumes = resume_record(restored)
    model.to(device)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim)
    start_step, history = resume_training(restored, model, optimizer, scheduler)
    model = trainer.prepare(model, in_ray=local_dir is None)
    batches = batches or trainer.dataset_batches("train", optim.batch_size)
    rng = np.random.default_rng(config.get("seed", 0) * 1000 + checkpointer.rank + start_step)

    def loss_fn(m, batch):
        images, targets = detection_targets(batch, device, rng, config.get("flip_prob", 0.5))
        return m(images, targets)

    def make_ckpt(step, hist):
        return make_checkpoint("detector", config["arch"], class_names, unwrap(model).state_dict(),
                               optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                               step=step, history=hist, init=init_info, resumes=resumes, method=config["method"],
                               stage=config["stage"], config=config["config"])

    def export_weights(step):
        return make_checkpoint("detector", config["arch"], class_names, unwrap(model).state_dict(), step=step,
                               init=init_info, method=config["method"], stage=config["stage"],
                               config=config["config"])

    eval_cfg = config.get("eval") or {}
    eval_every = int(eval_cfg.get("every", 0))
    eval_fn = None
    if eval_every and checkpointer.rank == 0:
        eval_fn = BestModelKeeper(eval_cfg, class_names, arch.test_size, device, export_weights)
    return train_loop(model, optimizer, scheduler, optim, batches, loss_fn, make_ckpt, checkpointer,
                      start_step=start_step, history=history, device=device, stage=config["stage"],
                      tensorboard=config.get("tensorboard", ""), eval_every=eval_every, eval_fn=eval_fn)

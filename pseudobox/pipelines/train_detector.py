"""The detector training worker shared by ``pretrain`` and ``finetune``.

Each worker builds the torchvision detector, initialises it (from a classifier
backbone, a pre-trained detector, or a restored Ray Train checkpoint), wraps it in DDP
and runs the shared ``train_loop`` over its shard of the Ray dataset. Multi-scale
training is torchvision's own: ``min_size`` is a tuple and each image draws one.
"""
from __future__ import annotations

import numpy as np
import torch

from pseudobox.config import from_dict
from pseudobox.datasets.ray_io import object_array
from pseudobox.datasets.transforms import hflip
from pseudobox.engine import OptimConfig, WorkerCheckpointer, build_optimizer, build_scheduler, train_loop, unwrap
from pseudobox.models.checkpoint import load_checkpoint, make_checkpoint
from pseudobox.models.detectors import (
    DetectorArch, build_detector, detector_images, init_backbone_from_classifier, transfer_detector_weights,
)
from pseudobox.pipelines import trainer

MIN_BOX_SIDE = 1.0  # pixels; torchvision rejects boxes without positive width and height


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

    ``init``: ``{"detector": uri, "keep_class_layers": bool}``, ``{"classifier": uri}`` or
    ``{}`` (random).
    """
    if init.get("detector"):
        info = transfer_detector_weights(model, load_checkpoint(init["detector"], expect_type="detector"), arch,
                                         class_names=class_names,
                                         keep_class_layers=bool(init.get("keep_class_layers", False)))
        return {"from": "detector", **info}
    if init.get("classifier"):
        info = init_backbone_from_classifier(model, load_checkpoint(init["classifier"], expect_type="classifier"), arch)
        return {"from": "classifier", **info}
    return {"from": "random"}


def worker(config: dict, local_dir: str | None = None, batches=None) -> list:
    """One DDP training worker (inside Ray Train unless ``local_dir`` is given)."""
    arch = from_dict(DetectorArch, config["arch"])
    optim = from_dict(OptimConfig, config["optim"])
    class_names = config["class_names"]
    device = trainer.worker_device(config.get("use_gpu", False), config.get("threads", 1))
    model = build_detector(arch, len(class_names))
    checkpointer = WorkerCheckpointer(local_dir)
    restored = checkpointer.restore()
    init_info = initialise(model, arch, config["init"], class_names) if restored is None else {"from": "restored"}
    model.to(device)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim)
    start_step, history = 0, []
    if restored is not None:
        model.load_state_dict(restored["model_state"])
        optimizer.load_state_dict(restored["optimizer_state"])
        scheduler.load_state_dict(restored["scheduler_state"])
        start_step, history = restored["step"], restored.get("history", [])
    model = trainer.prepare(model, in_ray=local_dir is None)
    batches = batches or trainer.dataset_batches("train", optim.batch_size)
    rng = np.random.default_rng(config.get("seed", 0) * 1000 + checkpointer.rank + start_step)

    def loss_fn(m, batch):
        images, targets = detection_targets(batch, device, rng, config.get("flip_prob", 0.5))
        return m(images, targets)

    def make_ckpt(step, hist):
        return make_checkpoint("detector", config["arch"], class_names, unwrap(model).state_dict(),
                               optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                               step=step, history=hist, init=init_info, method=config["method"],
                               stage=config["stage"], config=config["config"])

    return train_loop(model, optimizer, scheduler, optim, batches, loss_fn, make_ckpt, checkpointer,
                      start_step=start_step, history=history, device=device)

"""The PreDet pre-training worker (``pretrain method=predet``).

Each worker builds the PreDet model (ResNet-FPN, the shared multi-label head, CRPN and
CROI head: ``models/predet.py``), starts its ResNet from a classifier checkpoint or at
random, wraps it in DDP and runs the shared ``train_loop``; the method is its loss
(``models/predet_loss.PredetLoss``: two MoCo-v2 views, Q EdgeBox queries per image, the
four switchable terms). Checkpoints are ``model_type="predet"``: fine-tuning's
``init=detector`` recognises them and takes the backbone, FPN and RPN trunk.
"""
from __future__ import annotations

import numpy as np

from pseudobox.config import from_dict
from pseudobox.engine import (
    OptimConfig, WorkerCheckpointer, build_optimizer, build_scheduler, resume_record, resume_training, run_init,
    train_loop, unwrap,
)
from pseudobox.models.checkpoint import make_checkpoint
from pseudobox.pipelines import train_detector, trainer

MODEL_TYPE = "predet"


def worker(config: dict, local_dir: str | None = None, batches=None) -> list:
    """One DDP PreDet worker (inside Ray Train unless ``local_dir`` is given). Batches hold
    ``image`` (HWC uint8), ``labels`` (class indices, multi-label) and ``queries`` (EdgeBoxes,
    xyxy pixels, best first)."""
    from pseudobox.datasets.views import ViewConfig
    from pseudobox.models.predet import PredetArch, build_predet
    from pseudobox.models.predet_loss import PredetLoss, PredetLossConfig

    arch = from_dict(PredetArch, config["arch"])
    optim = from_dict(OptimConfig, config["optim"])
    views = from_dict(ViewConfig, config["views"])
    loss_cfg = from_dict(PredetLossConfig, config["loss"])
    class_names = config["class_names"]
    device = trainer.worker_device(config.get("use_gpu", False), config.get("threads", 1))
    model = build_predet(arch, len(class_names))
    checkpointer = WorkerCheckpointer(local_dir)
    restored = checkpointer.restore()
    # {"classifier": uri}: the ResNet from a classifier; {}: random, as in the paper.
    init_info = run_init(restored, lambda: train_detector.initialise(model, arch, config["init"]))
    resumes = resume_record(restored)
    model.to(device)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim)
    start_step, history = resume_training(restored, model, optimizer, scheduler)
    # Switched-off loss terms still reach every parameter (at weight 0): plain DDP works.
    model = trainer.prepare(model, in_ray=local_dir is None)
    batches = batches or trainer.dataset_batches("train", optim.batch_size)
    rng = np.random.default_rng(config.get("seed", 0) * 1000 + checkpointer.rank + start_step)
    loss_fn = PredetLoss(views, loss_cfg, len(class_names), device, rng)

    def make_ckpt(step, hist):
        return make_checkpoint(MODEL_TYPE, config["arch"], class_names, unwrap(model).state_dict(),
                               optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                               step=step, history=hist, init=init_info, resumes=resumes, method="predet",
                               stage=config["stage"], loss=config["loss"], views=config["views"], config=config["config"])

    return train_loop(model, optimizer, scheduler, optim, batches, loss_fn, make_ckpt, checkpointer,
                      start_step=start_step, history=history, device=device, stage=config["stage"],
                      tensorboard=config.get("tensorboard", ""))

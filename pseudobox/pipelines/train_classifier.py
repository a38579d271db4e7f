"""Stage ``train-classifier`` (DAP step 1): a ResNet on the weakly labelled corpus.

Single-label cross-entropy, or multi-label BCE when the corpus is multi-label. Data
streams from the shards through Ray Data (decode and crop in CPU tasks) into N Ray
Train workers (DDP).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pseudobox import storage
from pseudobox.config import from_dict, require, to_dict
from pseudobox.engine import OptimConfig, WorkerCheckpointer, build_optimizer, build_scheduler, train_loop, unwrap
from pseudobox.models.checkpoint import load_checkpoint, make_checkpoint
from pseudobox.pipelines import trainer
from pseudobox.pipelines.common import RayConfig, check_same_run, init_ray


@dataclass
class ClassifierModelConfig:
    depth: int = 50
    weights: str = ""          # torchvision weights name (IMAGENET1K_V1) or a state_dict URI
    init_checkpoint: str = ""  # a pseudobox classifier checkpoint to start from

    def validate(self) -> None:
        require(self.depth in (18, 34, 50, 101, 152), "model.depth must be 18, 34, 50, 101 or 152")
        require(not (self.weights and self.init_checkpoint), "set model.weights or model.init_checkpoint, not both")


@dataclass
class TrainClassifierConfig:
    corpus: str = ""
    output: str = ""
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.1, weight_decay=1e-4, warmup_iters=50))
    image_size: int = 224
    workers: trainer.WorkersConfig = field(default_factory=trainer.WorkersConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        require(bool(self.corpus), "corpus is required")
        require(bool(self.output), "output is required (a run directory, local or s3://)")
        require(self.image_size >= 32, "image_size must be >= 32")
        for part in (self.model, self.optim, self.workers, self.ray):
            part.validate()

    def check_paths(self) -> None:
        from pseudobox.datasets.corpus import load_manifest

        storage.check_readable(self.corpus, "corpus")
        load_manifest(self.corpus)
        if self.model.init_checkpoint:
            load_checkpoint(self.model.init_checkpoint, expect_type="classifier")
        storage.check_writable(self.output, "output")


def classifier_loss(model, images: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> dict:
    from pseudobox.models.classifier import normalize_images

    logits = model(normalize_images(images))
    if multi_label:
        return {"loss_bce": F.binary_cross_entropy_with_logits(logits, targets)}
    return {"loss_ce": F.cross_entropy(logits, targets.argmax(dim=1))}


def build_model(cfg: dict, num_classes: int):
    from pseudobox.models.classifier import build_resnet

    m = cfg["model"]
    model = build_resnet(m["depth"], num_classes=num_classes, weights=m["weights"] or None)
    if m["init_checkpoint"]:
        ckpt = load_checkpoint(m["init_checkpoint"], expect_type="classifier")
        state = {k: v for k, v in ckpt["model_state"].items() if not k.startswith("fc.") or len(ckpt["class_names"]) == num_classes}
        model.load_state_dict(state, strict=False)
    return model


def worker(config: dict, local_dir: str | None = None, batches=None) -> list:
    """One training worker. Inside Ray Train by default; ``local_dir``/``batches`` run it
    without Ray (tests)."""
    cfg = config["config"]
    optim = from_dict(OptimConfig, cfg["optim"])
    device = trainer.worker_device(config.get("use_gpu", False), config.get("threads", 1))
    model = build_model(cfg, len(config["class_names"])).to(device)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim)
    checkpointer = WorkerCheckpointer(local_dir)
    start_step, history = 0, []
    restored = checkpointer.restore()
    if restored is not None:
        model.load_state_dict(restored["model_state"])
        optimizer.load_state_dict(restored["optimizer_state"])
        scheduler.load_state_dict(restored["scheduler_state"])
        start_step, history = restored["step"], restored.get("history", [])
    model = trainer.prepare(model, in_ray=local_dir is None)
    batches = batches or trainer.dataset_batches("train", optim.batch_size)
    multi_label = config["multi_label"]

    def loss_fn(m, batch):
        images = torch.as_tensor(batch["image"]).to(device)
        targets = torch.as_tensor(batch["target"]).to(device)
        return classifier_loss(m, images, targets, multi_label)

    def make_ckpt(step, hist):
        return make_checkpoint("classifier", {"depth": cfg["model"]["depth"]}, config["class_names"],
                               unwrap(model).state_dict(), optimizer_state=optimizer.state_dict(),
                               scheduler_state=scheduler.state_dict(), step=step, history=hist,
                               multi_label=multi_label, config=cfg, method="cls", stage="train-classifier")

    return train_loop(model, optimizer, scheduler, optim, batches, loss_fn, make_ckpt, checkpointer,
                      start_step=start_step, history=history, device=device)


def run(cfg: TrainClassifierConfig) -> dict:
    from pseudobox.datasets.corpus import load_manifest
    from pseudobox.datasets.ray_io import decoded_corpus
    from pseudobox.datasets.transforms import classification_batch

    cfg.check_paths()
    check_same_run(cfg.output, {"stage": "train-classifier", "corpus": cfg.corpus, "model": to_dict(cfg.model),
                                "image_size": cfg.image_size})
    manifest = load_manifest(cfg.corpus)
    init_ray(cfg.ray)
    ds = decoded_corpus(cfg.corpus, keep_errors=False, shuffle=True).map_batches(
        classification_batch, fn_kwargs={"size": cfg.image_size, "num_classes": len(manifest.classes), "train": True},
        batch_format="numpy", num_cpus=1)
    result = trainer.fit(worker, {"config": to_dict(cfg), "class_names": manifest.classes,
                                  "multi_label": manifest.multi_label},
                         cfg.output, cfg.workers, {"train": ds})
    return trainer.export_final(result, cfg.output)

"""Stage ``train-classifier`` (DAP step 1): a ResNet on the weakly labelled corpus.

Single-label cross-entropy, or multi-label BCE when the corpus is multi-label. Data
streams from the shards through Ray Data (decode and crop in CPU tasks) into N Ray
Train workers (DDP).

With ``optim.max_iters: 0`` and ``model.weights`` set, nothing is trained: the weights
(e.g. torchvision's ImageNet ResNet, as the DAP paper uses for ImageNet-1k) are written
as ``<output>/model.pt`` unchanged, head included, with the corpus's class names, which
must be the weights' classes in their order. No Ray, no forward pass, so BatchNorm
statistics stay the weights' own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pseudobox import storage
from pseudobox.config import ConfigError, from_dict, path_field, require, to_dict
from pseudobox.engine import (
    OptimConfig, WorkerCheckpointer, build_optimizer, build_scheduler, resume_record, resume_training, run_init,
    train_loop, unwrap,
)
from pseudobox.models.checkpoint import MODEL_FILE, CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from pseudobox.models.classifier import is_weights_name
from pseudobox.pipelines import trainer
from pseudobox.pipelines.common import (
    TRAINING_APPLIABLE, RayConfig, check_same_run, config_defaults, init_ray, log, run_fingerprint,
)


@dataclass
class ClassifierModelConfig:
    depth: int = 50
    # A torchvision weights name (IMAGENET1K_V1) or a state_dict URI; with optim.max_iters: 0
    # they are converted, not trained.
    weights: str = path_field(not_a_path=is_weights_name)
    init_checkpoint: str = path_field()  # a pseudobox classifier checkpoint to start from

    def validate(self) -> None:
        require(self.depth in (18, 34, 50, 101, 152), "model.depth must be 18, 34, 50, 101 or 152")
        require(not (self.weights and self.init_checkpoint), "set model.weights or model.init_checkpoint, not both")


@dataclass
class TrainClassifierConfig:
    corpus: str = path_field()
    output: str = path_field()
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.1, weight_decay=1e-4, warmup_iters=50))
    image_size: int = 224
    workers: trainer.WorkersConfig = field(default_factory=trainer.WorkersConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def converts_weights(self) -> bool:
        """``optim.max_iters: 0``: write ``model.weights`` as a checkpoint, train nothing."""
        return self.optim.max_iters == 0

    def validate(self) -> None:
        require(bool(self.corpus), "corpus is required")
        require(bool(self.output), "output is required (a run directory, local or s3://)")
        require(self.image_size >= 32, "image_size must be >= 32")
        optim = self.optim
        if self.converts_weights():
            require(bool(self.model.weights), "optim.max_iters=0 converts model.weights into a classifier "
                    "checkpoint without training: set model.weights (e.g. IMAGENET1K_V1 or a state_dict URI), "
                    "or set optim.max_iters >= 1 to train")
            optim = dataclasses.replace(optim, max_iters=1)  # the other optim settings are unused
        for part in (self.model, optim, self.workers, self.ray):
            part.validate()

    def check_paths(self) -> None:
        from pseudobox.datasets.corpus import load_manifest
        from pseudobox.models.classifier import is_weights_name, torchvision_weights

        storage.check_readable(self.corpus, "corpus")
        manifest = load_manifest(self.corpus)
        if self.model.init_checkpoint:
            load_checkpoint(self.model.init_checkpoint, expect_type="classifier")
        if self.model.weights and is_weights_name(self.model.weights):
            try:
                head = len(torchvision_weights(self.model.depth, self.model.weights).meta["categories"])
            except CheckpointError as e:
                raise ConfigError(f"model.weights: {e}") from e
            if head != len(manifest.classes):
                require(not self.converts_weights(),
                        f"model.weights={self.model.weights} has a {head}-class head but the corpus has "
                        f"{len(manifest.classes)} classes: converting (optim.max_iters=0) needs the weights' own "
                        f"classes in their order (for ImageNet: build-corpus builder=imagefolder on ILSVRC2012 "
                        f"train), or set optim.max_iters >= 1 to train a new head")
                log.warning("train-classifier: model.weights=%s has a %d-class head but the corpus has %d "
                            "classes; the final layer starts random and is trained from scratch",
                            self.model.weights, head, len(manifest.classes))
        elif self.model.weights:
            storage.check_readable(self.model.weights, "model.weights")
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


def init_record(cfg: dict) -> dict:
    """What ``build_model`` started the ResNet from, for the checkpoints: a pseudobox
    classifier (``init_checkpoint``), torchvision or state_dict ``weights``, or random."""
    m = cfg["model"]
    if m["init_checkpoint"]:
        return {"from": "classifier", "checkpoint": m["init_checkpoint"]}
    if m["weights"]:
        return {"from": "weights", "weights": m["weights"]}
    return {"from": "random"}


def worker(config: dict, local_dir: str | None = None, batches=None) -> list:
    """One training worker. Inside Ray Train by default; ``local_dir``/``batches`` run it
    without Ray (tests)."""
    cfg = config["config"]
    optim = from_dict(OptimConfig, config.get("optim", cfg["optim"]))  # the launcher's lr-scaled settings
    device = trainer.worker_device(config.get("use_gpu", False), config.get("threads", 1))
    model = build_model(cfg, len(config["class_names"])).to(device)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim)
    checkpointer = WorkerCheckpointer(local_dir)
    restored = checkpointer.restore()
    init_info = run_init(restored, lambda: init_record(cfg))
    resumes = resume_record(restored)
    start_step, history = resume_training(restored, model, optimizer, scheduler)
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
                               multi_label=multi_label, config=cfg, method="cls", stage="train-classifier",
                               head="trained", init=init_info, resumes=resumes)

    return train_loop(model, optimizer, scheduler, optim, batches, loss_fn, make_ckpt, checkpointer,
                      start_step=start_step, history=history, device=device, stage="train-classifier",
                      tensorboard=config.get("tensorboard", ""))


def convert_weights(cfg: TrainClassifierConfig) -> dict:
    """Write ``model.weights`` as the classifier checkpoint, unchanged (no Ray, no forward pass).

    Everything is checked before anything is written, run.json included, so that a
    refused conversion leaves the output as it was."""
    from pseudobox.datasets.corpus import load_manifest
    from pseudobox.models.classifier import classifier_from_weights

    trained = sorted(n for n in storage.listdir(cfg.output) if n.startswith("checkpoint_"))
    if trained:
        raise ConfigError(f"{cfg.output} holds a training run ({trained[-1]}); converting would replace its "
                          "model.pt: use a new output for the converted weights")
    manifest = load_manifest(cfg.corpus)
    try:
        ckpt = classifier_from_weights(cfg.model.depth, cfg.model.weights, manifest.classes,
                                       multi_label=manifest.multi_label, config=to_dict(cfg))
    except CheckpointError as e:
        raise ConfigError(f"model.weights: {e}") from e
    check_same_run(cfg.output, run_fingerprint("train-classifier", cfg), appliable=TRAINING_APPLIABLE,
                   defaults=config_defaults(cfg))
    uri = storage.join(cfg.output, MODEL_FILE)
    save_checkpoint(ckpt, uri)
    log.info("train-classifier: converted %s (ResNet-%d, %d classes, no training step) → %s",
             cfg.model.weights, cfg.model.depth, len(manifest.classes), uri)
    return ckpt


def run(cfg: TrainClassifierConfig) -> dict:
    from pseudobox.datasets.corpus import load_manifest
    from pseudobox.datasets.ray_io import decoded_corpus
    from pseudobox.datasets.transforms import classification_batch

    cfg.check_paths()
    if cfg.converts_weights():
        return convert_weights(cfg)
    check_same_run(cfg.output, run_fingerprint("train-classifier", cfg), appliable=TRAINING_APPLIABLE,
                   defaults=config_defaults(cfg))
    manifest = load_manifest(cfg.corpus)
    init_ray(cfg.ray)
    ds = decoded_corpus(cfg.corpus, keep_errors=False, shuffle=True).map_batches(
        classification_batch, fn_kwargs={"size": cfg.image_size, "num_classes": len(manifest.classes), "train": True},
        batch_format="numpy", num_cpus=1)
    optim = trainer.scaled_optim(cfg.optim, cfg.workers, "train-classifier")
    result = trainer.fit(worker, {"config": to_dict(cfg), "optim": to_dict(optim), "class_names": manifest.classes,
                                  "multi_label": manifest.multi_label,
                                  "tensorboard": trainer.tensorboard_uri(cfg.output)},
                         cfg.output, cfg.workers, {"train": ds})
    return trainer.export_final(result, cfg.output)

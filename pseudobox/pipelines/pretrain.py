"""Stage ``pretrain`` (DAP step 3): a detector trained on mined pseudo-boxes.

The corpus shards stream through Ray Data; a CPU stage joins each image with its
mined boxes (looked up in that shard's parquet part) and drops images without boxes;
Ray Train workers (DDP) train Faster R-CNN or RetinaNet whose backbone starts from the
step-1 classifier. ``method`` selects the pre-training recipe (only ``dap`` for now).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from pseudobox import storage
from pseudobox.config import path_field, require, to_dict
from pseudobox.datasets.ray_io import object_array
from pseudobox.engine import OptimConfig
from pseudobox.models.checkpoint import load_checkpoint
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import train_detector, trainer
from pseudobox.pipelines.common import (
    TRAINING_APPLIABLE, RayConfig, check_same_classes, check_same_run, config_defaults, init_ray, run_fingerprint,
)

METHODS = ("dap",)


@dataclass
class PretrainConfig:
    corpus: str = path_field()
    boxes: str = path_field()       # a `mine` output directory
    classifier: str = path_field()  # the step-1 classifier checkpoint (backbone init)
    output: str = path_field()
    method: str = "dap"
    min_score: float = 0.0
    model: DetectorArch = field(default_factory=lambda: DetectorArch(min_size=(96, 160, 320, 640), max_size=1000,
                                                                     test_size=640))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.008, max_iters=40000, batch_size=2))
    workers: trainer.WorkersConfig = field(default_factory=trainer.WorkersConfig)
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        for name in ("corpus", "boxes", "classifier", "output"):
            require(bool(getattr(self, name)), f"{name} is required")
        require(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        require(0 <= self.min_score < 1, "min_score must be in [0, 1)")
        for part in (self.model, self.optim, self.workers, self.ray):
            part.validate()

    def check_paths(self) -> None:
        from pseudobox.datasets.corpus import load_manifest

        storage.check_readable(self.corpus, "corpus")
        manifest = load_manifest(self.corpus)
        storage.check_readable(storage.join(self.boxes, "parts"), "boxes (run `pseudobox mine` first)")
        summary = storage.join(self.boxes, "mining.json")  # written when a mining run finishes
        mined_classes = storage.read_json(summary).get("classes") if storage.exists(summary) else None
        if mined_classes is not None:  # box labels index the mined corpus's classes
            check_same_classes(mined_classes, manifest.classes, f"the boxes {self.boxes}", f"the corpus {self.corpus}",
                               "Pre-train on the corpus the boxes were mined from.", labels=("boxes", "corpus"))
        ckpt = load_checkpoint(self.classifier, expect_type="classifier")
        require(ckpt["arch"]["depth"] == self.model.depth,
                f"classifier is ResNet-{ckpt['arch']['depth']}; set model.depth={ckpt['arch']['depth']}")
        storage.check_writable(self.output, "output")


@functools.lru_cache(maxsize=8)
def _mined_part(boxes_uri: str, shard: str) -> dict:
    from pseudobox.mining.outputs import load_mined_boxes

    return load_mined_boxes(boxes_uri, shard)


def attach_mined_boxes(batch: dict, boxes_uri: str, min_score: float = 0.0) -> dict:
    """CPU stage: replace each row's boxes with its mined pseudo-boxes (score ≥ min_score).

    Parts are looked up per shard and cached per worker process, so the join streams
    without a global shuffle. Rows without any valid box are dropped afterwards.
    """
    boxes, labels = [], []
    for key, shard in zip(batch["key"], batch["shard"]):
        b, lab, s = _mined_part(boxes_uri, str(shard)).get(str(key), (np.zeros((0, 4), np.float32),
                                                                       np.zeros(0, np.int64), np.zeros(0, np.float32)))
        keep = s >= min_score
        boxes.append(b[keep])
        labels.append(lab[keep])
    out = {**batch, "boxes": object_array(boxes), "box_labels": object_array(labels)}
    return train_detector.drop_images_without_boxes(out)


def run(cfg: PretrainConfig) -> dict:
    from pseudobox.datasets.corpus import load_manifest
    from pseudobox.datasets.ray_io import decoded_corpus

    cfg.check_paths()
    check_same_run(cfg.output, run_fingerprint("pretrain", cfg), appliable=TRAINING_APPLIABLE,
                   defaults=config_defaults(cfg))
    manifest = load_manifest(cfg.corpus)
    init_ray(cfg.ray)
    ds = decoded_corpus(cfg.corpus, keep_errors=False, shuffle=True).map_batches(
        attach_mined_boxes, fn_kwargs={"boxes_uri": cfg.boxes, "min_score": cfg.min_score},
        batch_format="numpy", num_cpus=1)
    optim = trainer.scaled_optim(cfg.optim, cfg.workers, "pretrain")
    loop_config = {"arch": to_dict(cfg.model), "optim": to_dict(optim), "class_names": manifest.classes,
                   "init": {"classifier": cfg.classifier}, "method": cfg.method, "stage": "pretrain",
                   "seed": cfg.seed, "config": to_dict(cfg), "tensorboard": trainer.tensorboard_uri(cfg.output)}
    result = trainer.fit(train_detector.worker, loop_config, cfg.output, cfg.workers, {"train": ds})
    return trainer.export_final(result, cfg.output)

"""Stage ``pretrain``: detection pre-training on mined boxes, by ``method``.

``method=dap`` (DAP step 3): a Faster R-CNN or RetinaNet trained on CAM pseudo-boxes,
its backbone started from the step-1 classifier (``train_detector.worker``).

``method=predet``: PreDet on a (hashtag, multi-label) corpus with EdgeBox queries from
``mine source=edgebox``: the shared multi-label head, CRPN and CROI head with the four
switchable losses (``predet.loss.*``), from scratch or from a classifier's ResNet
(``train_predet.worker``).

The corpus shards stream through Ray Data; a CPU stage joins each image with its mined
boxes (looked up in that shard's parquet part) and drops images without any; Ray Train
workers (DDP) train, checkpointing to ``output`` (local or s3://) and resuming from it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from pseudobox import storage
from pseudobox.config import path_field, require, to_dict
from pseudobox.datasets.ray_io import object_array
from pseudobox.datasets.views import ViewConfig
from pseudobox.engine import OptimConfig
from pseudobox.models.checkpoint import load_checkpoint
from pseudobox.models.detectors import DetectorArch
from pseudobox.models.predet import PredetArch
from pseudobox.models.predet_loss import PredetLossConfig
from pseudobox.pipelines import train_detector, trainer
from pseudobox.pipelines.common import (
    TRAINING_APPLIABLE, RayConfig, check_same_classes, check_same_run, config_defaults, init_ray, run_fingerprint,
)

METHODS = ("dap", "predet")
# The box source each method trains on (mining.json "source").
METHOD_SOURCES = {"dap": ("cam", "teacher"), "predet": ("edgebox",)}


@dataclass
class PredetSettings:
    """``method=predet``: the model, its loss terms (each switchable, PreDet Table 1) and the
    two MoCo-v2 views; ``max_queries``: EdgeBoxes kept per image (best first) to sample from."""

    arch: PredetArch = field(default_factory=PredetArch)
    loss: PredetLossConfig = field(default_factory=PredetLossConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    max_queries: int = 100

    def validate(self) -> None:
        require(self.max_queries >= 1, "predet.max_queries must be >= 1")
        self.arch.validate("predet.arch")
        self.loss.validate("predet.loss")
        self.views.validate("predet.views")
        require(self.views.crop_size == self.arch.crop_size,
                f"predet.views.crop_size ({self.views.crop_size}) must equal predet.arch.crop_size "
                f"({self.arch.crop_size}): the model's anchors and RoI pooling are set for that input")
        require(self.loss.temperature == self.arch.temperature,
                f"predet.loss.temperature ({self.loss.temperature}) must equal predet.arch.temperature "
                f"({self.arch.temperature})")


@dataclass
class PretrainConfig:
    corpus: str = path_field()
    boxes: str = path_field()       # a `mine` output directory
    classifier: str = path_field()  # the step-1 classifier (backbone init); optional for predet

    output: str = path_field()
    method: str = "dap"
    min_score: float = 0.0
    model: DetectorArch = field(default_factory=lambda: DetectorArch(min_size=(96, 160, 320, 640), max_size=1000,
                                                                     test_size=640))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.008, max_iters=40000, batch_size=2))
    predet: PredetSettings = field(default_factory=PredetSettings)
    workers: trainer.WorkersConfig = field(default_factory=trainer.WorkersConfig)
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        require(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        required = ("corpus", "boxes", "output") + (("classifier",) if self.method == "dap" else ())
        for name in required:
            require(bool(getattr(self, name)), f"{name} is required")
        require(0 <= self.min_score < 1, "min_score must be in [0, 1)")
        for part in (self.model, self.optim, self.workers, self.ray):
            part.validate()
        if self.method == "predet":
            self.predet.validate()
            # InfoNCE at τ = 0.07 on freshly initialised heads diverges within steps unclipped.
            require(bool(self.classifier) or not self.predet.arch.frozen_bn,
                    "method=predet without a classifier trains the ResNet from scratch: set "
                    "predet.arch.frozen_bn=false (frozen BN at its initial statistics normalises nothing)")
            require(self.optim.grad_clip > 0, "method=predet needs optim.grad_clip > 0 (e.g. 10): its "
                    "contrastive loss diverges without gradient clipping")

    @property
    def depth(self) -> int:
        return self.predet.arch.depth if self.method == "predet" else self.model.depth

    def check_paths(self) -> None:
        from pseudobox.datasets.corpus import load_manifest

        storage.check_readable(self.corpus, "corpus")
        manifest = load_manifest(self.corpus)
        storage.check_readable(storage.join(self.boxes, "parts"), "boxes (run `pseudobox mine` first)")
        summary = storage.join(self.boxes, "mining.json")  # written when a mining run finishes
        mined = storage.read_json(summary) if storage.exists(summary) else {}
        source = mined.get("source")
        require(source is None or source in METHOD_SOURCES[self.method],
                f"boxes {self.boxes} were mined with source={source}; method={self.method} trains on "
                f"source={' or '.join(METHOD_SOURCES[self.method])} boxes (run `pseudobox mine "
                f"source={METHOD_SOURCES[self.method][0]}` first)")
        mined_classes = mined.get("classes")
        if mined_classes is not None and self.method == "dap":  # box labels index the mined corpus's classes
            check_same_classes(mined_classes, manifest.classes, f"the boxes {self.boxes}", f"the corpus {self.corpus}",
                               "Pre-train on the corpus the boxes were mined from.", labels=("boxes", "corpus"))
        if self.classifier:
            ckpt = load_checkpoint(self.classifier, expect_type="classifier")
            key = "predet.arch.depth" if self.method == "predet" else "model.depth"
            require(ckpt["arch"]["depth"] == self.depth,
                    f"classifier is ResNet-{ckpt['arch']['depth']}; set {key}={ckpt['arch']['depth']}")
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


def attach_queries(batch: dict, boxes_uri: str, max_queries: int, min_score: float = 0.0) -> dict:
    """CPU stage (``method=predet``): each row's EdgeBox queries (score ≥ min_score, the best
    ``max_queries``, xyxy pixels) as ``queries``; rows without any valid query are dropped."""
    queries, keep = [], []
    for i, (key, shard) in enumerate(zip(batch["key"], batch["shard"])):
        found = _mined_part(boxes_uri, str(shard)).get(str(key))
        if found is None:
            continue
        b, _, s = found
        ok = (s >= min_score) & ((b[:, 2] - b[:, 0]) >= train_detector.MIN_BOX_SIDE) & \
             ((b[:, 3] - b[:, 1]) >= train_detector.MIN_BOX_SIDE)
        b, s = b[ok], s[ok]
        if len(b):
            keep.append(i)
            queries.append(b[np.argsort(-s, kind="stable")[:max_queries]])
    out = {k: v[keep] for k, v in batch.items() if k not in ("boxes", "box_labels")}
    out["queries"] = object_array(queries)
    return out


def run(cfg: PretrainConfig) -> dict:
    from pseudobox.datasets.corpus import load_manifest
    from pseudobox.datasets.ray_io import decoded_corpus

    cfg.check_paths()
    check_same_run(cfg.output, run_fingerprint("pretrain", cfg), appliable=TRAINING_APPLIABLE,
                   defaults=config_defaults(cfg))
    manifest = load_manifest(cfg.corpus)
    init_ray(cfg.ray)
    optim = trainer.scaled_optim(cfg.optim, cfg.workers, "pretrain")
    loop_config = {"optim": to_dict(optim), "class_names": manifest.classes, "method": cfg.method,
                   "init": {"classifier": cfg.classifier} if cfg.classifier else {}, "stage": "pretrain",
                   "seed": cfg.seed, "config": to_dict(cfg), "tensorboard": trainer.tensorboard_uri(cfg.output)}
    if cfg.method == "predet":
        from pseudobox.pipelines import train_predet

        ds = decoded_corpus(cfg.corpus, keep_errors=False, shuffle=True).map_batches(
            attach_queries, fn_kwargs={"boxes_uri": cfg.boxes, "max_queries": cfg.predet.max_queries,
                                       "min_score": cfg.min_score}, batch_format="numpy", num_cpus=1)
        loop_config.update(arch=to_dict(cfg.predet.arch), loss=to_dict(cfg.predet.loss),
                           views=to_dict(cfg.predet.views))
        worker = train_predet.worker
    else:
        ds = decoded_corpus(cfg.corpus, keep_errors=False, shuffle=True).map_batches(
            attach_mined_boxes, fn_kwargs={"boxes_uri": cfg.boxes, "min_score": cfg.min_score},
            batch_format="numpy", num_cpus=1)
        loop_config["arch"] = to_dict(cfg.model)
        worker = train_detector.worker
    result = trainer.fit(worker, loop_config, cfg.output, cfg.workers, {"train": ds})
    return trainer.export_final(result, cfg.output)

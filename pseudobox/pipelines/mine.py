"""Stage ``mine``: pseudo-boxes for every corpus image on a Ray Data actor pool.

``source=cam`` (DAP step 2): CAM boxes from a classifier checkpoint. ``source=teacher``
(offline self-training, DAP Table 9): a trained detector's boxes with flip TTA, kept at
score ≥ ``teacher.score_threshold`` or the top box of each image (``mining/teacher.py``).
``source=edgebox`` (PreDet's queries): class-agnostic EdgeBoxes (``mining/edgeboxes.py``),
label −1; it needs no checkpoint and no image labels (images are decoded without them).

read shards (light tasks) → decode + box source in one autoscaling actor pool (one GPU
per actor when the cluster has GPUs; JPEGs decoded on it) → one parquet part per shard,
written by the driver as each shard completes, then its report (the shard's done-manifest:
part checksum and the identity of the input shard). Re-running skips shards that are done
and redoes those whose input changed (a repaired shard); its settings must equal the first
run's (run.json), except those in ``APPLIABLE``. Samples the manifest promises that produce
no row (a truncated, zero-byte or missing shard) end the run, after everything is written,
with ``outputs.MissingSamplesError`` (exit code 3) unless ``allow_missing``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pseudobox import storage
from pseudobox.config import path_field, require, to_dict
from pseudobox.mining import outputs
from pseudobox.mining.edgeboxes import EdgeBoxesConfig
from pseudobox.mining.teacher import TeacherMiningConfig
from pseudobox.pipelines.common import (
    RayConfig, check_same_classes, check_same_run, config_defaults, init_ray, log, resolve_use_gpu, run_fingerprint,
    run_shard_pool, validate_actor_pool,
)

SOURCES = ("cam", "teacher", "edgebox")
# Settings a re-submission may change (they only place and group the work, never change a
# box); every other one must equal run.json's, since finished shards are kept.
APPLIABLE = ("batch_size", "min_actors", "max_actors", "use_gpu", "gpus_per_actor", "cpus_per_actor", "export_coco", "allow_missing", "ray")


@dataclass
class CamConfig:
    scales: tuple[int, ...] = (288, 576)
    flip: bool = True
    thresholds: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    nms_iou: float = 0.8
    min_component_ratio: float = 0.5
    max_components: int = 4     # per threshold, largest first (the public DAP code's k)
    min_side: float = 1.0       # box sides of at least one CAM cell
    # Backbone forward dtype: auto = bf16 on CUDA (fp16 without bf16) and on CPUs with
    # bf16 units (AVX-512 BF16/AMX), else fp32; fp32 turns it off. CAMs and boxes stay fp32.
    precision: str = "auto"

    def validate(self) -> None:
        require(len(self.scales) > 0 and all(s >= 32 for s in self.scales), "cam.scales must be short sides >= 32")
        require(len(self.thresholds) > 0 and all(0 < t < 1 for t in self.thresholds),
                "cam.thresholds must lie strictly between 0 and 1")
        require(0 < self.nms_iou <= 1, "cam.nms_iou must be in (0, 1]")
        require(0 <= self.min_component_ratio <= 1, "cam.min_component_ratio must be in [0, 1]")
        require(self.max_components >= 1, "cam.max_components must be >= 1")
        require(self.min_side >= 0, "cam.min_side must be >= 0 (CAM cells)")
        require(self.precision in ("auto", "fp32", "bf16", "fp16"),
                f"cam.precision must be one of auto, fp32, bf16, fp16, got {self.precision!r}")


@dataclass
class MineConfig:
    corpus: str = path_field()
    checkpoint: str = path_field()
    output: str = path_field()
    source: str = "cam"
    cam: CamConfig = field(default_factory=CamConfig)              # source=cam
    teacher: TeacherMiningConfig = field(default_factory=TeacherMiningConfig)  # source=teacher
    # source=edgebox. 100 boxes per image, not EdgeBoxes' usual 1,000: PreDet samples 16
    # queries per image from the best ones, and the parts stay small (docs/methods.md).
    edgebox: EdgeBoxesConfig = field(default_factory=lambda: EdgeBoxesConfig(max_boxes=100))
    batch_size: int = 16
    min_actors: int = 1
    max_actors: int = 2
    use_gpu: str = "auto"
    gpus_per_actor: float = 1.0  # with use_gpu; a fraction (0.5) packs several actors on one GPU
    cpus_per_actor: float = 1.0
    export_coco: bool = True
    # Samples the corpus manifest promises that produce no row (truncated, zero-byte or missing
    # shards): false ends the run with exit code 3 after writing everything; true logs a warning.
    allow_missing: bool = False
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        require(self.source in SOURCES, f"source must be one of {SOURCES}, got {self.source!r}")
        needed = ("corpus", "output") if self.source == "edgebox" else ("corpus", "checkpoint", "output")
        for name in needed:
            require(bool(getattr(self, name)), f"{name} is required (e.g. {name}=s3://bucket/path)")
        validate_actor_pool(self)
        self.cam.validate()
        self.teacher.validate()
        self.edgebox.validate()
        self.ray.validate()

    def check_paths(self) -> None:
        """Fail before any Ray work when an input is missing or the output unwritable."""
        from pseudobox.datasets.corpus import load_manifest
        from pseudobox.models.checkpoint import load_checkpoint
        from pseudobox.models.classifier import require_trained_head

        storage.check_readable(self.corpus, "corpus")
        manifest = load_manifest(self.corpus)
        if self.source == "edgebox":  # class-agnostic: no checkpoint, no labels
            storage.check_writable(self.output, "output")
            return
        if self.source == "teacher":  # a trained detector labels the corpus's classes
            ckpt = load_checkpoint(self.checkpoint, expect_type="detector")
            check_same_classes(ckpt["class_names"], manifest.classes, f"the detector {self.checkpoint}",
                               f"the corpus {self.corpus} (corpus.json 'classes')",
                               "Mine with a detector fine-tuned on this corpus's classes (finetune ...).")
            storage.check_writable(self.output, "output")
            return
        ckpt = load_checkpoint(self.checkpoint, expect_type="classifier")
        # Box labels are the classifier's class indices, written as the corpus's names.
        check_same_classes(ckpt["class_names"], manifest.classes, f"the classifier {self.checkpoint}",
                           f"the corpus {self.corpus} (corpus.json 'classes')",
                           "Mine with a classifier trained on this corpus (train-classifier corpus=...).")
        require_trained_head(ckpt, self.checkpoint)  # CAMs from a never-trained fc are noise
        storage.check_writable(self.output, "output")


def run(cfg: MineConfig) -> dict:
    """Mine every pending shard; returns the run summary (also written to mining.json)."""
    from pseudobox.datasets import ray_io
    from pseudobox.datasets.corpus import load_manifest
    from pseudobox.mining.cam import CamBoxMiner
    from pseudobox.mining.edgeboxes import EdgeBoxMiner
    from pseudobox.mining.teacher import TeacherBoxMiner

    cfg.check_paths()
    manifest = load_manifest(cfg.corpus)
    # Resuming is per shard, so all parts of one output must come from one setting.
    check_same_run(cfg.output, run_fingerprint("mine", cfg), appliable=APPLIABLE,
                   defaults=config_defaults(cfg))
    # Each input shard's identity, taken before it is read: a shard changed since it was
    # mined (repaired, replaced) is redone; the others are kept.
    identities = outputs.input_identities(cfg.corpus, [s.name for s in manifest.shards])
    done, pending = outputs.plan_shards(cfg.output, "mine", identities)
    log.info("mine: %d shards, %d already complete, %d to do", len(manifest.shards), len(done), len(pending))
    absent = [s for s in pending if identities[s].get("missing")]
    readable = [s for s in pending if s not in absent]
    expected = {s.name: s.num_samples for s in manifest.shards}
    writer = outputs.ShardPartWriter(cfg.output, expected, cfg.source, inputs=identities)
    started = time.time()
    if readable:
        init_ray(cfg.ray)
        use_gpu = resolve_use_gpu(cfg.use_gpu)
        # Raw rows: each actor decodes its own batches (on its GPU when it has one), and the
        # light read tasks reserve no core the actors need (docs/benchmarks.md, Ray overhead).
        def read(shards):
            return ray_io.read_corpus(cfg.corpus, shards=shards, read_cpus=ray_io.FUSED_READ_CPUS)

        cam = {"checkpoint_uri": cfg.checkpoint, "scales": cfg.cam.scales, "flip": cfg.cam.flip,
               "thresholds": cfg.cam.thresholds, "nms_iou": cfg.cam.nms_iou,
               "min_component_ratio": cfg.cam.min_component_ratio, "max_components": cfg.cam.max_components,
               "min_side": cfg.cam.min_side, "precision": cfg.cam.precision}
        actor, kwargs = {"teacher": (TeacherBoxMiner, cfg.teacher.actor_kwargs(cfg.checkpoint)),
                         "edgebox": (EdgeBoxMiner, {"config": to_dict(cfg.edgebox)}),
                         "cam": (CamBoxMiner, cam)}[cfg.source]
        # EdgeBoxes read only pixels: decoding without labels lets unlabelled corpora through.
        run_shard_pool(read(readable), actor, kwargs, cfg, use_gpu, writer, "mine", {s: expected[s] for s in readable},
                       decode={"classes": manifest.classes, "labelled": cfg.source != "edgebox"}, reread=read)
        writer.write_unread(readable)  # a read that yielded no row at all
    writer.write_unread(absent, "missing_shard")
    reports = outputs.load_reports(cfg.output)
    summary = outputs.summarize(reports)
    summary.update({"corpus": cfg.corpus, "checkpoint": cfg.checkpoint, "source": cfg.source,
                    "classes": manifest.classes, "config": to_dict(cfg),
                    "seconds_this_run": time.time() - started, "shards_this_run": len(pending),
                    "missing_samples": outputs.missing_samples(reports)})
    storage.write_json(storage.join(cfg.output, "mining.json"), summary)
    if cfg.export_coco and cfg.source == "edgebox":  # label −1 has no COCO category
        log.info("mine: no COCO export for source=edgebox (class-agnostic boxes); the parts hold them")
    elif cfg.export_coco:
        outputs.export_coco(cfg.output, manifest.classes, storage.join(cfg.output, "pseudo_boxes.coco.json"))
    if summary["corloc"] is not None:
        log.info("mine: CorLoc %.1f%%, box recall@0.5 %.1f%%, %.2f boxes/image",
                 summary["corloc"], summary["recall50"], summary["boxes_per_image"])
    outputs.check_missing(reports, "mine", cfg.allow_missing)  # last: everything above is written
    return summary

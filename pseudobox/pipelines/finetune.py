"""Stage ``finetune`` (DAP step 4): a detector on labelled downstream data.

Initialisation, by ``init``:
  * ``detector``: from a pre-training checkpoint; the class layers are always re-initialised,
    unless ``keep_class_layers`` and the checkpoint has the same class names in order. A
    PreDet pre-training (``pretrain method=predet``) gives its backbone, FPN and, for
    Faster R-CNN, its RPN trunk; every head starts random;
  * ``backbone``: the ResNet of a detector checkpoint of any kind (a Faster R-CNN DAP
    pre-training for an FCOS or RetinaNet); FPN and heads start random;
  * ``classifier``: the CLS baseline, backbone only;
  * ``random``.
Training data is a detection corpus, optionally restricted to a split file (k-shot).
With ``pseudo_boxes`` (a ``mine source=teacher`` output; offline self-training, DAP
Table 9) the images it mined are trained on too, with their teacher boxes: on the
training corpus itself, the split's labeled keys keep their ground truth and every other
image takes its mined boxes (a split is then required); mined from another corpus (VOC
style set B), those images are added to the labeled ones.
After training, the driver evaluates on ``eval_corpus`` and writes ``metrics.json``.
With ``eval_every`` N, rank 0 also evaluates on ``eval_corpus`` every N steps during
training (history rows ``eval/<metric>``, TensorBoard) and keeps the best weights by
``best_metric`` as ``<output>/model_best.pt`` next to the last ``model.pt``; the last
step's evaluation is then ``metrics.json`` (no second evaluation in the driver).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pseudobox import storage
from pseudobox.config import path_field, require, to_dict
from pseudobox.engine import OptimConfig
from pseudobox.models.checkpoint import load_checkpoint
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import evaluate, train_detector, trainer
from pseudobox.pipelines.common import (
    TRAINING_APPLIABLE, RayConfig, check_same_classes, check_same_run, config_defaults, init_ray, log, run_fingerprint,
)

INITS = ("detector", "backbone", "classifier", "random")
# What evaluate_detector returns that best_metric may name (percent, higher is better).
EVAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "VOC_AP50", "VOC_AP50_07")
# A re-submission may also change what happens after training (the evaluation set,
# whether the training set is cached) and how often it evaluates during training.
APPLIABLE = TRAINING_APPLIABLE + ("eval_corpus", "cache_dataset", "eval_every")


@dataclass
class FinetuneConfig:
    corpus: str = path_field()
    split: str = path_field()        # optional JSON with "keys" (see `pseudobox split`)
    pseudo_boxes: str = path_field()  # optional `mine source=teacher` output: self-training on its boxes
    init: str = "detector"
    checkpoint: str = path_field()   # the pre-trained detector or the classifier, by `init`
    output: str = path_field()
    eval_corpus: str = path_field()  # evaluated after training when set
    model: DetectorArch = field(default_factory=lambda: DetectorArch(min_size=(480, 512, 544, 576, 608, 640),
                                                                     max_size=1000, test_size=640))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01, max_iters=5000, batch_size=2))
    keep_class_layers: bool = False  # init=detector: keep the checkpoint's class layers (identical classes only)
    eval_every: int = 0  # N: evaluate on eval_corpus every N steps (rank 0) and keep model_best.pt; 0 = off
    best_metric: str = "AP"  # which evaluation metric picks model_best.pt (one of EVAL_METRICS)
    cache_dataset: bool = True  # small labelled sets: decode once, keep in the object store
    workers: trainer.WorkersConfig = field(default_factory=trainer.WorkersConfig)
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        require(bool(self.corpus) and bool(self.output), "corpus and output are required")
        require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        require(self.init == "random" or bool(self.checkpoint), f"init={self.init} needs checkpoint=URI")
        require(not self.keep_class_layers or self.init == "detector", "keep_class_layers applies to init=detector only")
        require(self.eval_every >= 0, "eval_every must be >= 0 (0: no evaluation during training)")
        require(self.eval_every == 0 or bool(self.eval_corpus), "eval_every needs eval_corpus=URI (the held-out set)")
        require(self.best_metric in EVAL_METRICS,
                f"best_metric must be one of {EVAL_METRICS}, got {self.best_metric!r}")
        for part in (self.model, self.optim, self.workers, self.ray):
            part.validate()

    def check_paths(self) -> None:
        from pseudobox.datasets.corpus import load_manifest

        storage.check_readable(self.corpus, "corpus")
        manifest = load_manifest(self.corpus)
        if self.split:
            storage.check_readable(self.split, "split")
        if self.pseudo_boxes:
            self.check_pseudo_boxes(manifest.classes)
        if self.eval_corpus:
            storage.check_readable(self.eval_corpus, "eval_corpus")
            # The detector learns the training corpus's classes; evaluation reads them by index.
            check_same_classes(load_manifest(self.eval_corpus).classes, manifest.classes,
                               f"eval_corpus {self.eval_corpus}", f"the training corpus {self.corpus}",
                               "Evaluate on a corpus of the training classes (same names, same order), "
                               "or leave eval_corpus empty.", labels=("eval_corpus", "corpus"))
        ckpt = check_init_checkpoint(self.init, self.checkpoint, self.model)
        if ckpt is not None and self.init == "detector" and self.keep_class_layers:
            require(ckpt["model_type"] == "detector", "keep_class_layers needs a detector checkpoint; a PreDet "
                    "pre-training has no class layers to keep")
            from pseudobox.models.detectors import check_keep_class_layers

            check_keep_class_layers(ckpt["class_names"], manifest.classes)
        storage.check_writable(self.output, "output")


    def check_pseudo_boxes(self, classes: list[str]) -> None:
        """``pseudo_boxes`` must be a finished mining run of this corpus's classes, with parts."""
        from pseudobox.mining.outputs import done_shards

        summary_uri = storage.join(self.pseudo_boxes, "mining.json")
        require(storage.exists(summary_uri) and bool(done_shards(self.pseudo_boxes)),
                f"pseudo_boxes: {self.pseudo_boxes} has no finished mining run (mining.json and parts/*.parquet); "
                "run `pseudobox mine source=teacher` on the unlabeled images first")
        summary = storage.read_json(summary_uri)
        check_same_classes(summary.get("classes") or [], classes, f"the pseudo-boxes {self.pseudo_boxes}",
                           f"the training corpus {self.corpus}", "Mine with a detector of the training classes.",
                           labels=("pseudo_boxes", "corpus"))
        mined_corpus = summary.get("corpus", "")
        require(not same_uri(mined_corpus, self.corpus) or bool(self.split),
                f"pseudo_boxes were mined from the training corpus {self.corpus}: set split=FILE, whose keys keep "
                "their ground truth (without a split every image is labeled and no pseudo-box is used)")
        storage.check_readable(mined_corpus, f"the corpus pseudo_boxes were mined from ({summary_uri})")


def same_uri(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def training_dataset(cfg: FinetuneConfig, keys: set[str] | None):
    """The training images: the corpus (its split's keys), plus with ``pseudo_boxes`` the
    images that mining labeled (``mining.teacher.join_pseudo_boxes``)."""
    from pseudobox.datasets.ray_io import decoded_corpus
    from pseudobox.mining.teacher import join_pseudo_boxes

    if not cfg.pseudo_boxes:
        return decoded_corpus(cfg.corpus, keep_errors=False, keys=keys, shuffle=True).map_batches(
            train_detector.drop_images_without_boxes, batch_format="numpy", num_cpus=1)
    mined_corpus = storage.read_json(storage.join(cfg.pseudo_boxes, "mining.json"))["corpus"]
    if same_uri(mined_corpus, cfg.corpus):  # one stream: labeled keys keep GT, the rest take mined boxes
        return decoded_corpus(cfg.corpus, keep_errors=False, shuffle=True).map_batches(
            join_pseudo_boxes, fn_kwargs={"boxes_uri": cfg.pseudo_boxes, "labeled_keys": frozenset(keys or ())},
            batch_format="numpy", num_cpus=1)
    labeled = decoded_corpus(cfg.corpus, keep_errors=False, keys=keys, shuffle=True).map_batches(
        train_detector.drop_images_without_boxes, batch_format="numpy", num_cpus=1)
    pseudo = decoded_corpus(mined_corpus, keep_errors=False, shuffle=True).map_batches(
        join_pseudo_boxes, fn_kwargs={"boxes_uri": cfg.pseudo_boxes}, batch_format="numpy", num_cpus=1)
    return labeled.union(pseudo)


def check_init_checkpoint(init: str, checkpoint: str, model: DetectorArch) -> dict | None:
    """The ``init`` checkpoint (None for random), refused before Ray unless it fits ``model``:
    the same ResNet depth, and for a detector the same detector kind."""
    if init == "random":
        return None
    ckpt = load_checkpoint(checkpoint, expect_type=train_detector.DETECTOR_INIT_TYPES if init == "detector" else
                           "detector" if init == "backbone" else init)
    predet = ckpt["model_type"] == "predet"
    arch = ckpt["arch"]
    require(arch.get("depth") == model.depth,
            f"the {init} checkpoint is ResNet-{arch.get('depth')}; set model.depth={arch.get('depth')}")
    require(init != "detector" or predet or arch.get("detector") == model.detector,
            f"the checkpoint is a {arch.get('detector')} and this run builds a {model.detector}: set "
            f"model.detector={arch.get('detector')}, or take its ResNet only with init=backbone")
    return ckpt


def last_step_metrics(ckpt: dict) -> dict | None:
    """The metrics of the checkpoint's own step when the worker evaluated it (``eval/*`` keys of
    its history row, prefix dropped), else None."""
    for row in reversed(ckpt.get("history") or []):
        if any(k.startswith("eval/") for k in row):
            if row.get("step") != ckpt.get("step"):
                return None
            return {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
    return None


def run(cfg: FinetuneConfig) -> dict:
    from pseudobox.datasets.corpus import load_manifest

    cfg.check_paths()
    check_same_run(cfg.output, run_fingerprint("finetune", cfg), appliable=APPLIABLE,
                   defaults=config_defaults(cfg))
    manifest = load_manifest(cfg.corpus)
    keys = evaluate.read_split_keys(cfg.split) if cfg.split else None
    init_ray(cfg.ray)
    ds = training_dataset(cfg, keys)
    if cfg.cache_dataset and not cfg.pseudo_boxes:  # an unlabeled corpus streams: too big to cache
        ds = ds.materialize()
        log.info("finetune: %d training images", ds.count())
    init = {cfg.init: cfg.checkpoint} if cfg.init != "random" else {}
    if cfg.init == "detector":
        init["keep_class_layers"] = cfg.keep_class_layers
    optim = trainer.scaled_optim(cfg.optim, cfg.workers, "finetune")
    loop_config = {"arch": to_dict(cfg.model), "optim": to_dict(optim), "class_names": manifest.classes,
                   "init": init,
                   "method": f"finetune-from-{cfg.init}", "stage": "finetune", "seed": cfg.seed,
                   "config": to_dict(cfg), "tensorboard": trainer.tensorboard_uri(cfg.output)}
    if cfg.eval_every:
        loop_config["eval"] = {"every": cfg.eval_every, "corpus": cfg.eval_corpus, "metric": cfg.best_metric,
                               "best": storage.join(cfg.output, train_detector.BEST_MODEL_FILE)}
    result = trainer.fit(train_detector.worker, loop_config, cfg.output, cfg.workers, {"train": ds})
    ckpt = trainer.export_final(result, cfg.output)
    best_uri = storage.join(cfg.output, train_detector.BEST_MODEL_FILE)
    best = None
    if cfg.eval_every and storage.exists(best_uri):
        best = load_checkpoint(best_uri, expect_type="detector").get("best")
    if best:
        ckpt["best"] = best
        log.info("finetune: best %s %.2f at step %d → %s", best["metric"], best["value"], best["step"], best_uri)
    metrics = last_step_metrics(ckpt) if cfg.eval_every else None
    if metrics is not None:
        storage.write_json(storage.join(cfg.output, "metrics.json"), metrics)
        ckpt["metrics"] = metrics
    elif cfg.eval_corpus:
        metrics = evaluate.run(evaluate.EvaluateConfig(checkpoint=storage.join(cfg.output, "model.pt"),
                                                       corpus=cfg.eval_corpus,
                                                       output=storage.join(cfg.output, "metrics.json")))
        ckpt["metrics"] = metrics
    return ckpt

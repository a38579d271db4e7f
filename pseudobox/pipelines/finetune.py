"""Stage ``finetune`` (DAP step 4): a detector on labelled downstream data.

Initialisation, by ``init``:
  * ``detector``: from a pre-training checkpoint; the class layers are always re-initialised,
    unless ``keep_class_layers`` and the checkpoint has the same class names in order;
  * ``classifier``: the CLS baseline, backbone only;
  * ``random``.
Training data is a detection corpus, optionally restricted to a split file (k-shot).
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

INITS = ("detector", "classifier", "random")
# What evaluate_detector returns that best_metric may name (percent, higher is better).
EVAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "VOC_AP50", "VOC_AP50_07")
# A re-submission may also change what happens after training (the evaluation set,
# whether the training set is cached) and how often it evaluates during training.
APPLIABLE = TRAINING_APPLIABLE + ("eval_corpus", "cache_dataset", "eval_every")


@dataclass
class FinetuneConfig:
    corpus: str = path_field()
    split: str = path_field()        # optional JSON with "keys" (see `pseudobox split`)
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
        if self.eval_corpus:
            storage.check_readable(self.eval_corpus, "eval_corpus")
            # The detector learns the training corpus's classes; evaluation reads them by index.
            check_same_classes(load_manifest(self.eval_corpus).classes, manifest.classes,
                               f"eval_corpus {self.eval_corpus}", f"the training corpus {self.corpus}",
                               "Evaluate on a corpus of the training classes (same names, same order), "
                               "or leave eval_corpus empty.", labels=("eval_corpus", "corpus"))
        if self.init != "random":
            ckpt = load_checkpoint(self.checkpoint, expect_type=self.init)
            arch = ckpt["arch"]
            require(arch.get("depth") == self.model.depth,
                    f"the {self.init} checkpoint is ResNet-{arch.get('depth')}; set model.depth={arch.get('depth')}")
            if self.init == "detector":
                require(arch.get("detector") == self.model.detector,
                        f"the checkpoint is a {arch.get('detector')}; set model.detector={arch.get('detector')}")
                if self.keep_class_layers:
                    from pseudobox.models.detectors import check_keep_class_layers

                    check_keep_class_layers(ckpt["class_names"], manifest.classes)
        storage.check_writable(self.output, "output")


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
    from pseudobox.datasets.ray_io import decoded_corpus

    cfg.check_paths()
    check_same_run(cfg.output, run_fingerprint("finetune", cfg), appliable=APPLIABLE,
                   defaults=config_defaults(cfg))
    manifest = load_manifest(cfg.corpus)
    keys = evaluate.read_split_keys(cfg.split) if cfg.split else None
    init_ray(cfg.ray)
    ds = decoded_corpus(cfg.corpus, keep_errors=False, keys=keys, shuffle=True).map_batches(
        train_detector.drop_images_without_boxes, batch_format="numpy", num_cpus=1)
    if cfg.cache_dataset:
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

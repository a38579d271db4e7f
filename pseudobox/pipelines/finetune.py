"""Stage ``finetune`` (DAP step 4): a detector on labelled downstream data.

Initialisation, by ``init``:
  * ``detector``: from a pre-training checkpoint; only class-count layers are re-initialised;
  * ``classifier``: the CLS baseline, backbone only;
  * ``random``.
Training data is a detection corpus, optionally restricted to a split file (k-shot).
After training, the driver evaluates on ``eval_corpus`` and writes ``metrics.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pseudobox import storage
from pseudobox.config import require, to_dict
from pseudobox.engine import OptimConfig
from pseudobox.models.checkpoint import load_checkpoint
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import evaluate, train_detector, trainer
from pseudobox.pipelines.common import RayConfig, check_same_run, init_ray, log

INITS = ("detector", "classifier", "random")


@dataclass
class FinetuneConfig:
    corpus: str = ""
    split: str = ""        # optional JSON with "keys" (see `pseudobox split`)
    init: str = "detector"
    checkpoint: str = ""   # the pre-trained detector or the classifier, by `init`
    output: str = ""
    eval_corpus: str = ""  # evaluated after training when set
    model: DetectorArch = field(default_factory=lambda: DetectorArch(min_size=(480, 512, 544, 576, 608, 640),
                                                                     max_size=1000, test_size=640))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01, max_iters=5000, batch_size=2))
    cache_dataset: bool = True  # small labelled sets: decode once, keep in the object store
    workers: trainer.WorkersConfig = field(default_factory=trainer.WorkersConfig)
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        require(bool(self.corpus) and bool(self.output), "corpus and output are required")
        require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        require(self.init == "random" or bool(self.checkpoint), f"init={self.init} needs checkpoint=URI")
        for part in (self.model, self.optim, self.workers, self.ray):
            part.validate()

    def check_paths(self) -> None:
        from pseudobox.datasets.corpus import load_manifest

        storage.check_readable(self.corpus, "corpus")
        load_manifest(self.corpus)
        if self.split:
            storage.check_readable(self.split, "split")
        if self.eval_corpus:
            storage.check_readable(self.eval_corpus, "eval_corpus")
            load_manifest(self.eval_corpus)
        if self.init != "random":
            ckpt = load_checkpoint(self.checkpoint, expect_type=self.init)
            arch = ckpt["arch"]
            require(arch.get("depth") == self.model.depth,
                    f"the {self.init} checkpoint is ResNet-{arch.get('depth')}; set model.depth={arch.get('depth')}")
            if self.init == "detector":
                require(arch.get("detector") == self.model.detector,
                        f"the checkpoint is a {arch.get('detector')}; set model.detector={arch.get('detector')}")
        storage.check_writable(self.output, "output")


def run(cfg: FinetuneConfig) -> dict:
    from pseudobox.datasets.corpus import load_manifest
    from pseudobox.datasets.ray_io import decoded_corpus

    cfg.check_paths()
    check_same_run(cfg.output, {"stage": "finetune", "corpus": cfg.corpus, "split": cfg.split, "init": cfg.init,
                                "checkpoint": cfg.checkpoint, "model": to_dict(cfg.model)})
    manifest = load_manifest(cfg.corpus)
    keys = evaluate.read_split_keys(cfg.split) if cfg.split else None
    init_ray(cfg.ray)
    ds = decoded_corpus(cfg.corpus, keep_errors=False, keys=keys, shuffle=True).map_batches(
        train_detector.drop_images_without_boxes, batch_format="numpy", num_cpus=1)
    if cfg.cache_dataset:
        ds = ds.materialize()
        log.info("finetune: %d training images", ds.count())
    loop_config = {"arch": to_dict(cfg.model), "optim": to_dict(cfg.optim), "class_names": manifest.classes,
                   "init": {cfg.init: cfg.checkpoint} if cfg.init != "random" else {},
                   "method": f"finetune-from-{cfg.init}", "stage": "finetune", "seed": cfg.seed,
                   "config": to_dict(cfg)}
    result = trainer.fit(train_detector.worker, loop_config, cfg.output, cfg.workers, {"train": ds})
    ckpt = trainer.export_final(result, cfg.output)
    if cfg.eval_corpus:
        metrics = evaluate.run(evaluate.EvaluateConfig(checkpoint=storage.join(cfg.output, "model.pt"),
                                                       corpus=cfg.eval_corpus,
                                                       output=storage.join(cfg.output, "metrics.json")))
        ckpt["metrics"] = metrics
    return ckpt

"""Stage ``finetune-ssod``: semi-supervised fine-tuning with a teacher and a student.

Two Ray Data streams feed the Ray Train (DDP) workers: the labelled images (a corpus,
optionally restricted to a split's keys) and the unlabelled ones (``unlabeled_corpus``, or
the same corpus minus the labelled keys), mixed per step at ``ssod.unlabeled_ratio``
unlabelled images per labelled one. Every method runs in ``engine.train_loop``: the
method's loss is its ``loss_fn``, the EMA teacher update its ``after_step`` hook
(``ssod/methods.py``). Initialisation is ``finetune``'s: a DAP or other detector
checkpoint, a classifier, or random.

A checkpoint holds the student, the teacher, the optimizer, the step and the method's
state, so a run resumes after a worker failure or on re-submission with its teacher
intact (the restored teacher's digest is recorded in ``resumes``). ``model.pt`` is the
teacher (``export=teacher``, the better model in the Unbiased Teacher papers) or the
student; the other one is ``model_student.pt`` / ``model_teacher.pt``. Both are plain
detector checkpoints that ``evaluate``, ``predict`` and ``finetune`` accept.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from pseudobox import storage
from pseudobox.config import from_dict, path_field, require, to_dict
from pseudobox.engine import OptimConfig, WorkerCheckpointer, build_optimizer, build_scheduler, run_init, train_loop
from pseudobox.models.checkpoint import MODEL_FILE, make_checkpoint, save_checkpoint
from pseudobox.models.detectors import (
    DetectorArch, DetectorForward, build_detector, detector_images, inner_detector,
)
from pseudobox.pipelines import evaluate, train_detector, trainer
from pseudobox.pipelines.common import (
    TRAINING_APPLIABLE, RayConfig, check_same_classes, check_same_run, config_defaults, init_ray, log, run_fingerprint,
)
from pseudobox.pipelines.finetune import INITS, check_init_checkpoint
from pseudobox.ssod.augment import strong_view, weak_view
from pseudobox.ssod.methods import METHODS, SemiSupervisedLoss, SsodConfig, detector_targets
from pseudobox.ssod.teacher import EmaTeacher

EXPORTS = ("teacher", "student")
APPLIABLE = TRAINING_APPLIABLE + ("eval_corpus", "eval_every", "cache_labeled")


@dataclass
class FinetuneSsodConfig:
    corpus: str = path_field()            # the labelled detection corpus
    split: str = path_field()             # optional: the labelled keys ("keys"; "unlabeled_keys" if recorded)
    unlabeled_corpus: str = path_field()  # empty: the corpus minus the labelled keys
    method: str = "mean-teacher"          # one of METHODS
    init: str = "detector"
    checkpoint: str = path_field()        # the pre-trained detector or the classifier, by `init`
    output: str = path_field()
    eval_corpus: str = path_field()
    eval_every: int = 0                   # N: evaluate student and teacher every N steps and at the end
    export: str = "teacher"               # what model.pt holds: the teacher or the student
    model: DetectorArch = field(default_factory=lambda: DetectorArch(
        detector="auto", min_size=(480, 512, 544, 576, 608, 640), max_size=1000, test_size=640))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01, max_iters=5000, batch_size=2))
    ssod: SsodConfig = field(default_factory=SsodConfig)
    cache_labeled: bool = True            # small labelled sets: decode once, keep in the object store
    workers: trainer.WorkersConfig = field(default_factory=trainer.WorkersConfig)
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        require(bool(self.corpus) and bool(self.output), "corpus and output are required")
        require(self.method in METHODS, f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        require(self.init == "random" or bool(self.checkpoint), f"init={self.init} needs checkpoint=URI")
        require(self.export in EXPORTS, f"export must be one of {EXPORTS}, got {self.export!r}")
        require(self.eval_every >= 0, "eval_every must be >= 0 (0: evaluate at the end only)")
        require(self.eval_every == 0 or bool(self.eval_corpus), "eval_every needs eval_corpus=URI (the held-out set)")
        wanted = METHODS[self.method].detector
        if self.model.detector == "auto":
            self.model.detector = wanted or "faster_rcnn"
        require(wanted is None or self.model.detector == wanted,
                f"method {self.method} trains a {wanted} detector: set model.detector={wanted} (or auto)")
        require(not (self.method == "dense-teacher" and self.ssod.strong.geometric),
                "dense-teacher compares teacher and student position by position: set ssod.strong.geometric=false")
        for part in (self.model, self.optim, self.ssod, self.workers, self.ray):
            part.validate()

    def check_paths(self) -> None:
        from pseudobox.datasets.corpus import load_manifest

        storage.check_readable(self.corpus, "corpus")
        manifest = load_manifest(self.corpus)
        if self.split:
            storage.check_readable(self.split, "split")
        for key in ("unlabeled_corpus", "eval_corpus"):
            uri = getattr(self, key)
            if uri:
                storage.check_readable(uri, key)
                check_same_classes(load_manifest(uri).classes, manifest.classes, f"{key} {uri}",
                                   f"the labelled corpus {self.corpus}",
                                   "Use corpora of the same classes (same names, same order).",
                                   labels=(key, "corpus"))
        check_init_checkpoint(self.init, self.checkpoint, self.model)
        storage.check_writable(self.output, "output")


def labelled_and_unlabelled_keys(cfg: FinetuneSsodConfig) -> tuple[set[str] | None, set[str] | None, set[str] | None]:
    """``(labelled keys, unlabelled keys, keys to exclude from the unlabelled stream)``; None: no filter.

    A split that records ``unlabeled_keys`` gives them; otherwise the unlabelled stream of the
    same corpus is every image but the labelled ones."""
    if not cfg.split:
        require(bool(cfg.unlabeled_corpus) or cfg.method == "supervised",
                "without split=..., every image of corpus is labelled: give unlabeled_corpus=URI")
        return None, None, None
    split = storage.read_json(cfg.split)
    labelled = set(split["keys"])
    if cfg.unlabeled_corpus:
        return labelled, None, None
    if split.get("unlabeled_keys") is not None:
        return labelled, set(split["unlabeled_keys"]), None
    return labelled, None, labelled


def state_digest(state: dict) -> str:
    """A short SHA-256 of a state dict's tensors (names, dtypes, shapes, bytes), for the logs."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def labelled_batch(batch: dict, device, generator: torch.Generator, cfg: SsodConfig):
    """Numpy labelled batch → (images, targets): the weak view (flip), then the strong one;
    GT boxes follow both views' geometry."""
    images, targets = [], []
    for k, image in enumerate(detector_images(batch["image"], device)):
        boxes = torch.as_tensor(np.asarray(batch["boxes"][k], np.float32).reshape(-1, 4), device=device)
        labels = torch.as_tensor(np.asarray(batch["box_labels"][k], np.int64), device=device)
        weak, weak_geometry = weak_view(image, generator, cfg.flip_prob)
        strong, strong_geometry = strong_view(weak, cfg.strong, generator)
        boxes, keep = strong_geometry.map_boxes_with_keep(weak_geometry.map_boxes(boxes))
        images.append(strong)
        targets.append(detector_targets(boxes[keep], labels[keep]))
    return images, targets


def unlabelled_batch(batch: dict, device, generator: torch.Generator, cfg: SsodConfig):
    """Numpy unlabelled batch → (weak views, GT in the weak views' frame or None). GT, when
    the corpus has it, only measures the pseudo-labels; it never trains."""
    weak_images, gt = [], []
    has_gt = "boxes" in batch and any(len(np.asarray(b).reshape(-1, 4)) for b in batch["boxes"])
    for k, image in enumerate(detector_images(batch["image"], device)):
        weak, geometry = weak_view(image, generator, cfg.flip_prob)
        weak_images.append(weak)
        if has_gt:
            boxes = torch.as_tensor(np.asarray(batch["boxes"][k], np.float32).reshape(-1, 4), device=device)
            gt.append({"boxes": geometry.map_boxes(boxes),
                       "labels": torch.as_tensor(np.asarray(batch["box_labels"][k], np.int64), device=device)})
    return weak_images, (gt if has_gt else None)


def endless(factory, name: str):
    """Batches from ``factory()`` epoch after epoch (the labelled set is small and repeats
    many times per pass over the unlabelled one)."""
    while True:
        seen = 0
        for batch in factory():
            seen += 1
            yield batch
        if seen == 0:
            raise RuntimeError(f"the {name} data stream yielded no batches: check the corpus, split and keys")


def evaluate_both(corpus: str, class_names: list[str], test_size: int, device, teacher: EmaTeacher | None):
    """eval_fn: COCO + VOC metrics of the student and the teacher (``student/<m>``, ``teacher/<m>``)."""
    def run(step: int, model) -> dict:
        metrics = {}
        models = {"student": inner_detector(model), **({"teacher": teacher.module} if teacher else {})}
        for name, detector in models.items():
            result = train_detector.evaluate_during_training(detector, corpus, class_names, test_size, device)
            metrics.update({f"{name}/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        if teacher is not None:
            teacher.module.eval()
        log.info("step %d: %s", step, "  ".join(f"{k} {metrics[k]:.2f}" for k in metrics if k.endswith("/AP")))
        return metrics
    return run


def worker(config: dict, local_dir: str | None = None, batches=None) -> list:
    """One DDP worker of the semi-supervised stage (inside Ray Train unless ``local_dir``)."""
    arch = from_dict(DetectorArch, config["arch"])
    optim = from_dict(OptimConfig, config["optim"])
    ssod = from_dict(SsodConfig, config["ssod"])
    class_names = config["class_names"]
    device = trainer.worker_device(config.get("use_gpu", False), config.get("threads", 1))
    detector = build_detector(arch, len(class_names))
    checkpointer = WorkerCheckpointer(local_dir)
    restored = checkpointer.restore()
    # After a restore: the run's own init, as its first checkpoint recorded it.
    init_info = run_init(restored, lambda: train_detector.initialise(detector, arch, config["init"], class_names))
    if restored is not None:
        detector.load_state_dict(restored["model_state"])
    detector.to(device)
    student = DetectorForward(detector)
    method = METHODS[config["method"]](ssod)
    teacher = EmaTeacher(detector, ssod.burn_in_iters, ssod.ema_momentum, ssod.unsup_ramp_iters,
                         ssod.copy_iters) if method.uses_teacher else None
    optimizer = build_optimizer(student, optim)
    scheduler = build_scheduler(optimizer, optim)
    start_step, history, resumes = 0, [], []
    generator = torch.Generator().manual_seed(config.get("seed", 0) * 1000 + checkpointer.rank)
    loss = SemiSupervisedLoss(method, teacher, class_names, start_step, generator)
    if restored is not None:
        optimizer.load_state_dict(restored["optimizer_state"])
        scheduler.load_state_dict(restored["scheduler_state"])
        loss.load_state_dict(restored["ssod_state"])
        start_step, history = restored["step"], restored.get("history", [])
        resumes = restored.get("resumes", [])
        loss.step = start_step
        generator.manual_seed(config.get("seed", 0) * 1000 + checkpointer.rank + 7919 * start_step)
        resumes = resumes + [{"step": start_step, "student": state_digest(detector.state_dict()),
                              "teacher": state_digest(teacher.module.state_dict()) if teacher else None}]
        if checkpointer.rank == 0:
            log.info("finetune-ssod: resumed at step %d (teacher %s)", start_step, resumes[-1]["teacher"])
    model = trainer.prepare(student, in_ray=local_dir is None)
    if batches is None:
        labelled = endless(trainer.dataset_batches("labeled", optim.batch_size), "labelled")
        unlabelled = (endless(trainer.dataset_batches("unlabeled", optim.batch_size * ssod.unlabeled_ratio),
                              "unlabelled") if method.uses_teacher else None)

        def batches():
            while True:
                pair = {"labeled": labelled_batch(next(labelled), device, generator, ssod), "unlabeled": None}
                if unlabelled is not None and teacher.active(loss.step):
                    pair["unlabeled"] = unlabelled_batch(next(unlabelled), device, generator, ssod)
                yield pair

    def export_state(which: str) -> dict:
        return teacher.module.state_dict() if which == "teacher" and teacher else detector.state_dict()

    def make_ckpt(step, hist):
        return make_checkpoint("detector", config["arch"], class_names, detector.state_dict(),
                               optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                               ssod_state=loss.state_dict(), step=step, history=hist, resumes=resumes,
                               init=init_info, method=config["method"], stage="finetune-ssod",
                               config=config["config"])

    eval_cfg = config.get("eval") or {}
    eval_every = int(eval_cfg.get("every", 0))
    eval_fn = None
    if eval_every and checkpointer.rank == 0:
        eval_fn = evaluate_both(eval_cfg["corpus"], class_names, arch.test_size, device, teacher)
    return train_loop(model, optimizer, scheduler, optim, batches, loss, make_ckpt, checkpointer,
                      start_step=start_step, history=history, device=device, stage="finetune-ssod",
                      tensorboard=config.get("tensorboard", ""), eval_every=eval_every, eval_fn=eval_fn,
                      after_step=loss.after_step, row_metrics=loss.metrics)


def export_models(result, output: str, export: str) -> tuple[dict, dict[str, str]]:
    """``model.pt`` = the chosen model (teacher or student), ``model_<other>.pt`` = the other;
    plain detector checkpoints without optimizer or teacher-student state. ``supervised``
    has no teacher: ``model.pt`` is its student, alone. Returns the chosen checkpoint and
    ``{"teacher" | "student": uri}`` of the files written, ``model.pt``'s first."""
    import os

    from pseudobox.models.checkpoint import read_checkpoint_file

    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint under {output}")
    with result.checkpoint.as_directory() as d:
        ckpt = read_checkpoint_file(os.path.join(d, MODEL_FILE))
    ssod_state = ckpt.pop("ssod_state", None) or {}
    for key in ("optimizer_state", "scheduler_state"):
        ckpt.pop(key, None)
    weights = {"student": ckpt["model_state"]}
    teacher_state = (ssod_state.get("teacher") or {}).get("model_state")
    if teacher_state is not None:
        weights["teacher"] = teacher_state
    chosen = export if export in weights else "student"
    files = {chosen: storage.join(output, MODEL_FILE)}
    files.update({other: storage.join(output, f"model_{other}.pt") for other in weights if other != chosen})
    for which, uri in files.items():
        save_checkpoint({**ckpt, "model_state": weights[which], "exported": which}, uri)
    return {**ckpt, "model_state": weights[chosen], "exported": chosen}, files


def run(cfg: FinetuneSsodConfig) -> dict:
    from pseudobox.datasets.corpus import load_manifest
    from pseudobox.datasets.ray_io import decoded_corpus

    cfg.check_paths()
    check_same_run(cfg.output, run_fingerprint("finetune-ssod", cfg), appliable=APPLIABLE,
                   defaults=config_defaults(cfg))
    manifest = load_manifest(cfg.corpus)
    labelled_keys, unlabelled_keys, excluded = labelled_and_unlabelled_keys(cfg)
    method = METHODS[cfg.method]
    init_ray(cfg.ray)
    labelled = decoded_corpus(cfg.corpus, keep_errors=False, keys=labelled_keys, shuffle=True).map_batches(
        train_detector.drop_images_without_boxes, batch_format="numpy", num_cpus=1)
    if cfg.cache_labeled:
        labelled = labelled.materialize()
        log.info("finetune-ssod: %d labelled images", labelled.count())
    datasets = {"labeled": labelled}
    if method.uses_teacher:
        datasets["unlabeled"] = decoded_corpus(cfg.unlabeled_corpus or cfg.corpus, keep_errors=False,
                                               keys=unlabelled_keys, exclude_keys=excluded, shuffle=True)
    init = {cfg.init: cfg.checkpoint} if cfg.init != "random" else {}
    optim = trainer.scaled_optim(cfg.optim, cfg.workers, "finetune-ssod")
    if method.uses_teacher:
        log.info("finetune-ssod: method %s on %s, %d unlabelled per labelled image, burn-in %d steps",
                 cfg.method, cfg.model.detector, cfg.ssod.unlabeled_ratio, cfg.ssod.burn_in_iters)
    else:
        log.info("finetune-ssod: method supervised on %s: labelled images only", cfg.model.detector)
    loop_config = {"arch": to_dict(cfg.model), "optim": to_dict(optim), "ssod": to_dict(cfg.ssod),
                   "class_names": manifest.classes, "init": init, "method": cfg.method, "seed": cfg.seed,
                   "config": to_dict(cfg), "tensorboard": trainer.tensorboard_uri(cfg.output)}
    if cfg.eval_every:
        loop_config["eval"] = {"every": cfg.eval_every, "corpus": cfg.eval_corpus}
    result = trainer.fit(worker, loop_config, cfg.output, cfg.workers, datasets)
    ckpt, files = export_models(result, cfg.output, cfg.export)
    if cfg.eval_corpus:
        metrics = {which: evaluate.run(evaluate.EvaluateConfig(
            checkpoint=uri, corpus=cfg.eval_corpus, output=storage.join(cfg.output, f"metrics_{which}.json")))
            for which, uri in files.items()}
        storage.write_json(storage.join(cfg.output, "metrics.json"), metrics[ckpt["exported"]])
        ckpt["metrics"] = metrics
    return ckpt

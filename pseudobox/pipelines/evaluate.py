"""Stage ``evaluate``: COCO and VOC metrics of a detector checkpoint on a corpus, or of
saved detections (``detections=``: a ``predict`` output) without running a detector.

``evaluate_detector`` works on any model that maps a list of CHW float images to
torchvision-style detections, so every later method (teachers, students) reuses it;
both modes score with ``score_detections``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from pseudobox import storage
from pseudobox.config import ConfigError, path_field, require
from pseudobox.pipelines.common import check_same_classes, log


@dataclass
class EvaluateConfig:
    checkpoint: str = path_field()
    corpus: str = path_field()
    split: str = path_field()   # optional split file (JSON with "keys") restricting the images
    output: str = path_field()  # optional metrics JSON URI
    detections: str = path_field()  # instead of checkpoint: a predict output (or its detections.json) to score
    test_size: int = 0  # short side at test time; 0 = the checkpoint's model.test_size
    batch_size: int = 8
    device: str = "auto"

    def validate(self) -> None:
        require(bool(self.corpus), "corpus is required")
        require(bool(self.checkpoint) != bool(self.detections),
                "set exactly one of checkpoint (run a detector) and detections (score a predict output)")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.test_size == 0 or self.test_size >= 32, "test_size must be 0 or >= 32")

    def check_paths(self) -> None:
        from pseudobox.datasets.corpus import load_manifest
        from pseudobox.models.checkpoint import load_checkpoint

        storage.check_readable(self.corpus, "corpus")
        # Predicted labels are the detector's class indices, scored against the corpus's.
        if self.detections:
            from pseudobox.pipelines.predict import read_predictions

            storage.check_readable(self.detections, "detections")
            check_same_classes(read_predictions(self.detections)[0], load_manifest(self.corpus).classes,
                               f"the detections {self.detections} (their categories)", f"the corpus {self.corpus}",
                               "Score detections on a corpus of the detector's classes (same names, same order).",
                               labels=("detections", "corpus"))
        else:
            ckpt = load_checkpoint(self.checkpoint, expect_type="detector")
            check_same_classes(ckpt["class_names"], load_manifest(self.corpus).classes,
                               f"the detector {self.checkpoint}", f"the corpus {self.corpus}",
                               "Evaluate on a corpus of the detector's classes (same names, same order).")
        if self.split:
            storage.check_readable(self.split, "split")
        if self.output:
            storage.check_writable(self.output, "output")


def evaluate_detector(predict_fn: Callable[[list[torch.Tensor]], list[dict]], samples: Iterable[dict],
                      class_names: list[str], batch_size: int = 8, device="cpu") -> dict:
    """Run ``predict_fn`` over decoded samples with GT boxes; COCO + VOC metrics (percent)."""
    from pseudobox.evaluation import gt_from_sample
    from pseudobox.models.detectors import detector_images

    gts, preds, chunk = [], [], []

    def flush():
        outs = predict_fn(detector_images([s["image"] for s in chunk], device))
        for s, o in zip(chunk, outs):
            preds.append({"key": s["key"], **o})
        chunk.clear()

    for s in samples:
        gts.append(gt_from_sample(s))  # COCO ignores crowd regions; VOC difficult and crowd ones
        chunk.append(s)
        if len(chunk) >= batch_size:
            flush()
    if chunk:
        flush()
    return score_detections(gts, preds, class_names)


def score_detections(gts: list[dict], preds: list[dict], class_names: list[str]) -> dict:
    """COCO (pycocotools) + VOC AP50 metrics, in percent, of predictions against GT
    (``evaluation.coco`` formats)."""
    from pseudobox.evaluation import evaluate_coco, evaluate_voc

    if not gts:
        raise ValueError("no evaluation images (check the corpus and split)")
    metrics = {"images": len(gts), **evaluate_coco(gts, preds, class_names)}
    voc = evaluate_voc(gts, preds, len(class_names))
    metrics.update({"VOC_AP50": voc["AP50"], "VOC_AP50_07": voc["AP50_07"]})
    return metrics


def evaluate_saved_detections(detections_uri: str, samples: Iterable[dict], class_names: list[str]) -> dict:
    """Metrics of saved predictions (``predict.read_predictions``) on decoded samples.

    Every evaluated image must have been predicted (an image left out would count as
    one without detections and lower the scores silently); predictions of images
    outside ``samples`` (another split) are ignored.
    """
    from pseudobox.evaluation import gt_from_sample
    from pseudobox.pipelines.predict import read_predictions

    _, predicted, preds = read_predictions(detections_uri)
    gts = [gt_from_sample(s) for s in samples]
    missing = [g["key"] for g in gts if g["key"] not in predicted]
    if missing:
        raise ConfigError(f"detections: {detections_uri} has no predictions for {len(missing)} of the {len(gts)} "
                          f"images evaluated (e.g. {missing[:3]}); run predict on this corpus (corpus=...)")
    keys = {g["key"] for g in gts}
    return score_detections(gts, [p for p in preds if p["key"] in keys], class_names)


def load_detector(uri: str, device="cpu", test_size: int = 0):
    """Rebuild a detector from its checkpoint (eval mode, test-time short side set)."""
    from pseudobox.config import from_dict
    from pseudobox.models.checkpoint import load_checkpoint
    from pseudobox.models.detectors import DetectorArch, build_detector

    ckpt = load_checkpoint(uri, expect_type="detector")
    arch = from_dict(DetectorArch, ckpt["arch"])
    model = build_detector(arch, len(ckpt["class_names"]))
    model.load_state_dict(ckpt["model_state"])
    model.transform.min_size = (test_size or arch.test_size,)
    return model.to(device).eval(), ckpt


def read_split_keys(uri: str) -> set[str]:
    return set(storage.read_json(uri)["keys"])


def run(cfg: EvaluateConfig) -> dict:
    from pseudobox.datasets.corpus import iter_corpus, load_manifest
    from pseudobox.models.detectors import predict

    cfg.check_paths()
    manifest = load_manifest(cfg.corpus)  # its classes equal the checkpoint's / detections' (check_paths)
    errors: dict = {}
    keys = read_split_keys(cfg.split) if cfg.split else None
    if cfg.detections:
        metrics = evaluate_saved_detections(cfg.detections, iter_corpus(cfg.corpus, errors, keys), manifest.classes)
    else:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if cfg.device == "auto" else cfg.device))
        model, ckpt = load_detector(cfg.checkpoint, device, cfg.test_size)
        metrics = evaluate_detector(lambda ims: predict(model, ims), iter_corpus(cfg.corpus, errors, keys),
                                    manifest.classes, cfg.batch_size, device)
    metrics["errors"] = errors
    log.info("evaluate: AP %.1f AP50 %.1f VOC AP50 %.1f on %d images", metrics["AP"], metrics["AP50"],
             metrics["VOC_AP50"], metrics["images"])
    if cfg.output:
        storage.write_json(cfg.output, metrics)
    return metrics

"""``pseudobox analyze iou-similarity``: do a checkpoint's RoI features track box overlap?
(PreDet, Fig. 5b.)

Reads the first ``num_images`` images of a corpus, samples ``num_pairs`` box pairs with
their IoU spread evenly over ``iou_bins`` (reference boxes: the corpus's ground truth where
present, else random; see ``evaluation.feature_similarity``), computes both boxes' RoI
features with the checkpoint's model (classifier, detector or PreDet) and reports the
Pearson correlation between IoU and the features' cosine similarity, overall and per box
size (small / medium / large: ``sqrt(w·h)`` below ``size_thresholds[0]``, below
``size_thresholds[1]``, or above, times the image's longer side; COCO's 32 and 96 px on a
640-px image by default).

Runs in this process, no Ray: a few hundred RoI forward passes. Writes under ``output``
(each file atomically)::

    iou_similarity.md    the table (also printed)
    iou_similarity.json  summary, rows, and every pair (image key, boxes, IoU, cosine, size bin)
    iou_similarity.png   cosine similarity against IoU per size bin, with the fitted line
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch

from pseudobox import storage
from pseudobox.config import path_field, require, to_dict
from pseudobox.evaluation import feature_similarity as fs
from pseudobox.pipelines.common import log

TABLE_FILE = "iou_similarity.md"
JSON_FILE = "iou_similarity.json"
PLOT_FILE = "iou_similarity.png"
MODEL_TYPES = ("classifier", "detector", "predet")


@dataclass
class IouSimilarityConfig:
    checkpoint: str = path_field()  # classifier, detector or predet checkpoint (model.pt, checkpoint dir or run dir)
    corpus: str = path_field()
    output: str = path_field()      # directory for the table, JSON and plot
    num_images: int = 64            # the corpus's first images (bad samples skipped)
    num_pairs: int = 2000           # split evenly over the IoU bins
    iou_bins: list[float] = field(default_factory=lambda: list(fs.DEFAULT_IOU_BINS))  # bin edges, increasing
    size_thresholds: list[float] = field(default_factory=lambda: list(fs.DEFAULT_SIZE_THRESHOLDS))
    reference: str = "auto"         # auto (GT box where the image has one, else random), gt, random
    min_box_size: float = 4.0       # px, both sides of both boxes (and of GT boxes used as references)
    image_size: int = 0             # short side fed to the model; 0: detector test_size, PreDet crop_size,
    #                                 classifier: the image as stored
    pool: str = "mean"              # classifier and RetinaNet/FCOS RoIs: mean or flatten (Faster R-CNN / PreDet: box head)
    classifier_layer: str = "layer4"  # layer4 (C5) or layer3 (C4)
    roi_output_size: int = 7
    batch_size: int = 8             # images per forward pass
    device: str = "auto"            # auto, cpu, cuda, cuda:N
    seed: int = 0

    def validate(self) -> None:
        for name in ("checkpoint", "corpus", "output"):
            require(bool(getattr(self, name)), f"{name} is required (e.g. {name}=s3://bucket/path)")
        require(self.num_images >= 1, "num_images must be >= 1")
        bins = self.iou_bins
        require(len(bins) >= 2, "iou_bins must list at least two edges (one bin), e.g. [0.05, 0.5, 0.95]")
        require(all(0.0 < b <= 1.0 for b in bins), "iou_bins edges must be in (0, 1]")
        require(all(a < b for a, b in pairwise(bins)), "iou_bins edges must increase strictly")
        require(self.num_pairs >= len(bins) - 1,
                f"num_pairs must be >= the number of IoU bins ({len(bins) - 1}) so every bin gets a pair")
        t = self.size_thresholds
        require(len(t) == 2 and 0.0 < t[0] < t[1] < 1.0,
                "size_thresholds must be two increasing fractions of the image's longer side in (0, 1), "
                "e.g. [0.05, 0.15]")
        require(self.reference in ("auto", "gt", "random"), "reference must be auto, gt or random")
        require(self.min_box_size >= 1.0, "min_box_size must be >= 1 (pixels)")
        require(self.image_size == 0 or self.image_size >= 32, "image_size must be 0 or >= 32")
        require(self.pool in ("mean", "flatten"), "pool must be mean or flatten")
        require(self.classifier_layer in ("layer3", "layer4"), "classifier_layer must be layer3 or layer4")
        require(self.roi_output_size >= 1, "roi_output_size must be >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                "device must be auto, cpu, cuda or cuda:N")

    def check_paths(self) -> dict:
        """Fail before any model work when an input is missing or unusable, or the output
        unwritable; returns the checkpoint."""
        from pseudobox.config import ConfigError
        from pseudobox.datasets.corpus import load_manifest
        from pseudobox.models.checkpoint import CheckpointError, load_checkpoint

        ckpt = load_checkpoint(self.checkpoint)
        if ckpt.get("model_type") not in MODEL_TYPES:
            raise CheckpointError(f"checkpoint: {self.checkpoint} holds a {ckpt.get('model_type')!r}; "
                                  f"need one of {MODEL_TYPES}")
        storage.check_readable(self.corpus, "corpus")
        manifest = load_manifest(self.corpus)
        if self.reference == "gt" and not manifest.has_boxes:
            raise ConfigError(f"reference=gt but the corpus {self.corpus} has no boxes; use reference=auto or random")
        storage.check_writable(self.output, "output")
        return ckpt


AnalyzeConfig = IouSimilarityConfig  # the stage's config under its generic name


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        from pseudobox.config import ConfigError

        raise ConfigError(f"device={setting} but no CUDA device is available")
    return torch.device(setting)


def read_images(corpus: str, num_images: int) -> list[dict]:
    """The corpus's first ``num_images`` decodable samples: ``{key, image HWC uint8, boxes?}``."""
    from pseudobox.datasets.corpus import iter_corpus

    out = []
    for sample in iter_corpus(corpus, errors={}):
        boxes = sample.get("boxes")
        if boxes is not None and "iscrowd" in sample:
            boxes = boxes[~sample["iscrowd"]]  # a crowd region is not one object
        out.append({"key": sample["key"], "image": sample["image"], "boxes": boxes})
        if len(out) >= num_images:
            break
    return out


def run(cfg: IouSimilarityConfig) -> dict:
    """Sample the pairs, compute their features' cosine similarity, write table, JSON and
    plot; returns the summary (the JSON without the per-pair lists)."""
    started = time.time()
    ckpt = cfg.check_paths()
    device = resolve_device(cfg.device)
    samples = read_images(cfg.corpus, cfg.num_images)
    if not samples:
        from pseudobox.datasets.corpus import CorpusError

        raise CorpusError(f"corpus: {cfg.corpus} has no decodable images")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    pairs = fs.sample_box_pairs([s["image"].shape[:2] for s in samples], [s["boxes"] for s in samples],
                                cfg.num_pairs, rng, cfg.iou_bins, cfg.size_thresholds, cfg.min_box_size,
                                cfg.reference)
    log.info("analyze iou-similarity: %d pairs on %d images (%d with a ground-truth reference box), %s checkpoint",
             len(pairs), len(samples), int(pairs.from_gt.sum()), ckpt["model_type"])
    extractor, _ = fs.load_roi_feature_extractor(cfg.checkpoint, device, image_size=cfg.image_size, pool=cfg.pool,
                                                 classifier_layer=cfg.classifier_layer,
                                                 roi_output_size=cfg.roi_output_size)
    images = [torch.tensor(s["image"]).permute(2, 0, 1).float().div(255) for s in samples]
    cosine = fs.pair_cosine_similarities(extractor, images, pairs, cfg.batch_size, device)
    rows = fs.correlation_rows(pairs.iou, cosine, pairs.size_bin, cfg.iou_bins, fs.SIZE_NAMES)
    table = fs.markdown_table(rows, cfg.iou_bins)
    title = f"{ckpt['model_type']} {ckpt.get('method', '')} {ckpt['arch'].get('detector', '')}".strip()
    files = {name: storage.join(cfg.output, name) for name in (TABLE_FILE, JSON_FILE, PLOT_FILE)}
    summary = {
        "checkpoint": cfg.checkpoint, "model_type": ckpt["model_type"], "method": ckpt.get("method"),
        "arch": ckpt["arch"], "corpus": cfg.corpus, "images": len(samples), "pairs": len(pairs),
        "pairs_with_gt_reference": int(pairs.from_gt.sum()), "pearson": rows[-1]["pearson"], "rows": rows,
        "iou_bins": list(cfg.iou_bins), "size_names": list(fs.SIZE_NAMES),
        "size_thresholds": list(cfg.size_thresholds), "files": files, "config": to_dict(cfg),
        "seconds": round(time.time() - started, 2),
    }
    keys = [samples[i]["key"] for i in pairs.image_index]
    per_pair = {"key": keys, "box_a": pairs.box_a.tolist(), "box_b": pairs.box_b.tolist(), "iou": pairs.iou.tolist(),
                "cosine": cosine.tolist(), "size_bin": pairs.size_bin.tolist(), "from_gt": pairs.from_gt.tolist()}
    header = (f"# IoU vs RoI-feature cosine similarity\n\ncheckpoint: `{cfg.checkpoint}` ({title})  \n"
              f"corpus: `{cfg.corpus}`, {len(samples)} images, {len(pairs)} pairs\n\n")
    storage.write_text(files[TABLE_FILE], header + table)
    storage.write_json(files[JSON_FILE], {**summary, "per_pair": per_pair})
    storage.write_bytes(files[PLOT_FILE], fs.plot_png(pairs.iou, cosine, pairs.size_bin, rows, fs.SIZE_NAMES, title))
    print(table, end="")
    log.info("analyze iou-similarity: Pearson r = %.3f over %d pairs → %s", rows[-1]["pearson"], len(pairs),
             cfg.output)
    return summary

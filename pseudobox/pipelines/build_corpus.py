"""Stage ``build-corpus``: write a corpus (tar shards + corpus.json) from a source.

Builders:
  * ``synthetic``: procedural scenes with ground-truth boxes; a classification-style
    corpus (one dominant object, image-level label) or a detection-style set whose
    classes differ from the pre-training ones;
  * ``imagefolder``: a class-per-folder image tree (ImageNet layout); image bytes are
    copied as they are;
  * ``coco``: a COCO-format JSON plus its image directory (keeps boxes, crowd flags and
    each annotation's ``area``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from pseudobox import storage
from pseudobox.config import require
from pseudobox.datasets.corpus import CorpusManifest, CorpusWriter, encode_image
from pseudobox.pipelines.common import log

BUILDERS = ("synthetic", "imagefolder", "coco")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class SyntheticConfig:
    style: str = "classification"  # or "detection"
    classes: str = "pretrain"      # or "downstream"
    num_images: int = 1000
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    seed: int = 0

    def validate(self) -> None:
        require(self.style in ("classification", "detection"), "synthetic.style must be classification or detection")
        require(self.classes in ("pretrain", "downstream"), "synthetic.classes must be pretrain or downstream")
        require(self.num_images >= 1, "synthetic.num_images must be >= 1")
        require(self.image_size >= 32, "synthetic.image_size must be >= 32")
        require(1 <= self.min_objects <= self.max_objects, "need 1 <= synthetic.min_objects <= synthetic.max_objects")


@dataclass
class BuildCorpusConfig:
    builder: str = "synthetic"
    output: str = ""
    samples_per_shard: int = 1000
    source: str = ""       # imagefolder root, or the COCO image directory
    annotations: str = ""  # COCO JSON (builder=coco)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        require(self.builder in BUILDERS, f"builder must be one of {BUILDERS}, got {self.builder!r}")
        require(bool(self.output), "output is required")
        require(self.samples_per_shard >= 1, "samples_per_shard must be >= 1")
        if self.builder == "synthetic":
            self.synthetic.validate()
        else:
            require(bool(self.source), f"builder={self.builder} needs source=DIR")
        if self.builder == "coco":
            require(bool(self.annotations), "builder=coco needs annotations=FILE.json")

    def check_paths(self) -> None:
        if self.builder != "synthetic":
            require(os.path.isdir(self.source), f"source {self.source} is not a local directory")
        if self.builder == "coco":
            storage.check_readable(self.annotations, "annotations")
        storage.check_writable(self.output, "output")


def safe_key(text: str) -> str:
    """A webdataset-safe sample key (no dots or slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def build_synthetic(cfg: BuildCorpusConfig) -> CorpusManifest:
    from pseudobox.datasets import synthetic

    s = cfg.synthetic
    classes = synthetic.class_names(s.classes)
    rng = np.random.default_rng(s.seed)
    writer = CorpusWriter(cfg.output, classes, cfg.samples_per_shard, kind=s.style,
                          extra={"builder": "synthetic", "synthetic": vars(s).copy()})
    size = (s.image_size, s.image_size)
    for i in range(s.num_images):
        if s.style == "classification":
            image, label, boxes, box_labels = synthetic.classification_sample(rng, s.classes, size)
            labels = [int(label)]
        else:
            image, boxes, box_labels = synthetic.detection_sample(rng, s.classes, size, s.min_objects, s.max_objects)
            labels = sorted({int(x) for x in box_labels})
        meta = {"labels": labels, "boxes": np.asarray(boxes).tolist(), "box_labels": [int(x) for x in box_labels]}
        writer.add(f"syn{s.seed:03d}_{i:07d}", encode_image(image), meta)
    return writer.close()


def build_imagefolder(cfg: BuildCorpusConfig) -> CorpusManifest:
    classes = sorted(d for d in os.listdir(cfg.source) if os.path.isdir(os.path.join(cfg.source, d)))
    require(bool(classes), f"{cfg.source} has no class sub-directories")
    writer = CorpusWriter(cfg.output, classes, cfg.samples_per_shard, extra={"builder": "imagefolder", "source": cfg.source})
    files = [(idx, name, fname) for idx, name in enumerate(classes)
             for fname in sorted(os.listdir(os.path.join(cfg.source, name)))
             if os.path.splitext(fname)[1].lower() in IMAGE_SUFFIXES]
    # Seeded shuffle: every shard holds a mix of classes, not one class each.
    for k in np.random.default_rng(cfg.synthetic.seed).permutation(len(files)):
        idx, name, fname = files[k]
        stem, ext = os.path.splitext(fname)
        with open(os.path.join(cfg.source, name, fname), "rb") as f:
            data = f.read()
        writer.add(safe_key(f"{name}_{stem}"), data, {"labels": [idx]}, ext="png" if ext.lower() == ".png" else "jpg")
    return writer.close()


def build_coco(cfg: BuildCorpusConfig) -> CorpusManifest:
    coco = json.loads(storage.read_bytes(cfg.annotations))
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index_of = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, list] = {}
    for ann in coco.get("annotations", []):
        per_image.setdefault(ann["image_id"], []).append(ann)
    writer = CorpusWriter(cfg.output, [c["name"] for c in categories], cfg.samples_per_shard, kind="detection",
                          extra={"builder": "coco", "annotations": cfg.annotations})
    skipped = 0
    for img in sorted(coco["images"], key=lambda im: im["id"]):
        path = os.path.join(cfg.source, img["file_name"])
        if not os.path.exists(path):
            skipped += 1
            continue
        anns = per_image.get(img["id"], [])
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        box_labels = [index_of[a["category_id"]] for a in anns]
        with open(path, "rb") as f:
            data = f.read()
        stem, ext = os.path.splitext(img["file_name"])
        crowd = [int(bool(a.get("iscrowd", 0))) for a in anns]  # kept as ignore regions for evaluation
        # COCO's own area (of the segmentation, not the box) decides the APs/APm/APl bucket;
        # null where the annotation has none (the reader then uses the box's w·h).
        area = [None if a.get("area") is None else float(a["area"]) for a in anns]
        labels = sorted({c for c, is_crowd in zip(box_labels, crowd) if not is_crowd})
        writer.add(safe_key(f"{img['id']}_{stem}"), data,
                   {"labels": labels, "boxes": boxes, "box_labels": box_labels, "iscrowd": crowd, "area": area},
                   ext="png" if ext.lower() == ".png" else "jpg")
    if skipped:
        log.warning("build-corpus: %d images listed in %s were not found under %s", skipped, cfg.annotations, cfg.source)
    return writer.close()


def run(cfg: BuildCorpusConfig) -> CorpusManifest:
    cfg.check_paths()
    builder = {"synthetic": build_synthetic, "imagefolder": build_imagefolder, "coco": build_coco}[cfg.builder]
    manifest = builder(cfg)
    log.info("build-corpus: %d samples in %d shards, %d classes → %s", manifest.num_samples,
             len(manifest.shards), len(manifest.classes), cfg.output)
    return manifest

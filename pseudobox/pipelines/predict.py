"""Stage ``predict``: run a detector checkpoint over a corpus or a folder of images.

read (corpus shards, or pseudo-shards of an image folder; CPU tasks) → decode (CPU) →
``DetectorPredictor`` (autoscaling actor pool, one GPU per actor when the cluster has
GPUs) → one parquet part per shard, written by the driver as each shard completes; the
same machinery and layout as ``mine`` (``common.run_shard_pool``,
``mining/outputs.py``), so a re-run skips the shards that are done, redoes those whose
input changed (for an image folder: any file of the pseudo-shard), and must keep the
first run's settings (run.json), except those in ``APPLIABLE``. Missing samples (a
truncated, zero-byte or missing corpus shard) end the run with
``outputs.MissingSamplesError`` (exit code 3) unless ``allow_missing``.

Output under ``output``::

    parts/<shard>.parquet   detections per image (xyxy pixels, 0-based labels, scores)
    reports/<shard>.json    per-shard counts, errors by kind (corrupt images...)
    predictions_coco.json   COCO dict: images (file_name = key: the corpus sample key, or
                            the image's path relative to the folder), categories (id =
                            class index + 1, the checkpoint's class names), annotations
                            (the detections, with ``score``)
    detections.json         COCO results list: {image_id, category_id, bbox [x,y,w,h], score};
                            image ids are those of predictions_coco.json
    gallery/*.png           the first ``gallery`` images with their predictions drawn (left)
                            and, for a corpus with boxes, the ground truth (right)
    predict.json            run summary

``pseudobox evaluate detections=<output> corpus=<corpus>`` scores these detections
(``read_predictions``) without running the detector again.
"""
from __future__ import annotations

import base64
import hashlib
import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pseudobox import storage
from pseudobox.config import ConfigError, path_field, require, to_dict
from pseudobox.mining import outputs
from pseudobox.pipelines.common import (
    RayConfig, check_same_run, init_ray, log, resolve_use_gpu, run_fingerprint, run_shard_pool, validate_actor_pool,
)

SOURCE = "predict"
# Settings a re-submission may change: they place and group the work, or only redraw the
# gallery; none changes a detection of a finished shard.
APPLIABLE = ("batch_size", "min_actors", "max_actors", "use_gpu", "gpus_per_actor", "cpus_per_actor", "gallery", "gallery_score", "allow_missing", "ray")
DETECTIONS_FILE = "detections.json"
COCO_FILE = "predictions_coco.json"


@dataclass
class PredictConfig:
    checkpoint: str = path_field()  # a detector checkpoint (model.pt, checkpoint dir or run dir)
    corpus: str = path_field()      # a corpus (corpus.json) or a folder of .jpg/.jpeg/.png (recursive)
    output: str = path_field()
    score_threshold: float = 0.0    # detections below are dropped; the detector's own score_thresh applies first
    test_size: int = 0              # short side at test time; 0 = the checkpoint's model.test_size
    batch_size: int = 8
    min_actors: int = 1
    max_actors: int = 2
    use_gpu: str = "auto"
    gpus_per_actor: float = 1.0  # with use_gpu; a fraction (0.5) packs several actors on one GPU
    cpus_per_actor: float = 1.0
    files_per_shard: int = 256      # image folders: files per pseudo-shard (the unit of resume)
    gallery: int = 8                # images drawn into gallery/ (0: none)
    gallery_score: float = 0.3      # detections drawn in the gallery (all are kept in the outputs)
    allow_missing: bool = False     # true: samples that produced no row (cut shards) only log a warning
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        for name in ("checkpoint", "corpus", "output"):
            require(bool(getattr(self, name)), f"{name} is required (e.g. {name}=s3://bucket/path)")
        require(0.0 <= self.score_threshold <= 1.0, "score_threshold must be in [0, 1]")
        require(self.test_size == 0 or self.test_size >= 32, "test_size must be 0 or >= 32")
        validate_actor_pool(self)
        require(self.files_per_shard >= 1, "files_per_shard must be >= 1")
        require(self.gallery >= 0, "gallery must be >= 0")
        require(0.0 <= self.gallery_score <= 1.0, "gallery_score must be in [0, 1]")
        self.ray.validate()

    def check_paths(self) -> None:
        """Fail before any Ray work when an input is missing or the output unwritable."""
        from pseudobox.models.checkpoint import load_checkpoint

        load_checkpoint(self.checkpoint, expect_type="detector")
        storage.check_readable(self.corpus, "corpus")
        if not is_corpus(self.corpus):
            from pseudobox.datasets.ray_io import list_image_files

            require(bool(list_image_files(self.corpus)),
                    f"corpus: {self.corpus} has no corpus.json and no .jpg/.jpeg/.png files under it")
        storage.check_writable(self.output, "output")


def is_corpus(uri: str) -> bool:
    from pseudobox.datasets.corpus import MANIFEST_NAME

    return storage.exists(storage.join(uri, MANIFEST_NAME))


# ---------------------------------------------------------------- per batch (no Ray)


def predict_batch(model, batch: dict, score_threshold: float = 0.0, device="cpu") -> dict:
    """Decoded batch → output rows (``mining.outputs.mined_rows`` format) with the
    detections of each image: xyxy pixels, 0-based class indices, scores at or above
    ``score_threshold``. Error rows pass through without detections."""
    from pseudobox.models.detectors import detector_images, predict

    ok = [i for i in range(len(batch["key"])) if not batch["error"][i]]
    detections = predict(model, detector_images([batch["image"][i] for i in ok], device)) if ok else []
    per_row = {}
    for i, d in zip(ok, detections):
        keep = d["scores"] >= score_threshold
        per_row[i] = (d["boxes"][keep].numpy().astype(np.float32), d["labels"][keep].numpy().astype(np.int64),
                      d["scores"][keep].numpy().astype(np.float32))
    return outputs.mined_rows(batch, per_row, SOURCE)


class DetectorPredictor:
    """Ray Data actor: loads the detector once, then ``predict_batch`` per batch. Runs on
    CUDA only when the pool reserved a GPU for it (``device``)."""

    def __init__(self, checkpoint_uri: str, score_threshold: float = 0.0, test_size: int = 0,
                 device: str = "cpu", threads: int | None = None):
        from pseudobox.pipelines.evaluate import load_detector

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model, _ = load_detector(checkpoint_uri, self.device, test_size)
        self.score_threshold = score_threshold

    def __call__(self, batch: dict) -> dict:
        return predict_batch(self.model, batch, self.score_threshold, self.device)


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What ``predict`` reads: corpus shards, or an image folder's pseudo-shards."""

    uri: str
    expected: dict[str, int]              # samples per (pseudo-)shard
    groups: dict[str, list[str]] | None   # image folders: files per pseudo-shard
    has_boxes: bool = False
    classes: list[str] = field(default_factory=list)  # the corpus's (gallery ground truth)
    identities: dict[str, dict] = field(default_factory=dict)  # per (pseudo-)shard, for resume

    def fingerprint(self) -> dict:
        """What the output's parts depend on besides the config: an image folder's files
        (a file added later would shift the pseudo-shards)."""
        if self.groups is None:
            return {}
        files = [f for fs in self.groups.values() for f in fs]
        return {"images": {"count": len(files), "sha1": hashlib.sha1("\n".join(files).encode()).hexdigest()}}

    def dataset(self, shards: list[str], batch_size: int):
        from pseudobox.datasets import ray_io

        if self.groups is None:
            return ray_io.decoded_corpus(self.uri, keep_errors=True, shards=shards, batch_size=batch_size)
        return ray_io.decoded_image_folder(self.uri, {s: self.groups[s] for s in shards}, batch_size=batch_size)


def load_inputs(uri: str, files_per_shard: int) -> Inputs:
    from pseudobox.datasets import ray_io
    from pseudobox.datasets.corpus import load_manifest

    if is_corpus(uri):
        m = load_manifest(uri)
        names = [s.name for s in m.shards]
        return Inputs(uri, {s.name: s.num_samples for s in m.shards}, None, m.has_boxes, m.classes,
                      outputs.input_identities(uri, names))
    groups = ray_io.image_folder_shards(ray_io.list_image_files(uri), files_per_shard)
    return Inputs(uri, {s: len(fs) for s, fs in groups.items()}, groups, identities=folder_identities(uri, groups))


def folder_identities(uri: str, groups: dict[str, list[str]]) -> dict[str, dict]:
    """One identity per pseudo-shard of an image folder: its file count, total size and a
    digest of each file's ``storage.identity`` (size and ETag or mtime), from one listing."""
    fs, root = storage.split_uri(uri)
    root = root.rstrip("/")
    found = storage.retrying(uri, "list", lambda: fs.find(root, detail=True))
    listing = {path[len(root):].lstrip("/"): info for path, info in found.items()}
    out = {}
    for shard, files in groups.items():
        digest, size = hashlib.sha256(), 0
        for rel in files:
            info = listing.get(rel)
            ident = storage.identity(storage.join(uri, rel), info) if info else {"missing": True}
            size += int(ident.get("size", 0))
            digest.update((rel + "\t" + str(sorted((k, v) for k, v in ident.items() if k != "uri")) + "\n").encode())
        out[shard] = {"uri": uri, "files": len(files), "size": size, "sha256": digest.hexdigest()}
    return out


# ---------------------------------------------------------------- outputs


def write_predictions(out_uri: str, class_names: list[str]) -> dict:
    """``predictions_coco.json`` and ``detections.json`` from all parts; returns the COCO dict."""
    coco = outputs.export_coco(out_uri, class_names, storage.join(out_uri, COCO_FILE))
    storage.write_json(storage.join(out_uri, DETECTIONS_FILE), outputs.coco_results(coco))
    return coco


def read_predictions(uri: str) -> tuple[list[str], set[str], list[dict]]:
    """Saved predictions → ``(class_names, image keys predicted, [{key, boxes xyxy, labels
    0-based, scores}])``.

    ``uri``: a predict output directory, its ``detections.json`` (image ids resolved with
    the ``predictions_coco.json`` beside it), or a COCO dict file with ``images``,
    ``categories`` and scored ``annotations`` (``predictions_coco.json``).
    """
    if uri.rstrip("/").endswith(".json"):
        data = storage.read_json(uri)
        folder = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
    else:
        folder, data = uri, storage.read_json(storage.join(uri, DETECTIONS_FILE))
    if isinstance(data, dict):
        coco, results = data, data.get("annotations")
    else:
        coco_uri = storage.join(folder, COCO_FILE)
        if not storage.exists(coco_uri):
            raise ConfigError(f"detections: {uri} is a COCO results list; its image ids are resolved with "
                              f"{COCO_FILE} beside it, which is missing")
        coco, results = storage.read_json(coco_uri), data
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise ConfigError(f"detections: {uri}: no '{key}' list (expected predict's {COCO_FILE})")
    if not isinstance(results, list):
        raise ConfigError(f"detections: {uri}: no detections list")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    if [c["id"] for c in cats] != list(range(1, len(cats) + 1)):
        raise ConfigError(f"detections: {uri}: category ids must be 1..{len(cats)} (class index + 1)")
    names = {im["id"]: str(im["file_name"]) for im in coco["images"]}
    grouped: dict[str, list] = {k: [] for k in names.values()}
    for d in results:
        if d["image_id"] not in names:
            raise ConfigError(f"detections: {uri}: image_id {d['image_id']} is not in {COCO_FILE}'s images")
        grouped[names[d["image_id"]]].append(d)
    preds = []
    for key, ds in grouped.items():
        xywh = np.asarray([d["bbox"] for d in ds], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        preds.append({"key": key, "boxes": boxes, "labels": np.asarray([d["category_id"] - 1 for d in ds], np.int64),
                      "scores": np.asarray([d["score"] for d in ds], np.float32)})
    return [str(c["name"]) for c in cats], set(names.values()), preds


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def gallery_samples(inputs: Inputs, out_uri: str, n: int) -> list[dict]:
    """The first ``n`` predicted images (by shard, then key) with their image and, for a
    corpus with boxes, their ground truth. Reads only the shards it shows."""
    from pseudobox.datasets.corpus import decode_image, decode_sample, iter_shard

    items: list[dict] = []
    for shard in sorted(inputs.expected):
        if len(items) >= n:
            break
        predicted = outputs.load_mined_boxes(out_uri, shard)
        wanted = sorted(predicted)[: n - len(items)]
        if not wanted:
            continue
        images: dict[str, dict] = {}
        if inputs.groups is None:
            for raw in iter_shard(storage.join(inputs.uri, shard)):
                if raw["key"] in wanted and not raw.get("error"):
                    try:
                        images[raw["key"]] = decode_sample(raw, inputs.classes)
                    except ValueError:
                        continue
        else:
            for key in wanted:
                images[key] = {"image": decode_image(storage.read_bytes(storage.join(inputs.uri, key)))}
        for key in wanted:
            if key in images:
                items.append({"key": key, "sample": images[key], "predicted": predicted[key]})
    return items


def write_gallery(inputs: Inputs, out_uri: str, class_names: list[str], n: int, min_score: float) -> list[str]:
    """``gallery/NNN_<key>.png``: predictions (score >= ``min_score``) on the left, the
    ground truth on the right when the corpus has boxes. Returns the written URIs."""
    from PIL import Image

    from pseudobox.pipelines.report import draw_boxes

    def panel(image, boxes, labels, names, scores=None):
        png = draw_boxes(image, boxes, labels, names, scores=scores, max_side=512)
        return Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")

    written = []
    for i, item in enumerate(gallery_samples(inputs, out_uri, n)):
        boxes, labels, scores = item["predicted"]
        keep = scores >= min_score
        image = item["sample"]["image"]
        panels = [panel(image, boxes[keep], labels[keep], class_names, scores[keep])]
        if inputs.has_boxes:
            panels.append(panel(image, item["sample"].get("boxes", np.zeros((0, 4), np.float32)),
                                item["sample"].get("box_labels", np.zeros(0, np.int64)), inputs.classes))
        canvas = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)),
                           (255, 255, 255))
        x = 0
        for p in panels:
            canvas.paste(p, (x, 0))
            x += p.width + 8
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        uri = storage.join(out_uri, "gallery", f"{i:03d}_{_safe_name(item['key'])}.png")
        storage.write_bytes(uri, buf.getvalue())
        written.append(uri)
    return written


# ---------------------------------------------------------------- launcher


def run(cfg: PredictConfig) -> dict:
    """Predict every pending shard, then write the COCO files and the gallery; returns the
    run summary (also written to predict.json)."""
    from pseudobox.models.checkpoint import load_checkpoint

    cfg.check_paths()
    class_names = load_checkpoint(cfg.checkpoint, expect_type="detector")["class_names"]
    inputs = load_inputs(cfg.corpus, cfg.files_per_shard)
    check_same_run(cfg.output, {**run_fingerprint("predict", cfg), **inputs.fingerprint()}, appliable=APPLIABLE)
    done, pending = outputs.plan_shards(cfg.output, "predict", inputs.identities)
    log.info("predict: %d shards, %d already complete, %d to do", len(inputs.expected), len(done), len(pending))
    absent = [s for s in pending if inputs.groups is None and inputs.identities[s].get("missing")]
    readable = [s for s in pending if s not in absent]
    writer = outputs.ShardPartWriter(cfg.output, inputs.expected, SOURCE, inputs=inputs.identities)
    started = time.time()
    if readable:
        init_ray(cfg.ray)
        use_gpu = resolve_use_gpu(cfg.use_gpu)
        run_shard_pool(inputs.dataset(readable, cfg.batch_size), DetectorPredictor,
                       {"checkpoint_uri": cfg.checkpoint, "score_threshold": cfg.score_threshold,
                        "test_size": cfg.test_size},
                       cfg, use_gpu, writer, "predict", {s: inputs.expected[s] for s in readable},
                       reread=lambda shards: inputs.dataset(shards, cfg.batch_size))
        writer.write_unread(readable)  # a read that yielded no row at all
    writer.write_unread(absent, "missing_shard")
    coco = write_predictions(cfg.output, class_names)
    gallery = write_gallery(inputs, cfg.output, class_names, cfg.gallery, cfg.gallery_score) if cfg.gallery else []
    reports = outputs.load_reports(cfg.output)
    summary = outputs.summarize(reports)
    for k in ("corloc", "recall50", "corloc_hits", "corloc_images", "gt_boxes", "gt_recalled"):
        summary.pop(k, None)  # CAM-mining quality counts: not meaningful for detections
    summary.update({"images": len(coco["images"]), "detections": len(coco["annotations"]),
                    "corpus": cfg.corpus, "checkpoint": cfg.checkpoint, "classes": class_names,
                    "input": "corpus" if inputs.groups is None else "image_folder", "gallery": gallery,
                    "config": to_dict(cfg), "seconds_this_run": time.time() - started, "shards_this_run": len(pending),
                    "missing_samples": outputs.missing_samples(reports)})
    storage.write_json(storage.join(cfg.output, "predict.json"), summary)
    log.info("predict: %d detections on %d images → %s", summary["detections"], summary["images"],
             storage.join(cfg.output, DETECTIONS_FILE))
    outputs.check_missing(reports, "predict", cfg.allow_missing)  # last: everything above is written
    return summary

"""Stage ``build-corpus``: write a corpus (tar shards + corpus.json) from a source.

Builders:
  * ``synthetic``: procedural scenes with ground-truth boxes; a classification-style
    corpus (one dominant object, image-level label) or a detection-style set whose
    classes differ from the pre-training ones;
  * ``imagefolder``: a class-per-folder image tree (ImageNet layout); image bytes are
    copied as they are;
  * ``coco``: a COCO-format JSON plus its image directory (keeps boxes, crowd flags and
    each annotation's ``area``);
  * ``voc``: a VOCdevkit tree, one or more ``splits`` (``VOC2007/trainval,VOC2012/trainval``);
    keeps each object's ``difficult`` flag (``datasets/voc.py``);
  * ``hashtags``: a JSONL of ``{"image": path or URI, "tags": [...]}`` plus a vocabulary
    mapping classes to hashtags (``datasets/hashtags.py``); writes a multi-label corpus whose
    samples keep their raw tags, and reports per-class counts, the unmatched-tag share and
    what was dropped (``corpus.json`` ``extra.hashtags``). Relative image paths are read
    against ``source`` when set, else against the JSONL's directory; malformed lines are
    skipped and counted.

The file builders (imagefolder, coco, voc, hashtags) go in three steps. *Plan*: list every sample
(key, image path relative to ``source``, label JSON) in a fixed order and check it
(unknown VOC classes, duplicate keys) before anything is written. *Cut* the plan into
shards of ``samples_per_shard``. *Write* the shards in parallel (``parallel``: a local
process pool, Ray tasks, or in this process); each shard is followed by its record
``<output>/build/<shard>.json`` (samples written, items skipped and why), and the shard
counts as done once its record is there. A re-run with the same settings and the same
plan writes only the shards without a record; ``corpus.json`` comes last, once every
shard is done. ``<output>/run.json`` records the settings and the plan's digest, and a
re-run that differs (other than ``parallel``, ``num_workers``, ``ray.*``) is refused.
Image files missing on disk, or that PIL cannot identify, are skipped and counted.
``synthetic`` draws every image from one random stream, so it stays serial.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from pseudobox import storage
from pseudobox.config import ConfigError, path_field, require
from pseudobox.datasets.corpus import (
    MANIFEST_NAME, CorpusError, CorpusManifest, CorpusWriter, ShardInfo, encode_image, safe_join, shard_name,
    write_shard,
)
from pseudobox.pipelines.common import RayConfig, check_same_run, config_defaults, log, run_fingerprint

BUILDERS = ("synthetic", "imagefolder", "coco", "voc", "hashtags")
PARALLEL = ("process", "ray", "none")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RECORDS_DIR = "build"
# Settings a re-run may change: how shards are written, not what is in them.
BUILD_APPLIABLE = ("parallel", "num_workers", "ray")
SKIPPED_EXAMPLES = 5  # paths of skipped items kept per shard record


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
class HashtagsConfig:
    """builder=hashtags: the JSONL of images and tags, the class vocabulary, the class size floor."""

    jsonl: str = path_field()       # one {"image": path or URI, "tags": [...]} per line
    vocabulary: str = path_field()  # YAML or JSON: {class: [hashtag, synonym, plural, ...]}
    min_images: int = 1             # classes with fewer images are dropped, then images left with none

    def validate(self) -> None:
        require(bool(self.jsonl), "builder=hashtags needs hashtags.jsonl=FILE.jsonl")
        require(bool(self.vocabulary), "builder=hashtags needs hashtags.vocabulary=FILE.yaml (or .json)")
        require(self.min_images >= 1, f"hashtags.min_images must be >= 1, got {self.min_images}")


@dataclass
class BuildCorpusConfig:
    builder: str = "synthetic"
    output: str = path_field()
    samples_per_shard: int = 1000
    source: str = path_field()       # imagefolder root, the COCO image directory, the VOCdevkit root,
    #                                  or (hashtags, optional) the base of relative image paths
    annotations: str = path_field()  # COCO JSON (builder=coco)
    splits: list[str] = field(default_factory=list)   # voc: "<year dir>/<image set>", e.g. VOC2007/trainval
    classes: list[str] = field(default_factory=list)  # voc: class names in index order (empty: the 20 VOC classes)
    parallel: str = "process"        # file builders: process (local pool), ray (Ray tasks) or none
    num_workers: int = 0             # parallel=process: pool size (0: one per core)
    ray: RayConfig = field(default_factory=RayConfig)  # parallel=ray
    # synthetic.seed also seeds imagefolder's shuffle of the file list
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    hashtags: HashtagsConfig = field(default_factory=HashtagsConfig)

    def validate(self) -> None:
        require(self.builder in BUILDERS, f"builder must be one of {BUILDERS}, got {self.builder!r}")
        require(bool(self.output), "output is required")
        require(self.samples_per_shard >= 1, "samples_per_shard must be >= 1")
        require(self.parallel in PARALLEL, f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        require(self.num_workers >= 0, "num_workers must be >= 0 (0: one per core)")
        self.ray.validate()
        if self.builder == "synthetic":
            self.synthetic.validate()
        elif self.builder == "hashtags":
            self.hashtags.validate()
        else:
            require(bool(self.source), f"builder={self.builder} needs source=DIR")
        if self.builder != "hashtags":
            require(self.hashtags == HashtagsConfig(),
                    f"hashtags.* is only read by builder=hashtags (builder={self.builder})")
        if self.builder == "coco":
            require(bool(self.annotations), "builder=coco needs annotations=FILE.json")
        if self.builder == "voc":
            require(bool(self.splits), "builder=voc needs splits=YEAR/SET[,YEAR/SET...], e.g. VOC2007/trainval")
            for split in self.splits:
                parts = split.split("/")
                require(len(parts) == 2 and all(parts) and ".." not in parts,
                        f"splits: {split!r} is not <year dir>/<image set>, e.g. VOC2007/trainval")
            require(len(set(self.classes)) == len(self.classes) and all(c.strip() for c in self.classes),
                    "classes must be distinct, non-empty names")
        else:
            require(not self.splits, f"splits is only read by builder=voc (builder={self.builder})")
            require(not self.classes, f"classes is only read by builder=voc (builder={self.builder})")

    def check_paths(self) -> None:
        if self.builder == "hashtags":
            from pseudobox.datasets import hashtags

            storage.check_readable(self.hashtags.jsonl, "hashtags.jsonl")
            storage.check_readable(self.hashtags.vocabulary, "hashtags.vocabulary")
            hashtags.load_vocabulary(self.hashtags.vocabulary)  # raises ConfigError naming the key
            if self.source:
                storage.check_readable(self.source, "source")
        elif self.builder != "synthetic":
            require(os.path.isdir(self.source), f"source {self.source} is not a local directory")
        if self.builder == "coco":
            storage.check_readable(self.annotations, "annotations")
        if self.builder == "voc":
            from pseudobox.datasets import voc

            for split in self.splits:
                year, image_set = split.split("/")
                path = voc.image_set_path(self.source, year, image_set)
                require(os.path.isfile(path), f"splits: {split}: the image set file {path} does not exist")
        storage.check_writable(self.output, "output")


def safe_key(text: str) -> str:
    """A webdataset-safe sample key (no dots or slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


# ---------------------------------------------------------------- synthetic (serial)

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


# ---------------------------------------------------------------- plans

# One planned sample: (key, image path relative to the source, label JSON text). Plain
# strings keep a 1.28M-image plan small in the driver and cheap to ship to workers.
PlannedSample = tuple[str, str, str]


@dataclass
class Plan:
    """Every sample a file builder will write, in order, and what the manifest says."""

    classes: list[str]
    kind: str
    samples: list[PlannedSample]
    extra: dict
    multi_label: bool = False

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for key, path, meta in self.samples:
            h.update(f"{key}\t{path}\t{meta}\n".encode())
        return h.hexdigest()


def _check_unique_keys(samples: list[PlannedSample]) -> None:
    seen: dict[str, str] = {}
    for key, path, _ in samples:
        if key in seen:
            raise ConfigError(f"two images map to the sample key {key!r}: {seen[key]} and {path} "
                              "(keys must be unique; the same image listed twice?)")
        seen[key] = path


def plan_imagefolder(cfg: BuildCorpusConfig) -> Plan:
    """Class folders sorted by name (their index order); files in a seeded shuffle so that
    every shard holds a mix of classes, not one class each."""
    classes = sorted(d for d in os.listdir(cfg.source) if os.path.isdir(os.path.join(cfg.source, d)))
    require(bool(classes), f"{cfg.source} has no class sub-directories")
    files = [(idx, name, fname) for idx, name in enumerate(classes)
             for fname in sorted(os.listdir(os.path.join(cfg.source, name)))
             if os.path.splitext(fname)[1].lower() in IMAGE_SUFFIXES]
    samples = []
    for k in np.random.default_rng(cfg.synthetic.seed).permutation(len(files)):
        idx, name, fname = files[k]
        stem = os.path.splitext(fname)[0]
        samples.append((safe_key(f"{name}_{stem}"), f"{name}/{fname}", json.dumps({"labels": [idx]})))
    return Plan(classes, "classification", samples, {"builder": "imagefolder", "source": cfg.source})


def plan_coco(cfg: BuildCorpusConfig) -> Plan:
    """Images by id; boxes xywh → xyxy, crowd flags kept as ignore regions, COCO's area kept."""
    coco = json.loads(storage.read_bytes(cfg.annotations))
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index_of = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, list] = {}
    for ann in coco.get("annotations", []):
        per_image.setdefault(ann["image_id"], []).append(ann)
    samples = []
    for img in sorted(coco["images"], key=lambda im: im["id"]):
        anns = per_image.get(img["id"], [])
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        box_labels = [index_of[a["category_id"]] for a in anns]
        crowd = [int(bool(a.get("iscrowd", 0))) for a in anns]  # kept as ignore regions for evaluation
        # COCO's own area (of the segmentation, not the box) decides the APs/APm/APl bucket;
        # null where the annotation has none (the reader then uses the box's w·h).
        area = [None if a.get("area") is None else float(a["area"]) for a in anns]
        labels = sorted({c for c, is_crowd in zip(box_labels, crowd) if not is_crowd})
        meta = {"labels": labels, "boxes": boxes, "box_labels": box_labels, "iscrowd": crowd, "area": area}
        # Image paths are read relative to source and must stay under it (no ../, no absolute path).
        safe_join(cfg.source, img["file_name"], f"{cfg.annotations}: image id {img['id']} file_name")
        stem = os.path.splitext(img["file_name"])[0]
        samples.append((safe_key(f"{img['id']}_{stem}"), img["file_name"], json.dumps(meta)))
    return Plan([c["name"] for c in categories], "detection", samples,
                {"builder": "coco", "annotations": cfg.annotations})


def plan_voc(cfg: BuildCorpusConfig) -> Plan:
    """The image sets in the order given, each in file order; keys ``<year>_<id>``."""
    from pseudobox.datasets import voc

    classes = list(cfg.classes) or list(voc.VOC_CLASSES)
    class_index = {c: i for i, c in enumerate(classes)}
    samples = []
    for split in cfg.splits:
        year, image_set = split.split("/")
        set_path = voc.image_set_path(cfg.source, year, image_set)
        for image_id in voc.read_image_set(set_path):
            # Ids name files under the devkit: plain names only (no ../, no directories).
            safe_join(cfg.source, image_id, f"{set_path}: image id", plain_name=True)
            meta = voc.parse_annotation(voc.annotation_path(cfg.source, year, image_id), class_index)
            samples.append((safe_key(f"{year}_{image_id}"), voc.image_relpath(year, image_id), json.dumps(meta)))
    return Plan(classes, "detection", samples, {"builder": "voc", "source": cfg.source, "splits": list(cfg.splits)})


def _image_base(cfg: BuildCorpusConfig) -> str:
    """Where relative image paths of a hashtag JSONL are read from: ``source``, else the JSONL's directory."""
    if cfg.source:
        return cfg.source
    jsonl = cfg.hashtags.jsonl
    return jsonl.rsplit("/", 1)[0] if "://" in jsonl else os.path.dirname(os.path.abspath(jsonl))


def _resolve_image(base: str, image: str, what: str = "image") -> str:
    """A URI or absolute path as given; a relative path under ``base``, which it may not leave."""
    if "://" in image or os.path.isabs(image):
        return image
    path = safe_join(base, image, what)
    return path if "://" in base else os.path.normpath(path)


def _jsonl_lines(uri: str) -> Iterator[bytes]:
    with storage.open_read(uri) as f:
        yield from f


def plan_hashtags(cfg: BuildCorpusConfig) -> Plan:
    """JSONL order; keys ``<line number>_<file stem>``; meta ``{"labels": [class names],
    "tags": [raw tags]}``; the report goes to the manifest's ``extra.hashtags`` and the log."""
    from pseudobox.datasets import hashtags

    h = cfg.hashtags
    vocab = hashtags.load_vocabulary(h.vocabulary)
    index = hashtags.index_hashtags(_jsonl_lines(h.jsonl), vocab, h.min_images)
    log.info("build-corpus:\n%s", hashtags.format_report(index.report))
    if not index.images:
        raise ConfigError(f"builder=hashtags: no image is left ({index.report['images_listed']} listed, "
                          f"{index.report['unmatched_tags']} of {index.report['tags']} tags matched no class, "
                          f"classes dropped: {index.report['classes_dropped']}); check hashtags.vocabulary "
                          f"and hashtags.min_images={h.min_images}")
    base = _image_base(cfg)
    samples = []
    for item in index.images:
        stem = os.path.splitext(item.image.rsplit("/", 1)[-1])[0]
        meta = {"labels": [index.kept_classes[c] for c in item.classes], "tags": item.tags}
        samples.append((safe_key(f"{item.line:08d}_{stem}"[:120]), _resolve_image(base, item.image, f"{h.jsonl}: line {item.line}: image"), json.dumps(meta)))
    extra = {"builder": "hashtags", "jsonl": h.jsonl, "vocabulary": h.vocabulary,
             "vocabulary_classes": list(vocab.classes), "hashtags": index.report}
    return Plan(index.kept_classes, "classification", samples, extra, multi_label=True)


# ---------------------------------------------------------------- writing one shard (any process)

class ShardTask(NamedTuple):
    output: str
    source: str
    name: str
    samples: list[PlannedSample]


def record_name(name: str) -> str:
    return name.removesuffix(".tar") + ".json"


def record_uri(output: str, name: str) -> str:
    return storage.join(output, RECORDS_DIR, record_name(name))


def image_ext(data: bytes) -> str:
    """``png`` or ``jpg`` by content (ImageNet has PNGs named .JPEG); raises if PIL cannot
    identify the image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        im.verify()
    return "png" if fmt == "PNG" else "jpg"


def read_image_file(path: str) -> bytes:
    """A local file's or a URI's (``s3://``, ``file://``) bytes; ``FileNotFoundError`` when absent."""
    if "://" in path:
        fs, fs_path = storage.split_uri(path)
        with fs.open(fs_path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def write_planned_shard(task: ShardTask) -> dict:
    """Write one shard of a plan, then its record; returns the record.

    A missing image file is skipped as ``missing_file``, one PIL cannot identify as
    ``unreadable``; other I/O errors raise, so the shard is retried rather than written
    short. Plain function: the process pool and the Ray tasks both run it.
    """
    skipped: dict[str, int] = {}
    examples: list[str] = []
    has_boxes = False

    def skip(reason: str, path: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if len(examples) < SKIPPED_EXAMPLES:
            examples.append(f"{reason}: {path}")

    def readable() -> Iterator[tuple[str, bytes, str, bytes]]:
        nonlocal has_boxes
        for key, rel, meta in task.samples:
            path = rel if "://" in rel else os.path.join(task.source, rel)  # hashtags: URIs, absolute paths
            try:
                data = read_image_file(path)
            except FileNotFoundError:
                skip("missing_file", rel)
                continue
            try:
                ext = image_ext(data)
            except Exception:  # PIL raises several kinds for non-images and broken headers
                skip("unreadable", rel)
                continue
            has_boxes = has_boxes or bool(json.loads(meta).get("boxes"))
            yield key, data, ext, meta.encode()

    uri = storage.join(task.output, task.name)
    count = write_shard(uri, readable())
    if count == 0:
        storage.remove(uri)  # every item skipped: the record alone says so
    record = {"name": task.name, "num_samples": count, "has_boxes": has_boxes, "skipped": skipped,
              "skipped_examples": examples}
    storage.write_json(record_uri(task.output, task.name), record)
    return record


# ---------------------------------------------------------------- the driver

def plan_shards(cfg: BuildCorpusConfig, plan: Plan) -> list[ShardTask]:
    n = cfg.samples_per_shard
    return [ShardTask(cfg.output, cfg.source, shard_name(i), plan.samples[start:start + n])
            for i, start in enumerate(range(0, len(plan.samples), n))]


def done_shards(output: str, names: list[str]) -> set[str]:
    """Shards whose record exists (and whose tar too, unless the record says it is empty)."""
    records = set(storage.listdir(storage.join(output, RECORDS_DIR)))
    tars = set(storage.listdir(output))
    done = set()
    for name in names:
        if record_name(name) not in records:
            continue
        if name in tars or storage.read_json(record_uri(output, name))["num_samples"] == 0:
            done.add(name)
    return done


def read_records(output: str, names: list[str]) -> list[dict]:
    with ThreadPoolExecutor(max_workers=16) as pool:  # many small GETs on S3
        return list(pool.map(lambda name: storage.read_json(record_uri(output, name)), names))


class _Progress:
    """Logs ``shards done/total`` about every 5% (and the last one)."""

    def __init__(self, total: int, done: int):
        self.total, self.done = total, done
        self.every = max(1, total // 20)

    def shard_done(self, record: dict) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            log.info("build-corpus: %d/%d shards written (last: %s, %d samples)", self.done, self.total,
                     record["name"], record["num_samples"])


def _write_serial(tasks: list[ShardTask], progress: _Progress) -> list[str]:
    for task in tasks:
        progress.shard_done(write_planned_shard(task))
    return []


def _write_process_pool(tasks: list[ShardTask], workers: int, progress: _Progress) -> list[str]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    failures = []
    # spawn, not fork: the driver may hold Ray or torch threads that a fork would copy mid-state.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(write_planned_shard, task): task.name for task in tasks}
        for future in as_completed(futures):
            try:
                progress.shard_done(future.result())
            except Exception as e:  # the other shards go on; a re-run retries this one
                failures.append(f"{futures[future]}: {type(e).__name__}: {e}")
    return failures


def _write_ray_tasks(tasks: list[ShardTask], ray_cfg: RayConfig, progress: _Progress) -> list[str]:
    import ray

    from pseudobox.pipelines.common import init_ray

    init_ray(ray_cfg)
    remote = ray.remote(num_cpus=1)(write_planned_shard)
    # A bounded window of tasks in flight keeps the plan's chunks out of the object store
    # until they are needed.
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue, in_flight, failures = list(tasks), {}, []
    while queue or in_flight:
        while queue and len(in_flight) < window:
            task = queue.pop(0)
            in_flight[remote.remote(task)] = task.name
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        name = in_flight.pop(ref)
        try:
            progress.shard_done(ray.get(ref))
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
    return failures


def build_from_plan(cfg: BuildCorpusConfig, plan: Plan) -> CorpusManifest:
    """Write the shards of ``plan`` that are not done yet, then ``corpus.json``."""
    _check_unique_keys(plan.samples)
    tasks = plan_shards(cfg, plan)
    require(bool(tasks), f"builder={cfg.builder}: nothing to write, {cfg.source or cfg.hashtags.jsonl} lists no images")
    fingerprint = run_fingerprint("build-corpus", cfg)
    fingerprint["plan"] = {"samples": len(plan.samples), "shards": len(tasks), "digest": plan.digest()}
    check_same_run(cfg.output, fingerprint, appliable=BUILD_APPLIABLE, defaults=config_defaults(cfg))
    done = done_shards(cfg.output, [t.name for t in tasks])
    pending = [t for t in tasks if t.name not in done]
    if pending and storage.exists(storage.join(cfg.output, MANIFEST_NAME)):
        storage.remove(storage.join(cfg.output, MANIFEST_NAME))  # incomplete until every shard is back
    if done:
        log.info("build-corpus: resuming: %d of %d shards already written, %d to write",
                 len(done), len(tasks), len(pending))
    workers = min(cfg.num_workers or os.cpu_count() or 1, len(pending))
    progress = _Progress(len(tasks), len(done))
    if not pending:
        failures = []
    elif cfg.parallel == "ray":
        failures = _write_ray_tasks(pending, cfg.ray, progress)
    elif cfg.parallel == "process" and workers > 1:
        failures = _write_process_pool(pending, workers, progress)
    else:
        failures = _write_serial(pending, progress)
    if failures:
        raise RuntimeError(f"build-corpus: {len(failures)} shard(s) failed, corpus.json not written; re-run the "
                           "same command to write only those:\n  " + "\n  ".join(failures[:10]))

    records = read_records(cfg.output, [t.name for t in tasks])
    skipped: dict[str, int] = {}
    examples: list[str] = []
    for record in records:
        for reason, n in record["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        examples += record["skipped_examples"][:SKIPPED_EXAMPLES - len(examples)]
    if skipped:
        log.warning("build-corpus: skipped %s (per shard in %s/*.json), e.g. %s", skipped,
                    storage.join(cfg.output, RECORDS_DIR), "; ".join(examples))
    shards = [ShardInfo(r["name"], r["num_samples"]) for r in records if r["num_samples"] > 0]
    if not shards:
        raise CorpusError(f"build-corpus: every image was skipped ({skipped}); check source={cfg.source}")
    manifest = CorpusManifest(classes=plan.classes, shards=shards, kind=plan.kind, multi_label=plan.multi_label,
                              has_boxes=any(r["has_boxes"] for r in records),
                              extra={**plan.extra, "skipped": skipped})
    storage.write_json(storage.join(cfg.output, MANIFEST_NAME), manifest.to_json())
    return manifest


def build_imagefolder(cfg: BuildCorpusConfig) -> CorpusManifest:
    return build_from_plan(cfg, plan_imagefolder(cfg))


def build_coco(cfg: BuildCorpusConfig) -> CorpusManifest:
    return build_from_plan(cfg, plan_coco(cfg))


def build_voc(cfg: BuildCorpusConfig) -> CorpusManifest:
    return build_from_plan(cfg, plan_voc(cfg))


def build_hashtags(cfg: BuildCorpusConfig) -> CorpusManifest:
    return build_from_plan(cfg, plan_hashtags(cfg))


def run(cfg: BuildCorpusConfig) -> CorpusManifest:
    cfg.check_paths()
    builder = {"synthetic": build_synthetic, "imagefolder": build_imagefolder, "coco": build_coco,
               "voc": build_voc, "hashtags": build_hashtags}[cfg.builder]
    manifest = builder(cfg)
    skipped = sum(manifest.extra.get("skipped", {}).values())
    log.info("build-corpus: %d samples in %d shards, %d classes, %d items skipped → %s", manifest.num_samples,
             len(manifest.shards), len(manifest.classes), skipped, cfg.output)
    return manifest

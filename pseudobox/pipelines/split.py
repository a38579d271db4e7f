"""Stage ``split``: which images of a detection corpus are labeled, reproducibly.

Modes (``mode``):
  * ``kshot``: a seeded k-shot split (k images per class), for few-shot fine-tuning;
  * ``percent``: COCO-standard style, ``percent`` % of the corpus's images labeled, fold
    ``fold`` drawn with seed ``fold`` (folds 1..5 as in the COCO-standard protocol);
  * ``sets``: VOC style, labeled set A = the images of ``corpus`` (or the keys of
    ``labeled_keys``, a JSON file with a ``keys`` list), unlabeled set B = the images of
    ``unlabeled_corpus`` (e.g. VOC07 trainval labeled, VOC12 trainval unlabeled).

Reads only the samples' JSON (no image decoding) and writes one JSON file with ``keys``
(the labeled images), ``mode``, its parameters and seed, and ``unlabeled_keys`` (the
corpus minus ``keys``) whenever the unlabeled images come from the labeled corpus, so an
unlabeled stream never sees a labeled image. ``finetune split=...``, ``evaluate split=...``
and the semi-supervised stage take it; ``pseudobox.datasets.splits.read_split`` reads it
(a plain ``{"keys": [...]}`` file is still valid everywhere).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pseudobox import storage
from pseudobox.config import path_field, require
from pseudobox.pipelines.common import log

MODES = ("kshot", "percent", "sets")


@dataclass
class SplitConfig:
    corpus: str = path_field()
    output: str = path_field()
    mode: str = "kshot"
    k: int = 10                           # kshot: images per class
    seed: int = 0                         # kshot: the draw's seed
    percent: float = 10.0                 # percent: share of the corpus's images labeled, in (0, 100]
    fold: int = 1                         # percent: fold f is drawn with seed f
    unlabeled_corpus: str = path_field()  # sets: set B (empty: the labeled corpus's other images)
    labeled_keys: str = path_field()      # sets: optional JSON with the "keys" of set A (default: all of corpus)

    def validate(self) -> None:
        require(bool(self.corpus) and bool(self.output), "corpus and output are required")
        require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        require(self.k >= 1, "k must be >= 1")
        require(0.0 < self.percent <= 100.0, "percent must be in (0, 100]")
        require(self.fold >= 0, "fold must be >= 0")
        if self.mode == "sets":
            require(bool(self.unlabeled_corpus) or bool(self.labeled_keys),
                    "mode=sets needs unlabeled_corpus=URI (set B), or labeled_keys=FILE (set A within corpus)")

    def check_paths(self) -> None:
        storage.check_readable(self.corpus, "corpus")
        if self.mode == "sets":
            if self.unlabeled_corpus:
                storage.check_readable(self.unlabeled_corpus, "unlabeled_corpus")
            if self.labeled_keys:
                storage.check_readable(self.labeled_keys, "labeled_keys")
        storage.check_writable(self.output, "output")


def corpus_samples(corpus_uri: str) -> list[tuple[str, list[int]]]:
    """``(key, classes present in its boxes)`` for every readable sample, with or without boxes."""
    from pseudobox.datasets.corpus import iter_shard, load_manifest, shard_uris

    manifest = load_manifest(corpus_uri)
    out = []
    for uri in shard_uris(corpus_uri, manifest):
        for raw in iter_shard(uri):
            if raw["error"] or raw["meta"] is None or raw["image"] is None:
                continue
            try:
                meta = json.loads(raw["meta"])
            except ValueError:
                continue
            labels = [int(c) for c in meta.get("box_labels", []) if isinstance(c, int) and 0 <= c < len(manifest.classes)]
            out.append((raw["key"], sorted(set(labels))))
    return out


def box_classes_per_image(corpus_uri: str) -> list[tuple[str, list[int]]]:
    """``(key, classes present in its boxes)`` for every readable sample that has boxes."""
    return [(key, labels) for key, labels in corpus_samples(corpus_uri) if labels]


def make_split(cfg: SplitConfig, samples: list[tuple[str, list[int]]],
               unlabeled_samples: list[tuple[str, list[int]]] | None = None,
               labeled_keys: list[str] | None = None) -> dict:
    """The split file's content for ``cfg`` from the corpus's ``samples`` (``corpus_samples``);
    ``unlabeled_samples`` are set B's (``sets`` with another corpus), ``labeled_keys`` set A's
    keys file. No I/O: the stage reads, this decides."""
    from pseudobox.datasets.splits import kshot_split, kshot_split_report, percent_split, unlabeled_complement

    all_keys = [key for key, _ in samples]
    split: dict = {"mode": cfg.mode, "corpus": cfg.corpus}
    if cfg.mode == "kshot":
        with_boxes = [(key, labels) for key, labels in samples if labels]
        require(bool(with_boxes), f"{cfg.corpus} has no samples with boxes to split")
        keys = kshot_split(with_boxes, cfg.k, cfg.seed)
        per_class = kshot_split_report(with_boxes, keys)
        split.update({"k": cfg.k, "seed": cfg.seed, "images_per_class": {str(c): n for c, n in per_class.items()}})
    elif cfg.mode == "percent":
        require(bool(all_keys), f"{cfg.corpus} has no readable samples to split")
        keys = percent_split(all_keys, cfg.percent, cfg.fold)
        split.update({"percent": cfg.percent, "fold": cfg.fold, "seed": cfg.fold, "corpus_images": len(all_keys)})
    else:
        keys = sorted(all_keys) if labeled_keys is None else sorted(set(labeled_keys))
        missing = sorted(set(keys) - set(all_keys))
        require(not missing, f"labeled_keys: {len(missing)} keys are not readable samples of {cfg.corpus} "
                             f"(e.g. {missing[:3]})")
        if cfg.unlabeled_corpus and cfg.unlabeled_corpus != cfg.corpus:
            b_keys = sorted(key for key, _ in unlabeled_samples or [])
            require(bool(b_keys), f"unlabeled_corpus {cfg.unlabeled_corpus} has no readable samples")
            split.update({"unlabeled_corpus": cfg.unlabeled_corpus, "unlabeled_images": len(b_keys)})
        split.update({"labeled_keys_file": cfg.labeled_keys, "seed": None})
    require(bool(keys), f"the split of {cfg.corpus} has no labeled images")
    split["keys"] = keys
    if "unlabeled_corpus" not in split:  # the unlabeled images are the rest of this corpus
        split["unlabeled_keys"] = unlabeled_complement(all_keys, keys)
        require(cfg.mode != "sets" or bool(split["unlabeled_keys"]),
                f"mode=sets: labeled_keys cover every image of {cfg.corpus}; set unlabeled_corpus=URI (set B)")
    return split


def run(cfg: SplitConfig) -> dict:
    cfg.check_paths()
    samples = corpus_samples(cfg.corpus)
    unlabeled = None
    if cfg.mode == "sets" and cfg.unlabeled_corpus and cfg.unlabeled_corpus != cfg.corpus:
        unlabeled = corpus_samples(cfg.unlabeled_corpus)
    labeled_keys = None
    if cfg.mode == "sets" and cfg.labeled_keys:
        from pseudobox.datasets.splits import read_split

        labeled_keys = read_split(cfg.labeled_keys).keys
    split = make_split(cfg, samples, unlabeled, labeled_keys)
    storage.write_json(cfg.output, split)
    if cfg.mode == "kshot":
        log.info("split: %d-shot, seed %d: %d images", cfg.k, cfg.seed, len(split["keys"]))
    else:
        rest = (f"{len(split['unlabeled_keys'])} unlabeled" if "unlabeled_keys" in split
                else f"{split['unlabeled_images']} unlabeled in {cfg.unlabeled_corpus}")
        log.info("split: %s: %d labeled, %s → %s", cfg.mode, len(split["keys"]), rest, cfg.output)
    return split

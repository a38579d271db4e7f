"""Stage ``split``: a seeded k-shot split of a detection corpus (k images per class).

Reads only the samples' JSON (no image decoding) and writes ``{"keys": [...], ...}``,
the file that ``finetune split=...`` and ``evaluate split=...`` take.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pseudobox import storage
from pseudobox.config import path_field, require
from pseudobox.pipelines.common import log


@dataclass
class SplitConfig:
    corpus: str = path_field()
    output: str = path_field()
    k: int = 10
    seed: int = 0

    def validate(self) -> None:
        require(bool(self.corpus) and bool(self.output), "corpus and output are required")
        require(self.k >= 1, "k must be >= 1")

    def check_paths(self) -> None:
        storage.check_readable(self.corpus, "corpus")
        storage.check_writable(self.output, "output")


def box_classes_per_image(corpus_uri: str) -> list[tuple[str, list[int]]]:
    """``(key, classes present in its boxes)`` for every readable sample."""
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
            if labels:
                out.append((raw["key"], sorted(set(labels))))
    return out


def run(cfg: SplitConfig) -> dict:
    from pseudobox.datasets.splits import kshot_split, kshot_split_report

    cfg.check_paths()
    samples = box_classes_per_image(cfg.corpus)
    require(bool(samples), f"{cfg.corpus} has no samples with boxes to split")
    keys = kshot_split(samples, cfg.k, cfg.seed)
    per_class = kshot_split_report(samples, keys)
    split = {"corpus": cfg.corpus, "k": cfg.k, "seed": cfg.seed, "keys": keys,
             "images_per_class": {str(c): n for c, n in per_class.items()}}
    storage.write_json(cfg.output, split)
    log.info("split: %d-shot, seed %d: %d images", cfg.k, cfg.seed, len(keys))
    return split

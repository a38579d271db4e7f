"""Ray Data at the edge: stream corpus shards and decode them in a CPU stage.

``ShardDatasource`` is a Ray ``FileBasedDatasource`` that parses webdataset tars like
``ray.data.read_webdataset`` does, with one difference that matters at scale: a
truncated or unreadable tar does not fail the job. The samples read before the break
are kept and one error row records it, so the per-shard report can count it.

Rows carry a fixed schema: ``key, shard, image (bytes), image_ext, meta (bytes), error``.
``decode_batch`` is the CPU decode stage, a plain function that runs without Ray.

A plain folder of images (``predict`` on data that is not a corpus) is read the same
way: its files, sorted, are grouped into pseudo-shards of ``FILES_PER_SHARD``
(``images-000000.tar``, ... named like tar shards so that per-shard parts, reports and
resume apply unchanged), one Ray Data read task each; keys are the relative paths.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from pseudobox import storage
from pseudobox.datasets.corpus import (
    IMAGE_EXTS, decode_raw_image, decode_sample, iter_raw_samples, load_manifest, shard_uris, tally_error,
)

RAW_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("image", pa.binary()),
    ("image_ext", pa.string()), ("meta", pa.binary()), ("error", pa.string()),
])
ROWS_PER_BLOCK = 256
FILES_PER_SHARD = 256
PLACEHOLDER_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)


def _datasource_cls():
    from ray.data.datasource import FileBasedDatasource

    class ShardDatasource(FileBasedDatasource):
        """Streams webdataset tar shards; tolerant of truncated tars (see module doc)."""

        _FILE_EXTENSIONS = ["tar"]

        def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
            rows = []
            for row in iter_raw_samples(stream, storage.basename(path)):
                rows.append(row)
                if len(rows) >= ROWS_PER_BLOCK:
                    yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)

    return ShardDatasource


def read_shards(uris: list[str], override_num_blocks: int | None = None, shuffle: bool = False):
    """A Ray Dataset streaming the raw rows of the given shard URIs (local or s3://).

    ``shuffle`` reads the shards in a new random order each epoch (training: corpora are
    often written class by class).
    """
    import ray

    if not uris:
        raise ValueError("no shards to read")
    fs, _ = storage.pyarrow_filesystem(uris[0])
    paths = [storage.split_uri(u)[1] for u in uris]
    datasource = _datasource_cls()(paths, filesystem=fs, shuffle="files" if shuffle else None)
    return ray.data.read_datasource(datasource, override_num_blocks=override_num_blocks or len(paths))


def read_corpus(corpus_uri: str, shards: list[str] | None = None, shuffle: bool = False):
    """Stream a corpus (all shards, or the named subset) as raw rows."""
    manifest = load_manifest(corpus_uri)
    uris = shard_uris(corpus_uri, manifest)
    if shards is not None:
        wanted = set(shards)
        uris = [u for u in uris if storage.basename(u) in wanted]
    return read_shards(uris, shuffle=shuffle)


def object_array(items) -> np.ndarray:
    """A 1-D object array of per-row arrays (ragged columns for Ray Data numpy batches)."""
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def decode_unlabelled(raw: dict) -> dict:
    """A raw row without annotations (an image file) → ``{key, shard, image}``; raises
    ``ValueError("<kind>: ...")`` like ``decode_sample``."""
    return {"key": raw["key"], "shard": raw["shard"], "image": decode_raw_image(raw), "labels": []}


def decode_batch(batch: dict, classes: list[str], keep_errors: bool = True,
                 keys: set[str] | None = None, labelled: bool = True) -> dict:
    """CPU decode stage: raw rows → images (HWC uint8) with validated labels and boxes.

    A bad sample becomes a row with a non-empty ``error`` (``"<kind>: detail"``) and a
    1×1 placeholder image, so that consumers can count it per shard; with
    ``keep_errors=False`` it is dropped instead (training). ``keys`` keeps only the
    listed sample keys (k-shot splits). ``labelled=False`` decodes images without
    annotations (image folders): no labels, no boxes.

    These are training rows: crowd / difficult boxes are left out, and so is the
    evaluation-only COCO ``area`` (``decode_sample`` has it; evaluation reads samples
    with ``corpus.iter_corpus``). A per-box column here would fall out of step with
    ``boxes`` in the stages that filter or replace boxes (``train_detector``,
    ``pretrain``).
    """
    out: dict[str, list] = {k: [] for k in ("key", "shard", "image", "labels", "boxes", "box_labels", "error")}
    for i in range(len(batch["key"])):
        raw = {k: batch[k][i] for k in ("key", "shard", "image", "image_ext", "meta", "error")}
        if keys is not None and raw["key"] not in keys and not raw["error"]:
            continue
        try:
            s = decode_sample(raw, classes) if labelled else decode_unlabelled(raw)
            boxes = s.get("boxes", np.zeros((0, 4), np.float32))
            box_labels = s.get("box_labels", np.zeros((0,), np.int64))
            if len(boxes):  # crowd / difficult boxes are evaluation-only: not targets
                keep = ~(s["iscrowd"] | s["difficult"])
                boxes, box_labels = boxes[keep], box_labels[keep]
            row = (s["key"], s["shard"], s["image"], np.asarray(s["labels"], dtype=np.int64), boxes, box_labels, "")
        except ValueError as e:
            if not keep_errors:
                continue
            row = (str(raw["key"]), str(raw["shard"]), PLACEHOLDER_IMAGE, np.zeros((0,), np.int64),
                   np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), str(e))
        for name, value in zip(out, row):
            out[name].append(value)
    return {
        "key": np.asarray(out["key"], dtype=object), "shard": np.asarray(out["shard"], dtype=object),
        "image": object_array(out["image"]), "labels": object_array(out["labels"]),
        "boxes": object_array(out["boxes"]), "box_labels": object_array(out["box_labels"]),
        "error": np.asarray(out["error"], dtype=object),
    }


def decoded_corpus(corpus_uri: str, keep_errors: bool = True, keys: set[str] | None = None,
                   shards: list[str] | None = None, batch_size: int = 32, shuffle: bool = False):
    """``read_corpus`` followed by the CPU decode stage, as one Ray Dataset."""
    classes = load_manifest(corpus_uri).classes
    return read_corpus(corpus_uri, shards=shards, shuffle=shuffle).map_batches(
        decode_batch, fn_kwargs={"classes": classes, "keep_errors": keep_errors, "keys": keys},
        batch_size=batch_size, batch_format="numpy", num_cpus=1,
    )


def count_errors(errors: np.ndarray, shards: np.ndarray, report: dict) -> None:
    """Add a batch's error rows into ``report[shard][kind]``."""
    for err, shard in zip(errors, shards):
        if err:
            tally_error(report.setdefault(str(shard), {}), str(err))


def list_image_files(folder_uri: str) -> list[str]:
    """Paths, relative to ``folder_uri`` and sorted, of every .jpg/.jpeg/.png under it
    (recursively; any letter case)."""
    fs, root = storage.split_uri(folder_uri)
    root = root.rstrip("/")
    found = []
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        if rel.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in rel:
            found.append(rel)
    return sorted(found)


def image_folder_shards(files: list[str], files_per_shard: int = FILES_PER_SHARD) -> dict[str, list[str]]:
    """Sorted files in pseudo-shards: ``{"images-000000.tar": [first files_per_shard], ...}``.
    Deterministic, so a re-run finds the same shards (and skips the finished ones)."""
    if files_per_shard < 1:
        raise ValueError("files_per_shard must be >= 1")
    files = sorted(files)
    return {f"images-{i // files_per_shard:06d}.tar": files[i:i + files_per_shard]
            for i in range(0, len(files), files_per_shard)}


def read_image_group(row: dict, folder_uri: str) -> list[dict]:
    """Read task of one pseudo-shard: its files as raw rows (``RAW_SCHEMA``). A file that
    cannot be read becomes an error row (``missing_image``) instead of failing the job."""
    out = []
    for rel in row["files"]:
        raw = {"key": rel, "shard": row["shard"], "image": None, "image_ext": rel.rsplit(".", 1)[-1].lower(),
               "meta": None, "error": ""}
        try:
            raw["image"] = storage.read_bytes(storage.join(folder_uri, rel))
        except (storage.StorageError, PermissionError, IsADirectoryError) as e:  # I/O errors: retried
            raw["error"] = f"missing_image: {type(e).__name__}: {e}"
        out.append(raw)
    return out


def decoded_image_folder(folder_uri: str, groups: dict[str, list[str]], batch_size: int = 32):
    """The pseudo-shards ``groups`` of an image folder (``image_folder_shards``) as a Ray
    Dataset of decoded, unlabelled rows: one read task per pseudo-shard, then the CPU
    decode stage."""
    import ray

    if not groups:
        raise ValueError("no image files to read")
    items = [{"shard": shard, "files": list(files)} for shard, files in groups.items()]
    return ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        read_image_group, fn_kwargs={"folder_uri": folder_uri}, num_cpus=1,
    ).map_batches(decode_batch, fn_kwargs={"classes": [], "keep_errors": True, "labelled": False},
                  batch_size=batch_size, batch_format="numpy", num_cpus=1)

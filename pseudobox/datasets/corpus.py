"""The corpus format: webdataset tar shards plus a ``corpus.json`` manifest.

A sample is ``KEY.jpg`` (or ``.png``) plus ``KEY.json`` holding
``{"labels": [class indices], "tags": [...]?, "boxes": [[x1,y1,x2,y2], ...]?, "box_labels": [...]?,
"iscrowd": [0|1 per box]?, "difficult": [0|1 per box]?, "area": [float|null per box]?}``.
Boxes are xyxy absolute pixels. ``area`` is COCO's annotation area (the segmentation's,
which COCO's small/medium/large buckets use); corpora written without it, and ``null``
entries, fall back to the box's w·h. The manifest is written last, so a corpus whose
``corpus.json`` exists is complete.

This module has no Ray in it: writing, reading and decoding are plain functions that
the Ray launchers (``ray_io.py``) wrap.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from pseudobox import storage

SCHEMA_VERSION = 1
MANIFEST_NAME = "corpus.json"
IMAGE_EXTS = ("jpg", "jpeg", "png")


class CorpusError(ValueError):
    """A corpus that cannot be used (missing manifest, wrong schema version...)."""


def safe_join(root: str, relative: str, what: str, plain_name: bool = False) -> str:
    """``root`` joined with a path read from a manifest, list or config, refused with a
    ``CorpusError`` naming ``what`` unless it stays under ``root``: no absolute path, no
    URI, no ``..`` above the root (``../../x``). ``plain_name``: a bare file name, no
    directories at all (shard names in ``corpus.json``)."""
    text = str(relative)
    norm = posixpath.normpath(text.replace("\\", "/"))
    escapes = (not text.strip() or "://" in text or text.startswith(("/", "\\", "~")) or os.path.isabs(text)
               or norm == "." or norm == ".." or norm.startswith("../") or "\0" in text)
    if plain_name and not escapes:
        escapes = "/" in text or "\\" in text
    if escapes:
        kind = "a plain file name (no directories)" if plain_name else f"a relative path that stays under {root}"
        raise CorpusError(f"{what}: {text!r} is not {kind}; refused")
    rel = posixpath.normpath(text)
    return storage.join(root, rel) if "://" in root else os.path.join(root, rel)


@dataclass
class ShardInfo:
    name: str
    num_samples: int


@dataclass
class CorpusManifest:
    classes: list[str]
    shards: list[ShardInfo]
    kind: str = "classification"  # or "detection"
    multi_label: bool = False
    has_boxes: bool = False
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_samples"] = self.num_samples
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = "corpus.json") -> "CorpusManifest":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CorpusError(f"{where}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        if not isinstance(d.get("classes"), list) or not d["classes"]:
            raise CorpusError(f"{where}: 'classes' must be a non-empty list")
        shards = [ShardInfo(**s) for s in d.get("shards", [])]
        for s in shards:  # shard files live directly beside corpus.json, never elsewhere
            safe_join(".", s.name, f"{where}: shard name", plain_name=True)
        return cls(
            classes=list(d["classes"]), shards=shards, kind=d.get("kind", "classification"),
            multi_label=bool(d.get("multi_label", False)), has_boxes=bool(d.get("has_boxes", False)),
            schema_version=version, extra=dict(d.get("extra", {})),
        )


def load_manifest(corpus_uri: str) -> CorpusManifest:
    uri = storage.join(corpus_uri, MANIFEST_NAME)
    if not storage.exists(uri):
        raise CorpusError(f"{corpus_uri} is not a corpus: {MANIFEST_NAME} is missing (build one with `pseudobox build-corpus`)")
    return CorpusManifest.from_json(storage.read_json(uri), where=uri)


def shard_uris(corpus_uri: str, manifest: CorpusManifest | None = None) -> list[str]:
    manifest = manifest or load_manifest(corpus_uri)
    return [storage.join(corpus_uri, s.name) for s in manifest.shards]


def encode_image(image: np.ndarray, fmt: str = "jpg", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "png":
        pil.save(buf, format="PNG")
    else:
        pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_shard(uri: str, samples: Iterable[tuple[str, bytes, str, dict | bytes]]) -> int:
    """Write ``(key, image_bytes, image_ext, meta)`` samples as one webdataset tar at
    ``uri``, atomically; returns the number of samples.

    Members go image first, then JSON, per key, in the given order (``TarWriter.write``
    sorts a sample's members by extension, which puts ``.json`` before ``.png``, so each
    member is its own write). Member mtimes are 0: the same samples give the same bytes.
    """
    from webdataset import TarWriter

    count = 0
    with storage.atomic_local_path(uri) as tmp:
        with open(tmp, "wb") as f:
            with TarWriter(f, encoder=False, mtime=0, user="", group="", mode=0o644, format="PAX_FORMAT") as tar:
                for key, data, ext, meta in samples:
                    if not isinstance(meta, bytes):
                        meta = json.dumps(meta).encode()
                    tar.write({"__key__": key, ext: data})
                    tar.write({"__key__": key, "json": meta})
                    count += 1
            f.flush()
            os.fsync(f.fileno())
    return count


class CorpusWriter:
    """Writes samples into tar shards of ``samples_per_shard``; each shard lands atomically.

    ``close()`` writes ``corpus.json`` last, which marks the corpus complete.
    """

    def __init__(self, uri: str, classes: list[str], samples_per_shard: int = 1000,
                 kind: str = "classification", multi_label: bool = False, extra: dict | None = None):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.uri = uri
        self.classes = list(classes)
        self.samples_per_shard = samples_per_shard
        self.kind = kind
        self.multi_label = multi_label
        self.extra = extra or {}
        self.shards: list[ShardInfo] = []
        self.has_boxes = False
        self._pending: list[tuple[str, bytes, str, dict]] = []
        self._keys: set[str] = set()
        storage.makedirs(uri)

    def add(self, key: str, image_bytes: bytes, meta: dict, ext: str = "jpg") -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        self.has_boxes = self.has_boxes or bool(meta.get("boxes"))
        self._pending.append((key, image_bytes, ext, meta))
        if len(self._pending) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = shard_name(len(self.shards))
        write_shard(storage.join(self.uri, name), self._pending)
        self.shards.append(ShardInfo(name=name, num_samples=len(self._pending)))
        self._pending = []

    def close(self) -> CorpusManifest:
        self._flush()
        manifest = CorpusManifest(classes=self.classes, shards=self.shards, kind=self.kind,
                                  multi_label=self.multi_label, has_boxes=self.has_boxes, extra=self.extra)
        storage.write_json(storage.join(self.uri, MANIFEST_NAME), manifest.to_json())
        return manifest


# ---------------------------------------------------------------- reading

def _split_key(fname: str) -> tuple[str, str]:
    base = os.path.basename(fname)
    if "." not in base:
        return fname, ""
    stem, ext = base.split(".", 1)
    return os.path.join(os.path.dirname(fname), stem), ext.lower()


class _CountingReader:
    """Wraps a stream and counts the bytes read, to tell a tar cut exactly at a member
    boundary from a whole one: ``tarfile`` ends both quietly, but only a whole tar has an
    end-of-archive block where the next header would start."""

    def __init__(self, fileobj):
        self.fileobj = fileobj
        self.total = 0

    def read(self, size=-1):
        data = self.fileobj.read(size)
        self.total += len(data)
        return data


def iter_raw_samples(fileobj, shard_name: str) -> Iterator[dict]:
    """Group a tar stream's members into raw samples ``{key, shard, image, image_ext, meta, error}``.

    A truncated or malformed tar stops the shard; the samples read so far are kept and
    one extra record with ``error="truncated_shard: ..."`` says what happened. Network or
    disk errors are raised, not recorded, so the read is retried instead of a shard being
    marked done with samples missing.
    """
    current: dict | None = None
    reader = _CountingReader(fileobj)
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = _split_key(info.name)
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is cut short")
                if current is None or current["key"] != key:
                    if current is not None:
                        yield current
                    current = {"key": key, "shard": shard_name, "image": None, "image_ext": "",
                               "meta": None, "error": ""}
                if ext in IMAGE_EXTS:
                    current["image"], current["image_ext"] = data, ext
                elif ext == "json":
                    current["meta"] = data
            if reader.total < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive block (file cut at a member boundary?)")
        if current is not None:
            yield current
    except (tarfile.TarError, EOFError) as e:  # I/O errors propagate: Ray retries the read
        # The sample being assembled when the tar broke keeps what was read; decoding
        # flags it if a member is missing.
        if current is not None:
            yield current
        yield {"key": f"__{shard_name}__truncated", "shard": shard_name, "image": None, "image_ext": "",
               "meta": None, "error": f"truncated_shard: {type(e).__name__}: {e}"}


def iter_shard(uri: str) -> Iterator[dict]:
    with storage.open_read(uri) as f:
        yield from iter_raw_samples(f, storage.basename(uri))


def error_kind(error: str) -> str:
    return error.split(":", 1)[0]


def tally_error(counts: dict, error: str) -> None:
    """Count one ``"<kind>: detail"`` error into ``counts[kind]``."""
    kind = error_kind(error)
    counts[kind] = counts.get(kind, 0) + 1


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG bytes into an HWC uint8 RGB array; raises on corrupt data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def parse_meta(meta_bytes: bytes | None, classes: list[str], image_hw: tuple[int, int]) -> dict:
    """Validate a sample's JSON. Raises ``ValueError("<kind>: <detail>")`` on bad input.

    Labels may be class indices or class names; unknown ones are an error.
    """
    if meta_bytes is None:
        raise ValueError("missing_json: no .json member")
    try:
        meta = json.loads(meta_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"invalid_json: {e}") from e
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError("invalid_json: no 'labels' field")

    def to_index(label):
        if isinstance(label, str):
            if label not in classes:
                raise ValueError(f"unknown_class: {label!r}")
            return classes.index(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(classes):
            raise ValueError(f"unknown_class: {label!r} (corpus has {len(classes)} classes)")
        return label

    labels, tags = meta["labels"], meta.get("tags", [])
    if not isinstance(labels, list):
        raise ValueError("invalid_json: 'labels' must be a list")
    if not isinstance(tags, list):
        raise ValueError("invalid_json: 'tags' must be a list")
    out = {"labels": [to_index(x) for x in labels], "tags": [str(t) for t in tags]}
    boxes = meta.get("boxes")
    if boxes is not None:
        box_labels = meta.get("box_labels")
        if not isinstance(boxes, list) or not isinstance(box_labels, list):
            raise ValueError("invalid_json: 'boxes' and 'box_labels' must be lists")
        try:
            arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid_json: boxes must be [[x1,y1,x2,y2], ...]: {e}") from e
        if box_labels is None or len(box_labels) != len(arr):
            raise ValueError("invalid_json: 'box_labels' must match 'boxes'")
        h, w = image_hw
        arr[:, 0::2] = arr[:, 0::2].clip(0, w)
        arr[:, 1::2] = arr[:, 1::2].clip(0, h)
        out["boxes"] = arr
        out["box_labels"] = np.asarray([to_index(x) for x in box_labels], dtype=np.int64)
        # Optional ignore flags: COCO crowd regions and VOC difficult objects are kept for
        # evaluation (neither TP nor FP there) and left out of training targets.
        for flag in ("iscrowd", "difficult"):
            values = meta.get(flag, [0] * len(arr))
            if not isinstance(values, list) or len(values) != len(arr):
                raise ValueError(f"invalid_json: '{flag}' must be a list matching 'boxes'")
            out[flag] = np.asarray(values, dtype=bool)
        out["area"] = _parse_area(meta.get("area"), arr)
    return out


def _parse_area(values, boxes: np.ndarray) -> np.ndarray:
    """Per-box ``area`` (float32 ``[N]``): the stored value, or the (clipped) box's w·h
    where it is absent or ``null``."""
    fallback = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    if values is None:
        return fallback.astype(np.float32)
    if not isinstance(values, list) or len(values) != len(boxes):
        raise ValueError("invalid_json: 'area' must be a list matching 'boxes'")
    out = fallback.astype(np.float32)
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise ValueError(f"invalid_json: 'area' entries must be finite numbers >= 0 or null, got {v!r}")
        out[i] = v
    return out


def decode_sample(raw: dict, classes: list[str]) -> dict:
    """Raw sample → ``{key, shard, image, labels, tags, boxes?, box_labels?, iscrowd?, difficult?, area?}``.

    Raises ``ValueError("<kind>: ...")`` for every kind of bad input so that callers can
    count it per shard and go on.
    """
    image = decode_raw_image(raw)
    meta = parse_meta(raw.get("meta"), classes, image.shape[:2])
    return {"key": raw["key"], "shard": raw["shard"], "image": image, **meta}


def decode_raw_image(raw: dict) -> np.ndarray:
    """A raw sample's image (HWC uint8 RGB); raises ``ValueError("<kind>: ...")`` for a read
    error recorded on the row, a missing image member or undecodable bytes."""
    if raw.get("error"):
        raise ValueError(raw["error"])
    if raw.get("image") is None:
        raise ValueError("missing_image: no .jpg/.png member")
    try:
        return decode_image(raw["image"])
    except Exception as e:
        raise ValueError(f"corrupt_image: {type(e).__name__}: {e}") from e


def iter_corpus(corpus_uri: str, errors: dict | None = None, keys: set[str] | None = None) -> Iterator[dict]:
    """Iterate decoded samples of a corpus without Ray (evaluation, galleries, tests).

    Bad samples are skipped and counted into ``errors[shard][kind]`` when given.
    """
    manifest = load_manifest(corpus_uri)
    for uri in shard_uris(corpus_uri, manifest):
        for raw in iter_shard(uri):
            if keys is not None and raw["key"] not in keys and not raw.get("error"):
                continue
            try:
                yield decode_sample(raw, manifest.classes)
            except ValueError as e:
                if errors is not None:
                    tally_error(errors.setdefault(raw["shard"], {}), str(e))

"""Ray Data at the edge: stream corpus shards and decode them in a CPU stage.

``ShardDatasource`` is a Ray ``FileBasedDatasource`` that parses webdataset tars like
``ray.data.read_webdataset`` does, with one difference that matters at scale: a
truncated or unreadable tar does not fail the job. The samples read before the break
are kept and one error row records it, so the per-shard report can count it.

Rows carry a fixed schema: ``key, shard, image (bytes), image_ext, meta (bytes), error``.
``decode_batch`` is the decode step, a plain function that runs without Ray: as its own
CPU stage (training, ``decoded_corpus``), or fused into an actor (``DecodingActor``:
``mine``/``predict`` decode where they compute, with no decoded images in the object
store). ``decode_images`` decodes a batch of encoded images on a device: JPEGs batched
with ``torchvision.io.decode_jpeg`` (on the GPU when the actor holds one), everything
else and every failure through PIL on the CPU.

A plain folder of images (``predict`` on data that is not a corpus) is read the same
way: its files, sorted, are grouped into pseudo-shards of ``FILES_PER_SHARD``
(``images-000000.tar``, ... named like tar shards so that per-shard parts, reports and
resume apply unchanged), one Ray Data read task each; keys are the relative paths.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from pseudobox import storage
from pseudobox.datasets.corpus import (
    IMAGE_EXTS, decode_image, decode_raw_image, decode_sample, iter_raw_samples, load_manifest, parse_meta, shard_uris,
    tally_error,
)

RAW_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("image", pa.binary()),
    ("image_ext", pa.string()), ("meta", pa.binary()), ("error", pa.string()),
])
ROWS_PER_BLOCK = 256
# CPUs a read task reserves when actors decode (``DecodingActor``): none, so that a pool
# holding every core (2 actors × 1 CPU on 2 cores) is still fed; reading is mostly I/O.
FUSED_READ_CPUS = 0.0
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


def read_shards(uris: list[str], override_num_blocks: int | None = None, shuffle: bool = False,
                read_cpus: float | None = None):
    """A Ray Dataset streaming the raw rows of the given shard URIs (local or s3://).

    ``shuffle`` reads the shards in a new random order each epoch (training: corpora are
    often written class by class). ``read_cpus``: CPUs each read task reserves (Ray
    Data's default, 1, when None). Reading a tar is I/O and byte copying; a stage whose
    actors decode (``DecodingActor``) reserves a fraction, so that actors holding every
    core still leave room for the reads that feed them.
    """
    import ray

    if not uris:
        raise ValueError("no shards to read")
    fs, _ = storage.pyarrow_filesystem(uris[0])
    paths = [storage.split_uri(u)[1] for u in uris]
    datasource = _datasource_cls()(paths, filesystem=fs, shuffle="files" if shuffle else None)
    extra = {} if read_cpus is None else {"ray_remote_args": {"num_cpus": read_cpus}}
    return ray.data.read_datasource(datasource, override_num_blocks=override_num_blocks or len(paths), **extra)


def read_corpus(corpus_uri: str, shards: list[str] | None = None, shuffle: bool = False,
                read_cpus: float | None = None):
    """Stream a corpus (all shards, or the named subset) as raw rows (``read_shards``)."""
    manifest = load_manifest(corpus_uri)
    uris = shard_uris(corpus_uri, manifest)
    if shards is not None:
        wanted = set(shards)
        uris = [u for u in uris if storage.basename(u) in wanted]
    return read_shards(uris, shuffle=shuffle, read_cpus=read_cpus)


def object_array(items) -> np.ndarray:
    """A 1-D object array of per-row arrays (ragged columns for Ray Data numpy batches)."""
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


JPEG_MAGIC = b"\xff\xd8\xff"


def _pil_to_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    """PIL decode (any format PIL reads) → CHW uint8 on ``device``."""
    return torch.from_numpy(decode_image(data).copy()).permute(2, 0, 1).to(device)  # PIL arrays are read-only


def _decode_jpegs(data: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """One batched ``decode_jpeg`` call (RGB, CHW uint8 on ``device``); raises if any fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def decode_images(data: list[bytes | None], device: str | torch.device = "cpu"
                  ) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode encoded images → (``[C=3, H, W]`` uint8 RGB tensors on ``device`` or None,
    per-image error strings, ``""`` when fine).

    JPEGs go through one batched ``torchvision.io.decode_jpeg(..., device=device)`` (nvJPEG
    on CUDA, libjpeg-turbo on the CPU); if the batch fails, each JPEG is retried on its own.
    PNGs and JPEGs that the batched decoder refuses go through PIL on the CPU (then to
    ``device``). An image nothing can decode gets ``None`` and ``"corrupt_image: ..."``
    (``"missing_image: ..."`` for ``None`` bytes); it never fails the batch.
    """
    device = torch.device(device)
    images: list[torch.Tensor | None] = [None] * len(data)
    errors = [""] * len(data)
    jpegs = [i for i, d in enumerate(data) if d is not None and bytes(d[:3]) == JPEG_MAGIC]
    try:
        for i, im in zip(jpegs, _decode_jpegs([bytes(data[i]) for i in jpegs], device) if jpegs else []):
            images[i] = im
    except RuntimeError:  # one bad JPEG fails the batched call: decode them one by one
        for i in jpegs:
            try:
                images[i] = _decode_jpegs([bytes(data[i])], device)[0]
            except RuntimeError:
                pass
    for i, d in enumerate(data):
        if images[i] is not None:
            continue
        if d is None:
            errors[i] = "missing_image: no .jpg/.png member"
            continue
        try:  # PNG, or a JPEG the batched decoder refused (PIL is more lenient)
            images[i] = _pil_to_tensor(bytes(d), device)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image, counted
            errors[i] = f"corrupt_image: {type(e).__name__}: {e}"
    return images, errors


def decode_unlabelled(raw: dict) -> dict:
    """A raw row without annotations (an image file) → ``{key, shard, image}``; raises
    ``ValueError("<kind>: ...")`` like ``decode_sample``."""
    return {"key": raw["key"], "shard": raw["shard"], "image": decode_raw_image(raw), "labels": []}


RAW_COLUMNS = ("key", "shard", "image", "image_ext", "meta", "error")


def _decode_on_device(rows: list[dict], device) -> list[tuple]:
    """``decode_images`` for the rows that have image bytes: per row ``(image HWC, error)``;
    images are numpy on the CPU, HWC views of device tensors elsewhere (no host copy)."""
    todo = [i for i, r in enumerate(rows) if not r["error"] and r["image"] is not None]
    tensors, errors = decode_images([rows[i]["image"] for i in todo], device)
    out: list[tuple] = [(None, "")] * len(rows)
    for i, t, err in zip(todo, tensors, errors):
        hwc = None if t is None else t.permute(1, 2, 0)
        out[i] = (hwc.numpy() if hwc is not None and hwc.device.type == "cpu" else hwc, err)
    return out


def decode_batch(batch: dict, classes: list[str], keep_errors: bool = True,
                 keys: set[str] | None = None, labelled: bool = True, device: str | None = None,
                 exclude_keys: set[str] | None = None) -> dict:
    """Decode step: raw rows → images (HWC uint8) with validated labels and boxes.

    A bad sample becomes a row with a non-empty ``error`` (``"<kind>: detail"``) and a
    1×1 placeholder image, so that consumers can count it per shard; with
    ``keep_errors=False`` it is dropped instead (training). ``keys`` keeps only the
    listed sample keys (k-shot splits), ``exclude_keys`` drops the listed ones (the
    unlabelled stream of a corpus whose split is labelled). ``labelled=False`` decodes images without
    annotations (image folders): no labels, no boxes. ``device`` (``"cpu"``, ``"cuda"``)
    decodes with ``decode_images`` there, batched; then images are numpy arrays on the
    CPU and HWC tensor views on a GPU (for an actor that computes there). ``None``: PIL,
    one image at a time (the separate CPU decode stage).

    These are training rows: crowd / difficult boxes are left out, and so is the
    evaluation-only COCO ``area`` (``decode_sample`` has it; evaluation reads samples
    with ``corpus.iter_corpus``). A per-box column here would fall out of step with
    ``boxes`` in the stages that filter or replace boxes (``train_detector``,
    ``pretrain``).
    """
    out: dict[str, list] = {k: [] for k in ("key", "shard", "image", "labels", "boxes", "box_labels", "error")}
    rows = [{k: batch[k][i] for k in RAW_COLUMNS} for i in range(len(batch["key"]))]
    rows = [r for r in rows if r["error"] or ((keys is None or r["key"] in keys)
                                              and (exclude_keys is None or r["key"] not in exclude_keys))]
    decoded = _decode_on_device(rows, device) if device is not None else None
    for i, raw in enumerate(rows):
        try:
            if decoded is None:
                s = decode_sample(raw, classes) if labelled else decode_unlabelled(raw)
            else:
                image, err = decoded[i]
                if raw["error"] or raw["image"] is None or err:
                    decode_raw_image({**raw, "error": raw["error"] or err})  # raises the row's error
                s = {"key": raw["key"], "shard": raw["shard"], "image": image,
                     **(parse_meta(raw["meta"], classes, tuple(image.shape[:2])) if labelled else {"labels": []})}
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


class DecodingActor:
    """Ray Data actor that decodes raw rows where it computes, then runs ``actor_cls``.

    Fusing the decode into the compute actor keeps decoded images out of the object store
    (a separate decode stage ships every decoded image from its task to the actor) and
    leaves no decode tasks competing with the actors for cores. Images are decoded on the
    actor's device (``actor_kwargs["device"]``, ``decode_images``): on its GPU when it
    holds one. ``actor_cls(**actor_kwargs)`` is built once per actor; it takes
    ``decode_batch`` rows.
    """

    def __init__(self, actor_cls, actor_kwargs: dict, classes: list[str], labelled: bool = True):
        self.inner = actor_cls(**actor_kwargs)
        self.classes, self.labelled = list(classes), labelled
        self.device = "cuda" if str(actor_kwargs.get("device", "cpu")).startswith("cuda") else "cpu"

    def __call__(self, batch: dict) -> dict:
        return self.inner(decode_batch(batch, self.classes, keep_errors=True, labelled=self.labelled,
                                       device=self.device))


def decoded_corpus(corpus_uri: str, keep_errors: bool = True, keys: set[str] | None = None,
                   shards: list[str] | None = None, batch_size: int = 32, shuffle: bool = False,
                   exclude_keys: set[str] | None = None):
    """``read_corpus`` followed by the CPU decode stage, as one Ray Dataset."""
    classes = load_manifest(corpus_uri).classes
    return read_corpus(corpus_uri, shards=shards, shuffle=shuffle).map_batches(
        decode_batch, fn_kwargs={"classes": classes, "keep_errors": keep_errors, "keys": keys,
                                 "exclude_keys": exclude_keys},
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

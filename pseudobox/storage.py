"""One place that maps URIs to filesystems, and atomic writes on all of them.

Local paths, ``file://`` and ``s3://`` are supported. S3 credentials come from the
standard AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``). An S3-compatible server is reached by
setting ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (the AWS SDK names), or
``PSEUDOBOX_S3_ENDPOINT`` which takes precedence.

Every write goes to a temporary name first and becomes visible in one step: a local
``os.replace`` or a single whole-object S3 PUT. A killed job never leaves half a file
under the final name.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Iterator

import fsspec

S3_SCHEMES = ("s3://", "s3a://")


class StorageError(RuntimeError):
    """A path or bucket that cannot be used, with a message that says which."""


def is_remote(uri: str) -> bool:
    return uri.startswith(S3_SCHEMES)


def s3_endpoint() -> str | None:
    for var in ("PSEUDOBOX_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


_S3_CACHE: dict = {}


def s3_filesystem():
    """An s3fs filesystem configured from the environment (no caching of listings).

    One client per process and setting: building a client costs far more than a call.
    """
    import s3fs

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    key = (os.getpid(), s3_endpoint(), region, os.environ.get("AWS_ACCESS_KEY_ID"))
    if key not in _S3_CACHE:
        _S3_CACHE[key] = s3fs.S3FileSystem(
            endpoint_url=s3_endpoint(),
            client_kwargs={"region_name": region} if region else {},
            use_listings_cache=False,
            skip_instance_cache=True,
        )
    return _S3_CACHE[key]


def split_uri(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URI; the path has no scheme."""
    if is_remote(uri):
        return s3_filesystem(), uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))


def pyarrow_filesystem(uri: str):
    """``(pyarrow.fs.FileSystem, path)`` for Ray Data and Ray Train storage."""
    import pyarrow.fs as pafs

    fs, path = split_uri(uri)
    if is_remote(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with forward slashes (also for local paths)."""
    out = uri.rstrip("/")
    for part in parts:
        out = posixpath.join(out, part.strip("/"))
    return out


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def exists(uri: str) -> bool:
    fs, path = split_uri(uri)
    return fs.exists(path)


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under a directory or prefix; empty if it does not exist."""
    fs, path = split_uri(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def makedirs(uri: str) -> None:
    fs, path = split_uri(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = split_uri(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def read_bytes(uri: str) -> bytes:
    fs, path = split_uri(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"not found: {uri}") from e


def read_json(uri: str):
    return json.loads(read_bytes(uri).decode("utf-8"))


def open_read(uri: str):
    """A binary, streaming file object."""
    fs, path = split_uri(uri)
    if not fs.exists(path):
        raise StorageError(f"not found: {uri}")
    return fs.open(path, "rb")


@contextlib.contextmanager
def atomic_local_path(uri: str) -> Iterator[str]:
    """Yield a local temp file path; on success it becomes ``uri`` in one step.

    Local targets: the temp file lives in the target directory and is ``os.replace``d.
    S3 targets: the temp file is local and is uploaded with a single PUT, which S3
    makes visible atomically. On error the temp file is removed and nothing appears.
    """
    fs, path = split_uri(uri)
    if is_remote(uri):
        tmpdir = tempfile.mkdtemp(prefix="pseudobox-put-")
        tmp = os.path.join(tmpdir, posixpath.basename(path))
        try:
            yield tmp
            fs.put_file(tmp, path)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    else:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_local_path(uri) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def json_safe(obj):
    """NaN/inf are not JSON: write them as null (e.g. COCO APl with no large objects)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(json_safe(obj), indent=2, allow_nan=False).encode("utf-8"))


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory to ``uri``, file by file, each file atomically."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as f:
                write_bytes(join(uri, rel), f.read())


def torch_save(obj, uri: str) -> None:
    """``torch.save`` to any URI, atomically. ``torch_load`` reads back only plain data
    (see there); checkpoints go through ``models.checkpoint.save_checkpoint``, which
    checks that."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(uri, buf.getvalue())


def torch_load(uri: str, map_location="cpu"):
    """``torch.load`` from any URI with ``weights_only=True``: tensors, numbers, strings,
    lists, tuples and dicts load; a file carrying anything else (e.g. a pickled callable)
    raises ``pickle.UnpicklingError`` before any of it runs. Files may come from shared
    buckets, so there is no unsafe variant."""
    import torch

    return torch.load(io.BytesIO(read_bytes(uri)), map_location=map_location, weights_only=True)


def check_readable(uri: str, what: str) -> None:
    """Fail early, naming ``what``, when an input path or bucket does not exist."""
    try:
        ok = exists(uri)
    except Exception as e:  # bad bucket, no credentials, endpoint down
        raise StorageError(f"{what}: cannot access {uri}: {e}") from e
    if not ok:
        raise StorageError(f"{what}: {uri} does not exist")


def check_writable(uri: str, what: str) -> None:
    """Fail early when an output location cannot be written (missing bucket, no rights)."""
    if is_remote(uri):
        fs, path = split_uri(uri)
        bucket = path.split("/", 1)[0]
        try:
            ok = fs.exists(bucket)
        except Exception as e:
            raise StorageError(f"{what}: cannot access bucket s3://{bucket}: {e}") from e
        if not ok:
            raise StorageError(f"{what}: bucket s3://{bucket} does not exist (create it first)")
        probe = join(uri, f".pseudobox-write-probe-{uuid.uuid4().hex[:8]}")
        try:
            write_bytes(probe, b"")
            remove(probe)
        except Exception as e:
            raise StorageError(f"{what}: cannot write under {uri}: {e}") from e
    else:
        _, path = split_uri(uri)
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent != path and not os.path.isdir(parent):
            raise StorageError(f"{what}: {uri} is under {parent}, which is a file")
        if not os.access(parent, os.W_OK):
            raise StorageError(f"{what}: {uri} is not writable")

"""One place that maps URIs to filesystems, and atomic writes on all of them.

Local paths, ``file://`` and ``s3://`` are supported. S3 credentials come from the
standard AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``). An S3-compatible server is reached by
setting ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (the AWS SDK names), or
``PSEUDOBOX_S3_ENDPOINT`` which takes precedence.

Every write goes to a temporary name first and becomes visible in one step: a local
``os.replace`` or a single whole-object S3 PUT. A killed job never leaves half a file
under the final name.

Transient S3 failures (connection refused or reset, timeouts, HTTP 5xx, SlowDown and
throttling) are retried in two layers: botocore's own retries (standard mode, a few quick
attempts, which also cover Ray Data's reads and Ray Train's checkpoint I/O through
``pyarrow_filesystem``), and around every call of this module an exponential backoff for up
to ``PSEUDOBOX_S3_RETRY_SECONDS`` (default 60) that rides out a longer outage. After that a
``StorageError`` names the URI and the last error. Other errors (missing key, access
denied) are raised at once.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import fsspec

S3_SCHEMES = ("s3://", "s3a://")
log = logging.getLogger("pseudobox.storage")
T = TypeVar("T")

RETRY_SECONDS_ENV = "PSEUDOBOX_S3_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 60.0
# botocore's layer: a few quick attempts per request (standard mode backs off
# exponentially with jitter), and socket timeouts shorter than botocore's 60 s defaults, so
# a hung endpoint surfaces sooner as a retryable timeout. The outer bound starts no new
# attempt after it expires, but one under way finishes (up to 3 x 30 s when hung).
BOTOCORE_CONFIG = {"retries": {"mode": "standard", "max_attempts": 3}, "connect_timeout": 10, "read_timeout": 30}
# S3 error codes that mean "try again later"; any HTTP 5xx counts too.
TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "ServiceUnavailable", "InternalError", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException",
})


class StorageError(RuntimeError):
    """A path or bucket that cannot be used, with a message that says which."""


def retry_seconds() -> float:
    """The bound on retrying one S3 call (``PSEUDOBOX_S3_RETRY_SECONDS``; 0 = none
    beyond botocore's own attempts)."""
    raw = os.environ.get(RETRY_SECONDS_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_RETRY_SECONDS
    except ValueError as e:
        raise StorageError(f"{RETRY_SECONDS_ENV} must be a number of seconds, got {raw!r}") from e
    if not math.isfinite(value) or value < 0:
        raise StorageError(f"{RETRY_SECONDS_ENV} must be >= 0 seconds, got {raw!r}")
    return value


def _transient_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]  # refused/reset/aborted, socket timeouts
    try:
        import botocore.exceptions as bex

        types += [bex.ConnectionError, bex.HTTPClientError]  # endpoint unreachable, closed, timed out
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is worth retrying: the endpoint could
    not be reached or timed out, or S3 answered 5xx / SlowDown / throttling. Missing keys,
    denied access and bad requests are not."""
    types, seen = _transient_types(), set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, PermissionError, StorageError)):
            return False
        if isinstance(exc, types):
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
            if str(error.get("Code")) in TRANSIENT_S3_CODES or int(status) >= 500 or int(status) == 429:
                return True
        if "SlowDown" in str(exc) or "reduce your request rate" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def redact(text: str) -> str:
    """``text`` with any credential value from the environment replaced by ``***``."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


_sleep, _clock = time.sleep, time.monotonic  # tests replace these


def retrying(uri: str, what: str, call: Callable[[], T]) -> T:
    """``call()``, retried on transient S3 errors with exponential backoff (0.5 s doubling to
    10 s, with jitter) for up to ``retry_seconds()``; then a ``StorageError`` naming ``what``,
    ``uri`` and the last error. Local URIs and other errors go through untouched. Only safe
    for calls that can be repeated whole (reads, listings, single whole-object PUTs)."""
    if not is_remote(uri):
        return call()
    bound, started, attempt = retry_seconds(), _clock(), 0
    while True:
        try:
            return call()
        except Exception as e:
            if not is_transient(e):
                raise
            attempt += 1
            elapsed = _clock() - started
            delay = min(10.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            last = redact(f"{type(e).__name__}: {e}")
            if elapsed + delay > bound:
                raise StorageError(
                    f"{what} {uri}: S3 still failing after {attempt} attempt(s) over {elapsed:.0f}s "
                    f"({RETRY_SECONDS_ENV}={bound:g}); last error: {last}") from e
            if attempt == 1 or attempt % 5 == 0:
                log.warning("S3 %s %s failed (%s); retrying for up to %.0fs more", what, uri, last, bound - elapsed)
            _sleep(delay)


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
            config_kwargs=copy.deepcopy(BOTOCORE_CONFIG),  # botocore rewrites its retries dict in place
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


def identity(uri: str, info: dict | None = None) -> dict:
    """What tells one version of a file from another: ``{"uri", "size", "etag"}`` on S3,
    ``{"uri", "size", "mtime_ns"}`` on local disk. Outputs record it for their inputs, so
    that a re-run can see an input that changed (a repaired shard) and redo its part.
    ``info``: the object's entry from a listing (``fs.ls(..., detail=True)``), which saves
    one request per file on S3. Raises ``StorageError`` when ``uri`` does not exist."""
    fs, path = split_uri(uri)
    try:
        if is_remote(uri):
            info = info or retrying(uri, "stat", lambda: fs.info(path))
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
            return {"uri": uri, "size": int(info["size"]), "etag": etag}
        st = os.stat(path)
    except FileNotFoundError as e:
        raise StorageError(f"not found: {uri}") from e
    return {"uri": uri, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def exists(uri: str) -> bool:
    fs, path = split_uri(uri)
    return retrying(uri, "exists", lambda: fs.exists(path))


def list_entries(uri: str) -> dict[str, dict]:
    """``{name: listing entry}`` (``type``, ``size``, and on S3 the ``ETag``) directly under
    a directory or prefix, from one listing; empty if it does not exist."""
    fs, path = split_uri(uri)

    def entries() -> list[dict]:
        return fs.ls(path, detail=True) if fs.exists(path) else []

    return {posixpath.basename(e["name"].rstrip("/")): e for e in retrying(uri, "list", entries)}


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under a directory or prefix; empty if it does not exist."""
    return sorted(list_entries(uri))


def makedirs(uri: str) -> None:
    fs, path = split_uri(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = split_uri(uri)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    retrying(uri, "remove", rm)


def read_bytes(uri: str) -> bytes:
    fs, path = split_uri(uri)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    try:
        return retrying(uri, "read", read)
    except FileNotFoundError as e:
        raise StorageError(f"not found: {uri}") from e


def read_json(uri: str):
    return json.loads(read_bytes(uri).decode("utf-8"))


def open_read(uri: str):
    """A binary, streaming file object."""
    fs, path = split_uri(uri)
    if not exists(uri):
        raise StorageError(f"not found: {uri}")
    return retrying(uri, "open", lambda: fs.open(path, "rb"))


@contextlib.contextmanager
def atomic_local_path(uri: str) -> Iterator[str]:
    """Yield a local temp file path; on success it becomes ``uri`` in one step.

    Local targets: the temp file lives in the target directory and is ``os.replace``d.
    S3 targets: the temp file is local and is uploaded with a single PUT, which S3
    makes visible atomically; a failed PUT is repeated whole (``retrying``), so a
    partial object never appears. On error the temp file is removed and nothing appears.
    """
    fs, path = split_uri(uri)
    if is_remote(uri):
        tmpdir = tempfile.mkdtemp(prefix="pseudobox-put-")
        tmp = os.path.join(tmpdir, posixpath.basename(path))
        try:
            yield tmp
            retrying(uri, "write", lambda: fs.put_file(tmp, path))
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


def bucket_exists(bucket: str) -> bool:
    """Whether an S3 bucket exists (HEAD bucket). Unlike ``fs.exists(bucket)``, which says
    False for any error, an unreachable endpoint is retried and then raised, so an outage
    is not reported as a missing bucket."""
    fs = s3_filesystem()

    def probe() -> bool:
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
            return True
        except FileNotFoundError:
            return False

    return retrying(f"s3://{bucket}", "check bucket", probe)


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
        _, path = split_uri(uri)
        bucket = path.split("/", 1)[0]
        try:
            ok = bucket_exists(bucket)
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

"""Retries of transient S3 failures in pseudobox.storage, against a fake S3 filesystem.

The fake stands in for s3fs under ``s3://`` URIs and fails a given number of times with
the errors s3fs/botocore raise; a fake clock makes the backoff instant and measurable.
"""
from __future__ import annotations

import os

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from pseudobox import storage


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} from the server"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def s3fs_translated(code: str, status: int) -> OSError:
    """What s3fs raises for a ClientError it has no mapping for: OSError(EIO) from it."""
    err = OSError(5, f"{code} from the server")
    err.__cause__ = client_error(code, status)
    return err


class FlakyS3:
    """A dict-backed filesystem whose every call first raises the queued errors."""

    def __init__(self, errors=()):
        self.objects: dict[str, bytes] = {}
        self.errors = list(errors)
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        if self.errors:
            raise self.errors.pop(0)

    def exists(self, path):
        self._maybe_fail("exists")
        return path in self.objects or any(k.startswith(path + "/") for k in self.objects)

    def ls(self, path, detail=False):
        self._maybe_fail("ls")
        names = sorted({path + "/" + k[len(path) + 1:].split("/")[0] for k in self.objects if k.startswith(path + "/")})
        if not detail:
            return names
        return [{"name": n, "type": "file" if n in self.objects else "directory", "size": len(self.objects.get(n, b""))}
                for n in names]

    def open(self, path, mode="rb"):
        import io

        self._maybe_fail("open")
        if path not in self.objects:
            raise FileNotFoundError(path)
        return io.BytesIO(self.objects[path])

    def put_file(self, local, path):
        self._maybe_fail("put_file")
        with open(local, "rb") as f:  # the whole object in one call, as one PUT
            self.objects[path] = f.read()

    def rm(self, path, recursive=False):
        self._maybe_fail("rm")
        self.objects.pop(path, None)

    def call_s3(self, method, **kwargs):
        assert method == "head_bucket"
        self._maybe_fail("head_bucket")
        if not any(k.startswith(kwargs["Bucket"] + "/") for k in self.objects):
            raise FileNotFoundError(kwargs["Bucket"])
        return {}

    def info(self, path):
        self._maybe_fail("info")
        return {"size": len(self.objects[path]), "ETag": '"abc"'}


@pytest.fixture
def fake_s3(monkeypatch):
    """Route ``s3://`` to a FlakyS3 and replace sleeping with a fake clock; yields
    ``(fs, slept)`` where ``slept`` lists every backoff delay."""
    fs, slept, now = FlakyS3(), [], [0.0]

    def fake_split(uri):
        assert storage.is_remote(uri), uri
        return fs, uri.split("://", 1)[1].rstrip("/")

    def fake_sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(storage, "split_uri", fake_split)
    monkeypatch.setattr(storage, "s3_filesystem", lambda: fs)
    monkeypatch.setattr(storage, "_sleep", fake_sleep)
    monkeypatch.setattr(storage, "_clock", lambda: now[0])
    monkeypatch.delenv(storage.RETRY_SECONDS_ENV, raising=False)
    return fs, slept


def test_write_is_retried_whole_after_connection_refused_and_slowdown(fake_s3):
    fs, slept = fake_s3
    fs.errors = [ConnectionRefusedError(111, "Connection refused"), s3fs_translated("SlowDown", 503),
                 EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")]
    storage.write_bytes("s3://b/parts/a.parquet", b"0123456789")
    assert fs.calls["put_file"] == 4
    assert fs.objects == {"b/parts/a.parquet": b"0123456789"}  # one whole object, nothing else
    # Exponential backoff: each wait at least as long as half the doubled base.
    assert len(slept) == 3 and 0.25 <= slept[0] <= 0.5 and 0.5 <= slept[1] <= 1.0 and 1.0 <= slept[2] <= 2.0


def test_reads_listings_exists_and_remove_ride_out_transient_errors(fake_s3):
    fs, slept = fake_s3
    fs.objects = {"b/reports/x.json": b'{"ok": 1}', "b/reports/y.json": b"{}"}
    fs.errors = [ReadTimeoutError(endpoint_url="http://s3"), client_error("InternalError", 500)]
    assert storage.read_json("s3://b/reports/x.json") == {"ok": 1}
    fs.errors = [ConnectionResetError(104, "reset"), client_error("ServiceUnavailable", 503)]
    assert storage.listdir("s3://b/reports") == ["x.json", "y.json"]
    fs.errors = [client_error("Throttling", 400)]
    assert storage.exists("s3://b/reports/y.json")
    fs.errors = [TimeoutError("timed out")]
    storage.remove("s3://b/reports/y.json")
    assert "b/reports/y.json" not in fs.objects
    assert len(slept) == 6


@pytest.mark.parametrize("error, raised", [
    (FileNotFoundError("b/k"), storage.StorageError),   # read_bytes maps it to "not found"
    (PermissionError("Access Denied"), PermissionError),
    (client_error("AccessDenied", 403), ClientError),
    (s3fs_translated("InvalidRequest", 400), OSError),
    (ValueError("bad argument"), ValueError),
])
def test_other_errors_are_raised_at_once(fake_s3, error, raised):
    fs, slept = fake_s3
    fs.objects = {"b/k": b"x"}
    fs.errors = [error]
    with pytest.raises(raised):
        storage.read_bytes("s3://b/k")
    assert fs.calls["open"] == 1 and slept == []


def test_retrying_stops_at_the_bound_with_a_storage_error_naming_uri_and_last_error(fake_s3, monkeypatch):
    fs, slept = fake_s3
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "20")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRETvalue-1234567")
    fs.errors = [EndpointConnectionError(endpoint_url="http://h/?sig=SECRETvalue-1234567")] * 1000
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes("s3://b/parts/p.parquet", b"data")
    msg = str(info.value)
    assert "s3://b/parts/p.parquet" in msg and "EndpointConnectionError" in msg and "PSEUDOBOX_S3_RETRY_SECONDS=20" in msg
    assert "SECRETvalue-1234567" not in msg  # never a credential
    assert sum(slept) <= 20 and sum(slept) > 20 - 10  # used the time, did not overrun it
    assert fs.calls["put_file"] == len(slept) + 1 > 3
    assert max(slept) <= 10  # backoff capped
    assert fs.objects == {}  # nothing half-written under the final name


def test_zero_bound_means_one_attempt(fake_s3, monkeypatch):
    fs, slept = fake_s3
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "0")
    fs.errors = [ConnectionRefusedError(111, "refused")]
    with pytest.raises(storage.StorageError, match="1 attempt"):
        storage.exists("s3://b/k")
    assert fs.calls["exists"] == 1 and slept == []


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_a_bad_bound_is_refused_naming_the_variable(fake_s3, monkeypatch, value):
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, value)
    with pytest.raises(storage.StorageError, match="PSEUDOBOX_S3_RETRY_SECONDS"):
        storage.exists("s3://b/k")


def test_output_check_rides_out_a_blip_and_does_not_call_an_outage_a_missing_bucket(fake_s3, monkeypatch):
    fs, _ = fake_s3
    fs.objects = {"b/old/run.json": b"{}"}
    fs.errors = [ConnectionRefusedError(111, "refused")]
    storage.check_writable("s3://b/run", "output")  # retried, then the probe write and remove
    assert fs.calls["head_bucket"] == 2 and fs.calls["put_file"] == 1
    assert list(fs.objects) == ["b/old/run.json"]

    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_writable("s3://other/run", "output")

    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "5")
    fs.errors = [EndpointConnectionError(endpoint_url="http://127.0.0.1:9")] * 100
    with pytest.raises(storage.StorageError) as info:
        storage.check_writable("s3://b/run", "output")
    assert "cannot access bucket s3://b" in str(info.value) and "does not exist" not in str(info.value)


def test_identity_is_retried(fake_s3):
    fs, _ = fake_s3
    fs.objects = {"b/corpus/shard-000000.tar": b"12345"}
    fs.errors = [ConnectionResetError(104, "reset")]
    assert storage.identity("s3://b/corpus/shard-000000.tar") == {
        "uri": "s3://b/corpus/shard-000000.tar", "size": 5, "etag": "abc"}
    assert fs.calls["info"] == 2


def test_local_paths_are_never_retried(tmp_path):
    calls = []

    def fail():
        calls.append(1)
        raise ConnectionResetError(104, "reset")

    with pytest.raises(ConnectionResetError):
        storage.retrying(str(tmp_path / "x"), "read", fail)
    assert calls == [1]


def test_classification_of_errors():
    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(s3fs_translated("SlowDown", 503))
    assert storage.is_transient(client_error("RequestTimeout", 400))
    assert storage.is_transient(client_error("WhateverWentWrong", 502))
    assert not storage.is_transient(client_error("NoSuchKey", 404))
    assert not storage.is_transient(client_error("NoSuchBucket", 404))
    assert not storage.is_transient(FileNotFoundError("k"))
    assert not storage.is_transient(storage.StorageError("x"))


def test_the_s3_client_is_configured_with_botocore_retries_and_timeouts(monkeypatch):
    monkeypatch.setenv("PSEUDOBOX_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", f"retry-config-{os.getpid()}")
    fs = storage.s3_filesystem()
    assert fs.config_kwargs["retries"] == {"mode": "standard", "max_attempts": 3}
    assert fs.config_kwargs["connect_timeout"] <= 10 and fs.config_kwargs["read_timeout"] <= 60

"""Unit tests for pseudobox.storage: URI handling, atomic writes, local and S3 (moto)."""
from __future__ import annotations

import os
import tempfile
import uuid

import pytest
import torch

from pseudobox import storage
from pseudobox.storage import StorageError


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket with a name valid for any test id (``s3_bucket`` breaks on
    parametrized ids, whose brackets are not allowed in bucket names)."""
    import boto3

    name = "pb-st-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


# ---------------------------------------------------------------- URIs

def test_join_uses_forward_slashes_and_strips_extra_separators():
    assert storage.join("s3://bucket/", "a/", "/b.txt") == "s3://bucket/a/b.txt"
    assert storage.join("/tmp/x", "y", "z.pt") == "/tmp/x/y/z.pt"
    assert storage.join("file:///data/run/", "model.pt") == "file:///data/run/model.pt"
    assert storage.join("s3://bucket") == "s3://bucket"


def test_basename_ignores_trailing_slash():
    assert storage.basename("s3://b/dir/shard-000001.tar") == "shard-000001.tar"
    assert storage.basename("/tmp/run/") == "run"


def test_split_uri_local_path_is_absolute_and_local(tmp_path, monkeypatch):
    fs, path = storage.split_uri(str(tmp_path / "a" / "b.txt"))
    assert path == str(tmp_path / "a" / "b.txt")
    assert "file" in fs.protocol
    monkeypatch.chdir(tmp_path)
    _, rel = storage.split_uri("sub/c.txt")
    assert rel == os.path.join(str(tmp_path), "sub", "c.txt")


def test_split_uri_file_scheme_is_stripped(tmp_path):
    fs, path = storage.split_uri(f"file://{tmp_path}/x.json")
    assert path == f"{tmp_path}/x.json"
    assert "file" in fs.protocol
    assert not storage.is_remote(f"file://{tmp_path}")


def test_split_uri_s3_drops_scheme_and_trailing_slash(s3_server):
    fs, path = storage.split_uri("s3://bucket/prefix/dir/")
    assert path == "bucket/prefix/dir"
    assert "s3" in fs.protocol
    _, path_a = storage.split_uri("s3a://bucket/k")
    assert path_a == "bucket/k"
    assert storage.is_remote("s3://b") and storage.is_remote("s3a://b")


def test_s3_endpoint_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific")
    monkeypatch.delenv("PSEUDOBOX_S3_ENDPOINT", raising=False)
    assert storage.s3_endpoint() == "http://s3-specific"
    monkeypatch.setenv("PSEUDOBOX_S3_ENDPOINT", "http://ours")
    assert storage.s3_endpoint() == "http://ours"


# ---------------------------------------------------------------- atomic writes

class Boom(RuntimeError):
    pass


def test_atomic_local_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "model.pt"
    with pytest.raises(Boom):
        with storage.atomic_local_path(str(target)) as tmp:
            assert os.path.dirname(tmp) == str(target.parent)
            assert tmp != str(target)
            with open(tmp, "wb") as f:
                f.write(b"half a file")
            raise Boom()
    assert not target.exists()
    assert os.listdir(target.parent) == []  # no temp file either


def test_atomic_local_failure_keeps_previous_version(tmp_path):
    target = tmp_path / "a.json"
    storage.write_json(str(target), {"v": 1})
    with pytest.raises(Boom):
        with storage.atomic_local_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write('{"v": 2, "trunc')
            raise Boom()
    assert storage.read_json(str(target)) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_atomic_local_success_replaces_in_one_step(tmp_path):
    target = tmp_path / "x.bin"
    with storage.atomic_local_path(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"abc")
        assert not target.exists()  # invisible until the block ends
    assert target.read_bytes() == b"abc"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_atomic_s3_failure_uploads_nothing_and_cleans_temp(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uri = storage.join(s3_bucket, "run", "model.pt")
    with pytest.raises(Boom):
        with storage.atomic_local_path(uri) as tmp:
            assert tmp.startswith(str(tmp_path))
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise Boom()
    assert not storage.exists(uri)
    assert storage.listdir(s3_bucket) == []
    assert os.listdir(tmp_path) == []  # the local staging dir is gone


def test_atomic_s3_success_cleans_temp(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uri = storage.join(s3_bucket, "a.bin")
    storage.write_bytes(uri, b"payload")
    assert storage.read_bytes(uri) == b"payload"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- round trips

@pytest.fixture(params=["local", "file", "s3"])
def base_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("bucket") + "/root"


def test_bytes_text_json_round_trip(base_uri):
    storage.write_bytes(storage.join(base_uri, "b.bin"), b"\x00\x01binary\xff")
    storage.write_text(storage.join(base_uri, "t.txt"), "héllo")
    storage.write_json(storage.join(base_uri, "sub", "j.json"), {"a": [1, 2], "b": {"c": None}})
    assert storage.read_bytes(storage.join(base_uri, "b.bin")) == b"\x00\x01binary\xff"
    assert storage.read_bytes(storage.join(base_uri, "t.txt")).decode("utf-8") == "héllo"
    assert storage.read_json(storage.join(base_uri, "sub", "j.json")) == {"a": [1, 2], "b": {"c": None}}
    with storage.open_read(storage.join(base_uri, "b.bin")) as f:
        assert f.read(3) == b"\x00\x01b"


def test_torch_save_load_round_trip(base_uri):
    obj = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 7, "names": ["a", "b"]}
    uri = storage.join(base_uri, "ckpt", "model.pt")
    storage.torch_save(obj, uri)
    back = storage.torch_load(uri)
    assert back["step"] == 7 and back["names"] == ["a", "b"]
    assert torch.equal(back["w"], obj["w"])


def test_listdir_exists_remove(base_uri):
    assert storage.listdir(base_uri) == []
    for name in ("b.txt", "sub/c.txt"):
        storage.write_text(storage.join(base_uri, name), name)
    assert storage.listdir(base_uri) == ["b.txt", "sub"]
    assert storage.listdir(storage.join(base_uri, "sub")) == ["c.txt"]
    assert storage.exists(storage.join(base_uri, "b.txt"))
    assert storage.exists(storage.join(base_uri, "sub"))
    assert not storage.exists(storage.join(base_uri, "a.txt"))
    storage.remove(storage.join(base_uri, "sub"), recursive=True)
    assert storage.listdir(base_uri) == ["b.txt"]


def test_makedirs_and_remove_local(tmp_path):
    d = str(tmp_path / "x" / "y")
    storage.makedirs(d)
    assert storage.exists(d) and storage.listdir(d) == []
    storage.write_text(storage.join(d, "f.txt"), "f")
    storage.remove(storage.join(d, "f.txt"))
    assert not storage.exists(storage.join(d, "f.txt"))
    storage.remove(storage.join(d, "never-there"))  # no error


def test_read_missing_raises_storage_error(base_uri):
    missing = storage.join(base_uri, "nope.json")
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(missing)
    with pytest.raises(StorageError, match="not found"):
        storage.open_read(missing)


@pytest.mark.parametrize("kind", ["local", "file"])
def test_upload_dir_copies_tree(tmp_path, kind):
    base_uri = str(tmp_path / "dst") if kind == "local" else f"file://{tmp_path}/dst"
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "d" / "y.txt").write_text("y")
    storage.upload_dir(str(src), storage.join(base_uri, "up"))
    assert storage.read_bytes(storage.join(base_uri, "up", "x.txt")) == b"x"
    assert storage.read_bytes(storage.join(base_uri, "up", "d", "y.txt")) == b"y"


# ---------------------------------------------------------------- early checks

def test_check_readable_missing_local_path(tmp_path):
    missing = str(tmp_path / "no-corpus")
    with pytest.raises(StorageError) as e:
        storage.check_readable(missing, "corpus")
    assert "corpus" in str(e.value) and missing in str(e.value) and "does not exist" in str(e.value)
    (tmp_path / "here").mkdir()
    storage.check_readable(str(tmp_path / "here"), "corpus")  # no error


def test_check_readable_missing_bucket(s3_server):
    uri = "s3://pb-no-such-bucket-xyz/corpus"
    with pytest.raises(StorageError) as e:
        storage.check_readable(uri, "corpus")
    assert "corpus" in str(e.value) and "pb-no-such-bucket-xyz" in str(e.value)


def test_check_readable_existing_s3_prefix(s3_bucket):
    storage.write_text(storage.join(s3_bucket, "c", "corpus.json"), "{}")
    storage.check_readable(storage.join(s3_bucket, "c"), "corpus")
    with pytest.raises(StorageError, match="does not exist"):
        storage.check_readable(storage.join(s3_bucket, "other"), "corpus")


def test_check_writable_missing_bucket(s3_server):
    with pytest.raises(StorageError) as e:
        storage.check_writable("s3://pb-missing-out-bucket/run", "output")
    msg = str(e.value)
    assert msg.startswith("output:") and "s3://pb-missing-out-bucket" in msg and "does not exist" in msg


def test_check_writable_ok_for_existing_bucket_and_new_local_dir(s3_bucket, tmp_path):
    storage.check_writable(storage.join(s3_bucket, "new", "run"), "output")
    storage.check_writable(str(tmp_path / "not" / "yet" / "there"), "output")
    assert not (tmp_path / "not").exists()  # checking does not create anything


def test_check_writable_local_not_writable(tmp_path, monkeypatch):
    target = tmp_path / "ro" / "run"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(StorageError, match="output: .* is not writable"):
        storage.check_writable(str(target), "output")


def test_check_writable_under_a_regular_file(tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="output"):
        storage.check_writable(str(blocker / "run"), "output")

"""Fault tests for mining (issue 10, section 4): things are killed or broken mid-run, and
each test asserts what survived: every shard done once, exactly one row per input sample,
no part that looks complete without being so.

Tiny on purpose (ResNet-18 from the conftest helper, 48-pixel images, a few dozen
samples). Run under the Ray lock, one file at a time::

    flock /tmp/pbx-ray.lock .venv/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_faults.py

The driver-kill test runs ``pseudobox mine`` as a subprocess with its own local Ray, so it
comes first, before the in-process ``ray_local`` instance is started for the others.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from pseudobox import storage
from pseudobox.datasets.corpus import iter_shard
from pseudobox.mining import outputs
from pseudobox.pipelines import mine
from tests.conftest import make_classifier_checkpoint, make_corpus

pytestmark = pytest.mark.integration

PSEUDOBOX = os.path.join(os.path.dirname(sys.executable), "pseudobox")


# ---------------------------------------------------------------------------- helpers

def tiny_setup(root: str, num_images: int, per_shard: int, ckpt_dir: str | None = None):
    """A synthetic corpus under ``root`` and a ResNet-18 classifier for its classes."""
    manifest = make_corpus(f"{root}/corpus", num_images=num_images, size=48, samples_per_shard=per_shard)
    ckpt = make_classifier_checkpoint(f"{ckpt_dir or root}/classifier.pt", manifest.classes)
    return f"{root}/corpus", ckpt, manifest


def mine_config(corpus: str, ckpt: str, out: str, **kw) -> mine.MineConfig:
    pool = {"min_actors": 1, "max_actors": 2, "batch_size": 4, **kw}
    return mine.MineConfig(corpus=corpus, checkpoint=ckpt, output=out, cam=mine.CamConfig(scales=(48,), flip=False),
                           **pool)


def input_keys(corpus: str) -> dict[str, list[str]]:
    """Every sample key each input shard yields (shard-level error records left out)."""
    manifest = storage.read_json(storage.join(corpus, "corpus.json"))
    return {s["name"]: [r["key"] for r in iter_shard(storage.join(corpus, s["name"])) if not r["key"].startswith("__")]
            for s in manifest["shards"]}


def output_keys(out: str) -> list[tuple[str, str]]:
    """``(shard, key)`` of every row of every part, read through the checksum-verifying reader."""
    rows = []
    for name in storage.listdir(storage.join(out, "parts")):
        table = outputs.read_part(storage.join(out, "parts", name))
        rows += list(zip(table.column("shard").to_pylist(), table.column("key").to_pylist()))
    return rows


def assert_exactly_once(out: str, corpus: str) -> int:
    """One row per input sample: no key twice, none missing. Returns the row count."""
    rows = output_keys(out)
    assert len(rows) == len(set(rows)), f"duplicate rows: {len(rows) - len(set(rows))}"
    expected = {(s, k) for s, keys in input_keys(corpus).items() for k in keys}
    assert set(rows) == expected, f"missing {sorted(expected - set(rows))[:5]}, extra {sorted(set(rows) - expected)[:5]}"
    return len(rows)


def report_names(out: str) -> list[str]:
    return [n for n in storage.listdir(storage.join(out, "reports")) if n.endswith(".json")]


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# ------------------------------------------------------ 4. the driver is killed mid-job

def test_killed_driver_rerun_mines_only_the_rest_exactly_once(tmp_path):
    """``pseudobox mine`` is killed with SIGKILL after some shards are done and run again:
    the re-run reports those shards as already complete, leaves their parts untouched and
    mines only the rest; the output has one row per sample."""
    corpus, ckpt, manifest = tiny_setup(str(tmp_path), num_images=48, per_shard=4)
    out = str(tmp_path / "mined")
    cmd = [PSEUDOBOX, "mine", f"corpus={corpus}", f"checkpoint={ckpt}", f"output={out}", "cam.scales=[48]",
           "cam.flip=false", "batch_size=4", "min_actors=1", "max_actors=1", "ray.num_cpus=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "first.log", "wb") as log:
        # Its own session, so the kill takes the driver and whatever it started in its group.
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            started = wait_for(lambda: len(report_names(out)) >= 2 or first.poll() is not None, timeout=300)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert started and first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]

    done_before = outputs.done_shards(out)
    assert 1 <= len(done_before) < len(manifest.shards), "the kill must land mid-job"
    parts_before = {s: os.stat(outputs.part_uri(out, s)).st_mtime_ns for s in done_before}
    reports_before = {s: storage.read_json(outputs.report_uri(out, s)) for s in done_before}

    second = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=400, start_new_session=True)
    log_text = second.stdout + second.stderr
    assert second.returncode == 0, log_text[-3000:]
    m = re.search(r"(\d+) already complete, (\d+) to do", log_text)
    assert m, log_text[-3000:]
    assert int(m.group(1)) == len(done_before) and int(m.group(2)) == len(manifest.shards) - len(done_before)
    # Nothing complete was redone: same part file, same report.
    assert {s: os.stat(outputs.part_uri(out, s)).st_mtime_ns for s in done_before} == parts_before
    assert {s: storage.read_json(outputs.report_uri(out, s)) for s in done_before} == reports_before
    assert outputs.done_shards(out) == {s.name for s in manifest.shards}
    assert assert_exactly_once(out, corpus) == 48


# ------------------------------------------------------ 1. a mining actor dies mid-job

def _map_workers(ray):
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if "MapWorker" in (a.class_name or "")]


def test_killed_mining_actor_every_shard_completes_exactly_once(ray_local, tmp_path, pseudobox_log):
    """A watcher ``ray.kill``s one of the pool's actors for good once the first shard is
    written; the pool is started again over the unfinished shards, and the output still has
    one row per sample."""
    ray = ray_local
    corpus, ckpt, manifest = tiny_setup(str(tmp_path), num_images=40, per_shard=4)
    out = str(tmp_path / "mined")
    killed: dict = {}

    def watcher():
        if not wait_for(lambda: len(report_names(out)) >= 1, timeout=240):
            return
        actors = _map_workers(ray)
        if not actors:
            return
        victim = actors[0]
        core = ray._private.worker.global_worker.core_worker
        handle = core.get_actor_handle(ray.ActorID.from_hex(victim.actor_id))
        killed.update(actor=victim.actor_id, pid=victim.pid, reports=len(report_names(out)))
        # Removed for good (ray.kill's default, no_restart=True): Ray Data fails the pool, and
        # run_shard_pool starts it again over the unfinished shards.
        ray.kill(handle)

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    summary = mine.run(mine_config(corpus, ckpt, out, min_actors=2, max_actors=2))
    thread.join(timeout=30)

    assert killed, "the watcher found no mining actor to kill"
    assert killed["reports"] < len(manifest.shards), "the kill must land mid-job"
    assert "lost for good" in pseudobox_log.text, "the pool was not started again after the kill"
    reports = outputs.load_reports(out)
    assert sorted(reports) == sorted(s.name for s in manifest.shards)
    assert all(r["ok"] == 4 and r["errors"] == {} for r in reports.values())
    assert summary["rows"] == summary["ok"] == 40
    assert outputs.done_shards(out) == {s.name for s in manifest.shards}
    assert assert_exactly_once(out, corpus) == 40


# ------------------------------------------ 3. the S3 server stops during the writes

class S3Gate:
    """A TCP proxy in front of the S3 server that can be shut: while shut, connections to
    it are refused and open ones are reset, as when the server process is stopped. (moto
    keeps its objects in memory, so stopping moto itself would lose the bucket.)"""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.closed_at: list[float] = []
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def shut(self) -> None:
        self.closed_at.append(time.time())
        listener, self.listener = self.listener, None
        if listener is not None:
            try:  # wakes the accept() blocked in the other thread (close alone does not)
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self.lock:
            for c in list(self.conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
            with self.lock:
                self.conns.discard(src)
                self.conns.discard(dst)


def _bucket_objects(endpoint: str, bucket_uri: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix``, read straight from the S3 server (not through the gate)."""
    import boto3

    bucket = bucket_uri.split("://", 1)[1]
    client = boto3.client("s3", endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def assert_nothing_partial_looks_complete(endpoint: str, bucket: str, out_prefix: str) -> set[str]:
    """Listing + done-manifest + checksums: every report names a part that is in the bucket
    with the recorded size and sha256, no other kind of object is there (no temp or
    half-written name), and a part without a report is not counted done. Returns the
    shards whose report vouches for their part."""
    objects = _bucket_objects(endpoint, bucket, out_prefix + "/")
    names = [k[len(out_prefix) + 1:] for k in objects]
    allowed = re.compile(r"^(parts/[\w.-]+\.parquet|reports/[\w.-]+\.json|run\.json|mining\.json|pseudo_boxes\.coco\.json)$")
    assert all(allowed.match(n) for n in names), names
    vouched = set()
    for name in (n for n in names if n.startswith("reports/")):
        report = json.loads(objects[f"{out_prefix}/{name}"])
        part = report["part"]
        data = objects.get(f"{out_prefix}/parts/{part['name']}")
        assert data is not None, f"{name} vouches for a part that is not there"
        assert len(data) == part["bytes"] and hashlib.sha256(data).hexdigest() == part["sha256"], name
        vouched.add(report["shard"])
    for name in (n for n in names if n.startswith("parts/")):
        shard = outputs.shard_stem(name[len("parts/"):-len(".parquet")]) + ".tar"
        if shard not in vouched:  # written before the outage, its report never landed
            assert outputs.shard_states(f"{bucket}/{out_prefix}").get(shard) != outputs.DONE
    return vouched


def test_s3_outage_during_writes_is_retried_or_fails_cleanly(ray_local, s3_server, s3_bucket, tmp_path,
                                                             monkeypatch, pseudobox_log):
    """The output bucket becomes unreachable during the writes of a mining run.

    1. Shut for longer than the retry bound: the run fails with a StorageError naming the
       object, and nothing partial looks complete.
    2. Shut for a few seconds in a re-run: the writes are retried, the run completes the
       remaining shards, and the output has one row per sample; shards finished in the
       first run are not redone.
    """
    corpus, ckpt, manifest = tiny_setup(str(tmp_path), num_images=32, per_shard=4)
    gate = S3Gate(int(s3_server.rsplit(":", 1)[1]))
    # Only this driver (which writes the parts) goes through the gate; the Ray workers
    # started with ray_local read their local inputs and talk to no S3 here.
    monkeypatch.setenv("PSEUDOBOX_S3_ENDPOINT", gate.endpoint)
    out_prefix = "mined"
    out = f"{s3_bucket}/{out_prefix}"

    def shut_after_first_report(reopen_after: float | None):
        def run():
            if wait_for(lambda: any(k.startswith(f"{out_prefix}/reports/") and k not in seen
                                    for k in _bucket_objects(s3_server, s3_bucket, f"{out_prefix}/reports/")),
                        timeout=240, interval=0.1):
                gate.shut()
                if reopen_after is not None:
                    time.sleep(reopen_after)
                    gate.open()
        seen = set(_bucket_objects(s3_server, s3_bucket, f"{out_prefix}/reports/"))
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    # 1. Longer than the bound: a clean failure.
    monkeypatch.setenv("PSEUDOBOX_S3_RETRY_SECONDS", "4")
    watcher = shut_after_first_report(reopen_after=None)
    with pytest.raises(storage.StorageError) as failure:
        mine.run(mine_config(corpus, ckpt, out, min_actors=1, max_actors=1))
    watcher.join(timeout=10)
    assert gate.closed_at, "the gate was never shut"
    message = str(failure.value)
    assert f"{s3_bucket}/{out_prefix}/" in message and "PSEUDOBOX_S3_RETRY_SECONDS=4" in message, message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message.replace(s3_bucket, "")
    gate.open()
    vouched = assert_nothing_partial_looks_complete(s3_server, s3_bucket, out_prefix)
    assert 1 <= len(vouched) < len(manifest.shards), "the outage must land mid-job"
    first_reports = {s: storage.read_json(outputs.report_uri(out, s)) for s in vouched}

    # 2. A short outage in the re-run: retried with backoff, the run completes.
    monkeypatch.setenv("PSEUDOBOX_S3_RETRY_SECONDS", "60")
    watcher = shut_after_first_report(reopen_after=6.0)
    summary = mine.run(mine_config(corpus, ckpt, out, min_actors=1, max_actors=1))
    watcher.join(timeout=30)
    assert len(gate.closed_at) == 2 and summary["shards_this_run"] == len(manifest.shards) - len(vouched)
    assert "retrying for up to" in pseudobox_log.text  # the outage hit a call and was ridden out
    assert assert_nothing_partial_looks_complete(s3_server, s3_bucket, out_prefix) == {s.name for s in manifest.shards}
    assert {s: storage.read_json(outputs.report_uri(out, s)) for s in vouched} == first_reports
    assert assert_exactly_once(out, corpus) == 32


# ---------------------------------------------------- 5. corrupt inputs in one run

def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_corrupt_inputs_are_counted_and_every_good_sample_is_mined(ray_local, tmp_path, pseudobox_log):
    """One run over good shards plus a truncated tar, a non-image .jpg, invalid JSON, an
    unknown class and a zero-byte shard: each kind is counted in its shard's report, every
    good sample has its row, and the samples that produced no row are reported as missing:
    loudly with allow_missing=true (exit 0), as an error (exit 3) without it."""
    corpus, ckpt, _ = tiny_setup(str(tmp_path), num_images=12, per_shard=4)
    good = input_keys(corpus)
    first = next(iter(iter_shard(f"{corpus}/shard-000000.tar")))
    jpg, meta = first["image"], first["meta"]
    storage.write_bytes(f"{corpus}/shard-bad.tar", _tar([
        ("not_an_image.jpg", b"GIF89a this is no jpeg"), ("not_an_image.json", meta),
        ("bad_json.jpg", jpg), ("bad_json.json", b'{"labels": [0'),
        ("unknown_class.jpg", jpg), ("unknown_class.json", b'{"labels": [999]}'),
        ("fine.jpg", jpg), ("fine.json", meta)]))
    storage.write_bytes(f"{corpus}/shard-empty.tar", b"")
    cut = storage.read_bytes(f"{corpus}/shard-000001.tar")
    storage.write_bytes(f"{corpus}/shard-000001.tar", cut[: len(cut) // 2])
    data = storage.read_json(f"{corpus}/corpus.json")
    data["shards"] += [{"name": "shard-bad.tar", "num_samples": 4}, {"name": "shard-empty.tar", "num_samples": 3}]
    storage.write_json(f"{corpus}/corpus.json", data)
    out = str(tmp_path / "mined")

    summary = mine.run(mine_config(corpus, ckpt, out, allow_missing=True))

    reports = outputs.load_reports(out)
    assert sorted(reports) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-bad.tar",
                               "shard-empty.tar"]
    bad = reports["shard-bad.tar"]
    assert bad["errors"] == {"corrupt_image": 1, "invalid_json": 1, "unknown_class": 1} and bad["ok"] == 1
    cut_report = reports["shard-000001.tar"]
    kept = input_keys(corpus)["shard-000001.tar"]
    assert cut_report["errors"]["truncated_shard"] == 1
    assert cut_report["errors"]["missing_samples"] == 4 - len(kept) > 0
    empty = reports["shard-empty.tar"]
    assert empty["rows"] == 0 and empty["errors"]["missing_samples"] == 3
    assert any(kind in empty["errors"] for kind in ("truncated_shard", "unread_shard")), empty["errors"]
    for shard in ("shard-000000.tar", "shard-000002.tar"):
        assert reports[shard]["ok"] == 4 and reports[shard]["errors"] == {}

    # Every good sample has its row, without error; every bad one its row with the error.
    table = {}
    for name in storage.listdir(f"{out}/parts"):
        t = outputs.read_part(f"{out}/parts/{name}").to_pydict()
        table.update({(s, k): e for s, k, e in zip(t["shard"], t["key"], t["error"])})
    for shard in ("shard-000000.tar", "shard-000002.tar"):
        assert all(table[(shard, k)] == "" for k in good[shard])
    # The cut shard: the samples before the cut are mined; the one being read when the tar
    # broke has its row too, with an error if the cut took one of its members.
    assert all(table[("shard-000001.tar", k)] == "" for k in kept[:-1])
    assert sum(table[("shard-000001.tar", k)] == "" for k in kept) == cut_report["ok"] >= len(kept) - 1
    assert table[("shard-bad.tar", "fine")] == ""
    assert {k: table[("shard-bad.tar", k)].split(":")[0] for k in ("not_an_image", "bad_json", "unknown_class")} == {
        "not_an_image": "corrupt_image", "bad_json": "invalid_json", "unknown_class": "unknown_class"}
    assert assert_exactly_once(out, corpus) == 4 + len(kept) + 4 + 4
    assert summary["ok"] == 4 + cut_report["ok"] + 4 + 1
    # The loud summary line of an accepted gap.
    warning = [line for line in pseudobox_log.text.splitlines() if "WARNING" in line and "missing" in line]
    assert warning and "shard-empty.tar" in warning[-1] and "shard-000001.tar" in warning[-1], pseudobox_log.text

    # Without allow_missing the same output is an error: in-process, and exit 3 from the CLI.
    with pytest.raises(outputs.MissingSamplesError, match="shard-empty.tar"):
        mine.run(mine_config(corpus, ckpt, out))
    cli = subprocess.run([PSEUDOBOX, "mine", f"corpus={corpus}", f"checkpoint={ckpt}", f"output={out}",
                          "cam.scales=[48]", "cam.flip=false", "batch_size=4"],
                         check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 3, cli.stdout[-2000:] + cli.stderr[-2000:]
    assert "shard-empty.tar" in cli.stderr and "shard-000001.tar" in cli.stderr and "allow_missing" in cli.stderr

"""Security and hygiene of local stages, each run as its own ``pseudobox`` process:
credentials stay out of every output, log line and error message; the local Ray instance
listens on loopback only; a ``kill -9`` of the driver leaves nothing of it behind.

Each stage process starts its own local Ray instance (pseudobox/local_ray.py) under a
short per-test root (``PSEUDOBOX_RAY_ROOT``), so the test finds that instance's
processes (by their ``PSEUDOBOX_LOCAL_RAY`` marker) and its Ray session logs."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from pseudobox import local_ray, storage
from tests.conftest import make_classifier_checkpoint, make_corpus

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_credentials() -> dict[str, str]:
    """Distinctive values, found nowhere unless leaked (moto accepts any key)."""
    upper = string.ascii_uppercase + string.digits
    return {"AWS_ACCESS_KEY_ID": "AKIAPBX" + "".join(secrets.choice(upper) for _ in range(13)),
            "AWS_SECRET_ACCESS_KEY": "pbxSecret" + secrets.token_hex(16),
            "AWS_SESSION_TOKEN": "pbxSession" + secrets.token_hex(24)}


@pytest.fixture
def ray_root():
    """A short root for the stages' Ray temp dirs (Ray's socket paths must stay < 108 bytes)."""
    root = tempfile.mkdtemp(prefix="pbxh", dir="/tmp")
    yield root
    for name in os.listdir(root):  # whatever a failed test left running
        local_ray.stop_instance(os.path.join(root, name), grace=2.0)
    shutil.rmtree(root, ignore_errors=True)


def _env(root: str, **extra: str) -> dict[str, str]:
    """A user's shell: no RAY_ADDRESS (set once this test process has joined Ray), so each
    stage starts its own local instance under ``root``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, local_ray.ROOT_ENV: root, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **extra}


def _stage(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pseudobox.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _instance_dirs(root: str) -> list[str]:
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, n))]


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """``{socket inode: (ip, port)}`` of every listening TCP socket (``/proc/net/tcp{,6}``)."""
    out = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                hex_ip, hex_port = fields[1].split(":")
                # The kernel prints the address as 32-bit words in host (little-endian) order.
                raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, len(hex_ip), 8))
                out[int(fields[9])] = (str(ipaddress.ip_address(raw)), int(hex_port, 16))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _process_name(pid: int) -> str:
    """What ``ps`` shows: Ray renames its workers (``ray::IDLE``, ``ray::DashboardAgent``)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read().split(b"\0")[0].decode(errors="replace").strip()
    return cmd if cmd.startswith("ray::") else os.path.basename(cmd.split(" ")[0])


class ListenerWatch:
    """Samples, while a stage runs, the listening TCP sockets of its driver and of every
    process of its local Ray instances, and the environment of those processes."""

    def __init__(self, root: str, driver_pid: int):
        self.root, self.driver_pid = root, driver_pid
        self.listeners: set[tuple[str, str, int]] = set()  # (process name, ip, port)
        self.pids: set[int] = set()
        self.environ: dict[int, bytes] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        pids = {self.driver_pid} | {p for d in _instance_dirs(self.root) for p in local_ray.instance_pids(d)}
        sockets = _listening_sockets()
        for pid in pids:
            try:
                name = _process_name(pid)
                if pid not in self.environ and pid != self.driver_pid:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        self.environ[pid] = f.read()
                inodes = _socket_inodes(pid)
            except OSError:
                continue
            self.pids.add(pid)
            self.names[pid] = name
            self.listeners |= {(name, *sockets[i]) for i in inodes if i in sockets}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.3)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _s3_objects(bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=storage.s3_endpoint())
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                try:
                    with open(path, "rb") as f:
                        out[path] = f.read()
                except OSError:
                    pass
    return out


def _leaks(blobs: dict[str, bytes], secrets_: dict[str, str]) -> list[str]:
    return [f"{var} in {where}" for where, blob in blobs.items() for var, value in secrets_.items()
            if value.encode() in blob]


def test_local_stages_keep_credentials_out_and_listen_on_loopback_only(s3_server, s3_bucket, ray_root):
    bucket = s3_bucket[len("s3://"):]
    corpus = f"{s3_bucket}/corpus"
    manifest = make_corpus(corpus, num_images=16, size=48, samples_per_shard=8)
    ckpt = make_classifier_checkpoint(f"{s3_bucket}/classifier/model.pt", manifest.classes)
    fake = _fake_credentials()
    env = _env(ray_root, **fake)
    runs = {
        "mine": ["mine", f"corpus={corpus}", f"checkpoint={ckpt}", f"output={s3_bucket}/mined", "cam.scales=[48,64]",
                 "batch_size=8", "min_actors=1", "max_actors=1", "use_gpu=false", "ray.num_cpus=2"],
        # One DDP worker: Ray Train still sets up torch.distributed (its master address and store).
        "train-classifier": ["train-classifier", f"corpus={corpus}", f"output={s3_bucket}/cls", "model.depth=18",
                             "image_size=48", "optim.max_iters=2", "optim.batch_size=4", "optim.warmup_iters=1",
                             "optim.checkpoint_every=1", "optim.log_every=1", "workers.num_workers=1",
                             "workers.use_gpu=false", "ray.num_cpus=2"],
    }
    console, watches = {}, {}
    for name, argv in runs.items():
        proc = _stage(argv, env)
        with ListenerWatch(ray_root, proc.pid) as watch:
            console[name] = _finish(proc)
        watches[name] = watch
        assert proc.returncode == 0, f"{name} failed:\n{console[name][-3000:]}"
    # A failing run: its error message is printed.
    failed = _stage(["mine", f"corpus={corpus}", f"checkpoint={ckpt}", "output=s3://pbx-no-such-bucket/out"], env)
    console["failed mine"] = _finish(failed, timeout=120)
    assert failed.returncode == 2 and "pbx-no-such-bucket" in console["failed mine"], console["failed mine"]

    # The stages did hold the credentials: Ray's processes inherited them from the driver
    # (a process's environment is read once, when first seen; one read during its start-up,
    # or after it retitled itself as Ray's workers and agents do, may lack it).
    for name, watch in watches.items():
        holders = {watch.names[pid] for pid, environ in watch.environ.items()
                   if fake["AWS_SECRET_ACCESS_KEY"].encode() in environ}
        assert len(holders) >= 3 and any(n.startswith("ray::") for n in holders), (name, holders)
    # ... and they appear in no console line, output object (run.json, mining.json, reports,
    # parts, COCO export, checkpoints, model.pt) or Ray log file of the runs.
    objects = _s3_objects(bucket)
    assert any(k.startswith("mined/reports/") for k in objects) and any(k.endswith("run.json") for k in objects)
    assert any(k.startswith("cls/") and "checkpoint" in k for k in objects), sorted(objects)
    logs = _files(ray_root)
    assert len(_instance_dirs(ray_root)) == 2 and any("/logs/raylet" in p for p in logs), sorted(logs)[:20]
    assert any(b"127.0.0.1" in blob for blob in logs.values())  # the scan reads the logs' text
    leaks = _leaks({f"console of {n}": text.encode() for n, text in console.items()}, fake)
    leaks += _leaks({f"s3://{bucket}/{k}": v for k, v in objects.items()}, fake)
    leaks += _leaks(logs, fake)
    assert not leaks, leaks

    # Listeners: every one on loopback (the Ray processes, the drivers, the workers), except
    # the one Ray cannot confine (docs/operations.md): torch.distributed's TCPStore, which
    # the rank-0 Train worker opens on the wildcard address (torch has no bind setting).
    for name, watch in watches.items():
        names = {n for n, _, _ in watch.listeners}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, \
            (name, sorted(watch.listeners))
        assert any(n.startswith("ray::") and "Agent" not in n for n in names), name  # workers seen
        wide = sorted(entry for entry in watch.listeners if not _is_loopback(entry[1]))
        # The TCPStore's socket, under whatever title its worker process has at the time it
        # is sampled (RayTrainWorker, then the method it runs: run_train_fn, _shutdown_torch).
        store_ports = {port for n, ip, port in wide if n.startswith("ray::RayTrainWorker") and ip in ("::", "0.0.0.0")}
        allowed = [e for e in wide if name == "train-classifier" and e[2] in store_ports
                   and e[0].startswith("ray::") and e[1] in ("::", "0.0.0.0")]
        assert wide == allowed and len({port for _, _, port in allowed}) <= 1, \
            f"{name}: listeners beyond loopback: {wide}"
    train_workers = [e for e in watches["train-classifier"].listeners if e[0].startswith("ray::RayTrainWorker")]
    assert any(_is_loopback(ip) for _, ip, _ in train_workers), train_workers  # Gloo on lo


def test_killed_driver_leaves_no_ray_process_or_listener(s3_server, tmp_path, ray_root):
    corpus = str(tmp_path / "corpus")
    manifest = make_corpus(corpus, num_images=16, size=48, samples_per_shard=8)
    ckpt = make_classifier_checkpoint(str(tmp_path / "classifier.pt"), manifest.classes)
    proc = _stage(["mine", f"corpus={corpus}", f"checkpoint={ckpt}", f"output={tmp_path}/mined", "cam.scales=[48,64]",
                   "batch_size=8", "min_actors=1", "max_actors=1", "use_gpu=false", "ray.num_cpus=2"],
                  _env(ray_root))
    watch = ListenerWatch(ray_root, proc.pid)
    # Wait until the instance is fully up: both agents (the processes that used to outlive
    # the driver) and a worker are running.
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        watch.sample()
        names = {n for n, _, _ in watch.listeners}
        if {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names and any(
                n.startswith("ray::") and "Agent" not in n for n in names):
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the stage ended before it could be killed:\n" + proc.communicate()[0][-3000:]
    (instance,) = _instance_dirs(ray_root)
    seen = set(local_ray.instance_pids(instance))
    assert len(seen) >= 5, seen
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 30
    while local_ray.instance_pids(instance) and time.time() < deadline:
        time.sleep(0.5)
    assert local_ray.instance_pids(instance) == [], "processes of the killed driver's instance still run"
    assert watch.listeners, "no listener was seen while the stage ran"

    def still_listening():
        sockets, still = _listening_sockets(), []
        for pid in seen:
            with contextlib.suppress(OSError):
                still += [(pid, sockets[i]) for i in _socket_inodes(pid) if i in sockets]
        return still

    # Ray's workers exit by themselves once their raylet is gone; on a loaded machine that
    # takes a few seconds after the instance's marked processes are down.
    deadline = time.time() + 30
    while still_listening() and time.time() < deadline:
        time.sleep(0.5)
    assert not still_listening(), still_listening()

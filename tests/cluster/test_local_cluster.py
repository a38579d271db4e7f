"""`ray job submit` for real: the 2-node loopback cluster (``cluster/local-cluster.sh``:
separate ``ray start`` processes, token auth, their own ports and temp dir) runs the
README's job commands as they stand, and a mining job is seen autoscaling across both nodes.

The cluster takes its environment from the shell that starts it (here: the local S3
server's endpoint and credentials, a token file of its own), as a user's would. Whatever
happens, the fixture stops it with ``local-cluster.sh stop`` and checks that none of the
processes it started is left, and that a process merely named like Ray's survived.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pseudobox import storage
from pseudobox.models.checkpoint import load_checkpoint
from tests.conftest import make_classifier_checkpoint, make_corpus

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local-cluster.sh"
BIN = Path(sys.executable).parent  # the venv that runs the tests: its `ray` and `pseudobox`
BEGIN, END = "<!-- loopback-jobs:begin -->", "<!-- loopback-jobs:end -->"
MINER_CLASS = "DecodingActor"  # Ray Data's pool actors: MapWorker(...MapBatches(DecodingActor))


def readme_job_commands() -> list[str]:
    """The ``ray job submit`` lines of the README's loopback block, in order."""
    text = (REPO / "README.md").read_text()
    assert BEGIN in text and END in text, "README.md lost its loopback-jobs block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("ray job submit ")]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports outside Ray's worker port range (10002-19999)."""
    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            ports.add(port)
    return sorted(ports)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@dataclass
class Cluster:
    env: dict           # for `ray job submit` and the state API: address, token, PATH
    jobs_address: str   # the job server (dashboard), http://127.0.0.1:<port>
    state: Path         # PSEUDOBOX_LOCAL_CLUSTER_DIR
    data: Path          # absolute data directory the jobs read and write (both nodes see it)

    def run(self, command: str, timeout: float, **env) -> subprocess.CompletedProcess:
        """A shell line from the repository root (as a user types it); unset variables are errors."""
        return subprocess.run(["bash", "-u", "-c", command], cwd=REPO, env={**self.env, **env}, text=True, check=False,
                              capture_output=True, timeout=timeout)

    def submit(self, command: str, timeout: float = 240, **env) -> str:
        """Run a ``ray job submit`` line (it waits for the job); the job's output, or fail with it."""
        started = time.time()
        done = self.run(command, timeout, **env)
        print(f"\njob took {time.time() - started:.1f} s: {command}")
        out = done.stdout + done.stderr
        assert done.returncode == 0 and "succeeded" in out, f"job failed ({done.returncode}): {command}\n{out[-6000:]}"
        return out


def _script(action: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], cwd=REPO, env=env, text=True, capture_output=True, check=False,
                          timeout=timeout)


def _cluster_pids(state: Path, env: dict) -> set[int]:
    """The processes the script counts as this cluster's: its pid file, and ``status``
    (which adds their descendants: workers, actors, job drivers)."""
    pids = set()
    pidfile = state / "pids"
    if pidfile.exists():
        pids |= {int(p) for p in pidfile.read_text().split()}
    status = _script("status", env, timeout=60).stdout
    pids |= {int(m) for m in re.findall(r"^\s*(\d+)\s+\d+\s", status, re.MULTILINE)}
    return pids


@pytest.fixture(scope="module")
def loopback_cluster(s3_server):
    ray_cli = BIN / "ray"
    assert ray_cli.exists(), f"no ray CLI at {ray_cli}: requirements.lock must install ray[default]"
    # Short and private: Ray's unix sockets live under the temp dir (paths < 108 bytes).
    state = Path(tempfile.mkdtemp(prefix="pbxc-", dir="/tmp"))
    token = state / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs, dashboard, client, head_agent, worker_agent = free_ports(5)
    jobs_address = f"http://127.0.0.1:{dashboard}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
    env.update({
        "PATH": f"{BIN}:{env.get('PATH', '')}", "RAY": str(ray_cli), "PSEUDOBOX_LOCAL_CLUSTER_DIR": str(state),
        "GCS_PORT": str(gcs), "DASHBOARD_PORT": str(dashboard), "CLIENT_PORT": str(client),
        "HEAD_AGENT_PORT": str(head_agent), "WORKER_AGENT_PORT": str(worker_agent), "CPUS_PER_NODE": "1",
        "GRACE_SECONDS": "10", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_API_SERVER_ADDRESS": jobs_address, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
    })
    assert env["PSEUDOBOX_S3_ENDPOINT"] == s3_server  # the nodes inherit the local S3 server
    # Named like Ray's processes but not ours: `stop` must leave it alone (it never kills by name).
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", "gcs_server", "raylet",
                              "ray.util.client.server"])
    started: set[int] = set()
    try:
        clock = time.time()
        start = _script("start", env)
        print(f"\nlocal-cluster.sh start took {time.time() - clock:.1f} s")
        started |= _cluster_pids(state, env)
        assert start.returncode == 0, f"local-cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
        assert len(started) >= 4, start.stdout  # two raylets, the GCS, the dashboard, agents...
        data = state / "data"
        data.mkdir()
        yield Cluster(env=env, jobs_address=jobs_address, state=state, data=data)
    finally:
        started |= _cluster_pids(state, env)
        clock = time.time()
        stop = _script("stop", env)
        print(f"\nlocal-cluster.sh stop took {time.time() - clock:.1f} s")
        left = sorted(p for p in started if alive(p))
        decoy_survived = decoy.poll() is None
        decoy.kill()
        decoy.wait()
        assert stop.returncode == 0, f"local-cluster.sh stop failed:\n{stop.stdout}\n{stop.stderr}"
        assert not left, f"still running after stop: {left}\n{stop.stdout}"
        assert decoy_survived, "local-cluster.sh stop killed a process that was not the cluster's"
        assert started, "no cluster process was ever seen"
        shutil.rmtree(state, ignore_errors=True)


def test_readme_jobs_mine_and_pretrain_to_s3_on_the_loopback_cluster(loopback_cluster, s3_server):
    """The README's two job lines, submitted through the job server: CAM mining on a tiny
    corpus, then DAP pre-training on its boxes, checkpointing to s3:// on the local S3 server."""
    import boto3

    cluster = loopback_cluster
    commands = readme_job_commands()
    assert [c.split(" -- ", 1)[1].split()[:2] for c in commands] == [["pseudobox", "mine"], ["pseudobox", "pretrain"]]
    assert all(c.startswith("ray job submit --working-dir . -- pseudobox ") for c in commands)

    data = cluster.data
    manifest = make_corpus(str(data / "corpus"), num_images=16, size=64, samples_per_shard=8)
    make_classifier_checkpoint(str(data / "classifier" / "model.pt"), manifest.classes)
    bucket = "pb-loopback-jobs"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    variables = {"DATA": str(data), "BUCKET": f"s3://{bucket}"}

    mine_log = cluster.submit(commands[0], **variables)
    mined = json.loads((data / "boxes-cluster" / "mining.json").read_text())
    assert mined["rows"] == manifest.num_samples == 16, mine_log[-3000:]
    assert mined["shards"] == 2 and mined["errors"] == {} and mined["boxes"] > 0
    assert sorted(os.listdir(data / "boxes-cluster" / "parts")) == ["shard-000000.parquet", "shard-000001.parquet"]

    pretrain_log = cluster.submit(commands[1], **variables)
    out = f"s3://{bucket}/dap-cluster"
    ckpt = load_checkpoint(out, expect_type="detector")  # <output>/model.pt, weights only
    assert ckpt["step"] == 4, pretrain_log[-3000:]
    assert ckpt["class_names"] == manifest.classes and ckpt["model_state"]
    assert any(n.startswith("checkpoint_") for n in storage.listdir(out))


WATCHER = r"""
import json, sys, time
from ray.util.state import list_actors
address, path = sys.argv[1], sys.argv[2]
with open(path, "a") as out:
    print("ready", flush=True)
    while True:
        try:
            actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000, timeout=10,
                                 raise_on_missing_output=False)
            row = [[a.actor_id, a.class_name, a.node_id] for a in actors]
        except Exception as e:  # the dashboard busy for a moment: try again
            row = repr(e)
        out.write(json.dumps({"t": time.time(), "actors": row}) + "\n")
        out.flush()
        time.sleep(0.5)
"""


def _mine_backlog(cluster: Cluster, corpus: Path, ckpt: Path, out: Path, max_actors: int,
                  watch: Path | None = None) -> tuple[dict, float]:
    """Submit a mining job over ``corpus`` with 1..``max_actors`` actors of one CPU each;
    while it runs, optionally record the alive actors every 0.5 s (Ray's state API) into
    ``watch``. Returns mining.json and the job's wall time."""
    command = (f"ray job submit --working-dir . -- pseudobox mine corpus={corpus} checkpoint={ckpt} output={out} "
               f"min_actors=1 max_actors={max_actors} cpus_per_actor=1 batch_size=8 cam.scales=128,192 "
               "use_gpu=false export_coco=false")
    watcher = None
    if watch is not None:
        watcher = subprocess.Popen([sys.executable, "-c", WATCHER, cluster.jobs_address, str(watch)],
                                   env=cluster.env, stdout=subprocess.PIPE, text=True)
        assert watcher.stdout.readline().strip() == "ready"
    try:
        started = time.time()
        cluster.submit(command, timeout=300)
        wall = time.time() - started
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait(timeout=30)
    return json.loads((out / "mining.json").read_text()), wall


def steady_rate(out: Path, since: float = 0.0) -> tuple[float, int]:
    """Images per second over the shards finished after ``since`` (and after the first
    shard: actor start-up excluded), from the per-shard reports' ``written_at``; and how
    many shards that window holds."""
    from pseudobox.mining import outputs

    done = sorted((r["written_at"], r["rows"]) for r in outputs.load_reports(str(out)).values())
    start = max(since, done[0][0])
    window = [(t, rows) for t, rows in done if t > start]
    assert len(window) >= 3, f"too few shards finished after {start}: {done}"
    return sum(rows for _, rows in window) / (window[-1][0] - start), len(window)


def test_mining_autoscales_to_both_nodes_and_two_actors_mine_faster_than_one(loopback_cluster):
    """min_actors=1, max_actors=2 with one CPU per node and a backlog of shards: the state API
    shows the pool growing from 1 miner to 2, one on each node; then the same input mined
    with max_actors=1 for the throughput ratio (steady state: start-up, which the backlog
    of a real job amortises, is printed apart)."""
    cluster = loopback_cluster
    data = cluster.data
    corpus, ckpt = data / "backlog", data / "backlog-classifier"
    manifest = make_corpus(str(corpus), num_images=192, size=128, samples_per_shard=8, seed=1)
    make_classifier_checkpoint(str(ckpt / "model.pt"), manifest.classes)
    watch = data / "actors.jsonl"

    two, two_wall = _mine_backlog(cluster, corpus, ckpt, data / "backlog-2actors", max_actors=2, watch=watch)
    one, one_wall = _mine_backlog(cluster, corpus, ckpt, data / "backlog-1actor", max_actors=1)
    assert two["rows"] == one["rows"] == manifest.num_samples

    # The pool grew from 1 to 2 miners, one on each node, seen through the state API.
    snapshots = [json.loads(line) for line in watch.read_text().splitlines()]
    seen = [(s["t"], [a for a in s["actors"] if MINER_CLASS in a[1]]) for s in snapshots if isinstance(s["actors"], list)]
    counts = [len(m) for _, m in seen]
    assert max(counts, default=0) == 2, f"miners alive per snapshot: {counts}"
    first_two = counts.index(2)
    assert 1 in counts[:first_two], f"the pool should start at min_actors=1, then grow: {counts}"
    assert any(len({a[2] for a in m}) == 2 for _, m in seen if len(m) == 2), "two miners, but on one node"
    both_alive_at = seen[first_two][0]

    rate_two, shards_two = steady_rate(data / "backlog-2actors", since=both_alive_at)
    rate_one, shards_one = steady_rate(data / "backlog-1actor")
    ratio = rate_two / rate_one
    print(f"\nautoscale: {manifest.num_samples} images 128px in {len(manifest.shards)} shards, cam.scales=128,192 + flip, "
          f"1 CPU per actor and node; steady: 2 actors {rate_two:.2f} img/s ({shards_two} shards), 1 actor "
          f"{rate_one:.2f} img/s ({shards_one} shards), ratio {ratio:.2f}; end to end (mining.json seconds_this_run): "
          f"2 actors {two['seconds_this_run']:.1f} s, 1 actor {one['seconds_this_run']:.1f} s, ratio "
          f"{one['seconds_this_run'] / two['seconds_this_run']:.2f}; job wall {two_wall:.1f} s vs {one_wall:.1f} s")
    assert ratio > 1.2, f"2 actors only {ratio:.2f}x as fast as 1 in steady state"

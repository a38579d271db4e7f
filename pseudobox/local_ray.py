"""The local Ray instance a stage starts when no cluster is given: on loopback, without
metrics export, and never outliving the process that started it (its driver).

Ray 2.60 confines a node to loopback only when its node address is literally
``127.0.0.1``: then the GCS, the raylet, the workers, the dashboard agent and the metrics
servers listen on 127.0.0.1 instead of all interfaces, and Ray Train's workers give
127.0.0.1 as the torch.distributed master address. ``ray.init(_node_ip_address=
"127.0.0.1")`` does not get there (Ray rewrites that value to the routable address); the
node address is chosen by ``ray._private.services.get_node_ip_address``, which returns
127.0.0.1 where ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off (Ray's behaviour on macOS).
``loopback_settings`` applies exactly that while the instance starts.

Lifetime: Ray ties its GCS, raylet and dashboard to the driver (the kernel kills them
when the driver dies), but the dashboard agent and the runtime-env agent outlive a
``kill -9`` of the driver, still listening. So every process of an instance carries
``PSEUDOBOX_LOCAL_RAY=<instance dir>`` in its environment (inherited from the driver at
start-up), a small watchdog process (this file run as a script, stdlib only) stops them
when the driver is gone, and each new local instance first stops what is left of
instances whose driver is gone (``reap_orphans``), in case the watchdog was killed too.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MARK_ENV = "PSEUDOBOX_LOCAL_RAY"  # in the environment of every process of a local instance
ROOT_ENV = "PSEUDOBOX_RAY_ROOT"  # where instance directories go; default /tmp/pbx-ray-<uid>
OWNER_FILE = "owner.json"
KEEP_DEAD = 5  # directories (Ray's logs) of ended instances kept for diagnosis
_WATCHDOGS: list[subprocess.Popen] = []

# Environment the instance's processes start with (inherited by the GCS, raylet, agents
# and workers). Loopback node address (see the module docstring); no usage-stats reports.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# torch.distributed's Gloo (CPU) and NCCL (GPU) bootstrap sockets pick an interface from
# the host name, which resolves to the external address; on a local instance every Train
# worker is on this machine, so they use the loopback interface (unless the user chose one).
LOOPBACK_INTERFACE_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def loopback_env() -> dict[str, str]:
    """``LOOPBACK_ENV``, plus the loopback interface for Gloo/NCCL where Linux names it
    ``lo`` and the variable is not set already."""
    env = dict(LOOPBACK_ENV)
    if os.path.exists("/sys/class/net/lo"):
        env.update({k: "lo" for k in LOOPBACK_INTERFACE_ENV if not os.environ.get(k)})
    return env
# Ray's metrics export (the per-node Prometheus exporter and the agent's metrics gRPC
# service) is off: a local run reads nothing from it.
SYSTEM_CONFIG = {"enable_metrics_collection": False}


def instance_root() -> str:
    """The directory that holds one sub-directory (Ray's temp dir) per local instance.
    Short (Ray's Unix socket paths under it must stay below 108 bytes) and per user."""
    root = os.environ.get(ROOT_ENV) or os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp", f"pbx-ray-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone or a
    zombie; with the pid it identifies a process across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def new_instance_dir(root: str | None = None) -> str:
    """A fresh instance directory owned by this process (``owner.json``: pid, start time)."""
    path = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root or instance_root())
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        json.dump({"pid": os.getpid(), "start": _start_time(os.getpid())}, f)
    return path


def owner_alive(path: str) -> bool:
    """Whether the driver that made instance directory ``path`` still runs. A directory
    without a readable owner record counts as alive (it is being created, or not ours)."""
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return True
    return _start_time(int(owner["pid"])) == owner["start"]


def _read_environ(pid: int) -> bytes:
    """The environment block of ``pid``; empty where it cannot be read (another user's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def instance_pids(path: str) -> list[int]:
    """The live processes of the instance in ``path``: those whose environment carries
    ``PSEUDOBOX_LOCAL_RAY=<path>`` or whose command line names ``path`` (Ray renames its
    workers and agents, and a long new title can overwrite the environment block), plus
    their descendants."""
    marker = f"{MARK_ENV}={path}".encode()
    named = f"{path}/".encode()
    found, parents = set(), {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] in ("Z", "X"):
                continue
            parents[pid] = int(fields[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            env = _read_environ(pid)
        except (OSError, IndexError):  # gone
            continue
        if marker in env.split(b"\0") or named in cmdline:
            found.add(pid)
    grown = True
    while grown:
        children = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
        found |= children
        grown = bool(children)
    return sorted(found)


def stop_instance(path: str, grace: float = 5.0) -> list[int]:
    """SIGTERM every process of the instance, SIGKILL what is left after ``grace`` seconds.
    Returns the pids that were found (empty when nothing was left)."""
    pids = instance_pids(path)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        alive = instance_pids(path)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = instance_pids(path)
        if not alive:
            break
    return pids


def reap_orphans(root: str | None = None, keep: int = KEEP_DEAD) -> dict[str, list[int]]:
    """Stop the processes of every instance under ``root`` whose driver is gone, then
    delete the directories of ended instances beyond the ``keep`` newest (their logs).
    Instances of live drivers are not touched. Returns ``{dir: pids stopped}`` for the
    instances that still had processes."""
    root = root or instance_root()
    stopped, ended = {}, []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or owner_alive(path):
            continue
        pids = stop_instance(path)
        if pids:
            stopped[path] = pids
        if not instance_pids(path):
            ended.append(path)
    ended.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    for path in ended[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    return stopped


def start_watchdog(path: str) -> subprocess.Popen:
    """A process, in its own session (a signal to the driver's process group does not
    reach it), that stops the instance in ``path`` once this process has exited."""
    env = {k: v for k, v in os.environ.items() if k != MARK_ENV}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "watch", path, str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env=env)
    _WATCHDOGS.append(proc)  # referenced for this process's lifetime: it is meant to outlive us
    return proc


def watch(path: str, driver: int, poll: float = 0.5) -> None:
    """Wait for ``driver`` to exit, then stop every process of its instance."""
    start = _start_time(driver)
    while start is not None and _start_time(driver) == start:
        time.sleep(poll)
    time.sleep(1.0)  # a normal exit: Ray's own shutdown goes first
    stop_instance(path)


@contextlib.contextmanager
def loopback_settings(path: str):
    """While a local instance starts: the environment its processes inherit
    (``loopback_env()`` and the instance marker), and Ray's node-address choice set to
    loopback in this process too (``ray_constants`` reads the variable when ``ray`` is
    first imported, which may have happened already). Both are restored afterwards, so
    a later ``ray.init(address=...)`` in this process is unaffected."""
    from ray._private import ray_constants

    env = {**loopback_env(), MARK_ENV: path}
    old_env = {k: os.environ.get(k) for k in env}
    old_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_local(**ray_init_kwargs) -> str:
    """Start a local Ray instance the way ``pipelines.common.init_ray`` does without a
    cluster: leftovers of dead drivers stopped first, its own temp dir, watched by a
    watchdog, loopback only, metrics export off, dashboard on 127.0.0.1. Returns the
    instance directory (Ray's temp dir; its logs are under ``session_*/logs``)."""
    import ray

    reap_orphans()
    path = new_instance_dir()
    start_watchdog(path)
    with loopback_settings(path):
        ray.init(_temp_dir=path, _system_config=dict(SYSTEM_CONFIG), include_dashboard=True,
                 dashboard_host="127.0.0.1", **ray_init_kwargs)
    return path


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "watch":
    watch(sys.argv[2], int(sys.argv[3]))

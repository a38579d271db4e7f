"""The bookkeeping that keeps a local Ray instance from outliving its driver, tried with
plain processes standing in for Ray's (no Ray started)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pseudobox import local_ray


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "root"
    path.mkdir()
    return str(path)


def _dead_owner_dir(root: str, name: str) -> str:
    """An instance directory whose owner is a process that has exited."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = os.path.join(root, name)
    os.mkdir(path)
    with open(os.path.join(path, local_ray.OWNER_FILE), "w") as f:
        json.dump({"pid": gone.pid, "start": 12345}, f)
    return path


def _member(path: str, ignore_term: bool = False) -> subprocess.Popen:
    """A process that carries the instance marker, as Ray's processes inherit it."""
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('up', flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, local_ray.MARK_ENV: path},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_instance_dir_is_owned_by_this_process(root):
    path = local_ray.new_instance_dir(root)
    assert os.path.dirname(path) == root and os.path.basename(path).startswith(f"{os.getpid()}-")
    assert local_ray.owner_alive(path)
    assert not local_ray.owner_alive(_dead_owner_dir(root, "old"))


def test_reap_orphans_stops_processes_of_dead_drivers_only(root):
    dead = _dead_owner_dir(root, "dead")
    live = local_ray.new_instance_dir(root)
    orphans = [_member(dead), _member(dead, ignore_term=True)]
    keeper = _member(live)
    try:
        assert local_ray.instance_pids(dead) == sorted(p.pid for p in orphans)
        stopped = local_ray.reap_orphans(root, keep=5)
        assert stopped == {dead: sorted(p.pid for p in orphans)}
        for p in orphans:
            assert p.wait(timeout=10) is not None  # the one ignoring SIGTERM got SIGKILL
        assert keeper.poll() is None and local_ray.instance_pids(live) == [keeper.pid]
        assert os.path.isdir(dead)  # its logs are kept (within `keep`)
    finally:
        for p in (*orphans, keeper):
            p.kill()
            p.wait()


def test_reap_orphans_keeps_only_the_newest_ended_instances(root):
    ended = []
    for i in range(4):
        ended.append(_dead_owner_dir(root, f"ended{i}"))
        os.utime(ended[-1], (time.time() - 100 + i, time.time() - 100 + i))
    live = local_ray.new_instance_dir(root)
    assert local_ray.reap_orphans(root, keep=2) == {}
    assert sorted(os.listdir(root)) == sorted([os.path.basename(p) for p in ended[2:]] + [os.path.basename(live)])


def test_watchdog_stops_the_instance_when_its_driver_exits(root):
    """A stand-in driver starts the watchdog and a marked child that ignores its parent's
    death, then is killed with SIGKILL; the watchdog must stop the child."""
    driver_code = (
        "import os, subprocess, sys, time\n"
        "from pseudobox import local_ray\n"
        f"path = local_ray.new_instance_dir({root!r})\n"
        "local_ray.start_watchdog(path)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                         env={**os.environ, local_ray.MARK_ENV: path}, start_new_session=True)\n"
        "print(path, child.pid, flush=True)\n"
        "time.sleep(120)\n")
    driver = subprocess.Popen([sys.executable, "-c", driver_code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    path, child = driver.stdout.readline().split()
    try:
        assert local_ray.instance_pids(path) == [int(child)]
        driver.kill()
        driver.wait()
        deadline = time.time() + 15
        while local_ray.instance_pids(path) and time.time() < deadline:
            time.sleep(0.2)
        assert local_ray.instance_pids(path) == []
    finally:
        driver.kill()
        for pid in local_ray.instance_pids(path):
            os.kill(pid, 9)


def test_loopback_settings_apply_only_while_the_instance_starts(monkeypatch):
    """Ray's node address is 127.0.0.1 inside (where ``ray.init(_node_ip_address=...)``
    would get the routable address) and Ray's own choice is back afterwards."""
    from ray._private import ray_constants, services

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv(local_ray.MARK_ENV, raising=False)
    before = (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))
    with local_ray.loopback_settings("/tmp/pbx-ray-x/1-abc"):
        assert services.get_node_ip_address() == "127.0.0.1"
        assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
        assert os.environ[local_ray.MARK_ENV] == "/tmp/pbx-ray-x/1-abc"
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
        if os.path.exists("/sys/class/net/lo"):
            assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    assert (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")) == before
    assert local_ray.MARK_ENV not in os.environ and "GLOO_SOCKET_IFNAME" not in os.environ

"""The images' install steps, replayed in a clean venv (Docker Hub is out of reach in CI).

docker/Dockerfile.cpu is a venv on python:3.11-slim, so its steps replay faithfully: a new
``python -m venv``, the files its COPY lines name copied into a fresh WORKDIR, then its
RUN instructions verbatim (``pip install -r requirements.lock``, ``pip install --no-deps .``
and the image's import check with ``pseudobox --help``). docker/Dockerfile runs the same
steps on the rayproject base (tests/unit/test_images.py checks that). Then the job
entrypoints run as they do in the image: ``pseudobox <stage> --help`` and the RayJob's
``pseudobox mine --config configs/imagenet-dap/mine.yaml`` up to its resolved config.

Cost: from the index the lock install alone took 288 s here (6.5 min for the test), too long
for CI, and pip's HTTP cache does not help (the mirror's responses are not cacheable). So
the wheels are downloaded once per lock content into a wheelhouse
(``$PSEUDOBOX_WHEELHOUSE``, default ``~/.cache/pseudobox/wheelhouse/<lock sha256>-py<version>``) by
``pip download -r requirements.lock``, the same resolver on the same index, and the
Dockerfile's lock RUN then installs verbatim with ``PIP_NO_INDEX=1`` and
``PIP_FIND_LINKS=<wheelhouse>``: the same files, no download, and a pin the wheelhouse
cannot satisfy fails the install. ``PSEUDOBOX_WHEELHOUSE=off`` installs straight from the
index. A new lock gets a new wheelhouse. The test prints each step's wall time.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_images import ROOT, dockerfile_instructions, lock_pins, normalize

pytestmark = pytest.mark.integration

DOCKERFILE = ROOT / "docker/Dockerfile.cpu"


def image_steps() -> tuple[str, list[list[str]], list[str]]:
    """(WORKDIR, COPY sources per COPY, RUN commands) of the Dockerfile, from its first COPY on:
    the part after the base OS setup (apt, user, venv) that the venv replays."""
    workdir, copies, runs, started = None, [], [], False
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "WORKDIR":
            workdir = rest
        elif keyword == "COPY":
            started = True
            copies.append([w for w in rest.split()[:-1] if not w.startswith("--")])
        elif keyword == "RUN" and started:
            runs.append(rest)
    assert workdir and copies and runs, "docker/Dockerfile.cpu lost its WORKDIR, COPY or RUN steps"
    return workdir, copies, runs


def copy_sources(patterns: list[str], dest: Path) -> None:
    """COPY semantics for the build context = repository root: globs allowed, a directory
    is copied as a directory of that name, and a pattern may match nothing."""
    for pattern in patterns:
        for match in glob.glob(str(ROOT / pattern)):
            path = Path(match)
            if path.is_dir():
                shutil.copytree(path, dest / path.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                shutil.copy2(path, dest / path.name)


def wheelhouse_dir() -> Path | None:
    """Where this lock's wheels are kept (None: install from the index)."""
    setting = os.environ.get("PSEUDOBOX_WHEELHOUSE", "")
    if setting.lower() == "off":
        return None
    base = Path(setting) if setting else Path.home() / ".cache" / "pseudobox" / "wheelhouse"
    lock = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:16]
    return base / f"{lock}-py{sys.version_info.major}{sys.version_info.minor}"  # wheels are per Python


def test_locked_requirements_install_and_the_entrypoints_run_in_a_clean_venv(tmp_path):
    workdir_in_image, copies, runs = image_steps()
    venv, workdir = tmp_path / "venv", tmp_path / "workdir"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_NO_CACHE_DIR")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    timings = {}

    def sh(step: str, command: str, cwd: Path = workdir, extra_env: dict | None = None) -> str:
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=cwd,
                              env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=1800)
        timings[step] = time.monotonic() - started
        assert done.returncode == 0, \
            f"{step}: `{command}` exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    try:
        sh("venv", f"{shlex.quote(sys.executable)} -m venv {shlex.quote(str(venv))}", cwd=tmp_path)
        for sources in copies:
            copy_sources(sources, workdir)
        wheelhouse = wheelhouse_dir()
        if wheelhouse is not None and not (wheelhouse / ".complete").exists():
            partial = wheelhouse.with_name(wheelhouse.name + f".partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            sh("pip download (once per lock)", f"pip download -q -r requirements.lock -d {shlex.quote(str(partial))}")
            (partial / ".complete").touch()
            shutil.rmtree(wheelhouse, ignore_errors=True)
            partial.rename(wheelhouse)
        for i, command in enumerate(runs):  # verbatim, in order, like `docker build`
            local = wheelhouse is not None and "requirements.lock" in command
            sh(f"RUN {i + 1}{' (wheelhouse)' if local else ''}: {command[:40]}", command,
               extra_env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)} if local else None)

        # Every pin of the lock is what got installed, and the set is consistent.
        pins = lock_pins()
        installed = dict(line.split("==", 1) for line in sh("pip freeze", "pip freeze --all").split()
                         if "==" in line)
        installed = {normalize(k): v for k, v in installed.items()}
        wrong = {name: (version, installed.get(name)) for name, version in pins.items()
                 if installed.get(name) != version}
        assert wrong == {}, f"installed versions differ from requirements.lock (pinned, installed): {wrong}"
        sh("pip check", "pip check")

        # The installed package, not the WORKDIR copy, is what runs from elsewhere.
        where = sh("import", "python -c 'import pseudobox, torch, torchvision, ray; "
                   "print(pseudobox.__file__); print(torch.__version__, torchvision.__version__, ray.__version__)'",
                   cwd=tmp_path)
        assert str(venv) in where.splitlines()[0] and "site-packages" in where.splitlines()[0], where
        assert where.splitlines()[1].split()[0].split("+")[0] == pins["torch"], where
        assert sh("ray --version", "ray --version").strip().endswith(pins["ray"])

        # The job entrypoints, as `ray job submit -- pseudobox <stage> ...` and the RayJob run them.
        assert "mine" in sh("pseudobox --help", "pseudobox --help")
        assert "max_actors" in sh("pseudobox mine --help", "pseudobox mine --help")
        resolved = sh("RayJob config", "pseudobox mine --print-config --config configs/imagenet-dap/mine.yaml")
        assert "max_actors: 64" in resolved and "use_gpu: 'true'" in resolved.replace('"', "'"), resolved
        assert workdir_in_image == "/home/ray/pseudobox"
    finally:
        print("\nclean install, wall seconds per step:")
        for step, seconds in timings.items():
            print(f"  {seconds:7.1f}  {step}")
        print(f"  {sum(timings.values()):7.1f}  total")
        shutil.rmtree(venv, ignore_errors=True)  # several GB; pytest keeps old tmp dirs


"""The container images and cluster files name the versions that requirements.lock pins.

Docker Hub is out of reach in CI, so the images are not built here. What can drift
without a build is checked instead: the Ray release of the GPU base image, every
``pip install`` in the Dockerfiles, the versions their comments and docker/README.md
quote, and the Ray version and image tags in cluster/*.yaml. Both images install the
lock unchanged (torch 2.14.1 from PyPI is already the CUDA build, +cu130), so the GPU
image has no torch of its own: a Dockerfile that installs torch or torchvision at
another version, or from another index, fails here.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.cpu")
# The files that name the image: the launcher's docker.image and every KubeRay container.
CLUSTER_FILES = ("cluster/ray-cluster.yaml", "cluster/kuberay-raycluster.yaml")


def normalize(name: str) -> str:
    """PEP 503 name, extras dropped: ``ray[train,data]`` -> ``ray``."""
    return re.sub(r"[-_.]+", "-", name.split("[", 1)[0]).lower()


def lock_pins(path: Path = ROOT / "requirements.lock") -> dict[str, str]:
    """{normalized name: version} of every ``name==version`` line of the lock."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.lock: {line!r} is not pinned with =="
        pins[normalize(name)] = version.strip()
    return pins


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuations joined, comments dropped."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def base_image(text: str) -> str:
    """The FROM image with ``${ARG}`` defaults substituted."""
    args, image = {}, None
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
    assert image, "no FROM instruction"
    return image


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every ``pip install`` in the RUN instructions."""
    commands = []
    for keyword, rest in dockerfile_instructions(text):
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        tokens = list(lexer)
        starts = [0] + [i + 1 for i, t in enumerate(tokens) if t in (";", "&&", "||", "|", "&")]
        for start in starts:
            words = tokens[start:]
            words = words[:next((i for i, t in enumerate(words) if t in (";", "&&", "||", "|", "&")), len(words))]
            if words[:1] == ["python"] and words[1:3] == ["-m", "pip"]:
                words = words[2:]
            if words[:2] == ["pip", "install"]:
                commands.append(words[2:])
    return commands


def install_problems(text: str, pins: dict[str, str]) -> list[str]:
    """Every way the Dockerfile's pip installs may leave the lock: unpinned or other versions,
    another requirements file, another index (e.g. CUDA-specific torch wheels)."""
    problems = []
    for args in pip_installs(text):
        words = iter(args)
        for word in words:
            if word in ("-r", "--requirement"):
                target = next(words, "")
                if target != "requirements.lock":
                    problems.append(f"installs from {target!r}, not requirements.lock")
            elif word.startswith(("--index-url", "--extra-index-url", "-i", "--find-links", "-f")):
                problems.append(f"uses another package source: {word}")
            elif word in ("-c", "--constraint"):
                problems.append(f"adds constraints {next(words, '')!r}")
            elif word.startswith("-") or word in (".", "./"):
                continue  # --no-deps, --upgrade, ...; "." is the package itself
            else:
                match = re.fullmatch(r"([A-Za-z0-9._\-\[\],]+)\s*(==|>=|<=|~=|!=|>|<)?\s*(\S*)", word)
                name = normalize(match.group(1)) if match else word
                if name not in pins:
                    problems.append(f"installs {word!r}, which requirements.lock does not pin")
                elif match.group(2) != "==" or match.group(3) != pins[name]:
                    problems.append(f"installs {word!r}, but requirements.lock pins {name}=={pins[name]}")
    return problems


# Versions quoted in prose, comments or image tags: "ray 2.60.0", "ray[default]==2.60.0",
# "rayproject/ray:2.60.0-py311-gpu", "Ray 2.60", "torch 2.14.1".
QUOTED = re.compile(r"\b(torchvision|torch|ray)(?:\[[\w,]*\])?(?:==|:|\s+)v?(\d+\.\d+(?:\.\d+)?)\b", re.IGNORECASE)


def quoted_version_problems(text: str, pins: dict[str, str], where: str) -> list[str]:
    problems = []
    for match in QUOTED.finditer(text):
        name, version = match.group(1).lower(), match.group(2)
        expected = pins[name].split("+")[0]
        if expected.split(".")[: len(version.split("."))] != version.split("."):
            problems.append(f"{where}: {match.group(0)!r} but requirements.lock pins {name}=={pins[name]}")
    return problems


def test_lock_pins_the_stack_the_images_need():
    pins = lock_pins()
    for name in ("torch", "torchvision", "ray"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", pins[name]), f"requirements.lock must pin {name} exactly"


def test_gpu_base_image_is_the_locked_ray_release():
    pins = lock_pins()
    image = base_image((ROOT / "docker/Dockerfile").read_text())
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    assert tag.split("-")[0] == pins["ray"], f"{image}: Ray {tag.split('-')[0]}, lock pins ray=={pins['ray']}"


def test_both_images_run_the_same_python():
    """Ray needs the same Python minor on every node and on the job's driver."""
    gpu_tag = base_image((ROOT / "docker/Dockerfile").read_text()).partition(":")[2]
    cpu_image = base_image((ROOT / "docker/Dockerfile.cpu").read_text())
    gpu_python = re.search(r"-py3(\d+)", gpu_tag)
    cpu_python = re.fullmatch(r"python:3\.(\d+)(-[\w.-]+)?", cpu_image)
    assert gpu_python and cpu_python, (gpu_tag, cpu_image)
    assert gpu_python.group(1) == cpu_python.group(1), f"GPU image py3{gpu_python.group(1)}, CPU image {cpu_image}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_exactly_the_lock(dockerfile):
    text = (ROOT / dockerfile).read_text()
    installs = pip_installs(text)
    assert ["-r", "requirements.lock"] in installs, f"{dockerfile} must pip install -r requirements.lock"
    assert ["--no-deps", "."] in installs, f"{dockerfile} must install the package with --no-deps (lock decides)"
    # The lock layer must come before the package: a code change must not reinstall torch.
    assert installs.index(["-r", "requirements.lock"]) < installs.index(["--no-deps", "."])
    assert install_problems(text, lock_pins()) == []


@pytest.mark.parametrize("path", DOCKERFILES + ("docker/README.md", "docs/cluster.md") + CLUSTER_FILES
                         + ("cluster/kuberay-rayjob-mine.yaml",))
def test_quoted_versions_match_the_lock(path):
    assert quoted_version_problems((ROOT / path).read_text(), lock_pins(), path) == []


def test_the_checks_catch_drift():
    """The checkers themselves: each kind of drift is reported."""
    pins = lock_pins()
    drifted = (
        "ARG BASE_IMAGE=rayproject/ray:2.59.0-py311-gpu\nFROM ${BASE_IMAGE}\n"
        "RUN pip install -r requirements.lock \\\n"
        " && pip install torch==2.11.0 torchvision==0.26.0 --index-url https://download.pytorch.org/whl/cu128\n"
        "RUN python -m pip install boto3 && pip install 'numpy>=2'\n"
    )
    problems = install_problems(drifted, pins)
    assert any("torch==2.11.0" in p for p in problems)
    assert any("torchvision==0.26.0" in p for p in problems)
    assert any("--index-url" in p for p in problems)
    assert any("'boto3'" in p and "does not pin" in p for p in problems)
    assert any("numpy>=2" in p for p in problems)
    assert base_image(drifted) == "rayproject/ray:2.59.0-py311-gpu"
    assert quoted_version_problems("FROM rayproject/ray:2.59.0-py311-gpu # torch 2.14.1", pins, "x") == [
        f"x: 'ray:2.59.0' but requirements.lock pins ray=={pins['ray']}"]
    assert install_problems("RUN pip install -r requirements.txt\n", pins) == [
        "installs from 'requirements.txt', not requirements.lock"]


def cluster_images() -> dict[str, list[str]]:
    """{file: every image it names}: the launcher's docker.image, every KubeRay container image."""
    found = {}
    launcher = yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())
    found["cluster/ray-cluster.yaml"] = [launcher["docker"]["image"]] + [
        launcher["docker"][k] for k in ("head_image", "worker_image") if k in launcher["docker"]]
    for node in launcher["available_node_types"].values():
        found["cluster/ray-cluster.yaml"] += [node["docker"][k] for k in ("image", "worker_image")
                                              if k in node.get("docker", {})]
    images = []
    for doc in yaml.safe_load_all((ROOT / "cluster/kuberay-raycluster.yaml").read_text()):
        if doc and doc.get("kind") == "RayCluster":
            spec = doc["spec"]
            templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
            images += [c["image"] for t in templates for c in t["spec"]["containers"]]
    found["cluster/kuberay-raycluster.yaml"] = images
    return found


def test_cluster_files_run_one_image_tagged_with_the_code_version():
    """Every node of every cluster file runs the same pseudobox image, tagged <flavour>-<version>."""
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    found = cluster_images()
    assert all(found.values()), found
    distinct = {image for images in found.values() for image in images}
    assert len(distinct) == 1, f"the cluster files name different images: {found}"
    tag = distinct.pop().rpartition(":")[2]
    assert tag.endswith(f"-{version}"), f"image tag {tag!r} does not carry the package version {version}"


def test_kuberay_ray_version_is_the_locked_one():
    pins = lock_pins()
    clusters = [d for d in yaml.safe_load_all((ROOT / "cluster/kuberay-raycluster.yaml").read_text())
                if d and d.get("kind") == "RayCluster"]
    assert clusters
    for cluster in clusters:
        assert str(cluster["spec"]["rayVersion"]) == pins["ray"]


def test_rayjob_entrypoint_runs_in_the_image_layout():
    """The RayJob cds into the Dockerfile's WORKDIR and names a config the image copies."""
    job = yaml.safe_load((ROOT / "cluster/kuberay-rayjob-mine.yaml").read_text())
    entrypoint = job["spec"]["entrypoint"]
    workdirs = [rest for k, rest in dockerfile_instructions((ROOT / "docker/Dockerfile").read_text()) if k == "WORKDIR"]
    assert f"cd {workdirs[-1]} " in entrypoint + " ", (entrypoint, workdirs)
    config = re.search(r"--config\s+(\S+)", entrypoint).group(1)
    assert (ROOT / config).is_file(), f"{config} (the RayJob's config) is not in the repository"
    copies = [rest.split() for k, rest in dockerfile_instructions((ROOT / "docker/Dockerfile").read_text())
              if k == "COPY"]
    assert any(config.split("/")[0] in [Path(w).name for w in c[:-1]] for c in copies), \
        f"docker/Dockerfile does not COPY {config.split('/')[0]}/"

"""Shared fixtures: a local S3 server (moto), a local Ray instance, tiny corpora and models.

Every fixture starts what it needs itself, so tests run on a fresh machine.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; sets the AWS env vars the storage layer reads."""
    port = _free_port()
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"PSEUDOBOX_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket; yields its ``s3://name`` URI."""
    import boto3

    name = "pb-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid() % 1000}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray instance (4 logical CPUs on this 2-core box; S3 env already set so
    workers inherit the endpoint)."""
    import ray

    from pseudobox.pipelines.common import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=4, object_store_mb=300))
    yield ray
    ray.shutdown()


def make_corpus(uri: str, num_images: int = 24, size: int = 64, samples_per_shard: int = 8, style: str = "classification",
                classes: str = "pretrain", seed: int = 0):
    from pseudobox.pipelines.build_corpus import BuildCorpusConfig, SyntheticConfig, run

    return run(BuildCorpusConfig(builder="synthetic", output=uri, samples_per_shard=samples_per_shard,
                                 synthetic=SyntheticConfig(style=style, classes=classes, num_images=num_images,
                                                           image_size=size, seed=seed)))


def make_classifier_checkpoint(uri: str, class_names: list[str], depth: int = 18, seed: int = 0) -> str:
    """A random-init classifier saved in the pseudobox checkpoint format."""
    import torch

    from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint
    from pseudobox.models.classifier import build_resnet

    torch.manual_seed(seed)
    model = build_resnet(depth, num_classes=len(class_names))
    save_checkpoint(make_checkpoint("classifier", {"depth": depth}, class_names, model.state_dict(), step=0), uri)
    return uri


@pytest.fixture
def tiny_corpus(tmp_path):
    uri = str(tmp_path / "corpus")
    manifest = make_corpus(uri)
    return uri, manifest


@pytest.fixture
def one_torch_thread():
    """Small CPU models run faster and far more predictably on one thread on a busy 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def pseudobox_log():
    """The records of pseudobox's logger, caught on that logger itself. caplog's handler sits
    on the root logger, and after the in-process demo of the e2e test it stopped receiving
    pseudobox's records (CI, stop 13; the logger's own state was unchanged), so tests that
    assert a warning catch it here."""
    logger = logging.getLogger("pseudobox")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def rng():
    return np.random.default_rng(0)

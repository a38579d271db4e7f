"""Pieces every stage launcher shares: Ray start-up, GPU detection, logging."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pseudobox.config import ConfigError, require

log = logging.getLogger("pseudobox")


@dataclass
class RayConfig:
    """How a stage reaches Ray: an existing cluster (``address`` or ``RAY_ADDRESS``, as
    under ``ray job submit``), or a local instance with these resources."""

    address: str = ""
    num_cpus: int = 0  # 0: all cores (local instance only)
    object_store_mb: int = 300

    def validate(self) -> None:
        require(self.num_cpus >= 0, "ray.num_cpus must be >= 0")
        require(self.object_store_mb >= 75, "ray.object_store_mb must be >= 75")


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    # Workers inherit the driver's environment (S3 endpoint, credentials) on a local
    # instance; on a cluster they come from the job's runtime_env or the node image.
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls;
        # without it that actor logs a warning every few seconds.
        ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1",
                 object_store_memory=cfg.object_store_mb * 1024 * 1024, log_to_driver=True)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(setting: str) -> bool:
    """``auto`` uses GPUs when the Ray cluster has them; ``true``/``false`` force it."""
    if setting == "auto":
        return cluster_has_gpus()
    return setting == "true"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("ray", "ray.data", "ray.train", "filelock", "botocore", "s3fs", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_same_run(output: str, fingerprint: dict) -> None:
    """Refuse to resume into ``output`` with different inputs or model.

    Stages resume whatever they find under their output (mining parts, training
    checkpoints); the first run records ``run.json`` there, and a later run must match it.
    Settings that may change between submissions (e.g. the schedule length) stay out of
    the fingerprint.
    """
    from pseudobox import storage

    uri = storage.join(output, "run.json")
    if storage.exists(uri):
        previous = storage.read_json(uri)
        if previous != storage.json_safe(fingerprint):
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise ConfigError(f"{output} holds a run with different {changed}; "
                              "use a new output, or delete the old one to start over")
    else:
        storage.write_json(uri, fingerprint)

"""Pieces every stage launcher shares: Ray start-up, GPU detection, logging."""
from __future__ import annotations

import json
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


# Settings a training re-submission applies instead of refusing: the schedule length,
# reporting periods, the worker group and the Ray connection. Everything else a training
# stage reads is compared with run.json.
TRAINING_APPLIABLE = ("optim.max_iters", "optim.checkpoint_every", "optim.log_every", "workers", "ray")
# What applying these changes means, logged when they change.
APPLY_NOTES = {
    "optim.max_iters": "optim.lr_steps are fractions of max_iters, so the lr decay points move with it",
    "workers.num_workers": "the global batch is optim.batch_size x workers.num_workers",
}
_UNSET = object()


def run_fingerprint(stage: str, cfg) -> dict:
    """The full resolved config of a stage, tagged with the stage; what run.json records."""
    from pseudobox.config import to_dict

    return {"stage": stage, **to_dict(cfg)}


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 0.01}}`` → ``{"optim.lr": 0.01}``; lists stay whole values."""
    out: dict = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _matches(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def _show(value) -> str:
    return "<not set>" if value is _UNSET else json.dumps(value)


def _differences(old: dict, new: dict, keys) -> dict:
    """``{key: (old, new)}`` for the keys whose values differ (``_UNSET`` where absent)."""
    return {k: (old.get(k, _UNSET), new.get(k, _UNSET)) for k in sorted(keys)
            if old.get(k, _UNSET) != new.get(k, _UNSET)}


def _lines(diffs: dict) -> list[str]:
    return [f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in diffs.items()]


def check_same_run(output: str, fingerprint: dict, appliable: tuple[str, ...] = ()) -> dict:
    """Record the run's settings in ``<output>/run.json``, or check a re-submission against them.

    Stages resume whatever they find under their output (mining parts, training
    checkpoints), so a re-submission must be the same run. ``fingerprint`` is the
    resolved config (nested dicts, compared as dotted keys). Keys under ``appliable``
    (dotted names or section prefixes) may change: the stage applies the new values and
    run.json records them. Any other difference is refused with every key as
    ``old -> new``; nothing is silently ignored. Returns the applied ``{key: (old, new)}``.
    """
    from pseudobox import storage

    flat = flatten(storage.json_safe(fingerprint))
    settings = {k: v for k, v in flat.items() if not _matches(k, appliable)}
    applied = {k: v for k, v in flat.items() if _matches(k, appliable)}
    uri = storage.join(output, "run.json")
    previous = storage.read_json(uri) if storage.exists(uri) else None
    if previous is None:
        storage.write_json(uri, {"settings": settings, "applied": applied, "changes": []})
        return {}
    if "settings" in previous:
        # Split the record by today's appliable names (a stage may have made more appliable).
        old = {**previous["settings"], **previous.get("applied", {})}
        old_settings = {k: v for k, v in old.items() if not _matches(k, appliable)}
        refused = _differences(old_settings, settings, set(old_settings) | set(settings))
        old_applied = {k: v for k, v in old.items() if _matches(k, appliable)}
        history = previous.get("changes", [])
    else:
        # A run.json from before full recording holds only some settings: check those.
        old = {k: v for k, v in flatten(previous).items() if not _matches(k, appliable)}
        log.warning("%s: run.json records only %s; the other settings are recorded now", output, sorted(old))
        refused = _differences(old, settings, old)
        old_applied, history = applied, []
    if refused:
        allowed = ", ".join(appliable) if appliable else "nothing"
        raise ConfigError(f"{output} holds a run with other settings:\n  " + "\n  ".join(_lines(refused))
                          + f"\nA re-submission may change only: {allowed}. Set the others back to the "
                          "recorded values, or use a new output (delete the old one to start over).")
    changes = _differences(old_applied, applied, set(old_applied) | set(applied))
    for key, line in zip(changes, _lines(changes)):
        note = APPLY_NOTES.get(key)
        log.info("%s: applying %s%s", output, line, f" ({note})" if note else "")
    if changes or "settings" not in previous:
        record = [{k: [None if v is _UNSET else v for v in pair] for k, pair in changes.items()}] if changes else []
        storage.write_json(uri, {"settings": settings, "applied": applied, "changes": history + record})
    return changes


def check_same_classes(names: list[str], corpus_names: list[str], what: str, corpus_what: str, fix: str,
                       labels: tuple[str, str] = ("checkpoint", "corpus"), shown: int = 5) -> None:
    """Refuse ``what`` unless its class names equal the corpus's, in order.

    Labels are indices into these lists, so a model or corpus with other classes (or the
    same ones in another order) runs to the end and writes wrong labels; this check makes
    it a config error that shows the first differing positions.
    """
    names, corpus_names = list(names), list(corpus_names)
    if names == corpus_names:
        return
    diffs = [i for i in range(max(len(names), len(corpus_names)))
             if i >= len(names) or i >= len(corpus_names) or names[i] != corpus_names[i]]

    def at(seq, i):
        return repr(seq[i]) if i < len(seq) else "<none>"

    detail = ", ".join(f"#{i}: {at(names, i)} vs {at(corpus_names, i)}" for i in diffs[:shown])
    more = f" (and {len(diffs) - shown} more)" if len(diffs) > shown else ""
    order = ", the same names in another order" if sorted(names) == sorted(corpus_names) else ""
    raise ConfigError(f"the classes of {what} differ from those of {corpus_what} ({len(names)} vs "
                      f"{len(corpus_names)}{order}); first differences ({labels[0]} vs {labels[1]}): "
                      f"{detail}{more}. {fix}")

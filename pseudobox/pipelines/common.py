"""Pieces every stage launcher shares: Ray start-up, GPU detection, logging, progress
lines, and the per-shard actor pool that ``mine`` and ``predict`` run on."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from pseudobox.config import ConfigError, require
from pseudobox.console import quiet_worker_logs

log = logging.getLogger("pseudobox")
stats_log = logging.getLogger("pseudobox.ray_stats")  # DEBUG: Ray Data's stats after a pool run

# ``1`` shows Ray's own console output (banners, dataset plans, info logs, warnings);
# the CLI's ``--verbose`` sets it. Unset, Ray's console loggers show errors only.
VERBOSE_ENV = "PSEUDOBOX_VERBOSE"
_verbose = False


@dataclass
class RayConfig:
    """How a stage reaches Ray: an existing cluster (``address`` or ``RAY_ADDRESS``, as
    under ``ray job submit``), or a local instance with these resources."""

    address: str = ""
    num_cpus: int = 0  # 0: this machine's physical cores (``local_cpus``; local instance only)
    object_store_mb: int = 300

    def validate(self) -> None:
        require(self.num_cpus >= 0, "ray.num_cpus must be >= 0")
        require(self.object_store_mb >= 75, "ray.object_store_mb must be >= 75")


def is_verbose() -> bool:
    """Whether Ray's own console output is wanted (``setup_logging(verbose=True)`` or
    ``PSEUDOBOX_VERBOSE=1``)."""
    return _verbose or os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def local_cpus() -> int:
    """Cores a local Ray instance should advertise: the physical cores this process may
    run on. More logical CPUs than cores lets Ray schedule data tasks next to the actors
    and training workers, which then fight for the same cores."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    return max(1, min(usable, physical))


_STARTED_LOCAL_RAY = False


def started_local_ray() -> bool:
    """Whether this process started its own local Ray instance (no cluster address): then
    the CPUs Ray has are all it will ever have (no autoscaler adds nodes)."""
    return _STARTED_LOCAL_RAY


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray; unless verbose, Ray's console chatter is reduced to errors."""
    import ray

    global _STARTED_LOCAL_RAY
    verbose = is_verbose()
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS", "")
        # Ray's driver-side logger: banners and warnings (token auth, deprecations) at INFO,
        # errors only when quiet. Worker output still reaches the driver (log_to_driver):
        # training progress lines are printed by rank 0.
        quiet = dict(logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=True)
        # Workers inherit the driver's environment (S3 endpoint, credentials) on a local
        # instance; on a cluster they come from the job's runtime_env or the node image.
        if address:
            ray.init(address=address, **quiet)
        else:
            # Loopback only, metrics export off, its own temp dir, stopped with its driver
            # (pseudobox/local_ray.py). The dashboard (on 127.0.0.1) serves the state API that
            # Ray Train's placement-group cleaner polls; without it that actor logs a warning
            # every few seconds.
            from pseudobox.local_ray import init_local

            init_local(num_cpus=cfg.num_cpus or local_cpus(),
                       object_store_memory=cfg.object_store_mb * 1024 * 1024, **quiet)
            _STARTED_LOCAL_RAY = True
    if not verbose:
        hide_ray_warnings()
        quiet_worker_logs()  # Ray's chatter forwarded from its own actors (pseudobox/console.py)
    configure_ray_data(verbose)


def configure_ray_data(verbose: bool, progress_bars: bool | None = None) -> None:
    """Ray Data's console output: progress bars only on a terminal (``progress_bars``
    default: stderr is a TTY); dataset start/plan/finish lines and other info logs only
    when ``verbose``. Ray Data keeps writing its full log to the session's
    ``logs/ray-data`` directory either way."""
    import ray.data

    bars = sys.stderr.isatty() if progress_bars is None else progress_bars
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bars
    ctx.enable_operator_progress_bars = bars
    # Ray Data's logger has its own console handler (it does not propagate); only that
    # handler is turned down, so its file handlers keep everything.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.ERROR)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(setting: str) -> bool:
    """``auto`` uses GPUs when the Ray cluster has them; ``true``/``false`` force it."""
    if setting == "auto":
        return cluster_has_gpus()
    return setting == "true"


def setup_logging(verbose: bool = False) -> None:
    """Console logging for a stage: pseudobox's INFO lines always; Ray's own output
    (banners, dataset plans, info logs, deprecation warnings) only when ``verbose``;
    errors always. ``init_ray`` applies the Ray side (``is_verbose``)."""
    global _verbose
    _verbose = verbose
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("filelock", "botocore", "s3fs", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        hide_ray_warnings()


def hide_ray_warnings() -> None:
    """Ray's deprecation and future warnings stay off the console. Applied again after
    ``import ray``, which puts its own filter for ``RayDeprecationWarning`` first."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")
    try:
        from ray.util.annotations import RayDeprecationWarning
    except ImportError:
        return
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)


def format_eta(seconds: float | None) -> str:
    """A short duration (``engine.format_duration``); ``--`` when unknown (None, NaN,
    infinite or negative)."""
    from pseudobox.engine import format_duration

    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--"
    return format_duration(seconds)


def format_progress(stage: str, shards_done: int, shards_total: int, images_done: int, images_total: int,
                    seconds: float) -> str:
    """``mine  shards 3/12  images 1536/6144  41.3 img/s  ETA 2m05s``."""
    rate = images_done / seconds if seconds > 0 and images_done > 0 else None
    eta = max(images_total - images_done, 0) / rate if rate else None
    rate_text = f"{rate:.1f}" if rate else "--"
    return (f"{stage}  shards {shards_done}/{shards_total}  images {images_done}/{images_total}  "
            f"{rate_text} img/s  ETA {format_eta(eta)}")


class ShardProgress:
    """Progress of a per-shard stage on the driver: one line per completed shard, at most
    one every ``min_interval`` seconds (the last shard always), then a summary line."""

    def __init__(self, stage: str, expected: dict[str, int], min_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None):
        self.stage, self.expected, self.min_interval, self.clock = stage, dict(expected), min_interval, clock
        self.emit = emit or (lambda line: log.info("%s", line))
        self.started = clock()
        self.last_line = -math.inf
        self.images = 0
        self.shards: set[str] = set()

    def add_images(self, n: int) -> None:
        self.images += n

    def line(self) -> str:
        return format_progress(self.stage, len(self.shards), len(self.expected), self.images,
                               sum(self.expected.values()), self.clock() - self.started)

    def shard_done(self, shard: str) -> None:
        self.shards.add(shard)
        now = self.clock()
        if now - self.last_line >= self.min_interval or len(self.shards) >= len(self.expected):
            self.last_line = now
            self.emit(self.line())

    def summary(self, errors: int = 0) -> str:
        seconds = self.clock() - self.started
        rate = f"{self.images / seconds:.1f}" if seconds > 0 and self.images else "--"
        return (f"{self.stage}  done  shards {len(self.shards)}/{len(self.expected)}  images {self.images}  "
                f"{rate} img/s  in {format_eta(seconds)}  errors {errors}")


def run_shard_pool(ds, actor_cls, constructor_kwargs: dict, pool, use_gpu: bool, writer, stage: str,
                   expected: dict[str, int], min_interval: float = 5.0, decode: dict | None = None,
                   reread: Callable | None = None, max_pool_failures: int = 3) -> dict:
    """Stream ``ds`` through ``actor_cls`` on an autoscaling Ray Data actor pool and hand
    each output batch to ``writer`` (``mining.outputs.ShardPartWriter``), which writes a
    shard's part as soon as the shard is complete; logs progress.

    ``ds`` holds decoded rows, or raw rows when ``decode`` is given (``{"classes": [...],
    "labelled": bool}``): then each actor decodes its own batches (``ray_io.DecodingActor``,
    on its GPU when it holds one), so no decoded image crosses the object store.
    ``pool`` is the stage config: ``batch_size``, ``min_actors``, ``max_actors``,
    ``cpus_per_actor``, ``gpus_per_actor``. With ``use_gpu`` each actor reserves
    ``gpus_per_actor`` GPUs (a fraction shares one GPU between actors) and runs on CUDA;
    otherwise it runs on the CPU with ``cpus_per_actor`` threads, never on a GPU it did
    not reserve. ``expected``: samples per shard of this run. Returns the writer's reports.

    Ray Data restarts an actor that crashes, but an actor removed for good (``ray.kill``,
    a node drained without restart) fails the whole dataset. With ``reread`` (shard names →
    a new ``ds`` over them), the pool is then started again over the shards not yet
    written, up to ``max_pool_failures`` times; rows that arrive twice are dropped by the
    writer, so every sample still gets exactly one row.
    """
    import ray.data

    kwargs = {**constructor_kwargs, "device": "cuda" if use_gpu else "cpu",
              "threads": None if use_gpu else max(1, int(pool.cpus_per_actor))}
    fn, fn_kwargs = actor_cls, kwargs
    if decode is not None:
        from pseudobox.datasets.ray_io import DecodingActor

        fn, fn_kwargs = DecodingActor, {"actor_cls": actor_cls, "actor_kwargs": kwargs, **decode}
    progress = ShardProgress(stage, expected, min_interval=min_interval)
    for attempt in range(max_pool_failures + 1):
        out = ds.map_batches(
            fn, fn_constructor_kwargs=fn_kwargs, batch_size=pool.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_gpus=pool.gpus_per_actor if use_gpu else 0, num_cpus=pool.cpus_per_actor,
        )
        try:
            for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                progress.add_images(sum(1 for k in batch["key"] if not str(k).startswith("__")))  # not shard records
                for shard in writer.add_batch(batch):
                    progress.shard_done(shard)
            break
        except Exception as exc:
            unfinished = [s for s in expected if s not in writer.reports]
            if reread is None or attempt == max_pool_failures or not lost_actor(exc) or not unfinished:
                raise
            log.warning("%s: an actor of the pool was lost for good (%s); starting the pool again over the %d "
                        "unfinished shard(s) (retry %d of %d)", stage, type(exc).__name__, len(unfinished),
                        attempt + 1, max_pool_failures)
            ds = reread(unfinished)
    reports = writer.close()
    for shard in reports:
        if shard not in progress.shards:  # cut short: written at close
            progress.shard_done(shard)
    errors = sum(n for r in reports.values() for n in r.get("errors", {}).values())
    log.info("%s", progress.summary(errors))
    if stats_log.isEnabledFor(logging.DEBUG):  # Ray Data's per-operator times (benchmarks/ray_overhead.py)
        stats_log.debug("%s", out.stats())
    return reports


def lost_actor(exc: BaseException) -> bool:
    """Whether an error (or one it wraps) is Ray's report of a dead actor."""
    from ray.exceptions import RayActorError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RayActorError):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return False


def validate_actor_pool(cfg) -> None:
    """The checks of the actor-pool settings ``mine`` and ``predict`` share."""
    require(cfg.batch_size >= 1, "batch_size must be >= 1")
    require(1 <= cfg.min_actors <= cfg.max_actors, "need 1 <= min_actors <= max_actors")
    require(cfg.use_gpu in ("auto", "true", "false"), "use_gpu must be auto, true or false")
    require(cfg.cpus_per_actor > 0, "cpus_per_actor must be > 0")
    # Ray accepts a fraction below 1 (actors share the GPU) or a whole number of GPUs.
    require(cfg.gpus_per_actor > 0 and (cfg.gpus_per_actor <= 1 or float(cfg.gpus_per_actor).is_integer()),
            f"gpus_per_actor must be a fraction in (0, 1] or a whole number, got {cfg.gpus_per_actor}")


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


def config_defaults(cfg) -> dict:
    """The dotted default values of ``cfg``'s config class (``{}`` if it has required fields):
    a setting added by a newer pseudobox is absent from an older run.json, and its
    default must not count as a change."""
    from pseudobox import storage
    from pseudobox.config import to_dict

    try:
        return flatten(storage.json_safe(to_dict(type(cfg)())))
    except TypeError:
        return {}


def check_same_run(output: str, fingerprint: dict, appliable: tuple[str, ...] = (),
                   defaults: dict | None = None) -> dict:
    """Record the run's settings in ``<output>/run.json``, or check a re-submission against them.

    Stages resume whatever they find under their output (mining parts, training
    checkpoints), so a re-submission must be the same run. ``fingerprint`` is the
    resolved config (nested dicts, compared as dotted keys). Keys under ``appliable``
    (dotted names or section prefixes) may change: the stage applies the new values and
    run.json records them. Any other difference is refused with every key as
    ``old -> new``; nothing is silently ignored. A key the record lacks (a setting newer
    than the run) passes when its value is its ``defaults`` entry (``config_defaults``).
    Returns the applied ``{key: (old, new)}``.
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
        added = {k for k, (was, now) in refused.items() if was is _UNSET and k in (defaults or {})
                 and now == defaults[k]}
        refused = {k: v for k, v in refused.items() if k not in added}
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
    if changes or "settings" not in previous or set(settings) != set(previous["settings"]):
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

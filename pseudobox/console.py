"""What reaches the console from Ray's worker processes.

Ray forwards every line its workers and actors print to the driver (``log_to_driver``),
which is how rank 0's progress lines arrive. The same channel carries Ray's own
chatter from its internal actors (the Train controller, Ray Data's split coordinator):
execution plans, worker-group set-up, deprecation warnings. Their loggers live in
other processes, so the driver's logging config cannot reach them; instead the driver
drops those lines, by pattern, before printing. Everything else, errors and tracebacks
included, is printed as before. ``--verbose`` (``PSEUDOBOX_VERBOSE=1``) keeps all lines.
"""
from __future__ import annotations

import functools
import re

# Ray's informational lines, as Ray 2.60 words them. A line matching none is kept.
RAY_CHATTER = re.compile("|".join([
    r"Starting execution of Dataset",
    r"Execution plan of Dataset",
    r"Progress bars disabled",
    r"Dataset \S+ execution finished in",
    r"Requesting resources: ",
    r"Attempting to start training worker group",
    r"Started training worker group of size",
    r"^- \(ip=\S+, pid=\d+\) world_rank=",
    r"Setting up process group for: ",
    r"Moving model to device: ",
    r"Wrapping provided model in DistributedDataParallel",
    r"Reporting training result \d+: TrainingReport\(",
    r"Checkpoint successfully created at: Checkpoint\(",  # Ray Train, every checkpoint, every rank 0
    # Ray Data passes actor constructor arguments by reference and Ray's core logs this at
    # error level for every such actor; it is advice for Ray's developers, not a failure.
    r"has constructor arguments in the object store and max_restarts > 0",
]))
# A Python warning from Ray's own code: the warning line, then its indented source line.
RAY_WARNING = re.compile(r"site-packages/ray/\S+:\d+: \w*(Deprecation|Future)Warning: ")


def drop_ray_chatter(lines: list[str]) -> list[str]:
    """The lines worth showing: Ray's informational chatter removed, all else kept."""
    kept, skip_source = [], False
    for line in lines:
        if skip_source and line.startswith("  "):
            skip_source = False
            continue
        skip_source = bool(RAY_WARNING.search(line))
        if skip_source or RAY_CHATTER.search(line):
            continue
        kept.append(line)
    return kept


def _filtered(handler, data: dict) -> None:
    lines = drop_ray_chatter(list(data.get("lines", [])))
    if lines:
        handler({**data, "lines": lines})


def quiet_worker_logs() -> bool:
    """Wrap the driver's worker-log printer with ``drop_ray_chatter``; call after
    ``ray.init``. Returns False where this Ray has no such printer (nothing changed)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    with dispatcher._lock:
        handlers = dispatcher.handlers
        for i, (name, handler) in enumerate(handlers):
            if name == "ray_print_logs" and getattr(handler, "func", None) is not _filtered:
                handlers[i] = (name, functools.partial(_filtered, handler))
                return True
    return False

"""Ray Train glue shared by the training stages (classifier, pre-train, fine-tune).

``fit`` wires a per-worker function into a ``TorchTrainer`` whose run directory is the
stage's output URI (local or s3://), with ``FailureConfig(max_failures)`` so that a lost
worker restarts the group from the latest checkpoint; re-running with the same output
resumes too. After training the driver exports ``<output>/model.pt`` (weights without
optimizer state) for the next stage.

Ray Train keeps the newest ``num_to_keep`` checkpoints and forgets a checkpoint whose
upload finished while the worker group was failing (or the driver was killed): such a
directory stays in the run folder, untracked. After a successful ``fit`` the driver
removes the ``checkpoint_*`` directories that neither the Result nor Ray Train's run
snapshot (``checkpoint_manager_snapshot.json``) references, and logs them; when removal
fails it names them in a warning (``remove_untracked_checkpoints``).

The console gets one progress line per log step from rank 0 (``engine.train_loop``);
Ray Train's own per-report ``TrainingReport(...)`` lines from every rank are dropped by
the driver with Ray's other chatter (``pseudobox/console.py``) unless ``--verbose``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
from dataclasses import dataclass

import torch

from pseudobox import storage
from pseudobox.config import ConfigError, require
from pseudobox.engine import OptimConfig, lr_scaling_note, scaled_lr
from pseudobox.models.checkpoint import MODEL_FILE, read_checkpoint_file, save_checkpoint
from pseudobox.pipelines.common import log, resolve_use_gpu, started_local_ray


@dataclass
class WorkersConfig:
    num_workers: int = 2
    use_gpu: str = "auto"
    cpus_per_worker: float = 1.0
    max_failures: int = 2

    def validate(self) -> None:
        require(self.num_workers >= 1, "workers.num_workers must be >= 1")
        require(self.use_gpu in ("auto", "true", "false"), "workers.use_gpu must be auto, true or false")
        require(self.cpus_per_worker > 0, "workers.cpus_per_worker must be > 0")
        require(self.max_failures >= 0, "workers.max_failures must be >= 0")


NUM_TO_KEEP = 3  # checkpoints Ray Train keeps per run (CheckpointConfig.num_to_keep)
# Ray Train V2 names a checkpoint directory checkpoint_<date>_<time>.<microseconds>
# (StorageContext.make_default_checkpoint_dir_name); the run snapshot is a file beside them.
CHECKPOINT_DIR = re.compile(r"^checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(\.\d+)?$")
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def run_config(output: str, max_failures: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs, path = storage.pyarrow_filesystem(output)
    parent, name = os.path.dirname(path.rstrip("/")), os.path.basename(path.rstrip("/"))
    return RunConfig(name=name, storage_path=parent, storage_filesystem=fs,
                     failure_config=FailureConfig(max_failures=max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=NUM_TO_KEEP))


TENSORBOARD_DIR = "tensorboard"


def tensorboard_uri(output: str) -> str:
    """Where a training stage writes its TensorBoard event files: ``<output>/tensorboard``."""
    return storage.join(output, TENSORBOARD_DIR)


def scaled_optim(optim: OptimConfig, workers: WorkersConfig, stage: str) -> OptimConfig:
    """The optimizer settings the workers use: ``optim.lr`` scaled linearly from
    ``optim.reference_batch`` to this run's total batch (logged, both values)."""
    total = optim.batch_size * workers.num_workers
    log.info("%s: %s", stage, lr_scaling_note(optim.lr, optim.reference_batch, total))
    return dataclasses.replace(optim, lr=scaled_lr(optim.lr, optim.reference_batch, total))


def check_room_for_data(workers: WorkersConfig, datasets: dict) -> None:
    """A dataset that streams during training needs Ray Data tasks (read, decode) running
    beside the workers. If the workers reserve every CPU of a local Ray instance, those
    tasks never start and training waits forever: refuse that before starting, naming the
    settings to change. On a cluster (which may autoscale) it is a warning."""
    import ray
    from ray.data.dataset import MaterializedDataset

    if all(isinstance(ds, MaterializedDataset) for ds in datasets.values()):
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    reserved = workers.num_workers * workers.cpus_per_worker
    if total - reserved >= 1:
        return
    message = (f"the {workers.num_workers} training worker(s) reserve {reserved:g} of Ray's {total:g} CPUs, which "
               f"leaves none for the Ray Data tasks that stream the training data, so training would wait forever. "
               f"Lower workers.num_workers or workers.cpus_per_worker, or give Ray more CPUs (ray.num_cpus for a "
               f"local instance; logical CPUs may exceed the cores)")
    if started_local_ray():
        raise ConfigError(message)
    log.warning("%s (unless the cluster autoscales)", message)


def fit(worker_fn, loop_config: dict, output: str, workers: WorkersConfig, datasets: dict):
    """Run ``worker_fn(loop_config)`` on N Ray Train workers (DDP); returns the Result."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    check_room_for_data(workers, datasets)
    use_gpu = resolve_use_gpu(workers.use_gpu)
    loop_config = {**loop_config, "use_gpu": use_gpu, "threads": max(1, int(workers.cpus_per_worker))}
    trainer = TorchTrainer(
        worker_fn, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": workers.cpus_per_worker}),
        run_config=run_config(output, workers.max_failures),
        datasets=datasets,
    )
    log.info("training on %d %s worker(s) → %s", workers.num_workers, "GPU" if use_gpu else "CPU", output)
    result = trainer.fit()
    remove_untracked_checkpoints(result, output)
    return result


def snapshot_checkpoint_names(snapshot: dict) -> set[str]:
    """Every ``checkpoint_dir_name`` that Ray Train's run snapshot references (kept, latest
    and pending checkpoints): the directories a later restore may open."""
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "checkpoint_dir_name" and isinstance(value, str):
                    names.add(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(snapshot)
    return names


def untracked_checkpoints(names: list[str], tracked: set[str]) -> list[str]:
    """The checkpoint directories among ``names`` (entries of a run folder) that are not
    ``tracked``; other entries (model.pt, the run snapshot, tensorboard/) are never listed."""
    return sorted(n for n in names if CHECKPOINT_DIR.match(n) and n not in tracked)


def remove_untracked_checkpoints(result, output: str) -> list[str]:
    """Delete the checkpoint directories of the run folder ``output`` that Ray Train no
    longer tracks: neither the Result (latest and kept checkpoints) nor the run snapshot
    references them. Returns their names. Nothing is removed when the tracked set cannot
    be read; a failed removal is a warning naming the directories, not a failed run."""
    tracked = {posixpath.basename(c.path.rstrip("/")) for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        tracked.add(posixpath.basename(result.checkpoint.path.rstrip("/")))
    try:
        names = storage.listdir(output)
        if RUN_SNAPSHOT in names:
            tracked |= snapshot_checkpoint_names(json.loads(storage.read_bytes(storage.join(output, RUN_SNAPSHOT))))
    except Exception as e:  # the run itself succeeded; cleaning up is secondary
        log.warning("could not list the checkpoints of %s to remove untracked ones (%s); "
                    "directories outside num_to_keep=%d may remain", output, e, NUM_TO_KEEP)
        return []
    if not tracked:
        return []
    orphans = untracked_checkpoints(names, tracked)
    removed, failed = [], []
    for name in orphans:
        try:
            storage.remove(storage.join(output, name), recursive=True)
            removed.append(name)
        except Exception as e:
            failed.append(f"{name} ({e})")
    if removed:
        log.info("removed %d checkpoint(s) that Ray Train no longer tracks (outside num_to_keep=%d, or written "
                 "during a failure) from %s: %s", len(removed), NUM_TO_KEEP, output, ", ".join(removed))
    if failed:
        log.warning("could not remove %d untracked checkpoint(s) from %s; delete them by hand: %s",
                    len(failed), output, "; ".join(failed))
    return removed


def export_final(result, output: str) -> dict:
    """Copy the last checkpoint's weights (no optimizer state) to ``<output>/model.pt``."""
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint under {output}")
    with result.checkpoint.as_directory() as d:
        ckpt = read_checkpoint_file(os.path.join(d, MODEL_FILE))
    for key in ("optimizer_state", "scheduler_state"):
        ckpt.pop(key, None)
    save_checkpoint(ckpt, storage.join(output, MODEL_FILE))
    return ckpt


def worker_device(use_gpu: bool, threads: int):
    """The torch device of this Ray Train worker."""
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    torch.set_num_threads(threads)
    return torch.device("cpu")


def prepare(model: torch.nn.Module, in_ray: bool = True) -> torch.nn.Module:
    """Move to the worker's device and wrap in DDP when there are several workers."""
    if not in_ray:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def dataset_batches(name: str, batch_size: int):
    """A per-epoch iterator factory over this worker's shard of a Ray dataset."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    # Shards are read in random order; the buffer mixes samples across blocks too.
    return lambda: shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2,
                                      local_shuffle_buffer_size=16 * batch_size)

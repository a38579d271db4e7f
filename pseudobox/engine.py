"""The shared training loop (classifier, DAP pre-training, fine-tuning).

Plain PyTorch: ``train_loop`` takes a model, an optimizer, a batch iterator factory and a
``loss_fn(model, batch) -> {name: loss}``. It runs inside a Ray Train worker, where
``WorkerCheckpointer`` reports metrics and checkpoints through ``ray.train.report``
(rank 0 writes, every rank reports) and restores from ``ray.train.get_checkpoint()``
after a failure or on re-submission; outside Ray it writes to a local directory, so
the loop is testable on its own. Rank 0 prints one progress line per log step and
writes the same numbers to TensorBoard (``ScalarLog``).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from pseudobox.config import require
from pseudobox.models.checkpoint import MODEL_FILE, read_checkpoint_file

log = logging.getLogger("pseudobox")


@dataclass
class OptimConfig:
    """SGD with linear warmup and step decay at fractions of ``max_iters``."""

    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    max_iters: int = 1000
    lr_steps: tuple[float, ...] = (0.75, 0.9)
    gamma: float = 0.1
    batch_size: int = 8  # per worker
    grad_clip: float = 0.0
    # Reduced precision where the device has it: autocast of the forward (``amp_settings``).
    # ``amp_dtype`` auto: fp16 + GradScaler on CUDA (as torchvision's references), bf16 on
    # CPUs with bf16 units (AVX-512 BF16 / AMX), fp32 on other CPUs (bf16 is emulated there,
    # slower than fp32). ``bf16`` / ``fp16`` force that dtype on any device; ``amp`` false: fp32.
    amp: bool = True
    amp_dtype: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 20
    # 0: ``lr`` is used as given. N: ``lr`` is the lr at a total batch of N images (as a
    # paper states it) and is scaled linearly to batch_size x num_workers.
    reference_batch: int = 0

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr must be > 0")
        require(self.reference_batch >= 0, "optim.reference_batch must be >= 0 (0: use optim.lr as given)")
        require(self.max_iters >= 1, "optim.max_iters must be >= 1")
        require(self.batch_size >= 1, "optim.batch_size must be >= 1")
        require(self.warmup_iters >= 0, "optim.warmup_iters must be >= 0")
        require(all(0 < s < 1 for s in self.lr_steps), "optim.lr_steps are fractions of max_iters in (0, 1)")
        require(self.checkpoint_every >= 1 and self.log_every >= 1, "optim.checkpoint_every/log_every must be >= 1")
        require(self.amp_dtype in AMP_DTYPES, f"optim.amp_dtype must be one of {tuple(AMP_DTYPES)}, got {self.amp_dtype!r}")


AMP_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bf16 units (AVX-512 BF16 or AMX): only there is a bf16 forward
    faster than fp32; elsewhere oneDNN emulates it."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # an older torch or a non-x86 build without the query
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def amp_settings(cfg: "OptimConfig", device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None for fp32, use a GradScaler)`` for ``cfg.amp`` /
    ``cfg.amp_dtype`` on ``device`` (None: CPU). A GradScaler only for fp16, whose range
    needs it; bf16 has fp32's range."""
    if not cfg.amp:
        return None, False
    kind = torch.device(device or "cpu").type
    dtype = AMP_DTYPES[cfg.amp_dtype]
    if dtype is None:  # auto
        if kind == "cuda":
            dtype = torch.float16
        elif kind == "cpu" and cpu_supports_bf16():
            dtype = torch.bfloat16
        else:
            return None, False
    return dtype, dtype == torch.float16


def precision_note(dtype: torch.dtype | None, device) -> str:
    """The log line naming the precision a training stage runs in."""
    kind = torch.device(device or "cpu").type
    if dtype is None:
        return f"precision: fp32 on {kind}"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16 with GradScaler"}[dtype]
    return f"precision: {name} autocast on {kind} (losses, anchors and box coding in fp32)"


def scaled_lr(lr: float, reference_batch: int, total_batch: int) -> float:
    """The linear scaling rule: ``lr`` holds at ``reference_batch`` images per step, so at
    ``total_batch`` it is ``lr * total_batch / reference_batch``; ``reference_batch`` 0 = off."""
    return lr * total_batch / reference_batch if reference_batch else lr


def lr_scaling_note(lr: float, reference_batch: int, total_batch: int) -> str:
    """The log line that states the configured and the used lr."""
    if not reference_batch:
        return f"lr {lr:g} at batch {total_batch} (optim.reference_batch 0: not scaled)"
    return (f"lr {lr:g} at batch {reference_batch} → {scaled_lr(lr, reference_batch, total_batch):g} "
            f"at batch {total_batch} (linear scaling)")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier on ``cfg.lr`` at ``step``: linear warmup, then ×gamma at each milestone."""
    factor = 1.0
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        factor = cfg.warmup_factor * (1 - alpha) + alpha
    decays = sum(step >= int(f * cfg.max_iters) for f in cfg.lr_steps)
    return factor * cfg.gamma ** decays


def build_scheduler(optimizer, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def resume_training(restored: dict | None, model: torch.nn.Module, optimizer, scheduler) -> tuple[int, list]:
    """Load a restored worker checkpoint's model, optimizer and scheduler state; returns
    ``(start_step, history)``, ``(0, [])`` when there is nothing to resume."""
    if restored is None:
        return 0, []
    model.load_state_dict(restored["model_state"])
    optimizer.load_state_dict(restored["optimizer_state"])
    scheduler.load_state_dict(restored["scheduler_state"])
    return restored["step"], restored.get("history", [])


def run_init(restored: dict | None, initialise: Callable[[], dict]) -> dict:
    """The run's ``init`` record for its checkpoints and ``model.pt``: on a fresh start,
    ``initialise()`` applies the stage's initialisation and returns its record; after a
    restore (a lost worker, a re-submission) it is the record the restored checkpoint
    carries, so every later checkpoint still names what the run started from."""
    if restored is None:
        return initialise()
    return restored.get("init") or {"from": "unrecorded"}


def resume_record(restored: dict | None) -> list[dict]:
    """The run's restores so far, for its checkpoints: the restored checkpoint's list plus
    this restore (``{"step": N}``, the step training continues from); empty on a fresh start."""
    if restored is None:
        return []
    return [*restored.get("resumes", []), {"step": int(restored["step"])}]


class WorkerCheckpointer:
    """Reports metrics and checkpoints from a training worker.

    Inside Ray Train: every rank calls ``ray.train.report`` (it is a collective), rank 0
    attaches the checkpoint directory. Outside: checkpoints go to ``local_dir``.
    """

    def __init__(self, local_dir: str | None = None):
        self.in_ray = local_dir is None
        self.local_dir = local_dir
        self.rank, self.world_size = 0, 1
        if self.in_ray:
            import ray.train

            context = ray.train.get_context()
            self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def restore(self) -> dict | None:
        """The latest training checkpoint, or None; loaded weights-only (``CheckpointError``
        on a corrupt file or one that carries code)."""
        if self.in_ray:
            import ray.train

            ckpt = ray.train.get_checkpoint()
            if ckpt is None:
                return None
            with ckpt.as_directory() as d:
                return read_checkpoint_file(os.path.join(d, MODEL_FILE))
        path = os.path.join(self.local_dir, MODEL_FILE)
        return read_checkpoint_file(path) if os.path.exists(path) else None

    def report(self, metrics: dict, checkpoint: Callable[[], dict] | None = None) -> None:
        if not self.in_ray:
            if checkpoint is not None:
                from pseudobox import storage

                storage.torch_save(checkpoint(), os.path.join(self.local_dir, MODEL_FILE))
            return
        import ray.train

        if checkpoint is not None and self.rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(checkpoint(), os.path.join(d, MODEL_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def format_duration(seconds: float) -> str:
    """``3m12s``, ``1h05m``, ``45s``: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(stage: str, row: dict, max_iters: int, images_per_s: float, eta_s: float) -> str:
    """One line per log step: stage, step/total, total loss (its terms), lr, global img/s, ETA.

    ``row`` is a history row (``step``, ``lr``, ``loss`` and the loss terms). Grouped
    numbers (``eval/*`` metrics, ``pseudo/*`` statistics) follow the ETA; per-class ones
    (two slashes, e.g. ``pseudo/precision/<class>``) stay in the history and TensorBoard."""
    skip = {"step", "lr", "s_per_iter", "loss"}
    terms = [(k.removeprefix("loss_"), v) for k, v in row.items() if k not in skip and "/" not in k]
    parts = [f"{stage}  step {row['step']}/{max_iters}", f"loss {row['loss']:.4f}"]
    if terms:
        parts[-1] += " (" + ", ".join(f"{k} {v:.4f}" for k, v in terms) + ")"
    parts += [f"lr {row['lr']:.4g}", f"{images_per_s:.1f} img/s", f"ETA {format_duration(eta_s)}"]
    grouped = [(k, v) for k, v in row.items()
               if "/" in k and k != "eval/images" and (k.count("/") == 1 or k.startswith("eval/"))]
    if grouped:
        parts.append(" ".join(f"{k} {v:.2f}" for k, v in grouped))
    return "  ".join(parts)


class ScalarLog:
    """TensorBoard event file of a training stage under ``uri`` (rank 0 only).

    Local ``uri``: the event file is written in place, so ``tensorboard --logdir`` sees it
    live. ``s3://``: it is written to a local temp dir and each ``sync()`` (at every
    checkpoint and at the end) uploads it whole, as one atomic PUT. A restarted worker
    writes a new file; ``purge_step`` tells TensorBoard to drop the steps that it redoes.
    """

    def __init__(self, uri: str, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        from pseudobox import storage

        self.uri = uri
        self.remote = storage.is_remote(uri)
        self.local_dir = tempfile.mkdtemp(prefix="pseudobox-tb-") if self.remote else uri
        self.writer = SummaryWriter(logdir=self.local_dir, purge_step=purge_step or None, flush_secs=30)

    def add(self, step: int, scalars: dict) -> None:
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def sync(self) -> None:
        from pseudobox import storage

        self.writer.flush()
        if self.remote:
            try:
                storage.upload_dir(self.local_dir, self.uri)
            except Exception as e:  # curves are not worth a failed run; the next sync retries
                log.warning("TensorBoard upload to %s failed (%s); retrying at the next checkpoint", self.uri, e)

    def close(self) -> None:
        self.writer.close()
        self.sync()
        if self.remote:
            shutil.rmtree(self.local_dir, ignore_errors=True)


def tensorboard_scalars(row: dict) -> dict:
    """History row → TensorBoard tags: ``train/<key>``; ``eval/*`` keys keep their name."""
    return {(k if k.startswith("eval/") else f"train/{k}"): v for k, v in row.items() if k != "step"}


def train_loop(model: torch.nn.Module, optimizer, scheduler, cfg: OptimConfig,
               batches: Callable[[], Iterable], loss_fn: Callable[[torch.nn.Module, object], dict],
               make_checkpoint: Callable[[int, list], dict], checkpointer: WorkerCheckpointer,
               start_step: int = 0, history: list | None = None, device=None, stage: str = "train",
               tensorboard: str = "", eval_every: int = 0,
               eval_fn: Callable[[int, torch.nn.Module], dict | None] | None = None,
               after_step: Callable[[int, torch.nn.Module], None] | None = None,
               row_metrics: Callable[[], dict] | None = None) -> list:
    """Run SGD until ``cfg.max_iters``; returns the metric history (one row per log).

    ``batches()`` is called once per epoch. Checkpoints every ``checkpoint_every`` steps
    and at the end; each carries the history so far (training curves survive restarts).
    Rank 0 logs a progress line per row and, with ``tensorboard`` (a URI), writes the
    rows as scalars there. With ``eval_every`` N, every N steps and at the end there is
    a row on every rank (``ray.train.report`` is a collective) and ``eval_fn(step, model)``,
    passed on rank 0 only, adds its metrics to it as ``eval/<name>``.

    A method's state around the loss hooks in without a loop of its own:
    ``after_step(step, model)`` runs after every optimizer step (an EMA teacher update),
    and ``row_metrics()`` adds its numbers (pseudo-label statistics) to each history row.
    """
    history = list(history or [])
    step = start_step
    if start_step:
        # A re-submission may lengthen the schedule, which moves the decay points, or change
        # the worker count, which changes a linearly scaled lr: the restored optimizer and
        # scheduler still hold the old run's lr, so this run's cfg.lr is the base again.
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    amp_dtype, use_scaler = amp_settings(cfg, device)
    device_type = torch.device(device or "cpu").type
    scaler = torch.amp.GradScaler(device_type, enabled=use_scaler)
    lead = checkpointer.rank == 0
    if lead:
        log.info("%s: %s", stage, precision_note(amp_dtype, device))
        if start_step:
            log.info("%s: resumed at step %d of %d from the run's latest checkpoint", stage, start_step,
                     cfg.max_iters)
    scalars = ScalarLog(tensorboard, purge_step=start_step) if tensorboard and lead else None
    images_per_step = cfg.batch_size * checkpointer.world_size  # nominal, all workers together
    running: dict[str, float] = {}
    n_running, t_last = 0, time.time()
    model.train()
    try:
        while step < cfg.max_iters:
            seen = 0
            for batch in batches():
                seen += 1
                with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    losses = loss_fn(model, batch)
                losses = {k: v.float() for k, v in losses.items()}  # summed and reported in fp32
                loss = sum(losses.values())
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    terms = {k: float(v.detach()) for k, v in losses.items()}
                    raise FloatingPointError(f"loss is {loss_value} at step {step}: {terms}; "
                                             "lower optim.lr or raise optim.warmup_iters")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                if after_step is not None:
                    after_step(step, model)
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) + float(v.detach())
                running["loss"] = running.get("loss", 0.0) + loss_value
                n_running += 1
                last = step >= cfg.max_iters
                evaluate = eval_every > 0 and (step % eval_every == 0 or last)
                save = step % cfg.checkpoint_every == 0 or last
                if step % cfg.log_every == 0 or save or evaluate:
                    s_per_iter = (time.time() - t_last) / max(n_running, 1)
                    images_per_s = images_per_step / s_per_iter if s_per_iter > 0 else 0.0
                    row = {"step": step, "lr": optimizer.param_groups[0]["lr"], "s_per_iter": s_per_iter,
                           **{k: v / max(n_running, 1) for k, v in running.items()}}
                    if row_metrics is not None:
                        row.update(row_metrics())
                    if evaluate and eval_fn is not None:
                        metrics = eval_fn(step, model) or {}
                        model.train()
                        row.update({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                    history.append(row)
                    if lead:
                        log.info(progress_line(stage, row, cfg.max_iters, images_per_s,
                                               (cfg.max_iters - step) * s_per_iter))
                    if scalars is not None:
                        scalars.add(step, {**tensorboard_scalars(row), "train/img_per_s": images_per_s})
                    checkpointer.report(row, (lambda s=step: make_checkpoint(s, history)) if save else None)
                    if scalars is not None and save:
                        scalars.sync()
                    # The next window times training only, not evaluation or checkpoint uploads.
                    running, n_running, t_last = {}, 0, time.time()
                if last:
                    break
            if seen == 0:
                raise RuntimeError("the training data stream yielded no batches: "
                                   "check the corpus, split and mined boxes")
    finally:
        if scalars is not None:
            scalars.close()
    return history

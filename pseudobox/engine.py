"""The shared training loop (classifier, DAP pre-training, fine-tuning).

Plain PyTorch: ``train_loop`` takes a model, an optimizer, a batch iterator factory and a
``loss_fn(model, batch) -> {name: loss}``. It runs inside a Ray Train worker, where
``WorkerCheckpointer`` reports metrics and checkpoints through ``ray.train.report``
(rank 0 writes, every rank reports) and restores from ``ray.train.get_checkpoint()``
after a failure or on re-submission; outside Ray it writes to a local directory, so
the loop is testable on its own.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from pseudobox.config import require
from pseudobox.models.checkpoint import MODEL_FILE, read_checkpoint_file


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
    amp: bool = True  # fp16 autocast + GradScaler, on CUDA only (as torchvision's references)
    checkpoint_every: int = 500
    log_every: int = 20

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr must be > 0")
        require(self.max_iters >= 1, "optim.max_iters must be >= 1")
        require(self.batch_size >= 1, "optim.batch_size must be >= 1")
        require(self.warmup_iters >= 0, "optim.warmup_iters must be >= 0")
        require(all(0 < s < 1 for s in self.lr_steps), "optim.lr_steps are fractions of max_iters in (0, 1)")
        require(self.checkpoint_every >= 1 and self.log_every >= 1, "optim.checkpoint_every/log_every must be >= 1")


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


class WorkerCheckpointer:
    """Reports metrics and checkpoints from a training worker.

    Inside Ray Train: every rank calls ``ray.train.report`` (it is a collective), rank 0
    attaches the checkpoint directory. Outside: checkpoints go to ``local_dir``.
    """

    def __init__(self, local_dir: str | None = None):
        self.in_ray = local_dir is None
        self.local_dir = local_dir
        self.rank = 0
        if self.in_ray:
            import ray.train

            self.rank = ray.train.get_context().get_world_rank()

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


def train_loop(model: torch.nn.Module, optimizer, scheduler, cfg: OptimConfig,
               batches: Callable[[], Iterable], loss_fn: Callable[[torch.nn.Module, object], dict],
               make_checkpoint: Callable[[int, list], dict], checkpointer: WorkerCheckpointer,
               start_step: int = 0, history: list | None = None, device=None) -> list:
    """Run SGD until ``cfg.max_iters``; returns the metric history (one row per log).

    ``batches()`` is called once per epoch. Checkpoints every ``checkpoint_every`` steps
    and at the end; each carries the history so far (training curves survive restarts).
    """
    history = list(history or [])
    step = start_step
    if start_step:
        # A re-submission may lengthen the schedule, which moves the decay points: the
        # restored optimizer still holds the old schedule's lr for this step.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(step, cfg)
    use_amp = cfg.amp and device is not None and torch.device(device).type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    running: dict[str, float] = {}
    n_running, t_last = 0, time.time()
    model.train()
    while step < cfg.max_iters:
        seen = 0
        for batch in batches():
            seen += 1
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                losses = loss_fn(model, batch)
            loss = sum(losses.values())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}: {({k: float(v.detach()) for k, v in losses.items()})}; "
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
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            running["loss"] = running.get("loss", 0.0) + loss_value
            n_running += 1
            last = step >= cfg.max_iters
            if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
                now = time.time()
                row = {"step": step, "lr": optimizer.param_groups[0]["lr"],
                       "s_per_iter": (now - t_last) / max(n_running, 1),
                       **{k: v / max(n_running, 1) for k, v in running.items()}}
                history.append(row)
                running, n_running, t_last = {}, 0, now
                save = step % cfg.checkpoint_every == 0 or last
                checkpointer.report(row, (lambda s=step: make_checkpoint(s, history)) if save else None)
            if last:
                break
        if seen == 0:
            raise RuntimeError("the training data stream yielded no batches: check the corpus, split and mined boxes")
    return history

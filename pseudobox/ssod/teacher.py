"""The EMA teacher of the teacher-student methods (Mean Teacher, Unbiased Teacher, Dense Teacher).

The schedule: the student trains on labelled data alone for ``burn_in_iters``. After step
``copy_iters`` the teacher becomes an exact copy of the student; from then on, after every
optimizer step, ``teacher ← momentum · teacher + (1 − momentum) · student``. The
unsupervised loss starts after burn-in and its weight ramps linearly to full over
``ramp_iters`` (0: full weight at once). Unbiased Teacher copies at the end of burn-in
(``copy_iters = burn_in_iters``, no ramp); Dense Teacher copies at 3k, starts the
unsupervised loss at 5k and reaches full weight at 10k.

The teacher is a plain module outside DDP, in eval mode, every parameter with
``requires_grad=False``; it only ever runs under ``torch.inference_mode``. Every rank
applies the same update to the same (all-reduced) student weights, so every rank keeps the
same teacher without communication.
"""
from __future__ import annotations

import copy

import torch

from pseudobox.config import require
from pseudobox.engine import unwrap


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """In place: every floating-point parameter and buffer of ``teacher`` becomes
    ``momentum · teacher + (1 − momentum) · student``; integer buffers (counters) are copied.

    The modules must have the same structure (``student`` may be DDP-wrapped)."""
    student = unwrap(student)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if t_state.keys() != s_state.keys():
        missing = sorted(set(s_state) ^ set(t_state))
        raise ValueError(f"teacher and student differ in {len(missing)} tensors, e.g. {missing[:3]}")
    for name, t in t_state.items():
        s = s_state[name].detach()
        if t.is_floating_point():
            t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
        else:
            t.copy_(s)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` (unwrapped from DDP) in eval mode, without gradients."""
    model = unwrap(model)
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class EmaTeacher:
    """A teacher module and its schedule (burn-in, copy, EMA, unsupervised weight ramp).

    ``after_step(step, student)`` is called after each optimizer step with the number of
    steps completed: it copies after step ``copy_iters`` and applies EMA after later steps.
    ``copy_iters`` None: at the end of burn-in. A teacher that is never copied (both 0) starts
    as a copy of the initial student.
    """

    def __init__(self, student: torch.nn.Module, burn_in_iters: int, momentum: float, ramp_iters: int = 0,
                 copy_iters: int | None = None):
        copy_iters = burn_in_iters if copy_iters is None else copy_iters
        require(burn_in_iters >= 0, "ssod.burn_in_iters must be >= 0")
        require(0 <= copy_iters <= burn_in_iters, "ssod.teacher_copy_iters must be in [0, ssod.burn_in_iters]: "
                                                  "the teacher must exist before it labels anything")
        require(0.0 <= momentum < 1.0, "ssod.ema_momentum must be in [0, 1)")
        require(ramp_iters >= 0, "ssod.unsup_ramp_iters must be >= 0")
        self.burn_in_iters, self.copy_iters = burn_in_iters, copy_iters
        self.momentum, self.ramp_iters = momentum, ramp_iters
        self.module = frozen_copy(student)

    def active(self, step: int) -> bool:
        """Whether the unsupervised branch runs at (0-based) ``step``: after the copy."""
        return step >= self.burn_in_iters

    def weight(self, step: int) -> float:
        """The factor on the unsupervised weight at (0-based) ``step``: 0 during burn-in, then a
        linear ramp to 1 over ``ramp_iters``."""
        if step < self.burn_in_iters:
            return 0.0
        if self.ramp_iters == 0:
            return 1.0
        return min(1.0, (step - self.burn_in_iters + 1) / self.ramp_iters)

    def after_step(self, step: int, student: torch.nn.Module) -> None:
        if step == self.copy_iters:
            ema_update(self.module, student, 0.0)  # the copy
        elif step > self.copy_iters:
            ema_update(self.module, student, self.momentum)

    def state_dict(self) -> dict:
        return {"model_state": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model_state"])
        self.module.eval()

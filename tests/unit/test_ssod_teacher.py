"""The EMA teacher: exact updates, no gradients, the burn-in / copy / EMA / ramp schedule."""
import pytest
import torch

from pseudobox.config import ConfigError
from pseudobox.ssod.teacher import EmaTeacher, ema_update, frozen_copy


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def _built(seed: int) -> torch.nn.Module:
    net = _net(seed)
    net(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer
    return net


def test_ema_update_is_exact_on_every_float_tensor_and_copies_counters():
    teacher, student = _built(0), _built(1)
    student[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.75)
    for name, t in teacher.state_dict().items():
        s = student.state_dict()[name]
        if t.is_floating_point():
            assert torch.allclose(t, 0.75 * before[name] + 0.25 * s, rtol=0, atol=1e-7), name
        else:
            assert torch.equal(t, s), name
    # momentum 0 is an exact copy
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(t, student.state_dict()[k]) for k, t in teacher.state_dict().items())


def test_ema_update_through_a_ddp_like_wrapper_and_refuses_other_structures():
    teacher, student = _built(0), _built(1)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    ema_update(teacher, Wrapper(student), 0.0)
    assert torch.equal(teacher[0].weight, student[0].weight)
    with pytest.raises(ValueError, match="differ"):
        ema_update(teacher, torch.nn.Linear(2, 2), 0.5)


def test_teacher_never_gets_gradients():
    student = _built(0)
    teacher = frozen_copy(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        t_out = teacher(x)
    loss = (student(x) - t_out.clone()).pow(2).sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    # the teacher is a copy, not the same tensors
    assert teacher[0].weight.data_ptr() != student[0].weight.data_ptr()


def test_schedule_copies_after_burn_in_then_ema_and_ramps_the_weight():
    student = _built(0)
    ema = EmaTeacher(student, burn_in_iters=3, momentum=0.5, ramp_iters=2)
    initial = ema.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    for step in (1, 2):
        ema.after_step(step, student)
        assert torch.equal(ema.module[0].weight, initial), "no update during burn-in"
    ema.after_step(3, student)
    assert torch.equal(ema.module[0].weight, student[0].weight), "exact copy at the end of burn-in"
    with torch.no_grad():
        student[0].weight.add_(2.0)
    ema.after_step(4, student)
    assert torch.allclose(ema.module[0].weight, student[0].weight - 1.0)  # halfway: 0.5·(w) + 0.5·(w + 2)
    assert [ema.active(s) for s in range(5)] == [False, False, False, True, True]
    assert [ema.weight(s) for s in range(6)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]


def test_copy_can_come_before_burn_in_ends_as_dense_teacher_does():
    student = _built(0)
    ema = EmaTeacher(student, burn_in_iters=4, momentum=0.9, copy_iters=2)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    ema.after_step(2, student)
    assert torch.equal(ema.module[0].weight, student[0].weight)
    assert not ema.active(3) and ema.active(4)
    with pytest.raises(ConfigError, match="teacher_copy_iters"):
        EmaTeacher(student, burn_in_iters=2, momentum=0.9, copy_iters=3)


def test_state_dict_round_trip_restores_the_teacher_exactly():
    student = _built(0)
    ema = EmaTeacher(student, burn_in_iters=0, momentum=0.9)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    ema.after_step(1, student)
    other = EmaTeacher(_built(5), burn_in_iters=0, momentum=0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()))
    assert not other.module.training

"""Semi-supervised methods in the shared loop, on tiny detectors without Ray: the loss terms
each method adds and when, the guards, and a local worker that checkpoints and resumes with
its teacher intact."""
import numpy as np
import pytest
import torch

from pseudobox.config import ConfigError, load_config, to_dict
from pseudobox.engine import OptimConfig, build_optimizer
from pseudobox.models.checkpoint import read_checkpoint_file
from pseudobox.models.detectors import DetectorArch, DetectorForward, build_detector
from pseudobox.pipelines import finetune_ssod
from pseudobox.ssod.methods import METHODS, SemiSupervisedLoss, SsodConfig, detector_targets
from pseudobox.ssod.teacher import EmaTeacher

CLASSES = ["a", "b"]


def _arch(detector: str) -> DetectorArch:
    return DetectorArch(detector=detector, depth=18, min_size=(64,), max_size=128, test_size=64,
                        rpn_post_nms_top_n_train=50, box_batch_size_per_image=16, score_thresh=0.0)


def _images(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ims = [torch.rand(3, 64, 80, generator=g) * 0.2 for _ in range(n)]
    for im in ims:
        im[:, 10:40, 20:50] = 0.9
    return ims


def _labelled(n: int = 2):
    return _images(n), [{"boxes": torch.tensor([[20.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1])}
                        for _ in range(n)]


def _setup(method: str, detector: str, burn_in: int = 1, **ssod_kw):
    torch.manual_seed(0)
    cfg = SsodConfig(burn_in_iters=burn_in, ema_momentum=0.9, score_threshold=0.05, **ssod_kw)
    detector_module = build_detector(_arch(detector), len(CLASSES))
    student = DetectorForward(detector_module)
    m = METHODS[method](cfg)
    teacher = EmaTeacher(detector_module, cfg.burn_in_iters, cfg.ema_momentum) if m.uses_teacher else None
    loss = SemiSupervisedLoss(m, teacher, CLASSES, 0, torch.Generator().manual_seed(0))
    return student, teacher, loss


def _batch(with_unlabelled: bool = True, gt: bool = True):
    weak = _images(2, seed=1)
    truth = [{"boxes": torch.tensor([[20.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([0])} for _ in weak]
    return {"labeled": _labelled(), "unlabeled": (weak, truth if gt else None) if with_unlabelled else None}


@pytest.mark.parametrize("method,detector,unsup_terms", [
    ("mean-teacher", "faster_rcnn", {"unsup_objectness", "unsup_classifier"}),
    ("dense-teacher", "fcos", {"unsup_dense_cls", "unsup_dense_box", "unsup_dense_quality"}),
])
def test_unsupervised_terms_start_after_burn_in_and_train_only_the_student(one_torch_thread, method, detector,
                                                                            unsup_terms):
    student, teacher, loss = _setup(method, detector)
    student.train()
    first = loss(student, _batch())
    assert all(k.startswith("sup_") for k in first), "burn-in: supervised terms only"
    optimizer = build_optimizer(student, OptimConfig(lr=0.001))
    sum(first.values()).backward()
    optimizer.step()
    loss.after_step(1, student)  # end of burn-in: the teacher copies the student
    assert all(torch.equal(a, b) for a, b in zip(teacher.module.state_dict().values(),
                                                 student.detector.state_dict().values()))
    optimizer.zero_grad()
    second = loss(student, _batch())
    assert {k for k in second if k.startswith("unsup_")} == unsup_terms
    total = sum(second.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None for p in teacher.module.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    row = loss.metrics()
    assert "pseudo/per_image" in row
    assert "pseudo/recall" in row and "pseudo/recall/a" in row  # the unlabelled images carry class-a GT


def test_mean_teacher_weights_the_unsupervised_terms_and_drops_regression(one_torch_thread):
    student, teacher, loss = _setup("mean-teacher", "faster_rcnn", burn_in=0, unsup_weight=4.0)
    student.train()
    torch.manual_seed(1)
    weighted = loss(student, _batch())
    assert not any("box_reg" in k for k in weighted if k.startswith("unsup_"))
    _, _, unweighted_loss = _setup("mean-teacher", "faster_rcnn", burn_in=0, unsup_weight=1.0)
    torch.manual_seed(1)
    plain = unweighted_loss(student, _batch())
    assert weighted["unsup_classifier"].item() == pytest.approx(4 * plain["unsup_classifier"].item(), rel=1e-4)


def test_images_without_pseudo_labels_give_finite_negatives_only(one_torch_thread):
    # A threshold no random-init detection reaches: every unlabelled image has no pseudo-label.
    student, teacher, loss = _setup("mean-teacher", "faster_rcnn", burn_in=0)
    loss.method.pseudo_filter.threshold = 0.999999
    student.train()
    losses = loss(student, _batch())
    assert torch.isfinite(sum(losses.values()))
    assert losses["unsup_classifier"] > 0  # background RoIs still train
    assert loss.monitor.summary()["pseudo_labels"] == 0


def test_an_exploding_unsupervised_loss_stops_the_run(one_torch_thread):
    student, teacher, loss = _setup("mean-teacher", "faster_rcnn", burn_in=0, unsup_weight=1e6, guard_window=2,
                                    max_unsup_ratio=10.0)
    student.train()
    loss(student, _batch())  # one step: the window is not full yet
    with pytest.raises(FloatingPointError, match="ssod.max_unsup_ratio"):
        loss(student, _batch())


def test_a_silent_teacher_warns_with_its_score_distribution(one_torch_thread, pseudobox_log):
    student, teacher, loss = _setup("mean-teacher", "faster_rcnn", burn_in=0, monitor_window=2)
    loss.method.pseudo_filter.threshold = 0.999999
    student.train()
    for step in (1, 2):
        loss(student, _batch())
        loss.after_step(step, student)
    assert any("no pseudo-labels" in r.getMessage() for r in pseudobox_log.records)


def test_detector_targets_drop_degenerate_boxes_and_shift_labels():
    with torch.inference_mode():
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.5, 20.0]])
        labels = torch.tensor([0, 1])
    t = detector_targets(boxes, labels)
    assert t["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]] and t["labels"].tolist() == [1]
    assert not t["boxes"].is_inference()


def test_config_refuses_what_cannot_work():
    base = ["corpus=/c", "output=/o", "init=random"]
    with pytest.raises(ConfigError, match="model.detector=fcos"):
        load_config(finetune_ssod.FinetuneSsodConfig, None, base + ["method=dense-teacher", "model.detector=retinanet"])
    with pytest.raises(ConfigError, match="ssod.strong.geometric=false"):
        load_config(finetune_ssod.FinetuneSsodConfig, None, base + ["method=dense-teacher", "ssod.strong.geometric=true"])
    with pytest.raises(ConfigError, match="method must be one of"):
        load_config(finetune_ssod.FinetuneSsodConfig, None, base + ["method=soft-teacher"])
    with pytest.raises(ConfigError, match="teacher_copy_iters"):
        load_config(finetune_ssod.FinetuneSsodConfig, None, base + ["ssod.burn_in_iters=5", "ssod.teacher_copy_iters=9"])
    cfg = load_config(finetune_ssod.FinetuneSsodConfig, None, base + ["method=dense-teacher"])
    assert cfg.model.detector == "fcos"  # auto: the method's detector


def _numpy_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 64, 80, 3)) * 50).astype(np.uint8)
    images[:, 10:40, 20:50] = 230
    boxes = np.empty(n, dtype=object)
    labels = np.empty(n, dtype=object)
    for i in range(n):
        boxes[i] = np.array([[20.0, 10.0, 50.0, 40.0]], np.float32)
        labels[i] = np.array([i % 2], np.int64)
    return {"image": list(images), "boxes": boxes, "box_labels": labels}


def test_local_worker_checkpoints_student_teacher_and_resumes_them_exactly(tmp_path, one_torch_thread):
    cfg = SsodConfig(burn_in_iters=1, ema_momentum=0.5, score_threshold=0.05, unlabeled_ratio=1)
    arch = _arch("faster_rcnn")
    config = {"arch": to_dict(arch), "ssod": to_dict(cfg), "class_names": CLASSES, "init": {},
              "method": "mean-teacher", "seed": 0, "config": {}, "use_gpu": False, "threads": 1}

    def batches():
        generator = torch.Generator().manual_seed(0)
        k = 0
        while True:
            k += 1
            yield {"labeled": finetune_ssod.labelled_batch(_numpy_batch(2, k), "cpu", generator, cfg),
                   "unlabeled": finetune_ssod.unlabelled_batch(_numpy_batch(2, 100 + k), "cpu", generator, cfg)}

    def optim(iters):
        return to_dict(OptimConfig(lr=0.001, max_iters=iters, batch_size=2, warmup_iters=1, checkpoint_every=2,
                                   log_every=1))

    history = finetune_ssod.worker({**config, "optim": optim(3)}, local_dir=str(tmp_path), batches=batches)
    assert [r["step"] for r in history] == [1, 2, 3]
    assert "unsup_classifier" not in history[0] and "unsup_classifier" in history[1]
    assert "pseudo/per_image" in history[1] and "pseudo/recall" in history[1]  # the unlabelled images carry GT
    saved = read_checkpoint_file(str(tmp_path / "model.pt"))
    teacher_state = saved["ssod_state"]["teacher"]["model_state"]
    assert saved["step"] == 3 and set(teacher_state) == set(saved["model_state"])
    assert any(not torch.equal(teacher_state[k], saved["model_state"][k]) for k in teacher_state)  # EMA ≠ student

    resumed = finetune_ssod.worker({**config, "optim": optim(4)}, local_dir=str(tmp_path), batches=batches)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    after = read_checkpoint_file(str(tmp_path / "model.pt"))
    assert after["init"] == saved["init"] == {"from": "random"}  # the run's own init, not "restored"
    assert after["resumes"] == [{"step": 3, "student": finetune_ssod.state_digest(saved["model_state"]),
                                 "teacher": finetune_ssod.state_digest(teacher_state)}]


def test_a_dead_fcos_box_branch_stops_the_run(one_torch_thread):
    student, teacher, loss = _setup("supervised", "fcos", guard_window=2)
    head = student.detector.head.regression_head.bbox_reg
    with torch.no_grad():  # what one large early step does: every ltrb output below 0, ReLU'd to 0
        head.weight.zero_()
        head.bias.fill_(-1.0)
    student.train()
    first = loss(student, _batch(with_unlabelled=False))
    assert first["sup_bbox_regression"].item() == pytest.approx(1.0)
    with pytest.raises(FloatingPointError, match="box regression has collapsed"):
        loss(student, _batch(with_unlabelled=False))


def test_the_teacher_scores_as_many_proposals_as_asked_then_its_setting_returns(one_torch_thread):
    from pseudobox.ssod.methods import teacher_proposals

    detector = build_detector(_arch("faster_rcnn"), len(CLASSES)).eval()
    seen = []
    hook = detector.roi_heads.box_roi_pool.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    with teacher_proposals(detector, 7):
        with torch.inference_mode():
            detector(_images(2))
    assert seen == [14]  # 7 proposals per image (random-init RPN proposes at least that many)
    assert detector.rpn.post_nms_top_n() == 1000
    hook.remove()


@pytest.mark.parametrize("with_teacher", [True, False])
def test_export_writes_the_chosen_model_as_model_pt_and_supervised_runs_only_their_student(tmp_path, with_teacher):
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint

    student, teacher = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    run_dir = tmp_path / "checkpoint_0"
    ssod_state = {"teacher": {"model_state": teacher} if with_teacher else None, "method": {}, "ratios": []}
    save_checkpoint(make_checkpoint("detector", {"detector": "faster_rcnn", "depth": 18}, CLASSES, student,
                                    optimizer_state={}, ssod_state=ssod_state, step=3), str(run_dir / "model.pt"))
    result = SimpleNamespace(checkpoint=Checkpoint.from_directory(str(run_dir)))
    out = tmp_path / "out"
    ckpt, files = finetune_ssod.export_models(result, str(out), "teacher")
    if with_teacher:
        assert files == {"teacher": str(out / "model.pt"), "student": str(out / "model_student.pt")}
        assert ckpt["exported"] == "teacher" and torch.equal(ckpt["model_state"]["w"], teacher["w"])
    else:  # supervised: no teacher to export, model.pt is the student and nothing else is written
        assert files == {"student": str(out / "model.pt")} and ckpt["exported"] == "student"
        assert not (out / "model_teacher.pt").exists() and not (out / "model_student.pt").exists()
    saved = read_checkpoint_file(str(out / "model.pt"))
    assert "ssod_state" not in saved and "optimizer_state" not in saved
    assert torch.equal(saved["model_state"]["w"], (teacher if with_teacher else student)["w"])

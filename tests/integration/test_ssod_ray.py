"""finetune-ssod on Ray Train: 2 DDP workers, two Ray Data streams, checkpoints on s3:// (the
local S3 server), stopped and re-submitted: the teacher and the method state come back exactly."""
import pytest
import torch

from pseudobox import storage
from pseudobox.engine import OptimConfig
from pseudobox.models.checkpoint import load_checkpoint, read_checkpoint_file
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import evaluate, finetune_ssod, split, trainer
from pseudobox.ssod.methods import SsodConfig
from tests.conftest import make_classifier_checkpoint, make_corpus

pytestmark = pytest.mark.integration


def _cfg(corpus, split_uri, ckpt, out, iters):
    return finetune_ssod.FinetuneSsodConfig(
        corpus=corpus, split=split_uri, method="mean-teacher", init="classifier", checkpoint=ckpt, output=out,
        eval_corpus=corpus, eval_every=2,
        model=DetectorArch(detector="faster_rcnn", depth=18, min_size=(64,), max_size=128, test_size=64,
                           rpn_post_nms_top_n_train=50, box_batch_size_per_image=16),
        optim=OptimConfig(lr=0.002, max_iters=iters, batch_size=1, warmup_iters=1, checkpoint_every=2, log_every=1),
        ssod=SsodConfig(burn_in_iters=1, unlabeled_ratio=2, ema_momentum=0.5, score_threshold=0.05),
        workers=trainer.WorkersConfig(num_workers=2, use_gpu="false", max_failures=1))


def _latest_training_checkpoint(out: str) -> dict:
    names = sorted(n for n in storage.listdir(out) if n.startswith("checkpoint_") and not n.endswith(".json"))
    return read_checkpoint_file(f"{out}/{names[-1]}/model.pt")


def test_two_workers_train_mean_teacher_to_s3_and_resume_with_the_teacher_intact(ray_local, s3_bucket):
    corpus = f"{s3_bucket}/det"
    manifest = make_corpus(corpus, num_images=16, size=64, samples_per_shard=8, style="detection",
                           classes="downstream")
    split_uri = f"{s3_bucket}/split.json"
    split.run(split.SplitConfig(corpus=corpus, output=split_uri, mode="percent", percent=25, fold=1))
    recorded = storage.read_json(split_uri)
    assert len(recorded["keys"]) == 4 and not set(recorded["keys"]) & set(recorded["unlabeled_keys"])
    ckpt = make_classifier_checkpoint(f"{s3_bucket}/cls.pt", manifest.classes)
    out = f"{s3_bucket}/runs/ssod"

    first = finetune_ssod.run(_cfg(corpus, split_uri, ckpt, out, iters=2))
    assert first["step"] == 2 and first["exported"] == "teacher"
    stopped = _latest_training_checkpoint(out)
    teacher_state = stopped["ssod_state"]["teacher"]["model_state"]
    assert any(not torch.equal(teacher_state[k], stopped["model_state"][k]) for k in teacher_state)
    # model.pt is the teacher and model_student.pt the student, both plain detector checkpoints.
    exported = load_checkpoint(f"{out}/model.pt", expect_type="detector")
    assert "optimizer_state" not in exported and "ssod_state" not in exported
    assert all(torch.equal(exported["model_state"][k], teacher_state[k]) for k in teacher_state)
    student = load_checkpoint(f"{out}/model_student.pt", expect_type="detector")
    assert all(torch.equal(student["model_state"][k], stopped["model_state"][k]) for k in teacher_state)
    # Both evaluated during training (history) and at the end (metrics per model).
    row = next(r for r in first["history"] if r["step"] == 2)
    assert {"eval/student/AP", "eval/teacher/AP", "eval/teacher/VOC_AP50"} <= set(row)
    assert "unsup_classifier" in row and "pseudo/per_image" in row
    assert set(first["metrics"]) == {"teacher", "student"}
    assert storage.exists(f"{out}/metrics.json")
    again = evaluate.run(evaluate.EvaluateConfig(checkpoint=f"{out}/model.pt", corpus=corpus,
                                                 output=f"{s3_bucket}/eval.json"))
    assert again["AP"] == pytest.approx(first["metrics"]["teacher"]["AP"])

    # Re-submitted with a longer schedule: resumes at step 2 with exactly the stopped teacher.
    second = finetune_ssod.run(_cfg(corpus, split_uri, ckpt, out, iters=4))
    assert second["step"] == 4
    assert [r["step"] for r in second["history"]] == [1, 2, 3, 4]
    resumed = _latest_training_checkpoint(out)
    assert resumed["resumes"] == [{"step": 2, "student": finetune_ssod.state_digest(stopped["model_state"]),
                                   "teacher": finetune_ssod.state_digest(teacher_state)}]
    assert resumed["ssod_state"]["method"] == stopped["ssod_state"]["method"]

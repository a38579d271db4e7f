"""What a restored training run keeps (its ``init`` record, its restores) and what the driver
removes afterwards (checkpoint directories Ray Train no longer tracks); no Ray."""
import json
import os
from types import SimpleNamespace

import torch

from pseudobox import storage
from pseudobox.engine import resume_record, run_init
from pseudobox.models.checkpoint import MODEL_FILE, load_checkpoint
from pseudobox.pipelines import train_classifier, train_detector, trainer
from tests.unit.test_engine import classifier_batches, classifier_config, detector_batches, detector_config

OLD, KEPT, LATEST = ("checkpoint_2026-11-29_10-00-00.000001", "checkpoint_2026-11-29_10-00-05.000002",
                     "checkpoint_2026-11-29_10-00-10.000003")
ORPHAN = "checkpoint_2026-11-29_10-00-12.000004"  # uploaded while the worker group was failing


def test_run_init_initialises_only_a_fresh_run():
    calls = []

    def initialise():
        calls.append(1)
        return {"from": "classifier", "checkpoint": "s3://b/cls/model.pt", "copied": 3}

    first = run_init(None, initialise)
    assert first["from"] == "classifier" and calls == [1]
    restored = {"step": 4, "init": first}
    assert run_init(restored, initialise) == first and calls == [1]  # not re-initialised, not "restored"
    assert run_init({"step": 4}, initialise) == {"from": "unrecorded"}  # a checkpoint from before init records


def test_resume_record_grows_by_one_restore_each_time():
    assert resume_record(None) == []
    assert resume_record({"step": 4}) == [{"step": 4}]
    assert resume_record({"step": 8, "resumes": [{"step": 4}]}) == [{"step": 4}, {"step": 8}]


def test_detector_restore_keeps_the_init_from_the_first_checkpoint(tmp_path):
    from tests.conftest import make_classifier_checkpoint

    cls_uri = make_classifier_checkpoint(str(tmp_path / "cls" / MODEL_FILE), ["a", "b"], depth=18, seed=4)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    train_detector.worker(detector_config(1, {"classifier": cls_uri}), local_dir=str(run), batches=detector_batches())
    first = load_checkpoint(str(run))
    assert first["init"]["from"] == "classifier" and first["init"]["checkpoint"] == cls_uri
    assert first["resumes"] == []
    os.remove(cls_uri)  # a restore must not need the init checkpoint again
    train_detector.worker(detector_config(2, {"classifier": cls_uri}), local_dir=str(run), batches=detector_batches())
    second = load_checkpoint(str(run))
    assert second["step"] == 2 and second["init"] == first["init"]
    assert second["resumes"] == [{"step": 1}]


def test_classifier_checkpoints_record_init_and_restores(tmp_path):
    torch.manual_seed(0)
    train_classifier.worker(classifier_config(2), local_dir=str(tmp_path), batches=classifier_batches(1))
    first = load_checkpoint(str(tmp_path), expect_type="classifier")
    assert first["init"] == {"from": "random"} and first["resumes"] == []
    train_classifier.worker(classifier_config(4), local_dir=str(tmp_path), batches=classifier_batches(1))
    second = load_checkpoint(str(tmp_path), expect_type="classifier")
    assert second["init"] == {"from": "random"} and second["resumes"] == [{"step": 2}] and second["step"] == 4


def test_init_record_names_the_classifier_or_weights():
    cfg = classifier_config(1)["config"]
    assert train_classifier.init_record(cfg) == {"from": "random"}
    with_ckpt = {**cfg, "model": {**cfg["model"], "init_checkpoint": "s3://b/cls/model.pt"}}
    assert train_classifier.init_record(with_ckpt) == {"from": "classifier", "checkpoint": "s3://b/cls/model.pt"}
    with_weights = {**cfg, "model": {**cfg["model"], "weights": "IMAGENET1K_V1"}}
    assert train_classifier.init_record(with_weights) == {"from": "weights", "weights": "IMAGENET1K_V1"}


# ---------------------------------------------------------------- untracked checkpoint directories

def fake_run(tmp_path, snapshot_names=(KEPT, LATEST)):
    """A run folder as Ray Train leaves it, with one orphan and one checkpoint outside num_to_keep
    that Ray failed to delete; the Result tracks KEPT and LATEST."""
    out = tmp_path / "run"
    for name in (OLD, KEPT, LATEST, ORPHAN):
        (out / name).mkdir(parents=True)
        (out / name / MODEL_FILE).write_bytes(b"x")
    (out / "tensorboard").mkdir()
    (out / MODEL_FILE).write_bytes(b"x")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in snapshot_names],
                "latest_checkpoint_result": {"checkpoint_dir_name": LATEST, "metrics": {}},
                "pending_training_results": []}
    (out / trainer.RUN_SNAPSHOT).write_text(json.dumps(snapshot))
    ckpt = {n: SimpleNamespace(path=str(out / n)) for n in (KEPT, LATEST)}
    result = SimpleNamespace(checkpoint=ckpt[LATEST], best_checkpoints=[(ckpt[KEPT], {}), (ckpt[LATEST], {})])
    return str(out), result


def test_untracked_checkpoints_skip_other_entries():
    names = [OLD, LATEST, trainer.RUN_SNAPSHOT, MODEL_FILE, "tensorboard", "checkpoint_notes"]
    assert trainer.untracked_checkpoints(names, {LATEST}) == [OLD]


def test_driver_removes_checkpoints_ray_no_longer_tracks(tmp_path, pseudobox_log):
    out, result = fake_run(tmp_path)
    assert trainer.remove_untracked_checkpoints(result, out) == [OLD, ORPHAN]
    assert sorted(storage.listdir(out)) == sorted([KEPT, LATEST, MODEL_FILE, trainer.RUN_SNAPSHOT, "tensorboard"])
    assert f"{OLD}, {ORPHAN}" in pseudobox_log.text and "no longer tracks" in pseudobox_log.text


def test_a_checkpoint_the_snapshot_still_references_is_kept(tmp_path):
    # The Result lists the newest num_to_keep; a restore may still open any the snapshot names.
    out, result = fake_run(tmp_path, snapshot_names=(OLD, KEPT, LATEST))
    assert trainer.remove_untracked_checkpoints(result, out) == [ORPHAN]
    assert os.path.isdir(os.path.join(out, OLD))


def test_failed_removal_is_a_warning_naming_the_checkpoints(tmp_path, pseudobox_log, monkeypatch):
    out, result = fake_run(tmp_path)

    def refuse(uri, recursive=False):
        raise PermissionError(f"access denied: {uri}")

    monkeypatch.setattr(storage, "remove", refuse)
    assert trainer.remove_untracked_checkpoints(result, out) == []
    warnings = [r.getMessage() for r in pseudobox_log.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and OLD in warnings[0] and ORPHAN in warnings[0] and "by hand" in warnings[0]
    assert os.path.isdir(os.path.join(out, ORPHAN))


def test_nothing_is_removed_without_a_tracked_checkpoint(tmp_path):
    out, _ = fake_run(tmp_path)
    (tmp_path / "run" / trainer.RUN_SNAPSHOT).unlink()
    assert trainer.remove_untracked_checkpoints(SimpleNamespace(checkpoint=None, best_checkpoints=[]), out) == []
    assert os.path.isdir(os.path.join(out, ORPHAN))

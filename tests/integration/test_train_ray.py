"""Ray Train with 2 DDP workers checkpointing to s3:// on the local S3 server, then resuming;
what the console and TensorBoard show of it."""
import re
import time

import pytest

from pseudobox import storage
from pseudobox.engine import OptimConfig, lr_factor
from pseudobox.models.checkpoint import load_checkpoint
from pseudobox.pipelines import train_classifier, trainer
from tests.conftest import make_corpus

pytestmark = pytest.mark.integration

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _cfg(corpus, out, iters):
    # lr 0.1 is stated for 16 images per step; 2 workers x 4 images train at 0.05.
    return train_classifier.TrainClassifierConfig(
        corpus=corpus, output=out, model=train_classifier.ClassifierModelConfig(depth=18),
        optim=OptimConfig(lr=0.1, reference_batch=16, max_iters=iters, batch_size=4, warmup_iters=2,
                          checkpoint_every=2, log_every=1),
        image_size=48, workers=trainer.WorkersConfig(num_workers=2, use_gpu="false", max_failures=1))


def console_until(capfd, pattern: re.Pattern, count: int, timeout: float = 20.0) -> str:
    """The console output so far, waiting until ``pattern`` has matched ``count`` lines: Ray
    forwards worker output to the driver asynchronously, possibly after ``fit`` returns."""
    text = ""
    deadline = time.time() + timeout
    while True:
        out, err = capfd.readouterr()
        text += ANSI.sub("", out + err)
        if len(pattern.findall(text)) >= count or time.time() > deadline:
            return text


def test_classifier_trains_on_two_workers_checkpoints_to_s3_and_resumes(ray_local, s3_bucket, capfd):
    corpus = f"{s3_bucket}/corpus"
    make_corpus(corpus, num_images=16, size=48, samples_per_shard=8)
    out = f"{s3_bucket}/runs/classifier"
    capfd.readouterr()

    first = train_classifier.run(_cfg(corpus, out, iters=4))
    assert first["step"] == 4
    checkpoints = [n for n in storage.listdir(out) if n.startswith("checkpoint_") and not n.endswith(".json")]
    assert len(checkpoints) == 2  # steps 2 and 4
    assert storage.exists(f"{out}/model.pt")
    exported = load_checkpoint(out, expect_type="classifier")
    assert "optimizer_state" not in exported and exported["arch"] == {"depth": 18}
    assert [row["step"] for row in first["history"]] == [1, 2, 3, 4]
    # Linear scaling: lr 0.1 at batch 16 is 0.05 at 2 x 4 (rows hold the lr of the next step).
    cfg = _cfg(corpus, out, iters=4).optim
    assert first["history"][0]["lr"] == pytest.approx(0.05 * lr_factor(1, cfg))
    assert first["config"]["optim"]["lr"] == 0.1  # the checkpoint records the config as given

    # One progress line per log step, from rank 0 only, with an ETA; no raw TrainingReport dumps.
    step_line = re.compile(r"\(RayTrainWorker pid=(\d+)[^)]*\) train-classifier  step (\d+)/4  loss \S+ "
                           r"\(ce \S+\)  lr \S+  \S+ img/s  ETA [0-9hms]+\n")
    console = console_until(capfd, step_line, 4)
    lines = step_line.findall(console)
    assert sorted(int(step) for _, step in lines) == [1, 2, 3, 4], console
    assert len({pid for pid, _ in lines}) == 1
    assert "TrainingReport(" not in console and "Reporting training result" not in console
    # Nor Ray's chatter from its own actors (Train controller, Ray Data's split coordinator).
    for chatter in ("Execution plan of Dataset", "Requesting resources", "Wrapping provided model", "Deprecation"):
        assert chatter not in console, chatter

    # TensorBoard event files under <output>/tensorboard on S3, one per worker-group start.
    events = storage.listdir(f"{out}/{trainer.TENSORBOARD_DIR}")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    assert b"train/loss" in storage.read_bytes(f"{out}/{trainer.TENSORBOARD_DIR}/{events[0]}")

    # Re-submitting the same run with a longer schedule resumes at step 4, not 0.
    second = train_classifier.run(_cfg(corpus, out, iters=6))
    assert second["step"] == 6
    steps = [row["step"] for row in second["history"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # history carried over from the first run, no restart
    assert any(n.startswith("checkpoint_2") and n not in checkpoints for n in storage.listdir(out))
    assert len(storage.listdir(f"{out}/{trainer.TENSORBOARD_DIR}")) == 2

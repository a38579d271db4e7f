"""Training under faults (issue 10, section 4): a Ray Train worker process killed by its pid
from outside, and the driver killed mid-training then the same command submitted again.
Each test asserts what survived: the step counter continues from the latest checkpoint, the
run's ``init`` record is the original one, no checkpoint directory outlives Ray Train's
tracking, and the final ``model.pt`` loads and evaluates."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pseudobox import storage
from pseudobox.engine import OptimConfig
from pseudobox.models.checkpoint import MODEL_FILE, load_checkpoint
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import evaluate, finetune, trainer
from tests.conftest import make_classifier_checkpoint, make_corpus

pytestmark = pytest.mark.integration

ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_ITERS = 12


def latest_registered_step(output: str) -> int:
    """The step of the latest checkpoint Ray Train has registered in the run snapshot (0: none yet)."""
    uri = storage.join(output, trainer.RUN_SNAPSHOT)
    try:
        snapshot = json.loads(storage.read_bytes(uri))
    except Exception:  # not written yet
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def checkpoint_dirs(output: str) -> list[str]:
    return trainer.untracked_checkpoints(storage.listdir(output), set())


def tracked_checkpoints(output: str) -> set[str]:
    return trainer.snapshot_checkpoint_names(json.loads(storage.read_bytes(storage.join(output, trainer.RUN_SNAPSHOT))))


def make_inputs(root: str) -> tuple[str, str]:
    """A tiny detection corpus and a classifier checkpoint to start the detector from."""
    corpus = storage.join(root, "corpus")
    manifest = make_corpus(corpus, num_images=8, size=64, samples_per_shard=4, style="detection", classes="downstream")
    cls_uri = make_classifier_checkpoint(storage.join(root, "cls", MODEL_FILE), manifest.classes, depth=18, seed=3)
    return corpus, cls_uri


def train_worker_pids() -> list[int]:
    """The pids of the live Ray Train worker processes, through Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    return sorted(a.pid for a in actors if a.pid)


def kill_a_worker_after_first_checkpoint(output: str, killed: dict, stop: threading.Event) -> None:
    """Watcher: once Ray Train has registered a checkpoint, SIGKILL one training worker by pid."""
    while not stop.is_set():
        step = latest_registered_step(output)
        if step > 0:
            pids = train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.update(step=step, pid=pids[-1], pids=pids)
                return
        time.sleep(0.2)


def test_a_killed_train_worker_restores_from_the_latest_s3_checkpoint(ray_local, s3_bucket, capfd, tmp_path):
    corpus, cls_uri = make_inputs(f"{s3_bucket}/inputs")
    out = f"{s3_bucket}/runs/finetune"
    cfg = finetune.FinetuneConfig(
        corpus=corpus, init="classifier", checkpoint=cls_uri, output=out, eval_corpus=corpus,
        model=DetectorArch(depth=18, min_size=(64,), max_size=128, test_size=64),
        optim=OptimConfig(lr=0.01, max_iters=MAX_ITERS, batch_size=2, warmup_iters=1, checkpoint_every=2,
                          log_every=1),
        workers=trainer.WorkersConfig(num_workers=2, use_gpu="false", max_failures=1))
    cfg.validate()
    killed: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(out, killed, stop), daemon=True)
    watcher.start()
    try:
        ckpt = finetune.run(cfg)
    finally:
        stop.set()
        watcher.join(timeout=10)
    console = ANSI.sub("", "".join(capfd.readouterr()))
    (tmp_path / "console.log").write_text(console)  # what the operator saw, kept for a failed assertion

    # The kill happened mid-training, and training restored from a checkpoint instead of step 0.
    assert killed, "the watcher never found a registered checkpoint and a live train worker"
    assert ckpt["step"] == MAX_ITERS
    assert ckpt["resumes"], "the run finished without restoring from a checkpoint"
    resumed_at = ckpt["resumes"][0]["step"]
    assert resumed_at >= killed["step"] > 0 and resumed_at % 2 == 0
    # The step counter continued from the checkpoint: one history row per step, none twice.
    assert [row["step"] for row in ckpt["history"]] == list(range(1, MAX_ITERS + 1))

    # The final checkpoint and model.pt name what the run started from, not the restore.
    assert ckpt["init"]["from"] == "classifier" and ckpt["init"]["checkpoint"] == cls_uri
    exported = load_checkpoint(out, expect_type="detector")
    assert "optimizer_state" not in exported and exported["init"] == ckpt["init"]

    # Only the checkpoints Ray Train tracks remain (num_to_keep), whatever the failure left behind.
    remaining = checkpoint_dirs(out)
    assert set(remaining) == tracked_checkpoints(out) and len(remaining) <= trainer.NUM_TO_KEEP

    # The final model evaluates (the driver did after training; and again from model.pt).
    assert math.isfinite(ckpt["metrics"]["AP"]) and ckpt["metrics"]["images"] == 8
    metrics = evaluate.run(evaluate.EvaluateConfig(checkpoint=storage.join(out, MODEL_FILE), corpus=corpus))
    assert metrics["AP"] == pytest.approx(ckpt["metrics"]["AP"])
    if f"resumed at step {resumed_at} of {MAX_ITERS}" not in console:  # forwarded worker output may lag
        time.sleep(3)
        console += ANSI.sub("", "".join(capfd.readouterr()))
    assert f"finetune: resumed at step {resumed_at} of {MAX_ITERS}" in console


def finetune_command(corpus: str, cls_uri: str, out: str) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "pseudobox")
    return [exe, "finetune", f"corpus={corpus}", "init=classifier", f"checkpoint={cls_uri}", f"output={out}",
            "model.depth=18", "model.min_size=[64]", "model.max_size=128", "model.test_size=64",
            f"optim.max_iters={MAX_ITERS}", "optim.batch_size=2", "optim.warmup_iters=1", "optim.lr=0.01",
            "optim.checkpoint_every=2", "optim.log_every=1", "workers.num_workers=2", "workers.use_gpu=false",
            "ray.num_cpus=4"]


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in the session ``proc`` leads (it was started with
    ``start_new_session``); nothing outside it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_a_killed_driver_resubmitted_resumes_from_its_checkpoint(tmp_path):
    corpus, cls_uri = make_inputs(str(tmp_path))
    out = str(tmp_path / "run")
    command = finetune_command(corpus, cls_uri, out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's shell
    log_path = tmp_path / "first.log"
    # Its own session: the test can clean up whatever the killed driver leaves behind.
    with open(log_path, "wb") as first_log:
        driver = subprocess.Popen(command, stdout=first_log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        deadline = time.time() + 300
        killed_at = 0
        while time.time() < deadline and driver.poll() is None:
            killed_at = latest_registered_step(out)
            if killed_at > 0:
                driver.kill()  # SIGKILL to the driver process alone, mid-training
                break
            time.sleep(0.2)
        assert driver.wait(timeout=30) == -signal.SIGKILL, log_path.read_text()
        assert 0 < killed_at < MAX_ITERS
        assert not storage.exists(storage.join(out, MODEL_FILE))  # it never finished

        again = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        try:
            stdout, _ = again.communicate(timeout=420)
        finally:
            kill_session(again)
        output = ANSI.sub("", stdout.decode(errors="replace"))
        assert again.returncode == 0, output[-4000:]
    finally:
        kill_session(driver)  # what the killed driver's local Ray left, if anything

    # The re-run resumed from the checkpoint the killed run had registered (or a later one it
    # registered before dying) and redid no step at or before it.
    ckpt = load_checkpoint(out, expect_type="detector")
    assert ckpt["step"] == MAX_ITERS
    resumed_at = ckpt["resumes"][-1]["step"]
    assert resumed_at >= killed_at and len(ckpt["resumes"]) == 1
    assert f"finetune: resumed at step {resumed_at} of {MAX_ITERS}" in output
    steps = [int(s) for s in re.findall(rf"finetune  step (\d+)/{MAX_ITERS}", output)]
    assert steps and min(steps) == resumed_at + 1 and max(steps) == MAX_ITERS, output[-4000:]
    assert [row["step"] for row in ckpt["history"]] == list(range(1, MAX_ITERS + 1))
    assert ckpt["init"]["from"] == "classifier" and ckpt["init"]["checkpoint"] == cls_uri
    remaining = checkpoint_dirs(out)
    assert set(remaining) == tracked_checkpoints(out) and len(remaining) <= trainer.NUM_TO_KEEP

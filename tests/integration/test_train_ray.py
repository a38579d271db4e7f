"""Ray Train with 2 DDP workers checkpointing to s3:// on the local S3 server, then resuming."""
import pytest

from pseudobox import storage
from pseudobox.engine import OptimConfig
from pseudobox.models.checkpoint import load_checkpoint
from pseudobox.pipelines import train_classifier, trainer
from tests.conftest import make_corpus

pytestmark = pytest.mark.integration


def _cfg(corpus, out, iters):
    return train_classifier.TrainClassifierConfig(
        corpus=corpus, output=out, model=train_classifier.ClassifierModelConfig(depth=18),
        optim=OptimConfig(lr=0.05, max_iters=iters, batch_size=4, warmup_iters=2, checkpoint_every=2, log_every=1),
        image_size=48, workers=trainer.WorkersConfig(num_workers=2, use_gpu="false", max_failures=1))


def test_classifier_trains_on_two_workers_checkpoints_to_s3_and_resumes(ray_local, s3_bucket):
    corpus = f"{s3_bucket}/corpus"
    make_corpus(corpus, num_images=16, size=48, samples_per_shard=8)
    out = f"{s3_bucket}/runs/classifier"

    first = train_classifier.run(_cfg(corpus, out, iters=4))
    assert first["step"] == 4
    checkpoints = [n for n in storage.listdir(out) if n.startswith("checkpoint_") and not n.endswith(".json")]
    assert len(checkpoints) == 2  # steps 2 and 4
    assert storage.exists(f"{out}/model.pt")
    exported = load_checkpoint(out, expect_type="classifier")
    assert "optimizer_state" not in exported and exported["arch"] == {"depth": 18}
    assert [row["step"] for row in first["history"]] == [1, 2, 3, 4]

    # Re-submitting the same run with a longer schedule resumes at step 4, not 0.
    second = train_classifier.run(_cfg(corpus, out, iters=6))
    assert second["step"] == 6
    steps = [row["step"] for row in second["history"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # history carried over from the first run, no restart
    assert any(n.startswith("checkpoint_2") and n not in checkpoints for n in storage.listdir(out))

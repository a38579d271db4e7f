"""Offline self-training on local Ray: ``mine source=teacher`` on a tiny corpus, resumed
by shard, then ``finetune pseudo_boxes=...`` on a percent split of that corpus."""
import pytest

from pseudobox import storage
from pseudobox.engine import OptimConfig
from pseudobox.mining import outputs
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import finetune, mine, split, trainer
from tests.conftest import make_corpus
from tests.unit.test_predict import make_detector_checkpoint

pytestmark = pytest.mark.integration


def test_teacher_mining_resumes_by_shard_and_feeds_finetune(ray_local, tmp_path):
    corpus = str(tmp_path / "corpus")
    manifest = make_corpus(corpus, num_images=6, size=64, samples_per_shard=3, style="detection",
                           classes="downstream")
    ckpt = make_detector_checkpoint(str(tmp_path / "teacher" / "model.pt"), manifest.classes)
    out = str(tmp_path / "mined")
    cfg = mine.MineConfig(corpus=corpus, checkpoint=ckpt, output=out, source="teacher", batch_size=4,
                          min_actors=1, max_actors=1, use_gpu="false", export_coco=False)

    first = mine.run(cfg)
    assert first["source"] == "teacher" and first["shards_this_run"] == 2 and first["ok"] == 6
    shards = sorted(s.name for s in manifest.shards)
    parts = {s: outputs.read_part(outputs.part_uri(out, s)).to_pydict() for s in shards}
    for part in parts.values():
        assert set(part["source"]) == {"teacher"} and len(part["key"]) == 3
        # A random detector scores below 0.6: every image keeps exactly its top box.
        assert all(len(b) == 1 for b in part["boxes"])

    # A re-run skips finished shards; a lost part is mined again, identically.
    assert mine.run(cfg)["shards_this_run"] == 0
    storage.remove(outputs.part_uri(out, shards[1]))
    again = mine.run(cfg)
    assert again["shards_this_run"] == 1 and again["rows"] == 6
    assert outputs.read_part(outputs.part_uri(out, shards[1])).to_pydict()["boxes"] == parts[shards[1]]["boxes"]

    # Self-training: 1 labeled image (a percent split), the 5 others on their teacher boxes.
    split_uri = str(tmp_path / "split.json")
    labeled = split.run(split.SplitConfig(corpus=corpus, output=split_uri, mode="percent", percent=20, fold=1))
    assert len(labeled["keys"]) == 1 and len(labeled["unlabeled_keys"]) == 5
    ft = finetune.FinetuneConfig(
        corpus=corpus, split=split_uri, pseudo_boxes=out, init="random", output=str(tmp_path / "ft"),
        model=DetectorArch(depth=18, min_size=(64,), max_size=128, test_size=64),
        optim=OptimConfig(lr=0.01, max_iters=2, batch_size=2, warmup_iters=1, checkpoint_every=2),
        workers=trainer.WorkersConfig(num_workers=1, use_gpu="false", max_failures=0))
    ft.validate()
    ckpt_out = finetune.run(ft)
    assert ckpt_out["step"] == 2 and storage.exists(str(tmp_path / "ft" / "model.pt"))

"""The mining stage on local Ray, reading shards from the local S3 server."""
import io
import json
import logging
import tarfile

import pytest

from pseudobox import storage
from pseudobox.config import ConfigError
from pseudobox.mining import outputs
from pseudobox.pipelines import mine
from tests.conftest import make_classifier_checkpoint, make_corpus

pytestmark = pytest.mark.integration


def _add_bad_samples(corpus_uri: str) -> None:
    """Append a shard with a corrupt JPEG, an unknown class and a missing .json, and cut
    shard-000001 short, then list the new shard in the manifest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in (("bad_jpeg.jpg", b"\xff\xd8 not a jpeg"), ("bad_jpeg.json", b'{"labels": [0]}'),
                              ("bad_class.jpg", storage.read_bytes(corpus_uri + "/probe.jpg")),
                              ("bad_class.json", b'{"labels": [999]}'),
                              ("no_json.jpg", storage.read_bytes(corpus_uri + "/probe.jpg"))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    storage.write_bytes(corpus_uri + "/shard-bad.tar", buf.getvalue())
    data = storage.read_bytes(corpus_uri + "/shard-000001.tar")
    storage.write_bytes(corpus_uri + "/shard-000001.tar", data[: len(data) // 2])
    manifest = storage.read_json(corpus_uri + "/corpus.json")
    manifest["shards"].append({"name": "shard-bad.tar", "num_samples": 3})
    storage.write_json(corpus_uri + "/corpus.json", manifest)


@pytest.fixture
def s3_corpus(s3_bucket):
    from pseudobox.datasets.corpus import encode_image

    uri = f"{s3_bucket}/corpus"
    manifest = make_corpus(uri, num_images=24, size=64, samples_per_shard=8)
    import numpy as np

    storage.write_bytes(uri + "/probe.jpg", encode_image(np.zeros((32, 32, 3), np.uint8)))
    _add_bad_samples(uri)
    ckpt = make_classifier_checkpoint(f"{s3_bucket}/classifier/model.pt", manifest.classes)
    return uri, ckpt, manifest


def _cfg(corpus, ckpt, out, **kw):
    pool = {"min_actors": 1, "max_actors": 2, **kw}
    return mine.MineConfig(corpus=corpus, checkpoint=ckpt, output=out, cam=mine.CamConfig(scales=(64, 96)),
                           batch_size=4, **pool)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_mining_streams_s3_shards_counts_bad_input_and_resumes(ray_local, s3_corpus, s3_bucket, capfd):
    corpus, ckpt, manifest = s3_corpus
    out = f"{s3_bucket}/mined"
    logger, kept = logging.getLogger("pseudobox"), _Lines()
    level = logger.level
    logger.addHandler(kept)
    logger.setLevel(logging.INFO)
    try:
        # Two actors holding all 4 of ray_local's CPUs: the read tasks that feed them
        # reserve none (the actors decode), so the pool is not starved.
        # shard-000001 is cut short: its lost samples are accepted here, with a loud line.
        summary = mine.run(_cfg(corpus, ckpt, out, min_actors=2, max_actors=2, cpus_per_actor=2.0,
                                allow_missing=True))
    finally:
        logger.removeHandler(kept)
        logger.setLevel(level)

    # Progress lines as shards complete and a summary; Ray Data's per-dataset chatter stays
    # off the console (not verbose).
    lines = kept.lines
    progress = [line for line in lines if line.startswith("mine  shards ")]
    assert progress and progress[-1].startswith("mine  shards 4/4  images ") and " img/s  ETA " in progress[-1]
    assert any(line.startswith("mine  done  shards 4/4") for line in lines)
    assert any("accepted by allow_missing=true" in line and "shard-000001.tar" in line for line in lines)
    assert list(summary["missing_samples"]) == ["shard-000001.tar"]
    console = "".join(capfd.readouterr())
    assert "Execution plan of Dataset" not in console and "Starting execution of Dataset" not in console

    parts = storage.listdir(out + "/parts")
    assert parts == ["shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet", "shard-bad.parquet"]
    reports = outputs.load_reports(out)
    assert reports["shard-bad.tar"]["errors"] == {"corrupt_image": 1, "unknown_class": 1, "missing_json": 1}
    assert reports["shard-bad.tar"]["ok"] == 0
    assert reports["shard-000001.tar"]["errors"].get("truncated_shard") == 1
    assert 0 < reports["shard-000001.tar"]["ok"] < 8  # samples before the cut were kept
    assert reports["shard-000000.tar"]["ok"] == 8 and reports["shard-000000.tar"]["errors"] == {}
    assert summary["corloc"] is not None and 0 <= summary["corloc"] <= 100
    assert summary["boxes"] > 0
    coco = json.loads(storage.read_bytes(out + "/pseudo_boxes.coco.json"))
    assert len(coco["annotations"]) == summary["boxes"]

    # Resume: drop one part; only that shard is mined again. Without allow_missing, the
    # samples still missing from the cut shard end the run, after everything is written.
    before = {s: r["written_at"] for s, r in reports.items()}
    storage.remove(outputs.part_uri(out, "shard-000002.tar"))
    with pytest.raises(outputs.MissingSamplesError, match=r"shard-000001\.tar \(\d\)"):
        mine.run(_cfg(corpus, ckpt, out))
    after = outputs.load_reports(out)
    assert storage.read_json(out + "/mining.json")["shards_this_run"] == 1
    assert after["shard-000002.tar"]["written_at"] > before["shard-000002.tar"]
    assert all(after[s]["written_at"] == before[s] for s in before if s != "shard-000002.tar")

    # A changed setting must not silently mix parts.
    with pytest.raises(ConfigError, match="cam"):
        mine.run(mine.MineConfig(corpus=corpus, checkpoint=ckpt, output=out, cam=mine.CamConfig(scales=(64,))))


class _Probe:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_actor_pool_requests_one_gpu_per_actor_when_the_cluster_has_gpus(monkeypatch, tmp_path):
    """The launcher asks Ray for num_gpus=1 per actor when GPUs exist (checked by
    capturing the map_batches call; this machine has no GPU)."""
    calls = {}

    class FakeDataset:
        def map_batches(self, fn, **kwargs):
            calls.update(kwargs, fn=fn)
            return self

        def iter_batches(self, **kwargs):
            return iter(())

    corpus = str(tmp_path / "corpus")
    manifest = make_corpus(corpus, num_images=4, size=64, samples_per_shard=4)
    ckpt = make_classifier_checkpoint(str(tmp_path / "cls.pt"), manifest.classes)
    monkeypatch.setattr(mine, "init_ray", lambda cfg: None)
    monkeypatch.setattr(mine, "resolve_use_gpu", lambda setting: True)
    monkeypatch.setattr("pseudobox.datasets.ray_io.read_corpus", lambda *a, **k: FakeDataset())
    # The fake pool yields no row, so the shard's samples are missing (accepted here).
    mine.run(_cfg(corpus, ckpt, str(tmp_path / "out"), use_gpu="true", allow_missing=True))
    assert calls["num_gpus"] == 1
    assert calls["compute"].min_size == 1 and calls["compute"].max_size == 2
    # The actors decode their own batches, on the GPU they hold.
    from pseudobox.datasets.ray_io import DecodingActor
    from pseudobox.mining.cam import CamBoxMiner

    kwargs = calls["fn_constructor_kwargs"]
    assert calls["fn"] is DecodingActor and kwargs["actor_cls"] is CamBoxMiner
    assert kwargs["actor_kwargs"]["device"] == "cuda"
    assert kwargs["classes"] == manifest.classes
    assert DecodingActor(_Probe, kwargs["actor_kwargs"], kwargs["classes"]).device == "cuda"

"""build-corpus with parallel=ray: shards written by Ray tasks to the local S3 server."""
import pytest

from pseudobox import storage
from pseudobox.datasets.corpus import iter_corpus, shard_uris
from pseudobox.pipelines.build_corpus import BuildCorpusConfig, record_uri, run
from tests.unit.test_build_corpus import add_voc_image, write_image_set

pytestmark = pytest.mark.integration


def test_ray_tasks_write_what_serial_writes(ray_local, s3_bucket, tmp_path):
    root = tmp_path / "VOCdevkit"
    ids = [f"00000{i}" for i in range(5)]
    for i, image_id in enumerate(ids):
        add_voc_image(root, "VOC2007", image_id, [("dog", 1 + i, 2, 20, 25, i % 2), ("cat", 3, 3, 9, 9, 0)], seed=i)
    write_image_set(root, "VOC2007", "trainval", ids)

    def config(output, parallel):
        cfg = BuildCorpusConfig(builder="voc", source=str(root), splits=["VOC2007/trainval"], output=output,
                                samples_per_shard=2, parallel=parallel)
        cfg.validate()
        return cfg

    remote = storage.join(s3_bucket, "voc07")
    on_ray = run(config(remote, "ray"))
    serial = run(config(str(tmp_path / "serial"), "none"))
    assert on_ray.to_json()["shards"] == serial.to_json()["shards"] == [
        {"name": "shard-000000.tar", "num_samples": 2}, {"name": "shard-000001.tar", "num_samples": 2},
        {"name": "shard-000002.tar", "num_samples": 1}]
    for a, b in zip(shard_uris(remote), shard_uris(str(tmp_path / "serial"))):
        assert storage.read_bytes(a) == storage.read_bytes(b)
    assert storage.read_json(record_uri(remote, "shard-000002.tar"))["num_samples"] == 1
    samples = list(iter_corpus(remote))
    assert [s["key"] for s in samples] == [f"VOC2007_{i}" for i in ids]
    assert [s["difficult"].tolist() for s in samples][:2] == [[False, False], [True, False]]

"""``mine source=edgebox`` without Ray: the per-batch miner on a tiny corpus decoded without
labels, its parquet parts, and the config rules (no checkpoint needed)."""
import numpy as np
import pytest

from pseudobox import storage
from pseudobox.config import ConfigError, load_config
from pseudobox.datasets import ray_io
from pseudobox.datasets.corpus import iter_shard, load_manifest, shard_uris
from pseudobox.mining import edgeboxes, outputs
from pseudobox.pipelines.mine import MineConfig
from tests.conftest import make_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("edgebox") / "corpus")
    make_corpus(uri, num_images=6, size=96, samples_per_shard=3, style="detection", classes="downstream")
    return uri


def unlabelled_batch(uri):
    """All rows of the corpus decoded as the edgebox stage does: pixels only, no labels."""
    manifest = load_manifest(uri)
    rows = [r for u in shard_uris(uri, manifest) for r in iter_shard(u)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return ray_io.decode_batch(batch, manifest.classes, labelled=False)


@pytest.mark.parametrize("backend", ["torch", "opencv"])
def test_edgebox_miner_boxes_every_row_class_agnostic(corpus, tmp_path, backend):
    if backend == "opencv" and not edgeboxes.opencv_available():
        pytest.skip("opencv-contrib not installed")
    batch = unlabelled_batch(corpus)
    assert all(len(ls) == 0 for ls in batch["labels"])  # nothing to mine by, unlike CAM
    batch["error"][1] = "corrupt_image: test"
    batch["image"][1] = ray_io.PLACEHOLDER_IMAGE
    miner = edgeboxes.EdgeBoxMiner({"max_boxes": 25, "backend": backend}, device="cpu")
    out = miner(batch)
    assert list(out["key"]) == list(batch["key"]) and set(out["source"]) == {"edgebox"}
    assert len(out["boxes"][1]) == 0 and out["error"][1] == "corrupt_image: test"
    for i in range(len(batch["key"])):
        if i == 1:
            continue
        boxes, labels, scores = out["boxes"][i], out["labels"][i], out["scores"][i]
        h, w = batch["image"][i].shape[:2]
        assert 0 < len(boxes) <= 25 and boxes.dtype == np.float32 and boxes.shape == (len(labels), 4)
        assert (labels == -1).all() and len(scores) == len(labels)
        assert (np.diff(scores) <= 1e-6).all()  # best first
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()

    shard = str(batch["shard"][0])
    rows = {k: v[[i for i in range(len(v)) if batch["shard"][i] == shard]] for k, v in out.items()}
    writer = outputs.ShardPartWriter(str(tmp_path / "mined"), {shard: len(rows["key"])}, edgeboxes.SOURCE)
    assert writer.add_batch(rows) == [shard]
    part = outputs.read_part(outputs.part_uri(str(tmp_path / "mined"), shard)).to_pydict()
    assert set(part["source"]) == {"edgebox"} and sorted(part["key"]) == sorted(rows["key"])
    assert all(lab == -1 for labels in part["labels"] for lab in labels)
    assert storage.read_json(outputs.report_uri(str(tmp_path / "mined"), shard))["boxes"] == \
        sum(len(b) for b in rows["boxes"])
    assert outputs.done_shards(str(tmp_path / "mined")) == {shard}  # resumable like any source


def test_mine_config_edgebox_needs_no_checkpoint(corpus, tmp_path):
    req = [f"corpus={corpus}", f"output={tmp_path}/boxes"]
    cfg = load_config(MineConfig, overrides=req + ["source=edgebox"])
    cfg.check_paths()  # no checkpoint: neither validate() nor check_paths() asks for one
    assert cfg.checkpoint == "" and cfg.edgebox.max_boxes == 100 and cfg.edgebox.alpha == 0.65
    cfg = load_config(MineConfig, overrides=req + ["source=edgebox", "edgebox.max_boxes=300", "edgebox.beta=0.6"])
    assert cfg.edgebox.max_boxes == 300 and cfg.edgebox.beta == 0.6
    with pytest.raises(ConfigError, match="checkpoint is required"):
        load_config(MineConfig, overrides=req + ["source=cam"])
    with pytest.raises(ConfigError, match="edgebox.alpha"):
        load_config(MineConfig, overrides=req + ["source=edgebox", "edgebox.alpha=1.5"])
    with pytest.raises(ConfigError, match="edgebox.backend"):
        load_config(MineConfig, overrides=req + ["source=edgebox", "edgebox.backend=cuda"])


@pytest.mark.integration
def test_mine_edgebox_stage_writes_parts_and_resumes(corpus, tmp_path, ray_local):
    from pseudobox.pipelines import mine

    out = str(tmp_path / "boxes")
    cfg = load_config(MineConfig, overrides=[f"corpus={corpus}", f"output={out}", "source=edgebox",
                                             "edgebox.max_boxes=10", "batch_size=3", "max_actors=1"])
    summary = mine.run(cfg)
    manifest = load_manifest(corpus)
    assert summary["source"] == "edgebox" and summary["ok"] == 6 and 0 < summary["boxes"] <= 60
    assert outputs.done_shards(out) == {s.name for s in manifest.shards}
    again = mine.run(cfg)  # every shard done: nothing to redo
    assert again["shards_this_run"] == 0 and again["boxes"] == summary["boxes"]

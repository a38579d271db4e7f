"""The predict stage without Ray: the per-batch function, image-folder pseudo-shards, the
COCO outputs and ``evaluate detections=...``; and the shared progress lines."""
import json

import numpy as np
import pytest
import torch

from pseudobox import storage
from pseudobox.config import ConfigError, to_dict
from pseudobox.datasets import ray_io
from pseudobox.datasets.corpus import encode_image, iter_corpus, iter_shard, load_manifest, shard_uris
from pseudobox.mining import outputs
from pseudobox.pipelines import evaluate, predict
from pseudobox.pipelines.common import ShardProgress, format_eta, format_progress
from tests.conftest import make_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_detector_checkpoint(uri: str, class_names: list[str], seed: int = 0, detections_per_image: int = 10) -> str:
    """A random-init ResNet-18 Faster R-CNN for 64-px images, keeping every detection."""
    from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint
    from pseudobox.models.detectors import DetectorArch, build_detector

    torch.manual_seed(seed)
    arch = DetectorArch(depth=18, min_size=(64,), max_size=128, test_size=64, detections_per_image=detections_per_image,
                        score_thresh=0.0)
    model = build_detector(arch, len(class_names))
    save_checkpoint(make_checkpoint("detector", to_dict(arch), class_names, model.state_dict(), step=0), uri)
    return uri


@pytest.fixture(scope="module")
def det_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    corpus = str(root / "corpus")
    manifest = make_corpus(corpus, num_images=6, size=64, samples_per_shard=3, style="detection", classes="downstream")
    ckpt = make_detector_checkpoint(str(root / "det" / "model.pt"), manifest.classes)
    return corpus, ckpt, manifest


def decoded_batch(corpus):
    manifest = load_manifest(corpus)
    rows = [r for u in shard_uris(corpus, manifest) for r in iter_shard(u)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return ray_io.decode_batch(batch, manifest.classes)


# ---------------------------------------------------------------- per batch


def test_predict_batch_returns_thresholded_detections_in_image_pixels(det_corpus):
    corpus, ckpt, manifest = det_corpus
    model, _ = evaluate.load_detector(ckpt)
    batch = decoded_batch(corpus)
    batch["error"][1] = "corrupt_image: test"
    batch["image"][1] = ray_io.PLACEHOLDER_IMAGE
    out = predict.predict_batch(model, batch, score_threshold=0.0)
    assert list(out["key"]) == list(batch["key"]) and set(out["source"]) == {"predict"}
    assert len(out["boxes"][1]) == 0 and out["error"][1] == "corrupt_image: test"
    total = 0
    for i in (0, *range(2, len(out["key"]))):
        boxes, labels, scores = out["boxes"][i], out["labels"][i], out["scores"][i]
        assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4) and len(scores) == len(labels)
        assert (boxes[:, 2] <= 64 + 1e-3).all() and (boxes[:, 0] >= 0).all()
        assert ((labels >= 0) & (labels < len(manifest.classes))).all()
        total += len(boxes)
    assert total > 0  # score_thresh 0: a random detector still returns boxes

    # The threshold drops exactly the detections scored below it.
    cut = float(np.median(np.concatenate([s for s in out["scores"] if len(s)])))
    high = predict.predict_batch(model, batch, score_threshold=cut)
    for i in range(len(out["key"])):
        assert len(high["scores"][i]) == int((out["scores"][i] >= cut).sum())
        assert (high["scores"][i] >= cut).all()


# ---------------------------------------------------------------- image folders


def test_image_folder_pseudo_shards_are_recursive_sorted_and_deterministic(tmp_path):
    img = encode_image(np.full((8, 8, 3), 127, np.uint8))
    for rel in ("b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.png", "notes.txt", "sub/e.json"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(img)
    files = ray_io.list_image_files(str(tmp_path))
    assert files == ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.png"]
    groups = ray_io.image_folder_shards(files, files_per_shard=3)
    assert groups == {"images-000000.tar": ["a.PNG", "b.jpg", "sub/c.jpeg"], "images-000001.tar": ["sub/deeper/d.png"]}
    assert ray_io.image_folder_shards(list(reversed(files)), 3) == groups
    assert {outputs.shard_stem(s) for s in groups} == {"images-000000", "images-000001"}


def test_image_folder_read_task_and_decode_count_bad_files(tmp_path):
    (tmp_path / "ok.png").write_bytes(encode_image(np.zeros((5, 7, 3), np.uint8), fmt="png"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows = ray_io.read_image_group({"shard": "images-000000.tar", "files": ["bad.jpg", "gone.jpg", "ok.png"]},
                                   str(tmp_path))
    assert rows[1]["error"].startswith("missing_image")
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = ray_io.decode_batch(batch, [], labelled=False)
    assert [e.split(":")[0] for e in out["error"]] == ["corrupt_image", "missing_image", ""]
    assert out["image"][2].shape == (5, 7, 3) and len(out["labels"][2]) == 0 and out["boxes"][2].shape == (0, 4)


# ---------------------------------------------------------------- COCO outputs and evaluate detections=


def _write_predict_output(out_uri: str, corpus: str, classes: list[str], shift: float = 0.0) -> None:
    """A predict-style output holding the ground truth (shifted by ``shift`` px) as detections."""
    samples = list(iter_corpus(corpus))
    batch = {"key": np.array([s["key"] for s in samples], dtype=object),
             "shard": np.array([s["shard"] for s in samples], dtype=object),
             "image": ray_io.object_array([s["image"] for s in samples]),
             "labels": ray_io.object_array([np.asarray(s["labels"]) for s in samples]),
             "boxes": ray_io.object_array([np.zeros((0, 4), np.float32) for _ in samples]),
             "box_labels": ray_io.object_array([np.zeros(0, np.int64) for _ in samples]),
             "error": np.array([""] * len(samples), dtype=object)}
    dets = {i: (s["boxes"] + shift, s["box_labels"], np.linspace(0.9, 0.5, len(s["boxes"])).astype(np.float32))
            for i, s in enumerate(samples)}
    writer = outputs.ShardPartWriter(out_uri, {sh.name: sh.num_samples for sh in load_manifest(corpus).shards},
                                     "predict")
    writer.add_batch(outputs.mined_rows(batch, dets, "predict"))
    writer.close()
    predict.write_predictions(out_uri, classes)


def test_detections_json_is_coco_results_and_reads_back_exactly(det_corpus, tmp_path):
    corpus, _, manifest = det_corpus
    out = str(tmp_path / "pred")
    _write_predict_output(out, corpus, manifest.classes)
    results = json.loads(storage.read_bytes(out + "/detections.json"))
    coco = json.loads(storage.read_bytes(out + "/predictions_coco.json"))
    assert results and all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in results)
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == manifest.classes
    ids = {im["id"]: im["file_name"] for im in coco["images"]}
    assert {d["image_id"] for d in results} <= set(ids) and len(ids) == manifest.num_samples

    by_key = {s["key"]: s for s in iter_corpus(corpus)}
    d = results[0]
    gt = by_key[ids[d["image_id"]]]
    x, y, w, h = d["bbox"]  # xywh of one of that image's GT boxes
    assert any(np.allclose([x, y, x + w, y + h], b, atol=1e-4) for b in gt["boxes"])

    names, keys, preds = predict.read_predictions(out)
    assert names == manifest.classes and keys == set(by_key)
    for p in preds:  # xyxy back exactly, labels 0-based
        np.testing.assert_array_equal(p["boxes"], by_key[p["key"]]["boxes"])
        np.testing.assert_array_equal(p["labels"], by_key[p["key"]]["box_labels"])
    # The results file alone resolves its image ids through predictions_coco.json beside it.
    assert predict.read_predictions(out + "/detections.json")[1] == keys


def test_evaluate_detections_mode_scores_saved_detections(det_corpus, tmp_path):
    corpus, _, manifest = det_corpus
    exact, shifted = str(tmp_path / "exact"), str(tmp_path / "shifted")
    _write_predict_output(exact, corpus, manifest.classes)
    _write_predict_output(shifted, corpus, manifest.classes, shift=6.0)
    perfect = evaluate.run(evaluate.EvaluateConfig(detections=exact, corpus=corpus))
    assert perfect["AP"] == pytest.approx(100.0) and perfect["VOC_AP50"] == pytest.approx(100.0)
    assert perfect["images"] == manifest.num_samples
    worse = evaluate.run(evaluate.EvaluateConfig(detections=shifted + "/detections.json", corpus=corpus))
    assert worse["AP"] < perfect["AP"] - 5

    # Checkpoint and detections are exclusive; class names must match the corpus's.
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate.EvaluateConfig(detections=exact, checkpoint="x.pt", corpus=corpus).validate()
    renamed = str(tmp_path / "renamed")
    _write_predict_output(renamed, corpus, list(reversed(manifest.classes)))
    with pytest.raises(ConfigError, match="classes of the detections"):
        evaluate.run(evaluate.EvaluateConfig(detections=renamed, corpus=corpus))


def test_evaluate_detections_refuses_images_never_predicted(det_corpus, tmp_path):
    corpus, _, manifest = det_corpus
    out = str(tmp_path / "pred")
    _write_predict_output(out, corpus, manifest.classes)
    coco = storage.read_json(out + "/predictions_coco.json")
    coco["images"] = coco["images"][1:]  # one image was never predicted
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]
    storage.write_json(out + "/predictions_coco.json", coco)
    storage.write_json(out + "/detections.json", outputs.coco_results(coco))
    with pytest.raises(ConfigError, match="no predictions for 1 of"):
        evaluate.run(evaluate.EvaluateConfig(detections=out, corpus=corpus))


def test_predict_config_fails_before_ray_on_bad_values_and_paths(det_corpus, tmp_path):
    corpus, ckpt, _ = det_corpus
    with pytest.raises(ConfigError, match="score_threshold"):
        predict.PredictConfig(checkpoint=ckpt, corpus=corpus, output="o", score_threshold=1.5).validate()
    with pytest.raises(ConfigError, match="min_actors"):
        predict.PredictConfig(checkpoint=ckpt, corpus=corpus, output="o", min_actors=3, max_actors=2).validate()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no corpus.json and no .jpg"):
        predict.PredictConfig(checkpoint=ckpt, corpus=str(tmp_path / "empty"), output=str(tmp_path / "o")).check_paths()


# ---------------------------------------------------------------- progress lines (common.py)


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (41.6, "42s"), (125, "2m05s"), (3599, "59m59s"),
                                            (3720, "1h02m"), (None, "--"), (float("inf"), "--"), (-1, "--")])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_format_progress_line():
    assert format_progress("mine", 3, 12, 1536, 6144, 1536 / 41.3) == \
        "mine  shards 3/12  images 1536/6144  41.3 img/s  ETA 1m52s"  # 4608 images left at 41.3/s
    assert format_progress("predict", 0, 4, 0, 100, 0.0) == "predict  shards 0/4  images 0/100  -- img/s  ETA --"


def test_shard_progress_throttles_lines_but_always_reports_the_last_shard():
    now = [0.0]
    lines = []
    progress = ShardProgress("mine", {f"s{i}": 10 for i in range(5)}, min_interval=5.0, clock=lambda: now[0],
                             emit=lines.append)
    for i, t in enumerate((1.0, 2.0, 7.0, 8.0, 9.0)):
        now[0] = t
        progress.add_images(10)
        progress.shard_done(f"s{i}")
    assert [line.split("  ")[1] for line in lines] == ["shards 1/5", "shards 3/5", "shards 5/5"]
    assert lines[-1].endswith("ETA 0s")
    assert progress.summary(errors=2).startswith("mine  done  shards 5/5  images 50  5.6 img/s  in 9s  errors 2")

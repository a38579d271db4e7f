"""The predict stage on local Ray: a corpus and an image folder; its detections scored by
``evaluate detections=...`` equal evaluating the checkpoint directly; re-runs resume."""
import json

import numpy as np
import pytest

from pseudobox import storage
from pseudobox.datasets.corpus import encode_image, iter_corpus
from pseudobox.mining import outputs
from pseudobox.models.detectors import detector_images
from pseudobox.models.detectors import predict as detector_predict
from pseudobox.pipelines import evaluate, predict
from tests.conftest import make_corpus
from tests.unit.test_predict import make_detector_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def predict_images(model, images):
    return detector_predict(model, detector_images(images, "cpu"))


def _cfg(ckpt, corpus, out, **kw):
    return predict.PredictConfig(checkpoint=ckpt, corpus=corpus, output=out,
                                 **{"batch_size": 1, "min_actors": 1, "max_actors": 1, "gallery": 2, **kw})


def test_predict_then_evaluate_detections_equals_evaluating_the_checkpoint(ray_local, tmp_path):
    corpus = str(tmp_path / "corpus")
    manifest = make_corpus(corpus, num_images=6, size=64, samples_per_shard=3, style="detection", classes="downstream")
    # 100 boxes per image: a random detector then hits some objects (AP50 > 0).
    ckpt = make_detector_checkpoint(str(tmp_path / "det" / "model.pt"), manifest.classes, detections_per_image=100)
    out = str(tmp_path / "pred")

    summary = predict.run(_cfg(ckpt, corpus, out))
    assert summary["shards_this_run"] == 2 and summary["images"] == 6 and summary["detections"] > 0
    assert storage.listdir(out + "/parts") == ["shard-000000.parquet", "shard-000001.parquet"]
    assert len(storage.listdir(out + "/gallery")) == 2
    assert storage.read_json(out + "/run.json")["settings"]["stage"] == "predict"

    direct = evaluate.run(evaluate.EvaluateConfig(checkpoint=ckpt, corpus=corpus, batch_size=1, device="cpu"))
    saved = evaluate.run(evaluate.EvaluateConfig(detections=out, corpus=corpus))
    for key in ("images", "AP", "AP50", "AP75", "VOC_AP50", "VOC_AP50_07"):
        assert saved[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    assert direct["VOC_AP50"] > 0  # the comparison is not between two zeros
    # The saved detections are the detector's own, box for box.
    model, _ = evaluate.load_detector(ckpt)
    _, _, saved_preds = predict.read_predictions(out + "/detections.json")
    by_key = {p["key"]: p for p in saved_preds}
    for s in iter_corpus(corpus):
        (own,) = predict_images(model, [s["image"]])
        np.testing.assert_allclose(by_key[s["key"]]["boxes"], own["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(by_key[s["key"]]["scores"], own["scores"].numpy(), atol=1e-5)

    # Re-run: nothing to do; drop one part: only that shard runs again.
    before = outputs.load_reports(out)
    assert predict.run(_cfg(ckpt, corpus, out, batch_size=2))["shards_this_run"] == 0
    storage.remove(outputs.part_uri(out, "shard-000001.tar"))
    again = predict.run(_cfg(ckpt, corpus, out))
    after = outputs.load_reports(out)
    assert again["shards_this_run"] == 1 and again["images"] == 6
    assert after["shard-000000.tar"]["written_at"] == before["shard-000000.tar"]["written_at"]
    assert after["shard-000001.tar"]["written_at"] > before["shard-000001.tar"]["written_at"]


def test_predict_on_an_image_folder(ray_local, tmp_path):
    corpus = str(tmp_path / "corpus")
    manifest = make_corpus(corpus, num_images=3, size=64, samples_per_shard=3, style="detection", classes="downstream")
    folder = tmp_path / "images"
    for i, s in enumerate(iter_corpus(corpus)):
        path = folder / ("sub" if i else "") / f"im{i}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(s["image"], fmt="png" if i % 2 else "jpg"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ckpt = make_detector_checkpoint(str(tmp_path / "det.pt"), manifest.classes)
    out = str(tmp_path / "pred")

    summary = predict.run(_cfg(ckpt, str(folder), out, files_per_shard=2))
    assert summary["input"] == "image_folder" and summary["shards_this_run"] == 2
    assert summary["images"] == 3 and summary["errors"] == {"corrupt_image": 1}
    coco = json.loads(storage.read_bytes(out + "/predictions_coco.json"))
    assert sorted(im["file_name"] for im in coco["images"]) == ["im0.jpg", "sub/im1.png", "sub/im2.jpg"]
    results = json.loads(storage.read_bytes(out + "/detections.json"))
    assert len(results) == summary["detections"] > 0
    assert all(np.all(np.asarray(d["bbox"][2:]) >= 0) for d in results)
    assert len(storage.listdir(out + "/gallery")) == 2

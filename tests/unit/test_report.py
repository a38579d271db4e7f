"""The report stage: training, mining and predict outputs made by hand (no Ray), local and s3://."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from pseudobox import storage
from pseudobox.config import ConfigError, load_config
from pseudobox.mining import outputs
from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint
from pseudobox.pipelines import report
from pseudobox.pipelines.common import check_same_run
from tests.conftest import make_corpus

CLASSES = ["cat", "dog", "bird"]
LOSS_KEYS = ("loss", "loss_classifier", "loss_box_reg")


def make_training_output(uri: str, with_eval: bool = True) -> list[dict]:
    """A finished detector run: model.pt with a history (losses, lr, s_per_iter and, when
    asked, eval rows with per-class AP) and a metrics.json holding per-class VOC AP."""
    history = [{"step": s, "lr": 0.01 * min(1.0, s / 20), "s_per_iter": 0.5 + 0.01 * s, "loss": 2.0 / s,
                "loss_classifier": 1.2 / s, "loss_box_reg": 0.8 / s} for s in range(10, 101, 10)]
    if with_eval:
        for s in (50, 100):
            history.append({"step": s, "eval/AP": s / 4, "eval/AP50": s / 2, "eval/images": 5,
                            **{f"eval/AP/{c}": s / 4 + i for i, c in enumerate(CLASSES)}})
    config = {"optim": {"batch_size": 4}, "workers": {"num_workers": 2}}
    save_checkpoint(make_checkpoint("detector", {"detector": "faster_rcnn", "depth": 18}, CLASSES, {}, step=100,
                                    history=history, stage="pretrain", method="dap", config=config),
                    storage.join(uri, "model.pt"))
    if with_eval:
        storage.write_json(storage.join(uri, "metrics.json"),
                           {"images": 5, "AP": 21.5, "AP50": 40.25, "VOC_AP50": 39.0, "per_class": [11.0, 22.0, None]})
    return history


def make_mining_output(corpus: str, out_uri: str, bad_key: str | None = None) -> list[dict]:
    """Parts, reports and run.json for every corpus image, the 'mined' boxes being the
    ground truth shifted by 2 px; ``bad_key`` becomes a corrupt_image error row."""
    from pseudobox.datasets.corpus import iter_corpus, load_manifest

    manifest = load_manifest(corpus)
    check_same_run(out_uri, {"stage": "mine", "corpus": corpus, "source": "cam"})
    samples = list(iter_corpus(corpus))
    writer = outputs.ShardPartWriter(out_uri, {s.name: s.num_samples for s in manifest.shards}, "cam")

    def column(values):
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr

    batch = {"key": column([s["key"] for s in samples]), "shard": column([s["shard"] for s in samples]),
             "error": column(["corrupt_image: unreadable" if s["key"] == bad_key else "" for s in samples]),
             "image": column([s["image"] for s in samples]), "boxes": column([s["boxes"] for s in samples]),
             "box_labels": column([s["box_labels"] for s in samples]), "labels": column([s["labels"] for s in samples])}
    mined = {i: (np.asarray(s["boxes"], np.float32) + 2, np.asarray(s["box_labels"]), np.ones(len(s["boxes"]), np.float32))
             for i, s in enumerate(samples) if s["key"] != bad_key}
    writer.add_batch(outputs.mined_rows(batch, mined, "cam"))
    writer.close()
    return samples


@pytest.fixture
def corpus(tmp_path):
    uri = str(tmp_path / "corpus")
    make_corpus(uri, num_images=6, size=64, samples_per_shard=3)
    return uri


def img_count(page: str) -> int:
    return page.count('<img src="data:image/png;base64,')


def test_training_report_has_labelled_curves_throughput_and_per_class_ap(tmp_path):
    out = str(tmp_path / "dap")
    make_training_output(out)
    result = report.run(report.ReportConfig(inputs=[out]))
    assert result["output"] == storage.join(out, "report.html") and result["inputs"] == [{"uri": out, "kind": "training"}]
    page = storage.read_bytes(result["output"]).decode()
    for key in LOSS_KEYS:  # one chart per loss key, titled and with its y axis named after it
        assert f'<text class="title" x="210" y="16" font-size="12" text-anchor="middle">{key}</text>' in page
        assert re.search(rf'class="ylabel"[^>]*>{key}</text>', page)
    assert "learning rate" in page and "seconds per iteration" in page
    assert page.count('class="xlabel"') == page.count("<svg")  # every chart has its x axis labelled
    assert '>step</text>' in page
    assert "<svg" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external assets
    # throughput: global batch 4 × 2 workers over the median 1.05 s / iteration
    assert "images / s (global batch 8)" in page and "<td>7.6</td>" in page
    # eval curves from the history, per-class AP from history rows and metrics.json
    assert "eval/AP50" in page and "Per-class AP" in page
    per_class = page[page.index("Per-class AP"):]
    assert "<th>eval/AP</th>" in per_class and "<th>per_class</th>" in per_class
    assert "<td>cat</td><td>25.0</td><td>11.0</td>" in per_class  # latest eval row, then metrics.json
    assert "<td>bird</td><td>27.0</td><td>–</td>" in per_class  # no AP for bird in metrics.json
    assert "eval/AP/cat" not in page and "eval/images" not in page  # a table and a count, not curves


def test_training_report_without_eval_has_no_per_class_table(tmp_path):
    out = str(tmp_path / "cls")
    make_training_output(out, with_eval=False)
    page = storage.read_bytes(report.run(report.ReportConfig(inputs=[out]))["output"]).decode()
    assert "loss_box_reg" in page and "Per-class AP" not in page and "Evaluation" not in page


def test_semi_supervised_run_shows_its_loss_terms_and_pseudo_label_curves(tmp_path):
    out = str(tmp_path / "ssod")
    history = [{"step": s, "lr": 0.01, "s_per_iter": 1.0, "loss": 1.0, "sup_classifier": 0.6, "unsup_classifier": 0.4,
                "pseudo/precision": 0.5, "pseudo/recall": 0.25, "pseudo/per_image": 1.5,
                **{f"pseudo/precision/{c}": 0.1 * i for i, c in enumerate(CLASSES)},
                "eval/teacher/AP": float(s), "eval/student/AP": s / 2} for s in (10, 20)]
    save_checkpoint(make_checkpoint("detector", {"detector": "faster_rcnn", "depth": 18}, CLASSES, {}, step=20,
                                    history=history, stage="finetune-ssod", method="mean-teacher", config={}),
                    storage.join(out, "model.pt"))
    page = storage.read_bytes(report.run(report.ReportConfig(inputs=[out]))["output"]).decode()
    losses = page[page.index("<h3>Losses</h3>"):page.index("<h3>Learning rate</h3>")]
    assert "sup_classifier" in losses and "unsup_classifier" in losses
    pseudo = page[page.index("<h3>Pseudo-labels</h3>"):]
    assert "pseudo/precision" in pseudo and "pseudo/per_image" in pseudo
    evaluation = page[page.index("<h3>Evaluation during training</h3>"):page.index("<h3>Pseudo-labels</h3>")]
    assert "eval/teacher/AP" in evaluation and "eval/student/AP" in evaluation and "unsup_" not in evaluation


def test_axis_ticks_are_round_values_covering_the_data():
    assert report.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = report.nice_ticks(10, 95)
    assert ticks[0] <= 10 and ticks[-1] >= 95 and len(ticks) <= 8
    svg = report.svg_curves({"a": [(0, 0.5), (100, 0.25)]}, "t", x_label="step", y_label="loss")
    assert ">100</text>" in svg and ">0.5</text>" in svg and 'class="ylabel"' in svg
    assert "no data" in report.svg_curves({"a": [(1, float("nan"))]}, "empty")
    long = report.svg_curves({"a": [(s, 1 / s) for s in range(1, 5001)]}, "long", max_points=500)
    points = re.search(r'points="([^"]+)"', long).group(1).split()
    assert len(points) <= 501 and points[-1] == "408.0,198.0"  # thinned, last step kept


def test_mining_report_summary_errors_and_gallery(tmp_path, corpus):
    out = str(tmp_path / "boxes")
    samples = make_mining_output(corpus, out, bad_key=None)
    bad = samples[1]["key"]
    out_bad = str(tmp_path / "boxes-bad")
    make_mining_output(corpus, out_bad, bad_key=bad)
    result = report.run(report.ReportConfig(inputs=[out_bad], gallery=4, output=str(tmp_path / "r.html")))
    assert result["inputs"][0]["kind"] == "mining"
    page = storage.read_bytes(str(tmp_path / "r.html")).decode()
    assert "CorLoc %" in page and "recall@0.5 %" in page and "<td>100.0</td>" in page  # shifted GT: all found
    assert "corrupt_image: 1" in page and "<td>corrupt_image</td><td>1</td>" in page
    assert img_count(page) == 2 * 4  # mined next to ground truth, first 4 images
    assert "mined (left) vs ground truth (right)" in page and bad not in page.split("Mined boxes")[1]
    # gallery=0: no images; a corpus that is not recorded: a note, not a failure
    page = storage.read_bytes(report.run(report.ReportConfig(inputs=[out], gallery=0))["output"]).decode()
    assert img_count(page) == 0 and "gallery off" in page
    storage.write_json(storage.join(out, "run.json"), {"settings": {"stage": "mine"}})
    page = storage.read_bytes(report.run(report.ReportConfig(inputs=[out]))["output"]).decode()
    assert img_count(page) == 0 and "set corpus=" in page
    page = storage.read_bytes(report.run(report.ReportConfig(inputs=[out], corpus=corpus, gallery=6))["output"]).decode()
    assert img_count(page) == 2 * len(samples)


def test_predict_report_draws_confident_detections_against_ground_truth(tmp_path, corpus):
    from pseudobox.datasets.corpus import iter_corpus

    out = str(tmp_path / "pred")
    check_same_run(out, {"stage": "predict", "corpus": corpus})
    samples = list(iter_corpus(corpus))[:3]
    images = [{"id": i + 1, "file_name": s["key"]} for i, s in enumerate(samples)]
    anns = [{"image_id": i + 1, "category_id": int(s["box_labels"][0]) + 1, "bbox": [4, 4, 20, 20], "score": sc}
            for i, s in enumerate(samples) for sc in (0.9, 0.1)]
    storage.write_json(storage.join(out, "detections.json"),
                       {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]})
    page = storage.read_bytes(report.run(report.ReportConfig(inputs=[out], score_threshold=0.5))["output"]).decode()
    assert "<td>3</td><td>6</td><td>3</td><td>1.00</td>" in page  # images, detections, kept, kept per image
    assert img_count(page) == 2 * 3 and "predicted (left) vs ground truth (right)" in page
    parsed = report.detections_by_key({"images": images, "annotations": anns})
    shown = report.paired_items(corpus, lambda shard: parsed, 3, score_threshold=0.5)
    assert [len(it["boxes"]) for it in shown] == [1, 1, 1] and all(it["scores"][0] == pytest.approx(0.9) for it in shown)
    boxes, labels, scores = parsed[samples[0]["key"]]
    np.testing.assert_allclose(boxes[0], [4, 4, 24, 24])  # xywh → xyxy
    assert labels[0] == int(samples[0]["box_labels"][0]) and sorted(scores.tolist()) == pytest.approx([0.1, 0.9])


def test_several_inputs_and_an_evaluation_json_in_one_page(tmp_path, corpus):
    a, b = str(tmp_path / "ft-cls"), str(tmp_path / "ft-dap")
    make_training_output(a)
    make_training_output(b, with_eval=False)
    metrics = str(tmp_path / "eval.json")
    storage.write_json(metrics, {"images": 10, "AP": 12.5, "AP50": 30.0, "errors": {}})
    result = report.run(report.ReportConfig(inputs=[a, b, metrics], output=str(tmp_path / "all.html")))
    assert [i["kind"] for i in result["inputs"]] == ["training", "training", "evaluation"]
    page = (tmp_path / "all.html").read_text()
    assert f"Training: {a}" in page and f"Evaluation: {metrics}" in page
    assert "total loss per run" in page and ">ft-cls</text>" in page and ">ft-dap</text>" in page
    assert "<td>AP</td><td>12.50</td>" in page


def test_unknown_and_missing_inputs_fail_naming_the_path(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(odd))} is not a stage output.*notes\.txt.*Expected a "
                                          r"training output"):
        report.run(report.ReportConfig(inputs=[str(odd)]))
    with pytest.raises(storage.StorageError, match="inputs: .*missing does not exist"):
        report.run(report.ReportConfig(inputs=[str(tmp_path / "missing")]))
    assert not (odd / "report.html").exists()


def test_config_needs_inputs_and_takes_them_from_overrides():
    with pytest.raises(ConfigError, match="inputs is required"):
        report.ReportConfig().validate()
    cfg = load_config(report.ReportConfig, None, ["inputs=[s3://b/dap, /tmp/boxes]", "gallery=3"])
    assert cfg.inputs == ["s3://b/dap", "/tmp/boxes"] and cfg.gallery == 3
    assert report.report_uri(cfg) == "s3://b/dap/report.html"
    cfg = load_config(report.ReportConfig, None, ['inputs=["runs/dap"]'], resolve=True)
    assert cfg.inputs == [os.path.abspath("runs/dap")]  # relative inputs are resolved like other stages' paths
    assert report.report_uri(report.ReportConfig(inputs=["/x/metrics.json"])) == "/x/report.html"
    with pytest.raises(ConfigError, match="score_threshold"):
        report.ReportConfig(inputs=["a"], score_threshold=2).validate()


def test_s3_inputs_and_output(s3_bucket, corpus):
    train, boxes = f"{s3_bucket}/runs/dap", f"{s3_bucket}/runs/boxes"
    make_training_output(train)
    make_mining_output(corpus, boxes)
    result = report.run(report.ReportConfig(inputs=[train, boxes], gallery=2))
    assert result["output"] == f"{s3_bucket}/runs/dap/report.html"
    assert [i["kind"] for i in result["inputs"]] == ["training", "mining"]
    page = storage.read_bytes(result["output"]).decode()
    assert "loss_classifier" in page and "Per-class AP" in page and img_count(page) == 2 * 2

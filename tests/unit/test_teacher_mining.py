"""Teacher mining (offline self-training) without Ray: the box filter, the flip TTA, the
per-batch function and its parts, the config checks, and the finetune join."""
import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from pseudobox import storage
from pseudobox.config import ConfigError, load_config
from pseudobox.datasets import ray_io
from pseudobox.datasets.transforms import hflip
from pseudobox.mining import outputs, teacher
from pseudobox.pipelines import evaluate
from pseudobox.pipelines.finetune import FinetuneConfig
from pseudobox.pipelines.mine import MineConfig
from tests.conftest import make_classifier_checkpoint, make_corpus
from tests.unit.test_predict import decoded_batch, make_detector_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def det_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    corpus = str(root / "corpus")
    manifest = make_corpus(corpus, num_images=6, size=64, samples_per_shard=3, style="detection", classes="downstream")
    ckpt = make_detector_checkpoint(str(root / "det" / "model.pt"), manifest.classes)
    return corpus, ckpt, manifest


# ---------------------------------------------------------------- plain functions


def test_select_keeps_confident_boxes_or_the_top_one_per_image():
    scores = torch.tensor([0.9, 0.3, 0.65, 0.2, 0.5, 0.55, 0.4, 0.4])
    image_idx = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    keep = teacher.select_pseudo_boxes(scores, image_idx, threshold=0.6, keep_top1=True)
    # image 0: its two boxes >= 0.6; 1: none reaches 0.6, so its best (0.5); 2: its only box;
    # 3: a tie at the top keeps exactly one box (the earlier).
    assert keep.tolist() == [True, False, True, False, True, True, True, False]
    only = teacher.select_pseudo_boxes(scores, image_idx, threshold=0.6, keep_top1=False)
    assert only.tolist() == [True, False, True, False, False, False, False, False]
    # Order of the inputs does not matter (but for which of two tied boxes is kept).
    perm = torch.tensor([7, 2, 5, 0, 3, 6, 1, 4])
    shuffled = teacher.select_pseudo_boxes(scores[perm], image_idx[perm], 0.6)
    untied = image_idx[perm] != 3
    assert shuffled[untied].tolist() == keep[perm][untied].tolist() and int(shuffled[~untied].sum()) == 1
    empty = teacher.select_pseudo_boxes(torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.6)
    assert empty.shape == (0,) and empty.dtype == torch.bool


def test_unflip_boxes_inverts_the_mirror_exactly():
    boxes = torch.tensor([[0.0, 1.0, 10.5, 20.0], [30.25, 5.0, 64.0, 6.0], [12.0, 0.0, 12.75, 63.5]])
    width = 64
    image = torch.zeros(3, 40, width)
    _, mirrored = hflip(image, boxes)
    assert torch.equal(teacher.unflip_boxes(mirrored, width), boxes)
    # The same map as torchvision's own flip of bounding boxes.
    tv = TF.horizontal_flip(tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(40, width)))
    assert torch.equal(teacher.unflip_boxes(boxes, width), tv.as_subclass(torch.Tensor))
    # Per-box widths: boxes of images of different widths in one flat tensor.
    widths = torch.tensor([64.0, 100.0, 32.0])
    out = teacher.unflip_boxes(boxes, widths)
    assert torch.equal(out[:, 0], widths - boxes[:, 2]) and torch.equal(out[:, 2], widths - boxes[:, 0])
    assert torch.equal(out[:, [1, 3]], boxes[:, [1, 3]])


def test_merge_views_suppresses_within_image_and_class_only():
    box = [10.0, 10.0, 30.0, 30.0]
    near = [11.0, 10.0, 31.0, 30.0]  # IoU ~0.9 with box
    boxes = torch.tensor([box, near, near, near, [40.0, 40.0, 60.0, 60.0]])
    scores = torch.tensor([0.7, 0.9, 0.8, 0.6, 0.5])
    labels = torch.tensor([0, 0, 1, 0, 0])
    image_idx = torch.tensor([0, 0, 0, 1, 0])
    kept = teacher.merge_views(boxes, scores, labels, image_idx, nms_iou=0.5)
    # box 0 loses to its near twin (same image, class); the other class, the other image and
    # the far box survive; best first.
    assert kept.tolist() == [1, 2, 3, 4]
    assert teacher.merge_views(boxes, scores, labels, image_idx, nms_iou=0.95).tolist() == [1, 2, 0, 3, 4]
    assert teacher.merge_views(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0, dtype=torch.int64)).numel() == 0


# ---------------------------------------------------------------- with a tiny detector


def test_flip_view_detections_are_the_mirrors_detections_flipped_back(det_corpus):
    corpus, ckpt, _ = det_corpus
    model, _ = evaluate.load_detector(ckpt)
    image = torch.from_numpy(np.array(decoded_batch(corpus)["image"][0])).permute(2, 0, 1).float() / 255
    plain = teacher.detect_with_flip(model, [image], flip=False)
    both = teacher.detect_with_flip(model, [image], flip=True)
    mirror = teacher.detect_with_flip(model, [image.flip(-1)], flip=False)
    n = len(plain[0])
    assert n > 0 and len(both[0]) == n + len(mirror[0])
    torch.testing.assert_close(both[0][:n], plain[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(both[0][n:], teacher.unflip_boxes(mirror[0], image.shape[-1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(both[1][n:], mirror[1], atol=1e-4, rtol=0)
    assert torch.equal(both[2][n:], mirror[2]) and (both[3] == 0).all()


def test_mine_batch_filters_flips_and_marks_rows_teacher(det_corpus, tmp_path):
    corpus, ckpt, manifest = det_corpus
    model, _ = evaluate.load_detector(ckpt)
    batch = decoded_batch(corpus)
    batch["error"][1] = "corrupt_image: test"
    batch["image"][1] = ray_io.PLACEHOLDER_IMAGE
    out = teacher.mine_batch(model, batch, "cpu", score_threshold=0.6, keep_top1=True, flip=True, nms_iou=0.5)
    assert list(out["key"]) == list(batch["key"]) and set(out["source"]) == {"teacher"}
    assert len(out["boxes"][1]) == 0 and out["error"][1] == "corrupt_image: test"
    ok = [i for i in range(len(batch["key"])) if i != 1]
    images = [torch.from_numpy(np.array(batch["image"][i])).permute(2, 0, 1).float() / 255 for i in ok]
    raw = teacher.detect_with_flip(model, images, flip=True)
    assert len(raw[0]) > 0  # score_thresh 0: the random detector does detect
    for j, i in enumerate(ok):
        boxes, labels, scores = out["boxes"][i], out["labels"][i], out["scores"][i]
        assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4) and len(scores) == len(labels)
        assert ((labels >= 0) & (labels < len(manifest.classes))).all()
        assert (boxes[:, [0, 1]] >= 0).all() and (boxes[:, 2] <= batch["image"][i].shape[1] + 1e-3).all()
        had = int((raw[3] == j).sum())
        if had:  # at least the top box; beyond it only confident ones
            confident = int((scores >= 0.6).sum())
            assert len(scores) == max(confident, 1)
            assert np.isclose(scores.max(), float(raw[1][raw[3] == j].max()))
    # keep_top1 off and a threshold above every score: nothing is kept.
    none = teacher.mine_batch(model, batch, "cpu", score_threshold=1.0, keep_top1=False)
    assert sum(len(b) for b in none["boxes"]) == 0

    # Written through the shared part writer: the same parquet parts as CAM mining.
    shard = str(batch["shard"][0])
    rows = {k: v[[i for i in range(len(v)) if batch["shard"][i] == shard]] for k, v in out.items()}
    writer = outputs.ShardPartWriter(str(tmp_path / "mined"), {shard: len(rows["key"])}, teacher.SOURCE)
    assert writer.add_batch(rows) == [shard]
    part = outputs.read_part(outputs.part_uri(str(tmp_path / "mined"), shard)).to_pydict()
    assert set(part["source"]) == {"teacher"} and sorted(part["key"]) == sorted(rows["key"])
    assert storage.read_json(outputs.report_uri(str(tmp_path / "mined"), shard))["source"] == "teacher"


def test_mine_config_wants_a_detector_for_teacher_and_a_classifier_for_cam(det_corpus, tmp_path):
    corpus, ckpt, manifest = det_corpus
    req = [f"corpus={corpus}", f"output={tmp_path}/boxes"]
    cfg = load_config(MineConfig, overrides=req + ["source=teacher", f"checkpoint={ckpt}", "teacher.nms_iou=0.6"])
    cfg.check_paths()
    assert cfg.teacher.score_threshold == 0.6 and cfg.teacher.keep_top1 and cfg.teacher.nms_iou == 0.6
    classifier = make_classifier_checkpoint(str(tmp_path / "cls.pt"), manifest.classes)
    with pytest.raises(ValueError, match="detector"):
        load_config(MineConfig, overrides=req + ["source=teacher", f"checkpoint={classifier}"]).check_paths()
    with pytest.raises(ValueError, match="classifier"):
        load_config(MineConfig, overrides=req + ["source=cam", f"checkpoint={ckpt}"]).check_paths()
    other = make_detector_checkpoint(str(tmp_path / "other.pt"), list(reversed(manifest.classes)))
    with pytest.raises(ConfigError, match="the detector .* another order"):
        load_config(MineConfig, overrides=req + ["source=teacher", f"checkpoint={other}"]).check_paths()
    with pytest.raises(ConfigError, match="teacher.score_threshold"):
        load_config(MineConfig, overrides=req + ["source=teacher", f"checkpoint={ckpt}", "teacher.score_threshold=2"])


# ---------------------------------------------------------------- finetune on pseudo-boxes


def test_join_pseudo_boxes_keeps_labeled_gt_and_gives_the_rest_mined_boxes(det_corpus, tmp_path):
    corpus, ckpt, _ = det_corpus
    model, _ = evaluate.load_detector(ckpt)
    batch = decoded_batch(corpus)
    mined_uri = str(tmp_path / "mined")
    out = teacher.mine_batch(model, batch, "cpu")
    labeled = str(batch["key"][0])
    unmined = str(batch["key"][2])  # as if mining had not reached it
    written = {k: v[np.asarray(out["key"]) != unmined] for k, v in out.items()}
    shards = sorted(set(written["shard"]))
    writer = outputs.ShardPartWriter(mined_uri, {s: int((written["shard"] == s).sum()) for s in shards},
                                     teacher.SOURCE)
    writer.add_batch(written)
    writer.close()
    teacher._mined_part.cache_clear()

    joined = teacher.join_pseudo_boxes(batch, mined_uri, frozenset({labeled}))
    keys = list(joined["key"])
    assert labeled in keys and unmined not in keys
    row = keys.index(labeled)
    np.testing.assert_array_equal(joined["boxes"][row], batch["boxes"][0])  # GT, not the teacher's
    np.testing.assert_array_equal(joined["box_labels"][row], batch["box_labels"][0])
    for k, key in enumerate(keys):
        if key != labeled:
            i = list(batch["key"]).index(key)
            np.testing.assert_array_equal(joined["boxes"][k], out["boxes"][i][
                (out["boxes"][i][:, 2] - out["boxes"][i][:, 0] >= 1) & (out["boxes"][i][:, 3] - out["boxes"][i][:, 1] >= 1)])
            assert len(joined["boxes"][k]) > 0


def test_finetune_checks_pseudo_boxes_before_ray(det_corpus, tmp_path):
    corpus, ckpt, manifest = det_corpus
    req = [f"corpus={corpus}", f"output={tmp_path}/ft", "init=random"]
    with pytest.raises(ConfigError, match="no finished mining run"):
        load_config(FinetuneConfig, overrides=req + [f"pseudo_boxes={tmp_path}/nothing"]).check_paths()
    mined = str(tmp_path / "mined")
    batch = decoded_batch(corpus)
    out = teacher.mine_batch(evaluate.load_detector(ckpt)[0], batch, "cpu")
    writer = outputs.ShardPartWriter(mined, {s: int((out["shard"] == s).sum()) for s in set(out["shard"])}, "teacher")
    writer.add_batch(out)
    storage.write_json(f"{mined}/mining.json", {"corpus": corpus, "classes": manifest.classes})
    with pytest.raises(ConfigError, match="set split=FILE"):
        load_config(FinetuneConfig, overrides=req + [f"pseudo_boxes={mined}"]).check_paths()
    storage.write_json(f"{tmp_path}/split.json", {"keys": [str(batch["key"][0])]})
    load_config(FinetuneConfig, overrides=req + [f"pseudo_boxes={mined}", f"split={tmp_path}/split.json"]).check_paths()
    storage.write_json(f"{mined}/mining.json", {"corpus": corpus, "classes": list(reversed(manifest.classes))})
    with pytest.raises(ConfigError, match="pseudo-boxes"):
        load_config(FinetuneConfig, overrides=req + [f"pseudo_boxes={mined}", f"split={tmp_path}/split.json"]
                    ).check_paths()

"""Stages refuse a model or corpus of other classes in ``check_paths``, before any Ray
work, instead of running to the end and writing wrong labels (or dying in evaluation)."""
from __future__ import annotations

import json

import pytest

from pseudobox.config import ConfigError, load_config
from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint
from pseudobox.pipelines.common import check_same_classes
from pseudobox.pipelines.evaluate import EvaluateConfig
from pseudobox.pipelines.finetune import FinetuneConfig
from pseudobox.pipelines.mine import MineConfig
from pseudobox.pipelines.pretrain import PretrainConfig
from tests.conftest import make_classifier_checkpoint, make_corpus

# ---------------------------------------------------------------- check_same_classes


def test_same_classes_pass():
    check_same_classes(["a", "b"], ["a", "b"], "the model", "the corpus", "fix it")


def test_other_classes_show_counts_and_first_differences():
    with pytest.raises(ConfigError) as e:
        check_same_classes(["cat", "dog"], ["n01", "dog", "n03"], "the classifier /k", "the corpus /c",
                           "Mine with a classifier trained on this corpus.")
    msg = str(e.value)
    assert "the classes of the classifier /k differ from those of the corpus /c (2 vs 3)" in msg
    assert "#0: 'cat' vs 'n01'" in msg and "#2: <none> vs 'n03'" in msg
    assert "#1" not in msg  # equal positions are not listed
    assert msg.endswith("Mine with a classifier trained on this corpus.")


def test_same_names_in_another_order_are_refused_and_said_so():
    with pytest.raises(ConfigError, match=r"the same names in another order.*#0: 'b' vs 'a', #1: 'a' vs 'b'"):
        check_same_classes(["b", "a"], ["a", "b"], "the model", "the corpus", "")


def test_only_the_first_differences_are_listed():
    with pytest.raises(ConfigError) as e:
        check_same_classes([f"x{i}" for i in range(20)], [f"y{i}" for i in range(20)], "m", "c", "", shown=3)
    msg = str(e.value)
    assert "#2: 'x2' vs 'y2'" in msg and "#3:" not in msg and "(and 17 more)" in msg


# ---------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    pre = make_corpus(str(root / "pre"), num_images=4, size=48, samples_per_shard=4)
    down = make_corpus(str(root / "down"), num_images=4, size=48, samples_per_shard=4, style="detection",
                       classes="downstream")
    assert pre.classes != down.classes
    return {"pre": (str(root / "pre"), pre.classes), "down": (str(root / "down"), down.classes)}


def test_mine_refuses_a_classifier_of_other_classes(corpora, tmp_path):
    corpus, classes = corpora["pre"]
    _, other = corpora["down"]
    good = make_classifier_checkpoint(str(tmp_path / "good.pt"), classes)
    bad = make_classifier_checkpoint(str(tmp_path / "bad.pt"), other)
    req = [f"corpus={corpus}", f"output={tmp_path}/boxes"]
    load_config(MineConfig, overrides=req + [f"checkpoint={good}"]).check_paths()
    with pytest.raises(ConfigError) as e:
        load_config(MineConfig, overrides=req + [f"checkpoint={bad}"]).check_paths()
    msg = str(e.value)
    assert f"the classifier {bad}" in msg and "corpus.json 'classes'" in msg
    assert f"#0: {other[0]!r} vs {classes[0]!r}" in msg
    reordered = make_classifier_checkpoint(str(tmp_path / "reordered.pt"), list(reversed(classes)))
    with pytest.raises(ConfigError, match="another order"):
        load_config(MineConfig, overrides=req + [f"checkpoint={reordered}"]).check_paths()


def test_finetune_refuses_an_eval_corpus_of_other_classes(corpora, tmp_path):
    down, classes = corpora["down"]
    pre, other = corpora["pre"]
    req = [f"corpus={down}", "init=random", f"output={tmp_path}/ft"]
    load_config(FinetuneConfig, overrides=req + [f"eval_corpus={down}"]).check_paths()
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, overrides=req + [f"eval_corpus={pre}"]).check_paths()
    msg = str(e.value)
    assert f"eval_corpus {pre}" in msg and f"the training corpus {down}" in msg
    assert f"#0: {other[0]!r} vs {classes[0]!r}" in msg and "leave eval_corpus empty" in msg


def detector_checkpoint(uri: str, class_names) -> str:
    """A detector checkpoint as far as check_paths reads it (no weights needed)."""
    save_checkpoint(make_checkpoint("detector", {"detector": "faster_rcnn", "depth": 18}, class_names, {}), uri)
    return uri


def test_evaluate_refuses_a_detector_of_other_classes(corpora, tmp_path):
    down, classes = corpora["down"]
    _, other = corpora["pre"]
    good = detector_checkpoint(str(tmp_path / "good.pt"), classes)
    bad = detector_checkpoint(str(tmp_path / "bad.pt"), other)
    load_config(EvaluateConfig, overrides=[f"checkpoint={good}", f"corpus={down}"]).check_paths()
    with pytest.raises(ConfigError, match=rf"the classes of the detector {bad} differ from those of the corpus"):
        load_config(EvaluateConfig, overrides=[f"checkpoint={bad}", f"corpus={down}"]).check_paths()


def test_pretrain_refuses_boxes_mined_from_other_classes(corpora, tmp_path):
    corpus, classes = corpora["pre"]
    _, other = corpora["down"]
    cls = make_classifier_checkpoint(str(tmp_path / "cls.pt"), classes)
    boxes = tmp_path / "boxes"
    (boxes / "parts").mkdir(parents=True)
    cfg = load_config(PretrainConfig, overrides=[f"corpus={corpus}", f"boxes={boxes}", f"classifier={cls}",
                                                 f"output={tmp_path}/dap", "model.depth=18"])
    cfg.check_paths()  # mining still running: no mining.json yet
    (boxes / "mining.json").write_text(json.dumps({"classes": classes}))
    cfg.check_paths()
    (boxes / "mining.json").write_text(json.dumps({"classes": other}))
    with pytest.raises(ConfigError, match=rf"the classes of the boxes {boxes} differ"):
        cfg.check_paths()

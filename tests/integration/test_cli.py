"""Bad configs and missing paths fail before any Ray work, with a message naming the problem."""
import pytest

from pseudobox import cli

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Fail the test if a stage gets as far as starting Ray."""
    import pseudobox.pipelines.common as common

    def refuse(cfg):
        raise AssertionError("Ray was started for a config that should have been rejected")

    for mod in ("mine", "train_classifier", "pretrain", "finetune"):
        monkeypatch.setattr(f"pseudobox.pipelines.{mod}.init_ray", refuse)
    monkeypatch.setattr(common, "init_ray", refuse)


def run(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_unknown_key_names_valid_keys(capsys):
    code, err = run(["mine", "corpus=/x", "checkpoint=/y", "output=/z", "batchsize=3"], capsys)
    assert code == 2 and "batchsize" in err and "batch_size" in err


def test_wrong_type_names_the_dotted_key(capsys):
    code, err = run(["mine", "corpus=/x", "checkpoint=/y", "output=/z", "cam.nms_iou=high"], capsys)
    assert code == 2 and "cam.nms_iou" in err


def test_out_of_range_value(capsys):
    code, err = run(["mine", "corpus=/x", "checkpoint=/y", "output=/z", "cam.thresholds=[0.2,1.5]"], capsys)
    assert code == 2 and "cam.thresholds" in err


def test_missing_corpus_path(capsys, tmp_path):
    code, err = run(["mine", f"corpus={tmp_path}/nope", f"checkpoint={tmp_path}/c", f"output={tmp_path}/o"], capsys)
    assert code == 2 and "corpus" in err and "does not exist" in err


def test_missing_bucket(capsys, s3_server, tmp_path):
    from tests.conftest import make_classifier_checkpoint, make_corpus

    corpus = str(tmp_path / "corpus")
    manifest = make_corpus(corpus, num_images=4, size=48, samples_per_shard=4)
    ckpt = make_classifier_checkpoint(str(tmp_path / "cls.pt"), manifest.classes)
    code, err = run(["mine", f"corpus={corpus}", f"checkpoint={ckpt}", "output=s3://no-such-bucket/out"], capsys)
    assert code == 2 and "no-such-bucket" in err


def test_checkpoint_of_the_wrong_kind(capsys, tmp_path):
    from tests.conftest import make_classifier_checkpoint, make_corpus

    corpus = str(tmp_path / "corpus")
    make_corpus(corpus, num_images=4, size=48, samples_per_shard=4, style="detection", classes="downstream")
    ckpt = make_classifier_checkpoint(str(tmp_path / "cls.pt"), ["a", "b"])
    code, err = run(["finetune", f"corpus={corpus}", "init=detector", f"checkpoint={ckpt}", f"output={tmp_path}/ft",
                     "model.depth=18"], capsys)
    assert code == 2 and "holds a classifier but a detector or a predet is needed" in err


def test_missing_config_file(capsys, tmp_path):
    code, err = run(["pretrain", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "missing.yaml" in err


def test_mine_with_a_classifier_of_other_classes(capsys, tmp_path):
    from tests.conftest import make_classifier_checkpoint, make_corpus

    corpus = str(tmp_path / "corpus")
    manifest = make_corpus(corpus, num_images=4, size=48, samples_per_shard=4)
    ckpt = make_classifier_checkpoint(str(tmp_path / "cls.pt"), ["cat", *manifest.classes[1:]])
    code, err = run(["mine", f"corpus={corpus}", f"checkpoint={ckpt}", f"output={tmp_path}/boxes"], capsys)
    assert code == 2 and "differ from those of the corpus" in err and f"#0: 'cat' vs {manifest.classes[0]!r}" in err
    assert not (tmp_path / "boxes" / "run.json").exists()


def test_finetune_with_an_eval_corpus_of_other_classes(capsys, tmp_path):
    from tests.conftest import make_corpus

    make_corpus(str(tmp_path / "down"), num_images=4, size=48, samples_per_shard=4, style="detection",
                classes="downstream")
    make_corpus(str(tmp_path / "pre"), num_images=4, size=48, samples_per_shard=4)
    code, err = run(["finetune", f"corpus={tmp_path}/down", "init=random", f"output={tmp_path}/ft",
                     f"eval_corpus={tmp_path}/pre"], capsys)
    assert code == 2 and f"eval_corpus {tmp_path}/pre" in err and "differ from those of the training corpus" in err


def test_resubmission_with_another_lr_is_refused(capsys, tmp_path):
    from pseudobox.config import load_config
    from pseudobox.pipelines.common import check_same_run, run_fingerprint
    from pseudobox.pipelines.finetune import APPLIABLE, FinetuneConfig
    from tests.conftest import make_corpus

    make_corpus(str(tmp_path / "down"), num_images=4, size=48, samples_per_shard=4, style="detection",
                classes="downstream")
    argv = [f"corpus={tmp_path}/down", "init=random", f"output={tmp_path}/ft", "optim.lr=0.01"]
    # The first submission recorded its settings (its training is not needed here).
    check_same_run(f"{tmp_path}/ft", run_fingerprint("finetune", load_config(FinetuneConfig, overrides=argv)),
                   appliable=APPLIABLE)
    code, err = run(["finetune", *argv, "optim.lr=0.02", "seed=3"], capsys)
    assert code == 2 and "optim.lr: 0.01 -> 0.02" in err and "seed: 0 -> 3" in err


def test_classifier_resubmission_with_another_lr_is_refused(capsys, tmp_path):
    from pseudobox.config import load_config
    from pseudobox.pipelines.common import TRAINING_APPLIABLE, check_same_run, run_fingerprint
    from pseudobox.pipelines.train_classifier import TrainClassifierConfig
    from tests.conftest import make_corpus

    make_corpus(str(tmp_path / "corpus"), num_images=4, size=48, samples_per_shard=4)
    argv = [f"corpus={tmp_path}/corpus", f"output={tmp_path}/cls", "model.depth=18", "optim.lr=0.01"]
    check_same_run(f"{tmp_path}/cls", run_fingerprint("train-classifier",
                                                      load_config(TrainClassifierConfig, overrides=argv)),
                   appliable=TRAINING_APPLIABLE)
    code, err = run(["train-classifier", *argv, "optim.lr=0.02"], capsys)
    assert code == 2 and "optim.lr: 0.01 -> 0.02" in err

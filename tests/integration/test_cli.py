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
    manifest = make_corpus(corpus, num_images=4, size=48, samples_per_shard=4, style="detection", classes="downstream")
    ckpt = make_classifier_checkpoint(str(tmp_path / "cls.pt"), ["a", "b"])
    code, err = run(["finetune", f"corpus={corpus}", "init=detector", f"checkpoint={ckpt}", f"output={tmp_path}/ft",
                     "model.depth=18"], capsys)
    assert code == 2 and "classifier but a detector is needed" in err


def test_missing_config_file(capsys, tmp_path):
    code, err = run(["pretrain", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "missing.yaml" in err

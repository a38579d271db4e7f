"""A re-submission into an existing output applies the settings that may change and
refuses every other difference, listing each key as old -> new."""
import json

import pytest

from pseudobox.config import ConfigError, load_config
from pseudobox.pipelines import common, finetune, mine, pretrain
from pseudobox.pipelines.common import TRAINING_APPLIABLE, check_same_run, flatten, run_fingerprint


def read_run(path):
    return json.loads((path / "run.json").read_text())


def test_same_run_resumes_and_a_different_one_is_refused(tmp_path):
    out = str(tmp_path / "run")
    fingerprint = {"stage": "pretrain", "corpus": "/c", "model": {"depth": 50, "min_size": [96, 160]}}
    assert check_same_run(out, fingerprint) == {}
    assert (tmp_path / "run" / "run.json").exists()
    assert check_same_run(out, dict(fingerprint)) == {}  # a re-submission of the same run is fine
    with pytest.raises(ConfigError, match=r"model\.depth: 50 -> 18"):
        check_same_run(out, {**fingerprint, "model": {"depth": 18, "min_size": [96, 160]}})


def test_flatten_uses_dotted_keys_and_keeps_lists():
    assert flatten({"a": 1, "optim": {"lr": 0.01, "lr_steps": [0.75, 0.9]}, "extra": {}}) == {
        "a": 1, "optim.lr": 0.01, "optim.lr_steps": [0.75, 0.9], "extra": {}}


def pretrain_cfg(*overrides):
    return load_config(pretrain.PretrainConfig, overrides=["corpus=/c", "boxes=/b", "classifier=/k", "output=/o",
                                                          "optim.lr=0.01", "optim.max_iters=1000", *overrides])


def test_changed_lr_is_refused_with_old_and_new_values(tmp_path):
    out = str(tmp_path / "run")
    check_same_run(out, run_fingerprint("pretrain", pretrain_cfg()), appliable=TRAINING_APPLIABLE)
    before = (tmp_path / "run" / "run.json").read_text()
    with pytest.raises(ConfigError) as e:
        check_same_run(out, run_fingerprint("pretrain", pretrain_cfg("optim.lr=0.02", "model.max_size=1333")),
                       appliable=TRAINING_APPLIABLE)
    msg = str(e.value)
    assert "optim.lr: 0.01 -> 0.02" in msg
    assert "model.max_size: 1000 -> 1333" in msg  # every differing key, not just the first
    assert "optim.max_iters" in msg  # says what may change
    assert (tmp_path / "run" / "run.json").read_text() == before  # nothing recorded


@pytest.mark.parametrize("override", ["optim.batch_size=4", "optim.weight_decay=1e-5", "optim.amp=false",
                                      "seed=1", "min_score=0.5", "model.min_size=[640]", "optim.warmup_iters=2"])
def test_every_training_setting_outside_the_appliable_ones_is_compared(tmp_path, override):
    out = str(tmp_path / "run")
    check_same_run(out, run_fingerprint("pretrain", pretrain_cfg()), appliable=TRAINING_APPLIABLE)
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + ": "):
        check_same_run(out, run_fingerprint("pretrain", pretrain_cfg(override)), appliable=TRAINING_APPLIABLE)


def test_longer_schedule_and_other_resources_are_applied_and_recorded(tmp_path):
    out = str(tmp_path / "run")
    check_same_run(out, run_fingerprint("pretrain", pretrain_cfg()), appliable=TRAINING_APPLIABLE)
    record = read_run(tmp_path / "run")
    assert record["settings"]["optim.lr"] == 0.01 and record["settings"]["stage"] == "pretrain"
    assert record["applied"]["optim.max_iters"] == 1000

    changes = check_same_run(out, run_fingerprint("pretrain", pretrain_cfg(
        "optim.max_iters=2000", "optim.checkpoint_every=100", "workers.num_workers=4", "ray.num_cpus=8")),
        appliable=TRAINING_APPLIABLE)
    assert changes == {"optim.max_iters": (1000, 2000), "optim.checkpoint_every": (500, 100),
                       "workers.num_workers": (2, 4), "ray.num_cpus": (0, 8)}
    record = read_run(tmp_path / "run")
    assert record["applied"]["optim.max_iters"] == 2000 and record["applied"]["workers.num_workers"] == 4
    assert record["changes"] == [{"optim.checkpoint_every": [500, 100], "optim.max_iters": [1000, 2000],
                                  "ray.num_cpus": [0, 8], "workers.num_workers": [2, 4]}]
    # The next re-submission compares with the recorded values: the same one changes nothing.
    assert check_same_run(out, run_fingerprint("pretrain", pretrain_cfg(
        "optim.max_iters=2000", "optim.checkpoint_every=100", "workers.num_workers=4", "ray.num_cpus=8")),
        appliable=TRAINING_APPLIABLE) == {}
    assert len(read_run(tmp_path / "run")["changes"]) == 1


def test_unchanged_resubmission_is_accepted_and_leaves_run_json(tmp_path):
    out = str(tmp_path / "run")
    check_same_run(out, run_fingerprint("pretrain", pretrain_cfg()), appliable=TRAINING_APPLIABLE)
    before = (tmp_path / "run" / "run.json").read_text()
    assert check_same_run(out, run_fingerprint("pretrain", pretrain_cfg()), appliable=TRAINING_APPLIABLE) == {}
    assert (tmp_path / "run" / "run.json").read_text() == before


def test_a_setting_missing_from_one_side_is_a_difference(tmp_path):
    out = str(tmp_path / "run")
    check_same_run(out, {"stage": "x", "a": 1})
    with pytest.raises(ConfigError, match=r"b: <not set> -> 2"):
        check_same_run(out, {"stage": "x", "a": 1, "b": 2})


def test_a_setting_newer_than_the_run_passes_at_its_default_only(tmp_path):
    """A run recorded before optim.reference_batch existed resumes when the new key keeps
    its default, and is refused when it is set; the record then holds the new key."""
    out = tmp_path / "run"
    cfg = pretrain_cfg()
    check_same_run(str(out), run_fingerprint("pretrain", cfg), appliable=TRAINING_APPLIABLE)
    record = json.loads((out / "run.json").read_text())
    del record["settings"]["optim.reference_batch"]
    (out / "run.json").write_text(json.dumps(record))
    defaults = common.config_defaults(cfg)
    assert defaults["optim.reference_batch"] == 0
    with pytest.raises(ConfigError, match=r"optim.reference_batch: <not set> -> 64"):
        check_same_run(str(out), run_fingerprint("pretrain", pretrain_cfg("optim.reference_batch=64")),
                       appliable=TRAINING_APPLIABLE, defaults=defaults)
    assert check_same_run(str(out), run_fingerprint("pretrain", cfg), appliable=TRAINING_APPLIABLE,
                          defaults=defaults) == {}
    assert json.loads((out / "run.json").read_text())["settings"]["optim.reference_batch"] == 0
    with pytest.raises(ConfigError, match=r"optim.reference_batch: <not set> -> 0"):  # without defaults: a change
        (out / "run.json").write_text(json.dumps(record))
        check_same_run(str(out), run_fingerprint("pretrain", cfg), appliable=TRAINING_APPLIABLE)


def test_legacy_run_json_is_checked_on_what_it_holds_then_recorded_in_full(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"stage": "pretrain", "corpus": "/c", "model": {"depth": 50}}))
    with pytest.raises(ConfigError, match=r"corpus: \"/c\" -> \"/other\""):
        check_same_run(str(run), run_fingerprint("pretrain", pretrain_cfg("corpus=/other")),
                       appliable=TRAINING_APPLIABLE)
    check_same_run(str(run), run_fingerprint("pretrain", pretrain_cfg()), appliable=TRAINING_APPLIABLE)
    record = read_run(run)
    assert record["settings"]["optim.lr"] == 0.01  # recorded in full from now on
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.01 -> 0\.02"):
        check_same_run(str(run), run_fingerprint("pretrain", pretrain_cfg("optim.lr=0.02")),
                       appliable=TRAINING_APPLIABLE)


def test_finetune_may_change_its_evaluation_but_not_its_split(tmp_path):
    def cfg(*extra):
        return load_config(finetune.FinetuneConfig, overrides=["corpus=/c", "output=/o", "init=random", *extra])

    out = str(tmp_path / "ft")
    check_same_run(out, run_fingerprint("finetune", cfg()), appliable=finetune.APPLIABLE)
    assert check_same_run(out, run_fingerprint("finetune", cfg("eval_corpus=/test", "cache_dataset=false")),
                          appliable=finetune.APPLIABLE) == {"cache_dataset": (True, False),
                                                            "eval_corpus": ("", "/test")}
    with pytest.raises(ConfigError, match=r"split: \"\" -> \"/k5.json\""):
        check_same_run(out, run_fingerprint("finetune", cfg("split=/k5.json")), appliable=finetune.APPLIABLE)


def test_mine_may_change_placement_but_not_cam_settings(tmp_path):
    def cfg(*extra):
        return load_config(mine.MineConfig, overrides=["corpus=/c", "checkpoint=/k", "output=/o", *extra])

    out = str(tmp_path / "boxes")
    check_same_run(out, run_fingerprint("mine", cfg()), appliable=mine.APPLIABLE)
    assert set(check_same_run(out, run_fingerprint("mine", cfg("max_actors=8", "batch_size=4", "use_gpu=true")),
                              appliable=mine.APPLIABLE)) == {"max_actors", "batch_size", "use_gpu"}
    with pytest.raises(ConfigError, match=r"cam\.thresholds: \[0\.2, 0\.3, 0\.4, 0\.5\] -> \[0\.3\]"):
        check_same_run(out, run_fingerprint("mine", cfg("cam.thresholds=[0.3]")), appliable=mine.APPLIABLE)
    with pytest.raises(ConfigError, match=r"checkpoint: \"/k\" -> \"/k2\""):
        check_same_run(out, run_fingerprint("mine", cfg("checkpoint=/k2")), appliable=mine.APPLIABLE)


def test_appliable_names_exist_in_the_configs():
    """A typo in an appliable name would make that setting refused; each must be a real key."""
    for cls, req, names in [
        (pretrain.PretrainConfig, ["corpus=/c", "boxes=/b", "classifier=/k", "output=/o"], TRAINING_APPLIABLE),
        (finetune.FinetuneConfig, ["corpus=/c", "output=/o", "init=random"], finetune.APPLIABLE),
        (mine.MineConfig, ["corpus=/c", "checkpoint=/k", "output=/o"], mine.APPLIABLE),
    ]:
        keys = flatten(run_fingerprint("x", load_config(cls, overrides=req)))
        for name in names:
            assert any(k == name or k.startswith(name + ".") for k in keys), (cls.__name__, name)
    assert set(common.APPLY_NOTES) <= set(TRAINING_APPLIABLE) | {"workers.num_workers"}


def test_a_setting_made_appliable_later_is_applied_not_refused(tmp_path):
    out = str(tmp_path / "run")
    check_same_run(out, {"stage": "x", "a": 1, "b": 1})  # recorded when nothing was appliable
    assert check_same_run(out, {"stage": "x", "a": 1, "b": 2}, appliable=("b",)) == {"b": (1, 2)}
    with pytest.raises(ConfigError, match="a: 1 -> 2"):
        check_same_run(out, {"stage": "x", "a": 2, "b": 2}, appliable=("b",))

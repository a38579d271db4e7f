"""The command line: flags and positionals into overrides, --print-config, --help, --verbose.

No stage runs here: ``--print-config`` stops after loading the config, and every other
call either fails on its config or has its stage's ``run`` replaced.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from pseudobox import cli, config
from pseudobox.config import ConfigError, load_config


# ---------------------------------------------------------------- argv -> Command

def test_stage_overrides_and_config_path_pass_through():
    cmd = cli.parse_command(["mine", "--config", "configs/demo/mine.yaml", "cam.flip=false", "max_actors=4"])
    assert cmd == cli.Command("mine", "configs/demo/mine.yaml", ["cam.flip=false", "max_actors=4"])


def test_report_outputs_become_inputs():
    cmd = cli.parse_command(["report", "runs/dap", "s3://b/ft,1", "title=DAP", "--verbose"])
    assert cmd.stage == "report" and cmd.verbose
    assert cmd.overrides == ['inputs=["runs/dap", "s3://b/ft,1"]', "title=DAP"]

    @dataclasses.dataclass
    class Report:  # the shape of pipelines.report.ReportConfig's inputs
        inputs: list[str] = dataclasses.field(default_factory=list)
        title: str = ""

    cfg = load_config(Report, overrides=cmd.overrides)
    assert cfg.inputs == ["runs/dap", "s3://b/ft,1"] and cfg.title == "DAP"  # a comma stays inside its path
    assert cli.parse_command(["report", "inputs=[a]"]).overrides == ["inputs=[a]"]
    with pytest.raises(ConfigError, match="not both"):
        cli.parse_command(["report", "a", "inputs=[b]"])


def test_predict_flags_become_overrides():
    cmd = cli.parse_command(["predict", "--checkpoint", "dap/model.pt", "--corpus", "s3://b/test",
                             "--output", "preds", "batch_size=4"])
    assert cmd.stage == "predict"
    assert cmd.overrides == ["checkpoint=dap/model.pt", "corpus=s3://b/test", "output=preds", "batch_size=4"]
    assert cli.parse_command(["predict", "corpus=c"]).overrides == ["corpus=c"]


def test_chain_flags_become_overrides():
    cmd = cli.parse_command(["bench", "dap", "--seeds", "4", "--workdir", "w", "kshot=5", "--print-config"])
    assert cmd == cli.Command("bench dap", None, ["seeds=4", "workdir=w", "kshot=5"], print_config=True)
    assert cli.parse_command(["demo", "--workdir", "/d", "kshot=3"]).overrides == ["workdir=/d", "kshot=3"]
    assert cli.parse_command(["demo"]).overrides == []


def test_every_command_takes_print_config_and_verbose():
    for argv in [[name] for name in cli.STAGES] + [["demo"], ["bench", "dap"]]:
        cmd = cli.parse_command([*argv, "--print-config", "--verbose"])
        assert cmd.print_config and cmd.verbose, argv


# ---------------------------------------------------------------- --print-config

def print_config(argv, capsys) -> str:
    code = cli.main([*argv, "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def commands():
    stages = cli._stages()
    assert set(stages) >= {"build-corpus", "train-classifier", "mine", "pretrain", "split", "finetune", "evaluate"}
    return [[name] for name in stages] + [["demo"], ["bench", "dap"]]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.delenv(config.RAY_JOB_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_print_config_round_trips_for_every_command(here, capsys):
    for argv in commands():
        cls, _ = cli.load_stage(" ".join(argv))
        first = print_config(argv, capsys)
        data = yaml.safe_load(first)
        assert list(data) == [f.name for f in dataclasses.fields(cls)], argv  # every key, in order
        path = here / "printed.yaml"
        path.write_text(first)
        assert print_config([*argv, "--config", "printed.yaml"], capsys) == first, argv
        assert load_config(cls, "printed.yaml", validate=False) == load_config(cls, validate=False, resolve=True)


def test_print_config_shows_overrides_resolved_without_checking_paths(here, capsys):
    argv = ["mine", "corpus=no/such/corpus", "checkpoint=s3://b/cls/model.pt", "output=out",
            "cam.scales=96", "use_gpu=true"]
    data = yaml.safe_load(print_config(argv, capsys))
    assert data["corpus"] == str(here / "no" / "such" / "corpus")  # absolute, and not checked
    assert data["checkpoint"] == "s3://b/cls/model.pt" and data["output"] == str(here / "out")
    assert data["cam"]["scales"] == [96] and data["cam"]["nms_iou"] == 0.8  # nested sections in full
    assert data["use_gpu"] == "true"
    printed = print_config(["bench", "dap", "--seeds", "5", "--workdir", "b"], capsys)
    assert yaml.safe_load(printed)["seeds"] == 5 and yaml.safe_load(printed)["workdir"] == str(here / "b")


def test_print_config_still_checks_keys_and_types(here, capsys):
    assert cli.main(["mine", "--print-config", "batchsize=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pseudobox mine: error: unknown key(s) ['batchsize']") and "batch_size" in err
    assert cli.main(["bench", "dap", "--print-config", "seeds=many"]) == 2
    assert capsys.readouterr().err.startswith("pseudobox bench dap: error: seeds: expected an integer")


# ---------------------------------------------------------------- --help, --verbose

def test_help_lists_the_keys_with_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.parse_command(["split", "--help"])
    out = capsys.readouterr().out
    for line in ('  corpus: ""', '  output: ""', "  k: 10", "  seed: 0"):
        assert line in out.splitlines()
    with pytest.raises(SystemExit):
        cli.parse_command(["mine", "--help"])
    out = capsys.readouterr().out.splitlines()
    import dataclasses

    from pseudobox.pipelines.mine import CamConfig

    cam_keys = ", ".join(f.name for f in dataclasses.fields(CamConfig))
    assert "  use_gpu: \"auto\"" in out and f"  cam: {{{cam_keys}}}" in out and "scales, flip" in cam_keys
    with pytest.raises(SystemExit):
        cli.parse_command(["bench", "dap", "--help"])
    assert "  seeds: 3" in capsys.readouterr().out.splitlines()


def test_verbose_reaches_logging_and_the_environment(here, capsys, monkeypatch):
    import pseudobox.pipelines.common as common

    calls = []
    monkeypatch.setattr(common, "setup_logging", lambda verbose=False: calls.append(verbose))
    monkeypatch.setenv("PSEUDOBOX_VERBOSE", "0")
    print_config(["split"], capsys)
    assert calls == [False] and os.environ["PSEUDOBOX_VERBOSE"] == "0"
    print_config(["split", "--verbose"], capsys)
    assert calls == [False, True] and os.environ["PSEUDOBOX_VERBOSE"] == "1"


# ---------------------------------------------------------------- paths in a Ray job

def test_relative_path_in_a_ray_job_is_refused_before_the_stage_runs(monkeypatch, capsys):
    from pseudobox.pipelines import split

    monkeypatch.setenv(config.RAY_JOB_ENV_VAR, "{}")
    monkeypatch.setattr(split, "run", lambda cfg: pytest.fail("the stage ran"))
    assert cli.main(["split", "corpus=./pseudobox-demo/downstream", "output=s3://b/split.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pseudobox split: error: corpus: relative path './pseudobox-demo/downstream' inside a Ray job")
    assert "absolute path" in err and "s3://" in err


def test_stages_run_with_absolute_paths(here, monkeypatch, capsys):
    from pseudobox.pipelines import split

    seen = []
    monkeypatch.setattr(split, "run", lambda cfg: seen.append(cfg) or {"keys": [], "k": cfg.k})
    assert cli.main(["split", "corpus=down", "output=k.json", "k=3"]) == 0
    assert seen[0].corpus == str(here / "down") and seen[0].output == str(here / "k.json")
    assert '"k": 3' in capsys.readouterr().out


# ---------------------------------------------------------------- stages registered lazily

def test_a_missing_stage_module_breaks_only_that_stage(here, monkeypatch, capsys):
    monkeypatch.setitem(cli.STAGES, "predict", cli.StageSpec("no_such_stage", "PredictConfig", "predictions"))
    assert "predict" not in cli._stages() and "mine" in cli._stages()
    assert cli.main(["predict", "--checkpoint", "/c", "--corpus", "/d", "--output", "/o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pseudobox predict: error: the predict stage is not available") and "no_such_stage" in err
    print_config(["split"], capsys)  # the others still work

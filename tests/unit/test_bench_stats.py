"""`pseudobox bench dap`: its statistics against hand-computed values, its config, its
per-seed resume and the command itself, with the stages replaced by stubs (no Ray)."""
import json
import math
import os

import pytest

from pseudobox import storage
from pseudobox.config import ConfigError, load_config
from pseudobox.pipelines import bench

T_975_DOF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 dof (tables: 4.303)


def test_t_quantile_matches_tables():
    assert bench.t_quantile(0.95, 2) == pytest.approx(4.303, abs=5e-4)
    assert bench.t_quantile(0.95, 1) == pytest.approx(12.706, abs=5e-4)
    assert bench.t_quantile(0.95, 4) == pytest.approx(2.776, abs=5e-4)
    assert bench.t_quantile(0.90, 2) == pytest.approx(2.920, abs=5e-4)


def test_mean_std_is_the_sample_std():
    r = bench.mean_std([1.0, 2.0, 3.0, 4.0])
    assert r["n"] == 4 and r["mean"] == pytest.approx(2.5)
    assert r["std"] == pytest.approx(math.sqrt(5 / 3))  # ddof=1: sum of squares 5, over 3
    assert bench.mean_std([7.0, None, float("nan")])["n"] == 1
    one = bench.mean_std([7.0])
    assert one["mean"] == 7.0 and math.isnan(one["std"])
    assert math.isnan(bench.mean_std([])["mean"])


def test_paired_interval_including_zero():
    # differences DAP − CLS = 1, 2, 3: mean 2, std 1, half-width 4.303 / sqrt(3) = 2.484
    r = bench.paired_summary([10.0, 12.0, 14.0], [11.0, 14.0, 17.0])
    assert r["n"] == 3 and r["mean"] == pytest.approx(2.0) and r["std"] == pytest.approx(1.0)
    assert r["t"] == pytest.approx(T_975_DOF2)
    assert r["half_width"] == pytest.approx(T_975_DOF2 / math.sqrt(3))
    assert r["low"] == pytest.approx(2.0 - 2.48414, abs=1e-4) and r["high"] == pytest.approx(4.48414, abs=1e-4)
    assert r["excludes_zero"] is False
    assert "includes 0" in bench.verdict("AP", r)


def test_paired_interval_excluding_zero_either_sign():
    up = bench.paired_summary([0.0, 0.0, 0.0], [2.0, 3.0, 4.0])  # mean 3 ± 2.484
    assert up["low"] == pytest.approx(0.51586, abs=1e-4) and up["excludes_zero"] is True
    assert "excludes 0: DAP-init is better over 3 seeds" in bench.verdict("AP", up)
    down = bench.paired_summary([5.0, 6.0, 7.0], [0.0, 0.0, 0.0])  # mean −6 ± 2.484
    assert down["high"] == pytest.approx(-6 + 2.48414, abs=1e-4) and down["excludes_zero"] is True
    assert "CLS-init is better" in bench.verdict("AP", down)
    # Identical differences: zero width, still a decision.
    same = bench.paired_summary([1.0, 2.0], [2.0, 3.0])
    assert same["low"] == same["high"] == pytest.approx(1.0) and same["excludes_zero"] is True


def test_paired_two_seeds_and_confidence():
    # n = 2: dof 1, t = 12.706; differences 1 and 3: mean 2, std sqrt(2), half 12.706 * sqrt(2) / sqrt(2)
    r = bench.paired_summary([0.0, 0.0], [1.0, 3.0])
    assert r["half_width"] == pytest.approx(12.7062, abs=1e-3)
    r90 = bench.paired_summary([10.0, 12.0, 14.0], [11.0, 14.0, 17.0], confidence=0.90)
    assert r90["half_width"] == pytest.approx(2.91999 / math.sqrt(3), abs=1e-4)


def test_paired_one_seed_has_no_interval_and_bad_input_fails():
    r = bench.paired_summary([1.0], [2.0])
    assert r["mean"] == 1.0 and math.isnan(r["low"]) and math.isnan(r["high"]) and r["excludes_zero"] is None
    assert "no 95% interval" in bench.verdict("AP", r)
    # a pair with a missing value is left out
    assert bench.paired_summary([1.0, None, 3.0], [2.0, 5.0, 4.0])["n"] == 2
    with pytest.raises(ValueError):
        bench.paired_summary([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        bench.paired_summary([1.0, 2.0], [1.0, 2.0], confidence=1.5)


def test_config_requires_two_seeds_and_has_its_own_workdir():
    cfg = load_config(bench.BenchDapConfig, None, ["seeds=4", "kshot=5"])
    assert cfg.seeds == 4 and cfg.kshot == 5 and cfg.workdir == "./pseudobox-bench"
    with pytest.raises(ConfigError, match="seeds must be >= 2"):
        load_config(bench.BenchDapConfig, None, ["seeds=1"])


def test_cli_rejects_one_seed_before_any_work(tmp_path, capsys):
    from pseudobox import cli

    assert cli.main(["bench", "dap", "--seeds", "1", "--workdir", str(tmp_path / "b")]) == 2
    assert "seeds must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def _metrics(ap):
    return {"AP": ap, "AP50": 2 * ap, "AP75": ap, "VOC_AP50": 2 * ap, "VOC_AP50_07": 2 * ap, "images": 4}


def test_run_seed_reuses_finished_arms(tmp_path, monkeypatch):
    calls = []

    def fake_split(cfg, p, output, seed):
        storage.write_json(output, {"keys": ["a"], "seed": seed})

    def fake_finetune(ft):
        calls.append((ft.init, ft.seed, ft.output))
        storage.write_bytes(os.path.join(ft.output, "model.pt"), b"x")
        storage.write_json(os.path.join(ft.output, "metrics.json"), {})
        return {"metrics": _metrics(10.0 if ft.init == "classifier" else 12.0)}

    monkeypatch.setattr(bench.demo, "make_split", fake_split)
    monkeypatch.setattr(bench.finetune, "run", fake_finetune)
    w = str(tmp_path)
    p = {name: os.path.join(w, name) for name in bench.demo.SHARED}
    cfg = bench.BenchDapConfig(workdir=w, seeds=2)

    r = bench.run_seed(cfg, p, w, 1)
    assert [c[:2] for c in calls] == [("classifier", 1), ("detector", 1)]
    assert calls[0][2] == os.path.join(w, "seed-1", "ft-cls") and calls[1][2] == os.path.join(w, "seed-1", "ft-dap")
    assert r["CLS"]["metrics"]["AP"] == 10.0 and r["DAP"]["metrics"]["AP"] == 12.0
    assert storage.read_json(os.path.join(w, "seed-1", "split.json"))["seed"] == 1

    calls.clear()
    again = bench.run_seed(cfg, p, w, 1)  # everything there: nothing re-runs
    assert calls == [] and again["DAP"]["metrics"]["AP"] == 12.0

    storage.remove(os.path.join(w, "seed-1", "ft-dap"), recursive=True)  # an interrupted arm
    bench.run_seed(cfg, p, w, 1)
    assert [c[0] for c in calls] == ["detector"]

    calls.clear()
    cfg.finetune_iters += 1  # other settings: not the same result
    bench.run_seed(cfg, p, w, 1)
    assert [c[0] for c in calls] == ["classifier", "detector"]


def test_summary_and_markdown():
    per_seed = [{"seed": s, "CLS": {"metrics": _metrics(c)}, "DAP": {"metrics": _metrics(d)}}
                for s, c, d in ((0, 10.0, 11.0), (1, 12.0, 14.0), (2, 14.0, 17.0))]
    summary = bench.summarize(per_seed)
    assert summary["AP"]["CLS"]["mean"] == pytest.approx(12.0) and summary["AP"]["CLS"]["std"] == pytest.approx(2.0)
    assert summary["AP"]["DAP"]["values"] == [11.0, 14.0, 17.0]
    assert summary["AP"]["diff"]["mean"] == pytest.approx(2.0)
    assert summary["AP50"]["diff"]["mean"] == pytest.approx(4.0)  # AP50 = 2 AP here: interval scales too
    result = {"command": "pseudobox bench dap --seeds 3", "confidence": 0.95, "total_seconds": 1.0,
              "settings": {"kshot": 10, "depth": 18, "detector": "faster_rcnn", "image_size": 96,
                           "classifier_iters": 300, "pretrain_iters": 150, "finetune_iters": 100, "seeds": 3,
                           "seed_values": [0, 1, 2]},
              "mining": {"corloc": 55.0, "recall50": 40.0, "boxes_per_image": 1.5, "ok": 100, "errors": {}},
              "per_seed": [{"seed": r["seed"], "CLS": r["CLS"]["metrics"], "DAP": r["DAP"]["metrics"]} for r in per_seed],
              "summary": summary}
    md = bench.format_markdown(result)
    assert "`pseudobox bench dap --seeds 3`" in md and "CorLoc 55.0%" in md and "10-shot" in md
    assert "| AP | 12.0 ± 2.0 | 14.0 ± 3.0 | +2.0 | [-0.5, +4.5] | no |" in md
    assert "| 2 | 14.0 | 28.0 | 28.0 | 17.0 | 34.0 | 34.0 |" in md
    assert md.count("includes 0") == 3


def test_bench_dap_command_shares_the_chain_and_writes_the_table(tmp_path, monkeypatch, capsys, caplog):
    """`pseudobox bench dap` end to end with the stages stubbed: the chain once, the
    fine-tunings per seed, the statistics printed and written."""
    from pseudobox import cli

    chains, tuned = [], []
    mining = {"corloc": 31.25, "recall50": 50.0, "boxes_per_image": 2.0, "ok": 64, "errors": {}}

    def fake_chain(cfg, step):
        chains.append(cfg.workdir)
        w = os.path.abspath(cfg.workdir)
        return {"paths": {name: os.path.join(w, name) for name in bench.demo.SHARED}, "mining": mining,
                "cls_ckpt": {}, "dap_ckpt": {}}

    def fake_finetune(ft):
        tuned.append((ft.init, ft.seed, ft.split))
        storage.write_bytes(os.path.join(ft.output, "model.pt"), b"x")
        storage.write_json(os.path.join(ft.output, "metrics.json"), {})
        return {"metrics": _metrics(10.0 + ft.seed + (3.0 + ft.seed if ft.init == "detector" else 0.0))}

    monkeypatch.setattr(bench.demo, "pretrain_chain", fake_chain)
    monkeypatch.setattr(bench.demo, "make_split", lambda cfg, p, output, seed: storage.write_json(output, {"seed": seed}))
    monkeypatch.setattr(bench.finetune, "run", fake_finetune)
    w = tmp_path / "b"
    argv = ["bench", "dap", "--seeds", "3", "--workdir", str(w), "kshot=5"]
    caplog.set_level("INFO", logger="pseudobox")
    assert cli.main(argv) == 0

    assert chains == [str(w)]
    assert [(i, s) for i, s, _ in tuned] == [(init, s) for s in (0, 1, 2) for init in ("classifier", "detector")]
    assert {sp for _, _, sp in tuned} == {str(w / f"seed-{s}" / "split.json") for s in (0, 1, 2)}
    assert "seed 3/3: CLS AP 12.0, DAP AP 17.0" in caplog.text
    result = json.loads((w / "bench-dap.json").read_text())
    assert result["command"] == "pseudobox " + " ".join(argv)
    assert result["settings"]["kshot"] == 5 and result["settings"]["seed_values"] == [0, 1, 2]
    assert [r["seed"] for r in result["per_seed"]] == [0, 1, 2] and result["mining"]["corloc"] == 31.25
    ap = result["summary"]["AP"]
    # DAP − CLS = 3, 4, 5: mean 4, std 1, 95% CI 4 ± 4.303 / sqrt(3)
    assert ap["CLS"]["mean"] == pytest.approx(11.0) and ap["DAP"]["mean"] == pytest.approx(15.0)
    assert ap["diff"]["low"] == pytest.approx(4 - T_975_DOF2 / math.sqrt(3)) and ap["diff"]["excludes_zero"] is True
    md = (w / "bench-dap.md").read_text()
    assert md in capsys.readouterr().out
    assert "AP: DAP − CLS = +4.0, 95% CI [+1.5, +6.5] excludes 0: DAP-init is better over 3 seeds" in md

    tuned.clear()  # a second run reuses every seed's results
    assert cli.main(argv) == 0
    assert tuned == [] and json.loads((w / "bench-dap.json").read_text())["summary"]["AP"]["diff"]["mean"] == 4.0

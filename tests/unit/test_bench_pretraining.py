"""`pseudobox bench pretraining` with its stages stubbed (no Ray): the chains once, three arms
per seed with the PreDet checkpoint handed to fine-tuning, the statistics, resume."""
import json
import math
import os

import pytest

from pseudobox.config import ConfigError
from pseudobox.pipelines import bench_pretraining as bp

T_975_DOF2 = 4.302652729911275


def _metrics(ap):
    return {"AP": ap, "AP50": 2 * ap, "VOC_AP50": 2 * ap}


def test_config_needs_two_seeds_and_sane_rates():
    with pytest.raises(ConfigError, match="seeds must be >= 2"):
        bp.BenchPretrainingConfig(seeds=1).validate()
    with pytest.raises(ConfigError, match="tag_missing"):
        bp.BenchPretrainingConfig(tag_missing=1.5).validate()


def test_predet_settings_fit_the_bench_images():
    cfg = bp.BenchPretrainingConfig(image_size=96, depth=18)
    s = bp.predet_settings(cfg)
    s.validate()
    assert s.arch.crop_size == s.views.crop_size == 96 and s.arch.depth == 18
    assert s.arch.anchor_sizes[0] < 96 / 8 and s.arch.frozen_bn  # from the classifier: its BN statistics
    assert not bp.predet_settings(bp.BenchPretrainingConfig(predet_from_classifier=False)).arch.frozen_bn


def test_bench_runs_three_arms_per_seed_and_reports_paired_differences(tmp_path, monkeypatch, capsys):
    from pseudobox import cli, storage

    tuned, analysed = [], []
    mining = {"corloc": 30.0, "recall50": 50.0, "boxes_per_image": 2.0, "ok": 64, "errors": {}}

    def fake_chain(cfg, step):
        w = os.path.abspath(cfg.workdir)
        return {"paths": {name: os.path.join(w, name) for name in bp.demo.SHARED}, "mining": mining}

    def fake_predet_chain(cfg, p, step):
        w = os.path.abspath(cfg.workdir)
        return {"paths": {"predet": os.path.join(w, "predet")}, "mining": {"ok": 64, "boxes_per_image": 90.0}}

    def fake_finetune(ft):
        tuned.append((ft.init, os.path.basename(ft.checkpoint), ft.seed))
        storage.makedirs(ft.output)
        storage.write_json(os.path.join(ft.output, "metrics.json"), {})
        storage.write_bytes(os.path.join(ft.output, "model.pt"), b"x")
        bonus = {"classifier": 0.0, "dap": 3.0 + ft.seed, "predet": 1.0}[os.path.basename(ft.checkpoint)]
        return {"metrics": _metrics(10.0 + ft.seed + bonus)}

    def fake_analysis(cfg, checkpoint, corpus, output):
        analysed.append(os.path.basename(checkpoint))
        return {"pearson": 0.5, "rows": []}

    monkeypatch.setattr(bp.demo, "pretrain_chain", fake_chain)
    monkeypatch.setattr(bp, "predet_chain", fake_predet_chain)
    monkeypatch.setattr(bp, "iou_similarity", fake_analysis)
    monkeypatch.setattr(bp.demo, "make_split", lambda cfg, p, output, seed: storage.write_json(output, {}))
    monkeypatch.setattr(bp.bench.finetune, "run", fake_finetune)
    w = tmp_path / "b"
    argv = ["bench", "pretraining", "--seeds", "3", "--workdir", str(w)]
    assert cli.main(argv) == 0

    assert analysed == ["classifier", "dap", "predet"]
    assert tuned == [(init, ckpt, s) for s in (0, 1, 2)
                     for init, ckpt in (("classifier", "classifier"), ("detector", "dap"), ("detector", "predet"))]
    result = json.loads((w / "bench-pretraining.json").read_text())
    ap = result["summary"]["AP"]
    assert ap["CLS"]["mean"] == pytest.approx(11.0) and ap["PreDet"]["mean"] == pytest.approx(12.0)
    # DAP − CLS = 3, 4, 5: mean 4, std 1; PreDet − DAP = −2, −3, −4 (DAP better)
    assert ap["diffs"]["DAP − CLS"]["low"] == pytest.approx(4 - T_975_DOF2 / math.sqrt(3))
    assert ap["diffs"]["PreDet − DAP"]["mean"] == pytest.approx(-3.0)
    assert ap["diffs"]["PreDet − DAP"]["excludes_zero"] is True
    assert ap["diffs"]["PreDet − CLS"]["std"] == pytest.approx(0.0)
    md = (w / "bench-pretraining.md").read_text()
    assert md in capsys.readouterr().out
    assert "AP: PreDet − DAP = -3.0, 95% CI [-5.5, -0.5] excludes 0: DAP-init is better over 3 seeds" in md
    assert "| PreDet | 0.500 |" in md

    tuned.clear()  # every arm of every seed is reused on a re-run
    assert cli.main(argv) == 0
    assert tuned == []

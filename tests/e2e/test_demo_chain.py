"""The tiny end-to-end chain: `pseudobox demo` with minimal settings on local Ray."""
import json
import os

import pytest

from pseudobox import cli
from pseudobox.models.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e


def test_demo_chain_runs_and_reports(ray_local, tmp_path, capsys):
    workdir = tmp_path / "demo"
    code = cli.main(["demo", "--workdir", str(workdir), "image_size=64", "pretrain_images=64", "downstream_images=32",
                     "test_images=16", "kshot=2", "classifier_iters=6", "pretrain_iters=4", "finetune_iters=4",
                     "batch_size=4", "cam_scales=[64,96]"])
    assert code == 0
    out = capsys.readouterr().out
    assert "CLS" in out and "DAP" in out and "CorLoc" in out

    results = json.loads((workdir / "results.json").read_text())
    mining = results["mining"]
    assert mining["ok"] == 64 and 0 <= mining["corloc"] <= 100 and mining["boxes_per_image"] > 0
    for name in ("CLS", "DAP"):
        metrics = results["finetune"][name]
        assert metrics["images"] == 16
        for key in ("AP", "AP50", "AP75", "VOC_AP50", "VOC_AP50_07"):
            assert metrics[key] is None or 0 <= metrics[key] <= 100  # null: no GT in that range

    # The checkpoint handoff: DAP init transferred everything but the class-count layers.
    dap = load_checkpoint(str(workdir / "dap"), expect_type="detector")
    assert dap["method"] == "dap" and len(dap["class_names"]) == 16
    ft = load_checkpoint(str(workdir / "ft-dap"), expect_type="detector")
    assert ft["init"]["from"] == "detector"
    assert sorted(ft["init"]["reinitialised"]) == sorted([
        "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"])
    assert load_checkpoint(str(workdir / "ft-cls"))["init"]["from"] == "classifier"

    report = (workdir / "report.html").read_text()
    assert "<svg" in report and "data:image/png;base64," in report and "CorLoc" in report
    assert os.path.getsize(workdir / "report.html") > 10_000

"""bench ssod's arms, statistics and table, on made-up per-seed records (no training)."""
import math

import pytest

from pseudobox.config import ConfigError, load_config
from pseudobox.pipelines import bench_ssod


def test_each_method_is_paired_with_the_supervised_arm_of_its_detector():
    table = bench_ssod.arms(["mean-teacher", "dense-teacher"])
    assert table == [("supervised-faster_rcnn", "supervised", "faster_rcnn"),
                     ("mean-teacher", "mean-teacher", "faster_rcnn"),
                     ("supervised-fcos", "supervised", "fcos"), ("dense-teacher", "dense-teacher", "fcos")]
    assert bench_ssod.baseline_of("dense-teacher", table) == "supervised-fcos"


def _record(sup_ap, mt_ap, sup_s, mt_s):
    def arm(ap, s, images):
        return {"metrics": {"AP": ap, "AP50": 2 * ap}, "seconds": 100.0, "s_per_step": s, "images_per_step": images}
    return {"supervised-faster_rcnn": arm(sup_ap, sup_s, 2), "mean-teacher": arm(mt_ap, mt_s, 10)}


def test_summary_gives_paired_differences_and_step_costs():
    table = bench_ssod.arms(["mean-teacher"])
    per_seed = [_record(10.0, 12.0, 1.0, 4.0), _record(11.0, 12.0, 1.0, 6.0), _record(9.0, 12.0, 2.0, 8.0)]
    summary = bench_ssod.summarize(per_seed, table)
    diff = summary["mean-teacher"]["diff"]["AP"]
    assert diff["diffs"] == [2.0, 1.0, 3.0] and diff["mean"] == pytest.approx(2.0)
    assert diff["low"] < 2.0 < diff["high"]
    assert summary["mean-teacher"]["step_cost"]["mean"] == pytest.approx((4 + 6 + 4) / 3)
    # per image: the semi-supervised step sees 10 images, the supervised one 2
    assert summary["mean-teacher"]["image_cost"]["mean"] == pytest.approx((4 + 6 + 4) / 3 * 2 / 10)
    assert "diff" not in summary["supervised-faster_rcnn"]
    text = bench_ssod.format_markdown({"arms": [list(a) for a in table], "seed_values": [0, 1, 2],
                                       "per_seed": per_seed, "summary": summary, "confidence": 0.95,
                                       "total_seconds": 5.0, "command": "pseudobox bench ssod"},
                                      bench_ssod.BenchSsodConfig())
    row = next(line for line in text.splitlines() if line.startswith("| mean-teacher |"))
    assert "12.0 ± 0.0" in row and "+2.0" in row and "4.67" in row
    assert "| 2 | 9.0 | 12.0 |" in text


def test_step_seconds_count_only_steps_after_burn_in():
    history = [{"step": 5, "s_per_iter": 1.0}, {"step": 10, "s_per_iter": 1.0}, {"step": 15, "s_per_iter": 3.0},
               {"step": 20, "s_per_iter": 5.0}]
    assert bench_ssod.step_seconds(history, after=10) == 4.0
    assert math.isnan(bench_ssod.step_seconds(history, after=20))


def test_bad_bench_settings_fail_before_any_work():
    with pytest.raises(ConfigError, match="methods"):
        load_config(bench_ssod.BenchSsodConfig, None, ["methods=[supervised]"])
    with pytest.raises(ConfigError, match="seeds"):
        load_config(bench_ssod.BenchSsodConfig, None, ["seeds=1"])
    with pytest.raises(ConfigError, match="burn_in_iters"):
        load_config(bench_ssod.BenchSsodConfig, None, ["iters=10", "burn_in_iters=10"])

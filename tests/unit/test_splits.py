"""Tests for pseudobox.datasets.splits (k-shot, percent and holdout splits, split files)
and the ``split`` stage's modes."""

import random

import pytest

from pseudobox.config import ConfigError, load_config
from pseudobox.datasets.splits import (
    holdout_split, kshot_split, kshot_split_report, parse_split, percent_split, read_split, unlabeled_complement,
)
from pseudobox.pipelines import split as split_stage


def make_samples(num_images=200, num_classes=5, seed=123):
    """Synthetic images with 1-3 random classes each; every class appears often."""
    rng = random.Random(seed)
    return [
        (f"img_{index:04d}", [rng.randrange(num_classes) for _ in range(rng.randint(1, 3))])
        for index in range(num_images)
    ]


def test_kshot_is_deterministic_sorted_and_order_independent():
    samples = make_samples()
    keys = kshot_split(samples, k=3, seed=7)
    assert keys == kshot_split(samples, k=3, seed=7)
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert keys == kshot_split(list(reversed(samples)), k=3, seed=7)


def test_kshot_different_seeds_give_different_subsets():
    samples = make_samples()
    subsets = {tuple(kshot_split(samples, k=3, seed=seed)) for seed in range(5)}
    assert len(subsets) > 1


def test_kshot_covers_every_class_with_at_least_k_images():
    samples = make_samples()
    for k in (1, 5, 10):
        keys = kshot_split(samples, k=k, seed=0)
        report = kshot_split_report(samples, keys)
        assert set(report) == set(range(5))
        assert all(count >= k for count in report.values()), report
        # Greedy per class: never more than k new images per class.
        assert len(keys) <= k * 5


def test_kshot_report_counts_images_per_class():
    samples = [("a", [0, 1]), ("b", [1]), ("c", [2, 2]), ("d", [])]
    assert kshot_split_report(samples, ["a", "c"]) == {0: 1, 1: 1, 2: 1}
    assert kshot_split_report(samples, []) == {0: 0, 1: 0, 2: 0}
    with pytest.raises(ValueError, match="zzz"):
        kshot_split_report(samples, ["zzz"])


def test_kshot_rare_class_takes_all_its_images_and_warns():
    samples = make_samples(num_classes=3) + [("rare_1", [9]), ("rare_2", [9, 0])]
    with pytest.warns(UserWarning, match="fewer than k"):
        keys = kshot_split(samples, k=4, seed=1)
    assert {"rare_1", "rare_2"} <= set(keys)
    report = kshot_split_report(samples, keys)
    assert report[9] == 2
    assert all(report[label] >= 4 for label in (0, 1, 2))


def test_kshot_rejects_bad_input():
    with pytest.raises(ValueError):
        kshot_split([("a", [0])], k=0)
    with pytest.raises(ValueError, match="duplicate"):
        kshot_split([("a", [0]), ("a", [1])], k=1)


def test_holdout_split_is_seeded_disjoint_and_complete():
    keys = [f"k{index}" for index in range(100)]
    train, test = holdout_split(keys, fraction=0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert set(train) | set(test) == set(keys) and not set(train) & set(test)
    assert (train, test) == holdout_split(list(reversed(keys)), fraction=0.2, seed=3)
    assert holdout_split(keys, fraction=0.2, seed=4)[1] != test
    assert holdout_split(keys, fraction=0.0, seed=3) == (sorted(keys), [])
    with pytest.raises(ValueError):
        holdout_split(keys, fraction=1.5, seed=3)


# ---------------------------------------------------------------- percent splits (COCO-standard style)


def test_percent_split_size_reproducible_and_order_independent():
    keys = [f"img_{i:05d}" for i in range(1234)]
    for percent, size in ((1, 12), (2, 25), (5, 62), (10, 123), (100, 1234), (0.01, 1)):
        labeled = percent_split(keys, percent, fold=1)
        assert len(labeled) == size and labeled == sorted(labeled) and set(labeled) <= set(keys)
    assert percent_split(keys, 10, fold=3) == percent_split(list(reversed(keys)), 10, fold=3)
    assert percent_split(keys, 10, fold=3) == percent_split(keys, 10.0, fold=3)
    for bad in (0, -1, 100.5):
        with pytest.raises(ValueError, match="percent"):
            percent_split(keys, bad)
    with pytest.raises(ValueError, match="unique"):
        percent_split(["a", "a"], 50)


def test_percent_folds_differ_and_ratios_nest_within_a_fold():
    keys = [f"img_{i:05d}" for i in range(1000)]
    folds = [set(percent_split(keys, 10, fold=f)) for f in range(1, 6)]
    assert len({frozenset(f) for f in folds}) == 5  # five different draws ...
    assert all(len(a & b) < 40 for a in folds for b in folds if a is not b)  # ... of ~10 % each, independent
    assert len(set().union(*folds)) > 300
    one, two, five, ten = (set(percent_split(keys, p, fold=2)) for p in (1, 2, 5, 10))
    assert one < two < five < ten


def test_unlabeled_is_the_complement_of_the_labeled_keys():
    keys = [f"img_{i:04d}" for i in range(200)]
    for fold in (1, 2):
        labeled = percent_split(keys, 5, fold)
        unlabeled = unlabeled_complement(keys, labeled)
        assert not set(labeled) & set(unlabeled) and set(labeled) | set(unlabeled) == set(keys)
        assert unlabeled == sorted(unlabeled) and len(unlabeled) == 190
    with pytest.raises(ValueError, match="not in the corpus"):
        unlabeled_complement(keys, ["elsewhere"])


# ---------------------------------------------------------------- split files


def test_old_kshot_files_still_parse_and_bad_files_are_refused():
    old = parse_split({"keys": ["b", "a"], "k": 5, "seed": 1})
    assert old.keys == ["b", "a"] and old.mode == "kshot" and old.unlabeled_keys is None
    assert old.params == {"k": 5, "seed": 1}
    assert old.unlabeled(["a", "b", "c"]) == ["c"] and old.unlabeled() is None
    new = parse_split({"keys": ["a"], "mode": "percent", "unlabeled_keys": ["b"], "percent": 1})
    assert new.unlabeled(["a", "b", "c"]) == ["b"]  # as recorded
    with pytest.raises(ValueError, match="'keys' list"):
        parse_split({"images": ["a"]})
    with pytest.raises(ValueError, match="both labeled and unlabeled"):
        parse_split({"keys": ["a", "b"], "unlabeled_keys": ["b"]})


def _cfg(**kw):
    return split_stage.SplitConfig(corpus="/c", output="/o.json", **kw)


SAMPLES = [(f"img_{i:03d}", [i % 3] if i % 10 else []) for i in range(100)]  # every 10th image has no box


def test_make_split_records_mode_params_keys_and_unlabeled_keys():
    all_keys = {key for key, _ in SAMPLES}
    pct = split_stage.make_split(_cfg(mode="percent", percent=10, fold=2), SAMPLES)
    assert pct["mode"] == "percent" and pct["percent"] == 10 and pct["fold"] == 2 and pct["seed"] == 2
    assert pct["keys"] == percent_split(sorted(all_keys), 10, 2) and len(pct["keys"]) == 10
    assert set(pct["unlabeled_keys"]) == all_keys - set(pct["keys"])

    kshot = split_stage.make_split(_cfg(mode="kshot", k=2, seed=4), SAMPLES)
    with_boxes = [s for s in SAMPLES if s[1]]
    assert kshot["keys"] == kshot_split(with_boxes, 2, 4) and kshot["k"] == 2 and kshot["seed"] == 4
    assert set(kshot["unlabeled_keys"]) == all_keys - set(kshot["keys"])  # images without boxes are unlabeled too

    b = [(f"voc12_{i}", [0]) for i in range(7)]
    sets = split_stage.make_split(_cfg(mode="sets", unlabeled_corpus="/b"), SAMPLES, unlabeled_samples=b)
    assert sets["keys"] == sorted(all_keys) and sets["unlabeled_corpus"] == "/b" and sets["unlabeled_images"] == 7
    assert "unlabeled_keys" not in sets  # the unlabeled images are another corpus
    within = split_stage.make_split(_cfg(mode="sets", labeled_keys="/a.json"), SAMPLES,
                                    labeled_keys=["img_001", "img_002"])
    assert within["keys"] == ["img_001", "img_002"] and len(within["unlabeled_keys"]) == 98
    with pytest.raises(ConfigError, match="not readable samples"):
        split_stage.make_split(_cfg(mode="sets", labeled_keys="/a.json"), SAMPLES, labeled_keys=["nope"])
    with pytest.raises(ConfigError, match="cover every image"):
        split_stage.make_split(_cfg(mode="sets", unlabeled_corpus="/c"), SAMPLES)


def test_split_config_validates_each_mode():
    req = ["corpus=/c", "output=/o.json"]
    assert load_config(split_stage.SplitConfig, overrides=req).mode == "kshot"  # the old behaviour by default
    with pytest.raises(ConfigError, match="mode must be one of"):
        load_config(split_stage.SplitConfig, overrides=req + ["mode=random"])
    with pytest.raises(ConfigError, match="percent must be in"):
        load_config(split_stage.SplitConfig, overrides=req + ["mode=percent", "percent=0"])
    with pytest.raises(ConfigError, match="mode=sets needs unlabeled_corpus"):
        load_config(split_stage.SplitConfig, overrides=req + ["mode=sets"])


def test_split_stage_writes_a_percent_split_of_a_corpus(tmp_path):
    from tests.conftest import make_corpus

    corpus = str(tmp_path / "corpus")
    make_corpus(corpus, num_images=20, size=32, samples_per_shard=10, style="detection", classes="downstream")
    out = str(tmp_path / "split.json")
    written = split_stage.run(split_stage.SplitConfig(corpus=corpus, output=out, mode="percent", percent=25, fold=1))
    f = read_split(out)
    assert f.mode == "percent" and f.keys == written["keys"] and len(f.keys) == 5
    assert len(f.unlabeled_keys) == 15 and not set(f.keys) & set(f.unlabeled_keys)
    assert split_stage.run(split_stage.SplitConfig(corpus=corpus, output=out, mode="percent", percent=25,
                                                   fold=1))["keys"] == f.keys

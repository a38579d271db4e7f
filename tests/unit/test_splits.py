"""Tests for pseudobox.datasets.splits (k-shot and holdout splits)."""

import random

import pytest

from pseudobox.datasets.splits import holdout_split, kshot_split, kshot_split_report


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

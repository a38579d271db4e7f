"""Seeded dataset splits: k-shot subsets for few-shot fine-tuning and holdout splits.

All functions are deterministic for a given seed and independent of the
order in which samples are given (keys are sorted before shuffling).
"""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict
from typing import Iterable, Sequence

Sample = tuple[str, Iterable[int]]


def _images_per_class(samples: Sequence[Sample]) -> dict[int, list[str]]:
    """Map each class to the sorted keys of the images containing it; keys must be unique."""
    seen_keys: set[str] = set()
    images_by_class: dict[int, list[str]] = defaultdict(list)
    for key, labels in samples:
        if key in seen_keys:
            raise ValueError(f"duplicate sample key {key!r}")
        seen_keys.add(key)
        for label in {int(label) for label in labels}:
            images_by_class[label].append(key)
    return {label: sorted(keys) for label, keys in sorted(images_by_class.items())}


def kshot_split(samples: Sequence[Sample], k: int, seed: int | str = 0) -> list[str]:
    """Sorted keys of a seeded k-shot subset in which every class has >= k images.

    ``samples`` are ``(key, labels)`` pairs, ``labels`` being the class indices
    of the image's boxes. Classes are visited in a seeded random order; for
    each, randomly chosen images containing it are added until the subset
    holds at least ``k`` images of that class. Images count for every class
    they contain, so earlier picks can already cover later classes (the
    image-counting convention of DAP/TFA-style k-shot splits). A class with
    fewer than ``k`` images contributes all of them and a warning is issued;
    use :func:`kshot_split_report` to get the per-class counts.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    images_by_class = _images_per_class(samples)
    rng = random.Random(seed)

    class_order = list(images_by_class)
    rng.shuffle(class_order)

    selected: set[str] = set()
    for label in class_order:
        candidates = images_by_class[label]
        have = sum(key in selected for key in candidates)
        unselected = [key for key in candidates if key not in selected]
        rng.shuffle(unselected)
        for key in unselected[: max(k - have, 0)]:
            selected.add(key)

    short = {
        label: len(keys) for label, keys in images_by_class.items() if len(keys) < k
    }
    if short:
        warnings.warn(
            f"kshot_split(k={k}): classes with fewer than k images, all taken "
            f"(class: images) {short}",
            stacklevel=2,
        )
    return sorted(selected)


def kshot_split_report(samples: Sequence[Sample], keys: Iterable[str]) -> dict[int, int]:
    """Number of images in ``keys`` containing each class seen in ``samples`` (0 included)."""
    images_by_class = _images_per_class(samples)
    subset = set(keys)
    known = {key for key, _ in samples}
    unknown = sorted(subset - known)
    if unknown:
        raise ValueError(f"keys not in samples: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return {
        label: sum(key in subset for key in class_keys)
        for label, class_keys in images_by_class.items()
    }


def holdout_split(
    keys: Iterable[str], fraction: float, seed: int | str
) -> tuple[list[str], list[str]]:
    """Seeded split into ``(train_keys, test_keys)``, both sorted.

    ``fraction`` is the share of keys held out for testing; the test set has
    ``round(fraction * len(keys))`` keys (halves round up).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    keys = list(keys)
    unique_keys = sorted(set(keys))
    if len(unique_keys) != len(keys):
        raise ValueError("holdout_split: keys must be unique")
    random.Random(seed).shuffle(unique_keys)
    num_test = math.floor(fraction * len(unique_keys) + 0.5)
    return sorted(unique_keys[num_test:]), sorted(unique_keys[:num_test])

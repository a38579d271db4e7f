"""Seeded dataset splits: k-shot subsets for few-shot fine-tuning, percent splits for
semi-supervised fine-tuning (COCO-standard style), holdout splits, and the split file
that later stages read (``read_split``).

All functions are deterministic for a given seed and independent of the
order in which samples are given (keys are sorted before shuffling).
"""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------- semi-supervised splits


def percent_split(keys: Iterable[str], percent: float, fold: int = 1) -> list[str]:
    """Sorted labeled keys of a COCO-standard style split: ``percent`` % of ``keys``.

    Fold ``f`` shuffles the sorted keys with seed ``f`` (the COCO-standard folds 1..5 are
    five such seeds) and takes the first ``round(percent / 100 * N)`` keys, at least one.
    Within a fold the splits are nested: the 1 % keys are among the 2 % keys, and so on,
    so results at several ratios differ only by the added labels. Deterministic for
    given keys, percent and fold, whatever the order of ``keys``.
    """
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    keys = list(keys)
    unique_keys = sorted(set(keys))
    if len(unique_keys) != len(keys):
        raise ValueError("percent_split: keys must be unique")
    if not unique_keys:
        return []
    random.Random(fold).shuffle(unique_keys)
    count = max(1, math.floor(percent / 100.0 * len(unique_keys) + 0.5))
    return sorted(unique_keys[:count])


def unlabeled_complement(all_keys: Iterable[str], labeled_keys: Iterable[str]) -> list[str]:
    """Sorted keys of ``all_keys`` that are not labeled: a split's unlabeled stream when
    labeled and unlabeled images come from one corpus. Every labeled key must be one of
    ``all_keys`` (a split of another corpus is refused)."""
    all_keys, labeled = set(all_keys), set(labeled_keys)
    unknown = sorted(labeled - all_keys)
    if unknown:
        raise ValueError(f"labeled keys not in the corpus: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return sorted(all_keys - labeled)


@dataclass
class SplitFile:
    """A split file as later stages read it.

    ``keys``: the labeled images. ``unlabeled_keys``: the unlabeled images when they come
    from the labeled corpus (``corpus`` minus ``keys``); None when the file does not list
    them (k-shot files before semi-supervised splits: ``{"keys": [...]}``) or when the
    unlabeled images are another corpus, ``unlabeled_corpus`` (VOC style ``sets``).
    """

    keys: list[str]
    mode: str = "kshot"
    corpus: str = ""
    unlabeled_keys: list[str] | None = None
    unlabeled_corpus: str = ""
    params: dict = field(default_factory=dict)

    def unlabeled(self, corpus_keys: Iterable[str] | None = None) -> list[str] | None:
        """The unlabeled keys of the labeled corpus: as recorded, else ``corpus_keys``
        minus the labeled keys (None when neither is known)."""
        if self.unlabeled_keys is not None:
            return list(self.unlabeled_keys)
        return None if corpus_keys is None else unlabeled_complement(corpus_keys, self.keys)


def parse_split(data: dict) -> SplitFile:
    """A split file's JSON → ``SplitFile``; any file with a ``keys`` list is valid."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("a split file is a JSON object with a 'keys' list (see `pseudobox split`)")
    unlabeled = data.get("unlabeled_keys")
    if unlabeled is not None and not isinstance(unlabeled, list):
        raise ValueError("a split file's 'unlabeled_keys' must be a list")
    overlap = set(data["keys"]) & set(unlabeled or [])
    if overlap:
        raise ValueError(f"a split file lists keys as both labeled and unlabeled: {sorted(overlap)[:5]}")
    known = ("keys", "mode", "corpus", "unlabeled_keys", "unlabeled_corpus")
    return SplitFile(keys=[str(k) for k in data["keys"]], mode=str(data.get("mode", "kshot")),
                     corpus=str(data.get("corpus", "")),
                     unlabeled_keys=None if unlabeled is None else [str(k) for k in unlabeled],
                     unlabeled_corpus=str(data.get("unlabeled_corpus", "")),
                     params={k: v for k, v in data.items() if k not in known})


def read_split(uri: str) -> SplitFile:
    """Read and check a split file (local path or s3://)."""
    from pseudobox import storage

    try:
        return parse_split(storage.read_json(uri))
    except ValueError as e:
        raise ValueError(f"split {uri}: {e}") from None

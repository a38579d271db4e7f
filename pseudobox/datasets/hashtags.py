"""Hashtag corpora: noisy, multi-label image-level labels from user tags.

Input is a JSONL file, one image per line, ``{"image": path or URI, "tags": [...]}``, and a
vocabulary (YAML or JSON) mapping each class to the hashtags that name it::

    dog: [dog, dogs, puppy, "#doggo"]
    cat: [cat, cats, kitten]

Tags and vocabulary entries are compared after ``normalize_tag``: Unicode NFKC, leading
``#`` removed, surrounding whitespace removed, inner runs of whitespace collapsed to one
space, case folded. Nothing else is done: plurals, misspellings and synonyms match only
when the vocabulary lists them (``dogs`` is not ``dog`` unless listed), so what a class
collects is exactly what its vocabulary entry says. Each class name also names itself.

``index_hashtags`` maps every line's tags to classes (an image gets every class one of its
tags names: multi-label), drops classes with fewer than ``min_images`` images, then drops
images left with no class, and returns the kept images with a report (per-class counts,
the share of tag occurrences that named no class, the classes and images dropped, the
malformed lines). It is plain Python so it can be tested without images;
``pipelines/build_corpus.py`` turns its result into shards.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import yaml

from pseudobox.config import ConfigError

TOP_UNMATCHED = 20  # most frequent unmatched tags kept in the report, to help extend a vocabulary
MALFORMED_EXAMPLES = 5


def normalize_tag(tag: str) -> str:
    """The form tags are compared in: NFKC, no leading ``#``, trimmed, single spaces, case-folded.

    ``"  #Dogs "`` → ``"dogs"``; ``"#Hot  Dog"`` → ``"hot dog"``. No stemming: plural and
    synonym forms match only through the vocabulary.
    """
    text = unicodedata.normalize("NFKC", tag).strip().lstrip("#").strip()
    return re.sub(r"\s+", " ", text).casefold()


@dataclass
class Vocabulary:
    """Class names in index order and the normalised hashtag → class index map."""

    classes: list[str]
    tag_to_class: dict[str, int]

    def class_of(self, tag: str) -> int | None:
        return self.tag_to_class.get(normalize_tag(tag))

    def hashtags(self, class_index: int) -> list[str]:
        """The normalised hashtags of one class, in vocabulary order."""
        return [t for t, c in self.tag_to_class.items() if c == class_index]

    @classmethod
    def from_mapping(cls, mapping, where: str = "vocabulary") -> "Vocabulary":
        """Build from ``{class: [hashtag, ...]}`` (a single string is one hashtag); raises
        ``ConfigError`` naming ``where`` for an empty vocabulary, a bad entry, or a hashtag
        that two classes claim."""
        if not isinstance(mapping, Mapping) or not mapping:
            raise ConfigError(f"{where}: expected a non-empty mapping of class name -> list of hashtags, "
                              f"got {type(mapping).__name__ if mapping else 'nothing'}")
        classes: list[str] = []
        tag_to_class: dict[str, int] = {}
        for name, tags in mapping.items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{where}: class names must be non-empty strings, got {name!r}")
            if tags is None:
                tags = []
            if isinstance(tags, str):
                tags = [tags]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ConfigError(f"{where}: {name}: expected a list of hashtag strings, got {tags!r}")
            index = len(classes)
            classes.append(name)
            for tag in [name, *tags]:  # a class name also names itself
                norm = normalize_tag(tag)
                if not norm:
                    raise ConfigError(f"{where}: {name}: hashtag {tag!r} is empty once normalised")
                other = tag_to_class.setdefault(norm, index)
                if other != index:
                    raise ConfigError(f"{where}: hashtag {norm!r} (from {tag!r}) is mapped to two classes: "
                                      f"{classes[other]!r} and {name!r}")
        return cls(classes, tag_to_class)

    def to_mapping(self) -> dict[str, list[str]]:
        return {name: self.hashtags(i) for i, name in enumerate(self.classes)}


def parse_vocabulary(text: str | bytes, where: str = "vocabulary") -> Vocabulary:
    """A vocabulary from YAML or JSON text (JSON is YAML)."""
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML/JSON: {e}") from e
    return Vocabulary.from_mapping(mapping, where)


def load_vocabulary(uri: str, where: str = "hashtags.vocabulary") -> Vocabulary:
    from pseudobox import storage

    return parse_vocabulary(storage.read_bytes(uri), f"{where} ({uri})")


def map_tags(tags: Iterable[str], vocab: Vocabulary) -> tuple[list[int], list[str]]:
    """``(sorted class indices named by the tags, tags that named no class)``."""
    classes: set[int] = set()
    unmatched: list[str] = []
    for tag in tags:
        index = vocab.class_of(tag)
        if index is None:
            unmatched.append(tag)
        else:
            classes.add(index)
    return sorted(classes), unmatched


def parse_line(line: str | bytes) -> tuple[str, list[str]]:
    """One JSONL line → ``(image, tags)``; raises ``ValueError("<kind>: detail")`` with kind
    ``invalid_json``, ``no_image`` or ``bad_tags``."""
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"invalid_json: {e}") from e
    if not isinstance(item, dict):
        raise ValueError(f"invalid_json: expected an object, got {type(item).__name__}")
    image = item.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"no_image: 'image' must be a non-empty string, got {image!r}")
    tags = item.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"bad_tags: 'tags' must be a list of strings, got {tags!r}")
    return image.strip(), tags


@dataclass
class TaggedImage:
    """One kept image: its JSONL line number (1-based), image path as written, raw tags,
    and class indices into the vocabulary."""

    line: int
    image: str
    tags: list[str]
    classes: list[int]


@dataclass
class HashtagIndex:
    """What ``index_hashtags`` keeps: the kept classes (vocabulary order), the kept images
    with class indices into ``kept_classes``, and the report."""

    kept_classes: list[str]
    images: list[TaggedImage]
    report: dict = field(default_factory=dict)


def index_hashtags(lines: Iterable[str | bytes], vocab: Vocabulary, min_images: int = 1) -> HashtagIndex:
    """Map each JSONL line's tags to classes, drop rare classes and then class-less images.

    Blank lines are ignored; malformed lines and repeated images (the first listing is
    kept) are skipped and counted. A class with fewer than ``min_images`` images is
    dropped; an image is then kept if it still has a class, so the kept classes' counts
    do not change by the image drop. The unmatched share counts tag *occurrences* (over
    the well-formed, non-repeated lines) that name no vocabulary class, dropped or not.
    """
    if min_images < 1:
        raise ConfigError(f"hashtags.min_images must be >= 1, got {min_images}")
    malformed: Counter = Counter()
    malformed_examples: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    listed: list[TaggedImage] = []
    total_tags = 0
    unmatched: Counter = Counter()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            image, tags = parse_line(line)
        except ValueError as e:
            kind = str(e).split(":", 1)[0]
            malformed[kind] += 1
            if len(malformed_examples) < MALFORMED_EXAMPLES:
                malformed_examples.append(f"line {number}: {str(e)[:200]}")
            continue
        if image in seen:
            duplicates += 1
            continue
        seen.add(image)
        classes, missed = map_tags(tags, vocab)
        total_tags += len(tags)
        unmatched.update(normalize_tag(t) for t in missed)
        listed.append(TaggedImage(number, image, tags, classes))

    per_class = Counter(c for item in listed for c in item.classes)
    kept = [i for i in range(len(vocab.classes)) if per_class[i] >= min_images]
    new_index = {old: new for new, old in enumerate(kept)}
    images, no_tag, only_dropped = [], 0, 0
    for item in listed:
        classes = [new_index[c] for c in item.classes if c in new_index]
        if classes:
            images.append(TaggedImage(item.line, item.image, item.tags, classes))
        elif item.classes:
            only_dropped += 1
        else:
            no_tag += 1
    unmatched_total = sum(unmatched.values())
    report = {
        "images_listed": len(listed),
        "images_kept": len(images),
        "images_dropped": no_tag + only_dropped,
        "images_dropped_by_reason": {"no_matching_tag": no_tag, "only_dropped_classes": only_dropped},
        "class_images": {vocab.classes[i]: per_class[i] for i in kept},
        "classes_dropped": {vocab.classes[i]: per_class[i] for i in range(len(vocab.classes)) if i not in new_index},
        "min_images": min_images,
        "tags": total_tags,
        "unmatched_tags": unmatched_total,
        "unmatched_share": unmatched_total / total_tags if total_tags else 0.0,
        "top_unmatched": [[t, n] for t, n in unmatched.most_common(TOP_UNMATCHED)],
        "malformed_lines": dict(sorted(malformed.items())),
        "malformed_examples": malformed_examples,
        "duplicate_lines": duplicates,
    }
    return HashtagIndex([vocab.classes[i] for i in kept], images, report)


def format_report(report: dict) -> str:
    """A few log lines: what was kept, what was dropped and why."""
    counts = ", ".join(f"{name}={n}" for name, n in report["class_images"].items())
    dropped = ", ".join(f"{name}={n}" for name, n in report["classes_dropped"].items()) or "none"
    by_reason = report["images_dropped_by_reason"]
    malformed = sum(report["malformed_lines"].values())
    return (f"hashtags: {report['images_kept']} of {report['images_listed']} images kept, "
            f"{len(report['class_images'])} classes; images per class: {counts}\n"
            f"hashtags: {report['unmatched_tags']} of {report['tags']} tags "
            f"({100 * report['unmatched_share']:.1f}%) matched no class; most frequent: "
            f"{', '.join(t for t, _ in report['top_unmatched'][:8]) or 'none'}\n"
            f"hashtags: classes dropped (< min_images={report['min_images']} images): {dropped}\n"
            f"hashtags: images dropped: {report['images_dropped']} (no matching tag: {by_reason['no_matching_tag']}, "
            f"only dropped classes: {by_reason['only_dropped_classes']}); malformed lines skipped: {malformed} "
            f"{report['malformed_lines'] or ''}; repeated images skipped: {report['duplicate_lines']}")

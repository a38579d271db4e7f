"""Hashtag corpora: tag normalisation, vocabulary mapping, class/image filtering and its
report, the ``build-corpus hashtags`` builder, and the synthetic tag-noise statistics."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pseudobox import storage
from pseudobox.config import ConfigError, load_config
from pseudobox.datasets import synthetic
from pseudobox.datasets.corpus import iter_corpus, iter_shard, load_manifest, shard_uris
from pseudobox.datasets.hashtags import (
    Vocabulary,
    index_hashtags,
    map_tags,
    normalize_tag,
    parse_vocabulary,
)
from pseudobox.pipelines.build_corpus import BuildCorpusConfig, HashtagsConfig, run
from pseudobox.storage import StorageError
from tests.conftest import make_corpus

VOCAB = {"dog": ["dogs", "puppy", "#Doggo"], "cat": ["cats", "Kitten"], "bird": ["birds"]}


@pytest.mark.parametrize("raw, norm", [
    ("#Dog", "dog"), ("  #dogs ", "dogs"), ("##PUPPY", "puppy"), ("#Hot  Dog", "hot dog"),
    ("Straße", "strasse"), ("ｄｏｇ", "dog"), ("# cat", "cat"), ("#", ""),
])
def test_normalize_tag(raw, norm):
    assert normalize_tag(raw) == norm


def test_mapping_uses_listed_plurals_and_synonyms_only():
    vocab = Vocabulary.from_mapping(VOCAB)
    assert vocab.classes == ["dog", "cat", "bird"]
    classes, unmatched = map_tags(["#DOG", " Puppy ", "doggo", "KITTEN", "dogz", "kittens", "birdie"], vocab)
    assert classes == [0, 1]  # dog (three ways) and cat; multi-label, sorted by class index
    assert unmatched == ["dogz", "kittens", "birdie"]  # no stemming beyond what the vocabulary lists
    assert map_tags(["Birds", "#cats"], vocab) == ([1, 2], [])
    assert vocab.hashtags(0) == ["dog", "dogs", "puppy", "doggo"]  # the class name names itself


@pytest.mark.parametrize("text, message", [
    ("{}", "non-empty mapping"),
    ("", "non-empty mapping"),
    ("[dog, cat]", "non-empty mapping"),
    ('{"dog": ["puppy"], "cat": ["#Puppy"]}', r"'puppy' \(from '#Puppy'\) is mapped to two classes: 'dog' and 'cat'"),
    ("dog: [dogs]\ncat: [dog]", "'dog' .* mapped to two classes"),
    ("dog: [dogs, 3]", "dog: expected a list of hashtag strings"),
    ("dog: ['#']", "dog: hashtag '#' is empty once normalised"),
    ("dog: [unclosed", "not valid YAML/JSON"),
])
def test_vocabulary_errors_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_vocabulary(text, "hashtags.vocabulary")


def test_vocabulary_json_and_yaml_agree():
    from_json = parse_vocabulary(json.dumps(VOCAB))
    from_yaml = parse_vocabulary("dog: [dogs, puppy, '#Doggo']\ncat: [cats, Kitten]\nbird: birds\n")
    assert from_json == from_yaml


def lines_for_report() -> list[str]:
    rows = [
        {"image": "a.jpg", "tags": ["#dog", "#cute", "cats"]},       # dog+cat, one unmatched
        {"image": "b.jpg", "tags": ["Puppy", "#love"]},              # dog
        {"image": "c.jpg", "tags": ["bird", "sunset"]},              # bird only; bird has 1 image < 2 → dropped
        {"image": "d.jpg", "tags": ["#nofilter"]},                   # nothing matches
        {"image": "e.jpg", "tags": ["kitten", "dogs"]},              # dog+cat
        {"image": "a.jpg", "tags": ["dog"]},                         # repeated image: skipped
        {"image": "f.jpg", "tags": []},                              # no tag at all
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")                                     # malformed: invalid_json
    lines.insert(5, json.dumps({"tags": ["dog"]}))                   # malformed: no_image
    lines.insert(6, json.dumps({"image": "g.jpg", "tags": "dog"}))   # malformed: bad_tags
    lines.insert(7, "   ")                                           # blank: ignored
    return lines


def test_index_filters_classes_then_images_and_reports():
    vocab = Vocabulary.from_mapping(VOCAB)
    index = index_hashtags(lines_for_report(), vocab, min_images=2)
    assert index.kept_classes == ["dog", "cat"]
    assert [(i.image, i.classes) for i in index.images] == [("a.jpg", [0, 1]), ("b.jpg", [0]), ("e.jpg", [0, 1])]
    assert index.images[0].tags == ["#dog", "#cute", "cats"] and index.images[0].line == 1  # raw tags kept
    r = index.report
    assert r["class_images"] == {"dog": 3, "cat": 2}
    assert r["classes_dropped"] == {"bird": 1}
    assert r["images_listed"] == 6 and r["images_kept"] == 3 and r["images_dropped"] == 3
    assert r["images_dropped_by_reason"] == {"no_matching_tag": 2, "only_dropped_classes": 1}
    # 10 tag occurrences on the 6 listed images; cute, love, sunset, nofilter match nothing
    assert r["tags"] == 10 and r["unmatched_tags"] == 4 and r["unmatched_share"] == pytest.approx(0.4)
    assert {t for t, _ in r["top_unmatched"]} == {"cute", "love", "sunset", "nofilter"}
    assert r["malformed_lines"] == {"bad_tags": 1, "invalid_json": 1, "no_image": 1}
    assert r["malformed_examples"][0].startswith("line 4: invalid_json")
    assert r["duplicate_lines"] == 1

    everything = index_hashtags(lines_for_report(), vocab, min_images=1)
    assert everything.kept_classes == ["dog", "cat", "bird"] and everything.report["classes_dropped"] == {}
    assert everything.report["images_dropped_by_reason"] == {"no_matching_tag": 2, "only_dropped_classes": 0}


# ---------------------------------------------------------------- the builder

def hashtag_config(tmp_path, jsonl, vocabulary, **kw) -> BuildCorpusConfig:
    cfg = BuildCorpusConfig(builder="hashtags", output=str(kw.pop("output", tmp_path / "corpus")),
                            parallel="none", samples_per_shard=kw.pop("samples_per_shard", 3),
                            hashtags=HashtagsConfig(jsonl=str(jsonl), vocabulary=str(vocabulary),
                                                    min_images=kw.pop("min_images", 1)), **kw)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("overrides, message", [
    ([], "builder=hashtags needs hashtags.jsonl"),
    (["hashtags.jsonl=t.jsonl"], "builder=hashtags needs hashtags.vocabulary"),
    (["hashtags.jsonl=t.jsonl", "hashtags.vocabulary=v.yaml", "hashtags.min_images=0"], "hashtags.min_images must be >= 1"),
])
def test_config_validation(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BuildCorpusConfig, None, ["builder=hashtags", f"output={tmp_path}/o", *overrides])
    with pytest.raises(ConfigError, match="hashtags.* is only read by builder=hashtags"):
        load_config(BuildCorpusConfig, None, ["builder=imagefolder", f"source={tmp_path}", f"output={tmp_path}/o",
                                              "hashtags.min_images=5"])


def test_bad_inputs_fail_before_any_work(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "x.jpg", "tags": ["dog"]}) + "\n")
    (tmp_path / "clash.yaml").write_text("dog: [puppy]\ncat: [puppy]\n")
    (tmp_path / "rare.yaml").write_text("cat: [cats]\n")
    with pytest.raises(StorageError, match="hashtags.vocabulary: .*missing.yaml does not exist"):
        run(hashtag_config(tmp_path, tmp_path / "t.jsonl", tmp_path / "missing.yaml"))
    with pytest.raises(StorageError, match="hashtags.jsonl: .*nope.jsonl does not exist"):
        run(hashtag_config(tmp_path, tmp_path / "nope.jsonl", tmp_path / "clash.yaml"))
    with pytest.raises(ConfigError, match=r"hashtags.vocabulary \(.*clash.yaml\): hashtag 'puppy' .* two classes"):
        run(hashtag_config(tmp_path, tmp_path / "t.jsonl", tmp_path / "clash.yaml"))
    with pytest.raises(ConfigError, match="builder=hashtags: no image is left"):
        run(hashtag_config(tmp_path, tmp_path / "t.jsonl", tmp_path / "rare.yaml"))
    assert not (tmp_path / "corpus").exists()


def test_build_from_a_synthetic_hashtag_dataset(tmp_path, caplog):
    rates = synthetic.TagNoise(missing=0.2, spurious=0.05, synonym=0.5, junk=1.0)
    data = synthetic.write_hashtag_dataset(str(tmp_path / "data"), 8, rates, seed=3, image_size=40)
    # One absolute path, one missing file, one file that is not an image, one broken line.
    (tmp_path / "data" / "broken.jpg").write_bytes(b"not an image")
    extra = [{"image": os.path.join(str(tmp_path / "data"), data.images[0]), "tags": ["#disc"]},
             {"image": "images/gone.jpg", "tags": ["disc"]},
             {"image": "broken.jpg", "tags": ["Discs"]}]
    with open(data.jsonl, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in extra) + '{"image": \n')

    caplog.set_level("INFO", logger="pseudobox")
    manifest = run(hashtag_config(tmp_path, data.jsonl, data.vocabulary))
    assert manifest.multi_label and manifest.kind == "classification"
    report = manifest.extra["hashtags"]
    assert report["malformed_lines"] == {"invalid_json": 1}
    assert manifest.extra["skipped"] == {"missing_file": 1, "unreadable": 1}
    assert "matched no class" in caplog.text and "classes dropped" in caplog.text

    # What the index kept is exactly what the shards hold, labels by name, raw tags kept.
    vocab = Vocabulary.from_mapping(synthetic.hashtag_vocabulary(data.classes))
    expected = {}
    for line, image in enumerate(data.images + [e["image"] for e in extra[:1]], start=1):
        tags = data.noise[line - 1].tags if line <= len(data.images) else extra[0]["tags"]
        names = [vocab.classes[c] for c in map_tags(tags, vocab)[0]]
        if names:
            expected[line] = (names, tags)
    assert manifest.classes == [c for c in data.classes if c in report["class_images"]]
    assert sum(report["class_images"].values()) == sum(len(n) for n, _ in expected.values()) + 2  # + gone, broken
    assert manifest.num_samples == len(expected)
    samples = list(iter_corpus(str(tmp_path / "corpus")))
    assert len(samples) == len(expected)
    for sample in samples:
        names, tags = expected[int(sample["key"].split("_")[0])]
        assert [manifest.classes[i] for i in sample["labels"]] == names and sample["tags"] == tags
    raw = json.loads(next(iter_shard(shard_uris(str(tmp_path / "corpus"))[0]))["meta"])
    assert set(raw) == {"labels", "tags"} and all(isinstance(x, str) for x in raw["labels"])

    # The same command again finds every shard written and changes nothing.
    again = run(hashtag_config(tmp_path, data.jsonl, data.vocabulary))
    assert again.to_json() == manifest.to_json()


@pytest.mark.integration
def test_build_reads_jsonl_vocabulary_and_images_from_s3(s3_bucket, tmp_path):
    data = synthetic.write_hashtag_dataset(f"{s3_bucket}/data", 3, synthetic.TagNoise(0, 0, 0, 0), seed=1,
                                           image_size=32)
    manifest = run(hashtag_config(tmp_path, data.jsonl, data.vocabulary, output=f"{s3_bucket}/corpus"))
    assert manifest.num_samples == 3 and load_manifest(f"{s3_bucket}/corpus").multi_label
    truth = [[data.classes[c] for c in labels] for labels in data.labels]
    got = [[manifest.classes[i] for i in s["labels"]] for s in iter_corpus(f"{s3_bucket}/corpus")]
    assert got == truth


# ---------------------------------------------------------------- tag noise

def measured_rates(truth: list[list[int]], tags: list[list[str]], vocab: Vocabulary) -> dict:
    """Missing/spurious/synonym rates and junk per image, measured by mapping the tags back."""
    canonical = {c: normalize_tag(name) for c, name in enumerate(vocab.classes)}
    present_slots = absent_slots = missing = spurious = tagged = synonym_only = junk = 0
    for present, image_tags in zip(truth, tags):
        named: dict[int, set[str]] = {}
        for tag in image_tags:
            c = vocab.class_of(tag)
            if c is None:
                junk += 1
            else:
                named.setdefault(c, set()).add(normalize_tag(tag))
        present_slots += len(present)
        absent_slots += len(vocab.classes) - len(present)
        missing += sum(c not in named for c in present)
        spurious += sum(c not in present for c in named)
        for c in present:
            if c in named:
                tagged += 1
                synonym_only += canonical[c] not in named[c]
    return {"missing": missing / present_slots, "spurious": spurious / absent_slots,
            "synonym": synonym_only / tagged, "junk": junk / len(truth)}


def test_noise_statistics_match_the_set_rates():
    rates = synthetic.TagNoise(missing=0.25, spurious=0.05, synonym=0.4, junk=1.5)
    classes = synthetic.class_names("pretrain")
    vocab = Vocabulary.from_mapping(synthetic.hashtag_vocabulary(classes))
    forms = list(synthetic.hashtag_vocabulary(classes).values())
    rng = np.random.default_rng(7)
    truth = [sorted(rng.choice(len(classes), size=int(rng.integers(1, 4)), replace=False).tolist())
             for _ in range(600)]
    records = [synthetic.noisy_tags(rng, present, forms, rates) for present in truth]
    got = measured_rates(truth, [r.tags for r in records], vocab)
    # ~1200 present slots, ~8400 absent ones: tolerances are about 4 standard errors
    assert got["missing"] == pytest.approx(0.25, abs=0.05)
    assert got["spurious"] == pytest.approx(0.05, abs=0.01)
    assert got["synonym"] == pytest.approx(0.4, abs=0.06)
    assert got["junk"] == pytest.approx(1.5, abs=0.2)
    # What the generator says it did is what the tags show.
    n_missing = sum(len(r.missing) for r in records)
    assert n_missing / sum(map(len, truth)) == pytest.approx(got["missing"])
    assert sum(len(r.synonym) for r in records) / (sum(map(len, truth)) - n_missing) == pytest.approx(got["synonym"])
    # The junk words and every decorated spelling stay apart from the vocabulary.
    assert all(vocab.class_of(word) is None for word in synthetic.JUNK_TAGS)
    assert any(t.startswith("#") for r in records for t in r.tags) and any(t[:1].isupper() for r in records
                                                                          for t in r.tags)

    clean = [synthetic.noisy_tags(rng, p, forms, synthetic.TagNoise(0, 0, 0, 0)) for p in truth[:50]]
    assert [map_tags(r.tags, vocab) for r in clean] == [(p, []) for p in truth[:50]]


def test_hashtag_scenes_hold_different_classes():
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, boxes, labels = synthetic.hashtag_sample(rng, "pretrain", (48, 48), 2, 3, background="flat")
        assert image.shape == (48, 48, 3) and len(boxes) == len(labels) >= 1
        assert len(set(labels.tolist())) == len(labels)


def test_hashtag_view_of_an_existing_corpus(tmp_path):
    corpus = str(tmp_path / "det")
    make_corpus(corpus, num_images=5, size=40, samples_per_shard=5, style="detection", classes="downstream")
    originals = {r["key"]: r for r in iter_shard(shard_uris(corpus)[0])}
    exact = synthetic.TagNoise(missing=0, spurious=0, synonym=0, junk=0)
    view = synthetic.hashtag_view(corpus, str(tmp_path / "view"), exact, seed=0)
    assert view.classes == synthetic.class_names("downstream")
    for image, labels in zip(view.images, view.labels):
        key = os.path.splitext(os.path.basename(image))[0]
        meta = json.loads(originals[key]["meta"])
        assert labels == sorted(set(meta["box_labels"]))  # truth from the boxes
        assert storage.read_bytes(str(tmp_path / "view" / image)) == originals[key]["image"]  # same bytes
    manifest = run(hashtag_config(tmp_path, view.jsonl, view.vocabulary))
    got = {s["key"].split("_", 1)[1]: sorted(manifest.classes[i] for i in s["labels"])
           for s in iter_corpus(str(tmp_path / "corpus"))}
    assert got == {os.path.splitext(os.path.basename(i))[0]: sorted(view.classes[c] for c in labels)
                   for i, labels in zip(view.images, view.labels)}

    noisy = synthetic.hashtag_view(corpus, str(tmp_path / "noisy"), synthetic.TagNoise(missing=1.0, junk=0), seed=0)
    assert all(r.missing == labels for r, labels in zip(noisy.noise, noisy.labels))

"""Unit tests for the corpus format (pseudobox.datasets.corpus) and the plain decode stage."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from pseudobox import storage
from pseudobox.datasets.corpus import (
    MANIFEST_NAME, CorpusError, CorpusWriter, decode_sample, encode_image, iter_corpus, iter_shard, load_manifest,
    parse_meta, shard_uris, write_shard,
)
from pseudobox.datasets.ray_io import PLACEHOLDER_IMAGE, count_errors, decode_batch

CLASSES = ["cat", "dog", "car"]


def image(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def sample_meta(i: int) -> dict:
    meta = {"labels": [i % 3]}
    if i % 2 == 0:
        meta["boxes"] = [[1.0 + i, 2.0, 10.0 + i, 20.0]]
        meta["box_labels"] = [i % 3]
    return meta


def write_corpus(uri: str, n: int = 7, per_shard: int = 3, fmt: str = "png") -> dict:
    """Writes ``n`` samples; returns ``{key: (image, meta)}``. PNG keeps pixels exact."""
    w = CorpusWriter(uri, CLASSES, samples_per_shard=per_shard, kind="detection", extra={"src": "test"})
    expected = {}
    for i in range(n):
        im, meta = image(i), sample_meta(i)
        w.add(f"img{i:03d}", encode_image(im, fmt=fmt), meta, ext=fmt)
        expected[f"img{i:03d}"] = (im, meta)
    w.close()
    return expected


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def write_manifest(uri: str, shards: list[tuple[str, int]], classes=CLASSES, **fields) -> None:
    doc = {"classes": classes, "shards": [{"name": n, "num_samples": k} for n, k in shards],
           "kind": "classification", "multi_label": False, "has_boxes": False, "schema_version": 1, "extra": {}}
    doc.update(fields)
    storage.write_json(storage.join(uri, MANIFEST_NAME), doc)


def jpg(seed: int = 0) -> bytes:
    return encode_image(image(seed), fmt="jpg")


def meta_bytes(labels) -> bytes:
    return json.dumps({"labels": labels}).encode()


# ---------------------------------------------------------------- writer / reader round trip

def test_writer_round_trip(tmp_path):
    uri = str(tmp_path / "corpus")
    expected = write_corpus(uri, n=7, per_shard=3)
    manifest = load_manifest(uri)
    assert manifest.classes == CLASSES
    assert [(s.name, s.num_samples) for s in manifest.shards] == [
        ("shard-000000.tar", 3), ("shard-000001.tar", 3), ("shard-000002.tar", 1)]
    assert manifest.num_samples == 7
    assert manifest.kind == "detection" and manifest.has_boxes and manifest.extra == {"src": "test"}
    assert sorted(storage.listdir(uri)) == [MANIFEST_NAME, "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert storage.read_json(storage.join(uri, MANIFEST_NAME))["num_samples"] == 7

    errors: dict = {}
    samples = list(iter_corpus(uri, errors=errors))
    assert errors == {}
    assert [s["key"] for s in samples] == sorted(expected)
    for s in samples:
        im, meta = expected[s["key"]]
        assert np.array_equal(s["image"], im)
        assert s["labels"] == meta["labels"]
        if "boxes" in meta:
            np.testing.assert_array_equal(s["boxes"], np.asarray(meta["boxes"], np.float32))
            assert s["boxes"].dtype == np.float32
            assert s["box_labels"].tolist() == meta["box_labels"]
        else:
            assert "boxes" not in s
    assert {s["shard"] for s in samples} == {"shard-000000.tar", "shard-000001.tar", "shard-000002.tar"}


def test_shard_members_image_then_json_and_reproducible(tmp_path):
    # webdataset's TarWriter sorts a sample's members by extension (json < png); the
    # writer keeps image-then-json for every key, and equal samples give equal bytes.
    samples = [("b", encode_image(image(1), fmt="png"), "png", {"labels": [0]}),
               ("a", jpg(2), "jpg", {"labels": [1]})]
    write_shard(str(tmp_path / "one.tar"), samples)
    write_shard(str(tmp_path / "two.tar"), samples)
    with tarfile.open(tmp_path / "one.tar") as tar:
        assert tar.getnames() == ["b.png", "b.json", "a.jpg", "a.json"]
        assert {m.mtime for m in tar.getmembers()} == {0}
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert [r["key"] for r in iter_shard(str(tmp_path / "one.tar"))] == ["b", "a"]


def test_labels_by_name_and_boxes_clipped(tmp_path):
    uri = str(tmp_path / "c")
    w = CorpusWriter(uri, CLASSES)
    w.add("a", jpg(), {"labels": ["dog", 2], "tags": ["t"], "boxes": [[-5, -5, 100, 10]], "box_labels": ["car"]})
    w.close()
    (s,) = list(iter_corpus(uri))
    assert s["labels"] == [1, 2] and s["tags"] == ["t"]
    np.testing.assert_array_equal(s["boxes"], [[0, 0, 32, 10]])  # image is 24x32
    assert s["box_labels"].tolist() == [2]


def test_manifest_written_last_and_no_shard_when_empty(tmp_path):
    uri = str(tmp_path / "c")
    w = CorpusWriter(uri, CLASSES, samples_per_shard=2)
    w.add("a", jpg(), {"labels": [0]})
    w.add("b", jpg(), {"labels": [1]})  # fills a shard: flushed now
    assert storage.listdir(uri) == ["shard-000000.tar"]
    with pytest.raises(CorpusError, match="corpus.json is missing"):
        load_manifest(uri)
    manifest = w.close()
    assert [s.num_samples for s in manifest.shards] == [2]
    assert MANIFEST_NAME in storage.listdir(uri)


def test_writer_rejects_bad_keys(tmp_path):
    w = CorpusWriter(str(tmp_path / "c"), CLASSES)
    w.add("a", jpg(), {"labels": [0]})
    with pytest.raises(ValueError, match="duplicate"):
        w.add("a", jpg(), {"labels": [0]})
    with pytest.raises(ValueError, match="may not contain"):
        w.add("a.b", jpg(), {"labels": [0]})
    with pytest.raises(ValueError, match="may not contain"):
        w.add("x/y", jpg(), {"labels": [0]})
    with pytest.raises(ValueError):
        CorpusWriter(str(tmp_path / "d"), CLASSES, samples_per_shard=0)


def test_keys_filter(tmp_path):
    uri = str(tmp_path / "c")
    write_corpus(uri, n=7, per_shard=3)
    got = [s["key"] for s in iter_corpus(uri, keys={"img001", "img005", "zzz"})]
    assert got == ["img001", "img005"]


def test_corpus_on_s3(s3_bucket):
    uri = storage.join(s3_bucket, "corpus")
    expected = write_corpus(uri, n=2, per_shard=2)
    samples = list(iter_corpus(uri))
    assert [s["key"] for s in samples] == sorted(expected)
    assert np.array_equal(samples[1]["image"], expected["img001"][0])
    assert samples[0]["boxes"].tolist() == expected["img000"][1]["boxes"]


# ---------------------------------------------------------------- manifest errors

def test_schema_version_mismatch(tmp_path):
    uri = str(tmp_path / "c")
    write_manifest(uri, [], schema_version=2)
    with pytest.raises(CorpusError, match="schema_version 2 is not supported"):
        load_manifest(uri)


def test_manifest_without_classes(tmp_path):
    uri = str(tmp_path / "c")
    write_manifest(uri, [], classes=[])
    with pytest.raises(CorpusError, match="classes"):
        load_manifest(uri)


def test_not_a_corpus(tmp_path):
    with pytest.raises(CorpusError, match="not a corpus"):
        list(iter_corpus(str(tmp_path)))


# ---------------------------------------------------------------- bad samples

def test_bad_samples_skipped_and_counted_by_kind(tmp_path):
    uri = str(tmp_path / "c")
    storage.makedirs(uri)
    write_tar(f"{uri}/bad.tar", [
        ("good1.jpg", jpg(1)), ("good1.json", meta_bytes([0])),
        ("corrupt.jpg", b"\xff\xd8 this is not a jpeg"), ("corrupt.json", meta_bytes([0])),
        ("nojson.jpg", jpg(2)),
        ("badjson.jpg", jpg(3)), ("badjson.json", b"{labels: [0"),
        ("nolabels.jpg", jpg(3)), ("nolabels.json", b'{"tags": []}'),
        ("badindex.jpg", jpg(4)), ("badindex.json", meta_bytes([7])),
        ("badname.jpg", jpg(5)), ("badname.json", meta_bytes(["unicorn"])),
        ("noimage.json", meta_bytes([1])),
        ("badboxes.jpg", jpg(6)), ("badboxes.json", json.dumps({"labels": [0], "boxes": [[1, 2, 3]], "box_labels": [0]}).encode()),
        ("good2.jpg", jpg(7)), ("good2.json", meta_bytes([1, 2])),
    ])
    write_tar(f"{uri}/ok.tar", [("good3.png", encode_image(image(8), fmt="png")), ("good3.json", meta_bytes(["car"]))])
    write_manifest(uri, [("bad.tar", 10), ("ok.tar", 1)])
    errors: dict = {}
    samples = list(iter_corpus(uri, errors=errors))
    assert [s["key"] for s in samples] == ["good1", "good2", "good3"]
    assert [s["labels"] for s in samples] == [[0], [1, 2], [2]]
    assert errors == {"bad.tar": {"corrupt_image": 1, "missing_json": 1, "invalid_json": 3,
                                  "unknown_class": 2, "missing_image": 1}}


def _corpus_with_cut_shard(tmp_path, n: int, cut_at) -> tuple[list[str], dict]:
    """Write an n-sample one-shard corpus, cut its tar at ``cut_at(members, data)``, and
    read it back: returns the keys read and the error counts."""
    uri = str(tmp_path / "c")
    write_corpus(uri, n=n, per_shard=n, fmt="jpg")
    shard = f"{uri}/shard-000000.tar"
    data = open(shard, "rb").read()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    with open(shard, "wb") as f:
        f.write(data[:cut_at(members, data)])
    errors: dict = {}
    keys = [s["key"] for s in iter_corpus(uri, errors=errors)]
    return keys, errors


def test_truncated_tar_keeps_earlier_samples(tmp_path):
    def about_half(members, data):
        # Inside img003.jpg's data (a cut exactly at a header is tested below).
        assert members[6].name == "img003.jpg"
        cut = members[6].offset_data + members[6].size // 2
        assert abs(cut - len(data) // 2) < len(data) // 4
        return cut

    keys, errors = _corpus_with_cut_shard(tmp_path, 6, about_half)
    assert keys == ["img000", "img001", "img002"]
    assert errors == {"shard-000000.tar": {"truncated_shard": 1}}


def test_truncated_tar_inside_json_member(tmp_path):
    def inside_json(members, data):
        assert members[3].name == "img001.json"
        return members[3].offset_data + 3

    keys, errors = _corpus_with_cut_shard(tmp_path, 4, inside_json)
    assert keys == ["img000"]
    # img001 had its image but lost its json; the shard break is recorded too.
    assert errors == {"shard-000000.tar": {"missing_json": 1, "truncated_shard": 1}}


def test_tar_truncated_at_member_boundary_is_reported(tmp_path):
    # Cut right before img002's header: img000 and img001 stay whole.
    keys, errors = _corpus_with_cut_shard(tmp_path, 6, lambda members, data: members[4].offset)
    assert keys == ["img000", "img001"]
    assert errors.get("shard-000000.tar", {}).get("truncated_shard") == 1


@pytest.mark.parametrize("meta", [{"labels": [0], "tags": 5},
                                  {"labels": [0], "boxes": [[0, 0, 4, 4]], "box_labels": 3}])
def test_malformed_meta_fields_are_invalid_json(meta):
    with pytest.raises(ValueError, match="^invalid_json"):
        parse_meta(json.dumps(meta).encode(), CLASSES, (24, 32))


def test_parse_meta_error_kinds():
    def kind(meta):
        with pytest.raises(ValueError) as e:
            parse_meta(meta, CLASSES, (24, 32))
        return str(e.value).split(":", 1)[0]

    assert kind(None) == "missing_json"
    assert kind(b"\xff\xfe") == "invalid_json"
    assert kind(b"[1, 2]") == "invalid_json"
    assert kind(b'{"labels": 1}') == "invalid_json"
    assert kind(b'{"labels": [true]}') == "unknown_class"
    assert kind(b'{"labels": [-1]}') == "unknown_class"
    assert kind(b'{"labels": [0], "boxes": [[0, 0, 1, 1]]}') == "invalid_json"  # no box_labels
    assert kind(b'{"labels": [0], "boxes": [[0, 0, 1, 1]], "box_labels": [9]}') == "unknown_class"


def test_area_is_parsed_with_box_size_fallback():
    meta = {"labels": [0], "boxes": [[0, 0, 10, 10], [2, 2, 40, 6], [1, 1, 3, 4]], "box_labels": [0, 1, 2]}
    # No "area" (corpora written before it): the clipped box's w·h (x2 40 clips to 32).
    out = parse_meta(json.dumps(meta).encode(), CLASSES, (24, 32))
    assert out["area"].dtype == np.float32 and out["area"].tolist() == [100.0, 120.0, 6.0]
    out = parse_meta(json.dumps({**meta, "area": [50.5, None, 0]}).encode(), CLASSES, (24, 32))
    assert out["area"].tolist() == [50.5, 120.0, 0.0]


@pytest.mark.parametrize("area", [5, [1.0], [1, 2, "3"], [1, 2, -3], [1, 2, True]])
def test_malformed_area_is_invalid_json(area):
    meta = {"labels": [0], "boxes": [[0, 0, 10, 10], [2, 2, 4, 6], [1, 1, 3, 4]], "box_labels": [0, 1, 2],
            "area": area}
    with pytest.raises(ValueError, match="^invalid_json: 'area'"):
        parse_meta(json.dumps(meta).encode(), CLASSES, (24, 32))


def test_area_round_trips_and_old_corpora_fall_back(tmp_path):
    old = write_corpus(str(tmp_path / "old"), n=3)  # no "area" in the samples
    for s in iter_corpus(str(tmp_path / "old")):
        meta = old[s["key"]][1]
        if "boxes" in meta:
            ((x1, y1, x2, y2),) = meta["boxes"]
            assert s["area"].tolist() == [(x2 - x1) * (y2 - y1)]
        else:
            assert "area" not in s
    w = CorpusWriter(str(tmp_path / "new"), CLASSES, kind="detection")
    w.add("a", encode_image(image(0), fmt="png"),
          {"labels": [0], "boxes": [[1, 1, 30, 20], [2, 2, 4, 4]], "box_labels": [0, 1], "area": [123.25, None]},
          ext="png")
    w.close()
    (s,) = iter_corpus(str(tmp_path / "new"))
    assert s["area"].tolist() == [123.25, 4.0]


def test_decode_sample_reports_raw_error():
    with pytest.raises(ValueError, match="^truncated_shard"):
        decode_sample({"key": "k", "shard": "s", "image": None, "meta": None, "error": "truncated_shard: x"}, CLASSES)


# ---------------------------------------------------------------- decode_batch / count_errors

def raw_batch(rows: list[dict]) -> dict:
    """Raw rows as a numpy batch, the way Ray Data hands them to ``decode_batch``."""
    out = {}
    for name in ("key", "shard", "image", "image_ext", "meta", "error"):
        arr = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            arr[i] = r[name]
        out[name] = arr
    return out


@pytest.fixture
def mixed_rows(tmp_path):
    uri = str(tmp_path / "c")
    storage.makedirs(uri)
    write_tar(f"{uri}/s.tar", [
        ("a.jpg", jpg(1)), ("a.json", json.dumps({"labels": [1], "boxes": [[1, 1, 5, 6]], "box_labels": [1]}).encode()),
        ("b.jpg", b"garbage"), ("b.json", meta_bytes([0])),
        ("c.jpg", jpg(2)), ("c.json", meta_bytes([0, 2])),
        ("d.jpg", jpg(3)), ("d.json", meta_bytes(["unicorn"])),
    ])
    return list(iter_shard(f"{uri}/s.tar"))


def test_decode_batch_keeps_error_rows(mixed_rows):
    out = decode_batch(raw_batch(mixed_rows), CLASSES, keep_errors=True)
    assert list(out["key"]) == ["a", "b", "c", "d"]
    assert [e.split(":")[0] for e in out["error"]] == ["", "corrupt_image", "", "unknown_class"]
    assert out["image"][0].shape == (24, 32, 3) and out["image"][0].dtype == np.uint8
    assert out["image"][1] is PLACEHOLDER_IMAGE and out["image"][3].shape == (1, 1, 3)
    assert out["labels"][0].tolist() == [1] and out["labels"][2].tolist() == [0, 2]
    assert out["labels"][1].shape == (0,)
    np.testing.assert_array_equal(out["boxes"][0], [[1, 1, 5, 6]])
    assert out["boxes"][2].shape == (0, 4) and out["box_labels"][2].shape == (0,)
    assert out["box_labels"][0].tolist() == [1]
    assert set(out["shard"]) == {"s.tar"}


def test_decode_batch_drops_error_rows(mixed_rows):
    out = decode_batch(raw_batch(mixed_rows), CLASSES, keep_errors=False)
    assert list(out["key"]) == ["a", "c"]
    assert list(out["error"]) == ["", ""]
    assert all(len(v) == 2 for v in out.values())


def test_decode_batch_keys_filter_keeps_error_rows(mixed_rows):
    rows = mixed_rows + [{"key": "__s.tar__truncated", "shard": "s.tar", "image": None, "image_ext": "",
                          "meta": None, "error": "truncated_shard: EOF"}]
    out = decode_batch(raw_batch(rows), CLASSES, keep_errors=True, keys={"c", "b"})
    assert list(out["key"]) == ["b", "c", "__s.tar__truncated"]
    assert out["error"][2].startswith("truncated_shard")


def test_decode_batch_empty():
    out = decode_batch(raw_batch([]), CLASSES)
    assert all(len(v) == 0 for v in out.values())


def test_count_errors(mixed_rows):
    out = decode_batch(raw_batch(mixed_rows), CLASSES, keep_errors=True)
    report = {"s.tar": {"corrupt_image": 2}}
    count_errors(out["error"], out["shard"], report)
    count_errors(np.asarray(["", "missing_json: x", "corrupt_image: y"], dtype=object),
                 np.asarray(["t.tar", "t.tar", "t.tar"], dtype=object), report)
    assert report == {"s.tar": {"corrupt_image": 3, "unknown_class": 1},
                      "t.tar": {"missing_json": 1, "corrupt_image": 1}}


def test_shard_uris_follow_manifest(tmp_path):
    uri = str(tmp_path / "c")
    write_corpus(uri, n=4, per_shard=2)
    assert shard_uris(uri) == [f"{uri}/shard-000000.tar", f"{uri}/shard-000001.tar"]

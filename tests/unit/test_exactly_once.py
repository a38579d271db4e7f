"""Exactly once for mining/predict outputs: done-manifests, checksums, input identity,
missing samples and paths that stay under their root. No Ray: the shard pool is replaced
by a plain loop over the shards that feeds the real ``ShardPartWriter``."""
import json
import logging
import os

import numpy as np
import pytest

from pseudobox import cli, storage
from pseudobox.datasets.corpus import CorpusError, CorpusManifest, CorpusWriter, encode_image, iter_shard, safe_join
from pseudobox.mining import outputs
from pseudobox.pipelines import build_corpus, mine


def _row(key, shard="s.tar", error=""):
    return {"key": key, "shard": shard, "boxes": np.zeros((1, 4), np.float32), "labels": np.zeros(1, np.int64),
            "scores": np.ones(1, np.float32), "width": 4, "height": 4, "source": "edgebox", "error": error,
            "corloc_hits": 0, "corloc_images": 0, "gt_boxes": 0, "gt_recalled": 0}


def _batch(rows):
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def _write(out, shard="s.tar", keys=("a", "b"), inputs=None):
    writer = outputs.ShardPartWriter(out, {shard: len(keys)}, "edgebox", inputs=inputs)
    writer.add_batch(_batch([_row(k, shard) for k in keys]))
    return writer.close()


def test_report_vouches_for_the_part_and_readers_detect_a_corrupt_one(tmp_path):
    out = str(tmp_path / "mined")
    report = _write(out)["s.tar"]
    part = outputs.part_uri(out, "s.tar")
    data = storage.read_bytes(part)
    assert report["part"]["bytes"] == len(data) and report["part"]["name"] == "s.parquet"
    assert outputs.read_part(part).column("key").to_pylist() == ["a", "b"]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    storage.write_bytes(part, bytes(flipped))
    for read in (lambda: outputs.read_part(part), lambda: outputs.load_mined_boxes(out, "s.tar"),
                 lambda: outputs.export_coco(out, ["x"], str(tmp_path / "coco.json"))):
        with pytest.raises(outputs.PartError, match=r"s\.parquet is corrupt or was replaced"):
            read()


def test_only_a_report_with_its_recorded_part_is_done(tmp_path, caplog):
    out = str(tmp_path / "mined")
    ident = {f"{n}.tar": {"uri": f"/c/{n}.tar", "size": 10, "mtime_ns": 1} for n in "abcde"}
    for name in ident:
        _write(out, name, keys=("k1", "k2"), inputs=ident)
    assert outputs.done_shards(out, ident) == set(ident)
    storage.remove(outputs.part_uri(out, "a.tar"))                          # report without part
    storage.remove(outputs.report_uri(out, "b.tar"))                        # part without report (killed)
    storage.write_bytes(outputs.part_uri(out, "c.tar"), b"short")           # part cut or replaced
    old = storage.read_json(outputs.report_uri(out, "d.tar"))
    storage.write_json(outputs.report_uri(out, "d.tar"), {k: v for k, v in old.items() if k != "part"})  # older format
    states = outputs.shard_states(out, ident)
    assert states["e.tar"] == outputs.DONE
    assert {s for s, st in states.items() if st != outputs.DONE} == {"a.tar", "b.tar", "c.tar", "d.tar"}
    assert "part without report" in states["b.tar"] and "older pseudobox" in states["d.tar"]
    with pytest.raises(outputs.PartError, match="has no report"):
        outputs.read_part(outputs.part_uri(out, "b.tar"))
    with caplog.at_level(logging.WARNING, logger="pseudobox"):
        done, pending = outputs.plan_shards(out, "mine", ident)
    assert done == {"e.tar"} and pending == ["a.tar", "b.tar", "c.tar", "d.tar"]
    assert "mine: c.tar is redone: part has 5 bytes" in caplog.text
    # Stale reports are gone before the shards are redone: none of them vouches for anything.
    assert set(storage.listdir(str(tmp_path / "mined" / "reports"))) == {"e.json"}


def test_a_changed_input_is_not_done(tmp_path):
    out = str(tmp_path / "mined")
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"x" * 100)
    before = outputs.input_identities(str(tmp_path), ["s.tar", "gone.tar"])
    assert before["s.tar"]["size"] == 100 and "mtime_ns" in before["s.tar"] and before["gone.tar"]["missing"]
    assert before["s.tar"] == storage.identity(str(shard))
    _write(out, inputs=before)
    assert outputs.done_shards(out, before) == {"s.tar"}
    shard.write_bytes(b"y" * 100)
    os.utime(shard, ns=(before["s.tar"]["mtime_ns"] + 10**9,) * 2)  # same size, newer file
    after = outputs.input_identities(str(tmp_path), ["s.tar"])
    assert outputs.done_shards(out, after) == set()
    assert "input changed since it was mined" in outputs.shard_states(out, after)["s.tar"]


def test_repeated_and_late_rows_never_duplicate_a_key(tmp_path):
    out = str(tmp_path / "mined")
    writer = outputs.ShardPartWriter(out, {"s.tar": 3}, "edgebox")
    writer.add_batch(_batch([_row("a"), _row("a"), _row("b")]))         # a re-executed batch, before the flush
    assert writer.add_batch(_batch([_row("c")])) == ["s.tar"]
    truncated = _row("__s.tar__truncated", error="truncated_shard: cut")
    # After the flush: repeats of written rows, a late shard record twice, and one new row.
    writer.add_batch(_batch([_row("b"), truncated, _row("a"), truncated, _row("d")]))
    report = writer.close()["s.tar"]
    keys = outputs.read_part(outputs.part_uri(out, "s.tar")).column("key").to_pylist()
    assert sorted(keys) == ["a", "b", "c", "d"] and len(keys) == len(set(keys))
    assert report["rows"] == 4 and report["errors"] == {"truncated_shard": 1}
    assert writer.duplicates == 4
    assert outputs.load_reports(out)["s.tar"]["part"]["sha256"] == report["part"]["sha256"]


# ---------------------------------------------------------------- mine end to end, pool replaced


def _tiny_corpus(uri, shards=3, per_shard=4):
    writer = CorpusWriter(uri, ["thing"], samples_per_shard=per_shard)
    rng = np.random.default_rng(0)
    for i in range(shards * per_shard):
        writer.add(f"img{i:03d}", encode_image(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), {"labels": [0]})
    return writer.close()


@pytest.fixture
def plain_pool(monkeypatch):
    """``mine`` with its Ray pool replaced by a loop over the shards' raw rows (every
    readable sample gets a row, as the real pool does); records the shards it read."""
    read: list[list[str]] = []

    def read_corpus(corpus, shards, read_cpus=None):
        read.append(sorted(shards))
        return [storage.join(corpus, s) for s in shards]

    def run_shard_pool(ds, actor, kwargs, cfg, use_gpu, writer, stage, expected, decode=None, reread=None):
        for uri in ds:
            rows = [_row(r["key"], r["shard"], r["error"]) for r in iter_shard(uri)]
            writer.add_batch(_batch(rows))
        return writer.close()

    monkeypatch.setattr("pseudobox.datasets.ray_io.read_corpus", read_corpus)
    monkeypatch.setattr(mine, "run_shard_pool", run_shard_pool)
    monkeypatch.setattr(mine, "init_ray", lambda ray_cfg: None)
    monkeypatch.setattr(mine, "resolve_use_gpu", lambda setting: False)
    return read


def _keys(out):
    return [k for n in sorted(storage.listdir(out + "/reports"))
            for k in outputs.read_part(outputs.part_uri(out, n[:-5] + ".tar")).column("key").to_pylist()]


def test_cut_shards_exit_3_unless_allowed_and_are_remined_once_repaired(tmp_path, plain_pool, capsys, caplog):
    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "mined")
    manifest = _tiny_corpus(corpus)
    names = [s.name for s in manifest.shards]
    good = {n: (tmp_path / "corpus" / n).read_bytes() for n in names}
    (tmp_path / "corpus" / names[1]).write_bytes(good[names[1]][:1500])  # truncated mid-sample
    (tmp_path / "corpus" / names[2]).write_bytes(b"")                    # zero bytes
    args = ["mine", f"corpus={corpus}", f"output={out}", "source=edgebox"]

    assert cli.main(args) == 3
    err = capsys.readouterr().err
    assert "pseudobox mine: error:" in err and "allow_missing=true" in err
    assert f"{names[2]} (4)" in err and names[1] in err and names[0] not in err
    summary = json.loads(storage.read_bytes(out + "/mining.json"))
    assert summary["missing_samples"][names[2]] == 4 and 0 < summary["missing_samples"][names[1]] < 4
    reports = outputs.load_reports(out)
    assert reports[names[2]]["errors"] == {"truncated_shard": 1, "missing_samples": 4}
    assert reports[names[2]]["rows"] == 0 and reports[names[0]]["errors"] == {}

    with caplog.at_level(logging.WARNING, logger="pseudobox"):
        assert cli.main(args + ["allow_missing=true"]) == 0
    assert "WARNING: " in caplog.text and "accepted by allow_missing=true" in caplog.text
    assert plain_pool == [names]  # the second run read nothing: the cut shards did not change

    for n in names[1:]:
        (tmp_path / "corpus" / n).write_bytes(good[n])
    assert cli.main(args) == 0
    assert plain_pool[-1] == names[1:]  # only the repaired shards are mined again
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == manifest.num_samples  # one row per sample, none twice
    assert outputs.missing_samples(outputs.load_reports(out)) == {}
    assert json.loads(storage.read_bytes(out + "/mining.json"))["missing_samples"] == {}


def test_a_shard_file_that_is_missing_counts_its_samples_as_missing(tmp_path, plain_pool):
    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "mined")
    manifest = _tiny_corpus(corpus, shards=2)
    gone = manifest.shards[1].name
    os.remove(tmp_path / "corpus" / gone)
    cfg = mine.MineConfig(corpus=corpus, output=out, source="edgebox")
    with pytest.raises(outputs.MissingSamplesError) as e:
        mine.run(cfg)
    assert e.value.missing == {gone: 4} and plain_pool == [[manifest.shards[0].name]]
    assert outputs.load_reports(out)[gone]["errors"] == {"missing_shard": 1, "missing_samples": 4}


# ---------------------------------------------------------------- paths stay under their root


@pytest.mark.parametrize("name", ["../../x.tar", "sub/x.tar", "/abs/x.tar", "s3://other/x.tar", ".."])
def test_shard_names_in_corpus_json_must_be_plain_file_names(name):
    d = {"schema_version": 1, "classes": ["a"], "shards": [{"name": "ok.tar", "num_samples": 1},
                                                           {"name": name, "num_samples": 1}]}
    with pytest.raises(CorpusError, match=r"corpus\.json: shard name: .* is not a plain file name"):
        CorpusManifest.from_json(d)


def test_relative_image_paths_must_stay_under_their_root(tmp_path):
    root = str(tmp_path / "src")
    assert safe_join(root, "a/../b/c.jpg", "image") == os.path.join(root, "b", "c.jpg")
    for bad in ("../../x.jpg", "a/../../x.jpg", "/etc/passwd", "s3://b/x.jpg", ""):
        with pytest.raises(CorpusError, match="is not a relative path that stays under"):
            safe_join(root, bad, "image")
    # hashtags JSONL: relative paths resolve under the base; URIs and absolute paths stay explicit
    assert build_corpus._resolve_image(root, "d/e.jpg") == os.path.join(root, "d", "e.jpg")
    assert build_corpus._resolve_image(root, "/data/e.jpg") == "/data/e.jpg"
    with pytest.raises(CorpusError, match=r"tags\.jsonl: line 3: image: '\.\./\.\./x\.jpg'"):
        build_corpus._resolve_image(root, "../../x.jpg", "tags.jsonl: line 3: image")


def test_coco_file_names_must_stay_under_source(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}], "annotations": [],
                               "images": [{"id": 7, "file_name": "../../secret.jpg", "width": 4, "height": 4}]}))
    cfg = build_corpus.BuildCorpusConfig(builder="coco", source=str(tmp_path / "img"), annotations=str(ann),
                                         output=str(tmp_path / "out"))
    with pytest.raises(CorpusError, match="image id 7 file_name: '../../secret.jpg'"):
        build_corpus.plan_coco(cfg)


# ---------------------------------------------------------------- S3: the ETag is the identity


def test_s3_identity_is_size_and_etag(s3_bucket):
    uri = storage.join(s3_bucket, "corpus", "s.tar")
    storage.write_bytes(uri, b"a" * 64)
    one = storage.identity(uri)
    assert one["size"] == 64 and one["etag"] and "mtime_ns" not in one
    listed = outputs.input_identities(storage.join(s3_bucket, "corpus"), ["s.tar", "gone.tar"])
    assert listed["s.tar"] == one and listed["gone.tar"]["missing"]
    storage.write_bytes(uri, b"b" * 64)  # repaired in place: same size, new content
    assert not outputs.same_input(one, storage.identity(uri))


def test_image_folder_pseudo_shards_change_identity_with_any_of_their_files(tmp_path):
    from pseudobox.pipelines import predict

    for name in ("a.jpg", "b.jpg", "c.png"):
        (tmp_path / name).write_bytes(b"img-" + name.encode())
    before = predict.load_inputs(str(tmp_path), files_per_shard=2).identities
    assert set(before) == {"images-000000.tar", "images-000001.tar"} and before["images-000000.tar"]["files"] == 2
    (tmp_path / "b.jpg").write_bytes(b"repaired image")
    after = predict.load_inputs(str(tmp_path), files_per_shard=2).identities
    assert not outputs.same_input(before["images-000000.tar"], after["images-000000.tar"])
    assert outputs.same_input(before["images-000001.tar"], after["images-000001.tar"])

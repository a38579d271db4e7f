"""The file builders of ``build-corpus``: VOC devkit trees, parallel shard writing, resume by shard."""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pseudobox import storage
from pseudobox.config import ConfigError, load_config
from pseudobox.datasets import ray_io
from pseudobox.datasets.corpus import MANIFEST_NAME, iter_corpus, iter_shard, load_manifest, shard_uris
from pseudobox.datasets.voc import VOC_CLASSES
from pseudobox.evaluation.coco import gt_from_sample
from pseudobox.pipelines.build_corpus import RECORDS_DIR, BuildCorpusConfig, record_uri, run


def save_image(path, seed: int, size=(30, 40), fmt: str = "JPEG") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def voc_xml(filename: str, objects: list[tuple]) -> str:
    """``objects``: ``(name, xmin, ymin, xmax, ymax, difficult)`` in VOC's 1-based pixels."""
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2, difficult in objects)
    return (f"<annotation><folder>VOC</folder><filename>{filename}</filename>"
            f"<size><width>40</width><height>30</height><depth>3</depth></size>{body}</annotation>")


def add_voc_image(root, year: str, image_id: str, objects: list[tuple], seed: int) -> None:
    save_image(root / year / "JPEGImages" / f"{image_id}.jpg", seed)
    (root / year / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / year / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", objects))


def write_image_set(root, year: str, split: str, ids: list[str]) -> None:
    (root / year / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / year / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def devkit(tmp_path):
    """Two years; VOC2007 000001 has a dog and a difficult person, 000003 is in test only."""
    root = tmp_path / "VOCdevkit"
    add_voc_image(root, "VOC2007", "000001", [("dog", 1, 1, 10, 20, 0), ("person", 5, 6, 30, 25, 1)], seed=1)
    add_voc_image(root, "VOC2007", "000002", [("car", 11, 3, 40, 30, 0)], seed=2)
    add_voc_image(root, "VOC2007", "000003", [("cat", 2, 2, 8, 8, 0)], seed=3)
    add_voc_image(root, "VOC2012", "2008_000007", [("tvmonitor", 3, 4, 21.5, 17, 0), ("dog", 1, 1, 4, 4, 0)], seed=4)
    write_image_set(root, "VOC2007", "trainval", ["000001", "000002"])
    write_image_set(root, "VOC2007", "test", ["000003"])
    write_image_set(root, "VOC2012", "trainval", ["2008_000007"])
    return root


def voc_config(source, output, **kw) -> BuildCorpusConfig:
    cfg = BuildCorpusConfig(builder="voc", source=str(source), output=str(output),
                            splits=kw.pop("splits", ["VOC2007/trainval", "VOC2012/trainval"]),
                            parallel=kw.pop("parallel", "none"), samples_per_shard=kw.pop("samples_per_shard", 2), **kw)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- VOC

def test_voc_combined_splits_boxes_and_difficult(devkit, tmp_path):
    manifest = run(voc_config(devkit, tmp_path / "corpus"))
    assert manifest.classes == list(VOC_CLASSES) and manifest.kind == "detection" and manifest.has_boxes
    assert [(s.name, s.num_samples) for s in manifest.shards] == [("shard-000000.tar", 2), ("shard-000001.tar", 1)]
    errors: dict = {}
    samples = {s["key"]: s for s in iter_corpus(str(tmp_path / "corpus"), errors=errors)}
    assert errors == {}
    assert list(samples) == ["VOC2007_000001", "VOC2007_000002", "VOC2012_2008_000007"]  # keys carry the year

    first = samples["VOC2007_000001"]
    # 1-based VOC pixels → continuous xyxy: xmin - 1, ymin - 1, xmax, ymax.
    np.testing.assert_array_equal(first["boxes"], [[0, 0, 10, 20], [4, 5, 30, 25]])
    assert first["box_labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert first["difficult"].tolist() == [False, True] and first["iscrowd"].tolist() == [False, False]
    assert first["labels"] == [VOC_CLASSES.index("dog")]  # image-level labels: non-difficult objects only
    np.testing.assert_allclose(samples["VOC2012_2008_000007"]["boxes"], [[2, 3, 21.5, 17], [0, 0, 4, 4]])
    assert first["image"].shape == (30, 40, 3)

    # Evaluation keeps the difficult box, flagged; training rows leave it out.
    assert gt_from_sample(first)["difficult"].tolist() == [False, True]
    rows = list(iter_shard(shard_uris(str(tmp_path / "corpus"))[0]))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = ray_io.decode_batch(batch, manifest.classes)
    assert out["boxes"][0].tolist() == [[0, 0, 10, 20]] and out["box_labels"][0].tolist() == [VOC_CLASSES.index("dog")]


def test_voc_custom_classes_and_unknown_class(tmp_path):
    root = tmp_path / "devkit"
    add_voc_image(root, "Widgets", "a1", [("gadget", 1, 1, 5, 5, 0), ("widget", 2, 2, 9, 9, 0)], seed=5)
    write_image_set(root, "Widgets", "train", ["a1"])
    cfg = voc_config(root, tmp_path / "custom", splits=["Widgets/train"], classes=["widget", "gadget"])
    manifest = run(cfg)
    assert manifest.classes == ["widget", "gadget"]
    (sample,) = iter_corpus(str(tmp_path / "custom"))
    assert sample["box_labels"].tolist() == [1, 0] and sample["labels"] == [0, 1]

    # The default class list does not know these names: an error naming file and class,
    # raised while planning, before anything is written.
    with pytest.raises(ConfigError, match=r"a1\.xml: object 0 has class 'gadget'.*classes=a,b,c"):
        run(voc_config(root, tmp_path / "default", splits=["Widgets/train"]))
    assert not (tmp_path / "default" / "shard-000000.tar").exists()


def test_voc_missing_split_file_fails_before_work(devkit, tmp_path):
    cfg = voc_config(devkit, tmp_path / "out", splits=["VOC2007/trainval", "VOC2012/val"])
    missing = os.path.join(str(devkit), "VOC2012", "ImageSets", "Main", "val.txt")
    with pytest.raises(ConfigError, match=f"splits: VOC2012/val: the image set file {missing} does not exist"):
        run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["splits=VOC2007"], "not <year dir>/<image set>"),
    ([], "builder=voc needs splits"),
    (["splits=VOC2007/test", "classes=a,a"], "classes must be distinct"),
    (["parallel=threads"], "parallel must be one of"),
])
def test_voc_config_validation(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BuildCorpusConfig, None, ["builder=voc", f"source={tmp_path}", f"output={tmp_path}/o", *overrides])


def test_config_lists_from_the_command_line(tmp_path):
    cfg = load_config(BuildCorpusConfig, None, ["builder=voc", f"source={tmp_path}", f"output={tmp_path}/o",
                                                "splits=VOC2007/trainval,VOC2012/trainval", "classes=a,b"])
    assert list(cfg.splits) == ["VOC2007/trainval", "VOC2012/trainval"] and list(cfg.classes) == ["a", "b"]
    with pytest.raises(ConfigError, match="classes is only read by builder=voc"):
        load_config(BuildCorpusConfig, None, ["builder=imagefolder", f"source={tmp_path}", f"output={tmp_path}/o",
                                              "classes=a"])


# ---------------------------------------------------------------- parallel writing, resume

@pytest.fixture
def image_tree(tmp_path):
    """3 classes x 3 images, plus a PNG named .jpg and a file that is not an image."""
    root = tmp_path / "tree"
    for c, name in enumerate(["ant", "bee", "cow"]):
        for i in range(3):
            save_image(root / name / f"{name}{i}.jpg", seed=10 * c + i)
    save_image(root / "bee" / "disguised.jpg", seed=99, fmt="PNG")
    (root / "cow" / "broken.jpg").write_bytes(b"not an image at all")
    return root


def folder_config(source, output, **kw) -> BuildCorpusConfig:
    cfg = BuildCorpusConfig(builder="imagefolder", source=str(source), output=str(output),
                            samples_per_shard=kw.pop("samples_per_shard", 2), **kw)
    cfg.validate()
    return cfg


def shard_bytes(corpus) -> dict[str, bytes]:
    return {os.path.basename(u): open(u, "rb").read() for u in shard_uris(str(corpus))}


def test_process_pool_writes_what_serial_writes(image_tree, tmp_path):
    serial = run(folder_config(image_tree, tmp_path / "serial", parallel="none"))
    pooled = run(folder_config(image_tree, tmp_path / "pooled", parallel="process", num_workers=2))
    assert serial.num_samples == pooled.num_samples == 10  # 11 files, one not an image
    assert [(s.name, s.num_samples) for s in serial.shards] == [(s.name, s.num_samples) for s in pooled.shards]
    assert len(serial.shards) == 6  # 11 items in shards of 2; broken.jpg's shard holds one sample
    assert shard_bytes(tmp_path / "serial") == shard_bytes(tmp_path / "pooled")  # byte for byte
    assert serial.extra["skipped"] == pooled.extra["skipped"] == {"unreadable": 1}

    samples = {s["key"]: s for s in iter_corpus(str(tmp_path / "pooled"))}
    assert load_manifest(str(tmp_path / "pooled")).classes == ["ant", "bee", "cow"]
    assert samples["bee_disguised"]["labels"] == [1] and samples["cow_cow2"]["labels"] == [2]
    # The PNG is stored as .png whatever its name, image member first.
    members = [m.name for u in shard_uris(str(tmp_path / "pooled")) for m in tarfile.open(u).getmembers()]
    position = members.index("bee_disguised.png")
    assert members[position + 1] == "bee_disguised.json"
    records = [storage.read_json(record_uri(str(tmp_path / "pooled"), s.name)) for s in pooled.shards]
    assert sum(r["skipped"].get("unreadable", 0) for r in records) == 1
    assert any("cow/broken.jpg" in e for r in records for e in r["skipped_examples"])


def test_resume_rewrites_only_the_missing_shard(image_tree, tmp_path, caplog):
    out = tmp_path / "corpus"
    first = run(folder_config(image_tree, out, parallel="none"))
    before = shard_bytes(out)
    keys = [s["key"] for s in iter_corpus(str(out))]
    (out / "shard-000002.tar").unlink()
    (out / RECORDS_DIR / "shard-000002.json").unlink()
    (out / MANIFEST_NAME).unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in list(out.glob("shard-*.tar")) + list((out / RECORDS_DIR).glob("*"))}
    assert len(mtimes) == 2 * len(first.shards) - 2

    caplog.set_level("INFO", logger="pseudobox")
    again = run(folder_config(image_tree, out, parallel="process"))  # parallel may change on a re-run
    assert "5 of 6 shards already written, 1 to write" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar") if p.name in mtimes} == \
        {k: v for k, v in mtimes.items() if k.endswith(".tar")}
    assert {p.name: p.stat().st_mtime_ns for p in (out / RECORDS_DIR).glob("*")
            if p.name in mtimes} == {k: v for k, v in mtimes.items() if k.endswith(".json")}
    assert shard_bytes(out) == before
    assert again.to_json() == first.to_json()
    assert [s["key"] for s in iter_corpus(str(out))] == keys


def test_rerun_with_other_settings_or_source_is_refused(image_tree, tmp_path):
    out = tmp_path / "corpus"
    run(folder_config(image_tree, out, parallel="none"))
    with pytest.raises(ConfigError, match=r"samples_per_shard: 2 -> 3"):
        run(folder_config(image_tree, out, parallel="none", samples_per_shard=3))
    save_image(image_tree / "ant" / "new.jpg", seed=7)  # the source changed: another plan
    with pytest.raises(ConfigError, match=r"plan\.digest"):
        run(folder_config(image_tree, out, parallel="none"))
    assert (out / MANIFEST_NAME).exists()  # a refused run leaves the finished corpus alone


def test_two_files_with_one_key_are_refused(image_tree, tmp_path):
    save_image(image_tree / "ant" / "ant0.png", seed=3, fmt="PNG")  # ant0.jpg is there too: key ant_ant0
    with pytest.raises(ConfigError, match=r"two images map to the sample key 'ant_ant0': ant/ant0\.(jpg|png) and"):
        run(folder_config(image_tree, tmp_path / "corpus", parallel="none"))
    assert not (tmp_path / "corpus").exists()


def test_coco_images_missing_on_disk_are_counted(tmp_path):
    (tmp_path / "images").mkdir()
    save_image(tmp_path / "images" / "a.jpg", seed=1)
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "gone.jpg"}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    cfg = BuildCorpusConfig(builder="coco", source=str(tmp_path / "images"), annotations=str(tmp_path / "ann.json"),
                            output=str(tmp_path / "corpus"), samples_per_shard=1, parallel="none")
    manifest = run(cfg)
    assert [(s.name, s.num_samples) for s in manifest.shards] == [("shard-000000.tar", 1)]
    assert manifest.extra["skipped"] == {"missing_file": 1}
    record = storage.read_json(record_uri(cfg.output, "shard-000001.tar"))
    assert record["num_samples"] == 0 and record["skipped_examples"] == ["missing_file: gone.jpg"]
    assert not (tmp_path / "corpus" / "shard-000001.tar").exists()
    (sample,) = iter_corpus(cfg.output)
    np.testing.assert_array_equal(sample["boxes"], [[1, 2, 4, 6]])

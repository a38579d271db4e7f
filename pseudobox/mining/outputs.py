"""Mining outputs, shared by every box source (CAM, EdgeBoxes, teacher predictions).

Layout under the output URI::

    parts/<shard>.parquet    one part per input shard (committed last: its presence = shard done)
    reports/<shard>.json     per-shard report: samples, boxes, errors by kind, quality counts
    mining.json              run summary (written at the end)
    pseudo_boxes.coco.json   optional COCO export (``export_coco``)

``predict`` writes the same layout (its ``source`` is ``predict``), and from it
``predictions_coco.json`` (``export_coco``) and ``detections.json`` (``coco_results``).

Parquet columns: key, shard, boxes (list of [x1,y1,x2,y2] image pixels), labels,
scores, width, height, source, error.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchvision.ops import box_iou

from pseudobox import storage
from pseudobox.datasets.corpus import tally_error

PART_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))), ("labels", pa.list_(pa.int64())),
    ("scores", pa.list_(pa.float32())), ("width", pa.int32()), ("height", pa.int32()),
    ("source", pa.string()), ("error", pa.string()),
])
QUALITY_FIELDS = ("corloc_hits", "corloc_images", "gt_boxes", "gt_recalled")


def shard_stem(shard: str) -> str:
    return shard[:-4] if shard.endswith(".tar") else shard


def part_uri(out_uri: str, shard: str) -> str:
    return storage.join(out_uri, "parts", shard_stem(shard) + ".parquet")


def report_uri(out_uri: str, shard: str) -> str:
    return storage.join(out_uri, "reports", shard_stem(shard) + ".json")


def done_shards(out_uri: str) -> set[str]:
    """Shards whose part is complete (parts are written atomically, so present = complete)."""
    return {n[: -len(".parquet")] + ".tar" for n in storage.listdir(storage.join(out_uri, "parts"))
            if n.endswith(".parquet")}


def box_quality(boxes, labels, scores, image_labels, gt_boxes, gt_labels, iou: float = 0.5) -> dict:
    """WSOL quality counts for one image, over its image-level classes that have GT boxes.

    CorLoc: per such class, is the top-scoring mined box of that class within ``iou`` of
    a GT box of the class? Recall: how many GT boxes of those classes some mined box of
    the class covers at ``iou``.
    """
    out = dict.fromkeys(QUALITY_FIELDS, 0)
    for c in sorted(set(int(x) for x in image_labels)):
        gt = gt_boxes[gt_labels == c]
        if len(gt) == 0:
            continue
        mine = labels == c
        out["corloc_images"] += 1
        out["gt_boxes"] += len(gt)
        if not mine.any():
            continue
        cand, cand_scores = boxes[mine], scores[mine]
        ious = box_iou(torch.as_tensor(cand, dtype=torch.float32), torch.as_tensor(gt, dtype=torch.float32)).numpy()
        out["corloc_hits"] += int(ious[int(np.argmax(cand_scores))].max() >= iou)
        out["gt_recalled"] += int((ious.max(axis=0) >= iou).sum())
    return out


def mined_rows(batch: dict, mined: dict, source: str) -> dict:
    """Assemble an output batch: ``mined`` maps row index → (boxes, labels, scores).

    Carries GT boxes through as quality counts so the per-shard report can score mining
    without reading the corpus again.
    """
    n = len(batch["key"])
    rows = {k: [] for k in ("key", "shard", "boxes", "labels", "scores", "width", "height", "source", "error")}
    quality = {k: [] for k in QUALITY_FIELDS}
    for i in range(n):
        boxes, labels, scores = mined.get(i, (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)))
        err = str(batch["error"][i])
        h, w = (0, 0) if err else batch["image"][i].shape[:2]
        rows["key"].append(str(batch["key"][i]))
        rows["shard"].append(str(batch["shard"][i]))
        rows["boxes"].append(np.asarray(boxes, np.float32).reshape(-1, 4))
        rows["labels"].append(np.asarray(labels, np.int64))
        rows["scores"].append(np.asarray(scores, np.float32))
        rows["width"].append(w)
        rows["height"].append(h)
        rows["source"].append(source)
        rows["error"].append(err)
        q = dict.fromkeys(QUALITY_FIELDS, 0)
        if not err and len(batch["boxes"][i]):
            q = box_quality(rows["boxes"][-1], rows["labels"][-1], rows["scores"][-1], batch["labels"][i],
                            np.asarray(batch["boxes"][i], np.float32), np.asarray(batch["box_labels"][i]))
        for k in QUALITY_FIELDS:
            quality[k].append(q[k])
    from pseudobox.datasets.ray_io import object_array

    out = {k: object_array(v) if k in ("boxes", "labels", "scores") else np.asarray(v) for k, v in rows.items()}
    out.update({k: np.asarray(v, dtype=np.int64) for k, v in quality.items()})
    return out


def _is_sample(row: dict) -> bool:
    """Shard-level error records (``__<shard>__truncated``) are not samples."""
    return not str(row["key"]).startswith("__")


class ShardPartWriter:
    """Buffers mined rows per shard and writes each shard's part and report atomically.

    A shard is written as soon as all the samples its manifest promises have arrived.
    Rows that arrive after that (Ray Data does not keep row order, so a shard-level error
    record can come last) are merged into the written part at ``close()``, and shards
    cut short (truncated tars) are written there too.
    """

    def __init__(self, out_uri: str, expected: dict[str, int], source: str):
        self.out_uri, self.expected, self.source = out_uri, dict(expected), source
        self.buffers: dict[str, list[dict]] = {}
        self.samples: dict[str, int] = {}
        self.late: dict[str, list[dict]] = {}
        self.reports: dict[str, dict] = {}

    def add_batch(self, batch: dict) -> list[str]:
        """Take one output batch; returns the shards it completed."""
        done = []
        for i in range(len(batch["key"])):
            shard = str(batch["shard"][i])
            row = {k: batch[k][i] for k in batch}
            if shard in self.reports:
                self.late.setdefault(shard, []).append(row)
                continue
            self.buffers.setdefault(shard, []).append(row)
            self.samples[shard] = self.samples.get(shard, 0) + _is_sample(row)
            if self.samples[shard] >= self.expected.get(shard, float("inf")):
                self.flush(shard)
                done.append(shard)
        return done

    def _report(self, shard: str, rows: list[dict], previous: dict | None = None) -> dict:
        real = [r for r in rows if _is_sample(r)]
        errors = dict((previous or {}).get("errors", {}))
        errors.pop("missing_samples", None)
        for r in rows:
            if r["error"]:
                tally_error(errors, str(r["error"]))
        prev = previous or {}
        n_rows = prev.get("rows", 0) + len(real)
        missing = (self.expected.get(shard) or 0) - n_rows
        if missing > 0:  # samples the manifest promised that never arrived (cut shard)
            errors["missing_samples"] = missing
        return {
            "shard": shard, "source": self.source, "expected_samples": self.expected.get(shard),
            "rows": n_rows, "ok": prev.get("ok", 0) + sum(1 for r in real if not r["error"]),
            "boxes": prev.get("boxes", 0) + int(sum(len(r["boxes"]) for r in real)), "errors": errors,
            **{k: prev.get(k, 0) + int(sum(int(r[k]) for r in rows)) for k in QUALITY_FIELDS},
            "written_at": time.time(),
        }

    @staticmethod
    def _table(shard: str, rows: list[dict]) -> pa.Table:
        real = [r for r in rows if _is_sample(r)]
        return pa.table({
            "key": [str(r["key"]) for r in real], "shard": [shard] * len(real),
            "boxes": [np.asarray(r["boxes"], np.float32).reshape(-1, 4).tolist() for r in real],
            "labels": [np.asarray(r["labels"]).tolist() for r in real],
            "scores": [np.asarray(r["scores"], np.float32).tolist() for r in real],
            "width": [int(r["width"]) for r in real], "height": [int(r["height"]) for r in real],
            "source": [str(r["source"]) for r in real], "error": [str(r["error"]) for r in real],
        }, schema=PART_SCHEMA)

    def _write(self, shard: str, table: pa.Table, report: dict) -> dict:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        # Report first, part last: the part's presence is what marks the shard complete.
        storage.write_json(report_uri(self.out_uri, shard), report)
        storage.write_bytes(part_uri(self.out_uri, shard), buf.getvalue())
        self.reports[shard] = report
        return report

    def flush(self, shard: str) -> dict:
        rows = self.buffers.pop(shard, [])
        return self._write(shard, self._table(shard, rows), self._report(shard, rows))

    def close(self) -> dict[str, dict]:
        for shard in list(self.buffers):
            self.flush(shard)
        for shard, rows in self.late.items():
            table = pa.concat_tables([read_part(part_uri(self.out_uri, shard)), self._table(shard, rows)])
            self._write(shard, table, self._report(shard, rows, previous=self.reports[shard]))
        self.late = {}
        return self.reports


def read_part(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def load_reports(out_uri: str) -> dict[str, dict]:
    d = storage.join(out_uri, "reports")
    return {n[:-5] + ".tar": storage.read_json(storage.join(d, n)) for n in storage.listdir(d) if n.endswith(".json")}


def summarize(reports: dict[str, dict]) -> dict:
    """Totals over per-shard reports, with CorLoc and recall@0.5 when GT was present."""
    tot = {"shards": len(reports), "rows": 0, "ok": 0, "boxes": 0, "errors": {}}
    for k in QUALITY_FIELDS:
        tot[k] = 0
    for r in reports.values():
        for k in ("rows", "ok", "boxes", *QUALITY_FIELDS):
            tot[k] += r.get(k, 0)
        for kind, n in r.get("errors", {}).items():
            tot["errors"][kind] = tot["errors"].get(kind, 0) + n
    tot["corloc"] = 100.0 * tot["corloc_hits"] / tot["corloc_images"] if tot["corloc_images"] else None
    tot["recall50"] = 100.0 * tot["gt_recalled"] / tot["gt_boxes"] if tot["gt_boxes"] else None
    tot["boxes_per_image"] = tot["boxes"] / tot["ok"] if tot["ok"] else 0.0
    return tot


def load_mined_boxes(out_uri: str, shard: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{key: (boxes, labels, scores)}`` for one shard's part (empty if there is none)."""
    uri = part_uri(out_uri, shard)
    if not storage.exists(uri):
        return {}
    t = read_part(uri).to_pydict()
    return {k: (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(lab, np.int64), np.asarray(s, np.float32))
            for k, b, lab, s, e in zip(t["key"], t["boxes"], t["labels"], t["scores"], t["error"]) if not e}


def export_coco(out_uri: str, class_names: list[str], dest_uri: str) -> dict:
    """Write all parts as one COCO-format JSON (xywh boxes, pseudo-labels with scores)."""
    images, annotations = [], []
    for name in storage.listdir(storage.join(out_uri, "parts")):
        if not name.endswith(".parquet"):
            continue
        t = read_part(storage.join(out_uri, "parts", name)).to_pydict()
        for key, boxes, labels, scores, w, h, err in zip(t["key"], t["boxes"], t["labels"], t["scores"],
                                                          t["width"], t["height"], t["error"]):
            if err:
                continue
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": key, "width": w, "height": h, "shard": t["shard"][0]})
            for (x1, y1, x2, y2), c, s in zip(boxes, labels, scores):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c) + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0, "score": s})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    storage.write_json(dest_uri, coco)
    return coco


def coco_results(coco: dict) -> list[dict]:
    """The COCO results list (``{image_id, category_id, bbox [x, y, w, h], score}`` per
    detection) of an ``export_coco`` dict; its image ids are that dict's ``images``."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": a["score"]}
            for a in coco["annotations"]]

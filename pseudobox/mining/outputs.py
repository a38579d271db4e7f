"""Mining outputs, shared by every box source (CAM, EdgeBoxes, teacher predictions).

Layout under the output URI::

    parts/<shard>.parquet    one part per input shard
    reports/<shard>.json     per-shard report: samples, boxes, errors by kind, quality counts, and
                             the done-manifest of the shard: its part's name, bytes and sha256,
                             and the identity of the input shard it came from (``storage.identity``)
    mining.json              run summary (written at the end)
    pseudo_boxes.coco.json   optional COCO export (``export_coco``)

``predict`` writes the same layout (its ``source`` is ``predict``), and from it
``predictions_coco.json`` (``export_coco``) and ``detections.json`` (``coco_results``).

Parquet columns: key, shard, boxes (list of [x1,y1,x2,y2] image pixels), labels,
scores, width, height, source, error.

Exactly once: the part is written first and the report last, both atomically, so a report
vouches for a complete part. A shard is done (``shard_states``) only when its report is
there, its part has the recorded size and its input is the one it was mined from; anything
else is mined again, whole. A part has one row per sample key (the writer drops repeats).
Readers (``read_part``) check the part against its report's sha256. Samples the input
manifest promised but that never produced a row (a truncated or zero-byte tar, a missing
shard file) are ``missing_samples`` in the report; ``check_missing`` turns them into a
``MissingSamplesError`` unless the run allows them.
"""
from __future__ import annotations

import hashlib
import io
import logging
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
DONE = "done"
log = logging.getLogger("pseudobox")


class PartError(storage.StorageError):
    """A part that does not match its report (corrupt, replaced, or with no report)."""


class MissingSamplesError(RuntimeError):
    """Samples the input manifest promised that produced no row; ``missing``: per shard."""

    def __init__(self, stage: str, missing: dict[str, int]):
        self.stage, self.missing = stage, dict(missing)
        super().__init__(
            f"{stage}: {sum(missing.values())} samples the corpus manifest promised produced no row, in "
            f"{len(missing)} shard(s): {format_missing(missing)}. Everything else was written. Repair or "
            "replace those shards and re-run the same command (only shards whose input changed are redone), "
            "or re-run with allow_missing=true to accept the gaps.")


def format_missing(missing: dict[str, int], limit: int = 10) -> str:
    items = [f"{s} ({n})" for s, n in sorted(missing.items())]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def shard_stem(shard: str) -> str:
    return shard[:-4] if shard.endswith(".tar") else shard


def part_uri(out_uri: str, shard: str) -> str:
    return storage.join(out_uri, "parts", shard_stem(shard) + ".parquet")


def report_uri(out_uri: str, shard: str) -> str:
    return storage.join(out_uri, "reports", shard_stem(shard) + ".json")


def _listing(dir_uri: str) -> dict[str, dict]:
    """``{name: listing entry}`` of the files directly under ``dir_uri`` (one listing)."""
    return {n: e for n, e in storage.list_entries(dir_uri).items() if e.get("type") != "directory"}


def input_identities(root_uri: str, names: list[str]) -> dict[str, dict]:
    """``storage.identity`` of each named file directly under ``root_uri``, from one
    listing; a name that is not there gets ``{"uri", "missing": True}``."""
    listing = _listing(root_uri)
    out = {}
    for name in names:
        uri = storage.join(root_uri, name)
        out[name] = storage.identity(uri, listing[name]) if name in listing else {"uri": uri, "missing": True}
    return out


def same_input(recorded: dict | None, current: dict) -> bool:
    """Whether two identities name the same version of an input (the URI may differ)."""
    if not isinstance(recorded, dict):
        return False
    return {k: v for k, v in recorded.items() if k != "uri"} == {k: v for k, v in current.items() if k != "uri"}


def shard_states(out_uri: str, current: dict[str, dict] | None = None) -> dict[str, str]:
    """State of every shard that has a report or a part: ``"done"``, or why it is not.

    Done means: the report exists and carries the part's checksum, the part exists with
    the recorded size, and (when ``current`` identities are given) the input shard is the
    one it was mined from. Reports written before parts had checksums are not done.
    """
    current = None if current is None else {shard_stem(k) + ".tar": v for k, v in current.items()}
    parts = _listing(storage.join(out_uri, "parts"))
    reports_dir = storage.join(out_uri, "reports")
    states: dict[str, str] = {}
    for name in parts:
        if name.endswith(".parquet"):
            states[name[: -len(".parquet")] + ".tar"] = "part without report (interrupted)"
    for name in storage.listdir(reports_dir):
        if not name.endswith(".json"):
            continue
        shard = name[: -len(".json")] + ".tar"
        report = storage.read_json(storage.join(reports_dir, name))
        part = report.get("part") if isinstance(report, dict) else None
        entry = parts.get(shard_stem(shard) + ".parquet")
        if not isinstance(part, dict) or "sha256" not in part:
            states[shard] = "report without part checksum (written by an older pseudobox)"
        elif entry is None:
            states[shard] = "report without part"
        elif int(entry["size"]) != int(part.get("bytes", -1)):
            states[shard] = f"part has {entry['size']} bytes, its report says {part.get('bytes')}"
        elif current is not None and shard in current and not same_input(report.get("input"), current[shard]):
            states[shard] = f"input changed since it was mined ({_describe(report.get('input'))} -> {_describe(current[shard])})"
        else:
            states[shard] = DONE
    return states


def _describe(ident: dict | None) -> str:
    if not isinstance(ident, dict):
        return "unknown"
    if ident.get("missing"):
        return "missing"
    return ", ".join(f"{k} {v}" for k, v in ident.items() if k != "uri")


def done_shards(out_uri: str, current: dict[str, dict] | None = None) -> set[str]:
    """Shards whose output is complete and (with ``current``) from the current input."""
    return {s for s, state in shard_states(out_uri, current).items() if state == DONE}


def plan_shards(out_uri: str, stage: str, current: dict[str, dict]) -> tuple[set[str], list[str]]:
    """``(done, pending)`` over the shards of ``current`` (name → input identity). Logs why
    each shard with earlier output is redone, and deletes its report first, so it does not
    count as done (or vouch for an old part) until it is written again."""
    states = shard_states(out_uri, current)
    state = {s: states.get(shard_stem(s) + ".tar") for s in current}
    done = {s for s in current if state[s] == DONE}
    pending = [s for s in current if s not in done]
    for shard in pending:
        if state[shard] is not None:
            log.warning("%s: %s is redone: %s", stage, shard, state[shard])
            storage.remove(report_uri(out_uri, shard))
    return done, pending


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
    """Buffers mined rows per shard and writes each shard's part, then its report.

    A shard is written as soon as all the samples its manifest promises have arrived.
    Rows that arrive after that (Ray Data does not keep row order, so a shard-level error
    record can come last) are merged into the written part at ``close()``, and shards
    cut short (truncated tars) are written there too. A key seen before in its shard (a
    re-executed read or batch) is dropped, so a part never holds a key twice.
    ``inputs``: identity of each input shard (``input_identities``), taken before it is
    read and recorded in its report, so a later run can tell when it changed.
    """

    def __init__(self, out_uri: str, expected: dict[str, int], source: str, inputs: dict[str, dict] | None = None):
        self.out_uri, self.expected, self.source = out_uri, dict(expected), source
        self.inputs = dict(inputs or {})
        self.buffers: dict[str, list[dict]] = {}
        self.samples: dict[str, int] = {}
        self.keys: dict[str, set[str]] = {}   # buffered keys; after a flush, its shard-record keys
        self.late: dict[str, list[dict]] = {}
        self.reports: dict[str, dict] = {}
        self.duplicates = 0

    def add_batch(self, batch: dict) -> list[str]:
        """Take one output batch; returns the shards it completed."""
        done = []
        for i in range(len(batch["key"])):
            shard = str(batch["shard"][i])
            row = {k: batch[k][i] for k in batch}
            if shard in self.reports:
                self.late.setdefault(shard, []).append(row)
                continue
            if not self._first_time(row, self.keys.setdefault(shard, set())):
                continue
            self.buffers.setdefault(shard, []).append(row)
            self.samples[shard] = self.samples.get(shard, 0) + _is_sample(row)
            if self.samples[shard] >= self.expected.get(shard, float("inf")):
                self.flush(shard)
                done.append(shard)
        return done

    def _first_time(self, row: dict, seen: set[str]) -> bool:
        """Whether ``row``'s key is new to ``seen`` (then it is added); a repeat is counted."""
        key = str(row["key"])
        if key in seen:
            self.duplicates += 1
            return False
        seen.add(key)
        return True

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
        data = buf.getvalue()
        if shard in self.reports:  # rewriting a written shard: not done until its new report lands
            storage.remove(report_uri(self.out_uri, shard))
        # Part first, report last: the report vouches for a complete part (its size and sha256).
        storage.write_bytes(part_uri(self.out_uri, shard), data)
        report = {**report, "part": {"name": storage.basename(part_uri(self.out_uri, shard)), "bytes": len(data),
                                     "sha256": hashlib.sha256(data).hexdigest()},
                  "input": self.inputs.get(shard)}
        storage.write_json(report_uri(self.out_uri, shard), report)
        self.reports[shard] = report
        return report

    def flush(self, shard: str) -> dict:
        rows = self.buffers.pop(shard, [])
        # Sample keys are in the part from now on; shard records (no row) are remembered here.
        self.keys[shard] = {str(r["key"]) for r in rows if not _is_sample(r)}
        return self._write(shard, self._table(shard, rows), self._report(shard, rows))

    def close(self) -> dict[str, dict]:
        for shard in list(self.buffers):
            self.flush(shard)
        for shard, rows in self.late.items():
            old = read_part(part_uri(self.out_uri, shard))
            seen = set(old.column("key").to_pylist()) | self.keys.get(shard, set())
            new = [r for r in rows if self._first_time(r, seen)]
            self.keys[shard] = {k for k in seen if k.startswith("__")}
            if new:
                table = pa.concat_tables([old, self._table(shard, new)])
                self._write(shard, table, self._report(shard, new, previous=self.reports[shard]))
        self.late = {}
        if self.duplicates:
            log.info("%s: dropped %d repeated rows (a re-executed read or batch)", self.source, self.duplicates)
        return self.reports

    def write_unread(self, shards, reason: str = "unread_shard") -> dict[str, dict]:
        """An empty part and a report for each of ``shards`` that produced no row at all
        (its file is missing, or its read yielded nothing), so its samples count as missing."""
        for shard in shards:
            if shard not in self.reports and shard not in self.buffers:
                report = self._report(shard, [])
                report["errors"] = {reason: 1, **report["errors"]}
                self._write(shard, self._table(shard, []), report)
        return self.reports


def read_part(uri: str) -> pa.Table:
    """A part's table, after checking its bytes against the sha256 in its shard's report.

    Raises ``PartError`` naming the part when they differ, or when the part has no report
    to vouch for it (its shard was not finished)."""
    data = storage.read_bytes(uri)
    head, parts_dir, name = uri.rstrip("/").rsplit("/", 2)
    rep_uri = report_uri(head, name[: -len(".parquet")])
    if parts_dir != "parts" or not name.endswith(".parquet") or not storage.exists(rep_uri):
        raise PartError(f"part {uri} has no report ({rep_uri}): its shard was not finished; "
                        "re-run the stage to redo it")
    recorded = (storage.read_json(rep_uri).get("part") or {}).get("sha256")
    if recorded is None:
        raise PartError(f"part {uri}: its report {rep_uri} has no checksum (written by an older pseudobox); "
                        "re-run the stage to redo the shard")
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise PartError(f"part {uri} is corrupt or was replaced: its sha256 is {actual}, its report {rep_uri} "
                        f"records {recorded}. Delete that report and re-run the stage to redo the shard")
    return pq.read_table(io.BytesIO(data))


def missing_samples(reports: dict[str, dict]) -> dict[str, int]:
    """``{shard: samples its manifest promised that produced no row}``, for shards with any."""
    out = {}
    for shard, r in reports.items():
        n = int((r.get("errors") or {}).get("missing_samples", 0))
        if n > 0:
            out[shard] = n
    return out


def check_missing(reports: dict[str, dict], stage: str, allow_missing: bool) -> dict[str, int]:
    """Raise ``MissingSamplesError`` when any shard is missing samples, unless
    ``allow_missing``: then log one loud WARNING line. Returns the missing counts."""
    missing = missing_samples(reports)
    if missing and not allow_missing:
        raise MissingSamplesError(stage, missing)
    if missing:
        log.warning("%s: WARNING: %d samples missing (no row) in %d shard(s), accepted by allow_missing=true: %s",
                    stage, sum(missing.values()), len(missing), format_missing(missing))
    return missing


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
    t = read_part(uri).to_pydict()  # checked against its report
    return {k: (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(lab, np.int64), np.asarray(s, np.float32))
            for k, b, lab, s, e in zip(t["key"], t["boxes"], t["labels"], t["scores"], t["error"]) if not e}


def export_coco(out_uri: str, class_names: list[str], dest_uri: str) -> dict:
    """Write all finished parts (those with a report) as one COCO-format JSON (xywh boxes,
    pseudo-labels with scores); each part is checked against its report's sha256."""
    images, annotations = [], []
    parts = set(storage.listdir(storage.join(out_uri, "parts")))
    for name in storage.listdir(storage.join(out_uri, "reports")):
        part = name[: -len(".json")] + ".parquet"
        if not name.endswith(".json") or part not in parts:
            continue
        t = read_part(storage.join(out_uri, "parts", part)).to_pydict()
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

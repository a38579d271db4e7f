"""Stage ``report``: one self-contained HTML page for one or more stage outputs.

``pseudobox report <output>...`` finds out what each input is from what it holds:

- a training output (``model.pt``, or a ``checkpoint_*`` of a run still going): one
  curve per loss key, the learning rate, throughput, eval metric curves and a per-class
  AP table when the history or ``metrics.json`` holds them;
- a mining output (``parts/`` + ``reports/``): totals, CorLoc / recall when recorded,
  errors per shard, and mined boxes next to the ground truth (the corpus is the one
  ``run.json`` records);
- a predict output (``detections.json``): predictions next to the ground truth;
- an evaluation metrics ``.json`` (``pseudobox evaluate output=...``): its metrics.

Nothing outside the page is linked: curves are inline SVG, images inline PNG. The
rendering helpers (``svg_curves``, ``table``, ``gallery``, ``render``) are shared with
``pipelines/demo.py``.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pseudobox import storage
from pseudobox.config import ConfigError, path_field, require

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]
# History keys that are not curves of their own: the x axis and the two shown apart.
STEP, LR, SECONDS_PER_ITER = "step", "lr", "s_per_iter"
KINDS = ("training", "mining", "predict", "evaluation")


@dataclass
class ReportConfig:
    inputs: list[str] = path_field(default_factory=list)  # stage outputs, local or s3:// (positional on the CLI)
    output: str = path_field()  # the HTML; default <first input>/report.html
    title: str = "pseudobox report"
    gallery: int = 12         # images per gallery (0: none)
    gallery_side: int = 256   # long side of each gallery image, pixels
    score_threshold: float = 0.5  # predictions drawn in galleries (mined boxes are all drawn)
    corpus: str = path_field()  # corpus for galleries when run.json does not record one

    def validate(self) -> None:
        require(bool(self.inputs) and all(bool(u) for u in self.inputs),
                "inputs is required: one or more stage outputs (e.g. pseudobox report s3://bucket/run/dap)")
        require(self.gallery >= 0, "gallery must be >= 0")
        require(self.gallery_side >= 32, "gallery_side must be >= 32")
        require(0.0 <= self.score_threshold <= 1.0, "score_threshold must be in [0, 1]")

    def check_paths(self) -> None:
        for uri in self.inputs:
            storage.check_readable(uri, "inputs")
        storage.check_writable(report_uri(self), "output")


def report_uri(cfg: ReportConfig) -> str:
    """``cfg.output``, or ``report.html`` in the first input (beside it when it is a file)."""
    if cfg.output:
        return cfg.output
    first = cfg.inputs[0].rstrip("/")
    if first.endswith((".json", ".pt", ".pth")):
        first = first.rsplit("/", 1)[0] if "/" in first else "."
    return storage.join(first, "report.html")


# ---------------------------------------------------------------------------
# Rendering helpers (also used by the demo)
# ---------------------------------------------------------------------------


def draw_boxes(image: np.ndarray, boxes, labels, class_names, scale: float = 2, scores=None,
               max_side: int = 0) -> str:
    """PNG (base64) of the image, resized (``max_side`` long side, else ``scale``), with labelled boxes."""
    h, w = image.shape[:2]
    if max_side:
        scale = max_side / max(h, w, 1)
    pil = Image.fromarray(np.asarray(image, np.uint8)).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST if scale >= 1 else Image.BILINEAR)
    draw = ImageDraw.Draw(pil)
    scores = [None] * len(labels) if scores is None else list(scores)
    for box, label, score in zip(np.asarray(boxes, np.float32).reshape(-1, 4), labels, scores):
        colour = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(int(label))
        draw.text((x1 + 2, y1 + 1), name if score is None else f"{name} {float(score):.2f}", fill=colour)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 × 10^k) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = (lo - 0.5, hi + 0.5) if lo == 0 else (lo - abs(lo) * 0.1, hi + abs(hi) * 0.1)
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def thin(points: list, max_points: int) -> list:
    """Every k-th point (and the last), so that a long run's curve stays a small SVG."""
    if len(points) <= max_points:
        return points
    stride = math.ceil(len(points) / max_points)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def svg_curves(series: dict[str, list[tuple[float, float]]], title: str, width: int = 420, height: int = 240,
               x_label: str = "step", y_label: str = "value", max_points: int = 600) -> str:
    """Line chart of ``{name: [(x, y), ...]}`` as inline SVG, with a title, labelled axes
    and tick values. Non-finite points are left out; long series are thinned to ``max_points``."""
    series = {name: thin([(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)], max_points)
              for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return f"<p>{html.escape(title)}: no data</p>"
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    left, right, top, bottom = 58, 12, 26, 42

    def tx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def ty(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    base, mid_y = height - bottom, (top + height - bottom) / 2
    parts = [f'<svg class="chart" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" '
             f'style="background:#fff" font-family="sans-serif">',
             f'<text class="title" x="{width / 2:.0f}" y="16" font-size="12" text-anchor="middle">'
             f'{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#888"/>']
    for v in xt:
        parts.append(f'<line x1="{tx(v):.1f}" y1="{base}" x2="{tx(v):.1f}" y2="{base + 4}" stroke="#888"/>'
                     f'<text x="{tx(v):.1f}" y="{base + 14}" font-size="9" text-anchor="middle">{v:.4g}</text>')
    for v in yt:
        parts.append(f'<line x1="{left - 4}" y1="{ty(v):.1f}" x2="{width - right}" y2="{ty(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{ty(v) + 3:.1f}" font-size="9" text-anchor="end">{v:.4g}</text>')
    parts.append(f'<text class="xlabel" x="{(left + width - right) / 2:.0f}" y="{height - 6}" font-size="10" '
                 f'text-anchor="middle">{html.escape(x_label)}</text>')
    parts.append(f'<text class="ylabel" x="12" y="{mid_y:.0f}" font-size="10" text-anchor="middle" '
                 f'transform="rotate(-90 12 {mid_y:.0f})">{html.escape(y_label)}</text>')
    for k, (name, pts) in enumerate(series.items()):
        colour = "rgb(%d,%d,%d)" % PALETTE[k % len(PALETTE)]
        if len(pts) == 1:
            parts.append(f'<circle cx="{tx(pts[0][0]):.1f}" cy="{ty(pts[0][1]):.1f}" r="3" fill="{colour}"/>')
        else:
            path = " ".join(f"{tx(x):.1f},{ty(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        if len(series) > 1:
            parts.append(f'<text x="{width - right - 4}" y="{top + 10 + 12 * k}" font-size="10" text-anchor="end" '
                         f'fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def loss_series(history: list[dict], key: str = "loss") -> list[tuple[float, float]]:
    """``[(step, value)]`` of one history key, over the rows that have a number for it."""
    return [(row[STEP], row[key]) for row in history if STEP in row and _is_number(row.get(key))]


def table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(title: str, sections: list[tuple[str, str]]) -> str:
    style = ("body{font-family:sans-serif;margin:24px;max-width:1300px}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
             ".gallery,.charts{display:flex;flex-wrap:wrap;gap:12px}.pair{border:1px solid #ddd;padding:4px}"
             ".pair img{margin:2px}.cap{font-size:11px;color:#555}.note{color:#a33}"
             "svg.chart{border:1px solid #eee}h3{margin-top:18px}")
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def gallery(items: list[dict], class_names: list[str], left: str = "mined", max_side: int = 0) -> str:
    """``items``: dicts with image, key, boxes, labels, optional scores, gt_boxes, gt_labels.
    Each image is drawn with its ``left`` boxes and, when it has any, next to its ground truth."""
    if not items:
        return "<p>no images to show</p>"
    cells = []
    for it in items:
        scale = {"max_side": max_side} if max_side else {}
        ours = draw_boxes(it["image"], it["boxes"], it["labels"], class_names, scores=it.get("scores"), **scale)
        gt_boxes = np.asarray(it.get("gt_boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
        imgs = f'<img src="data:image/png;base64,{ours}">'
        caption = f"{left} boxes, no ground-truth boxes"
        if len(gt_boxes):
            gt = draw_boxes(it["image"], gt_boxes, it["gt_labels"], class_names, **scale)
            imgs += f'<img src="data:image/png;base64,{gt}">'
            caption = f"{left} (left) vs ground truth (right)"
        cells.append(f'<div class="pair">{imgs}<div class="cap">{html.escape(str(it["key"]))}: '
                     f'{html.escape(caption)}</div></div>')
    return f'<div class="gallery">{"".join(cells)}</div>'


def charts(svgs: Iterable[str]) -> str:
    return f'<div class="charts">{"".join(svgs)}</div>'


def subsections(parts: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<h3>{html.escape(h)}</h3>{content}" for h, content in parts)


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.3g}"
    return str(v)


# ---------------------------------------------------------------------------
# Reading stage outputs
# ---------------------------------------------------------------------------


def run_settings(uri: str) -> dict:
    """The flattened settings ``run.json`` records under a stage output ({} if none)."""
    from pseudobox.pipelines.common import flatten

    path = storage.join(uri, "run.json")
    if not storage.exists(path):
        return {}
    record = storage.read_json(path)
    if "settings" in record:
        return {**record["settings"], **record.get("applied", {})}
    return flatten(record)


def detect_kind(uri: str) -> str:
    """``training``, ``mining``, ``predict`` or ``evaluation``, from what ``uri`` holds;
    a ``ConfigError`` naming the path and what was expected otherwise."""
    storage.check_readable(uri, "inputs")
    if uri.rstrip("/").endswith((".pt", ".pth")):
        return "training"
    if uri.rstrip("/").endswith(".json"):
        data = storage.read_json(uri)
        if isinstance(data, dict) and any(_is_number(v) for v in data.values()):
            return "evaluation"
        found = "a JSON without numeric metrics"
    else:
        names = set(storage.listdir(uri))
        if "detections.json" in names or ("run.json" in names and run_settings(uri).get("stage") == "predict"):
            return "predict"
        if "parts" in names and ("reports" in names or "mining.json" in names):
            return "mining"
        if "model.pt" in names or any(n.startswith("checkpoint_") for n in names):
            return "training"
        shown = sorted(names)[:12]
        found = f"it holds {', '.join(shown) + (' ...' if len(names) > 12 else '')}" if names else "it is empty"
    raise ConfigError(
        f"inputs: {uri} is not a stage output pseudobox can report on ({found}). Expected a training output "
        "(model.pt or checkpoint_*/), a mining output (parts/ and reports/), a predict output (detections.json) "
        "or an evaluation metrics .json")


def history_keys(history: list[dict]) -> list[str]:
    """Numeric history keys in first-seen order."""
    keys: dict[str, None] = {}
    for row in history:
        for k, v in row.items():
            if _is_number(v):
                keys.setdefault(k, None)
    return list(keys)


def per_class_columns(metrics: dict, class_names: list[str]) -> dict[str, list]:
    """Per-class values found in a metrics dict (or a history row), as ``{column: [value per class]}``.

    Recognised: a list with one number per class (``per_class``), a dict keyed by class
    names, and flat keys ``<metric>/<class name>`` (``eval/AP/cat``).
    """
    names, index = list(class_names), {c: i for i, c in enumerate(class_names)}
    columns: dict[str, list] = {}
    if not names:
        return columns
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)) and len(value) == len(names) and \
                all(v is None or isinstance(v, (int, float)) for v in value) and any(_is_number(v) for v in value):
            columns[key] = [v if _is_number(v) else None for v in value]
        elif isinstance(value, dict) and value and set(value) <= set(names) and \
                any(_is_number(v) for v in value.values()):
            columns[key] = [value.get(c) if _is_number(value.get(c)) else None for c in names]
        elif _is_number(value) and "/" in key:
            prefix, _, name = key.rpartition("/")
            if name in index:
                columns.setdefault(prefix, [None] * len(names))[index[name]] = value
    return columns


def _per_class_keys(keys: Iterable[str], class_names: list[str]) -> set[str]:
    names = set(class_names)
    return {k for k in keys if "/" in k and k.rpartition("/")[2] in names}


def per_class_table(columns: dict[str, list], class_names: list[str]) -> str:
    header = ["class", *columns]
    rows = [[name, *(_fmt(columns[c][i], 1) for c in columns)] for i, name in enumerate(class_names)]
    return table(rows, header)


def scalar_metrics_table(metrics: dict) -> str:
    rows = [[k, _fmt(v)] for k, v in metrics.items() if _is_number(v) or v is None]
    return table(rows, ["metric", "value"]) if rows else "<p>no scalar metrics</p>"


def settings_details(settings: dict) -> str:
    if not settings:
        return ""
    rows = [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in sorted(settings.items())]
    return f"<details><summary>settings (run.json)</summary>{table(rows, ['setting', 'value'])}</details>"


def _global_batch(settings: dict) -> int | None:
    batch, workers = settings.get("optim.batch_size"), settings.get("workers.num_workers", 1)
    return int(batch) * int(workers) if _is_number(batch) and _is_number(workers) else None


def training_sections(uri: str, ckpt: dict, settings: dict, metrics: dict | None) -> list[tuple[str, str]]:
    """Curves (loss keys, lr, throughput, eval metrics) and tables of one training run."""
    from pseudobox.pipelines.common import flatten

    history = [row for row in ckpt.get("history") or [] if isinstance(row, dict)]
    class_names = list(ckpt.get("class_names") or [])
    settings = {**flatten(ckpt.get("config") or {}), **settings}
    keys = [k for k in history_keys(history) if k != STEP]
    per_class = _per_class_keys(keys, class_names)
    loss_keys = [k for k in keys if k.startswith(("loss", "sup_", "unsup_"))]  # finetune-ssod: sup_* / unsup_*
    pseudo_keys = [k for k in keys if k.startswith("pseudo/") and k not in per_class]
    eval_keys = [k for k in keys if k not in (LR, SECONDS_PER_ITER) and k not in loss_keys and k not in per_class
                 and k not in pseudo_keys and not k.endswith("/images")]  # image counts are not curves
    steps = [row[STEP] for row in history if _is_number(row.get(STEP))]
    facts = [["model", f"{ckpt.get('model_type', '?')} {json.dumps(ckpt.get('arch', {}))}"],
             ["stage / method", f"{ckpt.get('stage', '?')} / {ckpt.get('method', '?')}"],
             ["classes", len(class_names)], ["step", ckpt.get("step", max(steps, default="?"))],
             ["history rows", len(history)]]
    out = [("Run", table(facts, ["", ""]) + settings_details(settings))]
    if not history:
        out.append(("Curves", note(f"{uri}: the checkpoint holds no training history")))
    if loss_keys:
        out.append(("Losses", charts(svg_curves({k: loss_series(history, k)}, k, y_label=k) for k in loss_keys)))
    if LR in keys:
        out.append(("Learning rate", charts([svg_curves({LR: loss_series(history, LR)}, "learning rate",
                                                        y_label="lr")])))
    if SECONDS_PER_ITER in keys:
        seconds = [v for _, v in loss_series(history, SECONDS_PER_ITER)]
        median = statistics.median(seconds)
        batch = _global_batch(settings)
        rows = [["median s / iteration", _fmt(median, 3)], ["iterations / s", _fmt(1 / median if median else None)]]
        if batch:
            rows.append(["images / s (global batch %d)" % batch, _fmt(batch / median if median else None, 1)])
        out.append(("Throughput", table(rows, ["", ""]) + charts([svg_curves(
            {SECONDS_PER_ITER: loss_series(history, SECONDS_PER_ITER)}, "seconds per iteration",
            y_label="s / iteration")])))
    if eval_keys:
        last = {k: loss_series(history, k)[-1][1] for k in eval_keys}
        out.append(("Evaluation during training", table([[k, _fmt(v)] for k, v in last.items()],
                                                        ["metric", "last value"])
                    + charts(svg_curves({k: loss_series(history, k)}, k, y_label=k) for k in eval_keys)))
    if pseudo_keys:  # the teacher's pseudo-labels over time (finetune-ssod)
        out.append(("Pseudo-labels", charts(svg_curves({k: loss_series(history, k)}, k, y_label=k)
                                            for k in pseudo_keys)))
    columns = {}
    for row in history:  # the latest value of each per-class metric
        for col, values in per_class_columns(row, class_names).items():
            merged = columns.setdefault(col, [None] * len(class_names))
            for i, v in enumerate(values):
                if v is not None:
                    merged[i] = v
    if metrics:
        out.append(("Evaluation (metrics.json)", scalar_metrics_table(metrics)))
        columns.update(per_class_columns(metrics, class_names))
    if columns:
        out.append(("Per-class AP", per_class_table(columns, class_names)))
    return out


def load_training(uri: str) -> tuple[dict, str]:
    """The run's checkpoint (final ``model.pt`` or newest ``checkpoint_*``) and a status line."""
    from pseudobox.models.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(uri)
    in_checkpoint = any(part.startswith("checkpoint_") for part in path.split("/"))
    status = f"in progress or stopped (latest checkpoint {path})" if in_checkpoint else "finished"
    return load_checkpoint(path), status


def part_predictions(out_uri: str) -> Callable[[str], dict]:
    """``shard → {key: (boxes, labels, scores)}`` from ``parts/<shard>.parquet`` (mining layout)."""
    from pseudobox.mining.outputs import load_mined_boxes

    return lambda shard: load_mined_boxes(out_uri, shard)


def paired_items(corpus: str, predictions_for_shard: Callable[[str], dict], n: int,
                 score_threshold: float = 0.0) -> list[dict]:
    """The first ``n`` corpus images (corpus order) that have predictions, with their ground
    truth. Reads each shard's predictions once and decodes only the images shown."""
    from pseudobox.datasets.corpus import decode_sample, iter_shard, load_manifest

    manifest = load_manifest(corpus)
    items: list[dict] = []
    for shard in manifest.shards:
        if len(items) >= n:
            break
        predicted = predictions_for_shard(shard.name)
        if not predicted:
            continue
        for raw in iter_shard(storage.join(corpus, shard.name)):
            if raw.get("error") or raw["key"] not in predicted:
                continue
            try:
                s = decode_sample(raw, manifest.classes)
            except ValueError:
                continue
            boxes, labels, scores = predicted[raw["key"]]
            keep = np.asarray(scores, np.float32) >= score_threshold
            items.append({"key": s["key"], "image": s["image"], "boxes": np.asarray(boxes)[keep],
                          "labels": np.asarray(labels)[keep], "scores": np.asarray(scores)[keep],
                          "gt_boxes": s.get("boxes", np.zeros((0, 4), np.float32)),
                          "gt_labels": s.get("box_labels", np.zeros(0, np.int64))})
            if len(items) >= n:
                break
    return items


def mined_gallery_items(corpus: str, boxes_uri: str, n: int = 12) -> list[dict]:
    """Mined boxes (all of them) next to the ground truth for the first ``n`` images."""
    return paired_items(corpus, part_predictions(boxes_uri), n)


def _gallery_section(cfg: ReportConfig, corpus: str, what: str, make_items: Callable[[str], list[dict]],
                     class_names: list[str] | None, left: str) -> str:
    if cfg.gallery == 0:
        return "<p>gallery off (gallery=0)</p>"
    if not corpus:
        return note(f"no corpus recorded for {what}: set corpus=... to see the gallery")
    from pseudobox.datasets.corpus import CorpusError, load_manifest

    try:
        names = class_names or load_manifest(corpus).classes
        return gallery(make_items(corpus), names, left=left, max_side=cfg.gallery_side)
    except (CorpusError, storage.StorageError) as e:
        return note(f"gallery skipped: corpus {corpus} cannot be read ({e})")


def mining_sections(uri: str, cfg: ReportConfig) -> list[tuple[str, str]]:
    from pseudobox.mining import outputs

    settings = run_settings(uri)
    recorded = storage.read_json(storage.join(uri, "mining.json")) if storage.exists(
        storage.join(uri, "mining.json")) else {}
    reports = outputs.load_reports(uri)
    total = outputs.summarize(reports)
    errors = sum(total["errors"].values())
    summary = table([[total["shards"], total["ok"], total["boxes"], _fmt(total["boxes_per_image"]),
                      _fmt(total["corloc"], 1), _fmt(total["recall50"], 1), errors]],
                    ["shards", "images", "boxes", "boxes/image", "CorLoc %", "recall@0.5 %", "errors"])
    if total["errors"]:
        summary += table([[k, v] for k, v in sorted(total["errors"].items())], ["error kind", "count"])
    shard_rows = [[shard, r.get("rows", 0), r.get("ok", 0), r.get("boxes", 0),
                   _fmt(r.get("boxes", 0) / r["ok"] if r.get("ok") else 0.0),
                   ", ".join(f"{k}: {v}" for k, v in sorted(r.get("errors", {}).items())) or "–"]
                  for shard, r in sorted(reports.items())]
    per_shard = (f"<details open><summary>{len(shard_rows)} shards</summary>"
                 + table(shard_rows, ["shard", "rows", "images", "boxes", "boxes/image", "errors"]) + "</details>")
    corpus = cfg.corpus or settings.get("corpus") or recorded.get("corpus", "")
    classes = recorded.get("classes")
    return [("Summary", summary + settings_details(settings)), ("Per shard", per_shard),
            (f"Mined boxes (first {cfg.gallery} images)", _gallery_section(
                cfg, corpus, uri, lambda c: mined_gallery_items(c, uri, cfg.gallery), classes, "mined"))]


def detections_by_key(detections, class_count: int | None = None) -> dict[str, tuple]:
    """COCO detections → ``{key: (xyxy boxes, 0-based labels, scores)}``.

    Accepts a COCO dict (``images`` with ``file_name`` = key, and ``annotations``) or a
    results list whose entries carry ``key`` or ``file_name``. Entries with only an
    ``image_id`` and no image list cannot be placed and are left out.
    """
    if isinstance(detections, dict):
        names = {im["id"]: im.get("file_name", im.get("key")) for im in detections.get("images", [])}
        entries = [{**d, "key": names.get(d.get("image_id"))} for d in detections.get("annotations", [])]
    else:
        entries = [{**d, "key": d.get("key", d.get("file_name"))} for d in detections]
    grouped: dict[str, list] = {}
    for d in entries:
        if d.get("key") is not None and "bbox" in d:
            grouped.setdefault(str(d["key"]), []).append(d)
    out = {}
    for key, ds in grouped.items():
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in ds)], np.float32)
        labels = np.asarray([int(d.get("category_id", 1)) - 1 for d in ds], np.int64)
        scores = np.asarray([float(d.get("score", 1.0)) for d in ds], np.float32)
        out[key] = (boxes.reshape(-1, 4), labels, scores)
    return out


def predict_sections(uri: str, cfg: ReportConfig) -> list[tuple[str, str]]:
    settings = run_settings(uri)
    detections_uri = storage.join(uri, "detections.json")
    detections = storage.read_json(detections_uri) if storage.exists(detections_uri) else []
    has_parts = any(n.endswith(".parquet") for n in storage.listdir(storage.join(uri, "parts")))
    by_key = {} if has_parts else detections_by_key(detections)
    entries = detections.get("annotations", []) if isinstance(detections, dict) else detections
    images = {d.get("image_id", d.get("key", d.get("file_name"))) for d in entries}
    kept = sum(1 for d in entries if float(d.get("score", 1.0)) >= cfg.score_threshold)
    summary = table([[len(images), len(entries), kept, _fmt(kept / len(images) if images else 0.0)]],
                    ["images with detections", "detections", f"score ≥ {cfg.score_threshold:g}",
                     f"per image (score ≥ {cfg.score_threshold:g})"])
    corpus = cfg.corpus or settings.get("corpus", "")
    if has_parts:
        def make(c):
            return paired_items(c, part_predictions(uri), cfg.gallery, cfg.score_threshold)
    elif by_key:
        def make(c):
            return paired_items(c, lambda shard: by_key, cfg.gallery, cfg.score_threshold)
    else:
        return [("Summary", summary + settings_details(settings)),
                ("Predictions", note("detections.json names no image keys (file_name/key) and there are no "
                                     "parts/: the gallery cannot place the detections"))]
    names = [c["name"] for c in detections.get("categories", [])] if isinstance(detections, dict) else None
    out = [("Summary", summary + settings_details(settings)),
           (f"Predictions (first {cfg.gallery} images, score ≥ {cfg.score_threshold:g})",
            _gallery_section(cfg, corpus, uri, make, names or None, "predicted"))]
    metrics_uri = storage.join(uri, "metrics.json")
    if storage.exists(metrics_uri):
        out.append(("Evaluation (metrics.json)", evaluation_content(storage.read_json(metrics_uri), names or [])))
    return out


def evaluation_content(metrics: dict, class_names: list[str]) -> str:
    content = scalar_metrics_table(metrics)
    names = class_names or metrics.get("class_names") or []
    columns = per_class_columns(metrics, names)
    if columns:
        content += "<h3>Per-class AP</h3>" + per_class_table(columns, names)
    errors = metrics.get("errors")
    if isinstance(errors, dict) and errors:
        content += table([[shard, ", ".join(f"{k}: {v}" for k, v in kinds.items())] for shard, kinds in errors.items()
                          if isinstance(kinds, dict)], ["shard", "errors"])
    return content


def input_sections(uri: str, cfg: ReportConfig) -> tuple[str, str, dict]:
    """``(kind, HTML of its sections, extra)`` for one input; ``extra`` carries the
    training history for the cross-run comparison."""
    kind = detect_kind(uri)
    extra: dict = {}
    if kind == "training":
        ckpt, status = load_training(uri)
        is_dir = not uri.rstrip("/").endswith((".pt", ".pth"))
        metrics_uri = storage.join(uri, "metrics.json") if is_dir else ""
        metrics = storage.read_json(metrics_uri) if metrics_uri and storage.exists(metrics_uri) else ckpt.get("metrics")
        parts = training_sections(uri, ckpt, run_settings(uri) if is_dir else {}, metrics)
        parts[0] = (parts[0][0], f"<p>{html.escape(status)}</p>" + parts[0][1])
        extra = {"history": ckpt.get("history") or []}
    elif kind == "mining":
        parts = mining_sections(uri, cfg)
    elif kind == "predict":
        parts = predict_sections(uri, cfg)
    else:
        parts = [("Metrics", evaluation_content(storage.read_json(uri), []))]
    return kind, subsections(parts), extra


def build_sections(cfg: ReportConfig) -> tuple[list[tuple[str, str]], list[dict]]:
    """The page's sections (one per input, plus a loss comparison when there are
    several training runs) and ``[{uri, kind}]``."""
    sections, found, histories = [], [], {}
    for uri in cfg.inputs:
        kind, content, extra = input_sections(uri, cfg)
        found.append({"uri": uri, "kind": kind})
        sections.append((f"{kind.capitalize()}: {uri}", content))
        if kind == "training":
            histories[storage.basename(uri) or uri] = extra["history"]
    if len(histories) > 1:
        sections.append(("Training runs compared", charts([svg_curves(
            {name: loss_series(h) for name, h in histories.items()}, "total loss per run", y_label="loss")])))
    return sections, found


def run(cfg: ReportConfig, preamble: Sequence[tuple[str, str]] = ()) -> dict:
    """Write the report; ``preamble`` sections (heading, HTML) go first (the demo's results).
    Returns ``{"output", "inputs": [{uri, kind}], "bytes"}``."""
    cfg.validate()
    cfg.check_paths()
    sections, found = build_sections(cfg)
    page = render(cfg.title, [*preamble, *sections])
    out = report_uri(cfg)
    storage.write_text(out, page)
    return {"output": out, "inputs": found, "bytes": len(page.encode("utf-8"))}

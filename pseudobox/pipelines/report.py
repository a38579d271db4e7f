"""A single self-contained HTML report: results table, training curves, and a gallery of
mined pseudo-boxes next to the ground truth. No external assets: curves are inline SVG,
images are inline PNG."""
from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]


def draw_boxes(image: np.ndarray, boxes, labels, class_names, scale: int = 2) -> str:
    """PNG (base64) of the image, upscaled, with labelled boxes."""
    pil = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    for box, label in zip(np.asarray(boxes).reshape(-1, 4), labels):
        colour = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        draw.text((x1 + 2, y1 + 1), class_names[int(label)], fill=colour)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def svg_curves(series: dict[str, list[tuple[float, float]]], title: str, width: int = 420, height: int = 220) -> str:
    """Line chart of ``{name: [(x, y), ...]}`` as inline SVG."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(0.0, min(ys)), max(ys) or 1.0
    pad = 35

    def tx(x):
        return pad + (x - x0) / max(x1 - x0, 1e-9) * (width - 2 * pad)

    def ty(y):
        return height - pad - (y - y0) / max(y1 - y0, 1e-9) * (height - 2 * pad)

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" style="background:#fff">',
             f'<text x="{pad}" y="15" font-size="12">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="{pad}" y="{height - 20}" font-size="10">{x0:g}</text>',
             f'<text x="{width - pad - 20}" y="{height - 20}" font-size="10">{x1:g}</text>',
             f'<text x="2" y="{pad + 4}" font-size="10">{y1:.3g}</text>',
             f'<text x="2" y="{height - pad}" font-size="10">{y0:.3g}</text>']
    for k, (name, pts) in enumerate(series.items()):
        colour = "rgb(%d,%d,%d)" % PALETTE[k % len(PALETTE)]
        path = " ".join(f"{tx(x):.1f},{ty(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(f'<text x="{width - pad - 110}" y="{pad + 12 * k}" font-size="10" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def loss_series(history: list[dict], key: str = "loss") -> list[tuple[float, float]]:
    return [(row["step"], row[key]) for row in history if key in row]


def table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(title: str, sections: list[tuple[str, str]]) -> str:
    style = ("body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
             ".gallery{display:flex;flex-wrap:wrap;gap:12px}.pair{border:1px solid #ddd;padding:4px}"
             ".pair img{margin:2px}.cap{font-size:11px;color:#555}")
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"


def gallery(items: list[dict], class_names: list[str]) -> str:
    """``items``: dicts with image, gt_boxes, gt_labels, boxes, labels, key."""
    cells = []
    for it in items:
        mined = draw_boxes(it["image"], it["boxes"], it["labels"], class_names)
        gt = draw_boxes(it["image"], it["gt_boxes"], it["gt_labels"], class_names)
        cells.append(f'<div class="pair"><img src="data:image/png;base64,{mined}"><img src="data:image/png;base64,{gt}">'
                     f'<div class="cap">{html.escape(it["key"])}: mined (left) vs ground truth (right)</div></div>')
    return f'<div class="gallery">{"".join(cells)}</div>'

"""CorLoc and recall@0.5 of CAM pseudo-boxes on a corpus with GT boxes, without Ray.

The same ``CamBoxMiner`` the ``mine`` stage runs, over the corpus in order, so the boxes
equal the stage's. Used for the before/after table in ``docs/results.md``:

    python benchmarks/cam_quality.py CORPUS CLASSIFIER [--limit N] [--scales 96 160]
        [--min-side 1] [--max-components 4] [--old-cell-positions]

Run it with ``PYTHONPATH=<checkout of an older commit>`` to measure older code (flags
that the older miner lacks must then be left out).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pseudobox.datasets.corpus import iter_corpus, load_manifest
from pseudobox.mining.cam import CamBoxMiner
from pseudobox.mining.outputs import QUALITY_FIELDS, box_quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("classifier")
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    ap.add_argument("--scales", type=int, nargs="+", default=[96, 160])
    ap.add_argument("--min-side", type=float, default=None)
    ap.add_argument("--max-components", type=int, default=None)
    ap.add_argument("--old-cell-positions", action="store_true",
                    help="ablation: place cells at stride·(i + 0.5) as the code before issue 5 did")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    extra = {k: v for k, v in (("min_side", args.min_side), ("max_components", args.max_components)) if v is not None}
    if args.old_cell_positions:
        from pseudobox.mining import cam

        cam.cell_centres.__defaults__ = (32, 16.0)  # stride, centre: cell middles
    miner = CamBoxMiner(args.classifier, scales=tuple(args.scales), threads=1, **extra)
    classes = load_manifest(args.corpus).classes
    if list(miner.meta["class_names"]) != list(classes):
        raise SystemExit(f"the classifier's classes are not the corpus's ({len(miner.meta['class_names'])} vs "
                         f"{len(classes)}): mine with a classifier trained on {args.corpus}")
    totals = dict.fromkeys(QUALITY_FIELDS, 0)
    n_images = n_boxes = 0
    batch: list[dict] = []
    t0 = time.time()

    def flush() -> None:
        nonlocal n_boxes
        mined = miner.mine([s["image"] for s in batch], [np.asarray(s["labels"]) for s in batch])
        for s, (boxes, labels, scores) in zip(batch, mined):
            q = box_quality(boxes, labels, scores, s["labels"], np.asarray(s["boxes"]), np.asarray(s["box_labels"]))
            for k in totals:
                totals[k] += q[k]
            n_boxes += len(boxes)
        batch.clear()

    for sample in iter_corpus(args.corpus):
        batch.append(sample)
        n_images += 1
        if len(batch) == args.batch:
            flush()
        if args.limit and n_images >= args.limit:
            break
    if batch:
        flush()
    print(f"CorLoc {100 * totals['corloc_hits'] / max(totals['corloc_images'], 1):.1f}%  "
          f"recall@0.5 {100 * totals['gt_recalled'] / max(totals['gt_boxes'], 1):.1f}%  "
          f"{n_boxes / max(n_images, 1):.2f} boxes/image over {n_images} images ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()

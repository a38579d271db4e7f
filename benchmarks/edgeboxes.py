"""EdgeBoxes: the torch implementation against OpenCV's (``cv2.ximgproc``), same run.

Synthetic VOC-size scenes with known boxes (``datasets.synthetic.detection_sample``);
both implementations get the same E and O (``edge_maps``). Prints

* recall of the ground-truth boxes at IoU 0.5 / 0.7 with the first 100 / 1,000 boxes;
* images/s per CPU core (one thread each): edge maps, box search of each backend, and
  edge maps + box search together.

    flock /tmp/pbx-bench.lock python benchmarks/edgeboxes.py [--images 20] [--size 375 500]
        [--max-boxes 1000] [--torch-images N] [--set refine_top=2000 ...] [--device cpu|cuda]

``--torch-images`` limits the images the (slow on CPU) torch search runs on; recall is
then compared on those images only. ``--set`` passes EdgeBoxesConfig fields to the torch
search (ablations of the parallel reformulation).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pseudobox.datasets.synthetic import detection_sample
from pseudobox.mining import edgeboxes as eb


def scenes(n: int, size: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    images, gts = [], []
    for _ in range(n):
        image, boxes, _ = detection_sample(rng, size=size, min_objects=2, max_objects=6)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float().div(255))
        gts.append(torch.from_numpy(boxes))
    return images, gts


def _parse(values: list[str]) -> dict:
    out = {}
    for item in values:
        key, value = item.split("=", 1)
        kind = type(getattr(eb.EdgeBoxesConfig, key))
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--torch-images", type=int, default=0, help="0: all")
    ap.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    ap.add_argument("--max-boxes", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], help="EdgeBoxesConfig fields for the torch search")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    device = torch.device(args.device)
    images, gts = scenes(args.images, tuple(args.size))
    n_torch = args.torch_images or args.images

    def timed(fn):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - start

    maps, t_edges = timed(lambda: [eb.edge_maps(im[None].to(device)) for im in images])
    ocv, t_ocv = timed(lambda: [eb.edge_boxes(E, O, args.max_boxes, backend="opencv")[0] for E, O in maps])
    params = {"backend": "torch", **_parse(args.set)}
    tch, t_torch = timed(lambda: [eb.edge_boxes(E, O, args.max_boxes, **params)[0] for E, O in maps[:n_torch]])

    n = len(images)
    print(f"{n} synthetic scenes {args.size[0]}x{args.size[1]} (2-6 objects), device {device}, 1 thread, "
          f"max_boxes {args.max_boxes}; torch search on {n_torch} images, params {params}")
    print(f"\nrecall of the {sum(len(g) for g in gts[:n_torch])} GT boxes | OpenCV | torch | torch/OpenCV")
    for k in (100, 1000):
        for iou in (0.5, 0.7):
            r_o = eb.proposal_recall(ocv[:n_torch], gts[:n_torch], k, iou)
            r_t = eb.proposal_recall(tch, gts[:n_torch], k, iou)
            print(f"  {k:>4} boxes, IoU {iou}     | {r_o:6.3f} | {r_t:5.3f} | {r_t / max(r_o, 1e-9):6.3f}")
    if n_torch < n:
        print(f"  (OpenCV on all {n}: R@1000 IoU0.7 {eb.proposal_recall(ocv, gts, 1000, 0.7):.3f})")
    print("\nimages/s per core          | edge maps | box search | together")
    e = n / t_edges
    for name, t, m in (("OpenCV search", t_ocv, n), ("torch search", t_torch, n_torch)):
        s = m / t
        print(f"  {name:<24} | {e:9.2f} | {s:10.2f} | {1 / (1 / e + 1 / s):8.2f}")
    print(f"\nmean boxes/image: OpenCV {np.mean([len(b) for b, _ in ocv]):.0f}, "
          f"torch {np.mean([len(b) for b, _ in tch]):.0f}")


if __name__ == "__main__":
    main()

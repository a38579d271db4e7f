"""CAM mining throughput on one device: decode → CAM forward (scales × flip) → boxes.

Measures, in the same process and on the same JPEG-encoded images:
  * batched:  the mining actor's path (``CamBoxMiner.mine``: batched forwards per scale,
              batched ``cam_to_boxes`` on the device);
  * naive:    a per-image loop (one forward per image, scale and flip; scipy labelling
              and a Python loop per CAM, ``cam_to_boxes_reference``);
and prints images/s for each, their ratio, and a per-stage breakdown (decode, forward,
boxes; with ``--profile`` also resize, forward, CAM and box time from the profiler's
``cam.*`` ranges). Models are randomly initialised (throughput does not depend on the
weights). The batched path runs the backbone in ``--precision`` (auto: bf16 on CUDA and
on CPUs with bf16 units, else fp32) with channels_last; the naive loop is always fp32
on a contiguous-format copy of the model.

    python benchmarks/mine_cam.py --device cuda --depth 50 --scales 288 576 --batch-size 64
    python benchmarks/mine_cam.py --device cpu --depth 18 --num-images 32 --image-size 160

``--agreement CORPUS CLASSIFIER`` instead mines a corpus with GT boxes twice, in fp32
without padding and in ``--precision`` (bf16 if auto resolves to fp32) with
``--max-padding``, and prints the share of fp32 boxes matched at IoU >= 0.9 and CorLoc
of each (no timing).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pseudobox.datasets.corpus import decode_image, encode_image  # noqa: E402
from pseudobox.mining.cam import (  # noqa: E402
    CamBoxMiner, cam_to_boxes, matched_boxes, multiscale_cams, resize_short_side,
)
from pseudobox.mining.cam_reference import cam_to_boxes_reference  # noqa: E402
from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402
from pseudobox.models.classifier import build_resnet, class_activation_maps, normalize_images  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    from pseudobox.datasets.synthetic import classification_sample

    rng = np.random.default_rng(seed)
    return [encode_image(classification_sample(rng, "pretrain", (size, size))[0]) for _ in range(n)]


def naive_loop(model, images: list[np.ndarray], labels, scales, flip, device) -> tuple[float, float]:
    """Per image: a forward per scale/flip, then scipy boxes. Returns (forward_s, boxes_s)."""
    t_fwd = t_box = 0.0
    for im, label in zip(images, labels):
        t0 = time.perf_counter()
        x = normalize_images(torch.tensor(im, device=device))
        cams = []
        for s in scales:
            r = resize_short_side(x, s)
            for v in ([r, r.flip(-1)] if flip else [r]):
                cam = class_activation_maps(model, v[None], torch.tensor([0], device=device),
                                            torch.tensor([label], device=device))[0]
                cams.append(cam if v is r else cam.flip(-1))
        size = cams[-1].shape
        cam = torch.stack([torch.nn.functional.interpolate(c[None, None], size=size, mode="bilinear")[0, 0]
                           for c in cams]).mean(0).cpu().numpy()
        sync(device)
        t1 = time.perf_counter()
        cam_to_boxes_reference(cam)
        t_fwd += t1 - t0
        t_box += time.perf_counter() - t1
    return t_fwd, t_box


def profile(miner, jpegs, labels, batch_size: int, device) -> dict:
    """ms per image in each ``cam.*`` profiler range of ``CamBoxMiner.mine`` (decode timed apart)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {"decode": 0.0}
    with torch_profile(activities=activities) as prof:
        for i in range(0, len(jpegs), batch_size):
            t0 = time.perf_counter()
            images = [decode_image(b) for b in jpegs[i: i + batch_size]]
            out["decode"] += time.perf_counter() - t0
            miner.mine(images, labels[i: i + batch_size])
        sync(device)
    out["decode"] *= 1e3
    for event in prof.key_averages():
        if event.key.startswith("cam."):
            out[event.key] = event.cpu_time_total / 1e3  # wall time of the range on the host, ms
    return {k: v / len(jpegs) for k, v in out.items()}


def agreement(args, device) -> None:
    """Box agreement of reduced precision with fp32, and CorLoc of each, on a corpus with GT."""
    from pseudobox.datasets.corpus import iter_corpus
    from pseudobox.mining.outputs import box_quality
    from pseudobox.mining.cam import resolve_precision

    precision = args.precision
    if precision == "auto" and resolve_precision(precision, device) == torch.float32:
        precision = "bf16"
    name = f"{precision}_pad{args.max_padding:g}"
    settings = {"fp32": ("fp32", 0.0), name: (precision, args.max_padding)}  # reference: fp32, unpadded
    miners = {k: CamBoxMiner(args.agreement[1], scales=args.scales, flip=not args.no_flip, device=str(device),
                             precision=p, max_images=args.max_images, max_padding=pad)
              for k, (p, pad) in settings.items()}
    samples = []
    for sample in iter_corpus(args.agreement[0]):
        samples.append(sample)
        if args.agreement_limit and len(samples) >= args.agreement_limit:
            break
    mined = {p: [] for p in miners}
    for i in range(0, len(samples), args.batch_size):
        chunk = samples[i: i + args.batch_size]
        for p, miner in miners.items():
            mined[p] += miner.mine([s["image"] for s in chunk], [np.asarray(s["labels"]) for s in chunk])
    res = {"corpus": args.agreement[0], "classifier": args.agreement[1], "images": len(samples),
           "compared": name, "scales": args.scales}
    for iou in (0.9, 0.5):
        matched, total = matched_boxes(mined["fp32"], mined[name], iou)
        back, other_total = matched_boxes(mined[name], mined["fp32"], iou)
        res[f"fp32_boxes_matched_at_{iou}"] = f"{matched}/{total} = {100 * matched / max(total, 1):.2f}%"
        res[f"{name}_boxes_matched_at_{iou}"] = f"{back}/{other_total} = {100 * back / max(other_total, 1):.2f}%"
    for p, boxes in mined.items():
        hits = images = 0
        for s, (b, lab, sc) in zip(samples, boxes):
            q = box_quality(b, lab, sc, s["labels"], np.asarray(s["boxes"]), np.asarray(s["box_labels"]))
            hits, images = hits + q["corloc_hits"], images + q["corloc_images"]
        res[f"corloc_{p}"] = round(100 * hits / max(images, 1), 2)
    print(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--scales", type=int, nargs="+", default=[288, 576])
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--naive-images", type=int, default=0, help="images for the naive loop (default: min(N, 32))")
    ap.add_argument("--image-size", type=int, default=375, help="synthetic JPEG short side")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--max-images", type=int, default=16, help="images per forward batch (with their flips)")
    ap.add_argument("--max-padding", type=float, default=0.0, help="padded-pixel share allowed to fill a batch")
    ap.add_argument("--profile", action="store_true", help="print the profiler's cam.* ranges for one pass")
    ap.add_argument("--agreement", nargs=2, metavar=("CORPUS", "CLASSIFIER"),
                    help="measure box agreement of --precision with fp32 on this corpus instead of speed")
    ap.add_argument("--agreement-limit", type=int, default=0, help="first N corpus images (0: all)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    flip = not args.no_flip
    if args.agreement:
        return agreement(args, device)

    jpegs = make_images(args.num_images, args.image_size)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = build_resnet(args.depth, num_classes=args.classes)
        ckpt = os.path.join(d, "model.pt")
        save_checkpoint(make_checkpoint("classifier", {"depth": args.depth}, [str(i) for i in range(args.classes)],
                                        model.state_dict()), ckpt)
        miner = CamBoxMiner(ckpt, scales=args.scales, flip=flip, device=str(device), precision=args.precision,
                            max_images=args.max_images, max_padding=args.max_padding)
    naive_model = copy.deepcopy(miner.model).to(memory_format=torch.contiguous_format)  # the old fp32 layout
    rng = np.random.default_rng(0)
    labels = [np.array([int(rng.integers(args.classes))]) for _ in jpegs]

    # Warm-up (kernel selection, allocator).
    warm = [decode_image(b) for b in jpegs[: min(4, len(jpegs))]]
    miner.mine(warm, labels[: len(warm)])
    sync(device)

    # Batched path with a breakdown.
    t_decode = t_fwd = t_box = 0.0
    n_boxes = 0
    for i in range(0, len(jpegs), args.batch_size):
        t0 = time.perf_counter()
        images = [decode_image(b) for b in jpegs[i: i + args.batch_size]]
        labs = labels[i: i + args.batch_size]
        t1 = time.perf_counter()
        with torch.inference_mode():
            tensors = [normalize_images(torch.tensor(im, device=device)) for im in images]
            idx = torch.arange(len(images), device=device)
            lab = torch.as_tensor([int(x[0]) for x in labs], device=device)
            cams, _ = multiscale_cams(miner.model, tensors, idx, lab, tuple(args.scales), flip, dtype=miner.dtype,
                                      **miner.batching)
            sync(device)
            t2 = time.perf_counter()
            out = cam_to_boxes(cams)
            n_boxes += sum(len(b) for b, _ in out)
            sync(device)
        t3 = time.perf_counter()
        t_decode, t_fwd, t_box = t_decode + t1 - t0, t_fwd + t2 - t1, t_box + t3 - t2
    # End to end through the actor's own entry point (decode included).
    t0 = time.perf_counter()
    for i in range(0, len(jpegs), args.batch_size):
        images = [decode_image(b) for b in jpegs[i: i + args.batch_size]]
        miner.mine(images, labels[i: i + args.batch_size])
    sync(device)
    t_e2e = time.perf_counter() - t0
    n = len(jpegs)

    n_naive = args.naive_images or min(n, 32)
    t0 = time.perf_counter()
    naive_images = [decode_image(b) for b in jpegs[:n_naive]]
    t_naive_decode = time.perf_counter() - t0
    with torch.inference_mode():
        naive_fwd, naive_box = naive_loop(naive_model, naive_images, [int(x[0]) for x in labels[:n_naive]],
                                          args.scales, flip, device)
    t_naive = t_naive_decode + naive_fwd + naive_box

    # cam_to_boxes alone vs the scipy reference, on the same CAMs.
    with torch.inference_mode():
        tensors = [normalize_images(torch.tensor(decode_image(b), device=device)) for b in jpegs[: args.batch_size]]
        idx = torch.arange(len(tensors), device=device)
        lab = torch.as_tensor([int(x[0]) for x in labels[: len(tensors)]], device=device)
        cams, _ = multiscale_cams(miner.model, tensors, idx, lab, tuple(args.scales), flip, dtype=miner.dtype,
                                  **miner.batching)
        sync(device)
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            cam_to_boxes(cams)
        sync(device)
        t_batched_boxes = (time.perf_counter() - t0) / reps
        cams_np = cams.float().cpu().numpy()
        t0 = time.perf_counter()
        for c in cams_np:
            cam_to_boxes_reference(c)
        t_ref_boxes = time.perf_counter() - t0

    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "precision": str(miner.dtype).removeprefix("torch."),
        "max_images": args.max_images, "max_padding": args.max_padding, "depth": args.depth, "scales": args.scales, "flip": flip,
        "images": n, "image_short_side": args.image_size, "batch_size": args.batch_size, "cam_shape": list(cams.shape[1:]),
        "batched_images_per_s": n / t_e2e,
        "batched_breakdown_ms_per_image": {"decode": 1e3 * t_decode / n, "forward": 1e3 * t_fwd / n, "boxes": 1e3 * t_box / n},
        "naive_images_per_s": n_naive / t_naive,
        "naive_breakdown_ms_per_image": {"decode": 1e3 * t_naive_decode / n_naive, "forward": 1e3 * naive_fwd / n_naive,
                                         "boxes": 1e3 * naive_box / n_naive},
        "speedup_vs_naive": (n / t_e2e) / (n_naive / t_naive),
        "cam_to_boxes_ms_per_cam": 1e3 * t_batched_boxes / len(cams_np),
        "reference_ms_per_cam": 1e3 * t_ref_boxes / len(cams_np),
        "boxes_speedup_vs_reference": t_ref_boxes / t_batched_boxes,
        "boxes_per_image": n_boxes / n,
    }
    if args.profile:
        res["profile_ms_per_image"] = profile(miner, jpegs[: args.batch_size * 2], labels, args.batch_size, device)
    if device.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    print(json.dumps(res, indent=2))
    print(f"\nbatched {res['batched_images_per_s']:.1f} img/s vs naive per-image loop {res['naive_images_per_s']:.1f} img/s "
          f"(x{res['speedup_vs_naive']:.2f}); cam_to_boxes {res['cam_to_boxes_ms_per_cam']:.3f} ms/CAM vs scipy "
          f"{res['reference_ms_per_cam']:.3f} ms/CAM (x{res['boxes_speedup_vs_reference']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

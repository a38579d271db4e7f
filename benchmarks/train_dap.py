"""DAP pre-training speed: the `pretrain` stage against a plain torchvision loop.

Same model (the demo's Faster R-CNN R18-FPN, multi-scale 64/96/128 px, 300 proposals,
64 RoIs per image), same per-worker batch, same pseudo-boxes, measured side by side in
one process. Paths, in order:

* ``plain``: a single-process torchvision loop over in-memory batches (decode done
  beforehand), fp32 and, with ``--bf16``, under ``torch.autocast("cpu", bfloat16)``;
  with a per-phase breakdown (batch preparation, forward, backward, optimizer step).
* ``worker``: ``train_detector.worker`` run locally (no Ray) over the same in-memory
  batches: what the shared training loop adds to the plain loop.
* ``ingest``: the stage's Ray Data pipeline (read → decode → mined-box join) iterated in
  the driver without training, as ``trainer.dataset_batches`` does: what it costs alone.
* ``ray``: the real ``pretrain`` stage through Ray Train, for each ``--ray-layouts``
  (``2x1``: 2 DDP workers × 1 thread; ``1x2``: 1 worker × 2 threads).

images/s exclude start-up: they come from the loop's own timing windows (history rows;
the first window, which holds the first iterations, is left out). Start-up (Ray,
workers, model build, first window, final checkpoint) is reported separately as
wall time minus the timed steps.

Inputs are a demo or ``bench dap`` work directory (``corpus``, ``boxes``, ``classifier``):

    python benchmarks/train_dap.py --workdir /work/bench-dap --iters 40 --bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pseudobox.config import to_dict  # noqa: E402
from pseudobox.datasets.corpus import iter_corpus, load_manifest  # noqa: E402
from pseudobox.datasets.ray_io import object_array  # noqa: E402
from pseudobox.engine import OptimConfig  # noqa: E402
from pseudobox.models.checkpoint import load_checkpoint  # noqa: E402
from pseudobox.models.detectors import DetectorArch, build_detector, init_backbone_from_classifier  # noqa: E402
from pseudobox.pipelines import pretrain, train_detector, trainer  # noqa: E402
from pseudobox.pipelines.common import RayConfig, init_ray  # noqa: E402


def demo_arch(image_size: int, depth: int) -> DetectorArch:
    """The demo's DAP pre-training detector (``pipelines/demo.py``: ``_arch``, ``pretrain_chain``)."""
    s = image_size
    return DetectorArch(detector="faster_rcnn", depth=depth, frozen_bn=True, freeze_at=1,
                        min_size=(s * 2 // 3, s, s * 4 // 3), max_size=4 * s, test_size=s,
                        rpn_post_nms_top_n_train=300, box_batch_size_per_image=64)


def demo_optim(iters: int, batch_size: int, log_every: int, amp: bool) -> OptimConfig:
    """The demo's pre-training optimizer settings, with one checkpoint at the end only."""
    return OptimConfig(lr=0.01, max_iters=iters, batch_size=batch_size, warmup_iters=min(50, max(1, iters // 3)),
                       grad_clip=10.0, checkpoint_every=iters, log_every=log_every, amp=amp)


def load_batches(corpus: str, boxes: str, num_images: int, batch_size: int) -> list[dict]:
    """Decoded images joined with their mined boxes, in numpy batches shaped like the
    stage's Ray Data batches (images without a box dropped, as the stage does)."""
    rows = []
    for s in iter_corpus(corpus):
        rows.append(s)
        if len(rows) >= num_images:
            break
    raw = {"key": np.asarray([r["key"] for r in rows], object), "shard": np.asarray([r["shard"] for r in rows], object),
           "image": object_array([r["image"] for r in rows])}
    joined = pretrain.attach_mined_boxes(raw, boxes)
    n = len(joined["key"])
    return [{k: v[i:i + batch_size] for k, v in joined.items()} for i in range(0, n - batch_size + 1, batch_size)]


def steady_rate(history: list[dict], images_per_step: int) -> tuple[float, float, int]:
    """(images/s, timed seconds, timed steps) over the history rows after the first."""
    steps = [r["step"] for r in history]
    seconds, n = 0.0, 0
    for prev, row in zip(steps, history[1:]):
        k = row["step"] - prev
        seconds += row["s_per_iter"] * k
        n += k
    return (images_per_step * n / seconds if seconds else 0.0), seconds, n


def plain_loop(arch: DetectorArch, classes: list[str], classifier: dict, batches: list[dict], iters: int,
               warmup: int, threads: int, dtype: torch.dtype | None, channels_last: bool = False) -> dict:
    """A plain single-process torchvision training loop; images/s and ms per phase."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_detector(arch, len(classes))
    init_backbone_from_classifier(model, classifier, arch)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    model.train()
    phases = {"prepare": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}
    images, losses_seen, t_start = 0, [], 0.0
    for i in range(warmup + iters):
        if i == warmup:
            phases = dict.fromkeys(phases, 0.0)
            images, t_start = 0, time.perf_counter()
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        ims, targets = train_detector.detection_targets(batch, "cpu", rng)
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses = model(ims, targets)
        loss = sum(losses.values())
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        t4 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name] += dt
        images += len(ims)
        losses_seen.append(float(loss.detach()))
    seconds = time.perf_counter() - t_start
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images,
            "ms_per_iter": {k: round(1000 * v / iters, 1) for k, v in phases.items()},
            "loss_first": losses_seen[0], "loss_last_mean": float(np.mean(losses_seen[-5:])),
            "finite": bool(np.all(np.isfinite(losses_seen)))}


def worker_config(arch, optim, classes, classifier_uri, threads) -> dict:
    return {"arch": to_dict(arch), "optim": to_dict(optim), "class_names": classes,
            "init": {"classifier": classifier_uri}, "method": "dap", "stage": "pretrain", "seed": 0,
            "config": {}, "threads": threads, "use_gpu": False}


def local_worker(arch, optim, classes, classifier_uri, batches_fn, threads) -> dict:
    """``train_detector.worker`` without Ray (local_dir mode) over ``batches_fn``."""
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        history = train_detector.worker(worker_config(arch, optim, classes, classifier_uri, threads),
                                        local_dir=d, batches=batches_fn)
        wall = time.perf_counter() - t0
    rate, timed, steps = steady_rate(history, optim.batch_size)
    return {"images_per_s": rate, "timed_s": timed, "timed_steps": steps, "startup_s": wall - timed,
            "wall_s": wall, "loss_last": history[-1]["loss"]}


def stage_dataset(corpus: str, boxes: str):
    """The ``pretrain`` stage's Ray dataset, built as ``pretrain.run`` builds it."""
    from pseudobox.datasets.ray_io import decoded_corpus

    return decoded_corpus(corpus, keep_errors=False, shuffle=True).map_batches(
        pretrain.attach_mined_boxes, fn_kwargs={"boxes_uri": boxes, "min_score": 0.0}, batch_format="numpy",
        num_cpus=1)


def ingest_only(corpus: str, boxes: str, batch_size: int, max_images: int) -> dict:
    """Iterate the stage's dataset as a training worker does, without training."""
    ds = stage_dataset(corpus, boxes)
    t0 = time.perf_counter()
    first, images = None, 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2,
                                 local_shuffle_buffer_size=16 * batch_size):
        if first is None:
            first = time.perf_counter()
        images += len(batch["key"])
        if images >= max_images:
            break
    end = time.perf_counter()
    return {"images_per_s": (images - batch_size) / (end - first) if end > first else 0.0,
            "first_batch_s": first - t0, "images": images}


def ray_stage(args, arch, layout: str, out_dir: str) -> dict:
    """The real ``pretrain`` stage on Ray Train with ``layout`` = ``<workers>x<threads>``."""
    workers, threads = (int(x) for x in layout.split("x"))
    optim = demo_optim(args.ray_iters, args.batch_size, args.log_every, args.ray_amp)
    cfg = pretrain.PretrainConfig(
        corpus=args.corpus, boxes=args.boxes, classifier=args.classifier, output=os.path.join(out_dir, layout),
        model=arch, optim=optim, seed=0, ray=RayConfig(num_cpus=args.ray_cpus),
        workers=trainer.WorkersConfig(num_workers=workers, use_gpu="false", cpus_per_worker=threads, max_failures=0))
    t0 = time.perf_counter()
    ckpt = pretrain.run(cfg)
    wall = time.perf_counter() - t0
    rate, timed, steps = steady_rate(ckpt["history"], args.batch_size * workers)
    return {"images_per_s": rate, "timed_s": timed, "timed_steps": steps, "startup_s": wall - timed,
            "wall_s": wall, "loss_last": ckpt["history"][-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/work/bench-dap", help="a demo / bench dap work directory")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--depth", type=int, default=18)
    ap.add_argument("--batch-size", type=int, default=4, help="per worker, as the demo's detector_batch_size")
    ap.add_argument("--threads", type=int, default=2, help="threads of the plain loop and the local worker")
    ap.add_argument("--iters", type=int, default=30, help="timed iterations of the plain loop")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--num-images", type=int, default=256, help="images held in memory for plain/worker")
    ap.add_argument("--bf16", action="store_true", help="also the plain loop (and worker) under CPU bf16 autocast")
    ap.add_argument("--channels-last", action="store_true", help="also the plain loop in channels_last")
    ap.add_argument("--paths", nargs="+", default=["plain", "worker", "ingest", "ray"],
                    choices=["plain", "worker", "ingest", "ray"])
    ap.add_argument("--ray-layouts", nargs="+", default=["2x1", "1x2"])
    ap.add_argument("--ray-iters", type=int, default=40)
    ap.add_argument("--ray-cpus", type=int, default=max(4, os.cpu_count() or 2),
                    help="logical CPUs of the local Ray instance (the demo: max(4, cores))")
    ap.add_argument("--ray-amp", action="store_true", help="optim.amp in the Ray stage (default off: fp32)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    args.corpus, args.boxes = os.path.join(args.workdir, "corpus"), os.path.join(args.workdir, "boxes")
    args.classifier = os.path.join(args.workdir, "classifier")

    arch = demo_arch(args.image_size, args.depth)
    classes = load_manifest(args.corpus).classes
    results: dict = {"args": vars(args), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                     "cpu_bf16": {k: v for k, v in torch.cpu.get_capabilities().items()
                                  if k in ("avx512_bf16", "amx_bf16", "avx2")}}

    def show(name, r):
        results[name] = r
        print(f"{name:<28} {r['images_per_s']:6.2f} img/s  " + json.dumps(
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "images_per_s"}),
              flush=True)

    need_batches = {"plain", "worker"} & set(args.paths)
    batches = load_batches(args.corpus, args.boxes, args.num_images, args.batch_size) if need_batches else []
    classifier = load_checkpoint(args.classifier, expect_type="classifier") if "plain" in args.paths else None
    dtypes = [("fp32", None)] + ([("bf16", torch.bfloat16)] if args.bf16 else [])
    if "plain" in args.paths:
        show("plain 1 thread fp32", plain_loop(arch, classes, classifier, batches, args.iters, args.warmup, 1, None))
        for name, dtype in dtypes:
            show(f"plain {args.threads} threads {name}",
                 plain_loop(arch, classes, classifier, batches, args.iters, args.warmup, args.threads, dtype))
            if args.channels_last:
                show(f"plain {args.threads} threads {name} CL",
                     plain_loop(arch, classes, classifier, batches, args.iters, args.warmup, args.threads, dtype,
                                channels_last=True))
    if "worker" in args.paths:
        for name, dtype in dtypes:
            optim = demo_optim(args.iters + args.log_every, args.batch_size, args.log_every, amp=dtype is not None)
            show(f"worker local {args.threads} threads {name}",
                 local_worker(arch, optim, classes, args.classifier, lambda: iter(batches), args.threads))
    if {"ingest", "ray"} & set(args.paths):
        init_ray(RayConfig(num_cpus=args.ray_cpus))
    if "ingest" in args.paths:
        show("ingest only (Ray Data)", ingest_only(args.corpus, args.boxes, args.batch_size, 400))
    if "ray" in args.paths:
        with tempfile.TemporaryDirectory() as d:
            for layout in args.ray_layouts:
                show(f"ray stage {layout}{' amp' if args.ray_amp else ''} (cpus={args.ray_cpus})",
                     ray_stage(args, arch, layout, d))
    base = results.get(f"plain {args.threads} threads fp32")
    if base:
        print("\nratios against the plain loop, fp32, same cores:")
        for name, r in results.items():
            if isinstance(r, dict) and "images_per_s" in r and name != f"plain {args.threads} threads fp32":
                print(f"  {name:<40} {r['images_per_s'] / base['images_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

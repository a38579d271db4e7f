"""What Ray costs the mining stage on CPU, and what a second actor buys: the whole `mine`
stage (Ray Data read → CamBoxMiner actor pool that decodes its own batches → per-shard
parquet parts and reports) against the plain PyTorch loop over the same corpus in one
process (decode → ``CamBoxMiner.mine``), same model, same settings, one CPU thread per
actor and for the loop, measured side by side in one run.

    python benchmarks/ray_overhead.py --num-images 512 --actors 1 2

Start-up is reported on its own: ``init_ray``, and for each run the time to its first
output batch (actor start, model load, first read). "steady" rates count the images
after the first output batch over the time from it to the last one. ``--separate-decode``
adds the previous pipeline (decode as its own CPU task stage, decoded images through the
object store) for the profile; ``--ray-cpus`` the logical CPUs Ray gets (default: the
physical cores, as ``pseudobox`` does); ``--stats`` prints Ray Data's per-operator stats.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pseudobox.datasets import ray_io  # noqa: E402
from pseudobox.datasets.corpus import iter_corpus, load_manifest  # noqa: E402
from pseudobox.mining import outputs  # noqa: E402
from pseudobox.mining.cam import CamBoxMiner  # noqa: E402
from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402
from pseudobox.models.classifier import build_resnet  # noqa: E402
from pseudobox.pipelines import common, mine  # noqa: E402
from pseudobox.pipelines.build_corpus import BuildCorpusConfig, SyntheticConfig, run as build  # noqa: E402


class Timeline:
    """Times at which output batches (and their images) reached the driver."""

    def __init__(self):
        self.start = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def add(self, images: int) -> None:
        self.marks.append((time.perf_counter(), images))

    def summary(self) -> dict:
        end = self.marks[-1][0] if self.marks else time.perf_counter()
        first_t, first_n = self.marks[0] if self.marks else (end, 0)
        total = sum(n for _, n in self.marks)
        steady_s = end - first_t
        return {"seconds": end - self.start, "images": total, "first_output_s": first_t - self.start,
                "rate": total / max(end - self.start, 1e-9),
                "steady_rate": (total - first_n) / steady_s if steady_s > 0 else float("nan")}


def plain_loop(corpus: str, ckpt: str, scales, batch_size: int) -> dict:
    """The same work without Ray: PIL decode → ``CamBoxMiner.mine`` per batch, 1 thread."""
    torch.set_num_threads(1)
    miner = CamBoxMiner(ckpt, scales=scales, threads=1)
    timeline = Timeline()
    images, labels = [], []
    for s in iter_corpus(corpus):
        images.append(s["image"])
        labels.append(s["labels"])
        if len(images) == batch_size:
            miner.mine(images, labels)
            timeline.add(len(images))
            images, labels = [], []
    if images:
        miner.mine(images, labels)
        timeline.add(len(images))
    return timeline.summary()


def ray_run(corpus: str, ckpt: str, out: str, scales, batch_size: int, actors: int, separate_decode: bool) -> dict:
    """One ``mine`` stage run (or, with ``separate_decode``, the pipeline before the fused
    decode), timing each output batch as the driver's writer receives it."""
    timeline = Timeline()
    add_batch = outputs.ShardPartWriter.add_batch

    def timed_add_batch(self, batch):
        done = add_batch(self, batch)
        timeline.add(sum(1 for k in batch["key"] if not str(k).startswith("__")))
        return done

    outputs.ShardPartWriter.add_batch = timed_add_batch
    try:
        cfg = mine.MineConfig(corpus=corpus, checkpoint=ckpt, output=out, cam=mine.CamConfig(scales=tuple(scales)),
                              batch_size=batch_size, min_actors=actors, max_actors=actors, use_gpu="false",
                              export_coco=False)
        if not separate_decode:
            mine.run(cfg)
        else:
            manifest = load_manifest(corpus)
            ds = ray_io.decoded_corpus(corpus, keep_errors=True, batch_size=batch_size)
            expected = {s.name: s.num_samples for s in manifest.shards}
            cam = {"checkpoint_uri": ckpt, "scales": tuple(scales)}
            common.run_shard_pool(ds, CamBoxMiner, cam, cfg, False, outputs.ShardPartWriter(out, expected, "cam"),
                                  "mine", expected)
    finally:
        outputs.ShardPartWriter.add_batch = add_batch
    return timeline.summary()


def line(name: str, r: dict) -> str:
    return (f"{name:<44} {r['rate']:6.1f} img/s  {r['seconds']:6.1f} s  first output {r['first_output_s']:5.1f} s  "
            f"steady {r['steady_rate']:6.1f} img/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--samples-per-shard", type=int, default=64)
    ap.add_argument("--scales", type=int, nargs="+", default=[96, 160])
    ap.add_argument("--depth", type=int, default=18)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to run (1 thread each)")
    ap.add_argument("--ray-cpus", type=int, default=0, help="Ray's logical CPUs (0: physical cores)")
    ap.add_argument("--separate-decode", action="store_true", help="also run decode as its own task stage")
    ap.add_argument("--stats", action="store_true", help="print Ray Data's stats after each Ray run")
    args = ap.parse_args()
    if args.stats:
        stats_log = logging.getLogger("pseudobox.ray_stats")
        stats_log.setLevel(logging.DEBUG)
        stats_log.addHandler(logging.StreamHandler(sys.stdout))
    results = {}
    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "corpus")
        manifest = build(BuildCorpusConfig(builder="synthetic", output=corpus, samples_per_shard=args.samples_per_shard,
                                           synthetic=SyntheticConfig(num_images=args.num_images,
                                                                     image_size=args.image_size)))
        ckpt = os.path.join(d, "cls.pt")
        torch.manual_seed(0)
        save_checkpoint(make_checkpoint("classifier", {"depth": args.depth}, manifest.classes,
                                        build_resnet(args.depth, num_classes=len(manifest.classes)).state_dict()), ckpt)

        results["plain PyTorch loop (1 thread)"] = plain = plain_loop(corpus, ckpt, args.scales, args.batch_size)
        print(line("plain PyTorch loop (1 thread)", plain), flush=True)
        t0 = time.perf_counter()
        common.init_ray(common.RayConfig(num_cpus=args.ray_cpus))
        t_init = time.perf_counter() - t0
        import ray

        print(f"init_ray: {t_init:.1f} s, Ray CPUs {ray.cluster_resources().get('CPU')}", flush=True)
        runs = [(a, False) for a in args.actors] + ([(args.actors[0], True)] if args.separate_decode else [])
        for i, (actors, separate) in enumerate(runs):
            name = f"Ray mine, {actors} actor(s)" + (", decode as a task stage" if separate else "")
            results[name] = r = ray_run(corpus, ckpt, os.path.join(d, f"mined{i}"), args.scales, args.batch_size,
                                        actors, separate)
            print(line(name, r), flush=True)
    print(f"\nimages: {args.num_images}, {args.image_size} px, ResNet-{args.depth}, scales {args.scales}, "
          f"batch {args.batch_size}")
    for name, r in results.items():
        if name.startswith("Ray"):
            print(f"{name}: Ray/plain {r['rate'] / plain['rate']:.2f} end to end (after init_ray), "
                  f"{r['steady_rate'] / plain['steady_rate']:.2f} steady")
    one, two = results.get("Ray mine, 1 actor(s)"), results.get("Ray mine, 2 actor(s)")
    if one and two:
        print(f"2 actors / 1 actor: {two['rate'] / one['rate']:.2f} end to end, "
              f"{two['steady_rate'] / one['steady_rate']:.2f} steady")


if __name__ == "__main__":
    main()

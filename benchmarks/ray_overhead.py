"""What Ray costs the mining stage on CPU: the full `mine` stage (Ray Data read →
decode → CamBoxMiner actor pool → per-shard parquet parts) against the plain PyTorch
loop over the same corpus in one process (decode → ``CamBoxMiner.mine``), same model,
same settings, measured side by side in one run.

    python benchmarks/ray_overhead.py --num-images 256 --image-size 96 --scales 96 160
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pseudobox.datasets.corpus import iter_corpus  # noqa: E402
from pseudobox.mining.cam import CamBoxMiner  # noqa: E402
from pseudobox.models.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402
from pseudobox.models.classifier import build_resnet  # noqa: E402
from pseudobox.pipelines import mine  # noqa: E402
from pseudobox.pipelines.build_corpus import BuildCorpusConfig, SyntheticConfig, run as build  # noqa: E402
from pseudobox.pipelines.common import RayConfig, init_ray  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--scales", type=int, nargs="+", default=[96, 160])
    ap.add_argument("--depth", type=int, default=18)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--actors", type=int, default=1, help="actors (each one CPU thread)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "corpus")
        manifest = build(BuildCorpusConfig(builder="synthetic", output=corpus, samples_per_shard=64,
                                           synthetic=SyntheticConfig(num_images=args.num_images,
                                                                     image_size=args.image_size)))
        ckpt = os.path.join(d, "cls.pt")
        torch.manual_seed(0)
        save_checkpoint(make_checkpoint("classifier", {"depth": args.depth}, manifest.classes,
                                        build_resnet(args.depth, num_classes=len(manifest.classes)).state_dict()), ckpt)

        torch.set_num_threads(args.actors)
        miner = CamBoxMiner(ckpt, scales=args.scales, threads=args.actors)
        t0 = time.perf_counter()
        batch_images, batch_labels = [], []
        for s in iter_corpus(corpus):
            batch_images.append(s["image"])
            batch_labels.append(s["labels"])
            if len(batch_images) == args.batch_size:
                miner.mine(batch_images, batch_labels)
                batch_images, batch_labels = [], []
        if batch_images:
            miner.mine(batch_images, batch_labels)
        t_plain = time.perf_counter() - t0

        init_ray(RayConfig(num_cpus=args.actors + 1))
        t0 = time.perf_counter()
        mine.run(mine.MineConfig(corpus=corpus, checkpoint=ckpt, output=os.path.join(d, "mined"),
                                 cam=mine.CamConfig(scales=tuple(args.scales)), batch_size=args.batch_size,
                                 min_actors=args.actors, max_actors=args.actors, use_gpu="false", export_coco=False))
        t_ray = time.perf_counter() - t0
    n = args.num_images
    print(f"plain PyTorch loop: {n / t_plain:.1f} img/s ({t_plain:.1f} s)")
    print(f"Ray mine stage:     {n / t_ray:.1f} img/s ({t_ray:.1f} s, {args.actors} actor(s), start-up included)")
    print(f"ratio Ray/plain:    {t_plain / t_ray:.2f}")


if __name__ == "__main__":
    main()

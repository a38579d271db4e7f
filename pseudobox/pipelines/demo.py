"""``pseudobox demo``: the whole DAP chain on a synthetic corpus, on a laptop.

1. start local Ray; 2. build a classification corpus (pre-training classes) and a
detection set (other classes); 3. train the classifier; 4. mine CAM boxes (CorLoc);
5. DAP pre-train; 6. fine-tune CLS-init and DAP-init detectors on a k-shot split;
7. print and write the results (``WORKDIR/report.html``, ``WORKDIR/results.json``).
Every step is the same stage function the CLI runs, with small settings. Steps 1-5 are
``pretrain_chain``, which ``pseudobox bench dap`` (``pipelines/bench.py``) shares.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from pseudobox import storage
from pseudobox.config import path_field, require
from pseudobox.engine import OptimConfig
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import (
    build_corpus, finetune, mine, pretrain, report, split, train_classifier, trainer,
)
from pseudobox.pipelines.common import RayConfig, init_ray, log


@dataclass
class DemoConfig:
    workdir: str = path_field("./pseudobox-demo")
    image_size: int = 96
    pretrain_images: int = 1200
    downstream_images: int = 300
    test_images: int = 200
    kshot: int = 10
    depth: int = 18
    detector: str = "faster_rcnn"
    classifier_iters: int = 300
    pretrain_iters: int = 150
    finetune_iters: int = 100
    batch_size: int = 8           # classifier, per worker
    detector_batch_size: int = 4  # detectors, per worker
    cam_scales: tuple[int, ...] = (96, 160)
    num_workers: int = 2
    seed: int = 0
    ray: RayConfig = field(default_factory=lambda: RayConfig(num_cpus=max(4, os.cpu_count() or 2)))

    def validate(self) -> None:
        require(self.image_size >= 64, "image_size must be >= 64")
        require(self.kshot >= 1 and self.num_workers >= 1, "kshot and num_workers must be >= 1")
        require(min(self.classifier_iters, self.pretrain_iters, self.finetune_iters) >= 1, "iters must be >= 1")
        self.ray.validate()


def _workers(cfg: DemoConfig) -> trainer.WorkersConfig:
    return trainer.WorkersConfig(num_workers=cfg.num_workers, use_gpu="auto", cpus_per_worker=1, max_failures=1)


def _arch(cfg: DemoConfig, min_sizes) -> DetectorArch:
    return DetectorArch(detector=cfg.detector, depth=cfg.depth, frozen_bn=True, freeze_at=1,
                        min_size=tuple(min_sizes), max_size=4 * cfg.image_size, test_size=cfg.image_size,
                        rpn_post_nms_top_n_train=300, box_batch_size_per_image=64)


def _optim(cfg: DemoConfig, iters: int, lr: float, batch_size: int) -> OptimConfig:
    return OptimConfig(lr=lr, max_iters=iters, batch_size=batch_size, warmup_iters=min(50, max(1, iters // 3)),
                       grad_clip=10.0, checkpoint_every=max(iters // 2, 1), log_every=max(iters // 30, 1))


SHARED = ("corpus", "downstream", "test", "classifier", "boxes", "dap")
# (name in results, FinetuneConfig.init, shared checkpoint, output directory)
ARMS = (("CLS", "classifier", "classifier", "ft-cls"), ("DAP", "detector", "dap", "ft-dap"))


class Steps:
    """Runs named steps, logging and timing each one."""

    def __init__(self, prefix: str):
        self.prefix, self.timings = prefix, {}

    def __call__(self, name: str, fn):
        t = time.time()
        log.info("%s: %s ...", self.prefix, name)
        out = fn()
        self.timings[name] = round(time.time() - t, 1)
        log.info("%s: %s done in %.1fs", self.prefix, name, self.timings[name])
        return out


def pretrain_chain(cfg: DemoConfig, step: Steps) -> dict:
    """Steps 1-5, shared by the demo and the benchmarks: corpora, classifier, CAM boxes,
    DAP pre-training under ``cfg.workdir``. Each stage resumes from what it finds there.
    Returns ``{"paths", "mining", "cls_ckpt", "dap_ckpt"}``."""
    w = os.path.abspath(cfg.workdir)
    p = {name: os.path.join(w, name) for name in SHARED}
    storage.makedirs(w)
    init_ray(cfg.ray)
    size = cfg.image_size

    def build(out, style, classes, n, seed):
        if storage.exists(os.path.join(out, "corpus.json")):
            return
        build_corpus.run(build_corpus.BuildCorpusConfig(
            builder="synthetic", output=out, samples_per_shard=200,
            synthetic=build_corpus.SyntheticConfig(style=style, classes=classes, num_images=n,
                                                   image_size=size, seed=seed)))

    step("build corpora", lambda: (build(p["corpus"], "classification", "pretrain", cfg.pretrain_images, cfg.seed),
                                   build(p["downstream"], "detection", "downstream", cfg.downstream_images, cfg.seed + 1),
                                   build(p["test"], "detection", "downstream", cfg.test_images, cfg.seed + 2)))
    cls_ckpt = step("train classifier", lambda: train_classifier.run(train_classifier.TrainClassifierConfig(
        corpus=p["corpus"], output=p["classifier"],
        model=train_classifier.ClassifierModelConfig(depth=cfg.depth),
        optim=_optim(cfg, cfg.classifier_iters, 0.1, cfg.batch_size), image_size=size, workers=_workers(cfg), ray=cfg.ray)))
    mining = step("mine CAM boxes", lambda: mine.run(mine.MineConfig(
        corpus=p["corpus"], checkpoint=p["classifier"], output=p["boxes"],
        cam=mine.CamConfig(scales=cfg.cam_scales), batch_size=32, min_actors=1, max_actors=2, ray=cfg.ray)))
    log.info("%s: CAM boxes: CorLoc %.1f%%, recall@0.5 %.1f%%", step.prefix, mining["corloc"] or 0,
             mining["recall50"] or 0)
    dap_ckpt = step("DAP pre-train", lambda: pretrain.run(pretrain.PretrainConfig(
        corpus=p["corpus"], boxes=p["boxes"], classifier=p["classifier"], output=p["dap"],
        model=_arch(cfg, (size * 2 // 3, size, size * 4 // 3)), optim=_optim(cfg, cfg.pretrain_iters, 0.01, cfg.detector_batch_size),
        workers=_workers(cfg), seed=cfg.seed, ray=cfg.ray)))
    return {"paths": p, "mining": mining, "cls_ckpt": cls_ckpt, "dap_ckpt": dap_ckpt}


def make_split(cfg: DemoConfig, p: dict, output: str, seed: int) -> dict:
    """Step 6a: the seeded k-shot split of the downstream set."""
    return split.run(split.SplitConfig(corpus=p["downstream"], output=output, k=cfg.kshot, seed=seed))


def finetune_config(cfg: DemoConfig, p: dict, arm: tuple, split_uri: str, out_dir: str,
                    seed: int) -> finetune.FinetuneConfig:
    """Step 6b for one arm of ``ARMS``: fine-tune on the split into ``out_dir/<arm dir>``."""
    _, init, ckpt, out = arm
    size = cfg.image_size
    return finetune.FinetuneConfig(
        corpus=p["downstream"], split=split_uri, init=init, checkpoint=p[ckpt], output=os.path.join(out_dir, out),
        eval_corpus=p["test"], model=_arch(cfg, (size * 3 // 4, size, size * 5 // 4)),
        optim=_optim(cfg, cfg.finetune_iters, 0.01, cfg.detector_batch_size), workers=_workers(cfg), seed=seed,
        ray=cfg.ray)


def mining_summary(mining: dict) -> dict:
    return {k: mining[k] for k in ("corloc", "recall50", "boxes_per_image", "ok", "errors")}


def run(cfg: DemoConfig) -> dict:
    t0 = time.time()
    step = Steps("demo")
    shared = pretrain_chain(cfg, step)
    p, w = shared["paths"], os.path.abspath(cfg.workdir)
    split_uri = os.path.join(w, "split.json")
    step("k-shot split", lambda: make_split(cfg, p, split_uri, cfg.seed))
    results = {}
    for arm in ARMS:
        ft = finetune_config(cfg, p, arm, split_uri, w, cfg.seed)
        results[arm[0]] = step(f"fine-tune {arm[0]}-init", lambda: finetune.run(ft))

    summary = {"mining": mining_summary(shared["mining"]),
               "finetune": {k: v["metrics"] for k, v in results.items()}, "seconds": step.timings,
               "total_seconds": round(time.time() - t0, 1), "config": {"kshot": cfg.kshot, "depth": cfg.depth,
                                                                      "detector": cfg.detector}}
    storage.write_json(os.path.join(w, "results.json"), summary)
    write_report(cfg, w, p, summary)
    print(format_table(summary))
    print(f"report: {os.path.join(w, 'report.html')}")
    return summary


def format_table(summary: dict) -> str:
    m = summary["mining"]
    lines = [f"pseudo-boxes: CorLoc {m['corloc']:.1f}%  recall@0.5 {m['recall50']:.1f}%  "
             f"{m['boxes_per_image']:.2f} boxes/image over {m['ok']} images",
             f"{'init':<6}{'AP':>7}{'AP50':>7}{'AP75':>7}{'VOC AP50':>10}"]
    for name, r in summary["finetune"].items():
        lines.append(f"{name:<6}{r['AP']:>7.1f}{r['AP50']:>7.1f}{r['AP75']:>7.1f}{r['VOC_AP50']:>10.1f}")
    lines.append(f"total {summary['total_seconds']:.0f}s")
    return "\n".join(lines)


def write_report(cfg, workdir, p, summary) -> None:
    """``WORKDIR/report.html``: the results tables, then the ``report`` stage's sections for
    the classifier, the mined boxes, DAP pre-training and both fine-tunes."""
    m = summary["mining"]
    rows = [[name, f"{r['AP']:.1f}", f"{r['AP50']:.1f}", f"{r['AP75']:.1f}", f"{r['VOC_AP50']:.1f}",
             f"{r['VOC_AP50_07']:.1f}"] for name, r in summary["finetune"].items()]
    preamble = [
        ("Pseudo-box quality (CAM)", report.table(
            [[f"{m['corloc']:.1f}", f"{m['recall50']:.1f}", f"{m['boxes_per_image']:.2f}", m["ok"], m["errors"]]],
            ["CorLoc %", "recall@0.5 %", "boxes/image", "images", "errors"])),
        (f"{cfg.kshot}-shot fine-tuning on the downstream classes", report.table(
            rows, ["init", "AP", "AP50", "AP75", "VOC AP50", "VOC AP50 (07)"])),
        ("Stage timings (s)", report.table([[k, v] for k, v in summary["seconds"].items()], ["stage", "seconds"])),
    ]
    inputs = [p["classifier"], p["boxes"], p["dap"], *(os.path.join(workdir, arm[3]) for arm in ARMS)]
    report.run(report.ReportConfig(inputs=inputs, output=os.path.join(workdir, "report.html"), title="pseudobox demo"),
               preamble=preamble)

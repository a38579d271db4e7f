"""``pseudobox bench ssod``: semi-supervised methods against ``supervised`` over N seeds.

On a synthetic detection set (``WORKDIR/train``: labelled at ``labeled_percent`` by a
seeded split, the rest unlabelled; ``WORKDIR/test``), each method in ``methods`` and the
``supervised`` baseline on the same detector (Faster R-CNN for mean-teacher, FCOS for
dense-teacher) are fine-tuned with ``finetune-ssod`` from the same initialisation, for
each seed (split fold and training seed). Every arm is the real stage (Ray Data streams,
Ray Train workers).

Reported (``WORKDIR/bench-ssod.{json,md}`` and printed): AP and AP50 mean ± std per arm,
the paired difference against the same detector's ``supervised`` with its 95% interval,
wall time per arm, and the semi-supervised step's cost as a multiple of the supervised
one's (seconds per step after burn-in, same labelled batch; and per image seen).
Finished arms are recorded in ``WORKDIR/seed-<s>/results.json`` and reused on a re-run.
"""
from __future__ import annotations

import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from pseudobox import storage
from pseudobox.config import path_field, require, to_dict
from pseudobox.engine import OptimConfig
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines import build_corpus, demo, finetune_ssod, split, trainer
from pseudobox.pipelines.bench import CONFIDENCE, _f, mean_std, paired_summary, publish
from pseudobox.pipelines.common import RayConfig, init_ray, log
from pseudobox.ssod.methods import METHODS, SsodConfig

METRICS = (("AP", "AP"), ("AP50", "AP50"))


@dataclass
class BenchSsodConfig:
    workdir: str = path_field("./pseudobox-bench-ssod")
    methods: list[str] = field(default_factory=lambda: ["mean-teacher", "dense-teacher"])
    # The initialisation of every arm: a classifier checkpoint (e.g. a demo's classifier/model.pt).
    # Empty: the bench trains the demo's classifier under WORKDIR/classifier first.
    classifier: str = path_field()
    image_size: int = 96
    train_images: int = 200
    test_images: int = 100
    labeled_percent: float = 10.0
    depth: int = 18
    iters: int = 160
    burn_in_iters: int = 80
    lr: float = 0.01              # Faster R-CNN arms
    fcos_lr: float = 0.0025       # FCOS arms: at 0.01 with 2 images per step its box branch dies (docs/methods.md)
    batch_size: int = 2           # labelled images per worker and step
    unlabeled_ratio: int = 2      # the stage's default is 4; 2 halves the bench's time on a 2-core machine
    unsup_weight: float = 2.0     # Dense Teacher's weight outside 10% COCO; Unbiased Teacher uses 4
    score_threshold: float = 0.7
    teacher_proposals: int = 300  # mean-teacher's teacher scores the proposals the student trains with
    seeds: int = 3
    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: int = 2
    # Logical CPUs beyond the cores: the unlabelled stream's read and decode tasks need one beside the workers.
    ray: RayConfig = field(default_factory=lambda: RayConfig(num_cpus=max(4, os.cpu_count() or 2)))

    def validate(self) -> None:
        require(bool(self.methods) and all(m in METHODS and m != "supervised" for m in self.methods),
                f"methods must be semi-supervised methods from {[m for m in METHODS if m != 'supervised']}")
        require(self.seeds >= 2, "seeds must be >= 2 (a confidence interval needs at least two seeds)")
        require(0 < self.labeled_percent < 100, "labeled_percent must be in (0, 100)")
        require(self.image_size >= 64, "image_size must be >= 64")
        require(0 <= self.burn_in_iters < self.iters, "burn_in_iters must be in [0, iters)")
        require(self.lr > 0 and self.fcos_lr > 0, "lr and fcos_lr must be > 0")
        require(self.num_workers >= 1 and self.cpus_per_worker >= 1, "num_workers and cpus_per_worker must be >= 1")
        self.ray.validate()


def arms(methods: list[str]) -> list[tuple[str, str, str]]:
    """``(arm name, method, detector)``: each method, after the ``supervised`` arm of its detector."""
    out: list[tuple[str, str, str]] = []
    for m in methods:
        detector = METHODS[m].detector
        baseline = (f"supervised-{detector}", "supervised", detector)
        if baseline not in out:
            out.append(baseline)
        out.append((m, m, detector))
    return out


def baseline_of(arm: str, table: list[tuple[str, str, str]]) -> str:
    detector = next(d for name, _, d in table if name == arm)
    return f"supervised-{detector}"


def arm_config(cfg: BenchSsodConfig, w: str, arm: tuple[str, str, str], seed: int,
               split_uri: str) -> finetune_ssod.FinetuneSsodConfig:
    name, method, detector = arm
    size = cfg.image_size
    model = DetectorArch(detector=detector, depth=cfg.depth, frozen_bn=True, freeze_at=1,
                         min_size=(size * 3 // 4, size, size * 5 // 4), max_size=4 * size, test_size=size,
                         rpn_post_nms_top_n_train=300, box_batch_size_per_image=64)
    optim = OptimConfig(lr=cfg.fcos_lr if detector == "fcos" else cfg.lr, max_iters=cfg.iters, batch_size=cfg.batch_size,
                        warmup_iters=min(50, max(1, cfg.iters // 3)), grad_clip=10.0,
                        checkpoint_every=cfg.iters, log_every=max(cfg.iters // 20, 1))
    ssod = SsodConfig(unlabeled_ratio=cfg.unlabeled_ratio, burn_in_iters=cfg.burn_in_iters,
                      ema_momentum=0.99, unsup_weight=cfg.unsup_weight, score_threshold=cfg.score_threshold,
                      teacher_proposals=cfg.teacher_proposals,
                      monitor_window=max(cfg.iters // 6, 1))
    return finetune_ssod.FinetuneSsodConfig(
        corpus=os.path.join(w, "train"), split=split_uri, method=method, init="classifier",
        checkpoint=cfg.classifier or os.path.join(w, "classifier", "model.pt"),
        output=os.path.join(w, f"seed-{seed}", name), eval_corpus=os.path.join(w, "test"), model=model,
        optim=optim, ssod=ssod, workers=trainer.WorkersConfig(num_workers=cfg.num_workers, use_gpu="auto",
                                                               cpus_per_worker=cfg.cpus_per_worker, max_failures=1),
        seed=seed, ray=cfg.ray)


def step_seconds(history: list[dict], after: int) -> float:
    """Mean seconds per training step over the history rows after step ``after``."""
    rows = [r for r in history if r.get("step", 0) > after and "s_per_iter" in r]
    return sum(r["s_per_iter"] for r in rows) / len(rows) if rows else math.nan


def prepare(cfg: BenchSsodConfig, w: str, step: demo.Steps) -> None:
    """The synthetic detection sets and, unless given, the demo's classifier."""
    init_ray(cfg.ray)

    def build(out, style, classes, n, seed):
        if not storage.exists(os.path.join(out, "corpus.json")):
            build_corpus.run(build_corpus.BuildCorpusConfig(
                builder="synthetic", output=out, samples_per_shard=100,
                synthetic=build_corpus.SyntheticConfig(style=style, classes=classes, num_images=n,
                                                       image_size=cfg.image_size, seed=seed)))

    step("build corpora", lambda: (build(os.path.join(w, "train"), "detection", "downstream", cfg.train_images,
                                         cfg.seed + 11),
                                   build(os.path.join(w, "test"), "detection", "downstream", cfg.test_images,
                                         cfg.seed + 12)))
    if not cfg.classifier and not storage.exists(os.path.join(w, "classifier", "model.pt")):
        demo_cfg = demo.DemoConfig(workdir=w, image_size=cfg.image_size, depth=cfg.depth, ray=cfg.ray)
        build(os.path.join(w, "pretrain"), "classification", "pretrain", demo_cfg.pretrain_images, cfg.seed)
        from pseudobox.pipelines import train_classifier

        step("train classifier", lambda: train_classifier.run(train_classifier.TrainClassifierConfig(
            corpus=os.path.join(w, "pretrain"), output=os.path.join(w, "classifier"),
            model=train_classifier.ClassifierModelConfig(depth=cfg.depth),
            optim=demo._optim(demo_cfg, demo_cfg.classifier_iters, 0.1, demo_cfg.batch_size),
            image_size=cfg.image_size, workers=demo._workers(demo_cfg), ray=cfg.ray)))


def run_seed(cfg: BenchSsodConfig, w: str, seed: int, table: list) -> dict:
    d = os.path.join(w, f"seed-{seed}")
    storage.makedirs(d)
    record_uri, split_uri = os.path.join(d, "results.json"), os.path.join(d, "split.json")
    record = storage.read_json(record_uri) if storage.exists(record_uri) else {}
    if not storage.exists(split_uri):
        split.run(split.SplitConfig(corpus=os.path.join(w, "train"), output=split_uri, mode="percent",
                                    percent=cfg.labeled_percent, fold=seed, seed=seed))
    for arm in table:
        name = arm[0]
        ft = arm_config(cfg, w, arm, seed, split_uri)
        fingerprint = storage.json_safe({k: v for k, v in to_dict(ft).items() if k != "ray"})
        prev = record.get(name)
        if isinstance(prev, dict) and prev.get("config") == fingerprint:
            log.info("bench ssod: seed %d: reusing %s from %s", seed, name, ft.output)
            continue
        t0 = time.time()
        out = finetune_ssod.run(ft)
        history = out.get("history") or []
        record[name] = {"config": fingerprint, "metrics": out["metrics"][out["exported"]],
                        "seconds": round(time.time() - t0, 1),
                        "s_per_step": step_seconds(history, cfg.burn_in_iters),
                        "images_per_step": cfg.batch_size * cfg.num_workers * (
                            1 + (cfg.unlabeled_ratio if arm[1] != "supervised" else 0))}
        storage.write_json(record_uri, record)
        log.info("bench ssod: seed %d: %s AP %s (%.0fs)", seed, name, _f(record[name]["metrics"].get("AP")),
                 record[name]["seconds"])
    return record


def summarize(per_seed: list[dict], table: list, confidence: float = CONFIDENCE) -> dict:
    out: dict = {}
    for name, method, _ in table:
        entry = {key: mean_std([r[name]["metrics"].get(key) for r in per_seed]) for key, _ in METRICS}
        entry["seconds"] = mean_std([r[name]["seconds"] for r in per_seed])
        entry["s_per_step"] = mean_std([r[name]["s_per_step"] for r in per_seed])
        if method != "supervised":
            base = baseline_of(name, table)
            entry["diff"] = {key: paired_summary([r[base]["metrics"].get(key) for r in per_seed],
                                                 [r[name]["metrics"].get(key) for r in per_seed], confidence)
                             for key, _ in METRICS}
            ratio = [r[name]["s_per_step"] / r[base]["s_per_step"] for r in per_seed]
            entry["step_cost"] = mean_std(ratio)
            entry["image_cost"] = mean_std([x * r[base]["images_per_step"] / r[name]["images_per_step"]
                                            for x, r in zip(ratio, per_seed)])
        out[name] = entry
    return out


def run(cfg: BenchSsodConfig, command: str | None = None) -> dict:
    t0 = time.time()
    w = os.path.abspath(cfg.workdir)
    storage.makedirs(w)
    step = demo.Steps("bench ssod")
    prepare(cfg, w, step)
    table = arms(cfg.methods)
    per_seed = [step(f"seed {cfg.seed + i}", lambda s=cfg.seed + i: run_seed(cfg, w, s, table))
                for i in range(cfg.seeds)]
    result = {"bench": "ssod", "command": command if command is not None else shlex.join(sys.argv),
              "arms": [list(a) for a in table], "seed_values": [cfg.seed + i for i in range(cfg.seeds)],
              "per_seed": per_seed, "summary": summarize(per_seed, table), "confidence": CONFIDENCE,
              "seconds": step.timings, "total_seconds": round(time.time() - t0, 1), "config": to_dict(cfg)}
    return publish(w, "bench-ssod", result, format_markdown(result, cfg))


def format_markdown(result: dict, cfg: BenchSsodConfig) -> str:
    pct = f"{100 * result['confidence']:g}%"
    lines = ["# pseudobox bench ssod", "", f"command: `{result['command']}`", "",
             f"settings: {cfg.labeled_percent:g}% of {cfg.train_images} synthetic images labelled, ResNet-{cfg.depth}, "
             f"image size {cfg.image_size}, {cfg.iters} steps (burn-in {cfg.burn_in_iters}), batch {cfg.batch_size} "
             f"labelled + {cfg.batch_size * cfg.unlabeled_ratio} unlabelled per worker, {cfg.num_workers} worker(s), "
             f"seeds {', '.join(map(str, result['seed_values']))}", "",
             f"| arm | AP (mean ± std) | AP50 (mean ± std) | AP vs supervised | {pct} CI | AP50 vs supervised | "
             f"{pct} CI | wall s | step cost × | per-image cost × |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, _, _ in (tuple(a) for a in result["arms"]):
        e = result["summary"][name]
        cells = [name, f"{_f(e['AP']['mean'])} ± {_f(e['AP']['std'])}", f"{_f(e['AP50']['mean'])} ± {_f(e['AP50']['std'])}"]
        for key in ("AP", "AP50"):
            d = e.get("diff", {}).get(key)
            cells += ([f"{_f(d['mean'], True)}", f"[{_f(d['low'], True)}, {_f(d['high'], True)}]"] if d else ["—", "—"])
        cells.append(f"{e['seconds']['mean']:.0f}")
        cells += ([f"{e['step_cost']['mean']:.2f}", f"{e['image_cost']['mean']:.2f}"] if "step_cost" in e else ["1", "1"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "per seed (AP):", "", "| seed | " + " | ".join(a[0] for a in result["arms"]) + " |",
              "|---" * (1 + len(result["arms"])) + "|"]
    for seed, r in zip(result["seed_values"], result["per_seed"]):
        lines.append(f"| {seed} | " + " | ".join(_f(r[a[0]]["metrics"].get("AP")) for a in result["arms"]) + " |")
    lines += ["", f"total {result['total_seconds']:.0f}s"]
    return "\n".join(lines) + "\n"

"""``pseudobox bench pretraining``: CLS vs DAP vs PreDet initialisation, over N seeds.

One synthetic corpus, three pre-trainings, the same k-shot fine-tunings:

* **CLS**: the classifier (classification labels), the demo's step 3;
* **DAP**: CAM boxes from that classifier, then DAP pre-training (``demo.pretrain_chain``);
* **PreDet**: the *hashtag view of the same images* (noisy multi-label tags from each
  image's true objects, ``synthetic.hashtag_view`` → ``build-corpus hashtags``), EdgeBox
  queries (``mine source=edgebox``), then ``pretrain method=predet``. Its ResNet starts from
  the same classifier as DAP's (``predet_from_classifier``), so the two detection
  pre-trainings differ only in their method; ``predet_from_classifier=false`` runs the
  paper's from-scratch recipe instead.

For each seed the k-shot split and fine-tuning seed change and all three arms are
fine-tuned (``finetune``, Faster R-CNN) and evaluated on the same test set. Finished arms
are recorded in ``WORKDIR/seed-<s>/results.json`` and reused on a re-run.

Reported (``WORKDIR/bench-pretraining.{json,md}`` and printed): AP/AP50 mean ± std per
initialisation, the paired differences (DAP − CLS, PreDet − CLS, PreDet − DAP) with 95%
intervals, and the IoU-similarity correlation of each pre-trained checkpoint
(``analyze iou-similarity``, PreDet Fig. 5b).
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass

from pseudobox import storage
from pseudobox.config import path_field, require, to_dict
from pseudobox.datasets.views import ViewConfig
from pseudobox.models.predet import PredetArch
from pseudobox.models.predet_loss import PredetLossConfig
from pseudobox.pipelines import bench, build_corpus, demo, mine, pretrain
from pseudobox.pipelines.bench import CONFIDENCE, _f, mean_std, paired_summary, verdict
from pseudobox.pipelines.common import log

METRICS = (("AP", "AP"), ("AP50", "AP50"), ("VOC_AP50", "VOC AP50"))
ARM_NAMES = ("CLS", "DAP", "PreDet")
PAIRS = (("CLS", "DAP"), ("CLS", "PreDet"), ("DAP", "PreDet"))


@dataclass
class BenchPretrainingConfig(demo.DemoConfig):
    workdir: str = path_field("./pseudobox-bench-pretraining")
    seeds: int = 3
    predet_iters: int = 150
    predet_from_classifier: bool = True
    tag_missing: float = 0.2     # hashtag noise of the PreDet view (synthetic.TagNoise)
    tag_spurious: float = 0.02
    tag_synonym: float = 0.3
    edgebox_max_boxes: int = 100
    analysis_pairs: int = 600    # box pairs per checkpoint for the IoU-similarity correlation

    def validate(self) -> None:
        super().validate()
        require(self.seeds >= 2, "seeds must be >= 2 (a confidence interval needs at least two seeds)")
        require(self.predet_iters >= 1, "predet_iters must be >= 1")
        for name in ("tag_missing", "tag_spurious", "tag_synonym"):
            require(0 <= getattr(self, name) <= 1, f"{name} must be a rate in [0, 1]")
        require(self.edgebox_max_boxes >= 1, "edgebox_max_boxes must be >= 1")
        require(self.analysis_pairs >= 10, "analysis_pairs must be >= 10")


def predet_settings(cfg: BenchPretrainingConfig) -> pretrain.PredetSettings:
    """PreDet at the bench's image size: the views crop at the image size, anchors scaled
    to it (P2-P6), fewer proposals and negatives than the 480-px default; trainable BN when
    the ResNet starts from scratch."""
    size = cfg.image_size
    base = max(4, size // 12)
    arch = PredetArch(depth=cfg.depth, frozen_bn=cfg.predet_from_classifier, crop_size=size,
                      anchor_sizes=tuple(base * 2 ** i for i in range(5)),
                      rpn_pre_nms_top_n=300, rpn_post_nms_top_n=150, box_head_dim=256, embed_dim=128)
    return pretrain.PredetSettings(arch=arch, loss=PredetLossConfig(max_negatives=128),
                                   views=ViewConfig(crop_size=size), max_queries=cfg.edgebox_max_boxes)


def predet_chain(cfg: BenchPretrainingConfig, p: dict, step: demo.Steps) -> dict:
    """The PreDet arm's own inputs under the workdir: hashtag view, hashtag corpus,
    EdgeBoxes, PreDet pre-training. Each stage resumes from what it finds there."""
    from pseudobox.datasets.synthetic import TagNoise, hashtag_view

    w = os.path.abspath(cfg.workdir)
    paths = {name: os.path.join(w, name) for name in ("hashtag-source", "hashtags", "edgeboxes", "predet")}
    noise = TagNoise(missing=cfg.tag_missing, spurious=cfg.tag_spurious, synonym=cfg.tag_synonym)

    def build_hashtags():
        if storage.exists(os.path.join(paths["hashtags"], "corpus.json")):
            return
        view = hashtag_view(p["corpus"], paths["hashtag-source"], noise, seed=cfg.seed)
        build_corpus.run(build_corpus.BuildCorpusConfig(
            builder="hashtags", output=paths["hashtags"], samples_per_shard=200,
            hashtags=build_corpus.HashtagsConfig(jsonl=view.jsonl, vocabulary=view.vocabulary, min_images=1)))

    step("build the hashtag view", build_hashtags)
    # EdgeBoxes' 1,000-pixel box floor is a 32×32 box: scaled to the bench's small images.
    mining = step("mine EdgeBoxes", lambda: mine.run(mine.MineConfig(
        corpus=paths["hashtags"], output=paths["edgeboxes"], source="edgebox",
        edgebox=mine.EdgeBoxesConfig(max_boxes=cfg.edgebox_max_boxes, min_box_area=max(16.0, (cfg.image_size / 8) ** 2)),
        batch_size=32, min_actors=1, max_actors=2, ray=cfg.ray)))
    step("PreDet pre-train", lambda: pretrain.run(pretrain.PretrainConfig(
        corpus=paths["hashtags"], boxes=paths["edgeboxes"], output=paths["predet"], method="predet",
        classifier=p["classifier"] if cfg.predet_from_classifier else "", predet=predet_settings(cfg),
        optim=demo._optim(cfg, cfg.predet_iters, 0.01, cfg.detector_batch_size), workers=demo._workers(cfg),
        seed=cfg.seed, ray=cfg.ray)))
    return {"paths": paths, "mining": mining}


# (name in results, FinetuneConfig.init, checkpoint key in the paths, output directory)
ARMS = (("CLS", "classifier", "classifier", "ft-cls"), ("DAP", "detector", "dap", "ft-dap"),
        ("PreDet", "detector", "predet", "ft-predet"))


def summarize(per_seed: list[dict], confidence: float = CONFIDENCE) -> dict:
    """Per metric: mean ± std of each arm, and each pair's paired difference."""
    out = {}
    for key, _ in METRICS:
        values = {arm: [r[arm]["metrics"].get(key) for r in per_seed] for arm in ARM_NAMES}
        out[key] = {arm: mean_std(v) for arm, v in values.items()}
        out[key]["diffs"] = {f"{b} − {a}": paired_summary(values[a], values[b], confidence) for a, b in PAIRS}
    return out


def iou_similarity(cfg: BenchPretrainingConfig, checkpoint: str, corpus: str, output: str) -> dict:
    """The Pearson correlation of RoI-feature similarity with IoU for one checkpoint."""
    from pseudobox.pipelines import analyze

    return analyze.run(analyze.IouSimilarityConfig(checkpoint=checkpoint, corpus=corpus, output=output,
                                                   num_pairs=cfg.analysis_pairs, seed=cfg.seed))


def run(cfg: BenchPretrainingConfig, command: str | None = None) -> dict:
    t0 = time.time()
    step = demo.Steps("bench pretraining")
    shared = demo.pretrain_chain(cfg, step)
    predet = predet_chain(cfg, shared["paths"], step)
    p = {**shared["paths"], **predet["paths"]}
    w = os.path.abspath(cfg.workdir)
    analysis = {}
    for name, key in (("CLS", "classifier"), ("DAP", "dap"), ("PreDet", "predet")):
        out = os.path.join(w, "analysis", name.lower())
        analysis[name] = step(f"IoU-similarity {name}", lambda: iou_similarity(cfg, p[key], p["test"], out))
    per_seed = []
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        r = step(f"fine-tune seed {seed}", lambda: bench.run_seed(cfg, p, w, seed, ARMS, "bench pretraining"))
        per_seed.append(r)
        log.info("bench pretraining: seed %d/%d: AP %s", i + 1, cfg.seeds,
                 ", ".join(f"{arm} {_f(r[arm]['metrics'].get('AP'))}" for arm in ARM_NAMES))
    result = {
        "bench": "pretraining",
        "command": command if command is not None else shlex.join(sys.argv),
        "settings": {"kshot": cfg.kshot, "depth": cfg.depth, "detector": cfg.detector, "image_size": cfg.image_size,
                     "classifier_iters": cfg.classifier_iters, "pretrain_iters": cfg.pretrain_iters,
                     "predet_iters": cfg.predet_iters, "predet_from_classifier": cfg.predet_from_classifier,
                     "finetune_iters": cfg.finetune_iters, "seeds": cfg.seeds,
                     "seed_values": [cfg.seed + i for i in range(cfg.seeds)]},
        "mining": {"cam": demo.mining_summary(shared["mining"]),
                   "edgebox": {k: predet["mining"].get(k) for k in ("ok", "errors", "boxes_per_image", "recall50")}},
        "analysis": {name: {"pearson": a.get("pearson"), "rows": a.get("rows")} for name, a in analysis.items()},
        "per_seed": [{"seed": r["seed"], **{arm: r[arm]["metrics"] for arm in ARM_NAMES}} for r in per_seed],
        "summary": summarize(per_seed),
        "confidence": CONFIDENCE,
        "seconds": step.timings,
        "total_seconds": round(time.time() - t0, 1),
        "config": to_dict(cfg),
    }
    return bench.publish(w, "bench-pretraining", result, format_markdown(result))


def format_markdown(result: dict) -> str:
    s, n = result["settings"], result["settings"]["seeds"]
    pct = f"{100 * result['confidence']:g}%"
    init = "from the classifier" if s["predet_from_classifier"] else "from scratch"
    lines = [
        "# pseudobox bench pretraining", "",
        f"command: `{result['command']}`", "",
        f"settings: {s['kshot']}-shot, ResNet-{s['depth']} {s['detector']}, image size {s['image_size']}, "
        f"iters classifier {s['classifier_iters']} / DAP {s['pretrain_iters']} / PreDet {s['predet_iters']} "
        f"({init}) / fine-tune {s['finetune_iters']}, {n} seeds ({', '.join(map(str, s['seed_values']))})", "",
        f"| metric | {' | '.join(f'{arm} (mean ± std)' for arm in ARM_NAMES)} |",
        "|---" * (1 + len(ARM_NAMES)) + "|",
    ]
    for key, label in METRICS:
        r = result["summary"][key]
        lines.append(f"| {label} | " + " | ".join(f"{_f(r[a]['mean'])} ± {_f(r[a]['std'])}" for a in ARM_NAMES) + " |")
    lines += ["", f"| metric | difference | mean | {pct} CI | excludes 0 |", "|---|---|---|---|---|"]
    for key, label in METRICS:
        for name, d in result["summary"][key]["diffs"].items():
            ex = "n/a" if d["excludes_zero"] is None else ("yes" if d["excludes_zero"] else "no")
            lines.append(f"| {label} | {name} | {_f(d['mean'], True)} | [{_f(d['low'], True)}, "
                         f"{_f(d['high'], True)}] | {ex} |")
    lines.append("")
    for key, label in METRICS:
        for (a, b), d in zip(PAIRS, result["summary"][key]["diffs"].values()):
            lines.append(verdict(label, d, names=(a, b)))
    lines += ["", "IoU vs RoI-feature cosine similarity (Pearson r, PreDet Fig. 5b):", "",
              "| checkpoint | r (all pairs) |", "|---|---|"]
    for name, a in result["analysis"].items():
        r = a.get("pearson")
        lines.append(f"| {name} | {'n/a' if r is None else f'{r:.3f}'} |")
    header = " | ".join(f"{arm} {label}" for arm in ARM_NAMES for _, label in METRICS)
    lines += ["", "per seed:", "", f"| seed | {header} |", "|---" * (1 + len(ARM_NAMES) * len(METRICS)) + "|"]
    for r in result["per_seed"]:
        cells = " | ".join(_f(r[arm].get(key)) for arm in ARM_NAMES for key, _ in METRICS)
        lines.append(f"| {r['seed']} | {cells} |")
    lines += ["", f"total {result['total_seconds']:.0f}s"]
    return "\n".join(lines) + "\n"

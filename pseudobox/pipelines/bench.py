"""``pseudobox bench dap``: the demo's chain over several fine-tuning seeds, with statistics.

The corpora, the classifier, the CAM boxes and the DAP pre-training are built once
(``demo.pretrain_chain``, under ``WORKDIR``); for each seed the k-shot split and the
fine-tuning change (``WORKDIR/seed-<s>/{split.json,ft-cls,ft-dap}``) and both arms,
CLS-init and DAP-init, are fine-tuned and evaluated. ``WORKDIR/seed-<s>/results.json``
records each finished arm, so a re-run reuses it instead of training again.

Reported (``WORKDIR/bench-dap.json``, ``WORKDIR/bench-dap.md``, and printed): mean ± sample
std over the seeds per arm, and the paired difference DAP − CLS with a t interval.
The statistics are the plain functions ``mean_std`` and ``paired_summary``.
"""
from __future__ import annotations

import math
import os
import shlex
import sys
import time
from dataclasses import dataclass

from pseudobox import storage
from pseudobox.config import path_field, require, to_dict
from pseudobox.pipelines import demo, finetune
from pseudobox.pipelines.common import log

METRICS = (("AP", "AP"), ("AP50", "AP50"), ("VOC_AP50", "VOC AP50"))  # (key in metrics, label)
CONFIDENCE = 0.95


# --------------------------------------------------------------------------- statistics

def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def mean_std(values) -> dict:
    """Mean and sample std (ddof=1) of the values that are not None/NaN; std is NaN
    below two values, both are NaN with none."""
    xs = [float(x) for x in values if _finite(x)]
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n >= 2 else math.nan
    return {"n": n, "mean": mean, "std": std, "values": list(values)}


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided critical value of Student's t: ``t.ppf((1 + confidence) / 2, dof)``."""
    from scipy.stats import t

    return float(t.ppf((1.0 + confidence) / 2.0, dof))


def paired_summary(a, b, confidence: float = CONFIDENCE) -> dict:
    """The paired difference ``b − a`` over seeds: mean, sample std, and the
    ``confidence`` interval ``mean ± t(n−1) · std / √n``.

    Pairs where either side is None/NaN are left out (``n`` counts the rest). With fewer
    than two pairs there is no interval: ``low``/``high`` are NaN and ``excludes_zero``
    is None.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_summary needs as many values on each side, got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [float(y) - float(x) for x, y in zip(a, b) if _finite(x) and _finite(y)]
    d = mean_std(diffs)
    n = d["n"]
    out = {"n": n, "confidence": confidence, "mean": d["mean"], "std": d["std"], "diffs": diffs,
           "t": math.nan, "half_width": math.nan, "low": math.nan, "high": math.nan, "excludes_zero": None}
    if n >= 2:
        t = t_quantile(confidence, n - 1)
        half = t * d["std"] / math.sqrt(n)
        out.update(t=t, half_width=half, low=d["mean"] - half, high=d["mean"] + half,
                   excludes_zero=bool(d["mean"] - half > 0 or d["mean"] + half < 0))
    return out


def verdict(label: str, diff: dict, names: tuple[str, str] = ("CLS", "DAP")) -> str:
    """One line saying whether the interval of ``names[1] − names[0]`` excludes 0."""
    a, b = names
    pct = f"{100 * diff['confidence']:g}%"
    if diff["excludes_zero"] is None:
        return f"{label}: {b} − {a} = {_f(diff['mean'], True)}; no {pct} interval (needs at least 2 seeds)"
    head = f"{label}: {b} − {a} = {_f(diff['mean'], True)}, {pct} CI [{_f(diff['low'], True)}, {_f(diff['high'], True)}]"
    if diff["excludes_zero"]:
        better = b if diff["mean"] > 0 else a
        return f"{head} excludes 0: {better}-init is better over {diff['n']} seeds"
    return f"{head} includes 0: no significant difference over {diff['n']} seeds"


def _f(x, sign: bool = False) -> str:
    if not _finite(x):
        return "n/a"
    return f"{x:+.1f}" if sign else f"{x:.1f}"


def publish(workdir: str, name: str, result: dict, text: str) -> dict:
    """Write a bench's result as ``<workdir>/<name>.json`` and its table as ``<name>.md``
    (each atomically), print the table and where both went; returns ``result``."""
    json_uri, md_uri = os.path.join(workdir, f"{name}.json"), os.path.join(workdir, f"{name}.md")
    storage.write_json(json_uri, result)
    storage.write_text(md_uri, text)
    print(text)
    print(f"written: {md_uri}, {json_uri}")
    return result


# --------------------------------------------------------------------------- the bench

@dataclass
class BenchDapConfig(demo.DemoConfig):
    workdir: str = path_field("./pseudobox-bench")
    seeds: int = 3  # k-shot split and fine-tuning seeds: seed, seed + 1, ..., seed + seeds - 1

    def validate(self) -> None:
        super().validate()
        require(self.seeds >= 2, "seeds must be >= 2 (a confidence interval needs at least two seeds)")


def _fingerprint(ft: finetune.FinetuneConfig) -> dict:
    """What decides a fine-tuning result (not how Ray is reached)."""
    d = to_dict(ft)
    d.pop("ray", None)
    return storage.json_safe(d)


def run_seed(cfg: BenchDapConfig, p: dict, workdir: str, seed: int, arms: tuple = demo.ARMS,
             bench: str = "bench dap") -> dict:
    """Split and fine-tune every arm (``demo.ARMS``: CLS and DAP) for one seed under
    ``workdir/seed-<seed>``; an arm recorded in ``results.json`` with the same settings and
    outputs present is reused."""
    d = os.path.join(workdir, f"seed-{seed}")
    storage.makedirs(d)
    record_uri, split_uri = os.path.join(d, "results.json"), os.path.join(d, "split.json")
    record = storage.read_json(record_uri) if storage.exists(record_uri) else {}
    record["seed"] = seed
    split_done = False
    for arm in arms:
        name = arm[0]
        ft = demo.finetune_config(cfg, p, arm, split_uri, d, seed)
        fp = _fingerprint(ft)
        prev = record.get(name)
        if (isinstance(prev, dict) and prev.get("finetune") == fp and storage.exists(split_uri)
                and storage.exists(os.path.join(ft.output, "model.pt"))
                and storage.exists(os.path.join(ft.output, "metrics.json"))):
            log.info("%s: seed %d: reusing %s-init results from %s", bench, seed, name, ft.output)
            continue
        if not split_done:
            demo.make_split(cfg, p, split_uri, seed)
            split_done = True
        out = finetune.run(ft)
        record[name] = {"finetune": fp, "metrics": out["metrics"]}
        storage.write_json(record_uri, record)  # per arm: an interruption loses at most one
    return record


def summarize(per_seed: list[dict], confidence: float = CONFIDENCE) -> dict:
    """Per metric: mean ± std of each arm over the seeds, and the paired DAP − CLS."""
    out = {}
    for key, _ in METRICS:
        cls = [r["CLS"]["metrics"].get(key) for r in per_seed]
        dap = [r["DAP"]["metrics"].get(key) for r in per_seed]
        out[key] = {"CLS": mean_std(cls), "DAP": mean_std(dap), "diff": paired_summary(cls, dap, confidence)}
    return out


def run(cfg: BenchDapConfig, command: str | None = None) -> dict:
    t0 = time.time()
    step = demo.Steps("bench dap")
    shared = demo.pretrain_chain(cfg, step)
    p, w = shared["paths"], os.path.abspath(cfg.workdir)
    per_seed = []
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        r = step(f"fine-tune seed {seed}", lambda: run_seed(cfg, p, w, seed))
        per_seed.append(r)
        log.info("bench dap: seed %d/%d: CLS AP %s, DAP AP %s", i + 1, cfg.seeds,
                 _f(r["CLS"]["metrics"].get("AP")), _f(r["DAP"]["metrics"].get("AP")))
    result = {
        "bench": "dap",
        "command": command if command is not None else shlex.join(sys.argv),
        "settings": {"kshot": cfg.kshot, "depth": cfg.depth, "detector": cfg.detector, "image_size": cfg.image_size,
                     "classifier_iters": cfg.classifier_iters, "pretrain_iters": cfg.pretrain_iters,
                     "finetune_iters": cfg.finetune_iters, "seeds": cfg.seeds,
                     "seed_values": [cfg.seed + i for i in range(cfg.seeds)]},
        "mining": demo.mining_summary(shared["mining"]),
        "per_seed": [{"seed": r["seed"], "CLS": r["CLS"]["metrics"], "DAP": r["DAP"]["metrics"]} for r in per_seed],
        "summary": summarize(per_seed),
        "confidence": CONFIDENCE,
        "seconds": step.timings,
        "total_seconds": round(time.time() - t0, 1),
        "config": to_dict(cfg),
    }
    return publish(w, "bench-dap", result, format_markdown(result))


def format_markdown(result: dict) -> str:
    s, m, n = result["settings"], result["mining"], result["settings"]["seeds"]
    pct = f"{100 * result['confidence']:g}%"
    corloc = "n/a" if m["corloc"] is None else f"{m['corloc']:.1f}%"
    recall = "n/a" if m["recall50"] is None else f"{m['recall50']:.1f}%"
    lines = [
        "# pseudobox bench dap", "",
        f"command: `{result['command']}`", "",
        f"settings: {s['kshot']}-shot, ResNet-{s['depth']} {s['detector']}, image size {s['image_size']}, "
        f"iters classifier {s['classifier_iters']} / pre-train {s['pretrain_iters']} / fine-tune {s['finetune_iters']}, "
        f"{n} seeds ({', '.join(map(str, s['seed_values']))})", "",
        f"pseudo-boxes (CAM): CorLoc {corloc}, recall@0.5 {recall}, {m['boxes_per_image']:.2f} boxes/image "
        f"over {m['ok']} images", "",
        f"| metric | CLS-init (mean ± std) | DAP-init (mean ± std) | DAP − CLS | {pct} CI | excludes 0 |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in METRICS:
        r = result["summary"][key]
        d = r["diff"]
        ex = "n/a" if d["excludes_zero"] is None else ("yes" if d["excludes_zero"] else "no")
        lines.append(f"| {label} | {_f(r['CLS']['mean'])} ± {_f(r['CLS']['std'])} | {_f(r['DAP']['mean'])} ± "
                     f"{_f(r['DAP']['std'])} | {_f(d['mean'], True)} | [{_f(d['low'], True)}, {_f(d['high'], True)}] "
                     f"| {ex} |")
    lines += [""] + [verdict(label, result["summary"][key]["diff"]) for key, label in METRICS]
    header = " | ".join(f"{arm} {label}" for arm in ("CLS", "DAP") for _, label in METRICS)
    lines += ["", "per seed:", "", f"| seed | {header} |", "|---" * (1 + 2 * len(METRICS)) + "|"]
    for r in result["per_seed"]:
        cells = " | ".join(_f(r[arm].get(key)) for arm in ("CLS", "DAP") for key, _ in METRICS)
        lines.append(f"| {r['seed']} | {cells} |")
    lines += ["", f"total {result['total_seconds']:.0f}s"]
    return "\n".join(lines) + "\n"

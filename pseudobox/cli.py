"""The ``pseudobox`` command: one subcommand per stage, each a YAML config plus dotted
overrides, suitable for ``ray job submit -- pseudobox <stage> --config X.yaml key=value``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from pseudobox.config import ConfigError, load_config


def _stages():
    from pseudobox.pipelines import build_corpus, evaluate, finetune, mine, pretrain, split, train_classifier

    return {
        "build-corpus": (build_corpus.BuildCorpusConfig, build_corpus.run, "write a corpus of tar shards"),
        "train-classifier": (train_classifier.TrainClassifierConfig, train_classifier.run,
                             "DAP step 1: classifier on Ray Train"),
        "mine": (mine.MineConfig, mine.run, "DAP step 2: CAM pseudo-boxes on a Ray Data actor pool"),
        "pretrain": (pretrain.PretrainConfig, pretrain.run, "DAP step 3: detector pre-training on Ray Train"),
        "split": (split.SplitConfig, split.run, "seeded k-shot split of a detection corpus"),
        "finetune": (finetune.FinetuneConfig, finetune.run, "DAP step 4: fine-tune a detector, then evaluate"),
        "evaluate": (evaluate.EvaluateConfig, evaluate.run, "COCO and VOC metrics of a detector"),
    }


def _benches():
    from pseudobox.pipelines import bench

    return {"dap": (bench.BenchDapConfig, bench.run,
                    "the demo's DAP chain over N seeds: CLS-init vs DAP-init, mean ± std, paired 95%% CI")}


def _chain_args(p: argparse.ArgumentParser, default_workdir: str) -> None:
    """The arguments of the whole-chain commands (demo, bench)."""
    p.add_argument("--workdir", default=None, help=f"where everything is written (default {default_workdir})")
    p.add_argument("--config", default=None, help="YAML overriding the settings")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kshot=5 finetune_iters=40")


def _chain_overrides(args) -> list[str]:
    return ([] if args.workdir is None else [f"workdir={args.workdir}"]) + list(args.overrides)


def _summary(result) -> str:
    if isinstance(result, dict):
        small = {k: v for k, v in result.items() if k not in ("model_state", "optimizer_state", "scheduler_state",
                                                            "history", "config", "keys", "classes")}
        return json.dumps(small, indent=2, default=str)
    return str(result)


def main(argv: list[str] | None = None) -> int:
    from pseudobox import storage
    from pseudobox.datasets.corpus import CorpusError
    from pseudobox.models.checkpoint import CheckpointError
    from pseudobox.pipelines.common import setup_logging

    stages = _stages()
    parser = argparse.ArgumentParser(prog="pseudobox", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, (_, _, help_text) in stages.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML config (local path or s3://)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01")
    demo = sub.add_parser("demo", help="the whole DAP chain on a synthetic corpus, in a few minutes")
    _chain_args(demo, "./pseudobox-demo")
    bench = sub.add_parser("bench", help="a chain over several seeds: mean ± std and paired confidence intervals")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for name, (cfg_cls, _, help_text) in _benches().items():
        b = kinds.add_parser(name, help=help_text)
        b.add_argument("--seeds", type=int, default=None, help=f"number of seeds, >= 2 (default {cfg_cls.seeds})")
        _chain_args(b, cfg_cls.workdir)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.stage == "demo":
            from pseudobox.pipelines import demo as demo_stage

            demo_stage.run(load_config(demo_stage.DemoConfig, args.config, _chain_overrides(args)))
            return 0
        if args.stage == "bench":
            cls, run, _ = _benches()[args.bench]
            seeds = [] if args.seeds is None else [f"seeds={args.seeds}"]
            cfg = load_config(cls, args.config, [*seeds, *_chain_overrides(args)])
            run(cfg, command=shlex.join(["pseudobox", *(sys.argv[1:] if argv is None else argv)]))
            return 0
        cls, run, _ = stages[args.stage]
        cfg = load_config(cls, args.config, args.overrides)
        print(_summary(run(cfg)))
        return 0
    except (ConfigError, storage.StorageError, CorpusError, CheckpointError) as e:
        what = f"{args.stage} {args.bench}" if args.stage == "bench" else args.stage
        print(f"pseudobox {what}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

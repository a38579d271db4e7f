"""The ``pseudobox`` command: one subcommand per stage, each a YAML config plus dotted
overrides, suitable for ``ray job submit -- pseudobox <stage> --config X.yaml key=value``.
"""
from __future__ import annotations

import argparse
import json
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
    demo.add_argument("--workdir", default="./pseudobox-demo")
    demo.add_argument("--config", default=None, help="YAML overriding the demo's settings")
    demo.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.stage == "demo":
            from pseudobox.pipelines import demo as demo_stage

            cfg = load_config(demo_stage.DemoConfig, args.config, [f"workdir={args.workdir}", *args.overrides])
            demo_stage.run(cfg)
            return 0
        cls, run, _ = stages[args.stage]
        cfg = load_config(cls, args.config, args.overrides)
        print(_summary(run(cfg)))
        return 0
    except (ConfigError, storage.StorageError, CorpusError, CheckpointError) as e:
        print(f"pseudobox {args.stage}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

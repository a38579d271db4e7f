"""The ``pseudobox`` command: one subcommand per stage, each a YAML config plus dotted
overrides, suitable for ``ray job submit -- pseudobox <stage> --config X.yaml key=value``.

``pseudobox <stage> --print-config`` prints every key with its resolved value as YAML
(a starting point for ``--config``); ``pseudobox <stage> --help`` lists the keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shlex
import sys
from typing import Callable, NamedTuple

from pseudobox.config import ConfigError, dump_config, load_config


class StageSpec(NamedTuple):
    """Where a command's config class and runner live: ``pseudobox.pipelines.<module>``,
    imported only when the command runs (or its ``--help`` is shown)."""

    module: str
    config: str
    help: str


STAGES = {
    "build-corpus": StageSpec("build_corpus", "BuildCorpusConfig", "write a corpus of tar shards"),
    "train-classifier": StageSpec("train_classifier", "TrainClassifierConfig", "DAP step 1: classifier on Ray Train"),
    "mine": StageSpec("mine", "MineConfig", "pseudo-boxes on a Ray Data actor pool: CAM, EdgeBoxes or a teacher"),
    "pretrain": StageSpec("pretrain", "PretrainConfig",
                          "detection pre-training on Ray Train: DAP (CAM boxes) or PreDet (EdgeBox queries)"),
    "split": StageSpec("split", "SplitConfig", "seeded splits: k-shot, percent labelled (folds), or labelled/unlabelled sets"),
    "finetune": StageSpec("finetune", "FinetuneConfig", "DAP step 4: fine-tune a detector, then evaluate"),
    "finetune-ssod": StageSpec("finetune_ssod", "FinetuneSsodConfig",
                               "semi-supervised fine-tuning: supervised, mean-teacher or dense-teacher"),
    "evaluate": StageSpec("evaluate", "EvaluateConfig", "COCO and VOC metrics of a detector"),
    "predict": StageSpec("predict", "PredictConfig", "a detector's boxes for every image of a corpus"),
    "report": StageSpec("report", "ReportConfig", "one HTML report of stage outputs"),
}
DEMO = StageSpec("demo", "DemoConfig", "the whole DAP chain on a synthetic corpus, in a few minutes")
BENCHES = {
    "dap": StageSpec("bench", "BenchDapConfig",
                     "the demo's DAP chain over N seeds: CLS-init vs DAP-init, mean ± std, paired 95%% CI"),
    "ssod": StageSpec("bench_ssod", "BenchSsodConfig",
                      "semi-supervised methods vs supervised over N seeds on a synthetic set, paired 95%% CI"),
    "pretraining": StageSpec("bench_pretraining", "BenchPretrainingConfig",
                             "CLS vs DAP vs PreDet pre-training, fine-tuned over N seeds, paired 95%% CI"),
}
ANALYSES = {
    "iou-similarity": StageSpec("analyze", "IouSimilarityConfig",
                                "Pearson r of box IoU vs RoI-feature cosine similarity per box size (PreDet Fig. 5b)"),
}


def _spec(command: str) -> StageSpec:
    """The spec of ``mine``, ``demo`` or ``bench dap``."""
    if command == "demo":
        return DEMO
    if command.startswith("bench "):
        return BENCHES[command.split(" ", 1)[1]]
    if command.startswith("analyze "):
        return ANALYSES[command.split(" ", 1)[1]]
    return STAGES[command]


def load_stage(command: str) -> tuple[type, Callable]:
    """``(config class, run)`` of a command; ``ConfigError`` if its module is not installed."""
    spec = _spec(command)
    try:
        module = importlib.import_module(f"pseudobox.pipelines.{spec.module}")
        return getattr(module, spec.config), module.run
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"the {command} stage is not available in this installation ({e})") from e


def _stages() -> dict[str, tuple[type, Callable, str]]:
    """``{name: (config class, run, help)}`` of every stage whose module is installed."""
    out = {}
    for name, spec in STAGES.items():
        try:
            out[name] = (*load_stage(name), spec.help)
        except ConfigError:
            continue
    return out


def _benches() -> dict[str, tuple[type, Callable, str]]:
    return {name: (*load_stage(f"bench {name}"), spec.help) for name, spec in BENCHES.items()}


def keys_help(cls: type) -> str:
    """The top-level keys of a config with their defaults, one a line, for ``--help``."""
    lines = ["config keys (default; sections list their keys, --print-config shows all values):"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            lines.append(f"  {f.name}: required")
            continue
        if dataclasses.is_dataclass(value):
            shown = "{" + ", ".join(g.name for g in dataclasses.fields(value)) + "}"
        else:  # JSON is YAML, and shows '' as ""
            shown = json.dumps(list(value) if isinstance(value, tuple) else value, default=str)
        lines.append(f"  {f.name}: {shown}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose ``--help`` ends with the command's config keys; the stage's
    module is imported only when that help is shown."""

    stage_command: str | None = None

    def format_help(self) -> str:
        if self.stage_command is not None and self.epilog is None:
            try:
                self.epilog = keys_help(load_stage(self.stage_command)[0])
            except ConfigError as e:
                self.epilog = str(e)
        return super().format_help()


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (local path or s3://), read relative to this directory")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key) as YAML and exit without running")
    p.add_argument("--verbose", action="store_true", help="debug logging (also sets PSEUDOBOX_VERBOSE=1)")


def _add(sub, name: str, command: str, help_text: str) -> _Parser:
    p = sub.add_parser(name, help=help_text, description=help_text.replace("%%", "%"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.stage_command = command
    _common_args(p)
    return p


def _chain_args(p: argparse.ArgumentParser) -> None:
    """The arguments of the whole-chain commands (demo, bench)."""
    p.add_argument("--workdir", default=None, help="where everything is written (default: the workdir key below)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kshot=5 finetune_iters=40")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pseudobox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, spec in STAGES.items():
        p = _add(sub, name, name, spec.help)
        if name == "report":
            p.add_argument("overrides", nargs="*", metavar="OUTPUT_OR_OVERRIDE",
                           help="stage output directories (collected into inputs=[...]) and dotted overrides")
        else:
            if name == "finetune-ssod":
                p.add_argument("--method", default=None,
                               help="supervised, mean-teacher or dense-teacher (same as method=...)")
            if name == "predict":
                p.add_argument("--checkpoint", default=None, help="the detector checkpoint (same as checkpoint=...)")
                p.add_argument("--corpus", default=None, help="the corpus to predict on (same as corpus=...)")
                p.add_argument("--output", default=None, help="where the predictions go (same as output=...)")
            p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01")
    _chain_args(_add(sub, "demo", "demo", DEMO.help))
    bench = sub.add_parser("bench", help="a chain over several seeds: mean ± std and paired confidence intervals")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for name, spec in BENCHES.items():
        b = _add(kinds, name, f"bench {name}", spec.help)
        b.add_argument("--seeds", type=int, default=None, help="number of seeds, >= 2 (default: the seeds key below)")
        _chain_args(b)
    analyze = sub.add_parser("analyze", help="analyses of a checkpoint's features")
    analyses = analyze.add_subparsers(dest="analysis", required=True)
    for name, spec in ANALYSES.items():
        a = _add(analyses, name, f"analyze {name}", spec.help)
        for key in ("checkpoint", "corpus", "output"):
            a.add_argument(f"--{key}", default=None, help=f"same as {key}=...")
        a.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_pairs=500")
    return parser


@dataclasses.dataclass
class Command:
    """What the command line asks for: ``stage`` is ``mine``, ``demo``, ``bench dap`` ..."""

    stage: str
    config: str | None
    overrides: list[str]
    print_config: bool = False
    verbose: bool = False


def stage_name(args: argparse.Namespace) -> str:
    """``mine``, ``bench dap``, ``analyze iou-similarity`` ...: the command the arguments name."""
    return {"bench": f"bench {getattr(args, 'bench', '')}",
            "analyze": f"analyze {getattr(args, 'analysis', '')}"}.get(args.stage, args.stage)


def command_of(args: argparse.Namespace) -> Command:
    """Turn parsed arguments into a stage and its overrides; flags become ``key=value``."""
    stage = stage_name(args)
    overrides = list(args.overrides)
    flags: list[str] = []
    if args.stage in ("demo", "bench") and args.workdir is not None:
        flags.append(f"workdir={args.workdir}")
    if args.stage == "bench" and args.seeds is not None:
        flags.insert(0, f"seeds={args.seeds}")
    if args.stage == "finetune-ssod" and args.method is not None:
        flags.append(f"method={args.method}")
    if args.stage in ("predict", "analyze"):
        flags += [f"{key}={getattr(args, key)}" for key in ("checkpoint", "corpus", "output")
                  if getattr(args, key) is not None]
    if args.stage == "report":
        inputs = [o for o in overrides if "=" not in o]
        overrides = [o for o in overrides if "=" in o]
        if inputs:
            if any(o.split("=", 1)[0].strip() == "inputs" for o in overrides):
                raise ConfigError("give the inputs as arguments or as inputs=[...], not both")
            flags.append(f"inputs={json.dumps(inputs)}")  # a YAML flow list: paths may hold commas
    return Command(stage, args.config, flags + overrides, args.print_config, args.verbose)


def parse_command(argv: list[str]) -> Command:
    """``argv`` (without the program name) as a ``Command``; no stage module is imported."""
    return command_of(build_parser().parse_args(argv))


def _summary(result) -> str:
    if isinstance(result, dict):
        small = {k: v for k, v in result.items() if k not in ("model_state", "optimizer_state", "scheduler_state",
                                                            "history", "config", "keys", "classes")}
        return json.dumps(small, indent=2, default=str)
    return str(result)


def main(argv: list[str] | None = None) -> int:
    from pseudobox import storage
    from pseudobox.datasets.corpus import CorpusError
    from pseudobox.mining.outputs import MissingSamplesError
    from pseudobox.models.checkpoint import CheckpointError
    from pseudobox.pipelines.common import setup_logging

    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["PSEUDOBOX_VERBOSE"] = "1"
    setup_logging(verbose=args.verbose)
    what = stage_name(args)
    try:
        command = command_of(args)
        cls, run = load_stage(command.stage)
        # Relative paths become absolute here, against the directory pseudobox was started in.
        cfg = load_config(cls, command.config, command.overrides, validate=not command.print_config, resolve=True)
        if command.print_config:
            print(f"# pseudobox {what}: every key, resolved (use with --config)")
            print(dump_config(cfg), end="")
            return 0
        if command.stage == "demo":
            run(cfg)
        elif args.stage == "bench":
            run(cfg, command=shlex.join(["pseudobox", *(sys.argv[1:] if argv is None else argv)]))
        else:
            print(_summary(run(cfg)))
        return 0
    except MissingSamplesError as e:  # everything was written; the input had gaps
        print(f"pseudobox {what}: error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, storage.StorageError, CorpusError, CheckpointError) as e:
        print(f"pseudobox {what}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

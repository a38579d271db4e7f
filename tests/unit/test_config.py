"""Unit tests for pseudobox.config: YAML + dotted overrides, type checks, validation."""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field

import pytest
import yaml

from pseudobox import config
from pseudobox.config import ConfigError, from_dict, load_config, parse_overrides, require, to_dict
from pseudobox.engine import OptimConfig
from pseudobox.models.detectors import DetectorArch
from pseudobox.pipelines.mine import MineConfig
from pseudobox.pipelines.pretrain import PretrainConfig
from pseudobox.pipelines.train_classifier import TrainClassifierConfig


@dataclass
class Inner:
    sizes: tuple[int, ...] = (8,)
    ratio: float = 0.5
    flag: bool = False
    name: str = "x"

    def validate(self) -> None:
        require(0 < self.ratio < 1, "inner.ratio must be in (0, 1)")


@dataclass
class Outer:
    path: str = ""
    steps: int = 1
    tags: list[str] = field(default_factory=list)
    note: str | None = None
    extra: dict[str, int] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)

    def validate(self) -> None:
        require(self.steps >= 1, "steps must be >= 1")
        self.inner.validate()


@dataclass
class NeedsKey:
    required: int
    other: int = 0


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


MINE_REQ = ["corpus=/c", "checkpoint=/k", "output=/o"]
PRETRAIN_REQ = ["corpus=/c", "boxes=/b", "classifier=/k", "output=/o"]


# ---------------------------------------------------------------- loading

def test_defaults_without_file_or_overrides():
    cfg = load_config(Outer)
    assert cfg == Outer()


def test_yaml_then_overrides_nested(tmp_path):
    path = write_yaml(tmp_path, {"path": "/data", "steps": 3, "inner": {"ratio": 0.25, "name": "y"}})
    cfg = load_config(Outer, path, ["steps=7", "inner.flag=true", "inner.sizes=[96,160]"])
    assert cfg.path == "/data"
    assert cfg.steps == 7  # override wins over YAML
    assert cfg.inner.ratio == 0.25 and cfg.inner.name == "y"  # YAML keys of a section survive an override
    assert cfg.inner.flag is True
    assert cfg.inner.sizes == (96, 160) and isinstance(cfg.inner.sizes, tuple)


@pytest.mark.parametrize("raw, expected", [
    ("[96,160]", (96, 160)), ("96,160", (96, 160)), ("[96, 160, 320]", (96, 160, 320)), ("96", (96,)),
])
def test_tuple_overrides(raw, expected):
    assert load_config(Outer, overrides=[f"inner.sizes={raw}"]).inner.sizes == expected


def test_list_override_and_optional_and_dict():
    cfg = load_config(Outer, overrides=["tags=a,b", "note=hello", "extra={a: 1}"])
    assert cfg.tags == ["a", "b"] and isinstance(cfg.tags, list)
    assert cfg.note == "hello"
    assert cfg.extra == {"a": 1}
    assert load_config(Outer, overrides=["note=null"]).note is None


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("false", False), ("yes", True), ("no", False), ("True", True), ("FALSE", False),
])
def test_bool_overrides(raw, expected):
    assert load_config(Outer, overrides=[f"inner.flag={raw}"]).inner.flag is expected


def test_numbers_coerced():
    cfg = load_config(Outer, overrides=["steps=10.0", "inner.ratio=1e-1"])
    assert cfg.steps == 10 and isinstance(cfg.steps, int)
    assert cfg.inner.ratio == pytest.approx(0.1) and isinstance(cfg.inner.ratio, float)
    assert load_config(Outer, overrides=["inner.ratio=0"], validate=False).inner.ratio == 0.0


def test_real_pretrain_config_overrides():
    cfg = load_config(PretrainConfig, overrides=PRETRAIN_REQ + [
        "model.min_size=96,160", "model.detector=retinanet", "optim.amp=false", "optim.lr_steps=[0.5,0.8]",
        "workers.num_workers=1"])
    assert cfg.model.min_size == (96, 160)
    assert cfg.model.detector == "retinanet"
    assert cfg.optim.amp is False
    assert cfg.optim.lr_steps == (0.5, 0.8)
    assert cfg.workers.num_workers == 1
    assert cfg.corpus == "/c"


def test_real_mine_config_from_yaml(tmp_path):
    path = write_yaml(tmp_path, {"corpus": "s3://b/c", "checkpoint": "s3://b/k", "output": "s3://b/o",
                                 "cam": {"scales": [64, 128], "flip": False}, "batch_size": 4})
    cfg = load_config(MineConfig, path, ["cam.thresholds=0.3,0.6"])
    assert cfg.cam.scales == (64, 128)
    assert cfg.cam.flip is False
    assert cfg.cam.thresholds == (0.3, 0.6)
    assert cfg.batch_size == 4


def test_partial_section_override_keeps_stage_defaults():
    default = load_config(PretrainConfig, overrides=PRETRAIN_REQ)
    cfg = load_config(PretrainConfig, overrides=PRETRAIN_REQ + ["optim.max_iters=100", "model.depth=18"])
    assert cfg.optim.max_iters == 100 and cfg.model.depth == 18
    assert cfg.optim.lr == default.optim.lr == 0.008
    assert cfg.optim.batch_size == default.optim.batch_size == 2
    assert cfg.model.max_size == default.model.max_size == 1000
    assert cfg.model.min_size == default.model.min_size


@pytest.mark.parametrize("value", ["true", "false"])
def test_str_field_accepts_true_false(value):
    cfg = load_config(MineConfig, overrides=MINE_REQ + [f"use_gpu={value}"])
    assert cfg.use_gpu == value


# ---------------------------------------------------------------- errors

def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(Outer, overrides=["stepz=3"])
    msg = str(e.value)
    assert "stepz" in msg
    for key in ("path", "steps", "tags", "inner"):
        assert key in msg


def test_unknown_nested_key_names_section_and_valid_keys(tmp_path):
    path = write_yaml(tmp_path, {"cam": {"treshold": 0.5}})
    with pytest.raises(ConfigError) as e:
        load_config(MineConfig, path, MINE_REQ)
    msg = str(e.value)
    assert "treshold" in msg and "'cam'" in msg
    assert "thresholds" in msg and "nms_iou" in msg


@pytest.mark.parametrize("override, key", [
    ("steps=abc", "steps"),
    ("inner.ratio=fast", "inner.ratio"),
    ("inner.flag=maybe", "inner.flag"),
    ("inner.sizes=[96,x]", "inner.sizes[1]"),
    ("inner=3", "inner"),
    ("steps=true", "steps"),
])
def test_wrong_type_names_dotted_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, overrides=[override])
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_wrong_type_in_real_config_names_dotted_key():
    with pytest.raises(ConfigError, match=r"^optim\.max_iters: expected an integer"):
        load_config(PretrainConfig, overrides=PRETRAIN_REQ + ["optim.max_iters=lots"])
    with pytest.raises(ConfigError, match=r"^cam\.nms_iou: expected a number"):
        load_config(MineConfig, overrides=MINE_REQ + ["cam.nms_iou=high"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="required"):
        load_config(NeedsKey)
    assert load_config(NeedsKey, overrides=["required=2"]).required == 2


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_override_into_non_section():
    with pytest.raises(ConfigError, match="not a section"):
        parse_overrides(["a=1", "a.b=2"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, str(tmp_path / "nope.yaml"))


def test_config_file_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, str(path))


# ---------------------------------------------------------------- validate()

@pytest.mark.parametrize("override, needle", [
    ("cam.thresholds=[1.5]", "cam.thresholds"),
    ("cam.thresholds=[]", "cam.thresholds"),
    ("cam.scales=[16]", "cam.scales"),
    ("cam.nms_iou=0", "cam.nms_iou"),
    ("batch_size=0", "batch_size"),
    ("max_actors=0", "max_actors"),
    ("use_gpu=sometimes", "use_gpu"),
    ("source=rpn", "source"),
    ("ray.object_store_mb=10", "ray.object_store_mb"),
])
def test_mine_validate_names_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(MineConfig, overrides=MINE_REQ + [override])
    assert needle in str(e.value)


def test_mine_validate_requires_paths():
    with pytest.raises(ConfigError, match="corpus is required"):
        load_config(MineConfig)
    cfg = load_config(MineConfig, validate=False)  # validation can be deferred
    assert cfg.corpus == ""


@pytest.mark.parametrize("override, needle", [
    ("model.detector=yolo", "model.detector"),
    ("model.depth=20", "model.depth"),
    ("model.min_size=[16]", "model.min_size"),
    ("model.max_size=100", "model.max_size"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr_steps=[1.5]", "optim.lr_steps"),
    ("workers.num_workers=0", "workers.num_workers"),
    ("min_score=1.0", "min_score"),
    ("method=moco", "method"),
])
def test_pretrain_validate_names_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, overrides=PRETRAIN_REQ + [override])
    assert needle in str(e.value)


def test_small_dataclass_validate_runs_nested():
    with pytest.raises(ConfigError, match="inner.ratio"):
        load_config(Outer, overrides=["inner.ratio=2"])


# ---------------------------------------------------------------- to_dict / from_dict

def test_to_dict_is_plain_and_round_trips_small():
    cfg = load_config(Outer, overrides=["inner.sizes=1,2", "tags=a", "extra={k: 3}", "note=n"])
    d = to_dict(cfg)
    assert d["inner"]["sizes"] == [1, 2]  # tuples become lists
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # YAML-serialisable
    back = from_dict(Outer, d)
    assert back == cfg
    assert isinstance(back.inner.sizes, tuple)


@pytest.mark.parametrize("cls, req", [(MineConfig, MINE_REQ), (PretrainConfig, PRETRAIN_REQ),
                                      (TrainClassifierConfig, ["corpus=/c", "output=/o"])])
def test_real_configs_round_trip(cls, req):
    cfg = load_config(cls, overrides=req)
    d = to_dict(cfg)
    assert from_dict(cls, d) == cfg
    assert from_dict(cls, yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_from_dict_of_engine_and_arch_configs():
    arch = DetectorArch(detector="retinanet", depth=18, min_size=(64, 96), max_size=128)
    optim = OptimConfig(lr=0.5, lr_steps=(0.3,), amp=False)
    assert from_dict(DetectorArch, to_dict(arch)) == arch
    assert from_dict(OptimConfig, to_dict(optim)) == optim
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(OptimConfig, {**to_dict(optim), "lrr": 1.0})


def test_str_field_override_is_taken_verbatim():
    # Overrides for str fields are not YAML-parsed: "12:30" stays "12:30" (YAML 1.1 would
    # read it as 750), and "[1,2]" is just text.
    cfg = load_config(MineConfig, overrides=MINE_REQ + ["output=12:30"])
    assert cfg.output == "12:30"


# ---------------------------------------------------------------- shipped configs

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
SHIPPED = (sorted(CONFIG_DIR.glob("imagenet-dap/*.yaml")) + sorted(CONFIG_DIR.glob("demo/*.yaml"))
           + sorted(CONFIG_DIR.glob("ig-predet/*.yaml")))


def stage_class(path: pathlib.Path):
    """The config class of the stage a shipped YAML is for, by its file name."""
    from pseudobox.pipelines import build_corpus, evaluate, finetune, finetune_ssod, split, train_classifier

    classes = {"finetune-ssod": finetune_ssod.FinetuneSsodConfig, "build-corpus": build_corpus.BuildCorpusConfig, "train-classifier": TrainClassifierConfig,
               "mine": MineConfig, "pretrain": PretrainConfig, "split": split.SplitConfig,
               "finetune": finetune.FinetuneConfig, "evaluate": evaluate.EvaluateConfig,
               "build": build_corpus.BuildCorpusConfig}  # build-imagenet.yaml, build-voc07-test.yaml ...
    assert train_classifier.TrainClassifierConfig is TrainClassifierConfig
    stage = next((s for s in classes if path.stem == s or path.stem.startswith(s + "-")), None)
    assert stage is not None, f"{path.name}: no stage of that name"
    return classes[stage]


def test_every_stage_has_shipped_configs():
    assert {p.parent.name for p in SHIPPED} == {"imagenet-dap", "demo", "ig-predet"}
    assert len([p for p in SHIPPED if p.parent.name == "imagenet-dap"]) >= 6


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(stage_class(path), str(path))  # every key known, every type right, validate() passes
    assert to_dict(cfg)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_comments_match_what_amp_does(path):
    # engine.train_loop autocasts to float16 with a GradScaler on CUDA; nothing uses bf16.
    assert "bf16" not in path.read_text().lower() and "bfloat16" not in path.read_text().lower()


def test_ig_predet_pretrain_follows_the_paper():
    """PreDet Sec. 4: batch 1024, lr 0.2, x0.1 in four uniform steps, 540k iterations, 480² views,
    16 queries, 512 negatives, tau 0.07; from scratch."""
    cfg = load_config(PretrainConfig, str(CONFIG_DIR / "ig-predet" / "pretrain-predet.yaml"))
    assert cfg.method == "predet" and not cfg.classifier and not cfg.predet.arch.frozen_bn
    assert cfg.optim.batch_size * cfg.workers.num_workers == cfg.optim.reference_batch == 1024
    assert cfg.optim.lr == 0.2 and cfg.optim.max_iters == 540_000 and cfg.optim.lr_steps == (0.2, 0.4, 0.6, 0.8)
    assert cfg.predet.arch.crop_size == cfg.predet.views.crop_size == 480 and cfg.predet.arch.num_queries == 16
    assert cfg.predet.loss.max_negatives == 512 and cfg.predet.loss.temperature == 0.07


def test_imagenet_pretrain_follows_the_public_dap_schedule():
    """github.com/mikuhatsune/dap dap_in1k_faster_rcnn_r50fpn.yaml: BASE_LR 0.008 with
    IMS_PER_BATCH 64, warmup 2000 iterations from 0.01, one epoch, sides 96..640, max 1333."""
    cfg = load_config(PretrainConfig, str(CONFIG_DIR / "imagenet-dap" / "pretrain.yaml"))
    batch = cfg.optim.batch_size * cfg.workers.num_workers
    assert batch == 64 and cfg.optim.lr == 0.008
    assert (cfg.optim.warmup_iters, cfg.optim.warmup_factor) == (2000, 0.01)
    assert cfg.model.min_size == (96, 160, 320, 640) and cfg.model.max_size == 1333 and cfg.model.test_size == 640
    assert cfg.optim.max_iters == math.ceil(1_281_167 / batch)  # MAX_EPOCH 1 on ImageNet-1M


def test_imagenet_finetune_follows_the_public_voc0712_schedule():
    """in1k_faster_rcnn_r50fpn_voc0712.yaml: lr 0.01, 16 images, 14 epochs with the decay at
    the 10th, short side 640, max side 1066, maskrcnn-benchmark's warmup (500, 1/3)."""
    from pseudobox.pipelines.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, str(CONFIG_DIR / "imagenet-dap" / "finetune-voc.yaml"))
    batch = cfg.optim.batch_size * cfg.workers.num_workers
    assert batch == 16 and cfg.optim.lr == 0.01
    assert cfg.optim.max_iters == math.ceil(14 * 16_551 / batch)
    assert cfg.optim.lr_steps == (pytest.approx(10 / 14, abs=1e-4),)
    assert cfg.model.min_size == (640,) and cfg.model.max_size == 1066 and cfg.model.test_size == 640
    assert cfg.optim.warmup_iters == 500 and cfg.optim.warmup_factor == pytest.approx(1 / 3, abs=1e-3)


# ---------------------------------------------------------------- natural YAML spellings

@pytest.mark.parametrize("value, expected", [(True, "true"), (False, "false"), ("yes", "true"), ("auto", "auto")])
def test_yaml_bool_into_a_str_field(tmp_path, value, expected):
    # `use_gpu: true` is YAML for a bool; the field is a str whose values are auto/true/false.
    path = tmp_path / "cfg.yaml"
    path.write_text(f"use_gpu: {value if isinstance(value, str) else str(value).lower()}\n")
    assert load_config(MineConfig, str(path), MINE_REQ).use_gpu == expected
    path.write_text(f"workers: {{use_gpu: {str(value).lower()}}}\n")
    assert load_config(PretrainConfig, str(path), PRETRAIN_REQ).workers.use_gpu == expected


def test_natural_yaml_spellings(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("steps: 1e4\n"            # PyYAML reads this as the string '1e4'
                    "tags:\n"                 # nothing: an empty list
                    "path:\n"                 # nothing: unset
                    "inner:\n"
                    "  ratio: 0\n"            # an int into a float field
                    "  sizes: 96\n"           # one value into a tuple
                    "  flag: 1\n")
    cfg = load_config(Outer, str(path), validate=False)
    assert cfg.steps == 10000 and isinstance(cfg.steps, int)
    assert cfg.tags == [] and cfg.path == ""
    assert cfg.inner.ratio == 0.0 and isinstance(cfg.inner.ratio, float)
    assert cfg.inner.sizes == (96,)
    assert cfg.inner.flag is True
    with pytest.raises(ConfigError, match=r"^inner\.flag: expected true/false"):
        load_config(Outer, overrides=["inner.flag=2"])
    assert load_config(Outer, overrides=["steps=1.5e1"]).steps == 15  # 15.0 is an integer, 2.5 is not
    with pytest.raises(ConfigError, match=r"^steps: expected an integer"):
        load_config(Outer, overrides=["steps=2.5"])


def test_dump_config_round_trips_awkward_strings(tmp_path):
    cfg = Outer(path="12:30", tags=["true", "", "null", "a,b", "no"], note=None, extra={"k": 1},
                inner=Inner(sizes=(1, 2), ratio=0.25, name="yes"))
    path = tmp_path / "dumped.yaml"
    path.write_text(config.dump_config(cfg))
    assert load_config(Outer, str(path)) == cfg
    assert list(yaml.safe_load(path.read_text())) == ["path", "steps", "tags", "note", "extra", "inner"]


# ---------------------------------------------------------------- paths

def test_stage_configs_mark_their_path_fields():
    from pseudobox.pipelines import bench, build_corpus, demo, evaluate, finetune, split

    expected = {
        build_corpus.BuildCorpusConfig: {"output", "source", "annotations"},
        TrainClassifierConfig: {"corpus", "output", "model.weights", "model.init_checkpoint"},
        MineConfig: {"corpus", "checkpoint", "output"},
        PretrainConfig: {"corpus", "boxes", "classifier", "output"},
        split.SplitConfig: {"corpus", "output"},
        finetune.FinetuneConfig: {"corpus", "split", "checkpoint", "output", "eval_corpus"},
        evaluate.EvaluateConfig: {"checkpoint", "corpus", "split", "output"},
        demo.DemoConfig: {"workdir"},
        bench.BenchDapConfig: {"workdir"},
    }
    for cls, keys in expected.items():
        marked = set(config.path_keys(cls()))
        assert marked >= keys, cls.__name__  # stages may grow path fields of their own
        assert not marked & {"ray.address", "use_gpu", "workers.use_gpu", "method", "init", "builder"}, cls.__name__


@pytest.fixture
def outside_a_job(monkeypatch, tmp_path):
    monkeypatch.delenv(config.RAY_JOB_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_relative_paths_become_absolute_against_the_launch_directory(outside_a_job):
    from pseudobox.pipelines.finetune import FinetuneConfig

    here = outside_a_job
    argv = ["corpus=data/down", "split=./splits/../splits/k5.json", "checkpoint=/abs/dap/model.pt",
            "output=s3://bucket/ft", "eval_corpus=file:///data/test"]
    cfg = load_config(FinetuneConfig, overrides=argv, resolve=True)
    assert cfg.corpus == str(here / "data" / "down")
    assert cfg.split == str(here / "splits" / "k5.json")
    assert (cfg.checkpoint, cfg.output, cfg.eval_corpus) == ("/abs/dap/model.pt", "s3://bucket/ft", "file:///data/test")
    assert load_config(FinetuneConfig, overrides=argv).corpus == "data/down"  # only when asked (the CLI asks)
    assert load_config(FinetuneConfig, overrides=["corpus=~/c", "output=/o", "init=random"], resolve=True).corpus == \
        str(pathlib.Path("~/c").expanduser())
    # A torchvision weights name is not a path; a weights file is.
    tc = load_config(TrainClassifierConfig, overrides=["corpus=/c", "output=o", "model.weights=IMAGENET1K_V1"],
                     resolve=True)
    assert tc.model.weights == "IMAGENET1K_V1" and tc.output == str(here / "o")
    tc = load_config(TrainClassifierConfig, overrides=["corpus=/c", "output=/o", "model.weights=w/r50.pth"],
                     resolve=True)
    assert tc.model.weights == str(here / "w" / "r50.pth")
    assert tc.model.init_checkpoint == ""  # unset stays unset


def test_config_file_is_read_from_the_launch_directory_and_its_paths_resolve_there(outside_a_job):
    (outside_a_job / "configs").mkdir()
    (outside_a_job / "configs" / "mine.yaml").write_text("corpus: ./demo/corpus\ncheckpoint: /k\noutput: out\n")
    cfg = load_config(MineConfig, "configs/mine.yaml", resolve=True)
    assert cfg.corpus == str(outside_a_job / "demo" / "corpus")  # not configs/demo/corpus
    assert cfg.output == str(outside_a_job / "out")


@dataclass
class ManyPaths:
    inputs: list[str] = config.path_field(default_factory=list)


def test_list_path_fields_resolve_item_by_item(outside_a_job):
    cfg = load_config(ManyPaths, overrides=['inputs=["a", "s3://b/c", "/d"]'], resolve=True)
    assert cfg.inputs == [str(outside_a_job / "a"), "s3://b/c", "/d"]


def test_relative_path_is_refused_inside_a_ray_job(monkeypatch):
    monkeypatch.setenv(config.RAY_JOB_ENV_VAR, '{"runtime_env": {}, "metadata": {}}')
    assert config.in_ray_job()
    with pytest.raises(ConfigError) as e:
        load_config(MineConfig, overrides=["corpus=./pseudobox-demo/corpus", "checkpoint=/k", "output=s3://b/o"],
                    resolve=True)
    msg = str(e.value)
    assert msg.startswith("corpus: relative path './pseudobox-demo/corpus' inside a Ray job")
    assert "absolute path" in msg and "s3://" in msg
    with pytest.raises(ConfigError, match=r"^inputs\[1\]: relative path"):
        load_config(ManyPaths, overrides=['inputs=["/a", "b"]'], resolve=True)
    # Absolute paths and URIs are what a job should use.
    cfg = load_config(MineConfig, overrides=["corpus=/shared/corpus", "checkpoint=s3://b/k", "output=s3://b/o"],
                      resolve=True)
    assert cfg.corpus == "/shared/corpus" and cfg.checkpoint == "s3://b/k"

"""The actor-pool settings ``mine`` and ``predict`` share: ``gpus_per_actor`` is checked
before any Ray work and reaches Ray as each actor's ``num_gpus`` (no Ray needed: the
dataset is a stand-in that records the ``map_batches`` call)."""
import pytest

from pseudobox.config import ConfigError, load_config
from pseudobox.pipelines.common import run_shard_pool
from pseudobox.pipelines.mine import MineConfig
from pseudobox.pipelines.predict import PredictConfig

PATHS = {"corpus": "s3://b/corpus", "checkpoint": "s3://b/model.pt", "output": "s3://b/out"}


@pytest.mark.parametrize("config_cls", [MineConfig, PredictConfig])
@pytest.mark.parametrize("gpus", [0.5, 0.25, 1, 2])
def test_gpu_fractions_and_whole_gpus_are_accepted(config_cls, gpus):
    cfg = load_config(config_cls, overrides=[f"{k}={v}" for k, v in PATHS.items()] + [f"gpus_per_actor={gpus}"])
    assert cfg.gpus_per_actor == gpus


@pytest.mark.parametrize("config_cls", [MineConfig, PredictConfig])
@pytest.mark.parametrize("gpus", [1.5, 0, -1, -0.5])
def test_gpus_per_actor_neither_a_fraction_nor_whole_is_refused_naming_the_key(config_cls, gpus):
    with pytest.raises(ConfigError, match="gpus_per_actor"):
        load_config(config_cls, overrides=[f"{k}={v}" for k, v in PATHS.items()] + [f"gpus_per_actor={gpus}"])


class RecordingDataset:
    """Stands in for a Ray dataset: records how the actor pool was asked for, yields nothing."""

    def __init__(self):
        self.map_batches_kwargs = None

    def map_batches(self, fn, **kwargs):
        self.map_batches_kwargs = {"fn": fn, **kwargs}
        return self

    def iter_batches(self, **kwargs):
        return iter(())


class NoShardsWriter:
    def add_batch(self, batch):
        return []

    def close(self):
        return {}


class Actor:  # never constructed: the stand-in dataset runs nothing
    pass


def _pool_call(cfg, use_gpu: bool) -> dict:
    ds = RecordingDataset()
    reports = run_shard_pool(ds, Actor, {"checkpoint_uri": "x"}, cfg, use_gpu, NoShardsWriter(), "mine", {})
    assert reports == {}
    return ds.map_batches_kwargs


@pytest.mark.parametrize("config_cls", [MineConfig, PredictConfig])
def test_a_gpu_fraction_reaches_ray_as_num_gpus_per_actor(config_cls):
    cfg = config_cls(**PATHS, min_actors=2, max_actors=4, gpus_per_actor=0.5, cpus_per_actor=2)
    cfg.validate()
    call = _pool_call(cfg, use_gpu=True)
    assert call["num_gpus"] == 0.5  # two actors share one GPU
    assert call["num_cpus"] == 2
    assert call["compute"].min_size == 2 and call["compute"].max_size == 4
    assert call["fn"] is Actor and call["fn_constructor_kwargs"]["device"] == "cuda"
    assert call["fn_constructor_kwargs"]["checkpoint_uri"] == "x"


def test_without_gpus_the_actors_reserve_none_and_run_on_their_cpus():
    cfg = MineConfig(**PATHS, gpus_per_actor=0.5, cpus_per_actor=3)
    call = _pool_call(cfg, use_gpu=False)
    assert call["num_gpus"] == 0  # gpus_per_actor only applies with use_gpu
    assert call["fn_constructor_kwargs"]["device"] == "cpu" and call["fn_constructor_kwargs"]["threads"] == 3


def test_actors_that_decode_their_own_batches_get_the_gpu_fraction_too():
    from pseudobox.datasets.ray_io import DecodingActor

    cfg = MineConfig(**PATHS, gpus_per_actor=0.25)
    ds = RecordingDataset()
    run_shard_pool(ds, Actor, {}, cfg, True, NoShardsWriter(), "mine", {}, decode={"classes": ["a"], "labelled": True})
    call = ds.map_batches_kwargs
    assert call["fn"] is DecodingActor and call["num_gpus"] == 0.25
    assert call["fn_constructor_kwargs"]["actor_cls"] is Actor
    assert call["fn_constructor_kwargs"]["actor_kwargs"]["device"] == "cuda"

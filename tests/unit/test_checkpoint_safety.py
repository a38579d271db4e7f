"""Loading a checkpoint never runs code from it, and what pseudobox saves always loads back
weights-only (tensors, numbers, strings, None, lists, tuples and dicts)."""
from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

from pseudobox import storage
from pseudobox.models.checkpoint import (
    CheckpointError, load_checkpoint, make_checkpoint, plain_tree, read_checkpoint_file, save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ShellPayload:
    """Unpickling this runs ``touch <marker>`` through os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class ExecPayload:
    """Unpickling this runs Python code that writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


def crafted_checkpoint(payload) -> dict:
    """A well-formed pseudobox checkpoint with the payload hidden in its metadata."""
    ckpt = make_checkpoint("classifier", {"depth": 18}, ["a", "b"], {"w": torch.ones(2)}, step=1)
    ckpt["metrics"] = {"ap": payload}
    return ckpt


def write_crafted(path, payload, fmt: str) -> str:
    """``torch.save`` (zip) format or a bare pickle (torch's legacy format) of a crafted checkpoint."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":
        torch.save(crafted_checkpoint(payload), path)
    else:
        path.write_bytes(pickle.dumps(crafted_checkpoint(payload), protocol=2))
    return str(path)


PAYLOADS = [ShellPayload, ExecPayload]
FORMATS = ["zip", "pickle"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_payload_is_live_when_loaded_unsafely(tmp_path, payload):
    """Control: the crafted file really runs its payload under a plain unpickler, so the
    tests below prove something when the marker stays absent."""
    marker = tmp_path / "ran"
    path = write_crafted(tmp_path / "model.pt", payload(marker), "pickle")
    with open(path, "rb") as f:
        pickle.load(f)  # the unsafe load this project never does
    assert marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_load_checkpoint_refuses_a_crafted_checkpoint(tmp_path, payload, fmt):
    marker = tmp_path / "ran"
    path = write_crafted(tmp_path / "run" / "model.pt", payload(marker), fmt)
    for uri in (path, str(tmp_path / "run")):
        with pytest.raises(CheckpointError, match="refusing to load .*could run code on load"):
            load_checkpoint(uri)
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_every_load_path_refuses_a_crafted_checkpoint(tmp_path, payload, monkeypatch):
    from pseudobox.engine import WorkerCheckpointer
    from pseudobox.models.classifier import build_resnet, classifier_from_weights, load_classifier
    from pseudobox.models.detectors import DetectorArch, build_detector
    from pseudobox.pipelines import train_detector, trainer

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    path = write_crafted(run / "model.pt", payload(marker), "zip")
    refused = pytest.raises(CheckpointError, match="refusing to load")

    with refused:  # resuming a training run (engine)
        WorkerCheckpointer(str(run)).restore()
    with refused:  # classifier weights from a state-dict URI
        build_resnet(18, num_classes=2, weights=path)
    with refused:  # converting weights (train-classifier with optim.max_iters=0)
        classifier_from_weights(18, path, ["a", "b"])
    with refused:  # CAM mining's classifier
        load_classifier(str(run))
    arch = DetectorArch(detector="retinanet", depth=18, min_size=(64,), max_size=128, test_size=64)
    for init in ({"detector": path}, {"classifier": path}):  # pre-training and fine-tuning inits
        with refused:
            train_detector.initialise(build_detector(arch, 2), arch, init, ["a", "b"])

    class RayResult:  # the driver's export of the last Ray Train checkpoint
        class checkpoint:
            @staticmethod
            @contextlib.contextmanager
            def as_directory():
                yield str(run)

    with refused:
        trainer.export_final(RayResult(), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.pt").exists()

    with pytest.raises(pickle.UnpicklingError):  # the storage layer itself loads weights-only
        storage.torch_load(path)
    assert not marker.exists()


def test_corrupt_file_is_still_called_corrupt(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02" + os.urandom(512))
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        read_checkpoint_file(str(path))


# ---------------------------------------------------------------- what we save loads back weights-only

@dataclasses.dataclass
class Settings:
    sizes: tuple = (96, 160)
    where: pathlib.Path = pathlib.Path("/data/x")


Point = collections.namedtuple("Point", "x y")


def weights_only_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_make_checkpoint_converts_metadata_to_plain_types(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ckpt = make_checkpoint(
        "classifier", {"depth": np.int64(18)}, np.array(["a", "b"]), model.state_dict(),
        step=np.int64(3), history=[{"step": np.int32(1), "loss": np.float32(0.5), "lr": np.float64(0.1)}],
        metrics={"ap": np.float64(41.5), "per_class": np.array([0.5, 0.25]), "shape": torch.Size([2, 3]),
                 "corner": Point(1, 2), "bad": float("nan")},
        config=Settings(), init={"param": torch.nn.Parameter(torch.ones(2))})
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    back = weights_only_load(path)  # a plain torch.save of it loads weights-only
    assert back["arch"] == {"depth": 18} and type(back["arch"]["depth"]) is int
    assert back["class_names"] == ["a", "b"] and type(back["class_names"][0]) is str
    assert back["step"] == 3 and back["history"] == [{"step": 1, "loss": 0.5, "lr": 0.1}]
    assert back["metrics"]["per_class"] == [0.5, 0.25] and back["metrics"]["shape"] == [2, 3]
    assert back["metrics"]["corner"] == [1, 2] and back["metrics"]["ap"] == 41.5
    assert back["config"] == {"sizes": (96, 160), "where": "/data/x"}
    assert type(back["init"]["param"]) is torch.Tensor
    # State dicts keep their module versions (BatchNorm's loading depends on them).
    assert back["model_state"]._metadata == model.state_dict()._metadata
    model.load_state_dict(back["model_state"])


def test_save_checkpoint_refuses_what_cannot_load_back(tmp_path):
    uri = str(tmp_path / "model.pt")
    base = make_checkpoint("classifier", {"depth": 18}, ["a"], {})
    for bad, where in ((lambda: 1, "metrics.fn"), (object(), "metrics.fn"), (torch.nn.Linear(1, 1), "metrics.fn")):
        with pytest.raises(CheckpointError, match=rf"checkpoint\.{where} is a .*only tensors, numbers"):
            save_checkpoint({**base, "metrics": {"fn": bad}}, uri)
    with pytest.raises(CheckpointError, match="key of type"):
        save_checkpoint({**base, "metrics": {(1, 2): 3}}, uri)
    with pytest.raises(CheckpointError):
        make_checkpoint("classifier", {"depth": 18}, ["a"], {}, init={"callback": print})
    assert not os.path.exists(uri)


def test_plain_tree_keeps_plain_data_as_is():
    tree = {"a": [1, 2.5, "x", None, True, (3, "y")], 4: {"t": torch.zeros(2)}}
    out = plain_tree(tree)
    assert out["a"] == tree["a"] and type(out["a"][5]) is tuple and out[4]["t"] is tree[4]["t"]


def test_training_checkpoints_with_optimizer_state_load_weights_only(tmp_path):
    """The engine's checkpoints (optimizer momentum, LR scheduler, history) and the
    classifier stage's: a raw weights-only load, a resume, and the trained-head mark."""
    from pseudobox.config import to_dict
    from pseudobox.engine import OptimConfig
    from pseudobox.pipelines import train_classifier
    from pseudobox.pipelines.train_classifier import ClassifierModelConfig, TrainClassifierConfig

    cfg = TrainClassifierConfig(corpus="/c", output="/o", model=ClassifierModelConfig(depth=18),
                                optim=OptimConfig(lr=0.01, warmup_iters=1, max_iters=2, batch_size=2,
                                                  checkpoint_every=1, log_every=1, amp=False),
                                image_size=32)
    config = {"config": to_dict(cfg), "class_names": ["a", "b"], "multi_label": False, "use_gpu": False,
              "threads": 1}
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
             "target": np.eye(2, dtype=np.float32)[[0, 1]]}
    torch.manual_seed(0)
    train_classifier.worker(config, local_dir=str(tmp_path), batches=lambda: iter([batch]))
    raw = weights_only_load(tmp_path / "model.pt")
    assert raw["step"] == 2 and raw["head"] == "trained"
    assert raw["optimizer_state"]["state"] and raw["scheduler_state"]["last_epoch"] == 2
    hist = train_classifier.worker({**config, "config": {**config["config"], "optim": {
        **config["config"]["optim"], "max_iters": 3}}}, local_dir=str(tmp_path), batches=lambda: iter([batch]))
    assert [r["step"] for r in hist] == [1, 2, 3]  # resumed from the weights-only restore

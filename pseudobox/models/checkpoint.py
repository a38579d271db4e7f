"""The checkpoint format handed from stage to stage.

One ``model.pt`` file (torch.save of a dict) that records what the model was, so that
the next stage knows what it can transfer::

    {"format": "pseudobox", "format_version": 1,
     "model_type": "classifier" | "detector",
     "arch": {...},            # e.g. {"depth": 50} or {"detector": "faster_rcnn", "depth": 50, ...}
     "class_names": [...], "method": "cls" | "dap" | ..., "stage": "...",
     "head": "trained" | "random",   # classifiers: whether ``fc`` was ever trained
     "model_state": state_dict, "optimizer_state": ..., "scheduler_state": ...,
     "step": int, "config": {...}, "metrics": {...}}

A checkpoint holds only tensors, numbers, strings, ``None``, lists, tuples and dicts:
checkpoints come from shared buckets, so every load is ``torch.load(weights_only=True)``,
which refuses anything else instead of running it. ``make_checkpoint`` and
``save_checkpoint`` convert what is convertible (numpy scalars and arrays, dataclasses,
paths, ``torch.Size``) and raise ``CheckpointError`` on anything else, so that what we
write always loads back.

A checkpoint URI may name the file, a directory holding ``model.pt`` (a Ray Train
checkpoint), or a run directory, whose ``model.pt`` (the final export) or else newest
``checkpoint_*`` is used.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import pickle
from collections import OrderedDict

import numpy as np
import torch

from pseudobox import storage

FORMAT = "pseudobox"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
HEAD_STATES = ("trained", "random")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe, or not the kind of model expected."""


def plain_tree(obj, where: str = "checkpoint"):
    """``obj`` as tensors, numbers, strings, None, lists, tuples and dicts only.

    Numpy scalars and arrays (to Python numbers and lists), dataclasses (to dicts), enums,
    paths, sets and tuple subclasses (``torch.Size``, namedtuples: to lists) are converted;
    ``OrderedDict`` state dicts keep their ``_metadata`` (module versions). Anything else raises ``CheckpointError`` naming
    where it is, because ``weights_only`` loading would refuse the file later.
    """
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, torch.Tensor):
        # nn.Parameter and other subclasses are stored as plain tensors.
        return obj if type(obj) is torch.Tensor else obj.detach().as_subclass(torch.Tensor)
    if isinstance(obj, np.generic):
        return plain_tree(obj.item(), where)
    if isinstance(obj, np.ndarray):  # metadata (metrics, history): JSON-friendly lists
        return plain_tree(obj.tolist(), where)
    if isinstance(obj, enum.Enum):
        return plain_tree(obj.value, where)
    for base in (bool, int, float, str):  # subclasses of the plain scalars
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_tree({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, where)
    if isinstance(obj, dict):
        items = ((_plain_key(k, where), plain_tree(v, f"{where}.{k}")) for k, v in obj.items())
        if isinstance(obj, OrderedDict):
            out = OrderedDict(items)
            metadata = getattr(obj, "_metadata", None)
            if metadata is not None:
                out._metadata = plain_tree(metadata, f"{where}._metadata")
            return out
        return dict(items)
    if type(obj) is tuple:
        return tuple(plain_tree(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (list, tuple)):
        return [plain_tree(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [plain_tree(v, f"{where}[]") for v in sorted(obj, key=repr)]
    raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint may "
                          "hold only tensors, numbers, strings, None, lists, tuples and dicts")


def _plain_key(key, where: str):
    if isinstance(key, (np.generic, enum.Enum)):
        key = key.item() if isinstance(key, np.generic) else key.value
    if isinstance(key, str):
        return str(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return int(key)
    raise CheckpointError(f"{where} has a key of type {type(key).__qualname__} ({key!r}); "
                          "checkpoint dict keys must be strings or integers")


def make_checkpoint(model_type: str, arch: dict, class_names: list[str], model_state: dict, **extra) -> dict:
    """A checkpoint dict in the pseudobox format, already reduced to plain types."""
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": model_type,
            "arch": dict(arch), "class_names": [str(c) for c in class_names], "model_state": model_state, **extra}
    return plain_tree(ckpt)


def read_checkpoint_file(uri: str):
    """``torch.load(weights_only=True)`` of a file URI; every failure is a ``CheckpointError``.

    A file that carries anything but plain data (a pickled callable, a class instance)
    is refused before any of it runs, with a message that says so.
    """
    try:
        return storage.torch_load(uri)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if refused:
            raise CheckpointError(f"refusing to load {uri}: it holds objects other than tensors, numbers, "
                                  f"strings, lists and dicts, which could run code on load ({refused[0]}). "
                                  "Only load checkpoints written by pseudobox.") from e
        error = e
    except Exception as e:
        error = e
    raise CheckpointError(f"checkpoint {uri} is corrupt or unreadable: {type(error).__name__}: "
                          f"{_short(error)}") from error


def _short(e: Exception) -> str:
    """The informative line of torch's long weights-only error messages."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running",
                   "In PyTorch 2.6", "(1)", "(2)")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = [line for line in lines if not line.startswith(boilerplate)]
    return (detail or lines or [""])[0][:300]


def resolve_checkpoint(uri: str) -> str:
    """The ``model.pt`` a checkpoint URI points to (see module doc)."""
    if uri.endswith(".pt") or uri.endswith(".pth"):
        if not storage.exists(uri):
            raise CheckpointError(f"checkpoint {uri} does not exist")
        return uri
    names = storage.listdir(uri)
    if not names:
        raise CheckpointError(f"checkpoint {uri} does not exist or is empty")
    if MODEL_FILE in names:
        return storage.join(uri, MODEL_FILE)
    ckpts = sorted(n for n in names if n.startswith("checkpoint_") and not n.endswith(".json"))
    for name in reversed(ckpts):
        if MODEL_FILE in storage.listdir(storage.join(uri, name)):
            return storage.join(uri, name, MODEL_FILE)
    raise CheckpointError(f"no {MODEL_FILE} under {uri} (expected a model.pt, a checkpoint dir or a run dir)")


def load_checkpoint(uri: str, expect_type: str | tuple[str, ...] | None = None) -> dict:
    """Load and check a checkpoint; a corrupt, unsafe or mismatched one gets a clear error.
    ``expect_type``: the ``model_type`` needed, or a tuple of the acceptable ones."""
    path = resolve_checkpoint(uri)
    ckpt = read_checkpoint_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pseudobox checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {ckpt.get('format_version')} "
                              f"is not supported (expected {FORMAT_VERSION})")
    accepted = (expect_type,) if isinstance(expect_type, str) else tuple(expect_type or ())
    if accepted and ckpt.get("model_type") not in accepted:
        raise CheckpointError(f"{path} holds a {ckpt.get('model_type')} but a {' or a '.join(accepted)} "
                              "is needed here")
    for field in ("arch", "class_names", "model_state"):
        if field not in ckpt:
            raise CheckpointError(f"{path} lacks '{field}'")
    return ckpt


def save_checkpoint(ckpt: dict, uri: str) -> None:
    """Atomic save to a file URI (local or s3://), reduced to types that load back safely."""
    storage.torch_save(plain_tree(ckpt), uri)

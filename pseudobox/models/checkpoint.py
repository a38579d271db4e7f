"""The checkpoint format handed from stage to stage.

One ``model.pt`` file (torch.save of a dict) that records what the model was, so that
the next stage knows what it can transfer::

    {"format": "pseudobox", "format_version": 1,
     "model_type": "classifier" | "detector",
     "arch": {...},            # e.g. {"depth": 50} or {"detector": "faster_rcnn", "depth": 50, ...}
     "class_names": [...], "method": "cls" | "dap" | ..., "stage": "...",
     "model_state": state_dict, "optimizer_state": ..., "scheduler_state": ...,
     "step": int, "config": {...}, "metrics": {...}}

A checkpoint URI may name the file, a directory holding ``model.pt`` (a Ray Train
checkpoint), or a run directory, whose ``model.pt`` (the final export) or else newest
``checkpoint_*`` is used.
"""
from __future__ import annotations

from pseudobox import storage

FORMAT = "pseudobox"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not the kind of model expected."""


def make_checkpoint(model_type: str, arch: dict, class_names: list[str], model_state: dict, **extra) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": model_type,
            "arch": dict(arch), "class_names": list(class_names), "model_state": model_state, **extra}


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


def load_checkpoint(uri: str, expect_type: str | None = None) -> dict:
    """Load and check a checkpoint; a corrupt or mismatched one gets a clear error."""
    path = resolve_checkpoint(uri)
    try:
        ckpt = storage.torch_load(path)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pseudobox checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {ckpt.get('format_version')} "
                              f"is not supported (expected {FORMAT_VERSION})")
    if expect_type and ckpt.get("model_type") != expect_type:
        raise CheckpointError(f"{path} holds a {ckpt.get('model_type')} but a {expect_type} is needed here")
    for field in ("arch", "class_names", "model_state"):
        if field not in ckpt:
            raise CheckpointError(f"{path} lacks '{field}'")
    return ckpt


def save_checkpoint(ckpt: dict, uri: str) -> None:
    """Atomic save to a file URI (local or s3://)."""
    storage.torch_save(ckpt, uri)

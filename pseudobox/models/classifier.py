"""The DAP step-1 classifier: a torchvision ResNet, and its class activation maps.

The model is the unmodified torchvision ResNet (so its state dict transfers to
torchvision's detection backbones by name); ``forward`` returns raw logits. CAMs apply
the final linear layer's class weights as a 1×1 convolution to the last feature map,
before pooling and with no activation.

Weights (a torchvision weights name or a state-dict URI) are loaded weights-only. When
the classes asked for do not match the weights' head, the final layer starts random;
that is logged, and classifier checkpoints record it (``head: "random"``) so that CAM
mining, which reads the head, refuses such a classifier.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn as nn
import torchvision

from pseudobox.models.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, read_checkpoint_file

log = logging.getLogger(__name__)

RESNETS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WNID = re.compile(r"^n\d{8}$")  # an ImageNet synset id, the class folder names of ILSVRC2012


def is_weights_name(weights: str) -> bool:
    """A torchvision weights name (``IMAGENET1K_V1``) rather than a file path or URI."""
    return "/" not in weights and not weights.endswith((".pth", ".pt"))


def torchvision_weights(depth: int, name: str):
    """The torchvision ``WeightsEnum`` member ``ResNet<depth>_Weights.<name>`` (no download)."""
    if depth not in RESNETS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(RESNETS)}")
    enum_name = f"ResNet{depth}_Weights"
    try:
        return torchvision.models.get_weight(f"{enum_name}.{name}")
    except (KeyError, ValueError, AttributeError) as e:
        choices = [w.name for w in getattr(torchvision.models, enum_name)]
        raise CheckpointError(f"unknown torchvision weights {name!r} for ResNet-{depth}; "
                              f"choose one of {choices}") from e


def resnet_weights_state(depth: int, weights: str) -> dict:
    """The state dict named by ``weights``: torchvision weights (downloaded into the
    TORCH_HOME cache, hash-checked) or a ``state_dict`` file URI (a bare state dict or
    ``{"state_dict": ...}``). Both are loaded weights-only."""
    if is_weights_name(weights):
        return dict(torchvision_weights(depth, weights).get_state_dict(progress=True, check_hash=True,
                                                                      weights_only=True))
    state = read_checkpoint_file(weights)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights} is not a state dict (a mapping of names to tensors)")
    return state


def weights_num_classes(depth: int, weights: str) -> int | None:
    """Classes of the weights' head, without downloading torchvision weights; None when a
    state dict has no ``fc``."""
    if is_weights_name(weights):
        return len(torchvision_weights(depth, weights).meta["categories"])
    fc = resnet_weights_state(depth, weights).get("fc.weight")
    return None if fc is None else int(fc.shape[0])


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def build_resnet_with_head(depth: int, num_classes: int | None = None, weights: str | None = None,
                           norm_layer=None) -> tuple[nn.Module, bool]:
    """``build_resnet`` that also says whether the final layer came from ``weights``."""
    if depth not in RESNETS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(RESNETS)}")
    builder = getattr(torchvision.models, RESNETS[depth])
    kwargs = {"norm_layer": norm_layer} if norm_layer is not None else {}
    state = resnet_weights_state(depth, weights) if weights else {}
    head_rows = int(state["fc.weight"].shape[0]) if "fc.weight" in state else None
    out_classes = num_classes or head_rows or 1000
    model = builder(weights=None, num_classes=out_classes, **kwargs)
    if not weights:
        return model, False
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if not k.startswith("fc.") and not _is_counter(k) and k not in fitting]
    if missing:
        raise CheckpointError(f"{weights} does not look like a ResNet-{depth} state dict: {len(missing)} "
                              f"backbone tensors missing or of another shape, e.g. {missing[:3]}")
    model.load_state_dict(fitting, strict=False)
    head_loaded = "fc.weight" in fitting and "fc.bias" in fitting
    if not head_loaded:
        found = f"a {head_rows}-class head" if head_rows is not None else "no head"
        log.warning("ResNet-%d from %s: the weights have %s, so the %d-class final layer (fc) is randomly "
                    "initialised; it must be trained before the classifier's logits or CAMs mean anything",
                    depth, weights, found, out_classes)
    return model, head_loaded


def build_resnet(depth: int, num_classes: int | None = None, weights: str | None = None,
                 norm_layer=None) -> nn.Module:
    """A torchvision ResNet of ``depth``; ``weights`` is a torchvision weights name
    (e.g. ``IMAGENET1K_V1``, loaded through torchvision's own cache and download) or a
    path/URI of a ``state_dict`` file, loaded weights-only. ``num_classes`` sizes the
    final layer, which starts random (with a warning) when the weights' head differs."""
    return build_resnet_with_head(depth, num_classes, weights, norm_layer)[0]


def check_torchvision_class_order(class_names: list[str], weights: str, categories: list[str] | None) -> None:
    """Refuse class names that cannot be in the weights' index order.

    torchvision's ImageNet index order is the sorted synset ids (``n01440764``, ...),
    which is what the imagefolder corpus builder produces from ILSVRC2012's folders.
    """
    if categories is not None and list(class_names) == list(categories):
        return
    if all(WNID.match(c) for c in class_names):
        if list(class_names) != sorted(class_names):
            raise CheckpointError(f"the corpus's ImageNet synset ids are not sorted, but the head of {weights} "
                                  "indexes them in sorted order: rebuild the corpus with builder=imagefolder")
        return
    log.warning("cannot check that the corpus's class names %s... follow the class order of %s "
                "(expected ImageNet synset ids like n01440764, sorted)", list(class_names[:3]), weights)


def classifier_from_weights(depth: int, weights: str, class_names: list[str], **extra) -> dict:
    """A pseudobox classifier checkpoint holding ``weights`` exactly, head included.

    No forward pass and no optimizer step: BatchNorm running statistics stay those of
    the weights (they become the frozen BatchNorm of every detector built on it).
    ``class_names`` must be the weights' classes, in their index order.
    """
    categories = torchvision_weights(depth, weights).meta["categories"] if is_weights_name(weights) else None
    if categories is not None and len(categories) != len(class_names):
        raise CheckpointError(f"{weights} has a {len(categories)}-class head but the corpus has "
                              f"{len(class_names)} classes; converting needs the weights' own classes")
    state = resnet_weights_state(depth, weights)
    if "fc.weight" not in state or "fc.bias" not in state:
        raise CheckpointError(f"{weights} has no final layer (fc); converting needs the trained head")
    rows = int(state["fc.weight"].shape[0])
    if rows != len(class_names):
        raise CheckpointError(f"{weights} has a {rows}-class head but the corpus has {len(class_names)} classes; "
                              "converting needs the weights' own classes")
    check_torchvision_class_order(class_names, weights, categories)
    model = build_resnet(depth, num_classes=rows)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_counter(k)]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match a ResNet-{depth}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    source = "torchvision" if categories is not None else "state_dict"
    extra = {"step": 0, "history": [], "method": "cls", "stage": "train-classifier",
             "init": {"from": source, "weights": weights}, **extra, "head": "trained"}
    return make_checkpoint("classifier", {"depth": depth}, class_names, model.state_dict(), **extra)


def require_trained_head(ckpt: dict, uri: str = "the classifier", purpose: str = "class activation maps") -> None:
    """Refuse a classifier checkpoint whose final layer was never trained (``head: "random"``).

    CAMs are the final layer's class weights over the feature map: with a random head
    they are noise, and the mined boxes would be too. Checkpoints that predate the
    ``head`` field pass.
    """
    if ckpt.get("head") == "random":
        raise CheckpointError(f"{uri}: the classifier's final layer is randomly initialised and was never "
                              f"trained, so it cannot give {purpose}. Train the classifier on this corpus "
                              "(train-classifier with optim.max_iters > 0), or convert weights whose head "
                              "has the corpus's classes")


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` (HWC) → float ``[..., 3, H, W]`` normalised with ImageNet stats."""
    x = images.movedim(-1, -3).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def resnet_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map (``layer4`` output) of a torchvision ResNet."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def backbone_features(model: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``resnet_features`` in channels_last, under autocast to ``dtype`` unless fp32,
    returned as fp32 so that the CAM (a 1×1 conv of the fc weights), its normalisation
    and the box fitting never run in reduced precision."""
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        feats = resnet_features(model, x)
    return feats.float()


def class_activation_maps(model: nn.Module, images: torch.Tensor, image_idx: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """CAMs ``[P, h, w]`` for P (image index, class) pairs of a normalised batch."""
    return cams_from_features(model, resnet_features(model, images), image_idx, labels)


def cams_from_features(model: nn.Module, feats: torch.Tensor, image_idx: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """The fc weights of each pair's class as a 1×1 conv over its image's feature map."""
    weights = model.fc.weight[labels]  # [P, C]
    return torch.einsum("pc,pchw->phw", weights, feats[image_idx])


def load_classifier(uri: str, device="cpu", allow_random_head: bool = False) -> tuple[nn.Module, dict]:
    """Load a classifier checkpoint (file, checkpoint dir or run dir) in eval mode.

    Its logits and CAMs come from the final layer, so a checkpoint whose head was never
    trained is refused (``require_trained_head``) unless ``allow_random_head``.
    """
    ckpt = load_checkpoint(uri, expect_type="classifier")
    if not allow_random_head:
        require_trained_head(ckpt, uri)
    arch = ckpt["arch"]
    model = build_resnet(arch["depth"], num_classes=len(ckpt["class_names"]))
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval(), ckpt

"""The DAP step-1 classifier: a torchvision ResNet, and its class activation maps.

The model is the unmodified torchvision ResNet (so its state dict transfers to
torchvision's detection backbones by name); ``forward`` returns raw logits. CAMs apply
the final linear layer's class weights as a 1×1 convolution to the last feature map,
before pooling and with no activation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from pseudobox import storage
from pseudobox.models.checkpoint import CheckpointError, load_checkpoint

RESNETS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_resnet(depth: int, num_classes: int | None = None, weights: str | None = None,
                 norm_layer=None) -> nn.Module:
    """A torchvision ResNet of ``depth``; ``weights`` is a torchvision weights name
    (e.g. ``IMAGENET1K_V1``, loaded through torchvision's own cache and download) or a
    path/URI of a ``state_dict`` file. ``num_classes`` replaces the final layer."""
    if depth not in RESNETS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(RESNETS)}")
    builder = getattr(torchvision.models, RESNETS[depth])
    kwargs = {"norm_layer": norm_layer} if norm_layer is not None else {}
    if weights and "/" not in weights and not weights.endswith((".pth", ".pt")):
        model = builder(weights=torchvision.models.get_weight(f"{RESNETS[depth].replace('resnet', 'ResNet')}_Weights.{weights}"), **kwargs)
    else:
        model = builder(weights=None, **kwargs)
        if weights:
            state = storage.torch_load(weights)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            # A head for another class count is dropped; ``num_classes`` gets a fresh one.
            own = model.state_dict()
            state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if len(missing) > len(state) // 2:
                raise CheckpointError(f"{weights} does not look like a ResNet-{depth} state dict "
                                      f"({len(missing)} missing keys)")
    if num_classes is not None and model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


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


def class_activation_maps(model: nn.Module, images: torch.Tensor, image_idx: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """CAMs ``[P, h, w]`` for P (image index, class) pairs of a normalised batch."""
    return cams_from_features(model, resnet_features(model, images), image_idx, labels)


def cams_from_features(model: nn.Module, feats: torch.Tensor, image_idx: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """The fc weights of each pair's class as a 1×1 conv over its image's feature map."""
    weights = model.fc.weight[labels]  # [P, C]
    return torch.einsum("pc,pchw->phw", weights, feats[image_idx])


def load_classifier(uri: str, device="cpu") -> tuple[nn.Module, dict]:
    """Load a classifier checkpoint (file, checkpoint dir or run dir) in eval mode."""
    ckpt = load_checkpoint(uri, expect_type="classifier")
    arch = ckpt["arch"]
    model = build_resnet(arch["depth"], num_classes=len(ckpt["class_names"]))
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval(), ckpt

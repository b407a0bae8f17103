"""torchvision ResNets with last stride 1 and ImageNet weight loading (online or from a file)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, ResNet

STAGES = ("layer1", "layer2", "layer3", "layer4")

# resnet10 is a one-block-per-stage BasicBlock ResNet for tests and quick CPU runs; it has
# no published ImageNet weights.
_BUILDERS = {
    "resnet10": lambda: ResNet(BasicBlock, [1, 1, 1, 1]),
    "resnet18": lambda: models.resnet18(weights=None),
    "resnet34": lambda: models.resnet34(weights=None),
    "resnet50": lambda: models.resnet50(weights=None),
    "resnet101": lambda: models.resnet101(weights=None),
}


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but could not be obtained."""


def backbone_names() -> list[str]:
    """The backbone names :func:`build_resnet` accepts."""
    return list(_BUILDERS)


def feature_dim(resnet: ResNet) -> int:
    """Channels of the ResNet's layer4 output (512 for BasicBlock nets, 2048 for Bottleneck)."""
    return resnet.fc.in_features


def set_last_stride(resnet: ResNet, stride: int) -> None:
    """Set the stride of layer4's first block (its strided conv and its downsample shortcut)."""
    block = resnet.layer4[0]
    # Bottleneck strides its 3x3 conv2; BasicBlock strides conv1.
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def _download_imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """Fetch torchvision's default ImageNet weights for ``name`` (cached under TORCH_HOME)."""
    weights = models.get_model_weights(name).DEFAULT
    return weights.get_state_dict(progress=True, check_hash=True)


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained: weight file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt file
        raise PretrainedWeightsError(f"model.pretrained: cannot read {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"model.pretrained: {path} does not hold a state dict")
    # Accept checkpoints saved from wrappers (DataParallel "module.", timm-style "backbone.").
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_pretrained(resnet: ResNet, name: str, pretrained: str) -> None:
    """Load ImageNet weights into ``resnet``.

    ``pretrained`` is ``"imagenet"`` (torchvision's weights API, downloads when online and
    uses the local cache otherwise) or a path to a state-dict file. The classifier (``fc``)
    is ignored; any other missing or mis-shaped key is an error naming it.
    """
    if pretrained == "imagenet":
        if name == "resnet10":
            raise PretrainedWeightsError(
                "model.pretrained=imagenet: resnet10 has no ImageNet weights; use model.pretrained=none"
            )
        try:
            state = _download_imagenet_state(name)
        except Exception as err:
            raise PretrainedWeightsError(
                f"could not obtain ImageNet weights for {name} through torchvision ({err}). "
                f"Either go online once (they are cached under $TORCH_HOME), or download "
                f"torchvision's {name} weights file and pass model.pretrained=/path/to/file.pth, "
                f"or train from scratch with model.pretrained=none"
            ) from err
        source = f"torchvision {name} ImageNet weights"
    else:
        path = Path(pretrained).expanduser()
        state = _load_state_file(path)
        source = str(path)
    own = resnet.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in own if not k.startswith("fc.") and k not in state]
    if missing:
        raise PretrainedWeightsError(
            f"{source} does not fit {name}: {len(missing)} missing keys, e.g. {missing[:3]}"
        )
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise PretrainedWeightsError(
                f"{source} does not fit {name}: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise PretrainedWeightsError(
            f"{source} does not fit {name}: unexpected keys, e.g. {unexpected[:3]}"
        )
    resnet.load_state_dict(state, strict=False)


def build_resnet(name: str = "resnet50", pretrained: str = "none", last_stride: int = 1) -> ResNet:
    """Build a torchvision ResNet with the given last stride and optional ImageNet weights.

    ``pretrained``: ``"none"``, ``"imagenet"`` or a path to a state-dict file.
    """
    if name not in _BUILDERS:
        raise ValueError(f"model.backbone: unknown backbone {name!r} (valid: {', '.join(_BUILDERS)})")
    if last_stride not in (1, 2):
        raise ValueError(f"model.last_stride must be 1 or 2, got {last_stride}")
    resnet = _BUILDERS[name]()
    if pretrained not in ("none", "", None):
        load_pretrained(resnet, name, pretrained)
    set_last_stride(resnet, last_stride)
    return resnet


def stem(resnet: ResNet, relu: bool = True) -> nn.Sequential:
    """The ResNet's stem: conv1, bn1, relu, maxpool (without the ReLU when ``relu`` is false,
    as in AGW's published code)."""
    if not relu:
        return nn.Sequential(resnet.conv1, resnet.bn1, resnet.maxpool)
    return nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)


def _block_channels(block: nn.Module) -> int:
    # Bottleneck ends with conv3, BasicBlock with conv2.
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def add_non_local(resnet: ResNet, counts: list[int], inner_channels: int | None = None) -> None:
    """Insert non-local blocks into the ResNet's stages, in place.

    ``counts[s]`` blocks go after the last ``counts[s]`` residual blocks of stage ``s``
    (layer1..layer4), as AGW places them. Inserted modules are named ``nl<i>`` beside the
    residual block ``<i>`` they follow, so ImageNet and older checkpoint keys are unchanged.
    ``inner_channels`` (None: half the block's channels) is the blocks' inner width.
    """
    from esreid.models import NonLocal

    if len(counts) != len(STAGES):
        raise ValueError(f"model.non_local: one count per stage {STAGES}, got {counts}")
    for name, count in zip(STAGES, counts, strict=True):
        stage = getattr(resnet, name)
        blocks = list(stage.named_children())
        if not 0 <= count <= len(blocks):
            raise ValueError(f"model.non_local: {count} non-local blocks after {name}'s last "
                             f"blocks, but it has {len(blocks)} blocks")
        if count == 0:
            continue
        items: list[tuple[str, nn.Module]] = []
        for i, (key, block) in enumerate(blocks):
            items.append((key, block))
            if i >= len(blocks) - count:
                items.append((f"nl{key}", NonLocal(_block_channels(block),
                                                   inner_channels=inner_channels)))
        setattr(resnet, name, nn.Sequential(OrderedDict(items)))

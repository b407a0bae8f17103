"""The Bag-of-Tricks baseline and ES-Net, composed from a shared trunk and one or two branches.

ES-Net (paper, Fig. 2): a shared trunk (ResNet stem + layer1 + layer2) feeds the All
Information Branch (its own layer3 + layer4, GAP, BNNeck) on clean images and the Erasing
Salient Branch (its own layer3 + layer4, P-pooling, BNNeck) on BESM-erased images. The
baseline is the same network with the AIB alone, i.e. a plain last-stride-1 ResNet + BNNeck.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from esreid.models.backbone import STAGES, add_non_local, build_resnet, feature_dim, stem
from esreid.models.erasers import Eraser, NoErasing, eraser_from_config
from esreid.models.heads import BNNeck
from esreid.models.pooling import build_pooling
from esreid.saliency.cgram import at_least_float32, batch_cg_ram, full_precision

if TYPE_CHECKING:
    from esreid.config import EraseConfig, ModelConfig


@dataclass
class BranchOutput:
    """What one branch produces for a batch.

    ``feat``: pooled feature before the BNNeck (triplet loss), ``bn_feat``: after it
    (retrieval descriptor), ``logits``: identity classifier output.
    """

    feat: torch.Tensor
    bn_feat: torch.Tensor
    logits: torch.Tensor


@dataclass
class TrainOutput:
    """A training forward: per-branch outputs plus what the eraser did."""

    branches: dict[str, BranchOutput]
    was_erased: torch.Tensor | None = None
    erased_images: torch.Tensor | None = None
    saliency: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)


class Branch(nn.Module):
    """A branch's own ResNet stages, global pooling and BNNeck head.

    ``stages`` is an ordered mapping like ``{"layer3": ..., "layer4": ...}``.
    """

    def __init__(self, stages: nn.Sequential, pool: nn.Module, neck: BNNeck) -> None:
        super().__init__()
        self.stages = stages
        self.pool = pool
        self.neck = neck

    @property
    def stage_names(self) -> list[str]:
        """Names of the stages this branch owns, in order."""
        return [name for name, _ in self.stages.named_children()]

    def feature_map(self, x: torch.Tensor, upto: str | None = None) -> torch.Tensor:
        """Run the stages on trunk output ``x`` up to and including stage ``upto`` (default all)."""
        for name, stage in self.stages.named_children():
            x = stage(x)
            if name == upto:
                break
        return x

    def head(self, fmap: torch.Tensor, after: str | None = None) -> BranchOutput:
        """Finish the branch from the output of stage ``after`` (default: the last stage)."""
        if after is not None and after not in self.stage_names:
            raise ValueError(f"stage {after!r} is not in this branch ({self.stage_names})")
        started = False
        for name, stage in self.stages.named_children():
            if started:
                fmap = stage(fmap)
            elif name == after:
                started = True
        feat = self.pool(fmap)
        bn_feat, logits = self.neck(feat)
        return BranchOutput(feat=feat, bn_feat=bn_feat, logits=logits)

    def forward(self, x: torch.Tensor) -> BranchOutput:
        return self.head(self.feature_map(x))


class ESNet(nn.Module):
    """Shared trunk plus an optional AIB and an optional ESB.

    ``forward(images) -> descriptors [N, D]`` (concatenated BNNeck features of the branches;
    what retrieval uses). :meth:`forward_train` runs a training step's forward, the ESB
    fed by ``eraser`` (see :mod:`esreid.models.erasers`; default: no erasing).
    """

    def __init__(
        self,
        trunk: nn.Module,
        aib: Branch | None,
        esb: Branch | None,
        eraser: Eraser | None = None,
    ) -> None:
        super().__init__()
        if aib is None and esb is None:
            raise ValueError("ESNet needs at least one branch")
        self.trunk = trunk
        self.aib = aib
        self.esb = esb
        # A plain object, not a submodule: it holds options only and adds nothing to
        # the state_dict, so checkpoints do not depend on the eraser.
        self.eraser = eraser if eraser is not None else NoErasing()
        if self.eraser.needs_esb and esb is None:
            raise ValueError(f"erase.method={self.eraser.name} needs an ESB")

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters the optimiser must not decay (timm's convention:
        each submodule that has such parameters declares them)."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names

    def branches(self) -> dict[str, Branch]:
        """The present branches by name (``aib`` first)."""
        return {k: b for k, b in (("aib", self.aib), ("esb", self.esb)) if b is not None}

    @property
    def descriptor_dim(self) -> int:
        """Length of the retrieval descriptor."""
        return sum(b.neck.bn.num_features for b in self.branches().values())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shared = self.trunk(images)
        return torch.cat([b(shared).bn_feat for b in self.branches().values()], dim=1)

    # --- training -----------------------------------------------------------------------

    def saliency_layer(self, branch: str = "esb") -> str:
        """The stage of ``branch`` that saliency explains: ``erase.layer``, or the branch's
        last stage when it does not own that layer."""
        b = self.branches()[branch]
        return self.eraser.layer if self.eraser.layer in b.stage_names else b.stage_names[-1]

    def saliency_feature_map(self, images: torch.Tensor, branch: str = "esb",
                             shared: torch.Tensor | None = None,
                             layer: str | None = None) -> torch.Tensor:
        """The clean batch's feature map [N, C, h, w] at ``layer`` (default
        :meth:`saliency_layer`) of ``branch``, for saliency maps.

        A no-grad forward in float32 with autocast off, from the trunk's output ``shared``
        (computed from ``images`` when not given, also in float32): under mixed precision the
        maps are the float32 maps of the trunk output the training step uses, whatever the
        low-precision kernels of the branch would give (see :func:`cgram.full_precision`).
        """
        b = self.branches()[branch]
        layer = layer or self.saliency_layer(branch)
        with torch.no_grad(), full_precision(images):
            if shared is None:
                shared = self.trunk(at_least_float32(images))
            return b.feature_map(at_least_float32(shared.detach()), upto=layer)

    def saliency_map_size(self, images: torch.Tensor, branch: str = "esb",
                          shared: torch.Tensor | None = None,
                          layer: str | None = None) -> tuple[int, int]:
        """(h, w) of the maps :meth:`saliency_maps` gives for this batch: one image through
        the stages in eval mode, so no BatchNorm statistics change (modes are restored)."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            one = None if shared is None else shared[:1]
            fmap = self.saliency_feature_map(images[:1], branch, one, layer)
        finally:
            for module, was_training in modes:
                module.training = was_training
        return int(fmap.shape[-2]), int(fmap.shape[-1])

    def saliency_maps(self, images: torch.Tensor, pids: torch.Tensor, branch: str = "esb",
                      shared: torch.Tensor | None = None) -> torch.Tensor:
        """Batch CG-RAM maps [N, h, w] (Eq. 5) at layer ``erase.layer`` of ``branch``, float32.

        The feature map comes from :meth:`saliency_feature_map` (no grad, float32, clean
        batch); only the part of the branch after that layer is differentiated. A branch
        without that layer is explained at its last stage.
        """
        b = self.branches()[branch]
        layer = self.saliency_layer(branch)
        fmap = self.saliency_feature_map(images, branch, shared, layer)
        return batch_cg_ram(lambda a: b.head(a, after=layer).bn_feat, fmap, pids)

    def forward_train(
        self, images: torch.Tensor, pids: torch.Tensor, generator: torch.Generator | None = None
    ) -> TrainOutput:
        """Forward of one training step.

        AIB sees ``images``; the eraser produces the ESB's output (BESM costs one extra
        no-grad forward of the ESB stages for the saliency map and a second trunk pass on
        the erased images). Its random draws come from ``generator``.
        """
        shared = self.trunk(images)
        out = TrainOutput(branches={})
        if self.aib is not None:
            out.branches["aib"] = self.aib(shared)
        if self.esb is None:
            return out
        erasure = self.eraser(self, images, pids, shared, generator)
        out.branches["esb"] = erasure.esb
        out.was_erased = erasure.was_erased
        out.erased_images = erasure.erased_images
        out.saliency = erasure.saliency
        if out.was_erased is not None:
            out.info["erased_frac"] = float(out.was_erased.float().mean())
        out.info.update(erasure.info)
        return out


def _branch(stages: list[tuple[str, nn.Module]], pool: str, dim: int, num_classes: int,
            cfg: ModelConfig) -> Branch:
    kwargs = {}
    if pool == "ppool":
        kwargs = {"init_l": cfg.ppool_init,
                  "num_channels": dim if cfg.ppool_per_channel else None}
    return Branch(nn.Sequential(OrderedDict(stages)), build_pooling(pool, **kwargs),
                  BNNeck(dim, num_classes))


def build_model(cfg: ModelConfig, num_classes: int, erase: EraseConfig | None = None) -> ESNet:
    """Build the baseline / ES-Net / ablation described by ``cfg`` for ``num_classes`` ids.

    Each branch gets its own copy of the stages from ``cfg.split`` on, both initialised from
    the same (optionally ImageNet) weights. ``erase`` (an ``erase`` config section, or any
    object with its attributes) picks the eraser from the registry; None: no erasing.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    resnet = build_resnet(cfg.backbone, cfg.pretrained, cfg.last_stride)
    quirks = getattr(cfg, "agw_published_quirks", False)
    non_local = list(getattr(cfg, "non_local", [0, 0, 0, 0]))
    if any(non_local):
        # After the weights are loaded: the inserted blocks start as the identity.
        add_non_local(resnet, non_local, inner_channels=1 if quirks else None)
    dim = feature_dim(resnet)
    split = STAGES.index(cfg.split)
    trunk = nn.Sequential(OrderedDict(
        [("stem", stem(resnet, relu=not quirks))] + [(s, getattr(resnet, s)) for s in STAGES[:split]]
    ))
    own = [(s, getattr(resnet, s)) for s in STAGES[split:]]
    aib = _branch(copy.deepcopy(own), cfg.aib_pool, dim, num_classes, cfg) if cfg.aib else None
    esb = _branch(copy.deepcopy(own), cfg.esb_pool, dim, num_classes, cfg) if cfg.esb else None
    eraser = eraser_from_config(erase) if erase is not None else None
    return ESNet(trunk, aib, esb, eraser)

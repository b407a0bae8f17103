"""Models: ResNet backbones, pooling layers (GAP, GMP, P-pooling, GeM), non-local blocks, BNNeck,
erasers and ES-Net.

Names are imported on first use: ``esreid.config`` reads the eraser registry
(``esreid.models.erasers``), and importing this package must not load torch for that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esreid.models.backbone import PretrainedWeightsError, build_resnet
    from esreid.models.erasers import ERASERS, Eraser, build_eraser, eraser_names
    from esreid.models.esnet import Branch, BranchOutput, ESNet, TrainOutput, build_model
    from esreid.models.heads import BNNeck
    from esreid.models.non_local import NonLocal
    from esreid.models.pooling import GeM, GlobalAvgPool, GlobalMaxPool, PPooling, build_pooling

_EXPORTS = {
    "BNNeck": "heads",
    "Branch": "esnet",
    "BranchOutput": "esnet",
    "ERASERS": "erasers",
    "ESNet": "esnet",
    "Eraser": "erasers",
    "GeM": "pooling",
    "GlobalAvgPool": "pooling",
    "GlobalMaxPool": "pooling",
    "NonLocal": "non_local",
    "PPooling": "pooling",
    "PretrainedWeightsError": "backbone",
    "TrainOutput": "esnet",
    "build_eraser": "erasers",
    "build_model": "esnet",
    "build_pooling": "pooling",
    "build_resnet": "backbone",
    "eraser_names": "erasers",
}

__all__ = [
    "BNNeck",
    "Branch",
    "BranchOutput",
    "ERASERS",
    "ESNet",
    "Eraser",
    "GeM",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "NonLocal",
    "PPooling",
    "PretrainedWeightsError",
    "TrainOutput",
    "build_eraser",
    "build_model",
    "build_pooling",
    "build_resnet",
    "eraser_names",
]


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'esreid.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"esreid.models.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

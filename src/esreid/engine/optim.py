"""The optimiser: Adam with two parameter groups, decayed and not decayed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from esreid.config import OptimConfig


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.Adam:
    """Adam at ``optim.lr`` over the trainable parameters of ``model``.

    The parameters ``model.no_weight_decay()`` names (full names, when the model has that
    method) form a group with weight decay 0, the others a group with
    ``optim.weight_decay``; the decayed group comes first. Parameters with
    ``requires_grad`` False are left out. A declared name the model does not have raises
    ``ValueError``: a misspelt name would otherwise silently be decayed.
    """
    params = dict(model.named_parameters())
    no_decay_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    unknown = sorted(no_decay_names - params.keys())
    if unknown:
        raise ValueError(
            f"{type(model).__name__}.no_weight_decay() names {', '.join(unknown)}, but the "
            "model has no parameter of that name, so optim.weight_decay would still apply to "
            "the parameter meant; use full names from model.named_parameters()")
    decay, no_decay = [], []
    for name, p in params.items():
        if p.requires_grad:
            (no_decay if name in no_decay_names else decay).append(p)
    return torch.optim.Adam(
        [{"params": decay, "weight_decay": optim_cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=optim_cfg.lr)

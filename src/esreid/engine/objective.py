"""Eq. 1 of the paper: per branch, ID loss plus triplet loss, summed over the branches."""

from __future__ import annotations

import torch
from torch import nn

from esreid.config import LossConfig
from esreid.losses import (
    batch_hard_triplet_loss,
    cross_entropy_label_smooth,
    weighted_regularized_triplet_loss,
)
from esreid.models.esnet import BranchOutput, ESNet, TrainOutput

#: ``loss.triplet_kind`` -> the metric loss on the features before the BNNeck.
TRIPLET_LOSSES = {
    "hard": lambda feat, pids, cfg: batch_hard_triplet_loss(feat, pids, cfg.margin),
    "weighted": lambda feat, pids, cfg: weighted_regularized_triplet_loss(feat, pids),
}


def branch_loss(out: BranchOutput, pids: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """One branch's share of Eq. 1: ID loss (label-smoothed CE) and the triplet loss of
    ``loss.triplet_kind`` (batch-hard by default, AGW's weighted regularization triplet)."""
    parts = {"id": cross_entropy_label_smooth(out.logits, pids, cfg.label_smooth)}
    if cfg.triplet:
        parts["triplet"] = TRIPLET_LOSSES[cfg.triplet_kind](out.feat, pids, cfg)
    return parts


def loss_terms(out: TrainOutput, pids: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Every term of Eq. 1 by name (``id_aib``, ``triplet_aib``, ``id_esb``, ...)."""
    return {f"{kind}_{name}": value
            for name, branch_out in out.branches.items()
            for kind, value in branch_loss(branch_out, pids, cfg).items()}


def total_loss(out: TrainOutput, pids: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 1 summed over the present branches; returns the loss and its parts as floats."""
    terms = loss_terms(out, pids, cfg)
    return _sum(terms, pids.device), {k: float(v.detach()) for k, v in terms.items()}


def _sum(terms: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), device=device)
    for value in terms.values():
        total = total + value
    return total


class TrainingObjective(nn.Module):
    """A training step's forward and Eq. 1 as one module.

    ``forward(images, pids, generator) -> (loss, terms, info)``: the summed loss, its terms
    (detached tensors) and what the eraser reported. One module, so that
    DistributedDataParallel and ``torch.compile`` wrap the whole training forward (which
    is :meth:`ESNet.forward_train`, not ``ESNet.forward``).
    """

    def __init__(self, model: ESNet, cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, images: torch.Tensor, pids: torch.Tensor,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        out = self.model.forward_train(images, pids, generator=generator)
        terms = loss_terms(out, pids, self.cfg)
        return _sum(terms, pids.device), {k: v.detach() for k, v in terms.items()}, out.info

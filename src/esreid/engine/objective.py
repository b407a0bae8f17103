"""Eq. 1 of the paper: per branch, ID loss plus triplet loss, summed over the branches."""

from __future__ import annotations

import torch

from esreid.config import LossConfig
from esreid.losses import batch_hard_triplet_loss, cross_entropy_label_smooth
from esreid.models.esnet import BranchOutput, TrainOutput


def branch_loss(out: BranchOutput, pids: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """One branch's share of Eq. 1: ID loss (label-smoothed CE) and batch-hard triplet loss."""
    parts = {"id": cross_entropy_label_smooth(out.logits, pids, cfg.label_smooth)}
    if cfg.triplet:
        parts["triplet"] = batch_hard_triplet_loss(out.feat, pids, cfg.margin)
    return parts


def total_loss(out: TrainOutput, pids: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 1 summed over the present branches; returns the loss and its parts as floats."""
    total = torch.zeros((), device=pids.device)
    parts: dict[str, float] = {}
    for name, branch_out in out.branches.items():
        for kind, value in branch_loss(branch_out, pids, cfg).items():
            total = total + value
            parts[f"{kind}_{name}"] = float(value.detach())
    return total, parts

"""Learning-rate schedule: linear warm-up from 0, then step decay at milestone epochs."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import torch


def lr_factor(epoch: float, warmup_epochs: float, milestones: Sequence[int], gamma: float) -> float:
    """Multiplier of the base learning rate at (fractional) ``epoch``, counted from 0.

    Rises linearly from 0 at epoch 0 to 1 at ``warmup_epochs``, then is multiplied by
    ``gamma`` at each milestone passed (the paper: x0.1 at 40 and 70).
    """
    warm = min(1.0, epoch / warmup_epochs) if warmup_epochs > 0 else 1.0
    return warm * gamma ** bisect_right(list(milestones), epoch)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    warmup_epochs: float,
    milestones: Sequence[int],
    gamma: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler following :func:`lr_factor`; call ``step()`` after each batch.

    The first batch uses the rate of epoch 1/iters_per_epoch rather than exactly 0, so no
    step is wasted.
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")

    def factor(step: int) -> float:
        return lr_factor((step + 1) / iters_per_epoch, warmup_epochs, milestones, gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Learning-rate schedule: linear warm-up from 0, then step decay at milestone epochs."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence


def lr_factor(epoch: float, warmup_epochs: float, milestones: Sequence[int], gamma: float) -> float:
    """Multiplier of the base learning rate at (fractional) ``epoch``, counted from 0.

    Rises linearly from 0 at epoch 0 to 1 at ``warmup_epochs``, then is multiplied by
    ``gamma`` at each milestone passed (the paper: x0.1 at 40 and 70).
    """
    warm = min(1.0, epoch / warmup_epochs) if warmup_epochs > 0 else 1.0
    return warm * gamma ** bisect_right(list(milestones), epoch)

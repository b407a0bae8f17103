"""Warm-up + step-decay learning-rate schedule (paper IV-A.2)."""

import pytest
import torch

from esreid.engine.schedule import build_scheduler, lr_factor


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0), (1.0, 0.1), (5.0, 0.5), (10.0, 1.0), (39.9, 1.0), (40.0, 0.1),
    (69.0, 0.1), (70.0, 0.01), (119.0, 0.01),
])
def test_paper_person_schedule(epoch, expected):
    assert lr_factor(epoch, 10, [40, 70], 0.1) == pytest.approx(expected)


def test_scheduler_steps_per_iteration():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=3.5e-4)
    sched = build_scheduler(opt, iters_per_epoch=4, warmup_epochs=2, milestones=[3], gamma=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # iteration t uses epoch (t + 1) / 4: warm-up over 8 iterations, decay from iteration 11.
    expected = [3.5e-4 * min(1, (t + 1) / 8) * (0.1 if (t + 1) / 4 >= 3 else 1) for t in range(16)]
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        build_scheduler(opt, 0, 1, [], 0.1)

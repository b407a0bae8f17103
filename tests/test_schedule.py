"""Warm-up + step-decay learning-rate schedule (paper IV-A.2)."""

import pytest

from esreid.engine.schedule import lr_factor


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0), (1.0, 0.1), (5.0, 0.5), (10.0, 1.0), (39.9, 1.0), (40.0, 0.1),
    (69.0, 0.1), (70.0, 0.01), (119.0, 0.01),
])
def test_paper_person_schedule(epoch, expected):
    assert lr_factor(epoch, 10, [40, 70], 0.1) == pytest.approx(expected)


@pytest.mark.parametrize("epoch, expected", [(0.0, 1.0), (0.5, 1.0), (2.0, 0.5), (3.0, 0.25)])
def test_no_warmup_starts_at_the_base_rate(epoch, expected):
    # warmup_epochs=0 turns the warm-up off: the base rate from the first step, then the decay.
    assert lr_factor(epoch, 0, [2, 3], 0.5) == pytest.approx(expected)


@pytest.mark.parametrize("epoch, expected", [(0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (1.0, 1.0),
                                             (1.5, 1.0)])
def test_a_one_epoch_warmup_is_linear_within_the_epoch(epoch, expected):
    # Fractional epochs (the trainer steps per batch): epoch / warmup_epochs for warmup_epochs=1.
    assert lr_factor(epoch, 1, [40, 70], 0.1) == pytest.approx(expected)

"""Warm-up + step-decay learning-rate schedule (paper IV-A.2)."""

import pytest

from esreid.engine.schedule import lr_factor


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0), (1.0, 0.1), (5.0, 0.5), (10.0, 1.0), (39.9, 1.0), (40.0, 0.1),
    (69.0, 0.1), (70.0, 0.01), (119.0, 0.01),
])
def test_paper_person_schedule(epoch, expected):
    assert lr_factor(epoch, 10, [40, 70], 0.1) == pytest.approx(expected)

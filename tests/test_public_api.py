"""The import paths the README and the issues name exist."""

import numpy as np
import pytest


def test_documented_imports():
    from esreid.config import load_config
    from esreid.data import load_dataset
    from esreid.engine.trainer import Trainer
    from esreid.metrics import evaluate_rank
    from esreid.models import PPooling, build_model
    from esreid.saliency import besm_erase, cg_ram

    assert callable(load_config) and callable(load_dataset) and callable(Trainer)
    assert callable(build_model) and callable(cg_ram) and callable(besm_erase)
    assert float(PPooling(init_l=2.0).l.detach()) == pytest.approx(2.0)
    res = evaluate_rank(np.array([[0.1, 0.2]]), [1], [1, 2], [0], [1, 1], max_rank=2)
    assert res["mAP"] == 1.0 and list(res["cmc"]) == [1.0, 1.0]

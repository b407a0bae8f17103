"""build_optimizer: the parameters a model declares in no_weight_decay() are not decayed, all
other trainable ones are, frozen ones are left out, and a misspelt declaration is an error."""

import pytest
import torch
from torch import nn

from esreid.config import OptimConfig, load_config
from esreid.engine.optim import build_optimizer
from esreid.models.esnet import build_model

TINY = ["model.backbone=resnet10", "model.pretrained=none"]


def _model(preset, *overrides):
    cfg = load_config(preset, [*TINY, *overrides])
    return build_model(cfg.model, 5, cfg.erase), cfg


def _groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]


@pytest.mark.parametrize("preset, overrides, no_decay", [
    ("base", (), set()),
    ("esnet", (), {"esb.pool.raw_l"}),
    ("esnet_ppool_both", (), {"aib.pool.raw_l", "esb.pool.raw_l"}),
    ("esnet", ("model.ppool_per_channel=true",), {"esb.pool.raw_l"}),
])
def test_groups_follow_the_declared_names(preset, overrides, no_decay):
    model, cfg = _model(preset, *overrides)
    assert model.no_weight_decay() == no_decay
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.Adam)
    decayed, kept = _groups_by_name(model, opt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert kept == no_decay
    assert decayed == trainable - no_decay
    # The BNNeck's frozen shift is in neither group.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & (decayed | kept)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    assert all(g["lr"] == cfg.optim.lr for g in opt.param_groups)


def test_learning_rate_and_weight_decay_come_from_the_config():
    model, _ = _model("esnet")
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.25))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-3, 0.25), (1e-3, 0.0)]


def test_a_step_decays_only_the_decayed_group():
    model, _ = _model("esnet")
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # With zero loss gradients Adam moves a parameter only through its L2 term.
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["esb.pool.raw_l"], before["esb.pool.raw_l"])
    assert not torch.equal(after["aib.neck.classifier.weight"], before["aib.neck.classifier.weight"])
    assert torch.equal(after["aib.neck.bn.bias"], before["aib.neck.bn.bias"])  # frozen


class _Declares(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self._names = names

    def no_weight_decay(self):
        return self._names


def test_an_unknown_declared_name_is_an_error():
    with pytest.raises(ValueError, match=r"_Declares.no_weight_decay\(\) names lin.wieght, "
                                         r"but the model has no parameter of that name"):
        build_optimizer(_Declares({"lin.bias", "lin.wieght"}), OptimConfig())


def test_models_without_declarations_decay_everything():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig())
    decayed, kept = _groups_by_name(model, opt)
    assert decayed == {"weight", "bias"} and kept == set()

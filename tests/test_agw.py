"""Table VII: the AGW baseline and ES-Net on it (presets, non-local wiring, training), and
cross-domain testing (train on one benchmark, evaluate on another)."""

import json

import pytest
import torch
from torch import nn

from esreid.cli import main
from esreid.config import ConfigError, list_presets, load_config
from esreid.data.synthetic import generate_synthetic
from esreid.engine.objective import TrainingObjective
from esreid.engine.trainer import Trainer
from esreid.models import GeM, NonLocal, PPooling
from esreid.models.backbone import add_non_local, build_resnet
from esreid.models.esnet import build_model

TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "model.non_local=[0,1,1,0]",
    "data.name=synthetic", "data.height=32", "data.width=16", "data.pad=2",
    "data.ids_per_batch=4", "data.num_instances=2", "data.num_workers=0", "optim.epochs=1",
    "optim.warmup_epochs=0", "optim.iters_per_epoch=2", "train.progress=false",
    "train.tensorboard=false", "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def synth_roots(tmp_path_factory):
    """Two synthetic benchmarks generated with different seeds (two "domains")."""
    roots = []
    for seed in (0, 1):
        root = tmp_path_factory.mktemp(f"synth{seed}") / "synthetic"
        generate_synthetic(root, num_ids=12, height=32, width=16, seed=seed, progress=False)
        roots.append(root)
    return roots


def _non_local_blocks(module: nn.Module) -> dict[str, NonLocal]:
    return {name: m for name, m in module.named_modules() if isinstance(m, NonLocal)}


def test_presets_list_agw_and_esnet_agw(capsys):
    assert {"agw", "esnet_agw"} <= set(list_presets())
    assert main(["presets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "AIB(gem)" in lines["agw"] and "ESB" not in lines["agw"]
    assert "AIB(gem) + ESB(ppool)" in lines["esnet_agw"] and "besm" in lines["esnet_agw"]


def test_agw_places_non_local_blocks_as_published():
    cfg = load_config("agw", ["model.pretrained=none"])
    assert cfg.loss.triplet_kind == "weighted" and cfg.data.random_erasing == 0.5
    model = build_model(cfg.model, 10, cfg.erase)
    blocks = _non_local_blocks(model)
    # After the last two of layer2's four blocks (shared trunk) and the last three of
    # layer3's six (the branch), each of layer3's output width; AGW's code: inner width 1.
    assert sorted(blocks) == ["aib.stages.layer3.nl3", "aib.stages.layer3.nl4",
                              "aib.stages.layer3.nl5", "trunk.layer2.nl2", "trunk.layer2.nl3"]
    assert [n for n, _ in model.trunk.layer2.named_children()] == ["0", "1", "2", "nl2", "3", "nl3"]
    assert blocks["trunk.layer2.nl3"].theta.in_channels == 512
    assert blocks["aib.stages.layer3.nl5"].theta.in_channels == 1024
    assert {b.theta.out_channels for b in blocks.values()} == {1}
    # The published stem has no ReLU after its BatchNorm; the AGW paper's form has it.
    assert not any(isinstance(m, nn.ReLU) for m in model.trunk.stem)
    assert isinstance(model.aib.pool, GeM)
    paper = build_model(load_config("agw", ["model.pretrained=none",
                                            "model.agw_published_quirks=false"]).model, 10)
    assert any(isinstance(m, nn.ReLU) for m in paper.trunk.stem)
    assert {b.theta.out_channels for b in _non_local_blocks(paper).values()} == {256, 512}


def test_esnet_agw_branches_own_their_layer3_blocks():
    cfg = load_config("esnet_agw", ["model.pretrained=none"])
    model = build_model(cfg.model, 10, cfg.erase)
    blocks = _non_local_blocks(model)
    assert sorted(n for n in blocks if n.startswith("esb.")) == [
        "esb.stages.layer3.nl3", "esb.stages.layer3.nl4", "esb.stages.layer3.nl5"]
    assert blocks["esb.stages.layer3.nl5"] is not blocks["aib.stages.layer3.nl5"]
    assert isinstance(model.aib.pool, GeM) and isinstance(model.esb.pool, PPooling)


@pytest.mark.parametrize("preset", ["agw", "esnet_agw"])
def test_presets_forward_and_backward_on_a_tiny_input(preset):
    torch.manual_seed(0)
    cfg = load_config(preset, ["model.pretrained=none", "erase.prob=1.0"])
    model = build_model(cfg.model, 4, cfg.erase).train()
    images = torch.randn(8, 3, 64, 32)
    pids = torch.arange(4).repeat_interleave(2)
    loss, terms, _ = TrainingObjective(model, cfg.loss)(images, pids, torch.Generator())
    assert torch.isfinite(loss) and set(terms) >= {"id_aib", "triplet_aib"}
    loss.backward()
    # A fresh non-local block is the identity: only its output BatchNorm learns at first.
    for block in _non_local_blocks(model).values():
        assert block.W[1].weight.grad is not None and block.W[1].weight.grad.abs().sum() > 0
    assert model.aib.pool.p.grad is not None


def test_inserted_blocks_keep_the_backbone_keys_and_start_as_the_identity():
    torch.manual_seed(0)
    plain = build_resnet("resnet18", "none", 1)
    with_nl = build_resnet("resnet18", "none", 1)
    with_nl.load_state_dict(plain.state_dict())
    add_non_local(with_nl, [0, 2, 1, 0])
    # ImageNet (and older checkpoint) keys are unchanged; the new ones sit beside them.
    assert set(plain.state_dict()) <= set(with_nl.state_dict())
    assert {k.split(".")[1] for k in set(with_nl.state_dict()) - set(plain.state_dict())} \
        == {"nl0", "nl1"}
    x = torch.randn(2, 3, 64, 32)
    for mode in (True, False):
        plain.train(mode), with_nl.train(mode)
        with torch.no_grad():
            # (Equal up to the last bits: a convolution after a block's output may take
            # another kernel path than after the plain residual block's.)
            torch.testing.assert_close(with_nl(x), plain(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 non-local blocks after layer3's last blocks, "
                                         "but it has 2 blocks"):
        add_non_local(build_resnet("resnet18", "none", 1), [0, 0, 3, 0])


@pytest.mark.parametrize("preset", ["agw", "esnet_agw"])
def test_presets_train_and_evaluate_on_the_synthetic_benchmark(tmp_path, synth_roots, preset):
    cfg = load_config(preset, TINY + [f"data.root={synth_roots[0]}",
                                      f"train.output_dir={tmp_path}"])
    result = Trainer(cfg).fit()
    assert 0.0 <= result["metrics"]["mAP"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / preset / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["triplet_aib"] > 0
    assert ("triplet_esb" in records[0]) == (preset == "esnet_agw")


def test_cross_domain_evaluation_on_another_benchmark(tmp_path, synth_roots):
    source, target = synth_roots
    overrides = TINY + [f"data.root={source}", f"train.output_dir={tmp_path}",
                        f"eval.root={target}"]
    cfg = load_config("esnet_agw", overrides + ["train.run_name=cross"])
    result = Trainer(cfg).fit()
    # Evaluated on the other benchmark's query and gallery, and results.json says so.
    saved = json.loads((tmp_path / "cross" / "results.json").read_text())
    assert saved["train_dataset"] == saved["dataset"] == "synthetic"
    from esreid.data import load_dataset

    other = load_dataset("synthetic", target)
    assert (saved["sizes"]["query"], saved["sizes"]["gallery"]) == (len(other.query),
                                                                    len(other.gallery))
    # The CLI evaluates a checkpoint cross-domain the same way.
    out = tmp_path / "cli.json"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "cross" / "checkpoints" / "last.pt"),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"] == pytest.approx(result["metrics"], abs=1e-6)
    # A missing evaluation benchmark is refused before training, naming the key.
    with pytest.raises(ConfigError, match="eval.root: no synthetic benchmark at"):
        Trainer(load_config("esnet_agw", overrides[:-1] + [f"eval.root={tmp_path / 'none'}",
                                                           "train.run_name=missing"]))
    assert not (tmp_path / "missing").exists()

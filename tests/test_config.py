"""Config presets, inheritance, overrides and their errors."""

import pytest

from esreid.config import ConfigError, build_config, list_presets, load_config

PAPER_PRESETS = {
    "base", "base_besm", "base_besm_gmp", "base_besm_ppool", "esb", "aib", "esnet",
    "esnet_r10p03", "esnet_ppool_both", "base_random_erasing", "base_gradcam_erasing",
    "base_feature_dropping", "vehicle",
}


def test_all_paper_presets_exist_and_load():
    assert PAPER_PRESETS <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.name == name


def test_paper_settings():
    base = load_config("base")
    assert (base.data.height, base.data.width) == (384, 128)
    assert (base.data.ids_per_batch, base.data.num_instances) == (16, 4)
    assert base.optim.lr == pytest.approx(3.5e-4)
    assert base.optim.weight_decay == pytest.approx(5e-4)
    assert base.optim.milestones == [40, 70] and base.optim.epochs == 120
    assert base.model.aib and not base.model.esb and base.erase.method == "none"
    esnet = load_config("esnet")
    assert esnet.model.aib and esnet.model.esb
    assert (esnet.model.aib_pool, esnet.model.esb_pool) == ("gap", "ppool")
    assert (esnet.erase.method, esnet.erase.ratio, esnet.erase.prob) == ("besm", 0.2, 0.5)
    r10 = load_config("esnet_r10p03")
    assert (r10.erase.ratio, r10.erase.prob) == (0.1, 0.3)
    assert load_config("esnet_ppool_both").model.aib_pool == "ppool"
    esb = load_config("esb")
    assert not esb.model.aib and esb.model.esb_pool == "ppool" and esb.loss.triplet
    assert load_config("base_besm_gmp").model.esb_pool == "gmp"
    assert not load_config("base_besm").loss.triplet
    vehicle = load_config("vehicle")
    assert (vehicle.data.height, vehicle.data.width, vehicle.optim.epochs) == (256, 256, 60)
    assert vehicle.optim.milestones == [20, 40]
    assert (vehicle.erase.ratio, vehicle.erase.prob) == (0.2, 0.5)


def test_overrides_types_and_yaml_numbers():
    cfg = load_config("esnet", ["optim.lr=1e-4", "optim.milestones=[5, 9]", "data.root=~/x",
                                "model.aib=false", "optim.epochs=3.0"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.milestones == [5, 9]
    assert cfg.data.root == "~/x"
    assert cfg.model.aib is False
    assert cfg.optim.epochs == 3


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key optim.lrr"),
    ("bogus.lr=1", "unknown config section 'bogus'"),
    ("optim.epochs=abc", "config key optim.epochs: expected an integer, got 'abc'"),
    ("model.esb_pool=avg", "config key model.esb_pool: 'avg' is not one of gap, gmp, ppool"),
    ("erase.ratio=1.5", "config key erase.ratio: 1.5 is outside [0, 1]"),
    ("optim.lr", "must look like section.key=value"),
    ("lr=1", "keys look like section.key"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("esnet", [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: esnet\nmodel:\n  backbone: resnet18\n  pooling: gap\n")
    with pytest.raises(ConfigError, match="unknown config key model.pooling"):
        load_config(path)
    path.write_text("extends: esnet\nmodel:\n  backbone: resnet18\n")
    cfg = load_config(path)
    assert cfg.model.backbone == "resnet18" and cfg.model.esb_pool == "ppool" and cfg.name == "mine"


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'esnett'"):
        load_config("esnett")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_inconsistent_settings_are_rejected():
    with pytest.raises(ConfigError, match="both false"):
        build_config({"model": {"aib": False, "esb": False}})
    with pytest.raises(ConfigError, match="model.esb is false"):
        build_config({"model": {"esb": False}, "erase": {"method": "besm"}})
    with pytest.raises(ConfigError, match="not inside the ESB"):
        build_config({"model": {"split": "layer4"}, "erase": {"layer": "layer3"}})

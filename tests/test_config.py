"""Config presets, inheritance, overrides and their errors."""

import re

import pytest
import yaml

from esreid.config import ConfigError, build_config, list_presets, load_config, save_config

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


def test_overrides_types_and_yaml_numbers(monkeypatch):
    monkeypatch.setenv("HOME", "/home/tester")
    cfg = load_config("esnet", ["optim.lr=1e-4", "optim.milestones=[5, 9]", "data.root=~/x",
                                "model.aib=false", "optim.epochs=3.0"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.milestones == [5, 9]
    assert cfg.data.root == "/home/tester/x"
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


@pytest.mark.parametrize("key, value, message", [
    ("optim.lr", 0, "config key optim.lr: must be > 0, got 0.0"),
    ("optim.lr", -1e-4, "config key optim.lr: must be > 0, got -0.0001"),
    ("optim.lr", ".nan", "config key optim.lr: must be > 0, got nan"),
    ("optim.warmup_epochs", -1, "config key optim.warmup_epochs: must be >= 0, got -1.0"),
    ("optim.gamma", 0, "config key optim.gamma: 0.0 is outside (0, 1]"),
    ("optim.gamma", 1.5, "config key optim.gamma: 1.5 is outside (0, 1]"),
    ("optim.weight_decay", -5e-4, "config key optim.weight_decay: must be >= 0, got -0.0005"),
    ("optim.milestones", "[-1, 70]", "config key optim.milestones[0]: must be >= 0, got -1"),
    ("optim.iters_per_epoch", -1, "config key optim.iters_per_epoch: must be >= 0, got -1"),
    ("optim.epochs", 0, "config key optim.epochs: must be >= 1, got 0"),
    ("data.height", 0, "config key data.height: must be >= 1, got 0"),
    ("data.width", -8, "config key data.width: must be >= 1, got -8"),
    ("data.flip_prob", 1.5, "config key data.flip_prob: 1.5 is outside [0, 1]"),
    ("data.flip_prob", -0.1, "config key data.flip_prob: -0.1 is outside [0, 1]"),
    ("data.pad", -2, "config key data.pad: must be >= 0, got -2"),
    ("data.num_workers", -1, "config key data.num_workers: must be >= 0, got -1"),
    ("data.test_size", 500,
     "config key data.test_size: 500 is not one of 800, 1600, 2400 (the VehicleID test lists)"),
    ("data.ids_per_batch", 1, "config key data.ids_per_batch: must be >= 2, got 1"),
    ("data.num_instances", 0, "config key data.num_instances: must be >= 1, got 0"),
    ("data.on_bad_image", "ignore", "config key data.on_bad_image: 'ignore' is not one of error, skip"),
    ("eval.batch_size", 0, "config key eval.batch_size: must be >= 1, got 0"),
    ("eval.k1", 0, "config key eval.k1: must be >= 1, got 0"),
    ("eval.k2", 0, "config key eval.k2: must be >= 1, got 0"),
    ("eval.lambda_value", 1.2, "config key eval.lambda_value: 1.2 is outside [0, 1]"),
    ("eval.num_draws", 0, "config key eval.num_draws: must be >= 1, got 0"),
    ("loss.label_smooth", 2, "config key loss.label_smooth: 2.0 is outside [0, 1)"),
    ("loss.label_smooth", 1, "config key loss.label_smooth: 1.0 is outside [0, 1)"),
    ("loss.label_smooth", -0.1, "config key loss.label_smooth: -0.1 is outside [0, 1)"),
    ("loss.margin", -0.3, "config key loss.margin: must be >= 0, got -0.3"),
    ("train.checkpoint_every", -1, "config key train.checkpoint_every: must be >= 0, got -1"),
    ("train.checkpoint_every_iters", -5,
     "config key train.checkpoint_every_iters: must be >= 0, got -5"),
    ("train.eval_every", -1, "config key train.eval_every: must be >= 0, got -1"),
])
def test_out_of_range_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config("esnet", [f"{key}={value}"])
    assert str(err.value) == message


def test_issue_example_label_smoothing_is_rejected():
    # The issue's spelling is not a key: it must fail naming it, not be ignored.
    with pytest.raises(ConfigError, match=r"unknown config key loss\.label_smoothing .*label_smooth"):
        load_config("esnet", ["loss.label_smoothing=2"])
    with pytest.raises(ConfigError, match=re.escape("config key loss.label_smooth: 2.0 is outside")):
        load_config("esnet", ["loss.label_smooth=2"])


def test_boundary_values_are_accepted():
    cfg = load_config("esnet", [
        "optim.gamma=1", "optim.warmup_epochs=0", "optim.weight_decay=0", "optim.milestones=[0]",
        "data.flip_prob=0", "data.pad=0", "data.num_workers=0", "data.test_size=2400",
        "eval.lambda_value=1", "loss.label_smooth=0", "loss.margin=0", "train.checkpoint_every=0",
        "train.eval_every=0", "train.checkpoint_every_iters=0", "data.on_bad_image=skip",
    ])
    assert cfg.optim.gamma == 1.0 and cfg.data.test_size == 2400
    assert cfg.data.on_bad_image == "skip" and cfg.train.checkpoint_every_iters == 0


def test_new_keys_defaults():
    cfg = build_config({})
    assert cfg.data.on_bad_image == "error"
    assert cfg.train.checkpoint_every_iters == 0
    assert load_config("esnet", ["train.checkpoint_every_iters=500"]).train.checkpoint_every_iters == 500


def test_triplet_loss_needs_two_images_per_identity():
    with pytest.raises(ConfigError) as err:
        load_config("base", ["data.num_instances=1"])
    assert str(err.value) == (
        "config key data.num_instances: must be >= 2, got 1: the batch-hard triplet loss "
        "(loss.triplet is true) needs a second image of the same identity in every batch"
    )
    # BESM pairs every image with its easiest positive, so it needs pairs even without triplet.
    with pytest.raises(ConfigError, match="BESM's easiest positive .erase.method is besm. needs"):
        load_config("base_besm", ["data.num_instances=1"])
    cfg = load_config("base", ["data.num_instances=1", "loss.triplet=false"])
    assert cfg.data.num_instances == 1


def test_paths_expand_home_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ESREID_TEST_DATA", "/datasets/reid")
    cfg = load_config("esnet", [
        "train.output_dir=~/runs", "data.root=$ESREID_TEST_DATA/market",
        "model.pretrained=${ESREID_TEST_DATA}/r50.pth",
    ])
    assert cfg.train.output_dir == str(tmp_path / "home" / "runs")
    assert cfg.data.root == "/datasets/reid/market"
    assert cfg.model.pretrained == "/datasets/reid/r50.pth"
    # The saved config holds the expanded paths, so a resumed run uses the same folders.
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["output_dir"] == str(tmp_path / "home" / "runs")
    assert saved["data"]["root"] == "/datasets/reid/market"
    # Named weight sources are not paths.
    assert load_config("esnet").model.pretrained == "imagenet"
    assert load_config("esnet", ["model.pretrained=none"]).model.pretrained == "none"
    # A preset file's paths expand too.
    path = tmp_path / "mine.yaml"
    path.write_text("extends: esnet\ntrain:\n  output_dir: ~/from_file\n")
    assert load_config(path).train.output_dir == str(tmp_path / "home" / "from_file")


def test_unset_environment_variable_in_a_path_is_an_error(monkeypatch):
    monkeypatch.delenv("ESREID_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config("esnet", ["train.output_dir=$ESREID_UNSET_VAR/runs"])
    assert str(err.value) == (
        "config key train.output_dir: environment variable ESREID_UNSET_VAR in "
        "'$ESREID_UNSET_VAR/runs' is not set"
    )


@pytest.mark.parametrize("old,new", [(True, "fp16"), (False, "none")])
def test_the_boolean_train_amp_still_loads_with_a_deprecation_warning(tmp_path, old, new):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"extends": "base", "train": {"amp": old}}))
    with pytest.warns(DeprecationWarning, match=f"train.amp: true/false is deprecated.*as {new}"):
        cfg = load_config(path)
    assert cfg.train.amp == new
    # Saved and loaded again, the run's config.yaml holds the new spelling.
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").train.amp == new


def test_train_amp_values():
    assert [load_config("base", [f"train.amp={v}"]).train.amp for v in ("none", "fp16", "bf16")] \
        == ["none", "fp16", "bf16"]
    with pytest.raises(ConfigError, match="config key train.amp: 'fp32' is not one of none, fp16, bf16"):
        load_config("base", ["train.amp=fp32"])


@pytest.mark.parametrize("given, kept", [
    ("mean", "mean"), ("zero", "zero"), ("random", "random"),
    ("0", "mean"), ("0.0", "mean"), ("-0.5", "-0.5"), ("1e-1", "0.1"),
])
def test_erase_value_is_a_fill_name_or_a_number(given, kept):
    assert load_config("esnet", [f"erase.value={given}"]).erase.value == kept


def test_erase_value_defaults_to_the_mean_colour_and_old_configs_read_the_same(tmp_path):
    assert load_config("esnet").erase.value == "mean"
    old = tmp_path / "old.yaml"
    old.write_text("extends: esnet\nerase:\n  value: 0.0\n")  # written before the names
    assert load_config(old).erase.value == "mean"


@pytest.mark.parametrize("value, message", [
    ("grey", "config key erase.value: 'grey' is neither a number nor one of mean, zero, random"),
    (".nan", "config key erase.value: 'nan' is not a finite number"),
])
def test_a_bad_erase_value_names_the_key(value, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config("esnet", [f"erase.value={value}"])


def test_the_fill_names_of_the_config_are_the_erasing_functions():
    from esreid.models.erasers import ERASE_VALUES
    from esreid.saliency.erasing import FILL_VALUES

    assert ERASE_VALUES == FILL_VALUES

"""The eraser registry: one set of names for config validation, the model and `esreid presets`;
each eraser's training forward equals the erasing functions of esreid.saliency applied by
hand with the same generator; erasers add nothing to the state_dict."""

import subprocess
import sys
import types

import pytest
import torch

from esreid.cli import main
from esreid.config import ConfigError, EraseConfig, ModelConfig, load_config
from esreid.models.erasers import (
    DEFAULT_DIAGNOSTIC_RATIO,
    ERASERS,
    Eraser,
    Erasure,
    build_eraser,
    eraser_from_config,
    eraser_names,
)
from esreid.models.esnet import build_model
from esreid.saliency import (
    batch_cg_ram,
    batch_feature_drop,
    besm_erase,
    grad_cam_batch,
    random_erase,
)

TINY = dict(backbone="resnet10", pretrained="none")
# Options that differ from the defaults, so an option that is not passed through shows.
OPTIONS = dict(ratio=0.3, prob=0.6, value=0.25, bfd_height=0.25, bfd_width=1.0)


def _batch(n_ids=4, k=2, h=32, w=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_ids * k, 3, h, w, generator=g)
    return images, torch.arange(n_ids).repeat_interleave(k)


def _model(method, **erase):
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY), 4, EraseConfig(method=method, **{**OPTIONS, **erase}))


# --- what each eraser must produce, written from the erasing functions directly ----------

def _trunk_of(model, shared, erased, was, reuse_clean):
    if not bool(was.any()):
        return shared
    if not reuse_clean or bool(was.all()):
        return model.trunk(erased)
    expected = shared.clone()
    expected[was] = model.trunk(erased[was])
    return expected


def _salient(model, images, pids, g, maps, e):
    erased, was = besm_erase(images, maps, e.ratio, e.prob, e.value, generator=g)
    esb = model.esb(_trunk_of(model, model.trunk(images), erased, was, e.reuse_clean))
    return esb, was, erased, maps


def _expect_none(model, images, pids, g, e):
    return model.esb(model.trunk(images)), None, None, None


def _expect_besm(model, images, pids, g, e):
    with torch.no_grad():
        fmap = model.esb.feature_map(model.trunk(images), upto=e.layer)
    maps = batch_cg_ram(lambda a: model.esb.head(a, after=e.layer).bn_feat, fmap, pids)
    return _salient(model, images, pids, g, maps, e)


def _expect_randmap(model, images, pids, g, e):
    with torch.no_grad():
        size = model.esb.feature_map(model.trunk(images), upto=e.layer).shape[-2:]
    maps = torch.rand((len(images), *size), generator=g)  # drawn before the selection
    return _salient(model, images, pids, g, maps, e)


def _expect_gradcam(model, images, pids, g, e):
    with torch.no_grad():
        fmap = model.esb.feature_map(model.trunk(images), upto=e.layer)
    maps = grad_cam_batch(lambda a: model.esb.head(a, after=e.layer).logits, fmap, pids)
    return _salient(model, images, pids, g, maps, e)


def _expect_random(model, images, pids, g, e):
    erased, was = random_erase(images, prob=e.prob, value=e.value, generator=g)
    esb = model.esb(_trunk_of(model, model.trunk(images), erased, was, e.reuse_clean))
    return esb, was, erased, None


def _expect_bfd(model, images, pids, g, e):
    fmap = model.esb.feature_map(model.trunk(images))
    fmap = batch_feature_drop(fmap, e.bfd_height, e.bfd_width, generator=g)
    return model.esb.head(fmap), None, None, None


EXPECTED = {"none": _expect_none, "besm": _expect_besm, "randmap": _expect_randmap,
            "gradcam": _expect_gradcam,
            "random": _expect_random, "bfd": _expect_bfd}

DESCRIPTIONS = {"none": "", "besm": "besm(R=0.3,P=0.6)", "randmap": "randmap(R=0.3,P=0.6)",
                "gradcam": "gradcam(R=0.3,P=0.6)",
                "random": "random(P=0.6)", "bfd": "bfd(0.25x1.0 block)"}

DIAGNOSTIC_RATIOS = {"none": DEFAULT_DIAGNOSTIC_RATIO, "besm": 0.3, "randmap": 0.3, "gradcam": 0.3,
                     "random": DEFAULT_DIAGNOSTIC_RATIO, "bfd": DEFAULT_DIAGNOSTIC_RATIO}


def test_every_registered_eraser_is_tested_here():
    assert set(eraser_names()) == set(EXPECTED) == set(DESCRIPTIONS) == set(DIAGNOSTIC_RATIOS)
    assert eraser_names() == tuple(ERASERS)


@pytest.mark.parametrize("method", eraser_names())
@pytest.mark.parametrize("reuse_clean", [True, False])
@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_training_forward_equals_the_erasing_functions(method, reuse_clean, layer):
    model = _model(method, reuse_clean=reuse_clean, layer=layer).train()
    images, pids = _batch()
    g = torch.Generator().manual_seed(11)
    out = model.forward_train(images, pids, generator=g)
    g_ref = torch.Generator().manual_seed(11)
    cfg = EraseConfig(method=method, **OPTIONS, reuse_clean=reuse_clean, layer=layer)
    esb, was, erased, maps = EXPECTED[method](model, images, pids, g_ref, cfg)
    # The same draws, in the same number, from the run's generator.
    assert torch.equal(g.get_state(), g_ref.get_state())
    for field in ("feat", "bn_feat", "logits"):
        assert torch.equal(getattr(out.branches["esb"], field), getattr(esb, field)), field
    assert torch.equal(out.branches["aib"].feat, model.aib(model.trunk(images)).feat)
    for got, want in ((out.was_erased, was), (out.erased_images, erased), (out.saliency, maps)):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got, want)
    if was is None:
        assert "erased_frac" not in out.info
    else:
        assert out.info["erased_frac"] == float(was.float().mean())


def test_the_salient_erasers_erase_a_partial_batch():
    # With P = 0.6 and this seed some images are erased and some are not, so the
    # reuse_clean branch of the comparison above is exercised.
    out = _model("besm").forward_train(*_batch(), generator=torch.Generator().manual_seed(11))
    assert 0 < int(out.was_erased.sum()) < len(out.was_erased)


@pytest.mark.parametrize("method", eraser_names())
def test_erasers_add_nothing_to_the_state_dict(method):
    reference = build_model(ModelConfig(**TINY), 4).state_dict()
    state = _model(method).state_dict()
    assert list(state) == list(reference)
    assert not any("eraser" in k for k in state)
    # A checkpoint of one eraser's run loads into a model built with any other.
    build_model(ModelConfig(**TINY), 4, EraseConfig(method="besm")).load_state_dict(state)


@pytest.mark.parametrize("method", eraser_names())
def test_description_and_diagnostic_ratio(method):
    eraser = eraser_from_config(EraseConfig(method=method, **OPTIONS))
    assert eraser.name == method and type(eraser) is ERASERS[method]
    assert eraser.describe() == DESCRIPTIONS[method]
    assert eraser.diagnostic_ratio == DIAGNOSTIC_RATIOS[method]


@pytest.mark.parametrize("method", eraser_names())
def test_config_validation_accepts_every_registered_name(method):
    cfg = load_config("esnet", [f"erase.method={method}"])
    assert cfg.erase.method == method
    if ERASERS[method].needs_esb:
        with pytest.raises(ConfigError, match=f"erase.method={method} erases the ESB's input"):
            load_config("base", [f"erase.method={method}"])
    else:
        assert load_config("base", [f"erase.method={method}"]).erase.method == method


def test_an_unknown_method_is_refused_with_the_registry_names():
    with pytest.raises(ConfigError, match="config key erase.method: 'besn' is not one of "
                                          + ", ".join(eraser_names())):
        load_config("esnet", ["erase.method=besn"])


def test_presets_describe_erasing_through_the_registry(capsys):
    assert main(["presets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " erase=besm(R=0.2,P=0.5) " in lines["esnet"]
    assert " erase=besm(R=0.1,P=0.3) " in lines["base_besm"]
    assert " erase=gradcam(R=0.1,P=0.3) " in lines["base_gradcam_erasing"]
    assert " erase=random(P=0.5) " in lines["base_random_erasing"]
    assert " erase=bfd(0.3x1.0 block) " in lines["base_feature_dropping"]
    assert "erase=" not in lines["base"]
    for name, line in lines.items():
        assert eraser_from_config(load_config(name).erase).describe() in line


class _FlipErasing(Eraser):
    """A test eraser: the ESB sees the mirrored batch, which counts as every image erased."""

    name = "flip"

    def describe(self) -> str:
        return "flip()"

    def __call__(self, model, images, pids, shared, generator):
        flipped = images.flip(3)
        return Erasure(esb=model.esb(model.trunk(flipped)), erased_images=flipped,
                       was_erased=torch.ones(len(images), dtype=torch.bool))


def test_one_registry_entry_makes_a_new_eraser_usable(monkeypatch):
    with pytest.raises(ConfigError, match="erase.method"):
        load_config("esnet", ["erase.method=flip"])
    monkeypatch.setitem(ERASERS, "flip", _FlipErasing)
    cfg = load_config("esnet", [*(f"model.{k}={v}" for k, v in TINY.items()),
                                "erase.method=flip"])
    model = build_model(cfg.model, 4, cfg.erase)
    assert isinstance(model.eraser, _FlipErasing) and model.eraser.describe() == "flip()"
    assert model.eraser.diagnostic_ratio == DEFAULT_DIAGNOSTIC_RATIO
    images, pids = _batch()
    out = model.forward_train(images, pids)
    assert torch.equal(out.erased_images, images.flip(3)) and out.info["erased_frac"] == 1.0
    assert torch.equal(out.branches["esb"].feat, model.esb(model.trunk(images.flip(3))).feat)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="erase.method"):
        load_config("esnet", ["erase.method=flip"])


def test_build_eraser_names_what_is_wrong():
    assert build_eraser("besm", ratio=0.1).ratio == 0.1
    with pytest.raises(ValueError, match="unknown eraser 'besn'; valid names: none, besm"):
        build_eraser("besn")
    with pytest.raises(ValueError, match="eraser 'random' takes no option ratio; its options: "
                                         "layer, prob, value, reuse_clean"):
        build_eraser("random", ratio=0.2)


def test_eraser_from_config_is_duck_typed():
    section = types.SimpleNamespace(method="bfd", layer="layer4", bfd_height=0.5, bfd_width=0.5)
    assert eraser_from_config(section).describe() == "bfd(0.5x0.5 block)"


def test_model_without_esb_refuses_an_eraser_that_needs_one():
    assert build_model(ModelConfig(**TINY, esb=False), 4).eraser.name == "none"
    with pytest.raises(ValueError, match="erase.method=random needs an ESB"):
        build_model(ModelConfig(**TINY, esb=False), 4, EraseConfig(method="random"))


def _cg_ram_at(model, images, pids, layer):
    with torch.no_grad():
        fmap = model.esb.feature_map(model.trunk(images), upto=layer)
    return batch_cg_ram(lambda a: model.esb.head(a, after=layer).bn_feat, fmap, pids)


@pytest.mark.parametrize("method", eraser_names())
def test_saliency_maps_follow_erase_layer_whatever_the_eraser(method):
    # The over-erasing diagnostic draws these maps for every run, erasing or not.
    images, pids = _batch()
    model = _model(method, layer="layer3").eval()
    assert torch.equal(model.saliency_maps(images, pids), _cg_ram_at(model, images, pids, "layer3"))


def test_saliency_maps_fall_back_to_the_last_stage():
    images, pids = _batch()
    model = build_model(ModelConfig(**TINY, split="layer4"), 4,
                        EraseConfig(method="none", layer="layer3")).eval()
    # layer3 is in the trunk here, so the ESB is explained at its last stage.
    assert torch.equal(model.saliency_maps(images, pids), _cg_ram_at(model, images, pids, "layer4"))


@pytest.mark.parametrize("module", ["esreid.config", "esreid.models", "esreid.models.esnet"])
def test_imports_have_no_cycle_and_config_stays_light(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    # Config loading (the CLI's presets, --help paths) must not pay for importing torch.
    assert done.stdout.strip() == str(module == "esreid.models.esnet")


def test_models_package_exports_resolve():
    import esreid.models as models

    assert set(models.__all__) == set(models._EXPORTS)
    for name in models.__all__:
        assert getattr(models, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = models.nothing


@pytest.mark.parametrize("method", ["besm", "gradcam"])
def test_a_non_finite_map_is_counted_and_its_image_left_clean(method, monkeypatch):
    model = _model(method, prob=1.0).train()
    images, pids = _batch()
    real_maps = type(model.eraser).maps

    def maps_with_a_nan(self, *args):
        maps = real_maps(self, *args).clone()
        maps[2, 0, 0] = float("nan")
        return maps

    monkeypatch.setattr(type(model.eraser), "maps", maps_with_a_nan)
    out = model.forward_train(images, pids, generator=torch.Generator().manual_seed(0))
    assert out.info["saliency_nonfinite"] == 1 / 8
    flat = out.saliency.flatten(1)
    contrast = flat.amax(1) > flat.amin(1)
    assert not contrast[2] and contrast.sum() >= 4  # the NaN map erases nothing
    assert torch.equal(out.was_erased, contrast)
    assert torch.equal(out.erased_images[2], images[2])
    assert not torch.equal(out.erased_images[0], images[0])
    assert bool(torch.isfinite(out.saliency).all())
    assert bool(torch.isfinite(out.branches["esb"].feat).all())

"""A mistyped --set value fails before anything is generated or written (issue 20): a fresh
clone's first `esreid train` must not spend minutes generating the synthetic benchmark only
to stop at the model."""

import pytest

from esreid.cli import main
from esreid.config import BACKBONES, ConfigError, load_config


@pytest.mark.parametrize(("setting", "message"), [
    ("model.backbone=resnet81",
     "config key model.backbone: 'resnet81' is not one of resnet10, resnet18, resnet34, "
     "resnet50, resnet101"),
    ("model.pretrained=imagnet",
     "config key model.pretrained: 'imagnet' is neither imagenet nor none nor the path of a "
     "weight file"),
])
def test_a_mistyped_value_fails_before_the_benchmark_is_generated(tmp_path, capsys, setting,
                                                                   message):
    root = tmp_path / "synthetic"
    assert main(["train", "--config", "esnet", "--set", "data.name=synthetic",
                 f"data.root={root}", f"train.output_dir={tmp_path / 'runs'}", setting]) == 2
    err = capsys.readouterr().err
    assert f"esreid train: error: {message}" in err
    assert not root.exists() and not (tmp_path / "runs").exists()


def test_the_backbone_names_are_the_models(tmp_path):
    from esreid.models import backbone

    assert set(BACKBONES) == set(backbone._BUILDERS)
    weights = tmp_path / "weights"
    weights.write_bytes(b"")
    # The two sources and anything shaped like a path are accepted as typed (a path is
    # checked when the model is built); a bare word is only accepted when it is a file.
    for value in ("imagenet", "none", str(weights), "r50.pth", "w/r50"):
        assert load_config("esnet", [f"model.pretrained={value}"]).model.pretrained.endswith(value)
    with pytest.raises(ConfigError, match="'imagenet2' is neither imagenet nor none"):
        load_config("esnet", ["model.pretrained=imagenet2"])

"""ResNet construction: last stride, weight loading from a file, clear failures."""

import pytest
import torch

from esreid.models import backbone
from esreid.models.backbone import PretrainedWeightsError, build_resnet, stem


def _out_hw(resnet, h=64, w=32):
    x = torch.zeros(1, 3, h, w)
    resnet.eval()
    with torch.no_grad():
        y = stem(resnet)(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            y = getattr(resnet, name)(y)
    return tuple(y.shape[1:])


@pytest.mark.parametrize("name, channels", [("resnet10", 512), ("resnet18", 512)])
def test_last_stride_one_doubles_final_resolution(name, channels):
    assert _out_hw(build_resnet(name, "none", last_stride=2)) == (channels, 2, 1)
    assert _out_hw(build_resnet(name, "none", last_stride=1)) == (channels, 4, 2)


def test_bottleneck_last_stride():
    net = build_resnet("resnet50", "none", last_stride=1)
    assert net.layer4[0].conv2.stride == (1, 1)
    assert net.layer4[0].downsample[0].stride == (1, 1)
    assert net.fc.in_features == 2048


def test_load_from_local_file(tmp_path):
    src = build_resnet("resnet18", "none")
    path = tmp_path / "r18.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    net = build_resnet("resnet18", str(path))
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):  # the ImageNet classifier is deliberately not loaded
            assert torch.equal(net.state_dict()[k], v), k


def test_wrong_weight_file_is_named(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_resnet("resnet18", "none").state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="does not fit resnet50"):
        build_resnet("resnet50", str(path))
    with pytest.raises(PretrainedWeightsError, match="weight file not found"):
        build_resnet("resnet18", str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match=f"cannot read {bad}"):
        build_resnet("resnet18", str(bad))


def test_offline_imagenet_failure_is_clear(monkeypatch):
    def offline(name):
        raise OSError("network is unreachable")

    monkeypatch.setattr(backbone, "_download_imagenet_state", offline)
    with pytest.raises(PretrainedWeightsError, match="model.pretrained=/path/to/file.pth"):
        build_resnet("resnet18", "imagenet")
    with pytest.raises(PretrainedWeightsError, match="resnet10 has no ImageNet weights"):
        build_resnet("resnet10", "imagenet")


def test_imagenet_uses_torchvision_weights_api(monkeypatch):
    ref = build_resnet("resnet18", "none").state_dict()
    seen = []

    def fake_weights(name):
        seen.append(name)
        return ref

    monkeypatch.setattr(backbone, "_download_imagenet_state", fake_weights)
    net = build_resnet("resnet18", "imagenet")
    assert seen == ["resnet18"]
    assert torch.equal(net.conv1.weight, ref["conv1.weight"])


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_resnet("vgg16")

"""The retrieval descriptor: the BNNeck feature, flip averaging, extraction from a loader."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from esreid.config import load_config
from esreid.data.loader import BadImageLog
from esreid.engine.features import Descriptor, descriptor, extract_features
from esreid.models.esnet import build_model


class _PixelLinear(nn.Module):
    """A model whose output depends on where each pixel is: a linear map of the flattened
    image, so any other mirroring than the horizontal one gives another descriptor."""

    def __init__(self, shape=(3, 4, 6), dim=5):
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(int(np.prod(shape)), dim)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_flip_averages_with_the_horizontal_mirror_image():
    model = _PixelLinear()
    x = torch.randn(2, 3, 4, 6)
    # The mirror written out: column j of the mirrored image is column W-1-j of the image.
    mirrored = x[..., torch.arange(5, -1, -1)]
    expected = (model(x) + model(mirrored)) / 2
    torch.testing.assert_close(descriptor(model, x, flip=True), expected)
    torch.testing.assert_close(Descriptor(model, flip=True)(x), expected)
    torch.testing.assert_close(descriptor(model, x, flip=False), model(x))
    # Neither the vertical mirror nor both axes: those would give other descriptors.
    assert not torch.allclose(expected, (model(x) + model(x.flip(2))) / 2)
    assert not torch.allclose(expected, (model(x) + model(x.flip(2, 3))) / 2)


def _model_with_trained_statistics():
    cfg = load_config("esnet", ["model.backbone=resnet10", "model.pretrained=none"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 7, cfg.erase)
    # BNNeck statistics and scales far from the identity transform, as after training.
    with torch.no_grad():
        for branch in model.branches().values():
            bn = branch.neck.bn
            bn.running_mean.uniform_(0.5, 1.5)
            bn.running_var.uniform_(0.2, 4.0)
            bn.weight.uniform_(0.5, 2.0)
    return model.eval()


def test_the_descriptor_is_the_bnneck_feature_of_each_branch_concatenated():
    model = _model_with_trained_statistics()
    x = torch.randn(3, 3, 32, 16)
    with torch.no_grad():
        shared = model.trunk(x)
        parts = []
        for branch in (model.aib, model.esb):
            feat = branch.pool(branch.feature_map(shared))
            bn = branch.neck.bn
            # BatchNorm in eval mode, written out: (x - mean) / sqrt(var + eps) * w + b.
            parts.append((feat - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
                         * bn.weight + bn.bias)
            before_neck = feat
        expected = torch.cat(parts, dim=1)
        got = descriptor(model, x, flip=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == (3, model.descriptor_dim)
    # The feature before the BNNeck (what the triplet loss sees) is another vector.
    assert not torch.allclose(got[:, -before_neck.shape[1]:], before_neck, atol=1e-2)


def test_extract_features_uses_eval_mode_flip_and_restores_the_mode():
    model = _model_with_trained_statistics().train()
    images = torch.randn(5, 3, 32, 16)
    loader = [(images[:3], [1, 1, 2], [0, 1, 0]), (images[3:], [2, 3], [1, 0])]
    feats, pids, camids = extract_features(model, loader, flip=True)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expected = (model(images) + model(images.flip(3))) / 2
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    assert pids.tolist() == [1, 1, 2, 2, 3] and camids.tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="query: the loader yielded no images"):
        extract_features(model, [], desc="query")
    with pytest.raises(ValueError, match="^features: the loader yielded no images"):
        extract_features(model, [])


def test_extract_features_skips_empty_batches_and_logs_each_unreadable_image_once(caplog, capsys):
    model = _PixelLinear().train()
    images = torch.randn(4, 3, 4, 6)
    empty = torch.zeros(0, 3, 4, 6)
    # esreid's loaders: (images, pids, camids, paths, skipped paths); a batch whose every
    # image was unreadable arrives empty and is passed over, not ended on.
    loader = [
        (images[:2], [1, 2], [0, 1], ["a", "b"], ["bad1"]),
        (empty, [], [], [], ["bad1", "bad2"]),
        (images[2:3], [3], [1], ["c"], []),
        (images[3:], [4], [0], ["d"], []),  # batches of one image count like any other
    ]
    seen = BadImageLog()
    with caplog.at_level(logging.WARNING, logger="esreid.features"):
        feats, pids, camids = extract_features(model, loader, flip=False, bad_images=seen)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(feats, expected)
    assert not feats.requires_grad and feats.dtype == torch.float32
    assert pids.tolist() == [1, 2, 3, 4] and camids.tolist() == [0, 1, 1, 0]
    assert seen.paths == ["bad1", "bad2"]
    logged = [r.getMessage() for r in caplog.records if r.name == "esreid.features"]
    assert logged == [f"skipped unreadable image {p} (data.on_bad_image=skip)"
                      for p in ("bad1", "bad2")]
    # Without a log from the caller it keeps its own for the call.
    feats, _, _ = extract_features(model, [(images, [1, 2, 3, 4], [0] * 4, list("abcd"),
                                            ["bad3"])], flip=False)
    torch.testing.assert_close(feats, expected)
    # Four-element batches (no skipped paths) and a float64 model: float32 out, and flip on
    # by default.
    wide = _PixelLinear().to(torch.float64)
    # Start the stderr check here: the warnings above may reach stderr through a handler
    # that an earlier test's training run installed.
    capsys.readouterr()
    feats, _, _ = extract_features(wide, [(images.double(), [1, 2, 3, 4], [0] * 4, list("abcd"))])
    assert feats.dtype == torch.float32
    with torch.no_grad():
        flipped = (wide(images.double()) + wide(images.double().flip(3))) / 2
    torch.testing.assert_close(feats, flipped.float())
    # No progress bar unless asked for (evaluation inside training logs its own lines).
    assert capsys.readouterr().err == ""


class _SlowPixelLinear(_PixelLinear):
    """Takes at least 20 ms per batch, so the images-per-second figure has known bounds."""

    def forward(self, x):
        import time

        time.sleep(0.02)
        return super().forward(x)


def test_extract_features_progress_bar_names_the_split_counts_batches_and_images_per_second(
        capsys):
    import re
    import time

    model = _SlowPixelLinear()
    images = torch.randn(5, 3, 4, 6)
    loader = [(images[:2], [1, 2], [0, 1]), (images[2:4], [3, 4], [0, 1]),
              (images[4:], [5], [0])]
    capsys.readouterr()
    began = time.time()
    extract_features(model, loader, flip=False, progress=True, desc="query")
    elapsed = time.time() - began
    err = capsys.readouterr().err
    # The bar is labelled with the split, counts batches of the loader, and is cleared at
    # the end (leave=False) so the evaluation's table follows on a clean line.
    assert "query: " in err and "/3 [" in err and re.search(r"batch/s|s/batch", err), err
    assert err.endswith("\r") and "\n" not in err, repr(err)
    # The last figure: 5 images over at least 3 x 20 ms, at most the whole call.
    rate = int(re.findall(r"img_s=(\d+)", err)[-1])
    assert 5 / elapsed - 1 <= rate <= 5 / 0.06 + 1, (rate, elapsed)


@pytest.mark.cuda
def test_extract_features_moves_each_batch_to_the_model_device():
    model = _PixelLinear()
    images = torch.randn(4, 3, 4, 6)
    loader = [(images[:3], [1, 2, 3], [0, 1, 0]), (images[3:], [4], [1])]
    on_cpu, _, _ = extract_features(model, loader)
    on_gpu, pids, _ = extract_features(model.cuda(), loader, device="cuda")
    assert on_gpu.device.type == "cpu" and pids.tolist() == [1, 2, 3, 4]
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)

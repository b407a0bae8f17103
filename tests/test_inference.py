"""ReIDModel: the user's view of a trained model (preprocess any images, embed exactly as
evaluation does, explain a pair), loaded from a checkpoint alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from esreid import ReIDModel
from esreid.config import load_config
from esreid.data.loader import ImageReadError, build_test_loader
from esreid.data.records import Record
from esreid.engine.checkpoint import save_checkpoint
from esreid.engine.features import extract_features
from esreid.models.esnet import build_model

TINY = ["model.backbone=resnet10", "model.pretrained=none", "data.height=32", "data.width=16",
        "eval.batch_size=3"]


def _trained_like(model):
    """Move BatchNorm statistics and P-pooling's exponent off their initial values, so that
    a mistake in eval mode or in the exponent would change the descriptors."""
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.1, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("raw_l"):
                p.fill_(1.3)
    return model


@pytest.fixture
def checkpoint(tmp_path):
    cfg = load_config("esnet", TINY)
    model = _trained_like(build_model(cfg.model, 4, cfg.erase))
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint({"model": model.state_dict(), "num_classes": 4, "config": cfg.to_dict()}, path)
    return path


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        array = rng.integers(0, 256, size=(40 + i, 20 + i, 3), dtype=np.uint8)
        path = tmp_path / "imgs" / f"person {i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def test_embed_equals_the_evaluation_descriptor(checkpoint, images):
    m = ReIDModel.from_checkpoint(checkpoint)
    assert (m.height, m.width, m.flip, m.metric) == (32, 16, True, "cosine")
    got = m.embed([str(p) for p in images])
    assert got.dtype == np.float32 and got.shape == (7, m.descriptor_dim)
    records = [Record(str(p), 0, 0) for p in images]
    loader = build_test_loader(records, 32, 16, batch_size=2, num_workers=0)
    want = extract_features(m.model, loader, flip=True)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # Flip off through an override changes the descriptor (and the identity).
    no_flip = ReIDModel.from_checkpoint(checkpoint, overrides=["eval.flip=false"])
    assert no_flip.identity != m.identity
    assert not np.allclose(no_flip.embed(images[:1]), got[:1], atol=1e-4)


def test_preprocess_takes_paths_pil_arrays_and_tensors(checkpoint, images):
    m = ReIDModel.from_checkpoint(checkpoint)
    array = np.array(Image.open(images[0]).convert("RGB"))
    pil = Image.open(images[0])
    chw = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    x = m.preprocess([images[0], str(images[0]), pil, array, chw])
    assert x.dtype == torch.float32 and x.shape == (5, 3, 32, 16)
    for row in x[1:]:
        assert torch.equal(row, x[0])
    assert torch.equal(m.preprocess(x[0]), x[:1])  # a float tensor is already preprocessed
    assert torch.equal(m.preprocess(images[0]), x[:1])  # a single image, not in a list
    gray = m.preprocess(array[:, :, 0])
    assert gray.shape == (1, 3, 32, 16)
    np.testing.assert_allclose(m.embed(x), m.embed(images[:1]).repeat(5, axis=0), atol=1e-6)


def test_bad_inputs_are_clear_errors(checkpoint, tmp_path):
    m = ReIDModel.from_checkpoint(checkpoint)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=f"cannot read image {bad}"):
        m.embed([bad])
    with pytest.raises(ValueError, match=r"uint8 \[H, W\] or \[H, W, 3\|4\]"):
        m.preprocess(np.zeros((4, 4, 3), dtype=np.float64))
    with pytest.raises(ValueError, match=r"must be \[3, 32, 16\]"):
        m.preprocess(torch.zeros(3, 64, 32))
    with pytest.raises(TypeError, match="cannot read an image from a int"):
        m.preprocess([3])
    with pytest.raises(ValueError, match="no images given"):
        m.preprocess([])
    assert m.embed([]).shape == (0, m.descriptor_dim)


def test_embed_files_skips_unreadable_images(checkpoint, images, tmp_path):
    m = ReIDModel.from_checkpoint(checkpoint)
    bad = tmp_path / "imgs" / "zz broken.jpg"
    bad.write_bytes(b"")
    paths = [images[0], bad, images[1], images[2], images[3]]
    feats, kept, failed = m.embed_files(paths)
    assert kept == [str(p) for p in (images[0], images[1], images[2], images[3])]
    assert [f[0] for f in failed] == [str(bad)] and str(bad) in failed[0][1]
    np.testing.assert_allclose(feats, m.embed(images[:4]), atol=1e-6)


def test_explain_gives_maps_in_unit_range(checkpoint, images):
    m = ReIDModel.from_checkpoint(checkpoint)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    q_map, g_map = m.explain(images[0], images[1])
    assert q_map.shape == g_map.shape == (32, 16)
    for a in (q_map, g_map):
        assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert q_map.max() == 1.0 or q_map.max() == 0.0
    assert all(torch.equal(before[k], v) for k, v in m.model.state_dict().items())
    assert all(p.grad is None for p in m.model.parameters())


def test_identity_depends_on_weights_and_input(checkpoint, tmp_path):
    a = ReIDModel.from_checkpoint(checkpoint)
    assert ReIDModel.from_checkpoint(checkpoint).identity == a.identity
    ckpt = torch.load(checkpoint, weights_only=False)
    key = next(k for k in ckpt["model"] if k.endswith("weight"))
    ckpt["model"][key] = ckpt["model"][key] + 1e-3
    torch.save(ckpt, tmp_path / "other.pt")
    assert ReIDModel.from_checkpoint(tmp_path / "other.pt").identity != a.identity
    bigger = ReIDModel.from_checkpoint(checkpoint, overrides=["data.height=64"])
    assert bigger.identity != a.identity and bigger.preprocess(np.zeros((8, 8, 3), np.uint8)).shape[2] == 64
    # Arrays go through the image reader too: below 8 pixels a side is refused.
    with pytest.raises(ImageReadError, match="5x5 pixels is below the minimum of 8"):
        bigger.preprocess(np.zeros((5, 5, 3), np.uint8))

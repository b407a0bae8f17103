"""ONNX export (esreid.export): the file embeds like torch, carries its metadata, fails clearly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from esreid import __version__  # noqa: E402
from esreid.config import load_config  # noqa: E402
from esreid.engine.checkpoint import save_checkpoint  # noqa: E402
from esreid.export import OnnxBackend, OnnxModelError, export_onnx  # noqa: E402
from esreid.inference import ReIDModel  # noqa: E402
from esreid.models.esnet import build_model  # noqa: E402
from esreid.models.pooling import PPooling  # noqa: E402

TINY = ["model.backbone=resnet10", "model.pretrained=none", "data.height=32", "data.width=16"]
TOL = 1e-4


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Give ``model`` non-trivial BatchNorm statistics, branches that differ and P-pooling
    exponents away from their initial value, so that a graph dropping or merging any of them
    would not match torch by accident."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for m in norms:
            m.momentum = 1.0  # the running statistics become those of the batch below
        model.train()
        model(torch.randn(8, 3, 32, 16, generator=g) * 1.5 + 0.3)
        for m in norms:
            m.momentum = 0.1
            m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.5, 1.5, generator=g))
            m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=g))
        for m in model.modules():
            if isinstance(m, PPooling):
                # raw_l around 1.5-3.5 gives exponents l of roughly 2.7 to 4.5.
                m.raw_l.copy_(torch.empty(m.raw_l.shape).uniform_(1.5, 3.5, generator=g))
    model.eval()


def tiny_checkpoint(folder: Path, preset: str, overrides: list[str] = (), seed: int = 0) -> Path:
    """A checkpoint of a tiny randomised model of ``preset``, as ``esreid train`` writes it."""
    cfg = load_config(preset, TINY + list(overrides))
    model = build_model(cfg.model, 5, cfg.erase)
    randomise(model, seed)
    path = folder / f"{preset}.pt"
    save_checkpoint({"model": model.state_dict(), "num_classes": 5, "config": cfg.to_dict()}, path)
    return path


def images(folder: Path, n: int, seed: int = 1) -> list:
    """``n`` images of assorted sizes: uint8 arrays and, every third one, a PNG file."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        array = rng.integers(0, 256, size=(40 + 8 * (i % 3), 20 + 4 * (i % 2), 3), dtype=np.uint8)
        if i % 3 == 0:
            path = folder / f"img{i}.png"
            Image.fromarray(array).save(path)
            out.append(path)
        else:
            out.append(array)
    return out


@pytest.fixture(scope="module")
def esnet_export(tmp_path_factory):
    """A tiny ES-Net checkpoint, its torch ReIDModel and its ONNX export (flip on)."""
    folder = tmp_path_factory.mktemp("export")
    model = ReIDModel.from_checkpoint(tiny_checkpoint(folder, "esnet"))
    return model, export_onnx(model, folder / "esnet.onnx"), folder


@pytest.mark.parametrize("flip", [True, False], ids=["flip", "noflip"])
@pytest.mark.parametrize("preset", ["esnet", "base"])
def test_onnx_descriptors_match_torch(tmp_path, preset, flip):
    overrides = [] if flip else ["eval.flip=false"]
    model = ReIDModel.from_checkpoint(tiny_checkpoint(tmp_path, preset), overrides=overrides)
    assert model.flip is flip
    out = export_onnx(model, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx" and out.is_file()
    imgs = images(tmp_path, 5)
    expected = model.embed(imgs)
    got = OnnxBackend(out, threads=1).run(model.preprocess(imgs).numpy())
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() < TOL
    # Flip averaging really is inside the graph: the unflipped descriptor differs.
    single = model.model(model.preprocess(imgs)).detach().numpy()
    assert bool(np.abs(single - got).max() > 100 * TOL) is flip


def test_gmp_and_per_channel_ppool_export(tmp_path):
    path = tiny_checkpoint(tmp_path, "esnet", ["model.aib_pool=gmp", "model.ppool_per_channel=true"])
    model = ReIDModel.from_checkpoint(path)
    out = export_onnx(model, tmp_path / "m.onnx")
    imgs = images(tmp_path, 3)
    got = OnnxBackend(out, threads=1).run(model.preprocess(imgs).numpy())
    assert np.abs(got - model.embed(imgs)).max() < TOL


def test_dynamic_batch(esnet_export):
    model, path, folder = esnet_export
    backend = OnnxBackend(path, threads=1)
    batch = model.preprocess(images(folder, 7))
    with torch.no_grad():
        expected = model.model(batch)
        expected = ((expected + model.model(torch.flip(batch, dims=[3]))) / 2).numpy()
    for n in (1, 7):
        got = backend.run(batch[:n].numpy())
        assert got.shape == (n, model.descriptor_dim)
        assert np.abs(got - expected[:n]).max() < TOL
    assert backend.run(batch[:0].numpy()).shape == (0, model.descriptor_dim)
    with pytest.raises(ValueError, match=r"expects a batch \[N, 3, 32, 16\]"):
        backend.run(np.zeros((2, 3, 16, 16), dtype=np.float32))


def test_metadata(esnet_export):
    model, path, _ = esnet_export
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["esreid_config"]) == model.cfg.to_dict()
    assert meta["esreid_model_id"] == model.identity
    assert meta["esreid_version"] == __version__
    assert int(meta["esreid_descriptor_dim"]) == model.descriptor_dim == 1024
    assert json.loads(meta["esreid_input_size"]) == [3, 32, 16]
    assert len(json.loads(meta["esreid_mean"])) == len(json.loads(meta["esreid_std"])) == 3
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert (inp.name, outp.name) == ("images", "descriptors")
    in_dims = inp.type.tensor_type.shape.dim
    out_dims = outp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].HasField("dim_value")
    assert [d.dim_value for d in in_dims[1:]] == [3, 32, 16]
    assert out_dims[0].dim_param == in_dims[0].dim_param and out_dims[1].dim_value == 1024
    onnx.checker.check_model(proto)


def test_from_onnx_matches_the_torch_model(esnet_export):
    model, path, folder = esnet_export
    onnx_model = ReIDModel.from_onnx(path, batch_size=3, threads=1)
    assert onnx_model.model is None
    assert onnx_model.identity == model.identity
    assert onnx_model.descriptor_dim == model.descriptor_dim
    for attr in ("height", "width", "flip", "metric"):
        assert getattr(onnx_model, attr) == getattr(model, attr)
    assert onnx_model.cfg == model.cfg
    imgs = images(folder, 7)  # three batches of 3, 3 and 1
    got = onnx_model.embed(imgs, progress=False)
    assert got.shape == (7, model.descriptor_dim)
    assert np.abs(got - model.embed(imgs)).max() < TOL
    with pytest.raises(RuntimeError, match="from_checkpoint") as err:
        onnx_model.explain(imgs[0], imgs[1])
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="already runs in onnxruntime"):
        export_onnx(onnx_model, folder / "again.onnx")


def test_opset(tmp_path):
    model = ReIDModel.from_checkpoint(tiny_checkpoint(tmp_path, "base"), overrides=["eval.flip=false"])
    with pytest.raises(ValueError, match="opset 17 is not supported"):
        export_onnx(model, tmp_path / "old.onnx", opset=17)
    assert not (tmp_path / "old.onnx").exists()
    out = export_onnx(model, tmp_path / "m.onnx", opset=20)
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [20]
    imgs = images(tmp_path, 2)
    assert np.abs(ReIDModel.from_onnx(out, threads=1).embed(imgs) - model.embed(imgs)).max() < TOL


def test_failed_self_check_keeps_the_old_file(tmp_path, monkeypatch):
    import esreid.export

    model = ReIDModel.from_checkpoint(tiny_checkpoint(tmp_path, "base"), overrides=["eval.flip=false"])
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(esreid.export, "_SELF_CHECK_RTOL", -1.0)
    with pytest.raises(OnnxModelError, match="does not reproduce torch") as err:
        export_onnx(model, out)
    assert str(out) in str(err.value)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    return text


def test_missing_file(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(OnnxModelError, match="ONNX model not found") as err:
        ReIDModel.from_onnx(path)
    _one_line(err, path)
    with pytest.raises(OnnxModelError, match="it is a folder"):
        OnnxBackend(tmp_path)


@pytest.mark.parametrize("content", [b"", b"random"], ids=["empty", "random"])
def test_not_an_onnx_file(tmp_path, content):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096) if content else b"")
    with pytest.raises(OnnxModelError, match="not an ONNX model") as err:
        OnnxBackend(path)
    _one_line(err, path)


def test_onnx_file_not_written_by_esreid(tmp_path):
    path = tmp_path / "linear.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),), str(path),
                      input_names=["images"], output_names=["descriptors"], dynamo=True,
                      verbose=False, external_data=False)
    with pytest.raises(OnnxModelError, match="not written by esreid") as err:
        ReIDModel.from_onnx(path)
    _one_line(err, path)


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch, esnet_export):
    model, path, _ = esnet_export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"onnxruntime .*pip install 'esreid\[export\]'"):
        ReIDModel.from_onnx(path)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"onnx is not installed.*'esreid\[export\]'"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()

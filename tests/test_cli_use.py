"""The "use a trained model" commands end to end: export, index build/add/info, search
(text, JSON, explanations, thresholds), through the real CLI on a tiny checkpoint."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from esreid.cli import main
from esreid.config import load_config
from esreid.engine.checkpoint import save_checkpoint
from esreid.inference import ReIDModel
from esreid.metrics import compute_distance
from esreid.models.esnet import build_model
from esreid.search import GalleryIndex

TINY = ["model.backbone=resnet10", "model.pretrained=none", "data.height=32", "data.width=16",
        "eval.batch_size=4"]


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    cfg = load_config("esnet", TINY)
    model = build_model(cfg.model, 3, cfg.erase)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.2, generator=g)
    save_checkpoint({"model": model.state_dict(), "num_classes": 3, "config": cfg.to_dict()}, path)
    return path


def _image(path, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(48, 24, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("use")
    rng = np.random.default_rng(0)
    ckpt = _checkpoint(root / "run" / "checkpoints" / "last.pt", 0)
    gallery = root / "my gallery"
    for person in ("alice smith", "bob"):
        for i in range(3):
            _image(gallery / person / f"shot {i}.png", rng)
    _image(gallery / "loose.png", rng)
    (gallery / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    more = root / "more"
    for i in range(2):
        _image(more / "carol" / f"c{i}.png", rng)
    queries = [_image(root / "q" / f"query {i}.png", rng) for i in range(2)]
    return root, ckpt, gallery, more, queries


def test_index_build_search_add_info(setup, tmp_path, capsys):
    root, ckpt, gallery, more, queries = setup
    index = tmp_path / "gallery.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(index), "--threshold", "0.2"]) == 0
    captured = capsys.readouterr()
    assert "7 images (1 file skipped)" in captured.out
    # Reported once, naming the file (the library no longer logs what the command prints).
    assert captured.err.count("broken.jpg") == 1
    assert f"skipped {gallery / 'bob' / 'broken.jpg'}: cannot identify image format" in captured.err

    assert main(["search", "--index", str(index), *map(str, queries), "--top-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = ReIDModel.from_checkpoint(ckpt)
    paths = sorted(str(p) for p in gallery.rglob("*.png"))
    dist = compute_distance(model.embed(queries), model.embed(paths), metric="cosine")
    for qi, result in enumerate(out["results"]):
        assert result["query"] == str(queries[qi])
        order = np.argsort(dist[qi], kind="stable")[:4]
        assert [m["path"] for m in result["matches"]] == [paths[j] for j in order]
        assert [m["rank"] for m in result["matches"]] == [1, 2, 3, 4]
        for m, j in zip(result["matches"], order, strict=True):
            assert m["distance"] == pytest.approx(float(dist[qi, j]), abs=1e-5)
            assert m["same"] is (float(dist[qi, j]) <= 0.2)
    labels = {m["path"]: m["label"] for r in out["results"] for m in r["matches"]}
    for path, label in labels.items():
        assert label == (None if path.endswith("loose.png") else path.split("/")[-2])

    assert main(["search", "--index", str(index), str(queries[0]), "--top-k", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == str(queries[0]) and len(text) == 3 and text[1].split()[0] == "1"

    assert main(["index", "add", str(index), "--images", str(more)]) == 0
    assert "added 2 images (0 files skipped), 9 in all" in capsys.readouterr().out
    assert main(["index", "info", str(index), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 9 and info["metric"] == "cosine" and info["threshold"] == 0.2
    assert info["model_id"] == model.identity


def test_search_refuses_queries_of_another_model(setup, tmp_path, capsys):
    root, ckpt, gallery, _, queries = setup
    index = tmp_path / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(index)]) == 0
    other = _checkpoint(tmp_path / "other.pt", 1)
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--checkpoint", str(other), str(queries[0])]) == 2
    err = capsys.readouterr().err
    assert str(index) in err and ReIDModel.from_checkpoint(other).identity in err
    assert len(err.strip().splitlines()) == 2


def test_threshold_from_a_runs_evaluation(setup, tmp_path, capsys):
    root, ckpt, gallery, _, queries = setup
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "run": "r", "dataset": "market1501", "protocol": "market", "metric": "cosine",
        "metrics": {"rank1": 0.5, "mAP": 0.4},
        "verification": [{"fpr": 0.001, "tpr": 0.6, "threshold": 0.05},
                         {"fpr": 0.01, "tpr": 0.8, "threshold": 0.15}]}))
    index = tmp_path / "t.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(index), "--threshold-from", str(results), "--fpr", "0.01"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(index), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["threshold"] == 0.15
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(tmp_path / "u.index"), "--threshold-from", str(results),
                 "--fpr", "0.05"]) == 2
    assert "0.001" in capsys.readouterr().err


def test_search_explain_draws_rank_lists(setup, tmp_path, capsys):
    root, ckpt, gallery, _, queries = setup
    index = tmp_path / "e.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(index)]) == 0
    out = tmp_path / "why"
    assert main(["search", "--index", str(index), str(queries[1]), "--top-k", "3",
                 "--explain", str(out)]) == 0
    figures = list(out.iterdir())
    assert [p.name for p in figures] == ["query00_query 1.png"]
    with Image.open(figures[0]) as png:
        assert png.format == "PNG" and png.size[0] == 4 * 140


def test_export_then_search_with_onnx(setup, tmp_path, capsys):
    root, ckpt, gallery, _, queries = setup
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_path)]) == 0
    assert "input images [N, 3, 32, 16]" in capsys.readouterr().out
    index = tmp_path / "o.index"
    assert main(["index", "build", "--onnx", str(onnx_path), "--images", str(gallery),
                 "--out", str(index)]) == 0
    capsys.readouterr()
    # The torch checkpoint and its ONNX export are the same model for the index.
    for model_args in (["--onnx", str(onnx_path)], ["--checkpoint", str(ckpt)]):
        assert main(["search", "--index", str(index), *model_args, str(queries[0]), "--json"]) == 0
        results = json.loads(capsys.readouterr().out)["results"][0]["matches"]
        assert len(results) == 7
    # Without a model option, the model recorded in the index embeds the queries.
    assert main(["search", "--index", str(index), str(queries[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["matches"][0]["rank"] == 1


def test_index_build_never_replaces_an_index_silently(setup, tmp_path, capsys):
    """Issue 20, case 4: like training's run folders, an existing index is refused with the
    three ways on (extend it, another --out, --overwrite), and nothing is embedded first."""
    root, ckpt, gallery, more, _ = setup
    index = tmp_path / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(more),
                 "--out", str(index)]) == 0
    before = index.read_bytes()
    capsys.readouterr()
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(index)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (f"esreid index: error: index {index} already exists (2 images): add images "
                      f"to it with `esreid index add {index} --images DIR`, write another with "
                      "--out NEW, or replace it with --overwrite")
    assert index.read_bytes() == before
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(index), "--overwrite"]) == 0
    assert GalleryIndex.load(index).count == 7
    # A file that is not an index is not replaced either.
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(more),
                 "--out", str(other)]) == 2
    assert "(not a readable gallery index)" in capsys.readouterr().err
    assert other.read_text() == "mine"


def test_index_writers_wait_for_or_refuse_a_busy_index(setup, tmp_path, capsys):
    import subprocess
    import sys

    from esreid.search import index_lock

    root, ckpt, gallery, more, _ = setup
    index = tmp_path / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(index)]) == 0
    hold = ("import sys; from esreid.search import index_lock; "
            "lock = index_lock(sys.argv[1]).acquire(timeout=0); print('held', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(index)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["index", "add", str(index), "--images", str(more), "--wait", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-2].startswith(f"esreid index: error: index {index} is in use by another "
                                  f"esreid process (held by pid {proc.pid} on ")
        assert GalleryIndex.load(index).count == 7  # nothing was added
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert main(["index", "add", str(index), "--images", str(more), "--wait", "30"]) == 0
    assert GalleryIndex.load(index).count == 9
    assert index_lock(index).acquire(timeout=0).held  # released again


def test_evaluate_with_another_preset_keeps_the_trained_label(tmp_path, capsys):
    """Case 8: `esreid evaluate --config OTHER_PRESET` on a compatible checkpoint files its
    results under the preset that was trained (the report's paper row), and records the
    other one as the evaluation config."""
    from esreid.data.synthetic import generate_synthetic

    synth = tmp_path / "synthetic"
    generate_synthetic(synth, num_ids=12, height=32, width=16, seed=0, progress=False)
    ckpt = _checkpoint(tmp_path / "model.pt", 0)  # trained as "esnet"
    out = tmp_path / "results.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--config", "esnet_r10p03", "--out",
                 str(out), "--set", *TINY, "data.name=synthetic", f"data.root={synth}"]) == 0
    results = json.loads(out.read_text())
    assert results["config"] == "esnet" and results["run"] == "esnet"
    assert results["eval_config"] == "esnet_r10p03"
    assert capsys.readouterr().out.startswith("esnet on synthetic: ")
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| ES-Net |" in table and "R=10%" not in table
    # Evaluated with its own config, nothing changes: no eval_config.
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--set",
                 "data.name=synthetic", f"data.root={synth}"]) == 0
    results = json.loads(out.read_text())
    assert results["config"] == "esnet" and "eval_config" not in results

"""Embedding in shards: `esreid embed` and `esreid index build` under torchrun with two Gloo
processes on CPU (bounded, loopback rendezvous), against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_cli_use import _checkpoint, _image

from esreid.cli import main
from esreid.inference import ReIDModel
from esreid.search import GalleryIndex
from esreid.search.shards import MANIFEST, embed_shards, join_shards, plan, read_shard

LIMIT_S = 240
#: The model embeds two images per batch, so shards of two are batches of two everywhere.
BATCH = ["--set", "eval.batch_size=2"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "esreid", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {LIMIT_S} s: {' '.join(cmd)}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(1)
    ckpt = _checkpoint(root / "run" / "checkpoints" / "last.pt", 0)
    for person in ("ann", "ben", "cy"):
        for i in range(3):
            _image(root / "gallery" / person / f"000{i}_c{i + 1}s1_0001.png", rng)
    (root / "gallery" / "notes.txt").write_text("not an image")
    return root, ckpt


@pytest.fixture
def one_thread():
    """torchrun's workers compute with one thread each; the reference does too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def single_process(ckpt, folder):
    model = ReIDModel.from_checkpoint(ckpt, overrides=["eval.batch_size=2"])
    p = plan(model, folder, None, shard_size=2, rank=0, world_size=1)
    features, kept, _ = model.embed_files(p.images, progress=False)
    return model, p, features, kept


def test_two_processes_embed_disjoint_shards_equal_to_one(gallery, tmp_path, one_thread):
    root, ckpt = gallery
    out = tmp_path / "shards"
    done = torchrun("embed", "--checkpoint", str(ckpt), *BATCH, "--images",
                    str(root / "gallery"), "--out", str(out), "--shard-size", "2")
    # 9 images in shards of 2: rank 0 embeds shards 0, 2, 4 and rank 1 shards 1, 3.
    assert "process 0 of 2: embedded 3 shard(s), 5 images" in done.stderr
    assert "process 1 of 2: embedded 2 shard(s), 4 images" in done.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["images"] == 9 and manifest["shard_size"] == 2
    assert [s["images"] for s in manifest["shards"]] == [2, 2, 2, 2, 1]
    shards = [read_shard(out / s["file"]) for s in manifest["shards"]]
    seen = [p for s in shards for p in s.paths]
    assert len(seen) == len(set(seen)) == 9  # disjoint, no padding duplicates
    model, p, features, kept = single_process(ckpt, root / "gallery")
    joined = join_shards(out)
    assert joined.paths == [str(x) for x in kept]
    assert joined.labels == ["ann"] * 3 + ["ben"] * 3 + ["cy"] * 3
    np.testing.assert_array_equal(joined.features, features)

    # A rerun skips finished shards: lose one, and only it is embedded again.
    (out / "shard-00003.npz").unlink()
    before = {f: (out / f).stat().st_mtime_ns for f in ("shard-00000.npz", "shard-00001.npz")}
    for rank in (0, 1):
        run = embed_shards(model, plan(model, root / "gallery", None, 2, rank, 2), out)
        assert run.embedded == ([] if rank == 0 else [3])
        assert run.skipped == ([0, 2, 4] if rank == 0 else [1])
    assert before == {f: (out / f).stat().st_mtime_ns for f in before}
    np.testing.assert_array_equal(join_shards(out).features, features)
    # Shards of another model are refused, not mixed in.
    other = ReIDModel.from_checkpoint(_checkpoint(tmp_path / "o" / "last.pt", 1),
                                      overrides=["eval.batch_size=2"])
    with pytest.raises(ValueError, match="holds shards of another run .model_id"):
        embed_shards(other, plan(other, root / "gallery", None, 2, 0, 1), out)


def test_a_torchrun_index_build_equals_the_single_process_build(gallery, tmp_path, one_thread):
    root, ckpt = gallery
    two = tmp_path / "two.index"
    torchrun("index", "build", "--checkpoint", str(ckpt), *BATCH, "--images",
             str(root / "gallery"), "--out", str(two), "--shard-size", "2")
    assert not (tmp_path / "two.index.shards").exists()
    one = tmp_path / "one.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), *BATCH, "--images",
                 str(root / "gallery"), "--out", str(one)]) == 0
    a, b = GalleryIndex.load(one), GalleryIndex.load(two)
    assert a.paths == b.paths and a.labels == b.labels and a.count == 9
    np.testing.assert_array_equal(a.features, b.features)
    assert [it.id for it in a.backend.all_items()] == [it.id for it in b.backend.all_items()]
    for x, y in zip(a.search_arrays(a.features, 9), b.search_arrays(a.features, 9), strict=True):
        np.testing.assert_array_equal(x, y)

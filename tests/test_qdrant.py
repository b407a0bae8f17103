"""The Qdrant backend (qdrant-client's local mode), filters on every backend, idempotent and
interrupted additions, migration, and `esreid serve` on a Qdrant-backed index."""

from __future__ import annotations

import importlib.util
import json
import zipfile

import httpx
import numpy as np
import pytest
from serve_process import running_server
from test_cli_use import _checkpoint, _image
from test_search import float64_distances, tricky_gallery

from esreid.cli import main
from esreid.search import (
    GalleryIndex,
    IndexFileError,
    IndexMismatchError,
    SearchFilter,
    UnknownKindError,
    add_to_index_file,
)

pytest.importorskip("qdrant_client")
from esreid.search.backends import qdrant as qdrant_backend  # noqa: E402

HAVE_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss is not installed")
KINDS = ["numpy", pytest.param("flat", marks=needs_faiss), pytest.param("ivf", marks=needs_faiss),
         "qdrant"]


@pytest.fixture(autouse=True)
def _release_stores():
    yield
    qdrant_backend.close_store()


def small_gallery(seed: int, n: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Random rows with a zero row and tied duplicates, and queries on them."""
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float32)
    g[2] = 0.0
    g[5:9] = g[1]
    q = (rng.standard_normal((6, dim)) / np.sqrt(dim)).astype(np.float32)
    q[0], q[1] = g[1], 0.0
    return g, q


def settings(kind: str, store="", name: str = "g") -> dict:
    if kind == "qdrant":
        return {"store": str(store) if store else ":memory:", "collection": name}
    return {"nlist": 4, "nprobe": 1} if kind == "ivf" else {}


def gallery_index(kind, metric, g, store="", name="g", times=None, cameras=None):
    index = GalleryIndex.create("model-a", metric, g.shape[1], kind, replace=True,
                                **settings(kind, store, name))
    index.add(g, [f"img{i}.jpg" for i in range(len(g))], [f"id{i % 7}" for i in range(len(g))],
              cameras=cameras, times=times)
    return index


def exact_order(q, g, metric, keep=None):
    """Positions by float64 distance rounded to float32, ties by position, among ``keep``."""
    dist = float64_distances(q, g, metric).astype(np.float32)
    if keep is not None:
        dist[:, ~keep] = np.inf
    order = np.stack([np.lexsort((np.arange(len(g)), row)) for row in dist])
    return order, np.take_along_axis(dist, order, axis=1)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_qdrant_ranks_exactly_as_numpy_and_faiss_ties_included(metric):
    g, q = tricky_gallery(1, n=200)
    index = gallery_index("qdrant", metric, g)
    others = [gallery_index(k, metric, g) for k in ("numpy", *(["flat"] if HAVE_FAISS else []))]
    want, want_dist = exact_order(q, g, metric)
    for top_k in (1, 10, 45, 205):
        idx, dist = index.search_arrays(q, top_k)
        k = min(top_k, len(g))
        np.testing.assert_array_equal(idx, want[:, :k])
        np.testing.assert_allclose(dist, want_dist[:, :k], rtol=1e-7, atol=1e-9)
        for other in others:
            o_idx, o_dist = other.search_arrays(q, top_k)
            np.testing.assert_array_equal(idx, o_idx)
            np.testing.assert_array_equal(dist, o_dist)
    # Query 1 equals row 3, duplicated at 40..69: the ties come in gallery order.
    assert index.search_arrays(q[1], 10)[0][0].tolist() == [3, *range(40, 49)]
    first = index.search(q[5:6], 1)[0][0]
    assert first.path == f"img{first.index}.jpg" and first.label == f"id{first.index % 7}"


@pytest.mark.parametrize("kind", KINDS)
def test_every_filter_on_every_backend(kind):
    g, q = tricky_gallery(2, n=160, dim=16)
    rng = np.random.default_rng(0)
    cameras = [str(c) for c in rng.integers(1, 5, len(g))]
    cameras[7] = None  # no camera: never left out by camera_not
    times = [1_700_000_000.0 + 60 * i for i in range(len(g))]
    times[11] = None  # no time: left out by any window
    index = gallery_index(kind, "cosine", g, times=times, cameras=cameras)
    cams = np.array(["-" if c is None else c for c in cameras])
    t = np.array([np.nan if x is None else x for x in times])
    cases = {
        "camera_not": (SearchFilter.make(camera_not=[3]), cams != "3"),
        "two cameras": (SearchFilter.make(camera_not=["1", 2]), ~np.isin(cams, ["1", "2"])),
        "after": (SearchFilter.make(after=times[100]), t >= times[100]),
        # 1_700_001_800 s is 2023-11-14T22:43:20Z: times[30].
        "before (ISO 8601)": (SearchFilter.make(before="2023-11-14T22:43:20Z"), t <= times[30]),
        "window and camera": (SearchFilter.make([4], times[20], times[90]),
                              (t >= times[20]) & (t <= times[90]) & (cams != "4")),
    }
    for name, (flt, keep) in cases.items():
        want, want_dist = exact_order(q, g, "cosine", keep)
        k = min(12, int(keep.sum()))
        idx, dist = index.search_arrays(q, 12, filter=flt)
        # A filtered search scans the kept rows exactly, on the approximate kind too.
        np.testing.assert_array_equal(idx, want[:, :k], err_msg=name)
        np.testing.assert_allclose(dist, want_dist[:, :k], rtol=1e-7, atol=1e-9, err_msg=name)
        assert keep[idx].all(), name
    matches = index.search(q[:1], 3, filter=cases["after"][0])[0]
    assert all(m.time >= times[100] for m in matches)
    # A window nothing falls in returns nothing; a reversed one is refused naming both ends.
    empty = SearchFilter.make(after=1e12)
    assert index.search_arrays(q[:2], 5, filter=empty)[0].shape == (2, 0)
    with pytest.raises(ValueError, match="after .* is later than before"):
        SearchFilter.make(after=10, before=5)
    with pytest.raises(ValueError, match="before: 'yesterday' is not a time"):
        SearchFilter.make(before="yesterday")


def test_the_collection_persists_and_the_file_holds_only_metadata(tmp_path):
    g, q = small_gallery(3, 40)
    index = gallery_index("qdrant", "cosine", g, tmp_path / "store")
    index.set_threshold(0.3, {"given": 0.3})
    path = index.save(tmp_path / "g.index")
    want = index.search_arrays(q, 5)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["esreid-index.json"]
        meta = json.loads(zf.read("esreid-index.json"))
    assert meta["kind"] == "qdrant" and meta["count"] == 40
    assert meta["backend"] == {"store": str(tmp_path / "store"), "collection": "g",
                               "api_key_env": "QDRANT_API_KEY"}
    qdrant_backend.close_store()  # as a new process would: the store is read from disk
    loaded = GalleryIndex.load(path)
    assert loaded.count == 40 and loaded.threshold == 0.3 and loaded.kind == "qdrant"
    for a, b in zip(want, loaded.search_arrays(q, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.paths == [f"img{i}.jpg" for i in range(40)]
    np.testing.assert_array_equal(loaded.features, g)
    info = loaded.info()
    assert info["store"] == str(tmp_path / "store") and info["collection"] == "g"
    assert info["points"] == 40 and info["labels"] == 40


def test_adding_again_never_duplicates(tmp_path):
    g, _ = small_gallery(4, 30)
    index = gallery_index("qdrant", "cosine", g, tmp_path / "store")
    paths = [f"img{i}.jpg" for i in range(30)]
    assert index.add(g, paths) == 0  # same content and path: the same ids
    # A new path is a new image; the same image twice in a batch, or again, counts once.
    assert index.add(g[[0, 0, 1]], ["other.jpg", "other.jpg", "img1.jpg"]) == 1
    # The same path with other content (a replaced file) is another image.
    assert index.add(g[[3]], ["img1.jpg"]) == 1
    assert index.count == 32
    assert index.backend.client.count("g", exact=True).count == 32


def test_an_interrupted_add_leaves_what_the_file_says(tmp_path, monkeypatch):
    g, q = small_gallery(5, 60)
    path = tmp_path / "g.index"
    index = gallery_index("qdrant", "cosine", g[:40], tmp_path / "store")
    index.save(path)
    monkeypatch.setattr(qdrant_backend, "UPSERT_BATCH", 4)
    client = index.backend.client
    real_upsert, calls = client.upsert, []

    def upsert_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C between two batches would
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(client, "upsert", upsert_then_die)
    with pytest.raises(KeyboardInterrupt):
        def add(ix):
            return ix.add(g[40:], [f"img{i}.jpg" for i in range(40, 60)])
        from esreid.search import update_index_file

        update_index_file(path, add)
    monkeypatch.setattr(client, "upsert", real_upsert)
    assert client.count("g", exact=True).count == 48  # 8 points the file does not count
    qdrant_backend.close_store()
    reread = GalleryIndex.load(path)
    assert reread.count == 40 and reread.backend._stale
    want, want_dist = exact_order(q, g[:40], "cosine")
    idx, dist = reread.search_arrays(q, 50)
    np.testing.assert_array_equal(idx, want[:, :40])
    np.testing.assert_allclose(dist, want_dist[:, :40], rtol=1e-7, atol=1e-9)
    assert sorted(reread.paths) == sorted(f"img{i}.jpg" for i in range(40))
    # The retry adds everything once, and the leftovers are gone.
    assert reread.add(g[40:], [f"img{i}.jpg" for i in range(40, 60)]) == 20
    reread.save()
    assert reread.backend.client.count("g", exact=True).count == 60
    want, want_dist = exact_order(q, g, "cosine")
    np.testing.assert_array_equal(GalleryIndex.load(path).search_arrays(q, 60)[0], want)


def test_a_collection_of_another_model_is_refused(tmp_path):
    g, q = small_gallery(6, 20)
    store = tmp_path / "store"
    path = gallery_index("qdrant", "cosine", g, store).save(tmp_path / "a.index")
    with pytest.raises(ValueError, match=r"collection 'g' in .* already holds 20 points"):
        GalleryIndex.create("model-b", "cosine", 8, "qdrant", store=str(store), collection="g")
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("esreid-index.json"))
    meta["model_id"] = "model-b"
    forged = tmp_path / "b.index"
    with zipfile.ZipFile(forged, "w") as zf:
        zf.writestr("esreid-index.json", json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="holds descriptors of model model-a, but the "
                                                 "index file says model model-b"):
        GalleryIndex.load(forged)
    meta["backend"]["collection"] = "gone"
    with zipfile.ZipFile(forged, "w") as zf:
        zf.writestr("esreid-index.json", json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="collection 'gone' in .* does not exist"):
        GalleryIndex.load(forged)
    with pytest.raises(IndexMismatchError, match="built by model model-a"):
        GalleryIndex.load(path).search(q, 3, model_id="model-b")


def test_unknown_kinds_and_missing_settings_are_named():
    with pytest.raises(UnknownKindError, match=r"unknown index kind 'hnsw'; known kinds: flat, "
                                               r"ivf, numpy, qdrant"):
        GalleryIndex.create("m", "cosine", 8, "hnsw")
    with pytest.raises(ValueError, match="needs a store"):
        GalleryIndex.create("m", "cosine", 8, "qdrant", collection="x")
    with pytest.raises(ValueError, match="index kind 'numpy' takes no parameter.s. store"):
        GalleryIndex.create("m", "cosine", 8, "numpy", store="/tmp/x")


def test_a_file_naming_an_unknown_kind_is_one_line(tmp_path):
    path = tmp_path / "x.index"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("esreid-index.json", json.dumps({
            "format": "esreid-gallery-index", "version": 2, "model_id": "m", "metric": "cosine",
            "dim": 4, "count": 0, "kind": "annoy"}))
    with pytest.raises(IndexFileError, match="index kind 'annoy' is not known"):
        GalleryIndex.load(path)


# -- the commands --------------------------------------------------------------------------

@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(3)
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", 0)
    for person in ("ann", "ben", "cy"):
        for i in range(2):
            _image(tmp_path / "gallery" / person / f"000{i}_c{i + 1}s1_0001.png", rng)
    _image(tmp_path / "more" / "dee" / "0001_c3s1_0002.png", rng)
    csv = tmp_path / "labels.csv"
    rows = [f"{person}/000{i}_c{i + 1}s1_0001.png,{person},{10 * i + j}"
            for j, person in enumerate(("ann", "ben", "cy")) for i in range(2)]
    csv.write_text("path,label,time\n" + "\n".join(rows) + "\n")
    return tmp_path, ckpt, csv


def test_build_search_filters_add_retry_and_migrate_by_command(images, capsys):
    tmp, ckpt, csv = images
    store, index = tmp / "qstore", tmp / "q.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(tmp / "gallery"),
                 "--labels", str(csv), "--out", str(index), "--kind", "qdrant",
                 "--store", str(store)]) == 0
    assert "qdrant collection 'q'" in capsys.readouterr().out
    query = str(tmp / "gallery" / "ann" / "0000_c1s1_0001.png")

    def search(*flags):
        assert main(["search", "--index", str(index), query, "--json", "--top-k", "10",
                     *flags]) == 0
        return json.loads(capsys.readouterr().out)["results"][0]["matches"]

    everything = search()
    assert len(everything) == 6 and everything[0]["path"] == query
    assert {m["camera"] for m in everything} == {"1", "2"}  # from the Market-style names
    assert {m["camera"] for m in search("--camera-not", "1")} == {"2"}
    assert [m["time"] for m in search("--after", "10", "--before", "12")] and \
        all(10 <= m["time"] <= 12 for m in search("--after", "10", "--before", "12"))
    assert main(["search", "--index", str(index), query, "--after", "soon"]) == 2
    assert "--after: 'soon' is not a time" in capsys.readouterr().err
    for _ in range(2):  # a retried addition adds nothing the second time
        assert main(["index", "add", str(index), "--images", str(tmp / "more")]) == 0
    out = capsys.readouterr().out
    assert "added 1 images" in out and "added 0 images" in out
    assert GalleryIndex.load(index).count == 7

    flat = tmp / "flat.index"
    assert main(["index", "migrate", str(index), "--kind", "numpy", "--out", str(flat)]) == 0
    assert main(["index", "migrate", str(flat), "--kind", "qdrant", "--store", str(store),
                 "--collection", "again", "--out", str(tmp / "again.index")]) == 0
    capsys.readouterr()
    a, b, c = (GalleryIndex.load(p) for p in (index, flat, tmp / "again.index"))
    assert b.kind == "numpy" and c.kind == "qdrant" and a.count == b.count == c.count == 7
    assert a.paths == b.paths == c.paths and a.labels == b.labels == c.labels
    q = b.features[:3]
    for other in (b, c):
        for x, y in zip(a.search_arrays(q, 7), other.search_arrays(q, 7), strict=True):
            np.testing.assert_array_equal(x, y)
    assert [it.time for it in c.backend.all_items()] == [it.time for it in a.backend.all_items()]
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(tmp / "gallery"),
                 "--out", str(tmp / "x.index"), "--kind", "qdrant"]) == 2
    assert "--kind qdrant needs --store" in capsys.readouterr().err
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(tmp / "gallery"),
                 "--out", str(tmp / "x.index"), "--store", str(store)]) == 2
    assert "--store does not apply to --kind numpy" in capsys.readouterr().err


def test_add_to_index_file_is_idempotent_on_qdrant(images):
    tmp, ckpt, _ = images
    from esreid.inference import ReIDModel
    from esreid.search import build_index

    model = ReIDModel.from_checkpoint(ckpt)
    index, _ = build_index(model, tmp / "gallery", kind="qdrant", store=str(tmp / "s"),
                           collection="c", progress=False)
    index.save(tmp / "c.index")
    for expected in (1, 0):
        saved, added, _ = add_to_index_file(tmp / "c.index", model, tmp / "more", progress=False)
        assert added == expected and saved.count == 7


def test_serve_works_unchanged_on_a_qdrant_index(images):
    tmp, ckpt, csv = images
    index = tmp / "q.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(tmp / "gallery"),
                 "--labels", str(csv), "--out", str(index), "--kind", "qdrant",
                 "--store", str(tmp / "qstore"), "--threshold", "0.2"]) == 0
    qdrant_backend.close_store()  # local mode: one process at a time, now the server's
    query = (tmp / "gallery" / "ann" / "0000_c1s1_0001.png").read_bytes()
    with running_server(index, tmp / "serve.log", "--token", "t") as (proc, url, health):
        assert health == {"status": "ok", "gallery_size": 6}
        with httpx.Client(base_url=url, timeout=60) as client:
            files = {"image": ("q.png", query, "image/png")}
            r = client.post("/api/search?k=3", files=files)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["threshold"] == 0.2 and body["matches"][0]["distance"] < 1e-5
            assert body["matches"][0]["label"] == "ann" and body["matches"][0]["camera"] == "1"
            top = body["matches"][0]["id"]
            assert client.get(f"/api/gallery/{top}/image").content == query
            r = client.post("/api/search?k=10&camera_not=1", files=files)
            assert r.status_code == 200 and {m["camera"] for m in r.json()["matches"]} == {"2"}
            r = client.post("/api/search?k=10&after=10&before=11", files=files)
            assert r.status_code == 200 and [m["time"] for m in r.json()["matches"]] == [10, 11]
            r = client.post("/api/search?after=noon", files=files)
            assert r.status_code == 400 and "after: 'noon' is not a time" in r.json()["error"]
            extra = (tmp / "more" / "dee" / "0001_c3s1_0002.png").read_bytes()
            r = client.post("/api/gallery", files={"image": ("d.png", extra, "image/png")},
                            data={"label": "dee"}, headers={"Authorization": "Bearer t"})
            assert r.status_code == 200, r.text
            assert r.json()["gallery_size"] == 7
            r = client.post("/api/search?k=1", files={"image": ("d.png", extra, "image/png")})
            assert r.json()["matches"][0]["label"] == "dee"
            assert client.get("/healthz").json()["gallery_size"] == 7
        assert proc.poll() is None
    final = GalleryIndex.load(index)
    assert final.count == 7 and final.labels[-1] == "dee"
    assert final.file_path(6).startswith(str(tmp / "q.index.uploads"))

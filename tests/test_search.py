"""Gallery index and search: exact ranking, approximate recall, the index file, images and labels."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from esreid.metrics.distance import compute_distance
from esreid.search import (
    GalleryIndex,
    IndexFileError,
    IndexMismatchError,
    Match,
    add_to_index,
    build_index,
    labels_from_csv,
    labels_from_folders,
    list_images,
    recall_at_k,
    scan_images,
    threshold_from_results,
)
from esreid.search import features as features_module
from esreid.search import fileformat as fileformat_module
from esreid.search.exact import scan_error_bound
from esreid.utils import TEMP_FILE_PATTERN, clean_stale_temp

HAVE_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss is not installed")
EXACT_KINDS = [pytest.param("flat", marks=needs_faiss), "numpy"]
ALL_KINDS = [*EXACT_KINDS, pytest.param("ivf", marks=needs_faiss)]


def brute_force(q: np.ndarray, g: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation's ranking: compute_distance, then a stable argsort (ties by gallery position)."""
    dist = compute_distance(q, g, metric)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)


def float64_distances(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    """The distances compute_distance defines, in float64 (an independent reference)."""
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        qn = q64 / np.maximum(np.linalg.norm(q64, axis=1), 1e-12)[:, None]
        gn = g64 / np.maximum(np.linalg.norm(g64, axis=1), 1e-12)[:, None]
        return 1.0 - qn @ gn.T
    return np.sqrt(((q64[:, None, :] - g64[None, :, :]) ** 2).sum(axis=2))


def tricky_gallery(seed: int, n: int = 300, dim: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Unit-scale random rows with all-zero rows, a block of 30 duplicates (more than the
    candidate margin, so ties straddle the k-th place), a few more duplicates, and queries
    that sit on them: all-zero, equal to a duplicated row, a scaled copy of one."""
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float32)
    g[[5, 17, n - 50]] = 0.0
    g[40:70] = g[3]
    g[100:103] = g[90]
    q = (rng.standard_normal((24, dim)) / np.sqrt(dim)).astype(np.float32)
    q[0] = 0.0
    q[1] = g[3]
    q[2] = g[90]
    q[3] = 3.0 * g[3]
    q[4] = g[90] + np.float32(1e-3)
    return g, q


def make_index(g: np.ndarray, kind: str, metric: str, blocks: int = 1, **params) -> GalleryIndex:
    index = GalleryIndex.create("model-a", metric, g.shape[1], kind, **params)
    for part in np.array_split(np.arange(len(g)), blocks):
        index.add(g[part], [f"img{i}.jpg" for i in part], [f"id{i % 7}" for i in part])
    return index


# -- exact search ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_search_equals_brute_force_ranking(kind, metric, seed):
    g, q = tricky_gallery(seed)
    index = make_index(g, kind, metric, blocks=3)
    exact = float64_distances(q, g, metric).astype(np.float32)
    for top_k in (1, 10, 45, len(g) + 5):
        want_idx, want_dist = brute_force(q, g, metric, top_k)
        # All queries at once (faiss's BLAS path) and one by one (its SIMD path).
        idx, dist = index.search_arrays(q, top_k)
        # Exactly the order of the exact distances rounded to float32, ties by position.
        np.testing.assert_array_equal(
            idx, np.stack([np.lexsort((np.arange(len(g)), row))[:top_k] for row in exact]))
        np.testing.assert_allclose(dist, np.take_along_axis(exact, idx, axis=1), rtol=1e-7, atol=1e-9)
        if top_k < len(g):
            # And evaluation's. Deeper down (full ranking), two rows 7e-8 apart that
            # compute_distance's float32 rounding makes equal do occur: there the exact
            # order above is the reference.
            np.testing.assert_array_equal(idx, want_idx)
        # Evaluation's float32 |q|^2 + |g|^2 - 2 q.g cancels for nearly equal vectors (query
        # 4 is 5e-3 from row 90, where it is off by 3e-5): search reports the exact value,
        # so compare with compute_distance away from that regime.
        usable = (dist > 0.05) | (metric == "cosine")
        np.testing.assert_allclose(dist[usable], want_dist[usable], rtol=0, atol=1e-6)
        for i in (0, 1, 3, 10):
            one_idx, one_dist = index.search_arrays(q[i], top_k)
            np.testing.assert_array_equal(one_idx[0], want_idx[i])
            np.testing.assert_array_equal(one_dist[0], dist[i])


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_ties_beyond_the_candidate_margin_take_the_range_pass(kind, monkeypatch):
    g, q = tricky_gallery(0)
    index = make_index(g, kind, "cosine")
    calls = []
    within = index.backend.within
    monkeypatch.setattr(index.backend, "within", lambda *a: calls.append(a) or within(*a))
    idx, dist = index.search_arrays(q[1], 10)
    assert calls, "30 tied rows at the top must make the exactness check widen"
    # The query equals row 3, duplicated at 40..69: ties go by gallery position.
    assert idx[0].tolist() == [3, *range(40, 49)]
    assert len(set(dist[0].tolist())) == 1


def test_a_scan_erring_up_to_its_bound_still_ranks_exactly(monkeypatch):
    # 200 near-duplicates 1e-7 apart: noise up to the float32 error bound reorders them in
    # the scan, and the exactness check must recover the float64 order exactly.
    rng = np.random.default_rng(3)
    dim = 32
    base = rng.standard_normal(dim)
    g = (base + 1e-7 * rng.standard_normal((200, dim))).astype(np.float32)
    g = np.concatenate([g, rng.standard_normal((300, dim)).astype(np.float32)])
    q = (base + 0.01 * rng.standard_normal((5, dim))).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        index = make_index(g, "numpy", metric)
        scan_all = index.backend.scan_all
        rng_noise = np.random.default_rng(4)

        def noisy(x, scan_all=scan_all, index=index, metric=metric, noise=rng_noise):
            keys = scan_all(x)
            bound = min(scan_error_bound(metric, dim, float(np.linalg.norm(row)),
                                         index.backend.max_norm) for row in x)
            # Half the bound: the real float32 scan error comes on top of it.
            return keys + noise.uniform(-bound, bound, keys.shape) * 0.5

        monkeypatch.setattr(index.backend, "scan_all", noisy)
        idx, dist = index.search_arrays(q, 20)
        # An independent float64 reference, rounded to float32 once, ties by position.
        g64, q64 = g.astype(np.float64), q.astype(np.float64)
        for i in range(len(q)):
            if metric == "cosine":
                ref = 1 - (g64 / np.linalg.norm(g64, axis=1)[:, None]) @ (q64[i] / np.linalg.norm(q64[i]))
            else:
                ref = np.sqrt(((g64 - q64[i]) ** 2).sum(axis=1))
            ref32 = ref.astype(np.float32)
            order = np.lexsort((np.arange(len(g)), ref32))[:20]
            np.testing.assert_array_equal(idx[i], order)
            np.testing.assert_array_equal(dist[i], ref32[order])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_matches_carry_path_label_rank_and_threshold_verdict(kind):
    g, q = tricky_gallery(2)
    index = make_index(g, kind, "cosine", **({"nlist": 4, "nprobe": 4} if kind == "ivf" else {}))
    matches = index.search(q[5:7], top_k=4)
    assert len(matches) == 2 and all(len(m) == 4 for m in matches)
    first = matches[0][0]
    assert isinstance(first, Match) and first.rank == 1 and first.same is None
    assert first.path == f"img{first.index}.jpg" and first.label == f"id{first.index % 7}"
    assert set(first.to_dict()) == {"path", "distance", "rank", "same", "label", "camera", "time"}
    assert [m.rank for m in matches[0]] == [1, 2, 3, 4]
    assert all(a.distance <= b.distance for a, b in zip(matches[0], matches[0][1:], strict=False))
    # "same" is distance <= threshold, the boundary included.
    index.set_threshold(matches[0][1].distance, {"fpr": 0.001})
    verdicts = [m.same for m in index.search(q[5], top_k=4)[0]]
    assert verdicts == [True, True, False, False]
    assert index.threshold_source == {"fpr": 0.001}
    json.dumps([m.to_dict() for m in index.search(q[5], top_k=4)[0]])


def test_top_k_beyond_the_gallery_an_empty_index_and_bad_arguments():
    index = GalleryIndex.create("m", "euclidean", 4, "numpy")
    assert index.search(np.ones((2, 4), np.float32)) == [[], []]
    index.add(np.eye(4, dtype=np.float32)[:3], ["a", "b", "c"])
    assert [m.path for m in index.search(np.array([0, 0, 1, 0], np.float32), top_k=50)[0]] == \
        ["c", "a", "b"]
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        index.search(np.ones(4, np.float32), top_k=0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(np.array([np.nan, 0, 0, 0], np.float32))
    with pytest.raises(ValueError, match="1 feature rows but 2 paths"):
        index.add(np.ones((1, 4), np.float32), ["x", "y"])
    with pytest.raises(ValueError, match="unknown index kind 'hnsw'"):
        GalleryIndex.create("m", "cosine", 4, "hnsw")
    with pytest.raises(ValueError, match="unknown metric"):
        GalleryIndex.create("m", "manhattan", 4)


def test_the_index_keeps_its_own_copy_of_added_features():
    x = np.eye(3, dtype=np.float32)
    index = GalleryIndex.create("m", "euclidean", 3, "numpy")
    index.add(x, ["a", "b", "c"])
    x[:] = 7.0
    np.testing.assert_array_equal(index.features, np.eye(3, dtype=np.float32))


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_another_model_or_dimension_is_refused(tmp_path, kind):
    g, q = tricky_gallery(0)
    index = make_index(g, kind, "cosine")
    path = index.save(tmp_path / "gallery.esidx")
    index = GalleryIndex.load(path)
    assert index.search(q[5], 3, model_id="model-a")[0]
    with pytest.raises(IndexMismatchError) as err:
        index.search(q[5], 3, model_id="model-b")
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "model-a" in message and "model-b" in message and "refused" in message
    with pytest.raises(IndexMismatchError, match=r"holds 24-dimensional descriptors .* 25 dimensions"):
        index.search(np.ones((1, 25), np.float32))
    with pytest.raises(IndexMismatchError, match="model-b"):
        index.add(g[:1], ["x.jpg"], model_id="model-b")


# -- approximate search ------------------------------------------------------------------------

def clustered(seed: int, n: int, dim: int, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 3
    g = (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim))).astype(np.float32)
    q = (centres[rng.integers(0, clusters, 40)] + rng.standard_normal((40, dim))).astype(np.float32)
    return g, q


@needs_faiss
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ivf_recall_is_measured_against_exact_search(metric):
    g, q = clustered(0, 2000, 16, 20)
    index = make_index(g, "ivf", metric, nlist=16, nprobe=16)
    # Visiting every list is an exhaustive search: recall 1 and (no near-ties here) the
    # exact ranking.
    assert recall_at_k(index, q, 10) == 1.0
    np.testing.assert_array_equal(index.search_arrays(q, 10)[0], brute_force(q, g, metric, 10)[0])
    # Unclustered data: one list of 16 misses many neighbours.
    g = np.random.default_rng(1).standard_normal((2000, 16)).astype(np.float32)
    index = make_index(g, "ivf", metric, nlist=16, nprobe=1)
    got, _ = index.search_arrays(q, 10)
    want, _ = brute_force(q, g, metric, 10)
    by_hand = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), want.tolist(), strict=True)])
    recall = recall_at_k(index, q, 10)
    assert recall == pytest.approx(by_hand) and recall < 1.0
    assert recall_at_k(make_index(g, "numpy", metric), q, 10) == 1.0


@needs_faiss
def test_ivf_needs_enough_vectors_to_train():
    with pytest.raises(ValueError, match="needs at least nlist=64 descriptors; got 10"):
        GalleryIndex.create("m", "cosine", 8, "ivf", nlist=64).add(
            np.ones((10, 8), np.float32), [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="index kind 'flat' takes no parameter.s. nprobe"):
        GalleryIndex.create("m", "cosine", 8, "flat", nprobe=3)


# -- the index file ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_save_and_load_round_trip(tmp_path, kind, metric):
    g, q = clustered(1, 600, 12, 8)
    params = {"nlist": 8, "nprobe": 3} if kind == "ivf" else {}
    index = GalleryIndex.create("model-a", metric, 12, kind, **params)
    paths = [f"/data/gal lery/ünï çødé/{i} ☃.jpg" for i in range(600)]
    labels = [None if i % 5 == 0 else f"person {i % 9}" for i in range(600)]
    index.add(g[:400], paths[:400], labels[:400])
    index.add(g[400:], paths[400:], labels[400:])
    index.set_threshold(0.25, {"fpr": 0.001, "tpr": 0.9, "from": "runs/x/results.json"})
    saved = index.save(tmp_path / "sub" / "gallery.esidx")
    loaded = GalleryIndex.load(saved)
    np.testing.assert_array_equal(loaded.features, g)
    assert loaded.paths == paths and loaded.labels == labels
    for attr in ("model_id", "metric", "dim", "kind", "nlist", "nprobe", "threshold",
                 "threshold_source", "created", "updated"):
        assert getattr(loaded, attr) == getattr(index, attr), attr
    for a, b in zip(index.search_arrays(q, 7), loaded.search_arrays(q, 7), strict=True):
        np.testing.assert_array_equal(a, b)
    info = loaded.info()
    assert info["count"] == 600 and info["dim"] == 12 and info["metric"] == metric
    assert info["kind"] == kind and info["model_id"] == "model-a" and info["threshold"] == 0.25
    assert info["labels"] == 480 and info["identities"] == 9
    assert info["file"] == str(saved) and info["file_size"] == os.path.getsize(saved)
    assert info["created"].endswith("Z") and info["format_version"] == 2
    # Growing a loaded index and saving it in place.
    loaded.add(g[:2], ["new 1.jpg", "new 2.jpg"])
    assert loaded.save() == saved and GalleryIndex.load(saved).count == 602
    assert sorted(p.name for p in saved.parent.iterdir()) == ["gallery.esidx"]


def test_an_empty_index_round_trips(tmp_path):
    index = GalleryIndex.create("m", "cosine", 8)
    loaded = GalleryIndex.load(index.save(tmp_path / "empty.esidx"))
    assert loaded.count == 0 and loaded.features.shape == (0, 8)
    assert loaded.search(np.ones(8, np.float32)) == [[]]


def saved_index(tmp_path: Path) -> Path:
    g = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    return make_index(g, "numpy", "cosine").save(tmp_path / "gallery.esidx")


def rewrite_member(path: Path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[name] = data
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)


def flip_byte_in_features(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(b"\x93NUMPY") + 300] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_meta(path: Path, **changes) -> None:
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("esreid-index.json"))
    meta.update(changes)
    rewrite_member(path, "esreid-index.json", json.dumps(meta).encode())


DAMAGES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  "damaged gallery index (truncated or corrupt"),
    "one byte short": (lambda p: p.write_bytes(p.read_bytes()[:-1]),
                       "damaged gallery index (truncated or corrupt"),
    "flipped byte": (flip_byte_in_features, "damaged gallery index (Bad CRC-32"),
    "empty": (lambda p: p.write_bytes(b""), "not an esreid gallery index (not a zip archive)"),
    "text": (lambda p: p.write_text("hello\n"), "not an esreid gallery index (not a zip archive)"),
    "npz": (lambda p: np.savez(open(p, "wb"), a=np.ones(3)),
            "not an esreid gallery index (a zip archive without esreid-index.json)"),
    "other format": (lambda p: edit_meta(p, format="something-else"),
                     "not an esreid gallery index (esreid-index.json does not say format"),
    "newer": (lambda p: edit_meta(p, version=99), "written by a newer esreid (index format 99"),
    "wrong count": (lambda p: edit_meta(p, count=49), "49 items but 50 paths and 50 labels"),
    "bad json": (lambda p: rewrite_member(p, "paths.json", b"[1, 2"), "damaged gallery index"),
    "no features": (lambda p: rewrite_member(p, "features.npy", b"garbage"),
                    "damaged gallery index"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_or_foreign_file_is_one_line_naming_it(tmp_path, damage):
    path = saved_index(tmp_path)
    damage_fn, expected = DAMAGES[damage]
    damage_fn(path)
    with pytest.raises(IndexFileError) as err:
        GalleryIndex.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="index file not found"):
        GalleryIndex.load(tmp_path / "nope.esidx")
    with pytest.raises(IndexFileError, match="is a folder"):
        GalleryIndex.load(tmp_path)


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = saved_index(tmp_path)
    before = path.read_bytes()
    index = GalleryIndex.load(path)
    index.add(np.ones((1, 8), np.float32), ["extra.jpg"])

    def half_then_fail(f, blocks, count, dim):
        f.write(b"\x93NUMPY" + b"x" * 1000)
        raise OSError("simulated failure mid-write")

    monkeypatch.setattr(fileformat_module, "write_features", half_then_fail)
    with pytest.raises(OSError, match="simulated failure"):
        index.save()
    assert path.read_bytes() == before
    assert GalleryIndex.load(path).count == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.esidx"]


def test_a_process_killed_mid_save_leaves_the_previous_file(tmp_path):
    path = saved_index(tmp_path)
    before = GalleryIndex.load(path)
    index = GalleryIndex.load(path)
    index.add(np.ones((1, 8), np.float32), ["extra.jpg"])
    pid = os.fork()
    if pid == 0:  # the child dies without cleaning up, as a killed process would
        try:
            def die_mid_write(f, blocks, count, dim):
                f.write(b"\x93NUMPY" + b"x" * 1000)
                f.flush()
                os._exit(7)

            fileformat_module.write_features = die_mid_write
            index.save()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    after = GalleryIndex.load(path)
    np.testing.assert_array_equal(after.features, before.features)
    assert after.paths == before.paths and after.count == 50
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and TEMP_FILE_PATTERN.fullmatch(leftovers[0].name)
    assert clean_stale_temp(tmp_path) == leftovers


# -- images, labels, building -------------------------------------------------------------------

def png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (16, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def image_tree(root: Path) -> dict[str, Path]:
    """Images in sub-folders with spaces and Unicode, mixed-case extensions, one at the top
    level, non-images and a corrupt .jpg."""
    files = {
        "top": png(root / "top level.PNG", (10, 10, 10)),
        "alice1": png(root / "alice smith" / "a 1.png", (200, 30, 30)),
        "alice2": png(root / "alice smith" / "a 2.Png", (190, 40, 30)),
        "bob": png(root / "bøb ☃" / "b.png", (30, 200, 30)),
        "cam": png(root / "cam 1" / "carol" / "c.png", (30, 30, 200)),
    }
    (root / "alice smith" / "notes.txt").write_text("not an image")
    (root / "README").write_text("x")
    bad = root / "bøb ☃" / "broken.JPG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    files["broken"] = bad
    return files


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    files = image_tree(tmp_path)
    assert list_images(tmp_path) == [files[k] for k in ("alice1", "alice2", "bob", "broken",
                                                         "cam", "top")]
    assert list_images(tmp_path / "cam 1") == [files["cam"]]
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        list_images(files["top"])


def test_extensionless_images_are_found_and_dangling_links_reported(tmp_path):
    """The README's "any names": an image without an extension (or with an unknown one) is
    recognised by its header; a dangling link and a non-image are reported, not dropped."""
    gallery = tmp_path / "g"
    plain = png(gallery / "ann" / "IMG_0001", (200, 0, 0))
    odd = png(gallery / "ann" / "shot.jfif_copy", (0, 200, 0))
    (gallery / "ann" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (gallery / "ann" / "linked.png").symlink_to(plain)
    (gallery / "ann" / "notes").write_text("hello")
    scan = scan_images(gallery)
    assert scan.images == [plain, gallery / "ann" / "linked.png", odd]
    assert scan.skipped == [
        (str(gallery / "ann" / "gone.jpg"), f"dangling symbolic link to {tmp_path / 'nowhere.jpg'}"),
        (str(gallery / "ann" / "notes"), "not an image file"),
    ]
    index, failed = build_index(FakeModel(), gallery, progress=False)
    assert index.count == 3 and set(index.labels) == {"ann"}
    assert [p for p, _ in failed] == [str(gallery / "ann" / "gone.jpg"), str(gallery / "ann" / "notes")]


def test_labels_from_folders(tmp_path):
    files = image_tree(tmp_path)
    paths = list_images(tmp_path)
    assert labels_from_folders(paths, tmp_path) == ["alice smith", "alice smith", "bøb ☃",
                                                    "bøb ☃", "cam 1/carol", None]
    with pytest.raises(ValueError, match="is not under"):
        labels_from_folders([files["cam"]], tmp_path / "alice smith")


def test_labels_from_csv(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text('path,label,extra\n"a, b.jpg",Älice,1\nx/y.png,bob\n\nx/y.png,bob\n',
                        encoding="utf-8")
    assert labels_from_csv(csv_path) == {"a, b.jpg": "Älice", "x/y.png": "bob"}
    csv_path.write_text("label,path\nbob,b.png\n")
    assert labels_from_csv(csv_path) == {"b.png": "bob"}


@pytest.mark.parametrize("text, expected", [
    ("", "empty file; expected a header row 'path,label'"),
    ("file,name\na.png,x\n", "line 1: the header lacks column(s) path, label"),
    ("path,label\na.png,x\nb.png\n", "line 3: 1 field(s), expected at least 2"),
    ("path,label\na.png,\n", "line 2: empty label for 'a.png'"),
    ("path,label\n,x\n", "line 2: empty path"),
    ("path,label\na.png,x\nb.png,y\na.png,z\n",
     "line 4: 'a.png' is labelled 'z' but line 2 labels it 'x'"),
])
def test_labels_csv_errors_name_the_file_and_line(tmp_path, text, expected):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        labels_from_csv(csv_path)
    assert str(err.value).startswith(str(csv_path)) and expected in str(err.value)


def test_labels_csv_not_utf8_or_missing(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(b"path,label\n\xff\xfe.png,x\n")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        labels_from_csv(csv_path)
    with pytest.raises(FileNotFoundError, match="labels CSV not found"):
        labels_from_csv(tmp_path / "none.csv")


class FakeModel:
    """Embeds an image as its mean colour (3-d) and fails on undecodable files, like
    ReIDModel.embed_files."""

    def __init__(self, identity: str = "fake-1", metric: str = "euclidean") -> None:
        self.identity, self.metric, self.descriptor_dim = identity, metric, 3
        self.calls: list[list[str]] = []

    def embed_files(self, paths, progress=None):
        from esreid.data.loader import ImageReadError, read_rgb

        items = [str(p) for p in paths]
        self.calls.append(items)
        feats, kept, failed = [], [], []
        for path in items:
            try:
                image = read_rgb(path)
            except ImageReadError as err:
                failed.append((path, str(err)))
                continue
            feats.append(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) / 255)
            kept.append(path)
        return np.asarray(feats, dtype=np.float32).reshape(-1, 3), kept, failed


def test_build_index_lists_unreadable_images_and_labels_from_folders(tmp_path):
    files = image_tree(tmp_path / "gallery")
    model = FakeModel()
    index, failed = build_index(model, tmp_path / "gallery", threshold=0.1,
                                threshold_source={"fpr": 0.01}, progress=False)
    # Non-images are reported too (README, notes.txt), each once, then the unreadable image.
    gallery = tmp_path / "gallery"
    assert failed == [(str(gallery / "README"), "not an image file"),
                      (str(gallery / "alice smith" / "notes.txt"), "not an image file"),
                      (str(files["broken"]), failed[2][1])]
    assert failed[2][1].startswith(f"cannot read image {files['broken']}: ")
    assert index.paths == [str(files[k]) for k in ("alice1", "alice2", "bob", "cam", "top")]
    assert all(Path(p).is_absolute() for p in index.paths)
    assert index.labels == ["alice smith", "alice smith", "bøb ☃", "cam 1/carol", None]
    assert index.model_id == "fake-1" and index.metric == "euclidean" and index.threshold == 0.1
    best = index.search(model.embed_files([files["bob"]])[0], top_k=2, model_id="fake-1")[0]
    assert best[0].path == str(files["bob"]) and best[0].distance == 0.0 and best[0].same
    assert best[1].same is False


def test_build_index_with_labels_from_a_csv(tmp_path):
    files = image_tree(tmp_path / "gallery")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label\nalice smith/a 1.png,A\n{files['top']},T\n", encoding="utf-8")
    index, _ = build_index(FakeModel(), tmp_path / "gallery", labels_csv=csv_path, progress=False)
    assert dict(zip(index.paths, index.labels, strict=True)) == {
        str(files["alice1"]): "A", str(files["alice2"]): None, str(files["bob"]): None,
        str(files["cam"]): None, str(files["top"]): "T"}
    csv_path.write_text("path,label\nnobody.png,X\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels.csv: 1 image\(s\) not found under .*'nobody.png'"):
        build_index(FakeModel(), tmp_path / "gallery", labels_csv=csv_path, progress=False)


def test_build_index_of_a_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found under"):
        build_index(FakeModel(), tmp_path, progress=False)


def test_add_to_index_embeds_only_new_images_and_refuses_another_model(tmp_path):
    gallery = tmp_path / "gallery"
    broken = image_tree(gallery)["broken"]
    index, _ = build_index(FakeModel(), gallery, progress=False)
    new = png(gallery / "dave" / "d.png", (90, 90, 0))
    model = FakeModel()
    failed = add_to_index(index, model, gallery, progress=False)
    # Images it holds are not embedded again; the one that failed is tried again.
    assert model.calls == [[str(broken), str(new)]]
    assert [p for p, _ in failed] == [str(gallery / "README"),
                                      str(gallery / "alice smith" / "notes.txt"), str(broken)]
    assert index.count == 6 and index.paths[-1] == str(new) and index.labels[-1] == "dave"
    with pytest.raises(IndexMismatchError, match="fake-1.*fake-2"):
        add_to_index(index, FakeModel("fake-2"), gallery)
    with pytest.raises(IndexMismatchError, match="3-d euclidean .* 3-d cosine"):
        add_to_index(index, FakeModel("fake-1", "cosine"), gallery)


def test_a_real_tiny_model_builds_saves_and_searches(tmp_path):
    from esreid.config import load_config
    from esreid.inference import ReIDModel
    from esreid.models.esnet import build_model

    cfg = load_config("esnet", ["model.backbone=resnet10", "model.pretrained=none",
                                "data.height=32", "data.width=16"])
    model = ReIDModel(build_model(cfg.model, 3, cfg.erase), cfg)
    rng = np.random.default_rng(0)
    gallery = tmp_path / "my gallery"
    for name in ("person one/a.png", "person one/b.png", "pérson 2/c.png", "d.png"):
        path = gallery / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(path)
    (gallery / "pérson 2" / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    index, failed = build_index(model, gallery, progress=False)
    assert [Path(p).name for p, _ in failed] == ["corrupt.jpg"]
    assert index.count == 4 and index.dim == model.descriptor_dim
    assert index.model_id == model.identity and index.metric == model.metric
    assert index.labels == [None, "person one", "person one", "pérson 2"]
    path = index.save(tmp_path / "gallery.esidx")
    loaded = GalleryIndex.load(path)
    query = model.embed(gallery / "pérson 2" / "c.png")
    best = loaded.search(query, top_k=4, model_id=model.identity)[0]
    assert best[0].path == str(gallery.absolute() / "pérson 2" / "c.png")
    assert best[0].label == "pérson 2" and abs(best[0].distance) < 1e-6
    want_idx, want_dist = brute_force(query, loaded.features, model.metric, 4)
    assert [m.index for m in best] == want_idx[0].tolist()
    np.testing.assert_allclose([m.distance for m in best], want_dist[0], atol=1e-6)


# -- thresholds from results ---------------------------------------------------------------------

def results_file(folder: Path, **changes) -> Path:
    results = {"run": "esnet", "dataset": "market1501", "protocol": "market",
               "metrics": {"rank1": 0.9, "mAP": 0.8}, "metric": "cosine", "rerank": False,
               "verification": [{"fpr": 0.0001, "tpr": 0.71, "threshold": 0.29},
                                {"fpr": 0.001, "tpr": 0.83, "threshold": 0.35},
                                {"fpr": 0.01, "tpr": 0.94, "threshold": 0.44}]}
    results.update(changes)
    results = {k: v for k, v in results.items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def test_threshold_from_a_results_file_or_run_folder(tmp_path):
    path = results_file(tmp_path / "run")
    threshold, source = threshold_from_results(path, 1e-3, "cosine")
    assert threshold == 0.35
    assert source == {"fpr": 0.001, "tpr": 0.83, "from": str(path), "run": "esnet",
                      "dataset": "market1501"}
    assert threshold_from_results(tmp_path / "run", 0.01, "cosine")[0] == 0.44


@pytest.mark.parametrize("changes, fpr, metric, expected", [
    ({}, 0.05, "cosine", "no verification threshold at fpr 0.05; available: 0.0001, 0.001, 0.01"),
    ({}, 0.001, "euclidean", "its thresholds are cosine distances but the index uses euclidean"),
    ({"verification": None}, 0.001, "cosine", "no verification section"),
    ({"verification": []}, 0.001, "cosine", "re-run `esreid evaluate`"),
    ({"metric": None}, 0.001, "cosine", "does not say which distance metric"),
    ({"rerank": True}, 0.001, "cosine", "re-ranked distances"),
])
def test_threshold_errors_name_the_file(tmp_path, changes, fpr, metric, expected):
    path = results_file(tmp_path / "run", **changes)
    with pytest.raises(ValueError) as err:
        threshold_from_results(path, fpr, metric)
    assert str(err.value).startswith(str(path)) and expected in str(err.value)


def test_threshold_from_missing_or_malformed_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json in run folder"):
        threshold_from_results(tmp_path, 0.001, "cosine")
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="malformed JSON"):
        threshold_from_results(bad, 0.001, "cosine")


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_features_added_in_pieces_of_every_size(tmp_path, monkeypatch, kind):
    # Blocks of 5 rows: single rows fill and grow the last block, a batch of 12 gets a
    # block of its own, and search, features and the saved file see one gallery.
    monkeypatch.setattr(features_module, "BLOCK_BYTES", 5 * 4 * 6)
    g, q = tricky_gallery(4, n=120, dim=6)
    index = GalleryIndex.create("m", "euclidean", 6, kind)
    for start, stop in [(0, 1), (1, 2), (2, 4), (4, 16), (16, 17), (17, 30), (30, 31), (31, 120)]:
        index.add(g[start:stop], [str(i) for i in range(start, stop)])
    assert len(index.backend.blocks.buffers) > 5
    want_idx, _ = brute_force(q, g, "euclidean", 15)
    np.testing.assert_array_equal(index.search_arrays(q, 15)[0], want_idx)
    loaded = GalleryIndex.load(index.save(tmp_path / "g.esidx"))
    np.testing.assert_array_equal(loaded.features, g)
    np.testing.assert_array_equal(index.features, g)
    np.testing.assert_array_equal(index.search_arrays(q, 15)[0], want_idx)


# -- stored paths, several writers (issue 20) ------------------------------------------------

def test_relative_paths_are_relative_to_the_index_file(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    index = GalleryIndex.create("m", "euclidean", 3, "numpy")
    index.add(np.eye(3, dtype=np.float32), ["/abs/a.png", "g.uploads/b.png", "sub/c.png"])
    saved = index.save(folder / "g.index")
    elsewhere = tmp_path / "somewhere else"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory never matters
    loaded = GalleryIndex.load(saved)
    assert loaded.paths == ["/abs/a.png", "g.uploads/b.png", "sub/c.png"]  # as stored
    assert [loaded.file_path(i) for i in range(3)] == [
        "/abs/a.png", str(folder / "g.uploads" / "b.png"), str(folder / "sub" / "c.png")]
    assert [m.path for m in loaded.search(np.eye(3, dtype=np.float32)[1], top_k=1)[0]] == [
        str(folder / "g.uploads" / "b.png")]
    # Moved with its folder, the index still finds the files beside it.
    moved = tmp_path / "moved"
    folder.rename(moved)
    assert GalleryIndex.load(moved / "g.index").file_path(1) == str(moved / "g.uploads" / "b.png")
    # Saved into another folder, relative paths become absolute: they name the same files.
    copy = GalleryIndex.load(moved / "g.index")
    copy.save(tmp_path / "other" / "copy.index")
    assert GalleryIndex.load(tmp_path / "other" / "copy.index").paths == [
        "/abs/a.png", str(moved / "g.uploads" / "b.png"), str(moved / "sub" / "c.png")]


def test_changed_on_disk_follows_saves_by_others(tmp_path):
    path = saved_index(tmp_path)
    mine, theirs = GalleryIndex.load(path), GalleryIndex.load(path)
    assert not mine.changed_on_disk()
    theirs.add(np.ones((1, 8), np.float32), ["x.jpg"])
    theirs.save()
    assert mine.changed_on_disk() and not theirs.changed_on_disk()
    path.unlink()
    assert theirs.changed_on_disk()


def test_update_index_file_rereads_what_another_writer_saved(tmp_path):
    from esreid.search import update_index_file

    path = saved_index(tmp_path)
    base = GalleryIndex.load(path)
    # Unchanged on disk: the loaded index itself is updated (no second read).
    index, added = update_index_file(path, lambda ix: ix.add(np.ones((1, 8), np.float32), ["a.jpg"]),
                                     base=base)
    assert index is base and index.count == 51 and not base.changed_on_disk()
    # Another writer saves meanwhile: the next update starts from the file, not from base.
    other = GalleryIndex.load(path)
    other.add(np.full((1, 8), 2, np.float32), ["b.jpg"])
    other.save()
    index, _ = update_index_file(path, lambda ix: ix.add(np.full((1, 8), 3, np.float32), ["c.jpg"]),
                                 base=base)
    assert index is not base and index.paths[-3:] == ["a.jpg", "b.jpg", "c.jpg"]
    assert GalleryIndex.load(path).paths == index.paths
    # A change that fails saves nothing.
    before = path.read_bytes()

    def fail(ix):
        ix.add(np.ones((1, 8), np.float32), ["d.jpg"])
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        update_index_file(path, fail)
    assert path.read_bytes() == before


def test_add_to_index_file_keeps_what_was_added_while_it_embedded(tmp_path):
    """The read-modify-write of `esreid index add`: an addition saved by another writer
    while this one embeds is kept, and an image both add is stored once."""
    from esreid.search import add_to_index_file

    gallery = tmp_path / "gallery"
    png(gallery / "ann" / "1.png", (200, 0, 0))
    index, _ = build_index(FakeModel(), gallery, progress=False)
    path = index.save(tmp_path / "g.index")
    more = tmp_path / "more"
    shared = png(more / "bob" / "1.png", (0, 200, 0))
    own = png(more / "bob" / "2.png", (0, 0, 200))

    class Racing(FakeModel):
        def embed_files(self, paths, progress=None):
            result = super().embed_files(paths, progress)
            other = GalleryIndex.load(path)  # another process adds, and saves, meanwhile
            other.add(np.full((2, 3), 0.5, np.float32), [str(shared), str(tmp_path / "c.png")],
                      ["bob", "cy"])
            other.save()
            return result

    saved, added, failed = add_to_index_file(path, Racing(), more, progress=False)
    assert added == 1 and failed == []
    final = GalleryIndex.load(path)
    assert final.paths == [str(gallery / "ann" / "1.png"), str(shared), str(tmp_path / "c.png"),
                           str(own)]
    assert final.labels == ["ann", "bob", "cy", "bob"]
    assert saved.paths == final.paths


# -- the numpy kind's bfloat16 scan (issue 22) -------------------------------------------------

def test_the_bfloat16_scan_stays_within_its_bound_and_ranks_exactly():
    pytest.importorskip("torch")
    from esreid.search.backends.numpy import bf16_scan_bound
    from esreid.search.exact import exact_keys

    g, q = tricky_gallery(7, n=400, dim=64)
    half = make_index(g, "numpy", "cosine", scan="bfloat16")
    full = make_index(g, "numpy", "cosine", scan="float32")
    assert half.backend.kernel == "bfloat16" and full.backend.kernel == "float32"
    scanned = half.backend.scan_all(q[1:])
    exact = np.stack([exact_keys(row, g, "cosine") for row in q[1:]])
    # The premise of exactness on this machine's kernels: the scan errs within its bound.
    assert np.abs(scanned - exact).max() <= bf16_scan_bound(64)
    for top_k in (1, 10, 45, 405):
        for a, b in zip(half.search_arrays(q, top_k), full.search_arrays(q, top_k), strict=True):
            np.testing.assert_array_equal(a, b)
    # Large cosine galleries get it by default; euclidean ones, and small ones, never.
    assert make_index(g, "numpy", "euclidean").backend.kernel == "float32"
    with pytest.raises(ValueError, match="scan='bfloat16' applies to cosine galleries only"):
        GalleryIndex.create("m", "euclidean", 8, "numpy", scan="bfloat16")

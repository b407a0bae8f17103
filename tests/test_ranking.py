"""Ranking metrics checked against a slow per-query reference written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esreid.metrics import RankResult, compute_distance, evaluate_features, evaluate_rank


def reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Market protocol straight from the definition: full stable argsort of every row."""
    cmc_hits = np.zeros(max_rank)
    aps, inps = [], []
    skipped = 0
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        ranked_matches = []
        for g in order:
            if g_pids[g] == -1:
                continue
            if g_pids[g] == q_pids[i] and g_camids[g] == q_camids[i]:
                continue
            ranked_matches.append(g_pids[g] == q_pids[i])
        if not any(ranked_matches):
            skipped += 1
            continue
        pos_ranks = [r + 1 for r, hit in enumerate(ranked_matches) if hit]
        for k in range(max_rank):
            if pos_ranks[0] <= k + 1:
                cmc_hits[k] += 1
        precision_sum = 0.0
        for j, rank in enumerate(pos_ranks, start=1):
            precision_sum += j / rank
        aps.append(precision_sum / len(pos_ranks))
        inps.append(len(pos_ranks) / pos_ranks[-1])
    n = len(aps)
    return cmc_hits / n, float(np.mean(aps)), float(np.mean(inps)), n, skipped


def random_problem(seed, nq=17, ng=60, num_ids=6, num_cams=3, tied=True):
    """Random labels with junk (-1), distractors (0), same-camera matches and unmatched queries."""
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(-1, num_ids, size=ng)  # -1 junk, 0 distractor, 1.. identities
    g_camids = rng.integers(0, num_cams, size=ng)
    q_pids = rng.integers(1, num_ids + 2, size=nq)  # ids above num_ids have no gallery match
    q_camids = rng.integers(0, num_cams, size=nq)
    if tied:
        distmat = rng.integers(0, 6, size=(nq, ng)).astype(np.float32)
    else:
        distmat = rng.random((nq, ng)).astype(np.float32)
    return distmat, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_size", [1, 4, 256])
def test_matches_reference_with_ties_junk_and_skips(seed, chunk_size):
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(seed, tied=seed % 2 == 0)
    cmc, mAP, mINP, n, skipped = reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, 10)
    res = evaluate_rank(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10, chunk_size=chunk_size
    )
    assert skipped > 0 and n > 0  # the generator does produce both kinds of queries
    np.testing.assert_allclose(res.cmc, cmc, rtol=0, atol=1e-12)
    assert res.mAP == pytest.approx(mAP, abs=1e-12)
    assert res.mINP == pytest.approx(mINP, abs=1e-12)
    assert (res.num_valid, res.num_skipped) == (n, skipped)


def test_all_distances_equal_ranks_by_gallery_index():
    g_pids = np.array([5, 7, 5, 0, 5])
    g_camids = np.array([1, 1, 1, 1, 1])
    distmat = np.zeros((1, 5), dtype=np.float32)
    res = evaluate_rank(distmat, [5], g_pids, [0], g_camids, max_rank=5)
    # Positives at gallery positions 1, 3, 5 -> ranks 1, 3, 5.
    assert res.mAP == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert res.mINP == pytest.approx(3 / 5)
    np.testing.assert_allclose(res.cmc, [1, 1, 1, 1, 1])


def test_hand_built_ap_and_inp():
    # Ranking by distance: g0 (pos), g1 (neg), g2 (pos), g3 (neg).
    distmat = np.array([[0.1, 0.2, 0.3, 0.4]])
    res = evaluate_rank(distmat, [1], [1, 2, 1, 2], [0], [1, 1, 1, 1], max_rank=4)
    assert res.mAP == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert res.mINP == pytest.approx(2 / 3)
    np.testing.assert_allclose(res.cmc, [1, 1, 1, 1])
    assert res.to_dict() == {
        "rank1": 1.0,
        "mAP": pytest.approx((1 + 2 / 3) / 2),
        "mINP": pytest.approx(2 / 3),
        "num_valid": 1,
        "num_skipped": 0,
    }


def test_same_camera_match_and_junk_are_removed_not_counted_as_negatives():
    # g0: same pid same cam (ignored), g1: junk (ignored), g2: distractor 0, g3: true match.
    distmat = np.array([[0.0, 0.1, 0.2, 0.3]])
    res = evaluate_rank(distmat, [4], [4, -1, 0, 4], [2], [2, 0, 0, 1], max_rank=3)
    np.testing.assert_allclose(res.cmc, [0, 1, 1])
    assert res.mAP == pytest.approx(1 / 2)
    assert res.mINP == pytest.approx(1 / 2)


def test_two_queries_cmc_is_fraction_of_valid_queries():
    distmat = np.array(
        [
            [0.5, 0.1, 0.9],  # query pid 1
            [0.1, 0.2, 0.3],  # query pid 3: no gallery image of pid 3 -> skipped
            [0.3, 0.2, 0.1],  # query pid 2
        ]
    )
    g_pids = [1, 2, 1]
    res = evaluate_rank(distmat, [1, 3, 2], g_pids, [0, 0, 0], [1, 1, 1], max_rank=3)
    # query 0: order g1(neg), g0(pos), g2(pos) -> ranks 2, 3; query 2: g2(neg), g1(pos) -> rank 2.
    assert (res.num_valid, res.num_skipped) == (2, 1)
    np.testing.assert_allclose(res.cmc, [0.0, 1.0, 1.0])
    assert res.mAP == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 2) / 2)
    assert res.mINP == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_dict_access_and_to_dict_types():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(3, ng=40)
    res = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20)
    assert isinstance(res, RankResult)
    assert res["mAP"] == res.mAP and res["mINP"] == res.mINP
    assert res["cmc"] is res.cmc and res.cmc.shape == (20,)
    d = res.to_dict()
    assert set(d) == {"rank1", "rank5", "rank10", "mAP", "mINP", "num_valid", "num_skipped"}
    assert d["rank5"] == res.cmc[4] and type(d["rank5"]) is float and type(d["num_valid"]) is int
    assert res["rank10"] == res.cmc[9]
    assert np.all(np.diff(res.cmc) >= 0) and 0 <= res.mINP <= res.mAP <= 1
    with pytest.raises(KeyError, match="rank21"):
        res["rank21"]


def test_torch_inputs_match_numpy():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(4)
    a = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=5)
    b = evaluate_rank(
        torch.from_numpy(distmat),
        torch.from_numpy(q_pids),
        torch.from_numpy(g_pids),
        torch.from_numpy(q_camids),
        torch.from_numpy(g_camids),
        max_rank=5,
        chunk_size=3,
    )
    np.testing.assert_array_equal(a.cmc, b.cmc)
    assert (a.mAP, a.mINP, a.num_valid, a.num_skipped) == (
        b.mAP,
        b.mINP,
        b.num_valid,
        b.num_skipped,
    )


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_features_equals_evaluate_rank_of_distances(metric):
    rng = np.random.default_rng(7)
    _, q_pids, g_pids, q_camids, g_camids = random_problem(7, nq=23, ng=70)
    qf = rng.normal(size=(23, 16)).astype(np.float32)
    gf = rng.normal(size=(70, 16)).astype(np.float32)
    for chunk in (5, 64):
        full = evaluate_rank(
            compute_distance(qf, gf, metric, chunk_size=chunk),
            q_pids,
            g_pids,
            q_camids,
            g_camids,
            max_rank=10,
            chunk_size=chunk,
        )
        streamed = evaluate_features(
            qf, gf, q_pids, g_pids, q_camids, g_camids, metric=metric, max_rank=10, chunk_size=chunk
        )
        np.testing.assert_array_equal(streamed.cmc, full.cmc)
        assert streamed.mAP == full.mAP and streamed.mINP == full.mINP
        assert streamed.num_skipped == full.num_skipped


def test_compute_distance_euclidean_matches_cdist():
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(9, 12, generator=g), torch.randn(31, 12, generator=g)
    ref = torch.cdist(qf.double(), gf.double()).numpy()
    for chunk in (1, 4, 100):
        out = compute_distance(qf, gf, "euclidean", chunk_size=chunk)
        assert out.dtype == np.float32 and out.shape == (9, 31)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Identical rows: the float32 expansion leaves only sqrt(rounding) ~ 1e-3 (never NaN, since
    # negative rounding residue is clamped to zero before the sqrt).
    same = compute_distance(qf.numpy(), qf.numpy())
    assert np.all(np.isfinite(same)) and np.all(np.diag(same) < 5e-3)


def test_compute_distance_cosine_matches_explicit_formula():
    rng = np.random.default_rng(1)
    qf, gf = rng.normal(size=(5, 7)), rng.normal(size=(8, 7))
    ref = np.array([[1 - q @ g / (np.linalg.norm(q) * np.linalg.norm(g)) for g in gf] for q in qf])
    out = compute_distance(qf, gf, metric="cosine", chunk_size=2)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_compute_distance_errors():
    qf, gf = np.zeros((2, 3)), np.zeros((4, 3))
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        compute_distance(qf, gf, metric="manhattan")
    with pytest.raises(ValueError, match="same feature dimension, got 3 and 5"):
        compute_distance(qf, np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"gf must be a 2-D .* got shape \(4,\)"):
        compute_distance(qf, np.zeros(4))
    with pytest.raises(ValueError, match="qf contains NaN or infinite values"):
        compute_distance(np.full((2, 3), np.nan), gf)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        compute_distance(qf, gf, chunk_size=0)


def test_evaluate_rank_errors():
    distmat = np.zeros((2, 3))
    ok = dict(q_pids=[1, 2], g_pids=[1, 2, 3], q_camids=[0, 0], g_camids=[1, 1, 1])
    with pytest.raises(ValueError, match="q_pids has 3 entries but there are 2 queries"):
        evaluate_rank(distmat, **{**ok, "q_pids": [1, 2, 3]})
    with pytest.raises(ValueError, match="g_camids has 2 entries but there are 3 gallery items"):
        evaluate_rank(distmat, **{**ok, "g_camids": [1, 1]})
    with pytest.raises(ValueError, match=r"distmat must be 2-D .* got shape \(3,\)"):
        evaluate_rank(np.zeros(3), **ok)
    with pytest.raises(ValueError, match="max_rank must be a positive integer, got 0"):
        evaluate_rank(distmat, **ok, max_rank=0)
    with pytest.raises(ValueError, match="distmat contains NaN values"):
        evaluate_rank(np.full((2, 3), np.nan), **ok)
    with pytest.raises(ValueError, match="q_pids must hold integers"):
        evaluate_rank(distmat, **{**ok, "q_pids": ["a", "b"]})
    with pytest.raises(
        ValueError, match=r"no query has a valid gallery match \(all 2 queries skipped\)"
    ):
        evaluate_rank(distmat, **{**ok, "g_pids": [7, 8, 9]})
    with pytest.raises(ValueError, match="q_camids has 1 entries but there are 3 queries"):
        evaluate_features(np.zeros((3, 4)), np.zeros((3, 4)), [1, 2, 3], [1, 2, 3], [0], [1, 1, 1])


# --- Sharpened for mutation testing (issue 13): defaults, boundaries, exact messages. ---


def one_query_problem():
    """One query (pid 1, camera 0) against g0 neg, g1 pos, g2 neg, g3 pos (ranks 2 and 4)."""
    distmat = np.array([[0.1, 0.2, 0.3, 0.4]])
    return distmat, [1], [2, 1, 2, 1], [0], [1, 1, 1, 1]


def test_default_max_rank_is_50():
    res = evaluate_rank(*one_query_problem())
    np.testing.assert_array_equal(res.cmc, [0.0] + [1.0] * 49)
    qf = np.array([[0.0, 0.0]])
    gf = np.array([[1.0, 0.0], [2.0, 0.0]])
    res = evaluate_features(qf, gf, [1], [2, 1], [0], [1, 1])
    np.testing.assert_array_equal(res.cmc, [0.0] + [1.0] * 49)


def test_evaluate_features_default_metric_is_euclidean():
    # Euclidean puts the near negative g1 first (rank 2 for the positive g0); cosine puts
    # g0, in the query's direction, first.
    qf = np.array([[1.0, 0.0]])
    gf = np.array([[10.0, 0.0], [1.0, 0.5]])
    labels = ([1], [1, 2], [0], [1, 1])
    default = evaluate_features(qf, gf, *labels, max_rank=2)
    assert default.mAP == 0.5 and default.mINP == 0.5
    np.testing.assert_array_equal(default.cmc, [0.0, 1.0])
    cosine = evaluate_features(qf, gf, *labels, metric="cosine", max_rank=2)
    assert cosine.mAP == 1.0
    np.testing.assert_array_equal(cosine.cmc, [1.0, 1.0])


@pytest.mark.parametrize(
    ("max_rank", "keys"),
    [
        (1, ["rank1"]),
        (4, ["rank1"]),
        (5, ["rank1", "rank5"]),
        (9, ["rank1", "rank5"]),
        (10, ["rank1", "rank5", "rank10"]),
    ],
)
def test_to_dict_lists_ranks_within_cmc(max_rank, keys):
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]])
    # Positives at ranks 1, 5 and 10 (negatives elsewhere) -> cmc steps at 1 only.
    g_pids = [1, 2, 2, 2, 1, 2, 2, 2, 2, 1, 2]
    res = evaluate_rank(distmat, [1], g_pids, [0], [1] * 11, max_rank=max_rank)
    d = res.to_dict()
    assert list(d) == [*keys, "mAP", "mINP", "num_valid", "num_skipped"]
    for key in keys:
        assert d[key] == 1.0 and d[key] == res[key]
    assert d["mAP"] == pytest.approx((1 + 2 / 5 + 3 / 10) / 3)
    assert d["mINP"] == pytest.approx(3 / 10)
    assert (d["num_valid"], d["num_skipped"]) == (1, 0)


def test_to_dict_reads_the_right_cmc_entries():
    # Two valid queries: first hits at rank 5 and rank 10 -> cmc is 0 up to 4, 1/2 from 5, 1 from 10.
    distmat = np.tile(np.arange(10, dtype=np.float64), (3, 1))
    g_pids = [2, 2, 2, 2, 1, 2, 2, 2, 2, 3]
    res = evaluate_rank(distmat, [1, 3, 4], g_pids, [0, 0, 0], [1] * 10, max_rank=12)
    assert res.to_dict() == {
        "rank1": 0.0,
        "rank5": 0.5,
        "rank10": 1.0,
        "mAP": pytest.approx((1 / 5 + 1 / 10) / 2),
        "mINP": pytest.approx((1 / 5 + 1 / 10) / 2),
        "num_valid": 2,
        "num_skipped": 1,
    }
    np.testing.assert_array_equal(res.cmc, [0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 1, 1, 1])
    assert [res[f"rank{k}"] for k in (1, 4, 5, 9, 10, 12)] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert res["num_valid"] == 2 and res["num_skipped"] == 1
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert type(res.to_dict()[key]) is float
    assert type(res.to_dict()["num_skipped"]) is int


@pytest.mark.parametrize("key", ["rank0", "rank13", "rank", "rankx", "Rank1", "map", "rank-1"])
def test_getitem_unknown_key_message(key):
    distmat = np.tile(np.arange(10, dtype=np.float64), (1, 1))
    res = evaluate_rank(distmat, [1], [2, 1, 2, 2, 2, 2, 2, 2, 2, 2], [0], [1] * 10, max_rank=12)
    with pytest.raises(KeyError) as err:
        res[key]
    assert err.value.args == (
        f"RankResult has no entry {key!r}; use cmc, mAP, mINP, num_valid, num_skipped "
        "or rank1..rank12",
    )


def test_max_rank_below_first_hit_and_clipping():
    # First hits at rank 2 (query 0: g0 neg, g1 pos) and rank 3 (query 1: g0, g2 neg, g1 pos).
    distmat = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.4]])
    g_pids = [2, 1, 2, 1]
    for max_rank, cmc in [(1, [0.0]), (2, [0.0, 0.5]), (3, [0, 0.5, 1]), (5, [0, 0.5, 1, 1, 1])]:
        res = evaluate_rank(distmat, [1, 1], g_pids, [0, 0], [1] * 4, max_rank=max_rank)
        np.testing.assert_array_equal(res.cmc, cmc)
        assert res.cmc.dtype == np.float64 and res.cmc.shape == (max_rank,)
        assert res.mAP == pytest.approx(((1 / 2 + 2 / 4) / 2 + (1 / 3 + 2 / 4) / 2) / 2)


@pytest.mark.parametrize("bad", [0, -3, True, False, 2.0, "5", None])
def test_max_rank_must_be_a_positive_integer(bad):
    for evaluate, data in [
        (evaluate_rank, one_query_problem()),
        (evaluate_features, (np.zeros((1, 2)), np.ones((4, 2)), *one_query_problem()[1:])),
    ]:
        with pytest.raises(
            ValueError, match=rf"^max_rank must be a positive integer, got {bad!r}$"
        ):
            evaluate(*data, max_rank=bad)


def test_max_rank_accepts_numpy_integers():
    res = evaluate_rank(*one_query_problem(), max_rank=np.int64(3))
    assert type(res.cmc) is np.ndarray
    np.testing.assert_array_equal(res.cmc, [0.0, 1.0, 1.0])
    assert res["rank3"] == 1.0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("q_pids", [1, 1], "q_pids has 2 entries but there are 1 queries"),
        ("q_camids", [], "q_camids has 0 entries but there are 1 queries"),
        ("g_pids", [2, 1, 2], "g_pids has 3 entries but there are 4 gallery items"),
        ("g_camids", [1] * 5, "g_camids has 5 entries but there are 4 gallery items"),
    ],
)
def test_label_length_messages(name, value, message):
    distmat, q_pids, g_pids, q_camids, g_camids = one_query_problem()
    labels = dict(q_pids=q_pids, g_pids=g_pids, q_camids=q_camids, g_camids=g_camids)
    labels[name] = value
    with pytest.raises(ValueError, match=rf"^{message}$"):
        evaluate_rank(distmat, **labels)
    qf, gf = np.zeros((1, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match=rf"^{message}$"):
        evaluate_features(qf, gf, **labels)


@pytest.mark.parametrize("name", ["q_pids", "g_pids", "q_camids", "g_camids"])
def test_label_dtype_messages_name_the_argument(name):
    distmat, q_pids, g_pids, q_camids, g_camids = one_query_problem()
    labels = dict(q_pids=q_pids, g_pids=g_pids, q_camids=q_camids, g_camids=g_camids)
    labels[name] = [0.5] * len(labels[name])
    with pytest.raises(ValueError, match=rf"^{name} must hold integers, got dtype float64$"):
        evaluate_rank(distmat, **labels)
    with pytest.raises(ValueError, match=rf"^{name} must hold integers, got dtype float64$"):
        evaluate_features(np.zeros((1, 3)), np.ones((4, 3)), **labels)


def test_evaluate_features_validates_metric_and_chunk_size():
    qf, gf = np.zeros((1, 3)), np.ones((4, 3))
    labels = one_query_problem()[1:]
    with pytest.raises(ValueError, match=r"^unknown metric 'l1'; expected one of "):
        evaluate_features(qf, gf, *labels, metric="l1")
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive integer, got 0$"):
        evaluate_features(qf, gf, *labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive integer, got 0$"):
        evaluate_rank(*one_query_problem(), chunk_size=0)


def test_distmat_shape_and_dtype_messages():
    _, q_pids, g_pids, q_camids, g_camids = one_query_problem()
    labels = (q_pids, g_pids, q_camids, g_camids)
    with pytest.raises(
        ValueError, match=r"^distmat must be 2-D \[num_query, num_gallery\], got shape \(1, 1, 4\)$"
    ):
        evaluate_rank(np.zeros((1, 1, 4)), *labels)
    with pytest.raises(
        ValueError, match=r"^distmat must be 2-D \[num_query, num_gallery\], got shape \(4,\)$"
    ):
        evaluate_rank(torch.zeros(4), *labels)
    with pytest.raises(ValueError, match=r"^distmat must hold real numbers, got dtype complex128$"):
        evaluate_rank(np.zeros((1, 4), dtype=complex), *labels)
    with pytest.raises(ValueError, match=r"^distmat must hold real numbers, got dtype bool$"):
        evaluate_rank(np.zeros((1, 4), dtype=bool), *labels)
    # A torch matrix reaches the per-block checks as numpy.
    with pytest.raises(ValueError, match=r"^distmat must hold real numbers, got dtype bool$"):
        evaluate_rank(torch.zeros(1, 4, dtype=torch.bool), *labels)
    with pytest.raises(ValueError, match=r"^distmat contains NaN values$"):
        evaluate_rank(torch.tensor([[0.1, float("nan"), 0.2, 0.3]]), *labels)
    with pytest.raises(ValueError, match=r"^distmat contains NaN values$"):
        evaluate_rank(np.array([[0.1, 0.2, 0.3, np.nan]], dtype=np.float32), *labels)


def test_no_valid_query_message():
    distmat, _, g_pids, _, g_camids = one_query_problem()
    # The only query's matches are all seen by its own camera.
    with pytest.raises(ValueError) as err:
        evaluate_rank(np.tile(distmat, (3, 1)), [1, 1, 5], g_pids, [1, 1, 1], g_camids)
    assert str(err.value) == (
        "no query has a valid gallery match (all 3 queries skipped); "
        "check that query and gallery pids overlap across cameras"
    )


@pytest.mark.parametrize(
    "convert",
    [
        lambda d: d.tolist(),
        lambda d: torch.from_numpy(d).requires_grad_(),
        lambda d: torch.from_numpy(d).to(torch.bfloat16),
        lambda d: torch.from_numpy(d).to(torch.float16),
        lambda d: d.astype(np.int64),
        lambda d: d.astype(np.uint8),
    ],
)
def test_distmat_types_give_the_same_result(convert):
    # Small integers, exact in bfloat16: many ties, broken by gallery index in every type.
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(0, nq=9, ng=40)
    ref = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10, chunk_size=4)
    out = evaluate_rank(
        convert(distmat), q_pids, g_pids, q_camids, g_camids, max_rank=10, chunk_size=4
    )
    np.testing.assert_array_equal(out.cmc, ref.cmc)
    assert (out.mAP, out.mINP, out.num_valid, out.num_skipped) == (
        ref.mAP,
        ref.mINP,
        ref.num_valid,
        ref.num_skipped,
    )


def test_market_gallery_groups_splits_and_valid_mask():
    from esreid.metrics.ranking import MarketGallery

    g_pids = np.array([3, -1, 0, 3, 7, 3, -1, 7])
    g_camids = np.array([0, 0, 1, 1, 0, 0, 2, 2])
    index = MarketGallery(g_pids, g_camids)
    np.testing.assert_array_equal(index.junk, [1, 6])
    np.testing.assert_array_equal(index.group(3), [0, 3, 5])
    np.testing.assert_array_equal(index.group(7), [4, 7])
    np.testing.assert_array_equal(index.group(0), [2])
    assert index.group(-1).size == 0 and index.group(9).size == 0
    pos, same = index.split(3, 0)
    np.testing.assert_array_equal(pos, [3])
    np.testing.assert_array_equal(same, [0, 5])
    pos, same = index.split(7, 1)
    np.testing.assert_array_equal(pos, [4, 7])
    assert same.size == 0
    np.testing.assert_array_equal(
        index.valid_mask(3, 0), [False, False, True, True, True, False, False, True]
    )
    np.testing.assert_array_equal(
        index.valid_mask(7, 2), [True, False, True, True, True, True, False, False]
    )
    np.testing.assert_array_equal(
        index.valid_mask(5, 0), [True, False, True, True, True, True, False, True]
    )
    assert index.valid_mask(3, 0).dtype == bool
    # Junk queries: nothing is positive, nothing extra is removed.
    pos, same = index.split(-1, 0)
    assert pos.size == 0 and same.size == 0


def test_tie_of_two_puts_the_lower_gallery_index_first():
    # The positive g2 ties with the negative g0 only (a tie of exactly two): g0 comes first.
    distmat = np.array([[0.5, 0.1, 0.5, 0.9], [0.5, 0.1, 0.5, 0.9]])
    res = evaluate_rank(distmat, [1, 2], [2, 3, 1, 1], [0, 0], [1, 1, 1, 1], max_rank=4)
    # query 0: g1, g0, g2 (pos, rank 3), g3 (pos, rank 4); query 1 (pid 2): g1, g0 (pos, rank 2).
    np.testing.assert_array_equal(res.cmc, [0.0, 0.5, 1.0, 1.0])
    assert res.mAP == pytest.approx(((1 / 3 + 2 / 4) / 2 + 1 / 2) / 2)
    assert res.mINP == pytest.approx((2 / 4 + 1 / 2) / 2)


@pytest.mark.parametrize("chunk_size", [1, 2, 256])
def test_more_queries_than_gallery_items(chunk_size):
    # Five queries, two gallery items: every query row is ranked, in blocks of chunk_size rows.
    distmat = np.array([[0.1, 0.2], [0.2, 0.1], [0.3, 0.4], [0.4, 0.3], [0.5, 0.6]])
    res = evaluate_rank(
        distmat, [1, 1, 2, 2, 1], [1, 2], [0] * 5, [1, 1], max_rank=2, chunk_size=chunk_size
    )
    # First hits: q0 rank 1, q1 rank 2, q2 rank 2, q3 rank 1, q4 rank 1.
    np.testing.assert_array_equal(res.cmc, [3 / 5, 1.0])
    assert (res.num_valid, res.num_skipped) == (5, 0)
    assert res.mAP == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 + 1) / 5)
    qf = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    gf = np.array([[0.0], [4.5]])
    res = evaluate_features(
        qf, gf, [1, 1, 2, 2, 2], [1, 2], [0] * 5, [1, 1], max_rank=2, chunk_size=chunk_size
    )
    # q0, q1 nearest g0 (pid 1): rank 1; q2 nearest g0: rank 2; q3, q4 nearest g1: rank 1.
    np.testing.assert_array_equal(res.cmc, [4 / 5, 1.0])


def test_evaluate_features_no_valid_query_message():
    qf, gf = np.zeros((3, 2)), np.ones((4, 2))
    with pytest.raises(ValueError) as err:
        evaluate_features(qf, gf, [1, 1, 5], [2, 1, 2, 1], [1, 1, 1], [1, 1, 1, 1])
    assert str(err.value) == (
        "no query has a valid gallery match (all 3 queries skipped); "
        "check that query and gallery pids overlap across cameras"
    )


def test_rows_are_ranked_chunk_size_queries_at_a_time(monkeypatch):
    """The documented memory bound: blocks of at most chunk_size query rows (256 by default),
    for a distance matrix and for features alike."""
    import esreid.metrics.ranking as ranking

    seen = []
    add_block = ranking._Accumulator.add_block

    def spy(self, block, *args):
        seen.append(block.shape)
        return add_block(self, block, *args)

    monkeypatch.setattr(ranking._Accumulator, "add_block", spy)
    rng = np.random.default_rng(21)
    nq, ng = 300, 4
    q_pids, g_pids = rng.integers(1, 3, size=nq), np.array([1, 2, 1, 2])
    q_cams, g_cams = np.zeros(nq, dtype=int), np.ones(ng, dtype=int)
    qf, gf = rng.normal(size=(nq, 2)), rng.normal(size=(ng, 2))
    evaluate_rank(rng.random((nq, ng)), q_pids, g_pids, q_cams, g_cams)
    assert seen == [(256, ng), (44, ng)]
    seen.clear()
    evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams)
    assert seen == [(256, ng), (44, ng)]
    seen.clear()
    evaluate_features(qf[:10], gf, q_pids[:10], g_pids, q_cams[:10], g_cams, chunk_size=3)
    assert seen == [(3, ng), (3, ng), (3, ng), (1, ng)]

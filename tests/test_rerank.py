"""k-reciprocal re-ranking against a dense version of the reference code's algorithm.

``dense_rerank`` follows Zhong et al.'s published ``re_ranking(q_g_dist, q_q_dist, g_g_dist,
k1, k2, lambda_value)`` step by step on full N x N matrices: pooled squared distances, each
column divided by its maximum and the matrix transposed, ranking lists by argsort of the
rows (stable, so ties go to the lower index), k-reciprocal sets of k1 + 1 entries, expansion
by sets of round(k1 / 2) + 1 entries overlapping by strictly more than 2/3, V rows exp(-d)
normalised to sum 1, query expansion over k2 rows when k2 != 1, Jaccard 1 - m / (2 - m) and
the lambda mix on the query-gallery block. Unlike esreid it holds everything densely, takes
distances from feature differences rather than matrix products and sums min(V, V) over
whole rows rather than through an inverted index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esreid.metrics import evaluate_rank, k_reciprocal_rerank


def dense_rerank(qf, gf, k1, k2, lam, metric, dtype=np.float64):
    """Re-ranked [nq, ng] distances, densely; ``dtype=np.float32`` keeps the matrices in the
    reference's float32."""
    x = np.concatenate([qf, gf]).astype(np.float64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n, nq = len(x), len(qf)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2).astype(dtype)
    dist = (dist / dist.max(axis=0)).T
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal_sets(k):
        listed = np.zeros((n, n), dtype=bool)  # listed[j, i]: i is among j's first k
        np.put_along_axis(listed, rank[:, :k], True, axis=1)
        return [rank[i, :k][listed[rank[i, :k], i]] for i in range(n)]

    half = int(np.around(k1 / 2.0))
    r_full = reciprocal_sets(k1 + 1)
    r_half = reciprocal_sets(half + 1)
    v = np.zeros((n, n), dtype=dtype)
    for i in range(n):
        expanded = set(r_full[i])
        for c in r_full[i]:
            if len(set(r_half[c]) & set(r_full[i])) > 2.0 / 3.0 * len(r_half[c]):
                expanded |= set(r_half[c])
        cols = np.array(sorted(expanded), dtype=np.int64)  # empty when i misses its own list
        weight = np.exp(-dist[i, cols])
        v[i, cols] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.empty((nq, n - nq), dtype=dtype)
    for a in range(nq):
        support = np.flatnonzero(v[a])  # min(v[a, k], .) is 0 elsewhere
        m = np.minimum(v[a, support], v[nq:, support]).sum(axis=1)
        jaccard[a] = 1 - m / (2 - m)
    return (1 - lam) * jaccard + lam * dist[:nq, nq:]


def market_like(seed, num_ids, dim=8, num_cams=6, noise=0.8):
    """Clustered features in a Market-like split: every identity seen by 2-4 cameras with
    1-3 images each; one image per (identity, camera) is a query for half the identities,
    the rest is gallery, plus 10% distractors (pid 0)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    q, g = [], []
    for pid in range(1, num_ids + 1):
        cams = rng.choice(num_cams, size=rng.integers(2, 5), replace=False)
        for cam in cams:
            for shot in range(rng.integers(1, 4)):
                item = (centres[pid - 1] + noise * rng.normal(size=dim), pid, cam)
                (q if shot == 0 and pid % 2 == 0 else g).append(item)
    for _ in range(len(g) // 10):
        g.append((rng.normal(size=dim) * 1.5, 0, rng.integers(num_cams)))
    qf, q_pids, q_cams = (np.array(c) for c in zip(*q, strict=True))
    gf, g_pids, g_cams = (np.array(c) for c in zip(*g, strict=True))
    return qf.astype(np.float32), gf.astype(np.float32), (q_pids, g_pids, q_cams, g_cams)


def assert_same_ranking_metrics(out, ref, labels):
    """The two matrices give identical CMC curves, mAP and mINP."""
    a, b = evaluate_rank(out, *labels), evaluate_rank(ref, *labels)
    np.testing.assert_array_equal(a.cmc, b.cmc)
    assert a.to_dict() == b.to_dict()


def check_against_dense(qf, gf, labels, k1, k2, lam, metric, chunk=256):
    """esreid equals the dense reference to float32 rounding, with identical metrics."""
    ref = dense_rerank(qf, gf, k1, k2, lam, metric)
    out = k_reciprocal_rerank(
        qf, gf, k1=k1, k2=k2, lambda_value=lam, metric=metric, chunk_size=chunk
    )
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)
    assert_same_ranking_metrics(out, ref.astype(np.float32), labels)
    return out, ref


@pytest.mark.parametrize(
    ("seed", "ids", "k1", "k2", "lam", "metric", "chunk"),
    [
        (0, 30, 20, 6, 0.3, "euclidean", 256),
        (1, 40, 20, 6, 0.3, "cosine", 37),
        (2, 60, 7, 1, 0.3, "euclidean", 64),
        (3, 50, 5, 3, 0.0, "cosine", 256),
        (4, 120, 20, 6, 0.3, "euclidean", 100),
        (5, 80, 9, 1, 0.6, "cosine", 256),
        (6, 40, 1, 2, 0.5, "euclidean", 13),
    ],
)
def test_matches_dense_reference(seed, ids, k1, k2, lam, metric, chunk):
    qf, gf, labels = market_like(seed, ids)
    out, _ = check_against_dense(qf, gf, labels, k1, k2, lam, metric, chunk)
    # The Jaccard term is no no-op: re-ranking moves distances away from the lambda=1 ones.
    base = k_reciprocal_rerank(qf, gf, k1=k1, k2=k2, lambda_value=1.0, metric=metric)
    assert np.abs(out - base).max() > 1e-2


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_float32_reference_agrees(metric):
    """The reference's own float32 matrices give the same result to float32 accuracy and the
    same metrics."""
    qf, gf, labels = market_like(7, 60)
    ref32 = dense_rerank(qf, gf, 20, 6, 0.3, metric, dtype=np.float32)
    out = k_reciprocal_rerank(qf, gf, k1=20, k2=6, lambda_value=0.3, metric=metric)
    np.testing.assert_allclose(out, ref32, rtol=0, atol=2e-6)
    assert_same_ranking_metrics(out, ref32, labels)


@pytest.mark.parametrize(
    ("metric", "k1", "k2", "lam"),
    [
        ("euclidean", 20, 6, 0.3),
        ("cosine", 6, 1, 0.3),
        ("euclidean", 2, 3, 0.0),
        ("cosine", 1, 2, 0.3),
    ],
)
def test_duplicated_features(metric, k1, k2, lam):
    """Exact copies (and, for cosine, copies scaled by powers of two) tie at distance 0 and
    the ranking lists order them by pooled index, so an item can follow its own copy and,
    in a group larger than k1 + 1, miss its own list."""
    qf, gf, labels = market_like(8, 40, dim=32)
    # float64 features off the float32 grid: products round, so the copies' distances are
    # exact zeros only if computed as such.
    qf, gf = qf.astype(np.float64) * np.pi, gf.astype(np.float64) * np.pi
    rng = np.random.default_rng(9)
    for dst, src in zip(
        rng.choice(len(gf), 25, replace=False), rng.choice(len(gf), 25), strict=True
    ):
        gf[dst] = gf[src]
    gf[:5] = qf[:5]  # queries copied into the gallery, behind the query in pooled order
    gf[5:10] = gf[10:15]
    gf[40:44] = qf[20]  # a group of five
    if metric == "cosine":
        gf[20:25] = 2.0 * gf[30:35]
        gf[25:30] = 0.5 * qf[10:15]
    check_against_dense(qf, gf, labels, k1, k2, lam, metric, chunk=16)


@pytest.mark.parametrize(
    ("metric", "k1", "k2", "lam"),
    [
        ("euclidean", 20, 6, 0.3),
        ("euclidean", 10, 1, 0.5),
        ("cosine", 20, 6, 0.3),
        ("cosine", 5, 2, 0.0),
    ],
)
def test_quantised_features_with_many_ties(metric, k1, k2, lam):
    """Coarse features make many exactly equal distances, so lists hinge on tie-breaking."""
    if metric == "euclidean":
        qf, gf, labels = market_like(10, 50, dim=3, noise=0.5)
        qf, gf = np.round(qf * 2) / 2, np.round(gf * 2) / 2  # multiples of 0.5: exact sums
    else:
        # Signs of 16-d features: every cosine is a multiple of 1/8 and exact in floating point.
        qf, gf, labels = market_like(11, 50, dim=16, noise=1.0)
        qf, gf = np.where(qf >= 0, 1.0, -1.0), np.where(gf >= 0, 1.0, -1.0)
    pooled = np.concatenate([qf, gf])
    d = ((pooled[:, None] - pooled[None]) ** 2).sum(axis=2)
    assert len(np.unique(d)) < d.size / 500  # on average hundreds of pairs share each value
    check_against_dense(qf.astype(np.float32), gf.astype(np.float32), labels, k1, k2, lam, metric)


def test_lambda_one_returns_row_scaled_squared_distance():
    qf, gf, _ = market_like(12, 30)
    pooled = np.concatenate([qf, gf]).astype(np.float64)
    d = ((pooled[:, None] - pooled[None]) ** 2).sum(axis=2)
    expected = d[: len(qf), len(qf) :] / d[: len(qf)].max(axis=1, keepdims=True)
    out = k_reciprocal_rerank(torch.from_numpy(qf), torch.from_numpy(gf), lambda_value=1.0, k1=5)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_all_identical_items_give_finite_distances():
    """The reference divides 0 by 0 here; esreid keeps the all-zero rows."""
    qf, gf = np.ones((2, 4), np.float32), np.ones((5, 4), np.float32)
    out = k_reciprocal_rerank(qf, gf, k1=3, k2=2, lambda_value=0.3)
    np.testing.assert_allclose(out, 0.0, atol=1e-7)


def test_shapes_and_range():
    qf, gf, _ = market_like(13, 30)
    out = k_reciprocal_rerank(qf, gf, k1=5, k2=2)
    assert out.shape == (len(qf), len(gf))
    assert np.all(out >= 0) and np.all(out <= 1 + 1e-6)


def test_validation_errors():
    rng = np.random.default_rng(14)
    qf, gf = rng.normal(size=(2, 6)), rng.normal(size=(5, 6))
    with pytest.raises(ValueError, match="k1 must be a positive integer, got 0"):
        k_reciprocal_rerank(qf, gf, k1=0)
    with pytest.raises(ValueError, match="k2 must be a positive integer, got 2.5"):
        k_reciprocal_rerank(qf, gf, k1=3, k2=2.5)
    with pytest.raises(
        ValueError, match=r"k1 \(=8\) must not exceed the number of query \+ gallery items \(7\)"
    ):
        k_reciprocal_rerank(qf, gf, k1=8, k2=2)
    with pytest.raises(ValueError, match="lambda_value must be in \\[0, 1\\], got 1.5"):
        k_reciprocal_rerank(qf, gf, k1=3, k2=2, lambda_value=1.5)
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        k_reciprocal_rerank(qf, gf, k1=3, k2=2, metric="l1")
    with pytest.raises(ValueError, match="same feature dimension, got 6 and 4"):
        k_reciprocal_rerank(qf, gf[:, :4], k1=3, k2=2)


# --- Sharpened for mutation testing (issue 13): defaults, extreme k, chunked work, messages. ---


def quantised_problem(seed, nq=6, ng=18, dim=3, levels=3):
    """Small integer features: many exactly tied distances, pooled size above 16 (numpy's
    default sort is then not stable)."""
    rng = np.random.default_rng(seed)
    qf = rng.integers(0, levels, size=(nq, dim)).astype(np.float32)
    gf = rng.integers(0, levels, size=(ng, dim)).astype(np.float32)
    return qf, gf


def test_defaults_are_k1_20_k2_6_lambda_03_euclidean():
    qf, gf, _ = market_like(15, 20)
    ref = dense_rerank(qf, gf, 20, 6, 0.3, "euclidean")
    out = k_reciprocal_rerank(qf, gf)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)


@pytest.mark.parametrize(
    ("k1", "k2", "lam", "metric"),
    [
        (23, 6, 0.3, "euclidean"),
        (24, 3, 0.3, "euclidean"),
        (4, 24, 0.2, "euclidean"),
        (24, 24, 0.0, "cosine"),
        (22, 1, 0.5, "euclidean"),
    ],
)
def test_neighbourhoods_as_large_as_the_pooled_set(k1, k2, lam, metric):
    """k1 + 1 or k2 reaching the N pooled items: whole ranking lists, still tie-broken by
    pooled index."""
    qf, gf = quantised_problem(16)
    ref = dense_rerank(qf, gf, k1, k2, lam, metric)
    out = k_reciprocal_rerank(qf, gf, k1=k1, k2=k2, lambda_value=lam, metric=metric)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)


@pytest.mark.parametrize(
    ("work", "metric", "k1", "k2", "chunk"),
    [(1, "euclidean", 5, 3, 4), (37, "cosine", 7, 2, 5), (200, "euclidean", 4, 1, 7)],
)
def test_small_work_blocks_give_the_same_result(monkeypatch, work, metric, k1, k2, chunk):
    """Every vectorised step split into many blocks (a tiny _WORK_ELEMS) and a duplicate
    among the features: the result is still the dense one."""
    import esreid.metrics.rerank as rerank

    qf, gf = quantised_problem(17, nq=7, ng=23, dim=4, levels=4)
    gf[3] = qf[2]
    ref = dense_rerank(qf, gf, k1, k2, 0.3, metric)
    monkeypatch.setattr(rerank, "_WORK_ELEMS", work)
    out = k_reciprocal_rerank(
        qf, gf, k1=k1, k2=k2, lambda_value=0.3, metric=metric, chunk_size=chunk
    )
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k1=0), "k1 must be a positive integer, got 0"),
        (dict(k1=True), "k1 must be a positive integer, got True"),
        (dict(k1=3.0), "k1 must be a positive integer, got 3.0"),
        (dict(k1="3"), "k1 must be a positive integer, got '3'"),
        (dict(k2=-1), "k2 must be a positive integer, got -1"),
        (dict(k2=False), "k2 must be a positive integer, got False"),
        (dict(k1=8), "k1 (=8) must not exceed the number of query + gallery items (7)"),
        (dict(k2=8), "k2 (=8) must not exceed the number of query + gallery items (7)"),
        (dict(lambda_value=True), "lambda_value must be a number in [0, 1], got True"),
        (dict(lambda_value="0.5"), "lambda_value must be a number in [0, 1], got '0.5'"),
        (dict(lambda_value=None), "lambda_value must be a number in [0, 1], got None"),
        (dict(lambda_value=-0.1), "lambda_value must be in [0, 1], got -0.1"),
        (dict(lambda_value=2), "lambda_value must be in [0, 1], got 2"),
        (dict(lambda_value=1.0000001), "lambda_value must be in [0, 1], got 1.0000001"),
        (dict(metric="l1"), "unknown metric 'l1'; expected one of euclidean, cosine"),
        (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
        (dict(chunk_size=True), "chunk_size must be a positive integer, got True"),
    ],
)
def test_argument_messages(kwargs, message):
    rng = np.random.default_rng(14)
    qf, gf = rng.normal(size=(2, 6)), rng.normal(size=(5, 6))
    args = {"k1": 3, "k2": 2, **kwargs}
    with pytest.raises(ValueError) as err:
        k_reciprocal_rerank(qf, gf, **args)
    assert str(err.value) == message


def test_feature_messages():
    rng = np.random.default_rng(14)
    qf, gf = rng.normal(size=(2, 6)), rng.normal(size=(5, 6))
    cases = [
        ((qf, gf[:, :4]), "qf and gf must have the same feature dimension, got 6 and 4"),
        ((qf[:0], gf), "qf and gf must both be non-empty, got 0 queries and 5 gallery items"),
        ((qf, gf[:0]), "qf and gf must both be non-empty, got 2 queries and 0 gallery items"),
        ((qf[0], gf), "qf must be a 2-D [num_items, feature_dim] array, got shape (6,)"),
        ((qf, gf[0]), "gf must be a 2-D [num_items, feature_dim] array, got shape (6,)"),
        ((np.full_like(qf, np.nan), gf), "qf contains NaN or infinite values"),
        ((qf, np.full_like(gf, np.inf)), "gf contains NaN or infinite values"),
    ]
    for (q, g), message in cases:
        with pytest.raises(ValueError) as err:
            k_reciprocal_rerank(q, g, k1=1, k2=1)
        assert str(err.value) == message


def test_accepted_argument_types_and_bounds():
    """numpy integers and floats pass, and lambda's bounds 0 and 1 are inclusive; k1 and k2 may
    equal the pooled size."""
    qf, gf = quantised_problem(18, nq=3, ng=5)
    ref = dense_rerank(qf, gf, 3, 2, 0.25, "euclidean")
    out = k_reciprocal_rerank(qf, gf, k1=np.int64(3), k2=np.int32(2), lambda_value=np.float32(0.25))
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)
    for lam in (0, 1, 0.0, 1.0):
        ref = dense_rerank(qf, gf, 8, 8, float(lam), "cosine")
        out = k_reciprocal_rerank(qf, gf, k1=8, k2=8, lambda_value=lam, metric="cosine")
        np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_small_distances_are_still_scaled_by_the_row_maximum(metric):
    """Features close together (every squared distance below 1) are divided by their row's
    largest distance all the same."""
    qf, gf, _ = market_like(19, 12)
    qf, gf = qf * 0.01, gf * 0.01
    if metric == "cosine":  # keep the directions close: all cosine distances small too
        qf, gf = qf + 1.0, gf + 1.0
    ref = dense_rerank(qf, gf, 6, 3, 0.3, metric)
    out = k_reciprocal_rerank(qf, gf, k1=6, k2=3, lambda_value=0.3, metric=metric)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)
    base = k_reciprocal_rerank(qf, gf, k1=6, k2=3, lambda_value=1.0, metric=metric)
    assert np.isclose(base.max(), 1.0, atol=1e-6)


@pytest.mark.cuda
def test_cuda_features_give_the_cpu_result():
    """Queries on the GPU (gallery as numpy): every index and distance block follows the
    features' device, and the result is the CPU one."""
    qf, gf, _ = market_like(20, 30)
    ref = k_reciprocal_rerank(qf, gf, k1=8, k2=3, lambda_value=0.3, chunk_size=16)
    out = k_reciprocal_rerank(
        torch.from_numpy(qf).cuda(), gf, k1=8, k2=3, lambda_value=0.3, chunk_size=16
    )
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_distance_blocks_hold_at_most_chunk_size_rows(monkeypatch):
    """The documented bound: every distance block has at most chunk_size rows (256 by
    default), and each distinct item's row is computed once for the ranking lists and once
    more per query for the final mix."""
    import esreid.metrics.rerank as rerank

    calls = []
    sq_distance_rows = rerank._sq_distance_rows

    def spy(uniq, sq, rows):
        calls.append(len(rows))
        return sq_distance_rows(uniq, sq, rows)

    monkeypatch.setattr(rerank, "_sq_distance_rows", spy)
    rng = np.random.default_rng(22)
    qf, gf = rng.normal(size=(3, 2)), rng.normal(size=(260, 2))
    out = k_reciprocal_rerank(qf, gf, k1=2, k2=1)
    assert calls == [256, 7, 3]
    np.testing.assert_allclose(out, dense_rerank(qf, gf, 2, 1, 0.3, "euclidean"), atol=2e-7)
    calls.clear()
    qf, gf = rng.normal(size=(7, 2)), rng.normal(size=(12, 2))
    k_reciprocal_rerank(qf, gf, k1=3, k2=2, chunk_size=5)
    assert calls == [5, 5, 5, 4, 5, 2]
    calls.clear()
    k_reciprocal_rerank(qf, gf, k1=3, k2=2, lambda_value=1.0, chunk_size=5)
    assert calls == [5, 2]


def test_lambda_one_fills_every_query_block():
    qf, gf, _ = market_like(23, 12)
    pooled = np.concatenate([qf, gf]).astype(np.float64)
    d = ((pooled[:, None] - pooled[None]) ** 2).sum(axis=2)
    expected = d[: len(qf), len(qf) :] / d[: len(qf)].max(axis=1, keepdims=True)
    assert len(qf) > 3
    out = k_reciprocal_rerank(qf, gf, k1=4, k2=2, lambda_value=1.0, chunk_size=3)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("work", "k2"), [(1 << 20, 6), (1, 1), (37, 3)])
def test_every_buffer_entry_is_written(monkeypatch, work, k2):
    """np.empty poisoned (NaN, the largest integer, True): every buffer the computation
    allocates is filled before it is read, so the result is still the dense one."""
    import esreid.metrics.rerank as rerank

    qf, gf = quantised_problem(24, nq=5, ng=20, dim=4, levels=4)
    gf[2] = qf[1]
    ref = dense_rerank(qf, gf, 6, k2, 0.3, "euclidean")
    real_empty = np.empty

    def poisoned(shape, dtype=float, *args, **kwargs):
        out = real_empty(shape, dtype, *args, **kwargs)
        kind = out.dtype.kind
        out.fill(np.nan if kind == "f" else np.iinfo(out.dtype).max if kind in "iu" else True)
        return out

    monkeypatch.setattr(np, "empty", poisoned)
    monkeypatch.setattr(rerank, "_WORK_ELEMS", work)
    out = k_reciprocal_rerank(qf, gf, k1=6, k2=k2, lambda_value=0.3, chunk_size=4)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)

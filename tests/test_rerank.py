"""k-reciprocal re-ranking against a dense, loop-based version written from the paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esreid.metrics import compute_distance, k_reciprocal_rerank


def reference_rerank(qf, gf, k1, k2, lam, metric):
    """Zhong et al. (2017), Eqs. for N, R, R*, V, local query expansion and Jaccard, with loops.

    Conventions as documented in esreid.metrics.rerank: pooled items, each ranking list
    starts with the item itself, d = metric distance (float64) / its pooled maximum.
    """
    feats = np.concatenate([qf, gf]).astype(np.float64)
    n, nq = len(feats), len(qf)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if metric == "euclidean":
                d[i, j] = np.linalg.norm(feats[i] - feats[j])
            else:
                cos = feats[i] @ feats[j] / (np.linalg.norm(feats[i]) * np.linalg.norm(feats[j]))
                d[i, j] = 1.0 - cos
    d /= d.max()

    def ranking(i):
        return sorted(range(n), key=lambda j: (j != i, d[i, j], j))

    lists = [ranking(i) for i in range(n)]

    def nn(i, k):
        return lists[i][:k]

    def recip(i, k):
        return [j for j in nn(i, k) if i in nn(j, k)]

    half = math.ceil(k1 / 2)
    v = np.zeros((n, n))
    for i in range(n):
        r_star = set(recip(i, k1))
        for q in recip(i, k1):
            r_q = recip(q, half)
            if len(set(recip(i, k1)) & set(r_q)) >= 2 / 3 * len(r_q):
                r_star |= set(r_q)
        for j in r_star:
            v[i, j] = math.exp(-d[i, j])
    v_exp = np.zeros_like(v)
    for i in range(n):
        for g in nn(i, k2):
            v_exp[i] += v[g] / k2
    out = np.zeros((nq, n - nq))
    for a in range(nq):
        for b in range(n - nq):
            g = nq + b
            num = sum(min(v_exp[a, k], v_exp[g, k]) for k in range(n))
            den = sum(max(v_exp[a, k], v_exp[g, k]) for k in range(n))
            out[a, b] = (1 - lam) * (1 - num / den) + lam * d[a, g]
    return out


def clustered_features(seed, nq=8, ng=30, dim=6):
    """Features drawn around a few centres, so k-reciprocal sets are non-trivial."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim)) * 3
    labels = rng.integers(0, 5, size=nq + ng)
    feats = centres[labels] + rng.normal(size=(nq + ng, dim))
    return feats[:nq].astype(np.float32), feats[nq:].astype(np.float32)


@pytest.mark.parametrize(
    ("seed", "k1", "k2", "lam", "metric", "chunk"),
    [
        (0, 6, 3, 0.3, "euclidean", 256),
        (1, 5, 2, 0.3, "cosine", 7),
        (2, 9, 1, 0.0, "euclidean", 3),
        (3, 4, 4, 0.6, "cosine", 256),
    ],
)
def test_matches_dense_reference(seed, k1, k2, lam, metric, chunk):
    qf, gf = clustered_features(seed)
    ref = reference_rerank(qf, gf, k1, k2, lam, metric)
    out = k_reciprocal_rerank(
        qf, gf, k1=k1, k2=k2, lambda_value=lam, metric=metric, chunk_size=chunk
    )
    assert out.shape == (8, 30) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    # Re-ranking changes the distances (the Jaccard term is not a no-op) ...
    base = compute_distance(qf, gf, metric)
    assert np.abs(out - base / base.max()).max() > 1e-2


def test_duplicate_items_keep_themselves_first():
    qf, gf = clustered_features(5, nq=4, ng=12)
    gf[3] = qf[0]  # an exact duplicate of a query in the gallery
    ref = reference_rerank(qf, gf, 4, 2, 0.3, "euclidean")
    out = k_reciprocal_rerank(qf, gf, k1=4, k2=2, lambda_value=0.3)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_lambda_one_returns_scaled_original_distance():
    qf, gf = clustered_features(4)
    pooled = np.concatenate([qf, gf])
    dmax = compute_distance(pooled, pooled).max()
    out = k_reciprocal_rerank(torch.from_numpy(qf), torch.from_numpy(gf), lambda_value=1.0, k1=5)
    np.testing.assert_allclose(out, compute_distance(qf, gf) / dmax, rtol=1e-6, atol=1e-6)


def test_shapes_and_range():
    qf, gf = clustered_features(6, nq=3, ng=11)
    out = k_reciprocal_rerank(qf, gf, k1=5, k2=2)
    assert out.shape == (3, 11)
    assert np.all(out >= 0) and np.all(out <= 1 + 1e-6)


def test_validation_errors():
    qf, gf = clustered_features(7, nq=2, ng=5)
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

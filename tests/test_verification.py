"""TPR@FPR checked against a brute-force reference written from the definition."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from esreid.metrics import compute_distance, tpr_at_fpr, tpr_at_fpr_features
from esreid.metrics.verification import _allowed_negatives


def reference_pairs(distmat, q_pids, g_pids, q_camids, g_camids):
    """Positive and negative pair distances, one pair at a time (Market protocol)."""
    pos, neg = [], []
    for i in range(distmat.shape[0]):
        if q_pids[i] == -1:
            continue
        for j in range(distmat.shape[1]):
            if g_pids[j] == -1:
                continue
            if g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i]:
                continue
            (pos if g_pids[j] == q_pids[i] else neg).append(float(distmat[i, j]))
    return np.array(pos), np.array(neg)


def reference_tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fprs):
    """Enumerate every operating point (each distinct distance, plus accept nothing)."""
    pos, neg = reference_pairs(distmat, q_pids, g_pids, q_camids, g_camids)
    everything = np.concatenate([pos, neg])
    nothing = float(np.nextafter(everything.min(), -np.inf))
    points = []  # (threshold, tpr, fpr)
    for t in [nothing, *np.unique(everything).tolist()]:
        points.append((t, np.sum(pos <= t) / len(pos), np.sum(neg <= t) / len(neg)))
    out = {}
    for f in fprs:
        allowed = [p for p in points if p[2] <= f]
        best = max(p[1] for p in allowed)
        t, tpr, _ = min((p for p in allowed if p[1] == best), key=lambda p: (p[2], p[0]))
        out[float(f)] = (float(tpr), float(t))
    return out


def random_problem(seed):
    """Small labelled problem with junk, distractors, same-camera matches and many ties."""
    rng = np.random.default_rng(seed)
    nq, ng = int(rng.integers(3, 15)), int(rng.integers(10, 60))
    num_ids = int(rng.integers(2, 6))
    g_pids = rng.integers(-1, num_ids + 1, size=ng)  # -1 junk, 0 distractor, 1.. identities
    g_camids = rng.integers(0, 3, size=ng)
    q_pids = rng.integers(1, num_ids + 2, size=nq)  # ids above num_ids have no gallery match
    q_pids[0] = 1
    g_pids[:2], g_camids[:2] = 1, (1, 2)  # guarantees one positive and one negative pair
    g_pids[2] = 0
    q_camids = rng.integers(0, 3, size=nq)
    q_camids[0] = 0
    if seed % 5 == 4:
        q_pids[-1] = -1  # a junk query: all of its pairs are left out
    if seed % 3 == 2:
        distmat = rng.random((nq, ng)).astype(np.float32)
    else:
        # Integer distances: heavy ties within and across positives and negatives.
        distmat = rng.integers(0, int(rng.integers(2, 12)), size=(nq, ng)).astype(np.float32)
    return distmat, q_pids, g_pids, q_camids, g_camids


def targets_for(seed, num_neg):
    """Two target sets: small ones (few negatives kept, so the streaming selection re-runs
    often) and a mix; both hit the bound exactly (j / N) and fall between counts."""
    rng = np.random.default_rng(1000 + seed)
    small = [j / num_neg for j in range(1, 4)] + [1.5 / num_neg, 1e-4]
    exact = [j / num_neg for j in rng.integers(1, num_neg + 1, size=3)]
    return small, [*exact, float(rng.uniform(1e-3, 1.0)), 1e-4, 0.5, 1.0]


@pytest.mark.parametrize("seed", range(50))
def test_matches_brute_force_reference(seed):
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(seed)
    _, neg = reference_pairs(distmat, q_pids, g_pids, q_camids, g_camids)
    for fprs in targets_for(seed, len(neg)):
        expected = reference_tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fprs)
        # Chunk sizes of 1 and 3 force many re-selections of the smallest negatives.
        for chunk_size in (1, 3, 256):
            got = tpr_at_fpr(
                distmat, q_pids, g_pids, q_camids, g_camids, fprs=fprs, chunk_size=chunk_size
            )
            assert got == expected, (chunk_size, got, expected)


def test_hand_computed_example():
    # Query A: pid 1, cam 0.  Query B: pid 2, cam 1.
    # Gallery: g0 pid 1 cam 1 | g1 pid 1 cam 0 | g2 pid 2 cam 0 | g3 pid 0 cam 0 (distractor)
    #          g4 pid -1 (junk) | g5 pid 3 cam 1.
    # A: g0 positive 0.1, g1 same id + camera (left out), g2 neg 0.3, g3 neg 0.2, g4 junk,
    #    g5 neg 0.5.
    # B: g0 neg 0.4, g1 neg 0.6, g2 positive 0.2, g3 neg 0.3, g4 junk, g5 neg 0.2.
    # Positives {0.1, 0.2}: P = 2. Negatives {0.2, 0.2, 0.3, 0.3, 0.4, 0.5, 0.6}: N = 7.
    # Operating points (threshold: TPR, FPR): nothing 0, 0 | 0.1: 1/2, 0 | 0.2: 1, 2/7 |
    #   0.3: 1, 4/7 | 0.4: 1, 5/7 | 0.5: 1, 6/7 | 0.6: 1, 1.
    # FPR <= 0.1 or <= 1/7: best is 0.1 (TPR 1/2); the positive tied with a negative at 0.2
    # cannot be taken alone. FPR <= 2/7: TPR 1 at 0.2. FPR <= 1: TPR 1, and 0.2 is the
    # smallest threshold reaching it.
    distmat = np.array(
        [[0.1, 0.0, 0.3, 0.2, 0.0, 0.5], [0.4, 0.6, 0.2, 0.3, 0.1, 0.2]], dtype=np.float64
    )
    q_pids, q_camids = [1, 2], [0, 1]
    g_pids, g_camids = [1, 1, 2, 0, -1, 3], [1, 0, 0, 0, 1, 1]
    got = tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fprs=(0.1, 1 / 7, 2 / 7, 1.0))
    assert got == {0.1: (0.5, 0.1), 1 / 7: (0.5, 0.1), 2 / 7: (1.0, 0.2), 1.0: (1.0, 0.2)}


def test_accept_nothing_is_just_below_the_smallest_distance_and_json_safe():
    # One query: negative at 0.1, positive at 0.2. FPR <= 0.5 with N = 1 allows no negative,
    # so nothing can be accepted: TPR 0 at the largest float below 0.1.
    got = tpr_at_fpr(np.array([[0.1, 0.2]]), [1], [2, 1], [0], [0, 1], fprs=(0.5,))
    tpr, threshold = got[0.5]
    assert tpr == 0.0
    assert threshold == np.nextafter(0.1, -np.inf) and threshold < 0.1
    assert json.loads(json.dumps(got, allow_nan=False)) == {"0.5": [0.0, threshold]}


def test_junk_same_camera_and_junk_queries_are_left_out():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(7)
    fprs = (0.05, 0.2, 1.0)
    base = tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fprs=fprs)
    ignored = (g_pids[None, :] == -1) | (
        (g_pids[None, :] == q_pids[:, None]) & (g_camids[None, :] == q_camids[:, None])
    )
    assert ignored.any()
    for value in (-5.0, 0.0, 100.0):
        moved = np.where(ignored, value, distmat).astype(np.float32)
        assert tpr_at_fpr(moved, q_pids, g_pids, q_camids, g_camids, fprs=fprs) == base
    # An extra junk query row, whatever its distances, changes nothing.
    extra = np.vstack([distmat, np.full((1, distmat.shape[1]), -3.0, dtype=np.float32)])
    got = tpr_at_fpr(extra, [*q_pids, -1], g_pids, [*q_camids, 0], g_camids, fprs=fprs)
    assert got == base


def test_distractors_count_as_negatives():
    # Gallery: positive (pid 1, other camera) at 0.5 and two distractors (pid 0) at 0.1, 0.9.
    distmat = np.array([[0.5, 0.1, 0.9]])
    args = ([1], [1, 0, 0], [0], [1, 0, 0])
    # N = 2: FPR <= 0.5 allows the 0.1 distractor, so the positive at 0.5 is reachable.
    assert tpr_at_fpr(distmat, *args, fprs=(0.5, 0.4)) == {
        0.5: (1.0, 0.5),
        0.4: (0.0, float(np.nextafter(0.1, -np.inf))),
    }
    # The same distractors also make distractor-only negatives legal (no error).
    assert tpr_at_fpr(distmat, *args, fprs=(1.0,)) == {1.0: (1.0, 0.5)}


def test_full_fpr_accepts_every_positive_at_the_largest_positive_distance():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(3)
    pos, _ = reference_pairs(distmat, q_pids, g_pids, q_camids, g_camids)
    assert tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fprs=(1.0,)) == {
        1.0: (1.0, float(pos.max()))
    }
    # When the farthest pair is a positive, that threshold is the maximum distance.
    distmat = np.array([[0.3, 0.1, 0.2]])
    got = tpr_at_fpr(distmat, [1], [1, 2, 3], [0], [1, 0, 0], fprs=(1.0,))
    assert got == {1.0: (1.0, float(distmat.max()))}


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [1, 7, 256])
def test_features_equal_dense(metric, chunk_size):
    rng = np.random.default_rng(11)
    nq, ng, dim = 40, 300, 16
    q_pids = rng.integers(1, 12, size=nq)
    g_pids = rng.integers(-1, 12, size=ng)
    q_camids, g_camids = rng.integers(0, 4, size=nq), rng.integers(0, 4, size=ng)
    centres = rng.standard_normal((12, dim))
    qf = (centres[q_pids % 12] + rng.standard_normal((nq, dim))).astype(np.float32)
    gf = (centres[g_pids % 12] + rng.standard_normal((ng, dim))).astype(np.float32)
    fprs = (1e-3, 1e-2, 0.1, 1.0)
    labels = (q_pids, g_pids, q_camids, g_camids)
    streamed = tpr_at_fpr_features(qf, gf, *labels, metric=metric, fprs=fprs, chunk_size=chunk_size)
    dist = compute_distance(qf, gf, metric, chunk_size=chunk_size)
    assert streamed == tpr_at_fpr(dist, *labels, fprs=fprs)
    assert streamed == reference_tpr_at_fpr(dist, *labels, fprs)
    assert tpr_at_fpr(torch.from_numpy(dist), *labels, fprs=fprs) == streamed
    assert 0.0 < streamed[0.1][0] <= streamed[1.0][0] == 1.0


def test_integer_distances_and_default_targets():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(0)
    as_int = distmat.astype(np.int64)
    got = tpr_at_fpr(as_int, q_pids, g_pids, q_camids, g_camids)
    assert list(got) == [1e-4, 1e-3, 1e-2]
    assert got == reference_tpr_at_fpr(as_int, q_pids, g_pids, q_camids, g_camids, got)


def test_allowed_negatives_follows_float_comparison():
    assert 0.29 * 100 < 29 and _allowed_negatives(0.29, 100) == 29
    for n in (1, 7, 100, 958_000_000):
        for f in (1e-4, 1e-3, 1e-2, 0.29, 1 / 3, 1.0):
            m = _allowed_negatives(f, n)
            assert m / n <= f and (m == n or (m + 1) / n > f)


def test_errors():
    d = np.array([[0.1, 0.2]])
    ok = ([1], [1, 2], [0], [1, 0])
    with pytest.raises(ValueError, match="no positive pairs"):
        tpr_at_fpr(d, [1], [2, 1], [0], [0, 0])  # the only match shares the query's camera
    with pytest.raises(ValueError, match="no negative pairs"):
        tpr_at_fpr(d, [1], [1, -1], [0], [1, 0])  # the only other item is junk
    with pytest.raises(ValueError, match="q_pids has 2 entries but there are 1 queries"):
        tpr_at_fpr(d, [1, 2], [1, 2], [0, 0], [1, 0])
    with pytest.raises(ValueError, match="g_camids has 3 entries but there are 2 gallery"):
        tpr_at_fpr(d, [1], [1, 2], [0], [1, 0, 0])
    with pytest.raises(ValueError, match="distmat must be 2-D"):
        tpr_at_fpr(np.array([0.1, 0.2]), *ok)
    with pytest.raises(ValueError, match="NaN"):
        tpr_at_fpr(np.array([[0.1, math.nan]]), *ok)
    with pytest.raises(ValueError, match="same feature dimension"):
        tpr_at_fpr_features(np.zeros((1, 4)), np.ones((2, 5)), *ok)
    with pytest.raises(ValueError, match="unknown metric"):
        tpr_at_fpr_features(np.zeros((1, 4)), np.ones((2, 4)), *ok, metric="l1")
    for bad in [(0.0,), (1.5,), (-0.1,), (math.nan,), (1e-3, 2.0)]:
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
            tpr_at_fpr(d, *ok, fprs=bad)
    with pytest.raises(ValueError, match="at least one target"):
        tpr_at_fpr(d, *ok, fprs=())
    with pytest.raises(ValueError, match="sequence of numbers"):
        tpr_at_fpr(d, *ok, fprs=0.01)
    with pytest.raises(ValueError, match="must hold numbers"):
        tpr_at_fpr(d, *ok, fprs=("0.01",))
    with pytest.raises(ValueError, match="chunk_size"):
        tpr_at_fpr(d, *ok, chunk_size=0)

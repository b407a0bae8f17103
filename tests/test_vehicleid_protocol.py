"""VehicleID protocol: random one-per-identity galleries, rank-k averaged over draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esreid.metrics import evaluate_vehicleid, vehicleid_draw

# Three identities with 1-D features; identity 2 has a single image (always gallery).
PIDS = np.array([0, 0, 0, 1, 1, 2])
FEATS = np.array([[0.0], [0.1], [0.2], [1.0], [1.3], [0.15]], dtype=np.float32)

# Worked out by hand for every possible gallery: (gallery image of id 0, of id 1) ->
# (rank-1, mAP). Example, gallery {0.0, 1.0, 0.15}: query 0.1 is closer to 0.15 (id 2) than
# to 0.0 -> rank 2; query 0.2 likewise rank 2; query 1.3 -> rank 1. rank-1 = 1/3,
# AP = 1/rank -> mAP = (1/2 + 1/2 + 1) / 3.
HAND = {
    (0, 3): (1 / 3, 2 / 3),
    (0, 4): (1 / 3, 2 / 3),
    (1, 3): (2 / 3, 5 / 6),  # queries 0.0 -> 1, 0.2 -> 2, 1.3 -> 1
    (1, 4): (2 / 3, 5 / 6),
    (2, 3): (1 / 3, 2 / 3),  # queries 0.0 -> 2 (0.15 is nearer), 0.1 -> 2, 1.3 -> 1
    (2, 4): (1 / 3, 2 / 3),
}


def test_hand_built_draws_mean_and_std():
    res = evaluate_vehicleid(FEATS, PIDS, num_draws=6, seed=3)
    expected_r1, expected_map = [], []
    for d, draw in enumerate(res["draws"]):
        mask = vehicleid_draw(PIDS, 3 + d)
        a = int(np.flatnonzero(mask[:3])[0])
        b = 3 + int(np.flatnonzero(mask[3:5])[0])
        r1, ap = HAND[(a, b)]
        assert draw["seed"] == 3 + d
        assert draw["rank1"] == pytest.approx(r1)
        assert draw["rank5"] == 1.0  # only three gallery images
        assert draw["mAP"] == pytest.approx(ap)
        assert (draw["num_query"], draw["num_gallery"]) == (3, 3)
        expected_r1.append(r1)
        expected_map.append(ap)
    assert len(set(expected_r1)) == 2  # the draws really differ
    assert res["rank1"] == pytest.approx(np.mean(expected_r1))
    assert res["rank1_std"] == pytest.approx(np.std(expected_r1))
    assert res["mAP"] == pytest.approx(np.mean(expected_map))
    assert res["mAP_std"] == pytest.approx(np.std(expected_map))
    assert res["rank5"] == 1.0 and res["rank5_std"] == 0.0
    assert res["num_draws"] == 6 and len(res["draws"]) == 6


def test_one_gallery_image_per_identity_and_single_image_ids_in_gallery():
    rng = np.random.default_rng(0)
    pids = rng.integers(0, 40, size=300)
    pids[:3] = [100, 101, 102]  # identities with one image each
    for seed in range(5):
        mask = vehicleid_draw(pids, seed)
        gallery_ids = pids[mask]
        assert len(gallery_ids) == len(np.unique(gallery_ids)) == len(np.unique(pids))
        assert mask[:3].all()
    for seed in range(5):
        assert vehicleid_draw(PIDS, seed)[5]


def reference_draw(features, pids, mask, ranks):
    """rank-k and mAP of one draw by brute force (no camera filtering, one positive each)."""
    q_idx, g_idx = np.flatnonzero(~mask), np.flatnonzero(mask)
    first = []
    for i in q_idx:
        dists = [np.linalg.norm(features[i] - features[g]) for g in g_idx]
        order = sorted(range(len(g_idx)), key=lambda k: (dists[k], k))
        first.append(1 + [pids[g_idx[k]] for k in order].index(pids[i]))
    first = np.array(first)
    out = {f"rank{k}": float(np.mean(first <= k)) for k in ranks}
    out["mAP"] = float(np.mean(1.0 / first))
    return out


def test_matches_brute_force_on_random_features():
    rng = np.random.default_rng(1)
    pids = rng.integers(0, 25, size=120)
    feats = rng.normal(size=(25, 8))[pids] + rng.normal(size=(120, 8)) * 1.5
    res = evaluate_vehicleid(torch.from_numpy(feats), torch.from_numpy(pids), num_draws=3, seed=11)
    for d, draw in enumerate(res["draws"]):
        ref = reference_draw(feats, pids, vehicleid_draw(pids, 11 + d), (1, 5))
        for key in ("rank1", "rank5", "mAP"):
            assert draw[key] == pytest.approx(ref[key], abs=1e-9)
    assert 0 < res["rank1"] < res["rank5"] < 1


def test_seed_determinism_and_different_seeds():
    rng = np.random.default_rng(2)
    pids = rng.integers(0, 30, size=150)
    feats = rng.normal(size=(150, 4))
    a = evaluate_vehicleid(feats, pids, num_draws=2, seed=5)
    b = evaluate_vehicleid(feats, pids, num_draws=2, seed=5)
    c = evaluate_vehicleid(feats, pids, num_draws=2, seed=6)
    assert a == b
    assert not np.array_equal(vehicleid_draw(pids, 5), vehicleid_draw(pids, 6))
    assert a["draws"][0] != c["draws"][0]
    # Draw 1 of seed 5 is draw 0 of seed 6.
    assert {k: v for k, v in a["draws"][1].items()} == c["draws"][0]


def test_custom_ranks_and_errors():
    res = evaluate_vehicleid(FEATS, PIDS, num_draws=2, ranks=(1, 2))
    assert "rank2" in res and "rank2_std" in res and "rank5" not in res
    with pytest.raises(ValueError, match="num_draws must be a positive integer, got 0"):
        evaluate_vehicleid(FEATS, PIDS, num_draws=0)
    with pytest.raises(ValueError, match=r"^pids must have one entry per feature row \(6\), got 5$"):
        evaluate_vehicleid(FEATS, PIDS[:5])
    with pytest.raises(ValueError, match=r"^pids must be 1-D, got shape \(2, 3\)$"):
        evaluate_vehicleid(FEATS, PIDS.reshape(2, 3))
    with pytest.raises(ValueError, match="ranks must be a non-empty sequence of positive integers"):
        evaluate_vehicleid(FEATS, PIDS, ranks=(0, 5))
    with pytest.raises(ValueError, match="^every identity has a single image, so no image is left as a query$"):
        evaluate_vehicleid(FEATS[:1], PIDS[:1])
    with pytest.raises(ValueError, match=r"^features must be a 2-D \[num_items, feature_dim\] array"):
        evaluate_vehicleid(FEATS[:, 0], PIDS)
    for bad in (True, 2.5, -1):
        with pytest.raises(ValueError, match="^num_draws must be a positive integer"):
            evaluate_vehicleid(FEATS, PIDS, num_draws=bad)
    for bad in ((True,), (1.5,), ()):
        with pytest.raises(ValueError, match="^ranks must be a non-empty sequence of positive integers"):
            evaluate_vehicleid(FEATS, PIDS, ranks=bad)


def test_defaults_are_ten_draws_from_seed_zero_and_one_draw_is_allowed():
    res = evaluate_vehicleid(FEATS, PIDS)
    assert res["num_draws"] == 10
    assert [d["seed"] for d in res["draws"]] == list(range(10))
    one = evaluate_vehicleid(FEATS, PIDS, num_draws=1, seed=4)
    assert one["num_draws"] == 1 and one["rank1_std"] == 0.0
    assert one["draws"][0] == res["draws"][4]


def test_draw_picks_uniformly_within_each_identity_in_index_order():
    """The published protocol's draw, written out: identities in ascending order, one
    uniform number each from ``default_rng(seed)``, the pick counted in index order."""
    rng = np.random.default_rng(7)
    pids = rng.integers(0, 40, size=400)  # long enough that an unstable sort reorders ties
    for seed in range(3):
        u = np.random.default_rng(seed).random(len(np.unique(pids)))
        expected = np.zeros(len(pids), dtype=bool)
        for r, pid in zip(u, np.unique(pids)):
            members = np.flatnonzero(pids == pid)
            expected[members[int(r * len(members))]] = True
        np.testing.assert_array_equal(vehicleid_draw(pids, seed), expected)


def test_metric_and_large_ranks_reach_the_evaluation():
    rng = np.random.default_rng(3)
    pids = np.repeat(np.arange(120), 2)
    # Norms vary a lot, so cosine and Euclidean rankings differ.
    feats = (rng.normal(size=(120, 6))[pids] + rng.normal(size=(240, 6))) * rng.uniform(
        0.1, 10.0, size=(240, 1))
    for metric in ("euclidean", "cosine"):
        res = evaluate_vehicleid(feats, pids, num_draws=1, metric=metric, ranks=(1, 60, 100))
        ref = reference_draw(feats / np.linalg.norm(feats, axis=1, keepdims=True)
                             if metric == "cosine" else feats,
                             pids, vehicleid_draw(pids, 0), (1, 60, 100))
        for key in ("rank1", "rank60", "rank100", "mAP"):
            assert res[key] == pytest.approx(ref[key], abs=1e-9), (metric, key)
    assert evaluate_vehicleid(feats, pids, num_draws=1, metric="cosine")["rank1"] != \
        evaluate_vehicleid(feats, pids, num_draws=1)["rank1"]

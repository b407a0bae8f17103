"""VehicleID evaluation protocol: one random gallery image per identity, the rest queries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from esreid.metrics.distance import ArrayLike, as_feature_tensor, as_labels, check_metric
from esreid.metrics.ranking import evaluate_features


def vehicleid_draw(pids: np.ndarray, seed: int) -> np.ndarray:
    """Pick one gallery image per identity for one draw of the VehicleID protocol.

    Takes the test images' identities (any integer array) and a seed; returns a boolean
    mask, True for the images that form the gallery of this draw (exactly one per identity).
    Identities with a single image end up in the gallery with no query of their own.
    """
    pids = np.asarray(pids)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(pids), dtype=bool)
    order = np.argsort(pids, kind="stable")
    uniq, starts, counts = np.unique(pids[order], return_index=True, return_counts=True)
    picks = starts + (rng.random(len(uniq)) * counts).astype(np.int64)
    mask[order[picks]] = True
    return mask


def _check_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    """``ranks`` as a tuple of positive ints, else ValueError."""
    out = tuple(ranks)
    if not out or any(
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in out
    ):
        raise ValueError(f"ranks must be a non-empty sequence of positive integers, got {ranks!r}")
    return tuple(int(k) for k in out)


def evaluate_vehicleid(
    features: ArrayLike,
    pids: Sequence[int] | ArrayLike,
    num_draws: int = 10,
    seed: int = 0,
    metric: str = "euclidean",
    ranks: Sequence[int] = (1, 5),
) -> dict:
    """VehicleID protocol: ``num_draws`` random galleries of one image per identity.

    Takes the test subset's features [n, d] and identities [n]. Draw ``d`` uses
    ``vehicleid_draw(pids, seed + d)``; the images left out of the gallery are the queries
    and no camera filtering applies (every query gets camera 0 and every gallery image
    camera 1, so ``evaluate_rank``'s same-camera rule never fires). Returns a dict with
    ``rank{k}`` and ``rank{k}_std`` for each k in ``ranks``, ``mAP`` and ``mAP_std``
    (means and population standard deviations, ddof=0, over draws), ``draws`` (one dict per
    draw with its ``seed``, ``rank{k}``, ``mAP``, ``num_query``, ``num_gallery``) and
    ``num_draws``.
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) or num_draws < 1:
        raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
    ranks = _check_ranks(ranks)
    check_metric(metric)
    feats = as_feature_tensor(features, "features")
    pid_arr = as_labels(pids, "pids")
    if len(pid_arr) != feats.shape[0]:
        raise ValueError(
            f"pids must have one entry per feature row ({feats.shape[0]}), got {len(pid_arr)}"
        )
    draws = []
    for d in range(int(num_draws)):
        gallery = vehicleid_draw(pid_arr, seed + d)
        q_idx, g_idx = np.flatnonzero(~gallery), np.flatnonzero(gallery)
        if q_idx.size == 0:
            raise ValueError("every identity has a single image, so no image is left as a query")
        res = evaluate_features(
            # A CPU index tensor selects rows of a tensor on any device.
            feats[torch.from_numpy(q_idx)],
            feats[torch.from_numpy(g_idx)],
            pid_arr[q_idx],
            pid_arr[g_idx],
            np.zeros(q_idx.size, dtype=np.int64),
            np.ones(g_idx.size, dtype=np.int64),
            metric=metric,
            max_rank=max(ranks),
        )
        draw = {"seed": seed + d}
        draw.update({f"rank{k}": float(res.cmc[k - 1]) for k in ranks})
        draw.update(mAP=res.mAP, num_query=int(q_idx.size), num_gallery=int(g_idx.size))
        draws.append(draw)
    out: dict = {}
    for key in [f"rank{k}" for k in ranks] + ["mAP"]:
        values = np.array([draw[key] for draw in draws])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std())
    out["draws"] = draws
    out["num_draws"] = int(num_draws)
    return out

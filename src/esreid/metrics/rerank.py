"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), sparse and chunked.

Conventions (the paper leaves them open; the tests follow the same ones):

* All queries and gallery items are pooled into one set of N items; every item's ranking
  list runs over all N items, the item itself first, then ascending distance, ties broken
  by pooled index (queries first, then gallery). ``N(i, k)`` is the first k entries of that
  list, so it holds i and its k - 1 nearest other items.
* ``d`` is the metric's distance (as in ``compute_distance``, but computed in float64 so
  that near-duplicates are not blurred by float32 cancellation) divided by its largest
  value over all pooled pairs, so it lies in [0, 1]; an item's distance to itself is 0. The
  returned matrix mixes this scaled ``d``: ``lambda_value=1`` returns ``d`` for the
  query-gallery block.
* ``R(i, k) = {j in N(i, k) : i in N(j, k)}``. The expanded set ``R*(i)`` adds
  ``R(q, ceil(k1 / 2))`` for every ``q in R(i, k1)`` with
  ``|R(i, k1) & R(q, ceil(k1 / 2))| >= 2/3 |R(q, ceil(k1 / 2))|``.
* ``V[i, j] = exp(-d(i, j))`` for ``j in R*(i)``, else 0. Local query expansion replaces
  every row (queries and gallery alike, since each pooled item is a probe in turn) by the
  mean of the rows of ``N(i, k2)``.
* Jaccard distance ``d_J(i, j) = 1 - sum_k min(V[i,k], V[j,k]) / sum_k max(V[i,k], V[j,k])``
  and the result is ``(1 - lambda) * d_J + lambda * d``.

Memory: neighbours come from distance blocks of ``chunk_size`` rows, V is kept as sorted
(row, column, weight) arrays, and the Jaccard numerators are accumulated through an
inverted index over the gallery rows of V; nothing of size N x N is ever built.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from esreid.metrics.distance import (
    ArrayLike,
    as_feature_tensor,
    check_chunk_size,
    check_metric,
    distance_blocks,
)

# Elements per temporary in the vectorised steps (about 8 MB of int64).
_WORK_ELEMS = 1 << 20


def _check_k(value: int, name: str, num_items: int) -> int:
    """``value`` as an int if 1 <= value <= num_items, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > num_items:
        raise ValueError(
            f"{name} (={value}) must not exceed the number of query + gallery items ({num_items})"
        )
    return int(value)


def _stable_topk(block: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest entries of each row, ordered by (value, index)."""
    part = np.argpartition(block, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(block, part, axis=1)
    kth = vals.max(axis=1)
    ambiguous = np.flatnonzero(np.count_nonzero(block <= kth[:, None], axis=1) > k)
    # Ties straddling the k-th place: argpartition picks arbitrarily, so redo those rows.
    for r in ambiguous:
        cand = np.flatnonzero(block[r] <= kth[r])
        part[r] = cand[np.argsort(block[r, cand], kind="stable")[:k]]
        vals[r] = block[r, part[r]]
    order = np.lexsort((part, vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _neighbours_and_distances(
    feats: torch.Tensor, nq: int, k: int, metric: str, chunk_size: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Ranking-list heads ``[N, k]``, the raw query-gallery block (float32) and the largest
    pooled distance."""
    n = feats.shape[0]
    nbrs = np.empty((n, k), dtype=np.int64)
    d_qg = np.empty((nq, n - nq), dtype=np.float32)
    dmax = 0.0
    for start, block in distance_blocks(feats, feats, metric, chunk_size, dtype=torch.float64):
        rows = block.shape[0]
        dmax = max(dmax, float(block.max()))
        if start < nq:
            nrow_q = min(rows, nq - start)
            d_qg[start : start + nrow_q] = block[:nrow_q, nq:]
        # The item itself heads its own list even when a duplicate sits at distance 0.
        block[np.arange(rows), start + np.arange(rows)] = -np.inf
        nbrs[start : start + rows] = _stable_topk(block, k)
    return nbrs, d_qg, dmax


def _reciprocal_mask(nbrs: np.ndarray, k: int) -> np.ndarray:
    """``mask[i, a]``: is ``nbrs[i, a]`` (a < k) a k-reciprocal neighbour of i."""
    n = nbrs.shape[0]
    head = nbrs[:, :k]
    mask = np.empty((n, k), dtype=bool)
    step = max(1, _WORK_ELEMS // (k * k))
    for s in range(0, n, step):
        rows = np.arange(s, min(n, s + step))
        mask[rows] = (head[head[rows]] == rows[:, None, None]).any(axis=2)
    return mask


def _expanded_sets(nbrs: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) with j in R*(i), as sorted, duplicate-free row and column arrays."""
    n = nbrs.shape[0]
    kh = (k1 + 1) // 2
    r_full = np.where(_reciprocal_mask(nbrs, k1), nbrs[:, :k1], -1)
    r_half = np.where(_reciprocal_mask(nbrs, kh), nbrs[:, :kh], -1)
    half_size = np.count_nonzero(r_half >= 0, axis=1)
    keys = []
    step = max(1, _WORK_ELEMS // (k1 * kh * k1))
    for s in range(0, n, step):
        rows = np.arange(s, min(n, s + step))
        cand = r_full[rows]  # [c, k1], -1 padded
        cand_ok = cand >= 0
        cand_half = r_half[np.where(cand_ok, cand, 0)]  # [c, k1, kh]
        in_r = (cand_half[..., None] == cand[:, None, None, :]).any(axis=3) & (cand_half >= 0)
        overlap = np.count_nonzero(in_r, axis=2)
        # Integer form of |R(i) & R(q, k1/2)| >= 2/3 |R(q, k1/2)|.
        take = cand_ok & (3 * overlap >= 2 * half_size[np.where(cand_ok, cand, 0)])
        added = np.where(take[..., None], cand_half, -1).reshape(len(rows), -1)
        members = np.concatenate([cand, added], axis=1)
        owner = np.broadcast_to(rows[:, None], members.shape)
        ok = members >= 0
        keys.append(np.unique(owner[ok] * n + members[ok]))
    key = np.concatenate(keys)
    return key // n, key % n


def _pair_distances(
    feats: torch.Tensor, rows: np.ndarray, cols: np.ndarray, metric: str
) -> np.ndarray:
    """Float64 distances between the listed item pairs, computed directly from the features."""
    f = feats
    if metric == "cosine":
        f = F.normalize(f, dim=1)
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, _WORK_ELEMS // max(1, f.shape[1]))
    for s in range(0, len(rows), step):
        a = f[torch.from_numpy(rows[s : s + step])]
        b = f[torch.from_numpy(cols[s : s + step])]
        if metric == "cosine":
            d = 1.0 - (a * b).sum(dim=1)
        else:
            d = (a - b).norm(dim=1)
        out[s : s + step] = d.cpu().numpy()
    out[rows == cols] = 0.0
    return out


def _row_pointer(rows: np.ndarray, n: int) -> np.ndarray:
    """CSR row pointer of sorted row indices."""
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=ptr[1:])
    return ptr


def _gather_ranges(ptr: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated positions ``ptr[w] .. ptr[w+1]-1`` for each w, and the source slot of each."""
    lengths = ptr[which + 1] - ptr[which]
    slot = np.repeat(np.arange(len(which)), lengths)
    out_start = np.cumsum(lengths) - lengths
    return np.repeat(ptr[which] - out_start, lengths) + np.arange(len(slot)), slot


def _query_expansion(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, nbrs: np.ndarray, k2: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse V with each row replaced by the mean of the rows of N(i, k2)."""
    n = nbrs.shape[0]
    if k2 == 1:
        return rows, cols, vals
    ptr = _row_pointer(rows, n)
    out_r, out_c, out_v = [], [], []
    avg_nnz = max(1, len(rows) // n)
    step = max(1, _WORK_ELEMS // (k2 * avg_nnz))
    for s in range(0, n, step):
        dest = np.arange(s, min(n, s + step))
        src = nbrs[dest, :k2].ravel()
        pos, slot = _gather_ranges(ptr, src)
        key = dest[slot // k2] * n + cols[pos]
        uniq, inverse = np.unique(key, return_inverse=True)
        out_r.append(uniq // n)
        out_c.append(uniq % n)
        out_v.append(np.bincount(inverse, weights=vals[pos], minlength=len(uniq)) / k2)
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)


def _jaccard_into(
    out: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    nq: int,
    lambda_value: float,
    chunk_size: int,
) -> None:
    """Overwrite ``out`` (scaled d, [nq, ng]) with ``(1 - lambda) * d_J + lambda * d``."""
    n = nq + out.shape[1]
    ng = out.shape[1]
    sums = np.bincount(rows, weights=vals, minlength=n)
    ptr = _row_pointer(rows, n)
    # Inverted index: for every pooled column j, the gallery rows with V[g, j] > 0.
    g_sel = rows >= nq
    g_order = np.argsort(cols[g_sel], kind="stable")
    inv_rows = (rows[g_sel] - nq)[g_order]
    inv_vals = vals[g_sel][g_order]
    inv_ptr = _row_pointer(cols[g_sel][g_order], n)
    step = max(1, min(chunk_size, _WORK_ELEMS // ng))
    for s in range(0, nq, step):
        q = np.arange(s, min(nq, s + step))
        qpos, qslot = _gather_ranges(ptr, q)
        gpos, gslot = _gather_ranges(inv_ptr, cols[qpos])
        mins = np.minimum(vals[qpos][gslot], inv_vals[gpos])
        flat = qslot[gslot] * ng + inv_rows[gpos]
        shared = np.bincount(flat, weights=mins, minlength=len(q) * ng).reshape(len(q), ng)
        union = sums[q][:, None] + sums[nq:][None, :] - shared
        d_j = 1.0 - shared / union
        out[q] = (1.0 - lambda_value) * d_j + lambda_value * out[q]


def k_reciprocal_rerank(
    qf: ArrayLike,
    gf: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    chunk_size: int = 256,
) -> np.ndarray:
    """Re-ranked query-gallery distances by k-reciprocal encoding (Zhong et al., 2017).

    Takes query features [nq, d] and gallery features [ng, d] (numpy or torch), the
    neighbourhood sizes ``k1`` (k-reciprocal sets) and ``k2`` (local query expansion), the
    mixing weight ``lambda_value`` in [0, 1] and the base ``metric``; returns the float32
    [nq, ng] matrix ``(1 - lambda) * d_Jaccard + lambda * d`` where ``d`` is the metric's
    distance scaled by its largest pooled value (see the module docstring for every
    convention). ``chunk_size`` bounds the rows of each distance block.
    """
    check_metric(metric)
    chunk_size = check_chunk_size(chunk_size)
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, (int, float, np.floating)):
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    q = as_feature_tensor(qf, "qf", torch.float64)
    g = as_feature_tensor(gf, "gf", torch.float64).to(q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"qf and gf must have the same feature dimension, got {q.shape[1]} and {g.shape[1]}"
        )
    nq, ng = q.shape[0], g.shape[0]
    if nq == 0 or ng == 0:
        raise ValueError(
            f"qf and gf must both be non-empty, got {nq} queries and {ng} gallery items"
        )
    n = nq + ng
    k1 = _check_k(k1, "k1", n)
    k2 = _check_k(k2, "k2", n)
    feats = torch.cat([q, g]).double()
    nbrs, d_qg, dmax = _neighbours_and_distances(feats, nq, max(k1, k2), metric, chunk_size)
    scale = 1.0 / dmax if dmax > 0 else 1.0
    d_qg *= scale
    if lambda_value == 1:
        return d_qg
    rows, cols = _expanded_sets(nbrs, k1)
    vals = np.exp(-_pair_distances(feats, rows, cols, metric) * scale)
    rows, cols, vals = _query_expansion(rows, cols, vals, nbrs, k2)
    _jaccard_into(d_qg, rows, cols, vals, nq, float(lambda_value), chunk_size)
    return d_qg

"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as the reference code computes it.

Every published "+re-ranking" figure comes from the authors' ``re_ranking(q_g_dist, q_q_dist,
g_g_dist, k1, k2, lambda_value)`` (copied by torchreid, fast-reid and the Bag-of-Tricks
baseline). ``k_reciprocal_rerank`` returns what that function returns when given the pooled
distances below, up to float32 rounding. Its conventions:

* Queries and gallery items are pooled into one set of N items, queries first. ``D(i, j)`` is
  the squared Euclidean distance of the features; for ``metric="cosine"`` that of the
  L2-normalised features, i.e. ``2 - 2 cos``. ``d(i, j) = D(i, j) / max_k D(i, k)``: the
  reference divides every column of the pooled matrix by its maximum and transposes, which
  for a symmetric D scales each item's row by its own largest distance. A row that is all
  zero (every item identical) stays zero, where the reference divides 0 by 0.
* Item i's ranking list orders all N items by ``d(i, .)``. Ties go to the lower pooled index,
  the order a stable argsort gives (the reference's argsort leaves it open); the item itself
  is not moved to the front, so an identical item with a lower index precedes it.
* ``R(i, k)`` holds the items j among the first k entries of i's list whose own first k
  entries contain i. The k-reciprocal set is ``R(i, k1 + 1)``; every member c of it adds
  ``R(c, round(k1 / 2) + 1)`` (half to even, like numpy's ``around``) when strictly more than
  2/3 of that set lies in ``R(i, k1 + 1)``.
* ``V[i, j] = exp(-d(i, j))`` over the expanded set, divided by the row's sum. When k2 > 1,
  local query expansion replaces every row by the mean of the rows of the first k2 entries
  of the item's list (the reference skips it for k2 = 1, where that entry need not be i).
* Jaccard distance ``1 - m / (2 - m)`` with ``m = sum_k min(V[q, k], V[g, k])``, and the
  result ``(1 - lambda) * jaccard + lambda * d`` on the query-gallery block.

What differs from the reference is how it is computed, never what. Distances come from
float64 matrix products (the reference holds float32), and exact duplicates among the
features (for cosine: vectors that normalise to the same one) share one computed row, so
their ties are exact ties, as they are in the reference. Neighbours come from distance blocks
of ``chunk_size`` distinct items against all items; V is kept as sorted (row, column, weight)
arrays; the Jaccard sums are accumulated through an inverted index over the gallery rows of
V; the query-gallery distances are computed again, block by block, for the final mix. Beside
the float32 result nothing of size N x N or nq x ng is held (the reference's N x N
matrices do not fit in memory at MSMT17 size).
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
    if k >= block.shape[1]:
        return np.argsort(block, axis=1, kind="stable")
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


def _distinct_items(feats: torch.Tensor, metric: str) -> tuple[torch.Tensor, np.ndarray]:
    """The distinct vectors the distances are taken between and each pooled item's row among
    them (pooled order itself when all items are distinct)."""
    uniq, inverse = torch.unique(feats, dim=0, return_inverse=True)
    if metric == "cosine":
        uniq = F.normalize(uniq, dim=1)
        # x and 2x normalise to the same bits: they are duplicates for this metric.
        uniq, inverse2 = torch.unique(uniq, dim=0, return_inverse=True)
        inverse = inverse2[inverse]
    if uniq.shape[0] == feats.shape[0]:
        # All distinct: pooled order spares the column gather in every block.
        return uniq[inverse], np.arange(feats.shape[0])
    return uniq, inverse.cpu().numpy()


def _sq_distance_rows(uniq: torch.Tensor, sq: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """Squared distances [len(rows), U] (float64) from the distinct items ``rows`` to all of
    them; exactly 0 from an item to itself."""
    idx = torch.from_numpy(rows).to(uniq.device)
    block = torch.addmm(sq, uniq[idx], uniq.t(), alpha=-2.0).add_(sq[idx, None])
    # |a|^2 + |b|^2 - 2 a.b dips below zero by rounding for near neighbours.
    block.clamp_min_(0.0)
    block[torch.arange(len(rows), device=block.device), idx] = 0.0
    return block.cpu().numpy()


def _scaled_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``block`` divided in place by each row's maximum (rows of zeros left alone), and that
    divisor."""
    scale = block.max(axis=1)
    scale[scale <= 0] = 1.0
    # Division, not a multiplication by the reciprocal: the reference divides, and the two
    # round differently, which can make or break ties.
    block /= scale[:, None]
    return block, scale


def _ranking_heads(
    uniq: torch.Tensor, group: np.ndarray, k: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """First k entries of every pooled item's ranking list ``[N, k]``, and each distinct
    item's row divisor ``[U]``."""
    nu, n = uniq.shape[0], len(group)
    sq = (uniq * uniq).sum(dim=1)
    heads = np.empty((nu, k), dtype=np.int64)
    scale = np.empty(nu, dtype=np.float64)
    for start in range(0, nu, chunk_size):
        rows = np.arange(start, min(nu, start + chunk_size))
        block = _sq_distance_rows(uniq, sq, rows)
        if nu != n:
            block = block[:, group]
        block, scale[rows] = _scaled_rows(block)
        heads[rows] = _stable_topk(block, k)
    return heads[group], scale


def _reciprocal_mask(nbrs: np.ndarray, k: int) -> np.ndarray:
    """``mask[i, a]``: does ``nbrs[i, a]`` (a < k) hold i among the first k entries of its
    own list."""
    n = nbrs.shape[0]
    head = nbrs[:, :k]
    mask = np.empty((n, k), dtype=bool)
    step = max(1, _WORK_ELEMS // (k * k))
    for s in range(0, n, step):
        rows = np.arange(s, min(n, s + step))
        mask[rows] = (head[head[rows]] == rows[:, None, None]).any(axis=2)
    return mask


def _expanded_sets(nbrs: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) with j in the expanded k-reciprocal set of i, as sorted, duplicate-free
    row and column arrays."""
    n = nbrs.shape[0]
    kf = min(k1 + 1, n)
    kh = min(round(k1 / 2) + 1, n)
    r_full = np.where(_reciprocal_mask(nbrs, kf), nbrs[:, :kf], -1)
    r_half = np.where(_reciprocal_mask(nbrs, kh), nbrs[:, :kh], -1)
    half_size = np.count_nonzero(r_half >= 0, axis=1)
    keys = []
    step = max(1, _WORK_ELEMS // (kf * kh * kf))
    for s in range(0, n, step):
        rows = np.arange(s, min(n, s + step))
        cand = r_full[rows]  # [c, kf], -1 padded
        cand_ok = cand >= 0
        cand_half = r_half[np.where(cand_ok, cand, 0)]  # [c, kf, kh]
        in_r = (cand_half[..., None] == cand[:, None, None, :]).any(axis=3) & (cand_half >= 0)
        overlap = np.count_nonzero(in_r, axis=2)
        # Integer form of |R(c) & R(i)| > 2/3 |R(c)| (equal to the float test for any size).
        take = cand_ok & (3 * overlap > 2 * half_size[np.where(cand_ok, cand, 0)])
        added = np.where(take[..., None], cand_half, -1).reshape(len(rows), -1)
        members = np.concatenate([cand, added], axis=1)
        owner = np.broadcast_to(rows[:, None], members.shape)
        ok = members >= 0
        keys.append(np.unique(owner[ok] * n + members[ok]))
    key = np.concatenate(keys)
    return key // n, key % n


def _pair_sq_distances(uniq: torch.Tensor, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Float64 squared distances between distinct items ``a[t]`` and ``b[t]``, from the
    differences (exactly 0 for an item and itself)."""
    out = np.empty(len(a), dtype=np.float64)
    step = max(1, _WORK_ELEMS // max(1, uniq.shape[1]))
    for s in range(0, len(a), step):
        ia = torch.from_numpy(a[s : s + step]).to(uniq.device)
        ib = torch.from_numpy(b[s : s + step]).to(uniq.device)
        out[s : s + step] = (uniq[ia] - uniq[ib]).square().sum(dim=1).cpu().numpy()
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
    """Sparse V with each row replaced by the mean of the rows of the first k2 entries of
    the item's list."""
    n = nbrs.shape[0]
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


def _encoding(
    uniq: torch.Tensor, group: np.ndarray, k1: int, k2: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse V after local query expansion, as (row, column, weight) arrays sorted by
    row then column."""
    n = len(group)
    nbrs, scale = _ranking_heads(uniq, group, min(max(k1 + 1, k2), n), chunk_size)
    rows, cols = _expanded_sets(nbrs, k1)
    gr = group[rows]
    vals = np.exp(-_pair_sq_distances(uniq, gr, group[cols]) / scale[gr])
    vals /= np.bincount(rows, weights=vals, minlength=n)[rows]
    if k2 != 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, nbrs, k2)
    return rows, cols, vals


def _rerank_into(
    out: np.ndarray,
    uniq: torch.Tensor,
    group: np.ndarray,
    encoding: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    lambda_value: float,
    chunk_size: int,
) -> None:
    """Fill ``out`` [nq, ng] with ``(1 - lambda) * jaccard + lambda * d`` (just d without an
    encoding), block by block of queries."""
    nq, ng = out.shape
    n = nq + ng
    sq = (uniq * uniq).sum(dim=1)
    g_group = group[nq:]
    if encoding is not None:
        rows, cols, vals = encoding
        ptr = _row_pointer(rows, n)
        # Inverted index: for every pooled column j, the gallery rows g with V[g, j] > 0.
        g_sel = rows >= nq
        g_order = np.argsort(cols[g_sel], kind="stable")
        inv_rows = (rows[g_sel] - nq)[g_order]
        inv_vals = vals[g_sel][g_order]
        inv_ptr = _row_pointer(cols[g_sel][g_order], n)
    step = max(1, _WORK_ELEMS // ng)
    for start in range(0, nq, chunk_size):
        qs = np.arange(start, min(nq, start + chunk_size))
        d = _scaled_rows(_sq_distance_rows(uniq, sq, group[qs]))[0][:, g_group]
        if encoding is None:
            out[qs] = d
            continue
        for s in range(0, len(qs), step):
            q = qs[s : s + step]
            qpos, qslot = _gather_ranges(ptr, q)
            gpos, gslot = _gather_ranges(inv_ptr, cols[qpos])
            mins = np.minimum(vals[qpos][gslot], inv_vals[gpos])
            flat = qslot[gslot] * ng + inv_rows[gpos]
            m = np.bincount(flat, weights=mins, minlength=len(q) * ng).reshape(len(q), ng)
            jaccard = 1.0 - m / (2.0 - m)
            out[q] = (1.0 - lambda_value) * jaccard + lambda_value * d[s : s + step]


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
    [nq, ng] matrix the reference ``re_ranking`` gives for the pooled squared distances:
    ``(1 - lambda) * d_Jaccard + lambda * d`` where ``d`` is the squared distance divided
    by the query's largest pooled one (the module docstring states every convention).
    ``chunk_size`` bounds the rows of each distance block.
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
    uniq, group = _distinct_items(torch.cat([q, g]), metric)
    del q, g
    encoding = None if lambda_value == 1 else _encoding(uniq, group, k1, k2, chunk_size)
    out = np.empty((nq, ng), dtype=np.float32)
    _rerank_into(out, uniq, group, encoding, float(lambda_value), chunk_size)
    return out

"""Exact distances for a few gallery rows, and how far a float32 scan's scores can be from them.

Search ranks with the distances :func:`esreid.metrics.compute_distance` defines (cosine:
``1 - cos`` after L2-normalising with ``F.normalize``'s ``max(norm, 1e-12)``, so an all-zero
vector has similarity 0; euclidean: the plain L2 distance). A scan of the whole gallery
(faiss, or one BLAS matrix product) runs in float32 with a summation order, and so a
rounding, of its own, which can swap near-ties. The index therefore uses the scan only to
find candidates, recomputes their distances here in float64 (rounded once to float32, so
duplicated rows give identical distances wherever they sit) and checks with
:func:`scan_error_bound` that no row the scan left out can belong in the top k.

Values come in two forms: a *key* (float64; cosine: ``1 - cos``; euclidean: the squared
distance) in which the bounds are expressed, and the reported float32 *distance*.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: The metrics of :mod:`esreid.metrics.distance`, named here so that search never imports
#: torch (a search server holding descriptors needs neither it nor its memory).
METRICS = ("euclidean", "cosine")
#: ``F.normalize``'s floor on the norm: vectors shorter than this are divided by it instead.
NORM_EPS = 1e-12
#: Unit roundoff of float32.
UNIT_ROUNDOFF = 2.0 ** -24
#: Rows converted to float64 at a time, so a wide candidate set or a large batch added never
#: needs a float64 copy of itself (64 MB at most for 4096-d descriptors).
CHUNK_ROWS = 2048


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is a supported distance name, else raise ValueError naming it."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


def gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: a float32 sum or dot product of ``n`` terms,
    in any summation order, is within ``gamma_n * sum(|terms|)`` of the exact value."""
    nu = n * UNIT_ROUNDOFF
    if nu >= 0.5:
        raise ValueError(f"descriptors of {n} dimensions are too long for a float32 error bound")
    return nu / (1.0 - nu)


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norms of the rows of ``x``, in float64 (computed row by row with the same loop,
    so equal rows get bit-identical norms)."""
    x64 = np.asarray(x, dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", x64, x64))


def normalize64(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by ``max(norm, 1e-12)``, in float64 (``F.normalize``'s rule)."""
    x64 = np.asarray(x, dtype=np.float64)
    return x64 / np.maximum(row_norms(x64), NORM_EPS)[:, None]


def scan_norms(x: np.ndarray) -> np.ndarray:
    """Row norms (float64) of float32 rows without a float64 copy of them, for the scans:
    faster than :func:`row_norms`, but not guaranteed bit-identical for equal rows."""
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def faiss_vectors(x: np.ndarray, metric: str, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 rows a scan uses for ``x``: divided by their norm (``max(norm, 1e-12)``,
    rounded to float32; each component is then within two roundings of the exact unit
    vector's) for cosine, where faiss ranks by inner product; ``x`` itself for euclidean.
    ``out`` (float32, ``x``'s shape) receives the cosine rows when given."""
    check_metric(metric)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "euclidean":
        return x
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], CHUNK_ROWS):
        chunk = x[start:start + CHUNK_ROWS]
        norms = np.maximum(scan_norms(chunk), NORM_EPS).astype(np.float32)
        np.divide(chunk, norms[:, None], out=out[start:start + CHUNK_ROWS])
    return out


def exact_keys(query: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """Keys (float64: ``1 - cos`` or the squared L2 distance) of one query ``[D]`` against
    ``rows`` ``[C, D]``, computed in float64 one row at a time with the same loop."""
    q64 = np.asarray(query, dtype=np.float64)
    if metric == "cosine":
        q64 = q64 / max(float(np.sqrt(np.dot(q64, q64))), NORM_EPS)
    out = np.empty(rows.shape[0], dtype=np.float64)
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        chunk = rows[start:start + CHUNK_ROWS]
        if metric == "cosine":
            # einsum, not BLAS: BLAS kernels treat the last few rows of a block differently,
            # which could give two equal rows distances one float32 step apart.
            out[start:start + chunk.shape[0]] = 1.0 - np.einsum("ij,j->i", normalize64(chunk), q64)
        else:
            diff = np.asarray(chunk, dtype=np.float64) - q64
            out[start:start + chunk.shape[0]] = np.einsum("ij,ij->i", diff, diff)
    return out


def keys_to_distances(keys: np.ndarray, metric: str) -> np.ndarray:
    """Reported float32 distances for float64 keys (the square root for euclidean)."""
    if metric == "cosine":
        return keys.astype(np.float32)
    return np.sqrt(np.maximum(keys, 0.0)).astype(np.float32)


def faiss_keys(scores: np.ndarray, metric: str) -> np.ndarray:
    """faiss's float32 results as keys: inner products become ``1 - ip``; squared L2
    distances stay as they are."""
    scores = np.asarray(scores, dtype=np.float64)
    return 1.0 - scores if metric == "cosine" else scores


def scan_keys(queries: np.ndarray, rows: np.ndarray, row_norms64: np.ndarray, metric: str
              ) -> np.ndarray:
    """Approximate keys ``[Q, N]`` (float64) of float32 queries against float32 ``rows`` with
    one float32 matrix product (BLAS) and the rows' float64 norms: no normalised copy of
    the rows is needed. Within :func:`scan_error_bound` of :func:`exact_keys`."""
    if metric == "cosine":
        dots = faiss_vectors(queries, metric) @ rows.T
        return 1.0 - dots / np.maximum(row_norms64, NORM_EPS)
    dots = queries @ rows.T
    q_sq = row_norms(queries) ** 2
    return (row_norms64 ** 2)[None, :] + q_sq[:, None] - 2.0 * dots


def scan_error_bound(metric: str, dim: int, query_norm: float, max_row_norm: float) -> float:
    """The largest possible gap between a float32 scan's key for a gallery row and the exact
    key, whatever the summation order (faiss's SIMD loops, BLAS).

    Cosine: an inner product in float32 of a float32 unit query with float32 unit rows
    (faiss) or with the raw rows then divided by their float64 norms (the numpy scan): each
    unit vector's components are within two roundings of the exact ones (``4u`` on a
    product), and the sum within ``gamma_D`` since ``sum |q_i g_i| <= 1``. Euclidean: summing squared differences
    and ``|q|^2 + |g|^2 - 2 q.g`` both stay within ``gamma_(D+3) (|q| + |g|)^2``;
    ``max_row_norm`` bounds ``|g|`` for the rows the scan did not return.
    """
    tiny = 1e-30  # float32 underflow, negligible but not zero
    if metric == "cosine":
        return gamma(dim) * (1.0 + 8 * UNIT_ROUNDOFF) + 6 * UNIT_ROUNDOFF + tiny
    # The norms themselves were rounded once more; 1e-6 covers it with room to spare.
    scale = (query_norm + max_row_norm) * (1.0 + 1e-6)
    return gamma(dim + 3) * scale * scale + tiny


def key_slack(key: float, metric: str) -> float:
    """How much larger than ``key`` a key must be to round to a strictly larger float32
    distance, with room for the float64 rounding of the keys themselves."""
    # 2^-19 relative is 4 float32 steps of the key (2 of a euclidean distance, its root).
    absolute = 1e-11 if metric == "cosine" else 1e-30
    return abs(key) * 2.0 ** -19 + absolute


#: Extra candidates asked of the scan beyond ``top_k`` (at least ``top_k`` more): enough
#: that the exactness check almost never needs a second pass over the gallery.
CANDIDATE_MARGIN = 16


def top_positions(idx: np.ndarray, keys: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Positions (into ``idx``) of the ``k`` best, sorted by (float32 distance, gallery
    position): evaluation's stable order."""
    return np.lexsort((idx, keys_to_distances(keys, metric)))[:k]


def exact_top_k(q: np.ndarray, top_k: int, *, metric: str, total: int,
                scan: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                rows: Callable[[np.ndarray], np.ndarray],
                within: Callable[[np.ndarray, float], np.ndarray],
                first: Callable[[int], np.ndarray],
                bound: Callable[[float], float] | None, margin: int = CANDIDATE_MARGIN
                ) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``top_k`` of each query ``[Q, D]`` among ``total`` searchable rows, from a
    backend's float32 scan; returns gallery positions (int64) and distances (float32), both
    ``[Q, min(top_k, total)]``, padded with -1 and inf where an approximate scan finds fewer.

    The backend gives: ``scan(q, n)``, its ``n`` best rows per query as approximate float64
    keys and positions (``[Q, n]``, -1 where it finds fewer); ``rows(positions)``, the stored
    float32 descriptors; ``within(query, radius)``, every position whose scanned key is at
    most ``radius``; ``first(k)``, the first ``k`` searchable positions in gallery order; and
    ``bound(query_norm)``, how far its scan's keys can be from the exact ones (None for an
    approximate backend, whose candidates are rescored but not completed). The scan is asked
    for ``top_k + max(top_k, margin)`` rows: a coarser scan (a larger bound) asks for more,
    so that the second pass stays rare. Candidates are
    rescored in float64 (:func:`exact_keys`); when a row the scan left out could tie or beat
    the k-th, every row within the bound is taken, which is then provably all of them.
    """
    k = min(top_k, total)
    out_idx = np.full((q.shape[0], k), -1, dtype=np.int64)
    out_dist = np.full((q.shape[0], k), np.inf, dtype=np.float32)
    if k == 0 or q.shape[0] == 0:
        return out_idx, out_dist
    n_cand = min(total, k + max(k, margin))
    approx, cand = scan(q, n_cand)
    q_norms = row_norms(q)
    for i in range(q.shape[0]):
        if metric == "cosine" and q_norms[i] == 0.0:
            # An all-zero query is at distance exactly 1 from everything: the order is the
            # gallery order, and the scan's arbitrary order of ties need not be checked.
            out_idx[i], out_dist[i] = first(k), 1.0
            continue
        keep = cand[i] >= 0
        found, scanned = cand[i][keep], approx[i][keep]
        keys = exact_keys(q[i], rows(found), metric)
        top = top_positions(found, keys, k, metric)
        if bound is not None and len(top) and len(found) < total:
            worst = float(keys[top].max())
            slack = key_slack(worst, metric)
            margin = bound(float(q_norms[i]))
            if float(scanned.max()) - margin <= worst + slack:
                found = np.union1d(found, within(q[i], worst + slack + margin))
                keys = exact_keys(q[i], rows(found), metric)
                top = top_positions(found, keys, k, metric)
        out_idx[i, :len(top)] = found[top]
        out_dist[i, :len(top)] = keys_to_distances(keys[top], metric)
    return out_idx, out_dist

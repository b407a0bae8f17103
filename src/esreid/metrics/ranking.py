"""CMC, mAP and mINP under the Market-1501 protocol, exact and memory-bounded.

Every figure is a function of the ranks of a query's positives among its *valid* gallery
items, so no full argsort is ever built. For one query row ``d`` with positives sorted by
(distance, gallery index), the rank of positive ``j`` is::

    1 + #{valid k : d[k] < d[p_j]} + #{valid k < p_j : d[k] == d[p_j]}

which is exactly its 1-based position in a stable ascending sort of the valid items. Only
items no farther than the hardest positive can precede a positive, so each row sorts just
those (for a trained model, a small head of the gallery) and counts with ``searchsorted``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from esreid.metrics.distance import (
    ArrayLike,
    as_labels,
    check_chunk_size,
    check_metric,
    distance_blocks,
)

JUNK_PID = -1


@dataclass(frozen=True)
class RankResult:
    """Evaluation figures of one query set against one gallery.

    ``cmc[k]`` is the fraction of valid queries whose first true match is within the top
    ``k + 1``; ``mAP`` and ``mINP`` are means over valid queries, in [0, 1]. Queries with no
    valid gallery match are left out of every figure and counted in ``num_skipped``.
    Supports ``result["mAP"]``, ``result["cmc"]`` and ``result["rank5"]`` style access.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_skipped: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain-Python summary: rank1/rank5/rank10 (those within ``len(cmc)``), mAP, mINP, counts."""
        out: dict[str, float | int] = {}
        for k in (1, 5, 10):
            if k <= len(self.cmc):
                out[f"rank{k}"] = float(self.cmc[k - 1])
        out["mAP"] = float(self.mAP)
        out["mINP"] = float(self.mINP)
        out["num_valid"] = int(self.num_valid)
        out["num_skipped"] = int(self.num_skipped)
        return out

    def __getitem__(self, key: str) -> np.ndarray | float | int:
        """Field by name (``cmc``, ``mAP``, ``mINP``, ``num_valid``, ``num_skipped``) or ``rankK``."""
        if key in ("cmc", "mAP", "mINP", "num_valid", "num_skipped"):
            return getattr(self, key)
        if key.startswith("rank") and key[4:].isdigit() and 1 <= int(key[4:]) <= len(self.cmc):
            return float(self.cmc[int(key[4:]) - 1])
        raise KeyError(
            f"RankResult has no entry {key!r}; use cmc, mAP, mINP, num_valid, num_skipped "
            f"or rank1..rank{len(self.cmc)}"
        )


def as_distmat(distmat: ArrayLike) -> np.ndarray | torch.Tensor:
    """A 2-D distance matrix (numpy array or detached tensor); ValueError otherwise."""
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach()
    elif not isinstance(distmat, np.ndarray):
        distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(
            f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(distmat.shape)}"
        )
    return distmat


def _check_max_rank(max_rank: int) -> int:
    """``max_rank`` as an int if positive, else ValueError."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    return int(max_rank)


def _check_lengths(nq: int, ng: int, labels: dict[str, np.ndarray]) -> None:
    """Raise ValueError when a label array's length disagrees with the query/gallery count."""
    for name, arr in labels.items():
        expected, side = (nq, "queries") if name.startswith("q_") else (ng, "gallery items")
        if len(arr) != expected:
            raise ValueError(f"{name} has {len(arr)} entries but there are {expected} {side}")


class MarketGallery:
    """The Market protocol's view of a gallery: items grouped by identity plus the junk
    columns, for per-query look-ups (evaluation, verification and explanations share it)."""

    def __init__(self, g_pids: np.ndarray, g_camids: np.ndarray) -> None:
        self.g_camids = g_camids
        self.junk = np.flatnonzero(g_pids == JUNK_PID)
        # A stable argsort keeps each identity's gallery indices ascending.
        order = np.argsort(g_pids, kind="stable")
        uniq, starts, counts = np.unique(g_pids[order], return_index=True, return_counts=True)
        self._groups = {
            int(p): order[s : s + c] for p, s, c in zip(uniq, starts, counts, strict=True)
        }
        self._empty = np.empty(0, dtype=np.int64)

    def group(self, pid: int) -> np.ndarray:
        """Ascending gallery indices of identity ``pid`` (empty for junk or unseen ids)."""
        if pid == JUNK_PID:
            return self._empty
        return self._groups.get(pid, self._empty)

    def split(self, pid: int, cam: int) -> tuple[np.ndarray, np.ndarray]:
        """Market protocol for one query: ``(positives, same_camera)`` gallery indices.

        Positives share the query's identity but not its camera; ``same_camera`` items share
        both and are ignored, as are the ``junk`` columns. Every other item is a negative.
        """
        grp = self.group(pid)
        same_cam = self.g_camids[grp] == cam
        return grp[~same_cam], grp[same_cam]

    def valid_mask(self, pid: int, cam: int) -> np.ndarray:
        """Boolean mask of the gallery items a query of ``pid`` seen by ``cam`` is ranked
        against: everything but junk and the query identity's same-camera items."""
        mask = np.ones(len(self.g_camids), dtype=bool)
        mask[self.junk] = False
        mask[self.split(pid, cam)[1]] = False
        return mask


def _positive_ranks(d: np.ndarray, qpid: int, qcam: int, index: MarketGallery) -> np.ndarray | None:
    """Sorted 1-based ranks of one query's positives among its valid gallery items.

    ``d`` is the query's distance row. Returns None when the query has no valid positive.
    """
    pos, same_cam = index.split(qpid, qcam)
    if pos.size == 0:
        return None
    t = d[pos]
    order = np.argsort(t, kind="stable")
    t, pos = t[order], pos[order]
    valid = d <= t[-1]
    if index.junk.size:
        valid[index.junk] = False
    valid[same_cam] = False
    head = d[valid]
    head.sort()
    lo = np.searchsorted(head, t, side="left")
    hi = np.searchsorted(head, t, side="right")
    ranks = lo.astype(np.int64) + 1
    # Equal distances: valid items with a smaller gallery index come first (stable order).
    for j in np.flatnonzero(hi - lo > 1):
        p = pos[j]
        ranks[j] += np.count_nonzero(valid[:p] & (d[:p] == t[j]))
    return ranks


@dataclass
class _Accumulator:
    """Per-query figures gathered chunk by chunk."""

    first: list[int]
    ap: list[float]
    inp: list[float]
    skipped: int = 0

    def add_block(
        self, block: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray, index: MarketGallery
    ) -> None:
        """Rank every query row of ``block`` and record its first-hit rank, AP and INP."""
        if block.dtype.kind not in "iuf":
            raise ValueError(f"distmat must hold real numbers, got dtype {block.dtype}")
        if block.dtype.kind == "f" and np.isnan(block).any():
            raise ValueError("distmat contains NaN values")
        for r in range(block.shape[0]):
            ranks = _positive_ranks(block[r], int(q_pids[r]), int(q_camids[r]), index)
            if ranks is None:
                self.skipped += 1
                continue
            n = ranks.size
            self.first.append(int(ranks[0]))
            self.ap.append(float(np.mean(np.arange(1, n + 1) / ranks)))
            self.inp.append(n / float(ranks[-1]))

    def result(self, max_rank: int, num_queries: int) -> RankResult:
        """Fold the gathered figures into a RankResult; ValueError if no query was valid."""
        num_valid = len(self.first)
        if num_valid == 0:
            raise ValueError(
                f"no query has a valid gallery match (all {num_queries} queries skipped); "
                "check that query and gallery pids overlap across cameras"
            )
        first = np.minimum(np.asarray(self.first, dtype=np.int64), max_rank + 1)
        hits = np.bincount(first, minlength=max_rank + 2)[1 : max_rank + 1]
        cmc = np.cumsum(hits).astype(np.float64) / num_valid
        return RankResult(
            cmc=cmc,
            mAP=float(np.mean(self.ap)),
            mINP=float(np.mean(self.inp)),
            num_valid=num_valid,
            num_skipped=self.skipped,
        )


def _distmat_blocks(distmat: ArrayLike, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows)`` numpy blocks of a numpy or torch distance matrix."""
    for start in range(0, distmat.shape[0], chunk_size):
        block = distmat[start : start + chunk_size]
        if isinstance(block, torch.Tensor):
            # numpy has no bfloat16; widening keeps every value (and every tie) exact.
            if block.dtype == torch.bfloat16:
                block = block.float()
            block = block.detach().cpu().numpy()
        yield start, block


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: Iterable[int] | ArrayLike,
    g_pids: Iterable[int] | ArrayLike,
    q_camids: Iterable[int] | ArrayLike,
    g_camids: Iterable[int] | ArrayLike,
    max_rank: int = 50,
    chunk_size: int = 256,
) -> RankResult:
    """CMC, mAP and mINP of a [num_query, num_gallery] distance matrix (Market-1501 protocol).

    For each query, gallery items with its pid *and* camera are ignored, as are gallery
    items with pid -1 (junk); pid 0 distractors are ordinary negatives. Items are ranked by
    ascending distance, ties broken by gallery index. AP = (1/npos) sum_j j / rank_j over the
    query's positives; INP = npos / rank of the hardest positive (Ye et al.). Queries without
    any valid positive are skipped and counted. Works on ``chunk_size`` query rows at a time
    and never sorts a whole row, so extra memory is O(chunk_size x num_gallery).
    Returns a RankResult with ``cmc`` of length ``max_rank``.
    """
    max_rank = _check_max_rank(max_rank)
    chunk_size = check_chunk_size(chunk_size)
    distmat = as_distmat(distmat)
    if isinstance(distmat, np.ndarray) and distmat.dtype.kind not in "iuf":
        raise ValueError(f"distmat must hold real numbers, got dtype {distmat.dtype}")
    nq, ng = int(distmat.shape[0]), int(distmat.shape[1])
    labels = _labels(q_pids, g_pids, q_camids, g_camids)
    _check_lengths(nq, ng, labels)
    return _evaluate_blocks(_distmat_blocks(distmat, chunk_size), labels, max_rank, nq)


def evaluate_features(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: Iterable[int] | ArrayLike,
    g_pids: Iterable[int] | ArrayLike,
    q_camids: Iterable[int] | ArrayLike,
    g_camids: Iterable[int] | ArrayLike,
    metric: str = "euclidean",
    max_rank: int = 50,
    chunk_size: int = 256,
) -> RankResult:
    """Like ``evaluate_rank`` but from features: distances are computed ``chunk_size`` queries
    at a time (see ``compute_distance``) and never held as a full matrix.

    Takes query features [nq, d], gallery features [ng, d] (numpy or torch) and the labels;
    returns a RankResult equal to ``evaluate_rank(compute_distance(qf, gf, metric), ...)``.
    """
    check_metric(metric)
    max_rank = _check_max_rank(max_rank)
    chunk_size = check_chunk_size(chunk_size)
    nq, ng = len(qf), len(gf)
    labels = _labels(q_pids, g_pids, q_camids, g_camids)
    _check_lengths(nq, ng, labels)
    blocks = distance_blocks(qf, gf, metric, chunk_size)
    return _evaluate_blocks(blocks, labels, max_rank, nq)


Labels = Iterable[int] | ArrayLike


def _labels(
    q_pids: Labels, g_pids: Labels, q_camids: Labels, g_camids: Labels
) -> dict[str, np.ndarray]:
    """Validated int64 label arrays keyed by argument name."""
    return {
        "q_pids": as_labels(q_pids, "q_pids"),
        "g_pids": as_labels(g_pids, "g_pids"),
        "q_camids": as_labels(q_camids, "q_camids"),
        "g_camids": as_labels(g_camids, "g_camids"),
    }


def _evaluate_blocks(
    blocks: Iterator[tuple[int, np.ndarray]],
    labels: dict[str, np.ndarray],
    max_rank: int,
    nq: int,
) -> RankResult:
    """Run the per-query ranking over row blocks and fold the result."""
    index = MarketGallery(labels["g_pids"], labels["g_camids"])
    acc = _Accumulator(first=[], ap=[], inp=[])
    for start, block in blocks:
        stop = start + block.shape[0]
        acc.add_block(block, labels["q_pids"][start:stop], labels["q_camids"][start:stop], index)
    return acc.result(max_rank, nq)

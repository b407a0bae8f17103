"""Verification figures: true-positive rate at fixed false-positive rates (TPR@FPR).

Every query-gallery pair of the Market protocol is one verification trial: gallery junk
(pid -1) and same-identity-same-camera pairs are left out (the pairs CMC/mAP ignore, see
``MarketGallery.split``), and so are all pairs of a junk query. Same identity = positive,
different identity = negative (pid 0 distractors are negatives). A pair is accepted when its
distance is <= the threshold.

The result is exact without holding all pairs. The positive and negative counts ``P`` and
``N`` follow from the labels alone. For a target FPR ``f`` let ``m`` be the largest count
with ``m / N <= f``. A threshold is allowed iff it accepts at most ``m`` negatives, i.e. iff
it is below ``b``, the (m+1)-th smallest negative distance (tied negatives share one
operating point, so a tie at ``b`` is excluded as a whole). TPR grows with the threshold, so
the best allowed TPR counts the positives below ``b``, and the smallest threshold reaching it
is the largest of those positives. Only the ``k = max(m) + 1`` smallest negatives are ever
needed: they are kept as a running partial selection, and a positive can only matter while it
is below the current k-th smallest negative. Memory is O(k + chunk x num_gallery); k is about
1% of the negatives for a 1e-2 target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from esreid.metrics.distance import ArrayLike, check_chunk_size, check_metric, distance_blocks
from esreid.metrics.ranking import (
    JUNK_PID,
    Labels,
    MarketGallery,
    _check_lengths,
    _distmat_blocks,
    _labels,
    as_distmat,
)

DEFAULT_FPRS = (1e-4, 1e-3, 1e-2)
_NUMBER = (int, float, np.integer, np.floating)



class NoPairsError(ValueError):
    """The labels give no positive or no negative pair, so TPR or FPR is undefined."""

def _check_fprs(fprs: Iterable[float]) -> list[float]:
    """Target FPRs as floats, each in (0, 1]; ValueError otherwise."""
    try:
        values = list(fprs)
    except TypeError:
        raise ValueError(
            f"fprs must be a sequence of numbers in (0, 1], e.g. (1e-3, 1e-2); got {fprs!r}"
        ) from None
    if not values:
        raise ValueError("fprs must hold at least one target false-positive rate")
    out = []
    for f in values:
        if isinstance(f, (bool, np.bool_)) or not isinstance(f, _NUMBER):
            raise ValueError(f"fprs must hold numbers in (0, 1], got {f!r}")
        f = float(f)
        if not 0.0 < f <= 1.0:  # NaN fails this too
            raise ValueError(f"every target FPR must lie in (0, 1], got {f!r}")
        out.append(f)
    return out


def _allowed_negatives(fpr: float, num_neg: int) -> int:
    """The largest count ``m`` in [0, num_neg] with ``m / num_neg <= fpr`` in float arithmetic.

    ``floor(fpr * num_neg)`` alone can be one off (0.29 * 100 = 28.999...), and the reported
    FPR of a point is the float ``m / num_neg``, so the comparison itself decides.
    """
    m = min(num_neg, math.floor(fpr * num_neg))
    while m < num_neg and (m + 1) / num_neg <= fpr:
        m += 1
    while m > 0 and m / num_neg > fpr:
        m -= 1
    return m


class _TprAtFpr:
    """Pair statistics gathered block by block of query rows; exact TPR@FPR at the end."""

    def __init__(self, labels: dict[str, np.ndarray], fprs: list[float]) -> None:
        self.q_pids, self.q_camids = labels["q_pids"], labels["q_camids"]
        self.index = MarketGallery(labels["g_pids"], labels["g_camids"])
        self.fprs = fprs
        num_valid = len(labels["g_pids"]) - len(self.index.junk)
        self.num_pos = self.num_neg = 0
        for pid, cam in zip(self.q_pids.tolist(), self.q_camids.tolist(), strict=True):
            if pid == JUNK_PID:
                continue
            pos, same_cam = self.index.split(pid, cam)
            self.num_pos += pos.size
            self.num_neg += num_valid - pos.size - same_cam.size
        if self.num_pos == 0:
            raise NoPairsError(
                "no positive pairs: no query shares its pid with a non-junk gallery item from "
                "another camera, so TPR is undefined; check that query and gallery pids overlap"
            )
        if self.num_neg == 0:
            raise NoPairsError(
                "no negative pairs: every valid query-gallery pair has the same identity, "
                "so FPR is undefined; the gallery needs other identities or distractors (pid 0)"
            )
        self.allowed = [_allowed_negatives(f, self.num_neg) for f in fprs]
        # At least one negative is kept so the "accept nothing" threshold knows the minimum.
        self.k = max([m + 1 for m in self.allowed if m < self.num_neg], default=1)
        self.neg_parts: list[np.ndarray] = []
        self.neg_held = 0
        self.full = False  # True once k negatives are held; `bound` is then the k-th smallest
        self.bound = math.inf
        self.pos_parts: list[np.ndarray] = []
        self.pos_min = math.inf
        self.pos_max = -math.inf

    def add_block(self, start: int, block: np.ndarray) -> None:
        """Take the distances of queries ``start .. start + len(block) - 1``."""
        if block.dtype.kind not in "iuf":
            raise ValueError(f"distmat must hold real numbers, got dtype {block.dtype}")
        if block.dtype.kind == "f":
            if np.isnan(block).any():
                raise ValueError("distmat contains NaN values")
        else:
            # Thresholds are reported as floats; float64 holds integer distances exactly.
            block = block.astype(np.float64)
        # Before k negatives are held nothing may be dropped (`< inf` would drop +inf).
        cand = block < self.bound if self.full else np.ones(block.shape, dtype=bool)
        if self.index.junk.size:
            cand[:, self.index.junk] = False
        for r in range(block.shape[0]):
            pid, cam = int(self.q_pids[start + r]), int(self.q_camids[start + r])
            if pid == JUNK_PID:
                cand[r] = False
                continue
            pos, same_cam = self.index.split(pid, cam)
            cand[r, pos] = False
            cand[r, same_cam] = False
            if pos.size:
                d = block[r, pos]
                self.pos_min = min(self.pos_min, float(d.min()))
                self.pos_max = max(self.pos_max, float(d.max()))
                self.pos_parts.append(d[d < self.bound] if self.full else d)
        negs = block[cand]
        self.neg_parts.append(negs)
        self.neg_held += negs.size
        # Re-select only when the buffer has doubled, so selection work stays linear overall.
        if self.neg_held >= (2 * self.k if self.full else self.k):
            self._compact()

    def _smallest_negatives(self) -> np.ndarray:
        """The k smallest negatives held so far (all of them if fewer), in no order."""
        parts = self.neg_parts
        negs = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if negs.size > self.k:
            # Every part is a private copy (boolean indexing copies), so in place is safe; the
            # head is copied out so that the large buffer can be freed.
            negs.partition(self.k - 1)
            negs = negs[: self.k].copy()
        return negs

    def _compact(self) -> None:
        """Keep the k smallest negatives and the positives below the k-th of them."""
        negs = self._smallest_negatives()
        self.neg_parts, self.neg_held = [negs], negs.size
        self.full = True
        self.bound = negs.max()
        # A positive at or above the k-th smallest negative is above every threshold we pick.
        pos = np.concatenate(self.pos_parts) if self.pos_parts else np.empty(0)
        self.pos_parts = [pos[pos < self.bound]]

    def result(self) -> dict[float, tuple[float, float]]:
        """``{fpr: (tpr, threshold)}`` for every target; see ``tpr_at_fpr``."""
        negs = np.sort(self._smallest_negatives())
        pos = np.sort(np.concatenate(self.pos_parts))
        nothing = float(np.nextafter(min(float(negs[0]), self.pos_min), -math.inf))
        out: dict[float, tuple[float, float]] = {}
        for f, m in zip(self.fprs, self.allowed, strict=True):
            if m >= self.num_neg:
                out[f] = (1.0, self.pos_max)
                continue
            accepted = int(np.searchsorted(pos, negs[m], side="left"))
            if accepted == 0:
                out[f] = (0.0, nothing)
            else:
                out[f] = (accepted / self.num_pos, float(pos[accepted - 1]))
        return out


def _run(
    blocks: Iterator[tuple[int, np.ndarray]],
    labels: dict[str, np.ndarray],
    fprs: list[float],
) -> dict[float, tuple[float, float]]:
    """Feed row blocks of distances to a fresh accumulator and return its result."""
    acc = _TprAtFpr(labels, fprs)
    for start, block in blocks:
        acc.add_block(start, block)
    return acc.result()


def tpr_at_fpr(
    distmat: ArrayLike,
    q_pids: Labels,
    g_pids: Labels,
    q_camids: Labels,
    g_camids: Labels,
    fprs: Sequence[float] = DEFAULT_FPRS,
    chunk_size: int = 256,
) -> dict[float, tuple[float, float]]:
    """Exact TPR at each target FPR over the query-gallery pairs of a [nq, ng] distance matrix.

    Pairs follow the Market protocol: gallery junk (pid -1), same-identity-same-camera pairs
    and junk queries are left out; same identity = positive, any other pid (distractors pid 0
    included) = negative. A pair is accepted when ``distance <= threshold``; every distinct
    pair distance is one operating point (tied pairs are accepted together), plus "accept
    nothing". For each target ``f`` in ``fprs`` (each in (0, 1]) returns ``(tpr, threshold)``
    of the operating point with the highest TPR among those with FPR <= ``f``, the smallest
    such threshold when several reach that TPR. "Accept nothing" is reported as the largest
    float64 below the smallest pair distance (``np.nextafter(min, -inf)``), a finite number.
    With ``f = 1`` (or any ``f`` that admits all negatives) the answer is TPR 1 at the largest
    positive distance. Keys are the targets as floats. ValueError on shape mismatches,
    targets outside (0, 1], NaN distances, or when there are no positive or no negative pairs.
    Works ``chunk_size`` rows at a time; extra memory is O(k + chunk_size x ng), k being about
    ``max(fprs)`` x the number of negatives.
    """
    fprs = _check_fprs(fprs)
    chunk_size = check_chunk_size(chunk_size)
    distmat = as_distmat(distmat)
    nq, ng = int(distmat.shape[0]), int(distmat.shape[1])
    labels = _labels(q_pids, g_pids, q_camids, g_camids)
    _check_lengths(nq, ng, labels)
    return _run(_distmat_blocks(distmat, chunk_size), labels, fprs)


def tpr_at_fpr_features(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: Labels,
    g_pids: Labels,
    q_camids: Labels,
    g_camids: Labels,
    metric: str = "cosine",
    fprs: Sequence[float] = DEFAULT_FPRS,
    chunk_size: int = 256,
) -> dict[float, tuple[float, float]]:
    """``tpr_at_fpr`` from features, never holding the full distance matrix.

    Distances (see ``compute_distance``; cosine by default) are computed ``chunk_size``
    queries at a time, so at MSMT17 size (958M pairs) memory stays at O(k + chunk_size x ng).
    Equals ``tpr_at_fpr(compute_distance(qf, gf, metric, chunk_size), ...)``.
    """
    fprs = _check_fprs(fprs)
    check_metric(metric)
    chunk_size = check_chunk_size(chunk_size)
    labels = _labels(q_pids, g_pids, q_camids, g_camids)
    _check_lengths(len(qf), len(gf), labels)
    return _run(distance_blocks(qf, gf, metric, chunk_size), labels, fprs)

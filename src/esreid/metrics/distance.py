"""Query-gallery distance matrices, computed block by block so temporaries stay bounded."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("euclidean", "cosine")

ArrayLike = np.ndarray | torch.Tensor


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is a supported distance name, else raise ValueError naming it."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


def check_chunk_size(chunk_size: int, name: str = "chunk_size") -> int:
    """Return ``chunk_size`` as an int if it is a positive integer, else raise ValueError."""
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"{name} must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def as_feature_tensor(x: ArrayLike, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turn a [n, d] numpy array or torch tensor into a detached tensor of ``dtype``.

    Tensors stay on their device. Raises ValueError naming ``name`` when the input is not
    2-D or holds NaN/inf values.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D [num_items, feature_dim] array, got shape {tuple(t.shape)}"
        )
    t = t.to(dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def as_labels(x: Iterable[int] | ArrayLike, name: str) -> np.ndarray:
    """A 1-D int64 array from a list/array/tensor of integer labels; ValueError naming ``name``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def distance_blocks(
    qf: ArrayLike,
    gf: ArrayLike,
    metric: str = "euclidean",
    chunk_size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block)`` pairs covering the [nq, ng] distance matrix row-block by row-block.

    ``block`` is a numpy array of ``dtype`` (float32 by default) and shape [rows, ng] holding
    the distances of queries ``start .. start + rows - 1``; only one block exists at a time.
    See ``compute_distance`` for the metrics.
    """
    check_metric(metric)
    chunk_size = check_chunk_size(chunk_size)
    q = as_feature_tensor(qf, "qf", dtype)
    g = as_feature_tensor(gf, "gf", dtype).to(q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"qf and gf must have the same feature dimension, got {q.shape[1]} and {g.shape[1]}"
        )
    if metric == "cosine":
        q = F.normalize(q, dim=1)
        g = F.normalize(g, dim=1)
    else:
        g_sq = (g * g).sum(dim=1)
    g_t = g.t()
    for start in range(0, q.shape[0], chunk_size):
        qc = q[start : start + chunk_size]
        if metric == "cosine":
            block = 1.0 - qc @ g_t
        else:
            q_sq = (qc * qc).sum(dim=1, keepdim=True)
            # |q|^2 + |g|^2 - 2 q.g can dip below zero by rounding; clamp before the sqrt.
            block = torch.addmm(g_sq, qc, g_t, alpha=-2.0).add_(q_sq).clamp_min_(0.0).sqrt_()
        yield start, block.cpu().numpy()


def compute_distance(
    qf: ArrayLike, gf: ArrayLike, metric: str = "euclidean", chunk_size: int = 512
) -> np.ndarray:
    """Distance matrix between query features [nq, d] and gallery features [ng, d].

    ``metric="euclidean"`` gives the plain L2 distance ||q - g|| (computed as
    sqrt(max(|q|^2 + |g|^2 - 2 q.g, 0)) in float32); ``metric="cosine"`` gives
    1 - cos(q, g) after L2-normalising both sides (an all-zero vector has similarity 0).
    Accepts numpy arrays or torch tensors (any device); works through ``chunk_size`` queries
    at a time. Returns a float32 numpy array of shape [nq, ng].
    """
    check_metric(metric)
    nq = int(qf.shape[0]) if hasattr(qf, "shape") else len(qf)
    out: np.ndarray | None = None
    for start, block in distance_blocks(qf, gf, metric, chunk_size):
        if out is None:
            out = np.empty((nq, block.shape[1]), dtype=np.float32)
        out[start : start + block.shape[0]] = block
    if out is None:
        # No query rows: still validate gf and return an empty [0, ng] matrix.
        ng = as_feature_tensor(gf, "gf").shape[0]
        as_feature_tensor(qf, "qf")
        out = np.empty((0, ng), dtype=np.float32)
    return out

"""A gallery index: descriptors of gallery images, their paths and identity labels, searched
by distance, saved to and loaded from one file.

```python
index = GalleryIndex.create(model.identity, model.metric, model.descriptor_dim)
index.add(features, paths, labels)              # float32 [N, D], N paths, N labels or None
matches = index.search(query_features, top_k=5, model_id=model.identity)
matches[0][0].to_dict()   # {"path": ..., "distance": ..., "rank": 1, "same": ..., "label": ...}
index.save("gallery.esidx"); index = GalleryIndex.load("gallery.esidx")
```

Kinds of index:

* ``"flat"`` (the default): exact, a faiss ``IndexFlatIP`` of L2-normalised copies (cosine)
  or ``IndexFlatL2`` (euclidean) finds candidates. Memory: the features plus faiss's copy.
* ``"numpy"``: exact, one float32 BLAS matrix product with the features themselves finds
  candidates: no second copy, no faiss, and all cores even for a single query.
* ``"ivf"``: approximate, faiss ``IndexIVFFlat``, for very large galleries;
  :func:`recall_at_k` measures what it misses.

The exact kinds return what a brute-force ranking with
:func:`esreid.metrics.compute_distance` gives (ties broken by gallery position), whatever
order float32 arithmetic finds the candidates in (see :mod:`esreid.search.exact`). Every kind
reports exact distances for what it returns.

File format (version 1): a zip archive, members stored uncompressed, written atomically:
``esreid-index.json`` first (``{"format": "esreid-gallery-index", "version": 1, "model_id",
"metric", "dim", "count", "kind", "nlist", "nprobe", "threshold", "threshold_source",
"created", "updated", "esreid_version", "model_path"}``), then ``paths.json`` and ``labels.json`` (JSON
lists), ``features.npy`` (float32 ``[count, dim]``, ``.npy`` format) and, for ``ivf``,
``faiss.index`` (``faiss.serialize_index``). The zip's CRC-32s catch damaged members. A flat
index's faiss structure is rebuilt from the features on load rather than stored twice.

Paths in ``paths.json`` are absolute, or relative to the folder of the index file (never to
the working directory): ``esreid serve`` stores uploaded images as
``<index name>.uploads/<id>.png``, so an index and its uploads folder can be moved together.
:meth:`GalleryIndex.file_path` (and every :class:`Match`) gives the path to open.

Several processes may share one index file. Writers take the index's lock file
(:func:`index_lock`, ``.<index name>.lock`` beside it) for their read-modify-write
(:func:`update_index_file`); readers need no lock, since every save is a rename and
:meth:`GalleryIndex.load` reads one file, the old or the new. :meth:`GalleryIndex.changed_on_disk`
tells a long-lived reader (the server) that another process saved a new version.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from esreid.locking import FileLock, LockBusyError, lock_path_for
from esreid.search.exact import (
    CHUNK_ROWS,
    METRICS,
    check_metric,
    exact_keys,
    faiss_keys,
    faiss_vectors,
    key_slack,
    keys_to_distances,
    row_norms,
    scan_error_bound,
    scan_keys,
    scan_norms,
)

FORMAT_NAME = "esreid-gallery-index"
FORMAT_VERSION = 1
KINDS = ("flat", "numpy", "ivf")

META_MEMBER = "esreid-index.json"
PATHS_MEMBER = "paths.json"
LABELS_MEMBER = "labels.json"
FEATURES_MEMBER = "features.npy"
FAISS_MEMBER = "faiss.index"

#: Extra candidates asked of the scan beyond ``top_k`` (at least ``top_k`` more): enough
#: that the exactness check almost never needs a second pass over the gallery.
CANDIDATE_MARGIN = 16
#: Rows handed to faiss per call when adding, so the normalised copy stays small.
ADD_CHUNK_ROWS = 4096
#: IVF k-means trains on at most this many vectors per list: with 4096-d descriptors on a
#: few cores, faiss's default of 256 makes training take minutes for little gain.
TRAIN_POINTS_PER_LIST = 64
#: k-means iterations for the IVF lists (faiss's default is 25; the lists only route
#: queries, and benchmarks/search.py measures the recall this gives).
TRAIN_ITERATIONS = 10
#: faiss warns below this many training vectors per list; the default nlist respects it.
MIN_POINTS_PER_LIST = 39
#: Largest block of feature rows the index grows by (a larger batch added is its own block).
BLOCK_BYTES = 1 << 30
#: The numpy scan handles at most this many query x gallery scores (float64) at once.
SCAN_BLOCK_SCORES = 1 << 24
_WRITE_BLOCK_BYTES = 64 << 20
#: How long a writer waits for another process's write of the same index, by default.
DEFAULT_WAIT_SECONDS = 300.0

T = TypeVar("T")


class IndexMismatchError(ValueError):
    """Queries or images that do not fit the index: embedded by another model, or of another
    descriptor length. The message is one line naming the index and both values."""


class IndexFileError(ValueError):
    """A file that is not a gallery index, or a damaged one. One line naming the file."""


@dataclass(frozen=True)
class Match:
    """One search result. ``rank`` starts at 1; ``same`` is ``distance <= threshold`` (None
    when the index has no threshold); ``index`` is the gallery position."""

    path: str
    distance: float
    rank: int
    same: bool | None
    label: str | None
    index: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields ``path``, ``distance``, ``rank``, ``same``, ``label``."""
        return {"path": self.path, "distance": self.distance, "rank": self.rank,
                "same": self.same, "label": self.label}


def import_faiss() -> Any:
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("index kinds 'flat' and 'ivf' need faiss: pip install faiss-cpu "
                          "(kind 'numpy' does not)") from exc
    return faiss


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_threshold(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"threshold must be a finite number or None, got {value!r}")
    return float(value)


def default_nlist(n: int) -> int:
    """IVF lists for a first batch of ``n`` descriptors: about ``sqrt(n)``, with at least
    39 training vectors per list (faiss's minimum for a meaningful k-means)."""
    return max(1, min(round(math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists an IVF search visits by default: a quarter of them (recall@10 0.97 on the
    clustered 4096-d descriptors of benchmarks/search.py at 100,000 images; an eighth
    gave 0.91)."""
    return max(1, nlist // 4)


class GalleryIndex:
    """Descriptors ``[N, D]`` with their ``paths``, ``labels`` (str or None), the ``model_id``
    and ``metric`` they were embedded with, an optional verification ``threshold`` (a pair
    is the same identity when its distance is at most the threshold) and where that came
    from (``threshold_source``), and the search structure of the given ``kind``.

    ``source`` is the file the index was loaded from or last saved to (absolute; None
    before). ``paths`` hold what the file stores (absolute, or relative to the index's
    folder); :meth:`file_path` resolves them.
    """

    def __init__(self, model_id: str, metric: str, dim: int, kind: str = "flat", *,
                 nlist: int | None = None, nprobe: int | None = None) -> None:
        """An empty index; see :meth:`create`."""
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind != "ivf" and (nlist is not None or nprobe is not None):
            raise ValueError("nlist and nprobe apply to kind='ivf' only")
        self.model_id = model_id
        self.metric = check_metric(metric)
        self.dim = _positive_int(dim, "dim")
        self.kind = kind
        self.nlist = _positive_int(nlist, "nlist", allow_none=True)
        self._nprobe = _positive_int(nprobe, "nprobe", allow_none=True)
        self.paths: list[str] = []
        self.labels: list[str | None] = []
        self._threshold: float | None = None
        self.threshold_source: dict[str, Any] = {}
        # The checkpoint or ONNX file that embedded the gallery: what `esreid search` loads
        # to embed queries when no model is named.
        self.model_path: str | None = None
        self.created = self.updated = _now()
        self.source: Path | None = None
        # (device, inode, size, mtime) of the file as loaded or saved: a save by another
        # process renames a new file into place, which changes the inode.
        self.signature: tuple[int, int, int, int] | None = None
        # Features live in row blocks of up to BLOCK_BYTES (a batch that large gets a block
        # of its own), the last one with room to grow: adding never copies what the index
        # already holds, and scans see few large blocks (BLAS is slow on many small ones).
        self._buffers: list[np.ndarray] = []
        self._fills: list[int] = []
        self._starts: list[int] = []
        self._count = 0
        self._norms = np.zeros(0, dtype=np.float64)
        self._structure: Any = None
        self._quantizer: Any = None  # faiss does not own an IVF quantizer made in Python

    @classmethod
    def create(cls, model_id: str, metric: str, dim: int, kind: str = "flat",
               **ann_params: int | None) -> GalleryIndex:
        """An empty index for descriptors of length ``dim`` made by model ``model_id``.

        ``kind="flat"`` (faiss) or ``"numpy"``: exact search (see the module docstring).
        ``kind="ivf"``: approximate search with ``nlist`` lists (default from the first batch added, which trains them; see
        :func:`default_nlist`), of which ``nprobe`` are visited per query.
        """
        unknown = set(ann_params) - {"nlist", "nprobe"}
        if unknown:
            raise TypeError(f"unknown index parameter(s): {', '.join(sorted(unknown))}")
        return cls(model_id, metric, dim, kind, **ann_params)

    # -- properties -----------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of gallery items."""
        return self._count

    def __len__(self) -> int:
        """Number of gallery items."""
        return self._count

    @property
    def features(self) -> np.ndarray:
        """The descriptors, float32 ``[N, D]`` (joined into one array, once, when they are
        held in several blocks)."""
        blocks = self._blocks
        if not blocks:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(blocks) > 1:
            joined = np.concatenate(blocks)
            self._buffers, self._fills, self._starts = [joined], [len(joined)], [0]
            return joined
        return blocks[0]

    @property
    def _blocks(self) -> list[np.ndarray]:
        """The filled parts of the feature blocks, in gallery order."""
        return [buf[:fill] for buf, fill in zip(self._buffers, self._fills, strict=True)]

    @property
    def threshold(self) -> float | None:
        """Distance at or below which a match is reported as the same identity, or None."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._threshold = _check_threshold(value)
        self.updated = _now()

    def set_threshold(self, threshold: float | None, source: dict[str, Any] | None = None) -> None:
        """Set (or clear, with None) the threshold and record where it came from."""
        self.threshold = threshold
        self.threshold_source = dict(source or {}) if threshold is not None else {}

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (None for an exact index)."""
        if self.kind != "ivf":
            return None
        return self._nprobe if self._nprobe is not None or self.nlist is None \
            else default_nprobe(self.nlist)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "ivf":
            raise ValueError("nprobe applies to kind='ivf' only")
        self._nprobe = _positive_int(value, "nprobe")
        if self._structure is not None:
            self._structure.nprobe = min(self._nprobe, self.nlist)

    def file_path(self, i: int) -> str:
        """The path to open for gallery item ``i``: its stored path, resolved against the
        index file's folder when relative."""
        return self.resolve_path(self.paths[i])

    def resolve_path(self, stored: str) -> str:
        """``stored`` as a path to open: unchanged when absolute (or before the index has a
        file), else joined to the folder of :attr:`source`."""
        if os.path.isabs(stored) or self.source is None:
            return stored
        return os.path.normpath(os.path.join(self.source.parent, stored))

    def changed_on_disk(self) -> bool:
        """Whether the file at :attr:`source` is no longer the one this index was loaded
        from or last saved as (another process saved, replaced or deleted it)."""
        if self.source is None:
            return False
        return file_signature(self.source) != self.signature

    def _where(self) -> str:
        return f"index {self.source}" if self.source is not None else "the in-memory index"

    def __repr__(self) -> str:
        return (f"GalleryIndex(count={self.count}, dim={self.dim}, metric={self.metric!r}, "
                f"kind={self.kind!r}, model_id={self.model_id!r}, source={self.source})")

    # -- checks ---------------------------------------------------------------------------

    def check_model(self, model_id: str | None, what: str = "the queries") -> None:
        """Raise :class:`IndexMismatchError` when ``model_id`` (if given) is not the model
        that built the index."""
        if model_id is not None and model_id != self.model_id:
            raise IndexMismatchError(
                f"{self._where()} was built by model {self.model_id}, but {what} come from "
                f"model {model_id}: an index built by another model is refused (use the model "
                "that built it, or build a new index with this one)")

    def _as_rows(self, x: Any, what: str) -> np.ndarray:
        """``x`` as C-contiguous float32 ``[n, dim]`` (one vector may be 1-D), checked."""
        arr = np.asarray(x)
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{what} must hold real numbers, got dtype {arr.dtype}")
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"{what} must be a 2-D [n, dim] array, got shape {arr.shape}")
        if arr.shape[1] != self.dim:
            raise IndexMismatchError(
                f"{self._where()} holds {self.dim}-dimensional descriptors (model "
                f"{self.model_id}), but {what} have {arr.shape[1]} dimensions")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return arr

    # -- adding ---------------------------------------------------------------------------

    def add(self, features: Any, paths: list[str], labels: list[str | None] | None = None,
            model_id: str | None = None) -> None:
        """Append descriptors ``[N, D]`` (copied) with their ``paths`` and ``labels``
        (default: all None). A path is absolute or relative to the index file's folder
        (see the module docstring). ``model_id``, when given, must be the index's model. The
        first batch added to an ``ivf`` index trains its lists."""
        self.check_model(model_id, "the added images")
        x = self._as_rows(features, "the added features")
        paths = [os.fspath(p) for p in paths]
        if len(paths) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} feature rows but {len(paths)} paths")
        labels = [None] * len(paths) if labels is None else list(labels)
        if len(labels) != len(paths):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
        for label in labels:
            if label is not None and (not isinstance(label, str) or not label):
                raise ValueError(f"a label must be a non-empty string or None, got {label!r}")
        if not paths:
            return
        self._ensure_structure(x)
        self._add_to_structure(x)
        self._append(x)
        self.paths.extend(paths)
        self.labels.extend(labels)
        self.updated = _now()

    def _append(self, x: np.ndarray, owned: bool = False) -> None:
        """Copy rows ``x`` into the blocks (or adopt ``x`` as a block when ``owned``: it
        then must not be used elsewhere)."""
        block_rows = max(1, BLOCK_BYTES // (4 * self.dim))
        norms = [scan_norms(x[s:s + CHUNK_ROWS]) for s in range(0, len(x), CHUNK_ROWS)]
        pos = 0
        while pos < len(x):
            rest = len(x) - pos
            if self._fills and self._fills[-1] < block_rows:
                buf, fill = self._buffers[-1], self._fills[-1]
                if fill == len(buf):
                    # Doubling keeps the copies of a block growing row by row linear.
                    grown = np.empty((min(block_rows, max(2 * fill, fill + rest)), self.dim),
                                     dtype=np.float32)
                    grown[:fill] = buf[:fill]
                    self._buffers[-1] = buf = grown
                take = min(len(buf) - fill, rest)
                buf[fill:fill + take] = x[pos:pos + take]
                self._fills[-1] += take
            else:
                take = rest if rest >= block_rows else 0
                block = (x[pos:] if owned and pos == 0 else x[pos:].copy()) if take else \
                    np.empty((rest, self.dim), dtype=np.float32)
                self._buffers.append(block)
                self._fills.append(take)
                self._starts.append(self._count + pos)
            pos += take
        self._count += len(x)
        self._norms = np.concatenate([self._norms, *norms])

    def _new_flat(self) -> Any:
        faiss = import_faiss()
        return faiss.IndexFlatIP(self.dim) if self.metric == "cosine" else faiss.IndexFlatL2(self.dim)

    def _ensure_structure(self, first_batch: np.ndarray) -> None:
        """Make the faiss structure if there is none yet; an IVF one trains on the batch."""
        if self._structure is not None or self.kind == "numpy":
            return
        if self.kind == "flat":
            self._structure = self._new_flat()
            return
        faiss = import_faiss()
        n = first_batch.shape[0]
        nlist = self.nlist if self.nlist is not None else default_nlist(n)
        if n < nlist:
            raise ValueError(f"an ivf index trains on its first batch, which needs at least "
                             f"nlist={nlist} descriptors; got {n} (use kind='flat' for small "
                             "galleries, or a smaller nlist)")
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        quantizer = self._new_flat()
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, metric)
        ivf.cp.niter = TRAIN_ITERATIONS
        limit = TRAIN_POINTS_PER_LIST * nlist
        # A fixed sample keeps training reproducible and avoids faiss's own subsampling.
        rows = (np.sort(np.random.default_rng(0).choice(n, limit, replace=False))
                if n > limit else slice(None))
        ivf.train(faiss_vectors(first_batch[rows], self.metric))
        self.nlist = nlist
        self._quantizer, self._structure = quantizer, ivf
        self._structure.nprobe = min(self.nprobe, nlist)

    def _add_to_structure(self, x: np.ndarray) -> None:
        if self.kind == "numpy":
            return
        # One buffer for all chunks: fresh memory for each would be faulted in page by page.
        buffer = np.empty((min(ADD_CHUNK_ROWS, len(x)), self.dim), dtype=np.float32)
        for start in range(0, x.shape[0], ADD_CHUNK_ROWS):
            chunk = x[start:start + ADD_CHUNK_ROWS]
            self._structure.add(faiss_vectors(chunk, self.metric, out=buffer[:len(chunk)]))

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        """Feature rows at gallery positions ``idx``, wherever their blocks are."""
        if len(self._buffers) == 1:
            return self._buffers[0][idx]
        block = np.searchsorted(np.asarray(self._starts), idx, side="right") - 1
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        for b in np.unique(block):
            mask = block == b
            out[mask] = self._buffers[b][idx[mask] - self._starts[b]]
        return out

    def _keys(self, query: np.ndarray, idx: np.ndarray) -> np.ndarray:
        out = np.empty(len(idx), dtype=np.float64)
        for start in range(0, len(idx), CHUNK_ROWS):
            chunk = idx[start:start + CHUNK_ROWS]
            out[start:start + len(chunk)] = exact_keys(query, self._rows(chunk), self.metric)
        return out

    # -- searching ------------------------------------------------------------------------

    def search(self, queries: Any, top_k: int = 10, model_id: str | None = None
               ) -> list[list[Match]]:
        """The ``top_k`` nearest gallery items of each query ``[Q, D]`` (or one ``[D]``),
        nearest first. ``model_id``, when given, must be the index's model."""
        idx, dist = self.search_arrays(queries, top_k, model_id)
        out = []
        for row_idx, row_dist in zip(idx, dist, strict=True):
            matches = []
            for rank, (i, d) in enumerate(zip(row_idx.tolist(), row_dist.tolist(), strict=True),
                                          start=1):
                if i < 0:
                    break
                same = None if self._threshold is None else bool(d <= self._threshold)
                matches.append(Match(self.file_path(i), float(d), rank, same, self.labels[i], i))
            out.append(matches)
        return out

    def search_arrays(self, queries: Any, top_k: int = 10, model_id: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Gallery positions (int64) and distances (float32), both ``[Q, min(top_k, N)]``,
        nearest first; an approximate index that finds fewer pads with -1 and inf."""
        self.check_model(model_id)
        q = self._as_rows(queries, "the queries")
        top_k = _positive_int(top_k, "top_k")
        return self._rank(q, top_k, exact=self.kind != "ivf")

    def _rank(self, q: np.ndarray, top_k: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        k = min(top_k, self._count)
        out_idx = np.full((q.shape[0], k), -1, dtype=np.int64)
        out_dist = np.full((q.shape[0], k), np.inf, dtype=np.float32)
        if k == 0 or q.shape[0] == 0:
            return out_idx, out_dist
        n_cand = min(self._count, k + max(k, CANDIDATE_MARGIN))
        approx, cand = self._scan(q, n_cand)
        q_norms = row_norms(q)
        max_norm = float(self._norms.max())
        for i in range(q.shape[0]):
            if self.metric == "cosine" and q_norms[i] == 0.0:
                # An all-zero query is at distance exactly 1 from everything: the order is
                # the gallery order, and the scan's arbitrary order of ties need not be checked.
                out_idx[i], out_dist[i] = np.arange(k), 1.0
                continue
            found = cand[i][cand[i] >= 0]
            keys = self._keys(q[i], found)
            top = _top(found, keys, k, self.metric)
            if exact and n_cand < self._count:
                worst = float(keys[top].max())
                bound = scan_error_bound(self.metric, self.dim, float(q_norms[i]), max_norm)
                if float(approx[i].max()) - bound <= worst + key_slack(worst, self.metric):
                    # A row the scan left out could tie or beat the k-th: take every row whose
                    # scanned key is within the error bound of it, which is then provably all.
                    radius = worst + key_slack(worst, self.metric) + bound
                    found = np.union1d(found, self._within(q[i], radius))
                    keys = self._keys(q[i], found)
                    top = _top(found, keys, k, self.metric)
            out_idx[i, :len(top)] = found[top]
            out_dist[i, :len(top)] = keys_to_distances(keys[top], self.metric)
        return out_idx, out_dist

    def _scan(self, q: np.ndarray, n_cand: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n_cand`` best rows of each query by the float32 scan: approximate keys
        (float64) and gallery positions, both ``[Q, n_cand]`` (-1 where an IVF finds fewer)."""
        if self.kind != "numpy":
            scores, cand = self._structure.search(faiss_vectors(q, self.metric), n_cand)
            return faiss_keys(scores, self.metric), cand
        approx = np.empty((q.shape[0], n_cand), dtype=np.float64)
        cand = np.empty((q.shape[0], n_cand), dtype=np.int64)
        step = max(1, SCAN_BLOCK_SCORES // self._count)
        for start in range(0, q.shape[0], step):
            keys = self._scan_all(q[start:start + step])
            if n_cand < self._count:
                part = np.argpartition(keys, n_cand - 1, axis=1)[:, :n_cand]
            else:
                part = np.broadcast_to(np.arange(self._count), keys.shape)
            cand[start:start + step] = part
            approx[start:start + step] = np.take_along_axis(keys, part, axis=1)
        return approx, cand

    def _scan_all(self, q: np.ndarray) -> np.ndarray:
        """The numpy scan's approximate keys of queries ``q`` against every row, ``[Q, N]``."""
        keys = np.empty((q.shape[0], self._count), dtype=np.float64)
        for block, start in zip(self._blocks, self._starts, strict=True):
            stop = start + block.shape[0]
            keys[:, start:stop] = scan_keys(q, block, self._norms[start:stop], self.metric)
        return keys

    def _within(self, query: np.ndarray, radius: float) -> np.ndarray:
        """Gallery positions whose scanned key is at most ``radius`` (a range search, with
        room for faiss's float32 radius)."""
        if self.kind == "numpy":
            return np.flatnonzero(self._scan_all(query[None])[0] <= radius)
        prepared = faiss_vectors(query[None], self.metric)
        if self.metric == "cosine":
            # faiss keeps inner products strictly above the radius.
            lims, _, idx = self._structure.range_search(prepared, float(1.0 - radius) - 1e-6)
        else:
            # faiss keeps squared distances strictly below the radius.
            lims, _, idx = self._structure.range_search(prepared, radius * (1 + 1e-6) + 1e-30)
        return idx[lims[0]:lims[1]].astype(np.int64)

    def _exact_twin(self) -> GalleryIndex:
        """An exact (numpy) index over the same features, shared, not copied."""
        twin = GalleryIndex(self.model_id, self.metric, self.dim, "numpy")
        twin.paths, twin.labels, twin.source = self.paths, self.labels, self.source
        twin._buffers, twin._fills = list(self._buffers), list(self._fills)
        twin._starts = list(self._starts)
        twin._count, twin._norms = self._count, self._norms
        return twin

    # -- files ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the index to ``path`` (default: :attr:`source`) as one file, atomically: a
        crash mid-write leaves the previous file as it was. Returns the (absolute) path.

        Saved into another folder than :attr:`source`'s, relative paths are stored absolute
        so they still name the same files. This does not lock: writers that other processes
        may race with use :func:`update_index_file`.
        """
        if path is None:
            if self.source is None:
                raise ValueError("save() needs a path for an index that was never saved")
            path = self.source
        # Imported here: esreid.utils imports torch, which loading and searching never need.
        from esreid.utils import atomic_write

        path = Path(os.path.expandvars(os.fspath(path))).expanduser().absolute()
        if self.source is not None and path.parent != self.source.parent:
            self.paths = [self.resolve_path(p) for p in self.paths]
        meta = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "model_id": self.model_id,
            "metric": self.metric, "dim": self.dim, "count": self._count, "kind": self.kind,
            "nlist": self.nlist, "nprobe": self._nprobe, "threshold": self._threshold,
            "threshold_source": self.threshold_source, "created": self.created,
            "updated": self.updated, "esreid_version": _esreid_version(),
            "model_path": self.model_path,
        }
        structure = None
        if self.kind == "ivf" and self._structure is not None:
            structure = import_faiss().serialize_index(self._structure)

        def write(tmp: str) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.writestr(META_MEMBER, json.dumps(meta, indent=1, allow_nan=False))
                zf.writestr(PATHS_MEMBER, json.dumps(self.paths))
                zf.writestr(LABELS_MEMBER, json.dumps(self.labels))
                with zf.open(FEATURES_MEMBER, "w", force_zip64=True) as f:
                    write_features(f, self._blocks, self._count, self.dim)
                if structure is not None:
                    zf.writestr(FAISS_MEMBER, memoryview(structure))

        atomic_write(path, write)
        self.source = path
        self.signature = file_signature(path)
        return path

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """The metadata of the index file at ``path`` (count, model, kind, ...) without
        reading its features. Raises :class:`IndexFileError` for a file that is not an
        index, OSError when it cannot be read."""
        path = Path(os.path.expandvars(os.fspath(path))).expanduser()
        try:
            with zipfile.ZipFile(path) as zf:
                meta = _json_member(zf, META_MEMBER)
        except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as exc:
            raise IndexFileError(f"{path}: not a readable gallery index ({_one_line(exc)})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise IndexFileError(f"{path}: not an esreid gallery index")
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike) -> GalleryIndex:
        """Read an index written by :meth:`save`. Raises FileNotFoundError, or
        :class:`IndexFileError` (one line naming the file) for a file that is not an index
        or is damaged."""
        path = Path(os.path.expandvars(os.fspath(path))).expanduser().absolute()
        if not path.exists():
            raise FileNotFoundError(f"index file not found: {path}")
        if path.is_dir():
            raise IndexFileError(f"{path}: is a folder, not a gallery index file")
        try:
            # One open file for everything: a save renaming a new file into place meanwhile
            # cannot mix two versions.
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise IndexFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
        with f:
            try:
                signature = _signature(os.fstat(f.fileno()))
                head = f.read(30 + len(META_MEMBER))
                f.seek(0)
            except OSError as exc:
                raise IndexFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
            # save() writes the metadata member first, so its local header opens every index.
            ours = head[:4] == b"PK\x03\x04" and head[30:] == META_MEMBER.encode()
            try:
                zf = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                if ours:
                    raise IndexFileError(f"{path}: damaged gallery index (truncated or corrupt: "
                                         f"{_one_line(exc)}); rebuild it or restore a copy") from exc
                raise IndexFileError(f"{path}: not an esreid gallery index (not a zip archive)") from exc
            with zf:
                if META_MEMBER not in zf.namelist():
                    raise IndexFileError(f"{path}: not an esreid gallery index (a zip archive "
                                         f"without {META_MEMBER})")
                try:
                    index = cls._read(zf, path)
                except IndexFileError:
                    raise
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError,
                        UnicodeDecodeError, RuntimeError) as exc:
                    raise IndexFileError(f"{path}: damaged gallery index ({_one_line(exc)}); "
                                         "rebuild it or restore a copy") from exc
        index.signature = signature
        return index

    @classmethod
    def _read(cls, zf: zipfile.ZipFile, path: Path) -> GalleryIndex:
        def bad(what: str) -> IndexFileError:
            return IndexFileError(f"{path}: damaged gallery index ({what}); rebuild it or "
                                  "restore a copy")

        meta = _json_member(zf, META_MEMBER)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise IndexFileError(f"{path}: not an esreid gallery index ({META_MEMBER} does not "
                                 f"say format {FORMAT_NAME!r})")
        version = meta.get("version")
        if not isinstance(version, int) or version < 1:
            raise bad(f"format version {version!r}")
        if version > FORMAT_VERSION:
            raise IndexFileError(f"{path}: written by a newer esreid (index format {version}; "
                                 f"this one reads up to {FORMAT_VERSION}): upgrade esreid")
        for key in ("model_id", "metric", "dim", "count", "kind"):
            if key not in meta:
                raise bad(f"{META_MEMBER} lacks {key!r}")
        if meta["metric"] not in METRICS or meta["kind"] not in KINDS:
            raise bad(f"metric {meta['metric']!r}, kind {meta['kind']!r}")
        count = meta["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise bad(f"count {count!r}")
        index = cls(meta["model_id"], meta["metric"], meta["dim"], meta["kind"],
                    nlist=meta.get("nlist"), nprobe=meta.get("nprobe"))
        paths = _json_member(zf, PATHS_MEMBER)
        labels = _json_member(zf, LABELS_MEMBER)
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise bad(f"{PATHS_MEMBER} is not a list of strings")
        if not isinstance(labels, list) or not all(x is None or isinstance(x, str) for x in labels):
            raise bad(f"{LABELS_MEMBER} is not a list of strings and nulls")
        if len(paths) != count or len(labels) != count:
            raise bad(f"{count} items but {len(paths)} paths and {len(labels)} labels")
        try:
            with zf.open(FEATURES_MEMBER) as f:
                features = np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise bad(f"{FEATURES_MEMBER}: {_one_line(exc)}") from exc
        if features.dtype != np.float32 or features.shape != (count, index.dim):
            raise bad(f"features are {features.dtype} {features.shape}, expected float32 "
                      f"({count}, {index.dim})")
        index.paths, index.labels = paths, labels
        index._threshold = _check_threshold(meta.get("threshold"))
        index.threshold_source = dict(meta.get("threshold_source") or {})
        model_path = meta.get("model_path")
        index.model_path = model_path if isinstance(model_path, str) and model_path else None
        index.created = meta.get("created", index.created)
        index.updated = meta.get("updated", index.updated)
        if count:
            index._append(np.ascontiguousarray(features), owned=True)
        index._load_structure(zf, path, bad)
        index.source = path
        return index

    def _load_structure(self, zf: zipfile.ZipFile, path: Path, bad: Any) -> None:
        if self.kind == "numpy":
            return
        if self.kind == "flat":
            if self._count:
                self._structure = self._new_flat()
                for block in self._blocks:
                    self._add_to_structure(block)
            return
        if FAISS_MEMBER not in zf.namelist():
            if self._count:
                raise bad(f"an ivf index of {self._count} items without {FAISS_MEMBER}")
            return
        faiss = import_faiss()
        data = np.frombuffer(zf.read(FAISS_MEMBER), dtype=np.uint8)
        # deserialize_index returns the concrete class already; downcast_index would make a
        # second proxy that does not own the index (and sees freed memory once this one dies).
        structure = faiss.deserialize_index(data)
        want = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if not isinstance(structure, faiss.IndexIVFFlat) or structure.d != self.dim \
                or structure.ntotal != self._count or structure.metric_type != want:
            raise bad(f"{FAISS_MEMBER} does not match the features")
        self.nlist = int(structure.nlist)
        self._structure = structure
        structure.nprobe = min(self.nprobe, self.nlist)

    def info(self) -> dict[str, Any]:
        """A summary: count, dim, metric, model_id, kind (and nlist/nprobe), threshold and
        its source, how many items are labelled and how many identities, the file and its
        size in bytes (None before the first save), created/updated times (UTC)."""
        size = None
        if self.source is not None:
            try:
                size = self.source.stat().st_size
            except OSError:
                size = None
        labelled = [x for x in self.labels if x is not None]
        return {
            "count": self._count, "dim": self.dim, "metric": self.metric,
            "model_id": self.model_id, "model_path": self.model_path, "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe, "threshold": self._threshold,
            "threshold_source": dict(self.threshold_source), "labels": len(labelled),
            "identities": len(set(labelled)),
            "file": None if self.source is None else str(self.source), "file_size": size,
            "created": self.created, "updated": self.updated, "format_version": FORMAT_VERSION,
        }


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_signature(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime) of the file at ``path``, or None when there is none."""
    try:
        return _signature(os.stat(path))
    except OSError:
        return None


def index_lock(path: str | os.PathLike) -> FileLock:
    """The lock that writers of the index file at ``path`` take (``.<name>.lock`` beside it)."""
    return FileLock(lock_path_for(path), f"index {Path(path).expanduser().absolute()}")


# Threads of one process share the file lock (it is per process), so they also take this.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(str(lock_path_for(path)), threading.Lock())


def update_index_file(path: str | os.PathLike, change: Callable[[GalleryIndex], T], *,
                      base: GalleryIndex | None = None,
                      timeout: float | None = DEFAULT_WAIT_SECONDS,
                      on_wait: Callable[[str], None] | None = None) -> tuple[GalleryIndex, T]:
    """One writer's read-modify-write of the index file at ``path``: take its lock (waiting
    up to ``timeout`` seconds for another writer, ``on_wait`` told once), take the index as
    it is on disk now, call ``change(index)``, save atomically, release. Returns
    ``(index, what change returned)``.

    ``base`` is an index already loaded from ``path``: used (and changed in place) when
    the file has not changed since, reloaded otherwise, so that nothing another process
    added is lost. Nothing is saved when ``change`` raises. Raises
    :class:`esreid.locking.LockBusyError` when the lock is not had in time.
    """
    path = Path(os.path.expandvars(os.fspath(path))).expanduser().absolute()
    thread_lock = _thread_lock(path)
    if not thread_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
        raise LockBusyError(f"index {path} is being written by another thread of this process")
    try:
        with index_lock(path).acquire(timeout=timeout, on_wait=on_wait):
            if base is not None and base.source == path and not base.changed_on_disk():
                index = base
            else:
                index = GalleryIndex.load(path)
            result = change(index)
            index.save(path)
            return index, result
    finally:
        thread_lock.release()


def _top(idx: np.ndarray, keys: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Positions (into ``idx``) of the ``k`` best, sorted by (float32 distance, gallery position)."""
    return np.lexsort((idx, keys_to_distances(keys, metric)))[:k]


def _json_member(zf: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(zf.read(name))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: malformed JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 ({exc.reason})") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _esreid_version() -> str:
    from esreid import __version__

    return __version__


def write_features(f: Any, blocks: list[np.ndarray], count: int, dim: int) -> None:
    """Write float32 ``[count, dim]`` in ``.npy`` format to the binary stream ``f`` from the
    row blocks that make it up, without joining them."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
              "shape": (count, dim)}
    np.lib.format.write_array_header_1_0(f, header)
    for block in blocks:
        data = memoryview(np.ascontiguousarray(block, dtype="<f4")).cast("B")
        for start in range(0, len(data), _WRITE_BLOCK_BYTES):
            f.write(data[start:start + _WRITE_BLOCK_BYTES])


def recall_at_k(index: GalleryIndex, queries: Any, k: int = 10) -> float:
    """Mean fraction of each query's exact top ``k`` that ``index.search`` returns.

    The exact ranking comes from an exact search over the same features. A returned item
    whose distance equals the exact k-th distance counts as found (with ties the exact top
    k is one of several equally valid sets). An exact index gives 1.0.
    """
    k = _positive_int(k, "k")
    q = index._as_rows(queries, "the queries")
    if index.count == 0 or q.shape[0] == 0:
        raise ValueError("recall needs a non-empty index and at least one query")
    got_idx, got_dist = index.search_arrays(q, k)
    exact = index if index.kind != "ivf" else index._exact_twin()
    _, exact_dist = exact._rank(q, k, exact=True)
    kth = exact_dist[:, -1:]
    found = ((got_idx >= 0) & (got_dist <= kth)).sum(axis=1)
    return float(np.mean(np.minimum(found, exact_dist.shape[1]) / exact_dist.shape[1]))

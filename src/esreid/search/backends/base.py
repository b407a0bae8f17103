"""The interface every search backend implements, and the in-memory base most build on.

A backend holds a gallery's descriptors and item fields (path, label, camera, time, id;
:class:`esreid.search.items.Item`) and finds each query's nearest items.
:class:`esreid.search.GalleryIndex` owns what every index has (model, metric, threshold, the
index file and its lock) and hands the rest to its backend, chosen by name (the index's
``kind``) from :mod:`esreid.search.backends`.

:class:`InMemoryBackend` keeps everything in the process and in the index file
(``features.npy`` and the item lists) and scans with one float32 BLAS product; a subclass
changes only how candidates are found (:meth:`InMemoryBackend.scan` and
:meth:`InMemoryBackend.within`), and exact rescoring (:func:`esreid.search.exact.exact_top_k`)
makes the result exact whatever its summation order, as long as :meth:`scan_bound` bounds
its error. Filters (:class:`esreid.search.items.SearchFilter`) are applied for every
in-memory backend alike: the kept rows are scanned exactly.
"""

from __future__ import annotations

import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from esreid.search import fileformat as ff
from esreid.search.exact import (
    exact_top_k,
    scan_error_bound,
    scan_keys,
)
from esreid.search.features import FeatureBlocks
from esreid.search.items import Item, SearchFilter, item_id

#: The numpy scan handles at most this many query x gallery scores (float64) at once.
SCAN_BLOCK_SCORES = 1 << 24

#: Raised with a message for a damaged file: ``bad("what is wrong")``.
Bad = Callable[[str], Exception]


class SearchBackend(ABC):
    """What :class:`esreid.search.GalleryIndex` needs of a backend.

    Subclasses set ``kind`` (the name ``--kind`` takes and the index file records),
    ``summary`` (one line for ``--help``), ``exact`` (whether results are exactly the
    brute-force ranking) and ``params`` (the settings it accepts, saved in the index file's
    ``backend`` field, with their defaults).
    """

    kind: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool] = True
    params: ClassVar[dict[str, Any]] = {}

    def __init__(self, metric: str, dim: int, **settings: Any) -> None:
        """An empty backend for ``dim``-d descriptors compared by ``metric``; ``settings``
        are checked against :attr:`params` (unknown names raise ValueError naming them)."""
        unknown = set(settings) - set(self.params)
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise ValueError(f"index kind {self.kind!r} takes no parameter(s) "
                            f"{', '.join(sorted(unknown))} (its parameters: {allowed})")
        self.metric = metric
        self.dim = dim
        self.settings = {**self.params, **{k: v for k, v in settings.items() if v is not None}}

    # -- state ----------------------------------------------------------------------------

    @property
    @abstractmethod
    def count(self) -> int:
        """Items held."""

    @property
    @abstractmethod
    def max_norm(self) -> float:
        """The largest descriptor norm held (the scans' error bounds use it)."""

    def saved_settings(self) -> dict[str, Any]:
        """The settings written to the index file's ``backend`` field."""
        return dict(self.settings)

    def open(self, model_id: str, create: bool, source: str, replace: bool = False) -> None:
        """Connect to whatever the backend keeps outside the process (nothing by default):
        ``create`` for a new index (``replace``: empty what is there), else the gallery
        the file describes, checked to be ``model_id``'s. ``source`` names the index in
        messages."""
        return None

    def absolutize(self, resolve: Callable[[str], str]) -> None:
        """Store every relative path as ``resolve(path)`` (the index moves to another
        folder)."""
        return None

    def close(self) -> None:
        """Release what :meth:`open` took (nothing by default)."""
        return None

    def info(self) -> dict[str, Any]:
        """Backend-specific lines for ``esreid index info`` (its settings by default)."""
        return dict(self.settings)

    # -- items ----------------------------------------------------------------------------

    @abstractmethod
    def add(self, x: np.ndarray, items: list[Item]) -> None:
        """Append float32 rows ``x`` with their items (ids set), at positions ``count``,
        ``count + 1``, ...; the caller has left out the ids already held."""

    @abstractmethod
    def held_ids(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` the backend holds."""

    @abstractmethod
    def items(self, positions: list[int]) -> list[Item]:
        """The items at gallery ``positions`` (IndexError for one out of range)."""

    @abstractmethod
    def all_items(self) -> list[Item]:
        """Every item, in gallery order."""

    def features(self) -> np.ndarray:
        """All descriptors ``[N, D]`` in gallery order."""
        raise NotImplementedError(f"index kind {self.kind!r} does not hold its descriptors "
                                  "in memory")

    # -- search ---------------------------------------------------------------------------

    @abstractmethod
    def search(self, q: np.ndarray, top_k: int, flt: SearchFilter
               ) -> tuple[np.ndarray, np.ndarray]:
        """Positions (int64) and exact distances (float32) of each query's ``top_k``
        nearest items that pass ``flt``, ``[Q, min(top_k, kept)]``, nearest first (ties by
        gallery position); padded with -1 and inf where an approximate backend finds fewer."""

    # -- files ----------------------------------------------------------------------------

    @abstractmethod
    def members(self) -> list[ff.Member]:
        """The archive members (besides the metadata) this backend's state needs."""

    @abstractmethod
    def read(self, zf: zipfile.ZipFile, meta: dict[str, Any], bad: Bad) -> None:
        """Restore the state :meth:`members` wrote (``meta`` is the file's metadata)."""


class InMemoryBackend(SearchBackend):
    """Descriptors in :class:`~esreid.search.features.FeatureBlocks` and item lists, all
    saved in the index file; candidates from one float32 BLAS product per query block."""

    kind: ClassVar[str] = "numpy"
    summary: ClassVar[str] = "exact search with numpy's BLAS"

    def __init__(self, metric: str, dim: int, **settings: Any) -> None:
        """An empty gallery (see :class:`SearchBackend`)."""
        super().__init__(metric, dim, **settings)
        self.blocks = FeatureBlocks(dim)
        self.paths: list[str] = []
        self.labels: list[str | None] = []
        self.cameras: list[str | None] = []
        self.times: list[float | None] = []
        self.ids: list[str] = []
        self._id_set: set[str] = set()

    @property
    def count(self) -> int:
        """Items held."""
        return self.blocks.count

    @property
    def max_norm(self) -> float:
        """The largest descriptor norm held."""
        return self.blocks.max_norm

    def features(self) -> np.ndarray:
        """All descriptors ``[N, D]`` (one array)."""
        return self.blocks.joined()

    def add(self, x: np.ndarray, items: list[Item]) -> None:
        """Append rows and items; subclasses with a structure of their own extend it."""
        self.blocks.append(x)
        self._add_items(items)

    def absolutize(self, resolve: Callable[[str], str]) -> None:
        """Rewrite the relative paths."""
        self.paths = [resolve(p) for p in self.paths]

    def _add_items(self, items: list[Item]) -> None:
        self.paths.extend(it.path for it in items)
        self.labels.extend(it.label for it in items)
        self.cameras.extend(it.camera for it in items)
        self.times.extend(it.time for it in items)
        self.ids.extend(it.id for it in items)  # type: ignore[misc]
        self._id_set.update(it.id for it in items)  # type: ignore[misc]

    def held_ids(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` are held."""
        return {i for i in ids if i in self._id_set}

    def items(self, positions: list[int]) -> list[Item]:
        """The items at ``positions``."""
        return [Item(self.paths[i], self.labels[i], self.cameras[i], self.times[i], self.ids[i])
                for i in positions]

    def all_items(self) -> list[Item]:
        """Every item, in gallery order."""
        return self.items(list(range(self.count)))

    # -- search: the numpy scan, and the hooks a subclass overrides -----------------------

    def scan_bound(self, query_norm: float) -> float:
        """How far :meth:`scan`'s keys can be from the exact ones."""
        return scan_error_bound(self.metric, self.dim, query_norm, self.max_norm)

    def scan_all(self, q: np.ndarray) -> np.ndarray:
        """Approximate keys of queries ``q`` against every row, ``[Q, N]`` (float64)."""
        keys = np.empty((q.shape[0], self.count), dtype=np.float64)
        for block, start in self.blocks.block_spans():
            stop = start + block.shape[0]
            keys[:, start:stop] = scan_keys(q, block, self.blocks.norms[start:stop], self.metric)
        return keys

    def scan(self, q: np.ndarray, n_cand: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n_cand`` best rows of each query by the float32 scan: approximate keys
        (float64) and positions, both ``[Q, n_cand]`` (-1 where a scan finds fewer)."""
        return _best_of(self.scan_all, q, n_cand, self.count)

    def within(self, query: np.ndarray, radius: float) -> np.ndarray:
        """Positions whose scanned key is at most ``radius``."""
        return np.flatnonzero(self.scan_all(query[None])[0] <= radius)

    def search(self, q: np.ndarray, top_k: int, flt: SearchFilter
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k (see :class:`SearchBackend`); a filter scans the kept rows."""
        if not flt.empty:
            kept = np.flatnonzero(flt.mask(self.cameras, self.times))
            if len(kept) < self.count:
                return self._search_subset(q, top_k, kept)
        return exact_top_k(q, top_k, metric=self.metric, total=self.count, scan=self.scan,
                           rows=self.blocks.rows, within=self.within,
                           first=lambda k: np.arange(k, dtype=np.int64),
                           bound=self.scan_bound if self.exact else None)

    def _search_subset(self, q: np.ndarray, top_k: int, kept: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the rows ``kept`` (sorted positions), by the numpy scan."""
        rows = self.blocks.rows(kept)
        norms = self.blocks.norms[kept]
        max_norm = float(norms.max()) if len(kept) else 0.0

        def scan_sub(x: np.ndarray) -> np.ndarray:
            return scan_keys(x, rows, norms, self.metric)

        def scan(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            keys, local = _best_of(scan_sub, x, n, len(kept))
            return keys, np.where(local >= 0, kept[np.maximum(local, 0)], -1)

        def within(query: np.ndarray, radius: float) -> np.ndarray:
            return kept[np.flatnonzero(scan_sub(query[None])[0] <= radius)]

        return exact_top_k(q, top_k, metric=self.metric, total=len(kept), scan=scan,
                           rows=self.blocks.rows, within=within,
                           first=lambda k: kept[:k],
                           bound=lambda n: scan_error_bound(self.metric, self.dim, n, max_norm))

    # -- files ----------------------------------------------------------------------------

    def members(self) -> list[ff.Member]:
        """Item lists and ``features.npy``."""
        blocks, count, dim = self.blocks.blocks, self.count, self.dim
        return [(ff.PATHS_MEMBER, ff.json_writer(self.paths)),
                (ff.LABELS_MEMBER, ff.json_writer(self.labels)),
                (ff.CAMERAS_MEMBER, ff.json_writer(self.cameras)),
                (ff.TIMES_MEMBER, ff.json_writer(self.times)),
                (ff.IDS_MEMBER, ff.json_writer(self.ids)),
                # Looked up at call time, so a test can make the write fail half-way.
                (ff.FEATURES_MEMBER, lambda f: ff.write_features(f, blocks, count, dim))]

    def read(self, zf: zipfile.ZipFile, meta: dict[str, Any], bad: Bad) -> None:
        """Item lists and features from the file (format 1 files lack cameras, times and
        ids: those are None, and ids are derived from path and descriptor)."""
        count = meta["count"]
        names = set(zf.namelist())
        paths = ff.json_member(zf, ff.PATHS_MEMBER)
        labels = ff.json_member(zf, ff.LABELS_MEMBER)
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise bad(f"{ff.PATHS_MEMBER} is not a list of strings")
        if not isinstance(labels, list) or not all(x is None or isinstance(x, str) for x in labels):
            raise bad(f"{ff.LABELS_MEMBER} is not a list of strings and nulls")
        cameras = ff.json_member(zf, ff.CAMERAS_MEMBER) if ff.CAMERAS_MEMBER in names \
            else [None] * count
        times = ff.json_member(zf, ff.TIMES_MEMBER) if ff.TIMES_MEMBER in names \
            else [None] * count
        ids = ff.json_member(zf, ff.IDS_MEMBER) if ff.IDS_MEMBER in names else None
        if not isinstance(cameras, list) or not all(c is None or isinstance(c, str) for c in cameras):
            raise bad(f"{ff.CAMERAS_MEMBER} is not a list of strings and nulls")
        if not isinstance(times, list) or not all(
                t is None or (isinstance(t, (int, float)) and not isinstance(t, bool))
                for t in times):
            raise bad(f"{ff.TIMES_MEMBER} is not a list of numbers and nulls")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            raise bad(f"{ff.IDS_MEMBER} is not a list of strings")
        lengths = {len(paths), len(labels), len(cameras), len(times),
                   count if ids is None else len(ids)}
        if lengths != {count}:
            raise bad(f"{count} items but {len(paths)} paths and {len(labels)} labels "
                      f"({len(cameras)} cameras, {len(times)} times)")
        try:
            features = ff.read_features(zf)
        except (ValueError, EOFError) as exc:
            raise bad(f"{ff.FEATURES_MEMBER}: {ff.one_line(exc)}") from exc
        if features.dtype != np.float32 or features.shape != (count, self.dim):
            raise bad(f"features are {features.dtype} {features.shape}, expected float32 "
                      f"({count}, {self.dim})")
        if ids is None:
            ids = [item_id(p, features=f) for p, f in zip(paths, features, strict=True)]
        if count:
            self.blocks.append(np.ascontiguousarray(features), owned=True)
        self._add_items([Item(*fields) for fields in zip(paths, labels, cameras,
                                                         [None if t is None else float(t)
                                                          for t in times], ids, strict=True)])


def _best_of(scan_all: Callable[[np.ndarray], np.ndarray], q: np.ndarray, n_cand: int,
             total: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_cand`` smallest keys of ``scan_all`` per query, in query blocks small enough
    that the float64 score matrix stays bounded."""
    approx = np.empty((q.shape[0], n_cand), dtype=np.float64)
    cand = np.empty((q.shape[0], n_cand), dtype=np.int64)
    step = max(1, SCAN_BLOCK_SCORES // max(total, 1))
    for start in range(0, q.shape[0], step):
        keys = scan_all(q[start:start + step])
        if n_cand < total:
            part = np.argpartition(keys, n_cand - 1, axis=1)[:, :n_cand]
        else:
            part = np.broadcast_to(np.arange(total), keys.shape)
        cand[start:start + step] = part
        approx[start:start + step] = np.take_along_axis(keys, part, axis=1)
    return approx, cand

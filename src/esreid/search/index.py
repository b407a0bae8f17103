"""A gallery index: descriptors of gallery images with their paths, identity labels, cameras
and capture times, searched by distance, handled through one file.

```python
index = GalleryIndex.create(model.identity, model.metric, model.descriptor_dim)
index.add(features, paths, labels)              # float32 [N, D], N paths, N labels or None
matches = index.search(query_features, top_k=5, model_id=model.identity)
matches[0][0].to_dict()   # {"path": ..., "distance": ..., "rank": 1, "same": ..., "label": ...}
index.save("gallery.esidx"); index = GalleryIndex.load("gallery.esidx")
```

The index's ``kind`` names its search backend (:mod:`esreid.search.backends`, one module
each): ``numpy`` (the default: exact, one float32 BLAS product of the features themselves),
``flat`` (exact, faiss), ``ivf`` (approximate, faiss inverted lists) and ``qdrant`` (exact,
the gallery in a Qdrant collection: a local folder or a server). The exact kinds return what
a brute-force ranking with :func:`esreid.metrics.compute_distance` gives (ties broken by
gallery position), whatever order float32 arithmetic finds the candidates in (see
:mod:`esreid.search.exact`); every kind reports exact distances for what it returns.
Searches take a :class:`~esreid.search.items.SearchFilter` (cameras to leave out, a time
window) on every kind.

Every item has an id derived from its content and path (:func:`esreid.search.items.item_id`):
adding an item the index holds already does nothing, so a retried addition never duplicates.

The file (:mod:`esreid.search.fileformat`) records the model, metric, kind and the
backend's settings, the threshold, and, for the kinds that keep their gallery in the file,
the items and features. Paths are absolute, or relative to the folder of the index file
(never to the working directory): ``esreid serve`` stores uploaded images as
``<index name>.uploads/<id>.png``, so an index and its uploads folder can be moved together.
:meth:`GalleryIndex.file_path` (and every :class:`Match`) gives the path to open.

Several processes may share one index file. Writers take the index's lock file
(:func:`index_lock`, ``.<index name>.lock`` beside it) for their read-modify-write
(:func:`update_index_file`); readers need no lock, since every save is a rename and
:meth:`GalleryIndex.load` reads one file, the old or the new. :meth:`GalleryIndex.changed_on_disk`
tells a long-lived reader (the server) that another process saved a new version.
"""

from __future__ import annotations

import math
import os
import threading
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from esreid.locking import FileLock, LockBusyError, lock_path_for
from esreid.search import fileformat as ff
from esreid.search.backends import UnknownKindError, backend_class, kinds
from esreid.search.backends.base import SearchBackend
from esreid.search.exact import METRICS, check_metric
from esreid.search.fileformat import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_MEMBER,
    IndexFileError,
    file_signature,
    one_line,
    signature_of,
)
from esreid.search.items import (
    NO_FILTER,
    Item,
    SearchFilter,
    camera_from_name,
    check_camera,
    item_id,
    parse_time,
)

#: Every registered backend's name (see :mod:`esreid.search.backends`).
KINDS = kinds()
#: The kind an index gets when none is named: exact, and the fastest exact kind measured
#: by benchmarks/search.py on a 2-core machine (README, "Search speed").
DEFAULT_KIND = "numpy"
#: How long a writer waits for another process's write of the same index, by default.
DEFAULT_WAIT_SECONDS = 300.0

T = TypeVar("T")


class IndexMismatchError(ValueError):
    """Queries or images that do not fit the index: embedded by another model, or of another
    descriptor length. The message is one line naming the index and both values."""


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
    camera: str | None = None
    time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields ``path``, ``distance``, ``rank``, ``same``, ``label``,
        ``camera``, ``time``."""
        return {"path": self.path, "distance": self.distance, "rank": self.rank,
                "same": self.same, "label": self.label, "camera": self.camera,
                "time": self.time}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _positive_int(value: Any, name: str) -> int:
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


class GalleryIndex:
    """Descriptors ``[N, D]`` with their items, the ``model_id`` and ``metric`` they were
    embedded with, an optional verification ``threshold`` (a pair is the same identity when
    its distance is at most the threshold) and where that came from (``threshold_source``),
    searched by the backend of the given ``kind`` (:attr:`backend`).

    ``source`` is the file the index was loaded from or last saved to (absolute; None
    before). Stored paths are absolute, or relative to the index's folder; :meth:`file_path`
    resolves them.
    """

    def __init__(self, model_id: str, metric: str, dim: int, kind: str = DEFAULT_KIND,
                 **settings: Any) -> None:
        """An empty index; see :meth:`create`."""
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
        cls = backend_class(kind)
        self.model_id = model_id
        self.metric = check_metric(metric)
        self.dim = _positive_int(dim, "dim")
        self.kind = kind
        self.backend: SearchBackend = cls(self.metric, self.dim, **settings)
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

    @classmethod
    def create(cls, model_id: str, metric: str, dim: int, kind: str = DEFAULT_KIND,
               replace: bool = False, **settings: Any) -> GalleryIndex:
        """An empty index for descriptors of length ``dim`` made by model ``model_id``,
        searched by backend ``kind`` with its ``settings`` (``nlist``/``nprobe`` for ivf;
        ``store``/``collection``/``api_key_env`` for qdrant). ``replace`` lets a backend
        that keeps its gallery elsewhere empty what is there already (a Qdrant collection
        of that name); otherwise such a gallery is refused."""
        index = cls(model_id, metric, dim, kind, **settings)
        index.backend.open(model_id, create=True, source=index._where(), replace=replace)
        return index

    # -- properties -----------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of gallery items."""
        return self.backend.count

    def __len__(self) -> int:
        """Number of gallery items."""
        return self.backend.count

    @property
    def features(self) -> np.ndarray:
        """The descriptors, float32 ``[N, D]``."""
        return self.backend.features()

    @property
    def paths(self) -> list[str]:
        """Stored paths, in gallery order."""
        return list(getattr(self.backend, "paths", None) or
                    [it.path for it in self.backend.all_items()])

    @property
    def labels(self) -> list[str | None]:
        """Labels (None for unlabelled items), in gallery order."""
        held = getattr(self.backend, "labels", None)
        return list(held) if held is not None else [it.label for it in self.backend.all_items()]

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
    def nlist(self) -> int | None:
        """IVF lists (None for other kinds)."""
        return getattr(self.backend, "nlist", None)

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (None for other kinds)."""
        return getattr(self.backend, "nprobe", None)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if not hasattr(self.backend, "nprobe"):
            raise ValueError(f"nprobe applies to kind='ivf' only, not {self.kind!r}")
        self.backend.nprobe = value  # type: ignore[attr-defined]

    def item(self, i: int) -> Item:
        """Gallery item ``i`` (IndexError when there is none)."""
        if not 0 <= i < self.count:
            raise IndexError(f"no gallery item {i} in {self._where()} ({self.count} items)")
        return self.backend.items([i])[0]

    def file_path(self, i: int) -> str:
        """The path to open for gallery item ``i``: its stored path, resolved against the
        index file's folder when relative."""
        return self.resolve_path(self.item(i).path)

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

    def close(self) -> None:
        """Release what the backend holds outside the process (a Qdrant client)."""
        self.backend.close()

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

    def make_items(self, features: np.ndarray, paths: Sequence[str],
                   labels: Sequence[str | None] | None = None,
                   cameras: Sequence[Any] | None = None, times: Sequence[Any] | None = None,
                   ids: Sequence[str] | None = None) -> list[Item]:
        """Checked items for rows ``features``: labels default to None, cameras to the
        camera a dataset-style file name gives (:func:`~esreid.search.items.camera_from_name`),
        times to None, ids to :func:`~esreid.search.items.item_id` of the file's bytes (the
        descriptor's when the file cannot be read) and its stored path."""
        n = len(paths)
        if features.shape[0] != n:
            raise ValueError(f"got {features.shape[0]} feature rows but {n} paths")
        fields = {"labels": labels, "cameras": cameras, "times": times, "ids": ids}
        for name, values in fields.items():
            if values is not None and len(values) != n:
                raise ValueError(f"got {n} paths but {len(values)} {name}")
        items = []
        for i, path in enumerate(paths):
            label = None if labels is None else labels[i]
            if label is not None and (not isinstance(label, str) or not label):
                raise ValueError(f"a label must be a non-empty string or None, got {label!r}")
            camera = camera_from_name(path) if cameras is None else check_camera(cameras[i])
            time = None if times is None else parse_time(times[i], f"time of {path}")
            if ids is not None:
                iid = ids[i]
            else:
                try:
                    iid = item_id(path, content_file=self.resolve_path(path))
                except OSError:
                    iid = item_id(path, features=features[i])
            items.append(Item(path, label, camera, time, iid))
        return items

    def add(self, features: Any, paths: Sequence[str | os.PathLike],
            labels: Sequence[str | None] | None = None, model_id: str | None = None, *,
            cameras: Sequence[Any] | None = None, times: Sequence[Any] | None = None,
            ids: Sequence[str] | None = None) -> int:
        """Add descriptors ``[N, D]`` (copied) with their ``paths``, ``labels`` (default:
        all None), ``cameras``, capture ``times`` and ``ids`` (defaults: see
        :meth:`make_items`); returns how many were new. An item whose id the index holds
        already (or that comes twice) is left out: adding is idempotent. A path is absolute
        or relative to the index file's folder. ``model_id``, when given, must be the
        index's model. The first batch added to an ``ivf`` index trains its lists."""
        self.check_model(model_id, "the added images")
        x = self._as_rows(features, "the added features")
        items = self.make_items(x, [os.fspath(p) for p in paths], labels, cameras, times, ids)
        if not items:
            return 0
        held = self.backend.held_ids([it.id for it in items])  # type: ignore[misc]
        keep, seen = [], set()
        for i, it in enumerate(items):
            if it.id not in held and it.id not in seen:
                keep.append(i)
                seen.add(it.id)
        if not keep:
            return 0
        if len(keep) < len(items):
            x = x[keep]
            items = [items[i] for i in keep]
        self.backend.add(x, items)
        self.updated = _now()
        return len(items)

    # -- searching ------------------------------------------------------------------------

    def search(self, queries: Any, top_k: int = 10, model_id: str | None = None,
               filter: SearchFilter | None = None) -> list[list[Match]]:
        """The ``top_k`` nearest gallery items of each query ``[Q, D]`` (or one ``[D]``)
        that pass ``filter``, nearest first. ``model_id``, when given, must be the index's
        model."""
        idx, dist = self.search_arrays(queries, top_k, model_id, filter)
        wanted = sorted({int(i) for i in idx.ravel() if i >= 0})
        found = dict(zip(wanted, self.backend.items(wanted), strict=True))
        out = []
        for row_idx, row_dist in zip(idx, dist, strict=True):
            matches = []
            for rank, (i, d) in enumerate(zip(row_idx.tolist(), row_dist.tolist(), strict=True),
                                          start=1):
                if i < 0:
                    break
                it = found[i]
                same = None if self._threshold is None else bool(d <= self._threshold)
                matches.append(Match(self.resolve_path(it.path), float(d), rank, same, it.label,
                                     i, it.camera, it.time))
            out.append(matches)
        return out

    def search_arrays(self, queries: Any, top_k: int = 10, model_id: str | None = None,
                      filter: SearchFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Gallery positions (int64) and distances (float32), both ``[Q, min(top_k, kept)]``,
        nearest first; an approximate index that finds fewer pads with -1 and inf."""
        self.check_model(model_id)
        q = self._as_rows(queries, "the queries")
        top_k = _positive_int(top_k, "top_k")
        flt = NO_FILTER if filter is None else filter
        if not isinstance(flt, SearchFilter):
            raise TypeError(f"filter must be a SearchFilter, got {type(flt).__name__}")
        return self.backend.search(q, top_k, flt)

    # -- files ----------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """What the index file's ``esreid-index.json`` holds."""
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "model_id": self.model_id,
            "metric": self.metric, "dim": self.dim, "count": self.count, "kind": self.kind,
            "backend": self.backend.saved_settings(), "max_norm": self.backend.max_norm,
            "threshold": self._threshold, "threshold_source": self.threshold_source,
            "created": self.created, "updated": self.updated,
            "esreid_version": _esreid_version(), "model_path": self.model_path,
        }

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
        path = Path(os.path.expandvars(os.fspath(path))).expanduser().absolute()
        if self.source is not None and path.parent != self.source.parent:
            self.backend.absolutize(self.resolve_path)
        ff.write_archive(path, self.metadata(), self.backend.members())
        self.source = path
        self.signature = file_signature(path)
        return path

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """The metadata of the index file at ``path`` (count, model, kind, ...) without
        reading its features. Raises :class:`IndexFileError` for a file that is not an
        index, OSError when it cannot be read."""
        return ff.read_metadata(path)

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
                signature = signature_of(os.fstat(f.fileno()))
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
                                         f"{one_line(exc)}); rebuild it or restore a copy") from exc
                raise IndexFileError(f"{path}: not an esreid gallery index (not a zip archive)") from exc
            with zf:
                if META_MEMBER not in zf.namelist():
                    raise IndexFileError(f"{path}: not an esreid gallery index (a zip archive "
                                         f"without {META_MEMBER})")
                try:
                    index = cls._read(zf, path)
                except (IndexFileError, UnknownKindError, ImportError):
                    raise
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError,
                        UnicodeDecodeError, RuntimeError) as exc:
                    raise IndexFileError(f"{path}: damaged gallery index ({one_line(exc)}); "
                                         "rebuild it or restore a copy") from exc
        index.signature = signature
        # Outside the file's error handling: a missing or foreign collection is not damage.
        index.backend.open(index.model_id, create=False, source=index._where())
        return index

    @classmethod
    def _read(cls, zf: zipfile.ZipFile, path: Path) -> GalleryIndex:
        def bad(what: str) -> IndexFileError:
            return IndexFileError(f"{path}: damaged gallery index ({what}); rebuild it or "
                                  "restore a copy")

        meta = ff.json_member(zf, META_MEMBER)
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
        if meta["metric"] not in METRICS:
            raise bad(f"metric {meta['metric']!r}")
        if meta["kind"] not in KINDS:
            raise IndexFileError(f"{path}: index kind {meta['kind']!r} is not known to this "
                                 f"esreid (known kinds: {', '.join(KINDS)})")
        count = meta["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise bad(f"count {count!r}")
        settings = meta.get("backend")
        if settings is None:  # format 1
            settings = {k: meta.get(k) for k in ("nlist", "nprobe") if meta.get(k) is not None}
        if not isinstance(settings, dict):
            raise bad(f"{META_MEMBER}: 'backend' is not an object")
        try:
            index = cls(meta["model_id"], meta["metric"], meta["dim"], meta["kind"], **settings)
        except ValueError as exc:
            raise bad(f"{META_MEMBER}: {exc}") from exc
        index._threshold = _check_threshold(meta.get("threshold"))
        index.threshold_source = dict(meta.get("threshold_source") or {})
        model_path = meta.get("model_path")
        index.model_path = model_path if isinstance(model_path, str) and model_path else None
        index.created = meta.get("created", index.created)
        index.updated = meta.get("updated", index.updated)
        index.source = path
        index.backend.read(zf, meta, bad)
        if index.backend.count != count:
            raise bad(f"{META_MEMBER} says {count} items, the gallery holds {index.backend.count}")
        return index

    def info(self) -> dict[str, Any]:
        """A summary: count, dim, metric, model_id, kind and the backend's settings,
        threshold and its source, how many items are labelled and how many identities, the
        file and its size in bytes (None before the first save), created/updated times (UTC)."""
        size = None
        if self.source is not None:
            try:
                size = self.source.stat().st_size
            except OSError:
                size = None
        labelled = [x for x in self.labels if x is not None]
        return {
            "count": self.count, "dim": self.dim, "metric": self.metric,
            "model_id": self.model_id, "model_path": self.model_path, "kind": self.kind,
            **self.backend.info(),
            "threshold": self._threshold,
            "threshold_source": dict(self.threshold_source), "labels": len(labelled),
            "identities": len(set(labelled)),
            "file": None if self.source is None else str(self.source), "file_size": size,
            "created": self.created, "updated": self.updated, "format_version": FORMAT_VERSION,
        }


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


def _esreid_version() -> str:
    from esreid import __version__

    return __version__


def recall_at_k(index: GalleryIndex, queries: Any, k: int = 10) -> float:
    """Mean fraction of each query's exact top ``k`` that ``index.search`` returns.

    The exact ranking comes from an exact (numpy) search over the same features. A returned
    item whose distance equals the exact k-th distance counts as found (with ties the exact
    top k is one of several equally valid sets). An exact index gives 1.0.
    """
    from esreid.search.backends.base import InMemoryBackend

    k = _positive_int(k, "k")
    q = index._as_rows(queries, "the queries")
    if index.count == 0 or q.shape[0] == 0:
        raise ValueError("recall needs a non-empty index and at least one query")
    got_idx, got_dist = index.search_arrays(q, k)
    if index.backend.exact:
        exact_dist = got_dist
    else:
        twin = InMemoryBackend(index.metric, index.dim)
        twin.blocks = index.backend.blocks.shared_copy()  # type: ignore[attr-defined]
        _, exact_dist = twin.search(q, k, NO_FILTER)
    kth = exact_dist[:, -1:]
    found = ((got_idx >= 0) & (got_dist <= kth)).sum(axis=1)
    return float(np.mean(np.minimum(found, exact_dist.shape[1]) / exact_dist.shape[1]))


__all__ = ["DEFAULT_KIND", "DEFAULT_WAIT_SECONDS", "FORMAT_VERSION", "KINDS", "GalleryIndex",
           "IndexFileError", "IndexMismatchError", "LockBusyError", "Match", "file_signature",
           "index_lock", "recall_at_k", "update_index_file"]

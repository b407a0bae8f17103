"""``kind="qdrant"``: the gallery in a Qdrant collection; the index file keeps only its
metadata (model, metric, threshold, the store and the collection).

``store`` is a folder (qdrant-client's embedded local mode: no server, one process at a
time) or an ``http(s)://`` URL of a Qdrant server or cluster, whose API key is read from the
environment variable ``api_key_env`` (``QDRANT_API_KEY`` by default), never from a file or
the command line. ``:memory:`` keeps the collection in the process (benchmarks).

Each point's id is the item's id (content and path; :func:`esreid.search.items.item_id`), so
upserting an image again overwrites it instead of adding a second one. Its payload holds the
``path``, ``label``, ``camera``, capture ``time``, gallery position ``pos`` and ``model_id``.
Cosine collections hold two vectors per point: ``scan`` (normalised by Qdrant, searched) and
``raw`` (the descriptor as embedded, never searched; on disk on a server), from which the
candidates are rescored exactly in float64 (:func:`esreid.search.exact.exact_top_k`), so
results equal the faiss and numpy kinds' whatever Qdrant's arithmetic. Searches ask Qdrant
for an exact scan (``exact=True``, quantisation ignored).

The file's ``count`` is the truth: an addition upserts positions ``count``, ``count + 1``,
... and only then is the file saved with the new count. Points at or past the file's count
(left by an addition that was interrupted before the save) are excluded from every search
and lookup, and deleted by the next addition, so the collection always answers what the
index file says.
"""

from __future__ import annotations

import atexit
import os
import zipfile
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from esreid.search.backends import register
from esreid.search.backends.base import Bad, SearchBackend
from esreid.search.exact import exact_top_k, scan_error_bound
from esreid.search.fileformat import Member
from esreid.search.items import Item, SearchFilter

EXTRA = "qdrant"
#: Points sent per upsert call.
UPSERT_BATCH = 256
#: Points read per scroll call.
SCROLL_BATCH = 1024
#: Qdrant's arithmetic is not ours (its own normalisation and summation order): its keys
#: are trusted to within this many times the bound of a float32 scan, twice what the
#: derivation for two float32 normalisations and one float32 dot product needs.
BOUND_FACTOR = 3.0
_PAYLOAD = ["path", "label", "camera", "time", "pos"]
_CLIENTS: dict[tuple[str, str], Any] = {}


def import_qdrant() -> Any:
    """The qdrant_client module, or an ImportError that says how to install it."""
    try:
        import qdrant_client
    except ImportError as exc:
        raise ImportError("index kind 'qdrant' needs qdrant-client: pip install "
                          f"'esreid[{EXTRA}]' (or pip install qdrant-client)") from exc
    return qdrant_client


def is_url(store: str) -> bool:
    """Whether ``store`` names a Qdrant server rather than a local folder."""
    return store.startswith(("http://", "https://"))


def client_for(store: str, api_key_env: str) -> Any:
    """One client per store and process (local mode allows one per folder)."""
    key = (store, api_key_env)
    if key in _CLIENTS:
        return _CLIENTS[key]
    qc = import_qdrant()
    if is_url(store):
        client = qc.QdrantClient(url=store, api_key=os.environ.get(api_key_env) or None,
                                 timeout=60)
    elif store == ":memory:":
        client = qc.QdrantClient(location=":memory:")
    else:
        os.makedirs(store, exist_ok=True)
        try:
            client = qc.QdrantClient(path=store)
        except RuntimeError as exc:
            if "already accessed" not in str(exc):
                raise
            raise RuntimeError(f"qdrant store {store} is in use by another process (local "
                               "mode lets one process at a time open a store: stop the other, "
                               "e.g. esreid serve, or run a Qdrant server and use its URL)") from exc
    _CLIENTS[key] = client
    return client


def close_store(store: str | None = None) -> None:
    """Close this process's client of ``store`` (every store when None), so that another
    process may open a local store; indexes of this process using it open it again when
    they are next loaded."""
    for key in [k for k in _CLIENTS if store is None or k[0] == store]:
        client = _CLIENTS.pop(key)
        try:
            client.close()
        except Exception:  # a client that cannot close has nothing left to release
            pass


# Before interpreter shutdown: qdrant-client's own finaliser fails once modules are gone.
atexit.register(close_store)


@register
class QdrantBackend(SearchBackend):
    """Exact search over a Qdrant collection (see the module docstring)."""

    kind = "qdrant"
    summary = ("exact search in a Qdrant collection (--store FOLDER for local mode, or "
               "http(s)://HOST:6333 for a server or cluster)")
    params: ClassVar[dict[str, Any]] = {"store": None, "collection": None,
                                        "api_key_env": "QDRANT_API_KEY"}

    def __init__(self, metric: str, dim: int, **settings: Any) -> None:
        """A backend for collection ``collection`` in ``store`` (both required)."""
        super().__init__(metric, dim, **settings)
        store, collection = self.settings.get("store"), self.settings.get("collection")
        if not isinstance(store, str) or not store:
            raise ValueError("index kind 'qdrant' needs a store: a folder (local mode) or an "
                             "http(s):// URL (--store)")
        if not isinstance(collection, str) or not collection:
            raise ValueError("index kind 'qdrant' needs a collection name (--collection)")
        if not is_url(store) and store != ":memory:":
            store = os.path.abspath(os.path.expanduser(store))
            self.settings["store"] = store
        self.store, self.collection = store, collection
        self._count = 0
        self._max_norm = 0.0
        self._stale = False  # points at or past count may exist (an interrupted addition)
        self._cache: dict[int, tuple[Item, np.ndarray | None]] = {}
        self.client: Any = None
        self.model_id: str | None = None
        self._where = f"qdrant collection {collection!r} in {store}"

    # -- state ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Items the index file counts."""
        return self._count

    @property
    def max_norm(self) -> float:
        """The largest descriptor norm added (recorded in the index file)."""
        return self._max_norm

    def saved_settings(self) -> dict[str, Any]:
        """store, collection and the name of the API key's variable (never the key)."""
        return {"store": self.store, "collection": self.collection,
                "api_key_env": self.settings["api_key_env"]}

    def _models(self) -> Any:
        return import_qdrant().models

    def _vector_names(self) -> tuple[str, str]:
        """(the searched vector, the one rescoring reads)."""
        return ("scan", "raw") if self.metric == "cosine" else ("scan", "scan")

    def open(self, model_id: str, create: bool, source: str, replace: bool = False) -> None:
        """Connect; create (or, with ``replace``, recreate) the collection for a new index,
        or check that the existing one fits the file (dimension, metric, model)."""
        m = self._models()
        self.model_id = model_id
        self.client = client_for(self.store, self.settings["api_key_env"])
        exists = self.client.collection_exists(self.collection)
        if create:
            if exists and replace:
                self.client.delete_collection(self.collection)
                exists = False
            if exists:
                held = self.client.count(self.collection, exact=True).count
                if held:
                    raise ValueError(f"{self._where} already holds {held} points: choose another "
                                     "collection (--collection), or replace it (--overwrite)")
                self._check_config()
                return
            distance = m.Distance.COSINE if self.metric == "cosine" else m.Distance.EUCLID
            vectors = {"scan": m.VectorParams(size=self.dim, distance=distance)}
            if self.metric == "cosine":
                # Never searched: no graph, and on a server kept on disk.
                vectors["raw"] = m.VectorParams(size=self.dim, distance=m.Distance.DOT,
                                                on_disk=True, hnsw_config=m.HnswConfigDiff(m=0))
            self.client.create_collection(self.collection, vectors_config=vectors)
            if is_url(self.store):
                # Local mode ignores payload indexes (and says so); a server needs them for
                # the filters, the position lookups and the model check.
                for field, schema in (("pos", m.PayloadSchemaType.INTEGER),
                                      ("camera", m.PayloadSchemaType.KEYWORD),
                                      ("time", m.PayloadSchemaType.FLOAT),
                                      ("model_id", m.PayloadSchemaType.KEYWORD)):
                    self.client.create_payload_index(self.collection, field, schema)
            return
        if not exists:
            raise FileNotFoundError(f"{source}: its {self._where} does not exist (deleted, or "
                                    "another store): rebuild the index")
        self._check_config()
        points, _ = self.client.scroll(self.collection, limit=1, with_payload=["model_id"])
        if points and points[0].payload.get("model_id") != model_id:
            from esreid.search.index import IndexMismatchError

            raise IndexMismatchError(
                f"{source}: its {self._where} holds descriptors of model "
                f"{points[0].payload.get('model_id')}, but the index file says model {model_id}: "
                "a collection built by another model is refused")
        held = self.client.count(self.collection, exact=True).count
        self._stale = held > self._count

    def _check_config(self) -> None:
        m = self._models()
        info = self.client.get_collection(self.collection)
        vectors = info.config.params.vectors
        scan = vectors.get("scan") if isinstance(vectors, dict) else None
        want = m.Distance.COSINE if self.metric == "cosine" else m.Distance.EUCLID
        if scan is None or scan.size != self.dim or scan.distance != want or (
                self.metric == "cosine" and "raw" not in vectors):
            got = "unnamed vectors" if scan is None else f"{scan.size}-d {scan.distance}"
            raise ValueError(f"{self._where} holds {got}, not the {self.dim}-d {self.metric} "
                             "vectors esreid writes: use another collection")

    def close(self) -> None:
        """Close the store's client (for every index of this process that uses it)."""
        close_store(self.store)
        self.client = None

    def info(self) -> dict[str, Any]:
        """store, collection and how many points the collection holds."""
        held = self.client.count(self.collection, exact=True).count if self.client else None
        return {"store": self.store, "collection": self.collection, "points": held}

    # -- filters --------------------------------------------------------------------------

    def _filter(self, flt: SearchFilter) -> Any:
        m = self._models()
        must, must_not = [], []
        if self._stale or is_url(self.store):
            # A server may be read while another process adds (under the index lock) points
            # the file does not count yet; local mode has one process, and only after an
            # interrupted addition such points.
            must.append(m.FieldCondition(key="pos", range=m.Range(lt=self._count)))
        if flt.timed:
            must.append(m.FieldCondition(key="time", range=m.Range(gte=flt.after, lte=flt.before)))
        if flt.camera_not:
            must_not.append(m.FieldCondition(key="camera",
                                             match=m.MatchAny(any=sorted(flt.camera_not))))
        if not must and not must_not:
            return None
        return m.Filter(must=must or None, must_not=must_not or None)

    def _positions_filter(self, positions: list[int]) -> Any:
        m = self._models()
        return m.Filter(must=[m.FieldCondition(key="pos", match=m.MatchAny(any=positions))])

    # -- items ----------------------------------------------------------------------------

    def add(self, x: np.ndarray, items: list[Item]) -> None:
        """Drop what an interrupted addition left, then upsert the new points at positions
        count, count + 1, ...; the count grows only once all are in."""
        m = self._models()
        if self._stale:
            self.client.delete(self.collection, wait=True, points_selector=m.FilterSelector(
                filter=m.Filter(must=[m.FieldCondition(key="pos", range=m.Range(gte=self._count))])))
            self._stale = False
        cosine = self.metric == "cosine"
        for start in range(0, len(items), UPSERT_BATCH):
            points = []
            for j in range(start, min(start + UPSERT_BATCH, len(items))):
                it, row = items[j], x[j].tolist()
                payload = {"path": it.path, "label": it.label, "camera": it.camera,
                           "time": it.time, "pos": self._count + j, "model_id": self.model_id,
                           "relative": not os.path.isabs(it.path)}
                points.append(m.PointStruct(id=it.id, vector={"scan": row, "raw": row} if cosine
                                            else {"scan": row}, payload=payload))
            # From here until the count grows, the collection holds points the file does not.
            self._stale = True
            self.client.upsert(self.collection, points=points, wait=True)
        self._count += len(items)
        self._stale = False
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        self._max_norm = max(self._max_norm, float(norms.max()))

    def held_ids(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` are points the file counts."""
        out = set()
        for start in range(0, len(ids), SCROLL_BATCH):
            for p in self.client.retrieve(self.collection, ids=ids[start:start + SCROLL_BATCH],
                                          with_payload=["pos"]):
                if p.payload.get("pos", self._count) < self._count:
                    out.add(str(p.id))
        return out

    @staticmethod
    def _item(point: Any) -> Item:
        p = point.payload
        return Item(p["path"], p.get("label"), p.get("camera"), p.get("time"), str(point.id))

    def _fetch(self, positions: list[int], vectors: bool) -> None:
        """Read the points at ``positions`` into the cache."""
        want = [pos for pos in positions
                if pos not in self._cache or (vectors and self._cache[pos][1] is None)]
        raw = self._vector_names()[1]
        for start in range(0, len(want), SCROLL_BATCH):
            chunk = want[start:start + SCROLL_BATCH]
            points, _ = self.client.scroll(self.collection,
                                           scroll_filter=self._positions_filter(chunk),
                                           limit=len(chunk), with_payload=_PAYLOAD,
                                           with_vectors=[raw] if vectors else False)
            for p in points:
                self._remember(p, raw if vectors else None)

    def _remember(self, point: Any, vector_name: str | None) -> int:
        pos = int(point.payload["pos"])
        vec = None
        if vector_name is not None and point.vector is not None:
            vec = np.asarray(point.vector[vector_name], dtype=np.float32)
        if pos < self._count:
            self._cache[pos] = (self._item(point), vec)
        return pos

    def items(self, positions: list[int]) -> list[Item]:
        """The items at ``positions`` (from the last search's answer, or read)."""
        self._fetch(positions, vectors=False)
        try:
            return [self._cache[p][0] for p in positions]
        except KeyError as err:
            raise IndexError(f"no gallery item {err.args[0]} in {self._where}") from None

    def all_items(self) -> list[Item]:
        """Every item the file counts, in gallery order (reads the whole payload)."""
        out: dict[int, Item] = {}
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=SCROLL_BATCH,
                                                offset=offset, with_payload=_PAYLOAD)
            for p in points:
                if int(p.payload["pos"]) < self._count:
                    out[int(p.payload["pos"])] = self._item(p)
            if offset is None:
                break
        return [out[i] for i in sorted(out)]

    def features(self) -> np.ndarray:
        """Every descriptor the file counts, ``[N, D]`` in gallery order (reads them all)."""
        raw = self._vector_names()[1]
        out = np.empty((self._count, self.dim), dtype=np.float32)
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=SCROLL_BATCH,
                                                offset=offset, with_payload=["pos"],
                                                with_vectors=[raw])
            for p in points:
                pos = int(p.payload["pos"])
                if pos < self._count:
                    out[pos] = p.vector[raw]
            if offset is None:
                break
        return out

    def absolutize(self, resolve: Callable[[str], str]) -> None:
        """Rewrite the payload paths stored relative to the index file."""
        m = self._models()
        relative = m.Filter(must=[m.FieldCondition(key="relative", match=m.MatchValue(value=True))])
        points, _ = self.client.scroll(self.collection, scroll_filter=relative,
                                       limit=max(self._count, 1), with_payload=["path"])
        for p in points:
            self.client.set_payload(self.collection, payload={"path": resolve(p.payload["path"]),
                                                              "relative": False}, points=[p.id])
        self._cache.clear()

    # -- search ---------------------------------------------------------------------------

    def search(self, q: np.ndarray, top_k: int, flt: SearchFilter
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k (see the module docstring)."""
        m = self._models()
        self._cache.clear()
        query_filter = self._filter(flt)
        total = self._count if flt.empty else self.client.count(
            self.collection, count_filter=query_filter, exact=True).count
        scan_name, raw_name = self._vector_names()
        # Local mode always scans exactly (and warns about search parameters).
        params = m.SearchParams(exact=True, quantization=m.QuantizationSearchParams(
            ignore=True)) if is_url(self.store) else None
        cosine = self.metric == "cosine"

        def ask(query: np.ndarray, limit: int, threshold: float | None) -> list[Any]:
            return self.client.query_points(
                self.collection, query=query.tolist(), using=scan_name, limit=max(limit, 1),
                query_filter=query_filter, search_params=params, score_threshold=threshold,
                with_payload=_PAYLOAD, with_vectors=[raw_name]).points

        def keys_of(points: list[Any]) -> np.ndarray:
            scores = np.array([p.score for p in points], dtype=np.float64)
            return 1.0 - scores if cosine else scores * scores

        def scan(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            keys = np.full((len(x), n), np.inf)
            pos = np.full((len(x), n), -1, dtype=np.int64)
            for i, row in enumerate(x):
                points = ask(row, n, None)[:n]
                pos[i, :len(points)] = [self._remember(p, raw_name) for p in points]
                keys[i, :len(points)] = keys_of(points)
            return keys, pos

        def within(query: np.ndarray, radius: float) -> np.ndarray:
            # Qdrant keeps scores strictly beyond the threshold: room on the safe side.
            threshold = (1.0 - radius - 1e-6) if cosine else float(np.sqrt(radius)) * (1 + 1e-6) + 1e-30
            points = ask(query, total, threshold)
            return np.array([self._remember(p, raw_name) for p in points], dtype=np.int64)

        def rows(positions: np.ndarray) -> np.ndarray:
            self._fetch([int(p) for p in positions], vectors=True)
            out = np.empty((len(positions), self.dim), dtype=np.float32)
            for j, p in enumerate(positions):
                out[j] = self._cache[int(p)][1]
            return out

        def first(k: int) -> np.ndarray:
            points, _ = self.client.scroll(self.collection, scroll_filter=query_filter, limit=k,
                                           order_by=m.OrderBy(key="pos"), with_payload=_PAYLOAD)
            return np.array([self._remember(p, None) for p in points], dtype=np.int64)

        def bound(query_norm: float) -> float:
            return BOUND_FACTOR * scan_error_bound(self.metric, self.dim, query_norm,
                                                   self._max_norm)

        return exact_top_k(q, top_k, metric=self.metric, total=total, scan=scan, rows=rows,
                           within=within, first=first, bound=bound)

    # -- files ----------------------------------------------------------------------------

    def members(self) -> list[Member]:
        """Nothing besides the metadata: the gallery is in the collection."""
        return []

    def read(self, zf: zipfile.ZipFile, meta: dict[str, Any], bad: Bad) -> None:
        """The count and the largest norm from the metadata."""
        max_norm = meta.get("max_norm")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm < 0:
            raise bad(f"max_norm {max_norm!r}")
        self._count, self._max_norm = int(meta["count"]), float(max_norm)

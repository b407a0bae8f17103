"""``kind="flat"`` and ``kind="ivf"``: faiss finds the candidates.

* ``flat``: exact; a faiss ``IndexFlatIP`` of L2-normalised copies (cosine) or
  ``IndexFlatL2`` (euclidean). Memory: the features plus faiss's copy, which is rebuilt from
  the features on load rather than stored twice.
* ``ivf``: approximate; faiss ``IndexIVFFlat`` with ``nlist`` lists trained on the first
  batch added, ``nprobe`` of them visited per query; saved as ``faiss.index``.
  :func:`esreid.search.recall_at_k` measures what it misses.
"""

from __future__ import annotations

import math
import zipfile
from typing import Any, ClassVar

import numpy as np

from esreid.search.backends import register
from esreid.search.backends.base import Bad, InMemoryBackend
from esreid.search.exact import faiss_keys, faiss_vectors
from esreid.search.fileformat import Member
from esreid.search.items import Item

FAISS_MEMBER = "faiss.index"
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


def import_faiss() -> Any:
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("index kinds 'flat' and 'ivf' need faiss: pip install faiss-cpu "
                          "(kind 'numpy' does not)") from exc
    return faiss


def default_nlist(n: int) -> int:
    """IVF lists for a first batch of ``n`` descriptors: about ``sqrt(n)``, with at least
    39 training vectors per list (faiss's minimum for a meaningful k-means)."""
    return max(1, min(round(math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists an IVF search visits by default: a quarter of them (recall@10 0.97 on the
    clustered 4096-d descriptors of benchmarks/search.py at 100,000 images; an eighth
    gave 0.91)."""
    return max(1, nlist // 4)


def _positive(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@register
class FlatBackend(InMemoryBackend):
    """Exact search; faiss's flat scan finds the candidates."""

    kind = "flat"
    summary = "exact faiss search (a second, normalised copy of the features)"

    def __init__(self, metric: str, dim: int, **settings: Any) -> None:
        """An empty gallery; faiss is imported when the first rows arrive."""
        super().__init__(metric, dim, **settings)
        self.structure: Any = None

    def _new_flat(self) -> Any:
        faiss = import_faiss()
        return faiss.IndexFlatIP(self.dim) if self.metric == "cosine" else faiss.IndexFlatL2(self.dim)

    def _ensure_structure(self, first_batch: np.ndarray) -> None:
        if self.structure is None:
            self.structure = self._new_flat()

    def _add_to_structure(self, x: np.ndarray) -> None:
        # One buffer for all chunks: fresh memory for each would be faulted in page by page.
        buffer = np.empty((min(ADD_CHUNK_ROWS, len(x)), self.dim), dtype=np.float32)
        for start in range(0, x.shape[0], ADD_CHUNK_ROWS):
            chunk = x[start:start + ADD_CHUNK_ROWS]
            self.structure.add(faiss_vectors(chunk, self.metric, out=buffer[:len(chunk)]))

    def add(self, x: np.ndarray, items: list[Item]) -> None:
        """Append to faiss's structure, then to the features and items."""
        self._ensure_structure(x)
        self._add_to_structure(x)
        super().add(x, items)

    def scan(self, q: np.ndarray, n_cand: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's ``n_cand`` best rows per query."""
        scores, cand = self.structure.search(faiss_vectors(q, self.metric), n_cand)
        return faiss_keys(scores, self.metric), cand

    def within(self, query: np.ndarray, radius: float) -> np.ndarray:
        """faiss's range search, with room for its float32 radius."""
        prepared = faiss_vectors(query[None], self.metric)
        if self.metric == "cosine":
            # faiss keeps inner products strictly above the radius.
            lims, _, idx = self.structure.range_search(prepared, float(1.0 - radius) - 1e-6)
        else:
            # faiss keeps squared distances strictly below the radius.
            lims, _, idx = self.structure.range_search(prepared, radius * (1 + 1e-6) + 1e-30)
        return idx[lims[0]:lims[1]].astype(np.int64)

    def read(self, zf: zipfile.ZipFile, meta: dict[str, Any], bad: Bad) -> None:
        """Features and items, then faiss's copy rebuilt from them."""
        super().read(zf, meta, bad)
        if self.count:
            self.structure = self._new_flat()
            for block in self.blocks.blocks:
                self._add_to_structure(block)


@register
class IVFBackend(FlatBackend):
    """Approximate search over faiss's inverted lists."""

    kind = "ivf"
    summary = "approximate faiss search (inverted lists) for very large galleries"
    exact = False
    params: ClassVar[dict[str, Any]] = {"nlist": None, "nprobe": None}

    def __init__(self, metric: str, dim: int, **settings: Any) -> None:
        """An empty gallery with ``nlist`` lists (default from the first batch, which
        trains them) of which ``nprobe`` are visited per query."""
        for name in ("nlist", "nprobe"):
            _positive(settings.get(name), name)
        super().__init__(metric, dim, **settings)
        self.quantizer: Any = None  # faiss does not own an IVF quantizer made in Python

    @property
    def nlist(self) -> int | None:
        """Lists (None before the first batch trains them, unless given)."""
        return self.settings.get("nlist")

    @property
    def nprobe(self) -> int | None:
        """Lists visited per query."""
        given = self.settings.get("nprobe")
        return given if given is not None or self.nlist is None else default_nprobe(self.nlist)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.settings["nprobe"] = _positive(value, "nprobe")
        if self.structure is not None:
            self.structure.nprobe = min(self.settings["nprobe"], self.nlist)

    def _ensure_structure(self, first_batch: np.ndarray) -> None:
        if self.structure is not None:
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
        self.settings["nlist"] = nlist
        self.quantizer, self.structure = quantizer, ivf
        ivf.nprobe = min(self.nprobe, nlist)

    def members(self) -> list[Member]:
        """Items, features and the serialised lists."""
        members = super().members()
        if self.structure is not None:
            data = import_faiss().serialize_index(self.structure)
            members.append((FAISS_MEMBER, lambda f: f.write(memoryview(data))))
        return members

    def read(self, zf: zipfile.ZipFile, meta: dict[str, Any], bad: Bad) -> None:
        """Features, items and the saved lists (checked against the features)."""
        InMemoryBackend.read(self, zf, meta, bad)
        if FAISS_MEMBER not in zf.namelist():
            if self.count:
                raise bad(f"an ivf index of {self.count} items without {FAISS_MEMBER}")
            return
        faiss = import_faiss()
        data = np.frombuffer(zf.read(FAISS_MEMBER), dtype=np.uint8)
        # deserialize_index returns the concrete class already; downcast_index would make a
        # second proxy that does not own the index (and sees freed memory once this one dies).
        structure = faiss.deserialize_index(data)
        want = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if not isinstance(structure, faiss.IndexIVFFlat) or structure.d != self.dim \
                or structure.ntotal != self.count or structure.metric_type != want:
            raise bad(f"{FAISS_MEMBER} does not match the features")
        self.settings["nlist"] = int(structure.nlist)
        self.structure = structure
        structure.nprobe = min(self.nprobe, self.nlist)

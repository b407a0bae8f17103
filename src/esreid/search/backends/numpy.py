"""``kind="numpy"`` (the default): exact search from one matrix product of the queries and
the gallery, rescored exactly.

The scan kernel is chosen per gallery (the ``scan`` setting): ``float32`` is one BLAS
product with the float32 features themselves (no second copy, no faiss). ``bfloat16``
(cosine only) keeps a normalised bfloat16 copy of the gallery (half the features' memory)
and scans it with torch's bfloat16 matrix product (float32 accumulation; on processors
with bfloat16 dot-product units, such as AVX512-BF16, much faster than float32 for batches
of queries and as fast for one, since it reads half the bytes). Its keys are within
:func:`bf16_scan_bound` of the exact ones, so rescoring keeps the results exact; it asks
for :data:`BF16_MARGIN` extra candidates so that the second pass stays rare. ``auto`` (the
default) takes ``bfloat16`` for cosine galleries of at least :data:`BF16_MIN_ROWS` items
when torch is installed, else ``float32``; benchmarks/search.py measures both.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import numpy as np

from esreid.search.backends import register
from esreid.search.backends.base import InMemoryBackend
from esreid.search.exact import (
    CANDIDATE_MARGIN,
    UNIT_ROUNDOFF,
    exact_top_k,
    faiss_vectors,
    scan_error_bound,
)
from esreid.search.items import SearchFilter

SCANS = ("auto", "float32", "bfloat16")
#: Below this many items a float32 scan is fast anyway, and no second copy is made.
BF16_MIN_ROWS = 20_000
#: Extra candidates of a bfloat16 scan: its bound (about 8e-3 in cosine distance) is wider
#: than float32's, and rescoring a few hundred rows costs far less than a second scan.
BF16_MARGIN = 256
#: Rows converted to bfloat16 at a time when the copy is made.
_COPY_ROWS = 8192


def bf16_scan_bound(dim: int) -> float:
    """How far a bfloat16 scan's cosine key can be from the exact one: the float32 scan's
    bound (normalising, summing in float32) plus rounding each unit component of the query
    and of the row to bfloat16 (relative ``2^-8`` each, so ``2^-7 + 2^-16`` on a product,
    and ``sum |q_i g_i| <= 1``), plus room for products flushed to zero below float32's
    normal range."""
    return scan_error_bound("cosine", dim, 1.0, 1.0) + 2.0 ** -7 + 2.0 ** -16 + \
        dim * 2.0 ** -126 + 4 * UNIT_ROUNDOFF


@register
class NumpyBackend(InMemoryBackend):
    """The in-memory base with its scan kernel chosen per gallery (see the module docstring)."""

    kind = "numpy"
    summary = ("exact search, one matrix product (float32 BLAS, or a bfloat16 copy for large "
               "cosine galleries; no faiss needed)")
    params: ClassVar[dict[str, Any]] = {"scan": "auto"}

    def __init__(self, metric: str, dim: int, **settings: Any) -> None:
        """An empty gallery; ``scan`` is auto, float32 or bfloat16 (cosine only)."""
        super().__init__(metric, dim, **settings)
        scan = self.settings["scan"]
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {', '.join(SCANS)}, got {scan!r}")
        if scan == "bfloat16" and metric != "cosine":
            raise ValueError("scan='bfloat16' applies to cosine galleries only")
        self._half: Any = None  # the bfloat16 copy (a torch tensor), made when first needed

    @property
    def kernel(self) -> str:
        """The scan this gallery uses now: float32 or bfloat16."""
        scan = self.settings["scan"]
        if scan == "auto":
            big = self.metric == "cosine" and self.count >= BF16_MIN_ROWS
            return "bfloat16" if big and importlib.util.find_spec("torch") else "float32"
        return scan

    def add(self, x, items) -> None:
        """Append; the bfloat16 copy is made again when next needed."""
        super().add(x, items)
        self._half = None

    def _half_rows(self) -> Any:
        if self._half is None or self._half.shape[0] != self.count:
            import torch

            half = torch.empty((self.count, self.dim), dtype=torch.bfloat16)
            buffer = np.empty((min(_COPY_ROWS, self.count), self.dim), dtype=np.float32)
            for block, start in self.blocks.block_spans():
                for s in range(0, len(block), _COPY_ROWS):
                    chunk = block[s:s + _COPY_ROWS]
                    unit = faiss_vectors(chunk, "cosine", out=buffer[:len(chunk)])
                    half[start + s:start + s + len(chunk)] = torch.from_numpy(unit)
            self._half = half
        return self._half

    def _scan_half(self, q: np.ndarray) -> np.ndarray:
        """Approximate cosine keys ``[Q, N]`` from the bfloat16 copy."""
        import torch

        unit = torch.from_numpy(faiss_vectors(q, "cosine")).to(torch.bfloat16)
        sims = (unit @ self._half_rows().T).float().numpy()
        return 1.0 - sims.astype(np.float64)

    def scan_all(self, q: np.ndarray) -> np.ndarray:
        """Approximate keys of queries ``q`` against every row, by this gallery's kernel."""
        if self.kernel == "bfloat16":
            return self._scan_half(q)
        return super().scan_all(q)

    def scan_bound(self, query_norm: float) -> float:
        """The bound of this gallery's kernel."""
        if self.kernel == "bfloat16":
            return bf16_scan_bound(self.dim)
        return super().scan_bound(query_norm)

    def search(self, q: np.ndarray, top_k: int, flt: SearchFilter
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k; a filter scans the kept rows in float32."""
        if self.kernel == "float32" or not flt.empty:
            return super().search(q, top_k, flt)
        return exact_top_k(q, top_k, metric=self.metric, total=self.count, scan=self.scan,
                           rows=self.blocks.rows, within=self.within,
                           first=lambda k: np.arange(k, dtype=np.int64),
                           bound=self.scan_bound, margin=max(CANDIDATE_MARGIN, BF16_MARGIN))

"""Descriptors held in memory, in row blocks that grow without copying what they hold."""

from __future__ import annotations

import numpy as np

from esreid.search.exact import CHUNK_ROWS, scan_norms

#: Largest block of feature rows (a larger batch added is its own block).
BLOCK_BYTES = 1 << 30


class FeatureBlocks:
    """float32 rows ``[N, dim]`` in blocks of up to :data:`BLOCK_BYTES` (a batch that large
    gets a block of its own), the last one with room to grow: adding never copies what is
    already held, and scans see few large blocks (BLAS is slow on many small ones). Keeps
    each row's float64 norm for the scans' error bounds."""

    def __init__(self, dim: int) -> None:
        """No rows yet."""
        self.dim = dim
        self.buffers: list[np.ndarray] = []
        self.fills: list[int] = []
        self.starts: list[int] = []
        self.count = 0
        self.norms = np.zeros(0, dtype=np.float64)

    @property
    def blocks(self) -> list[np.ndarray]:
        """The filled parts of the blocks, in gallery order."""
        return [buf[:fill] for buf, fill in zip(self.buffers, self.fills, strict=True)]

    def block_spans(self) -> list[tuple[np.ndarray, int]]:
        """``(block, first position)`` of each block."""
        return list(zip(self.blocks, self.starts, strict=True))

    def joined(self) -> np.ndarray:
        """All rows as one array (joined once, when they are held in several blocks)."""
        blocks = self.blocks
        if not blocks:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(blocks) > 1:
            joined = np.concatenate(blocks)
            self.buffers, self.fills, self.starts = [joined], [len(joined)], [0]
            return joined
        return blocks[0]

    @property
    def max_norm(self) -> float:
        """The largest row norm (0 with no rows)."""
        return float(self.norms.max()) if self.count else 0.0

    def append(self, x: np.ndarray, owned: bool = False) -> None:
        """Copy rows ``x`` in (or adopt ``x`` as a block when ``owned``: it then must not be
        used elsewhere)."""
        block_rows = max(1, BLOCK_BYTES // (4 * self.dim))
        norms = [scan_norms(x[s:s + CHUNK_ROWS]) for s in range(0, len(x), CHUNK_ROWS)]
        pos = 0
        while pos < len(x):
            rest = len(x) - pos
            if self.fills and self.fills[-1] < block_rows:
                buf, fill = self.buffers[-1], self.fills[-1]
                if fill == len(buf):
                    # Doubling keeps the copies of a block growing row by row linear.
                    grown = np.empty((min(block_rows, max(2 * fill, fill + rest)), self.dim),
                                     dtype=np.float32)
                    grown[:fill] = buf[:fill]
                    self.buffers[-1] = buf = grown
                take = min(len(buf) - fill, rest)
                buf[fill:fill + take] = x[pos:pos + take]
                self.fills[-1] += take
            else:
                take = rest if rest >= block_rows else 0
                block = (x[pos:] if owned and pos == 0 else x[pos:].copy()) if take else \
                    np.empty((rest, self.dim), dtype=np.float32)
                self.buffers.append(block)
                self.fills.append(take)
                self.starts.append(self.count + pos)
            pos += take
        self.count += len(x)
        self.norms = np.concatenate([self.norms, *norms])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows at positions ``idx``, wherever their blocks are."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.buffers) == 1:
            return self.buffers[0][idx]
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        if not len(idx):
            return out
        block = np.searchsorted(np.asarray(self.starts), idx, side="right") - 1
        for b in np.unique(block):
            mask = block == b
            out[mask] = self.buffers[b][idx[mask] - self.starts[b]]
        return out

    def shared_copy(self) -> FeatureBlocks:
        """Another FeatureBlocks over the same arrays (nothing copied)."""
        twin = FeatureBlocks(self.dim)
        twin.buffers, twin.fills = list(self.buffers), list(self.fills)
        twin.starts, twin.count, twin.norms = list(self.starts), self.count, self.norms
        return twin

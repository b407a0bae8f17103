"""The record type every dataset loader returns, and the split container."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    """One image of a re-ID dataset.

    ``pid`` is the identity used by training and evaluation (relabelled to 0..N-1 for
    training splits); ``orig_pid`` is the identity as written in the benchmark's files
    (``-1`` marks Market-style junk, ``0`` distractors). ``camid`` is 0-based.
    """

    path: str
    pid: int
    camid: int
    orig_pid: int | None = None

    @property
    def original_pid(self) -> int:
        """The identity as the benchmark wrote it (``pid`` when none was recorded)."""
        return self.pid if self.orig_pid is None else self.orig_pid


@dataclass
class ReIDData:
    """The three splits of a re-ID benchmark plus a little metadata.

    ``train`` pids are relabelled 0..num_train_pids-1; ``query``/``gallery`` keep the
    original ids so cross-split identity matches are preserved.
    """

    name: str
    train: Sequence[Record]
    query: Sequence[Record]
    gallery: Sequence[Record]
    protocol: str = "market"
    extra: dict = field(default_factory=dict)

    @property
    def num_train_pids(self) -> int:
        """Number of distinct training identities."""
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        """Number of distinct training cameras."""
        return len({r.camid for r in self.train})

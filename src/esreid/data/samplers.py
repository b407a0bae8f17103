"""The PK identity sampler: batches of J identities x K images each.

Batch-hard triplet mining (and CG-RAM's easiest-positive pairing in training) needs every
batch to hold several images of each of its identities; a plain shuffle almost never does.

The sampler yields :class:`EpochIndex` items: dataset indices (plain ``int`` subclasses)
tagged with the epoch and the position in that epoch's stream, so the dataset can seed each
sample's augmentation from ``(seed, epoch, position)`` instead of from a stateful generator.

Distributed training splits every global batch of J identities between the processes: each
rank takes J / world_size whole identities (K images each), so batch-hard mining and BESM's
easiest positive stay within a rank, no identity is shared between the ranks of one step, and
the epoch covers the data once in total. Positions stay global, so an image's augmentation
does not depend on how many processes train.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["EpochIndex", "PKSampler"]


class EpochIndex(int):
    """A dataset index tagged with the ``epoch`` and the ``position`` (0-based, in the
    epoch's flat stream) at which a sampler drew it.

    It is an ``int`` (equal to, hashing and indexing like the bare index), so code that
    only wants the index keeps working; :class:`esreid.data.loader.ImageDataset` reads the
    tags to seed the sample's augmentation. Pickles with its tags, so it crosses into
    DataLoader worker processes intact.
    """

    epoch: int
    position: int

    def __new__(cls, index: int, epoch: int, position: int) -> EpochIndex:
        """Create the tagged index ``index`` drawn at ``position`` of epoch ``epoch``."""
        self = super().__new__(cls, index)
        self.epoch = int(epoch)
        self.position = int(position)
        return self

    def __reduce__(self) -> tuple[type[EpochIndex], tuple[int, int, int]]:
        """Pickle support: int's default reduction would rebuild from the bare value and
        call ``__new__`` with one argument, losing the tags."""
        return (EpochIndex, (int(self), self.epoch, self.position))

    def __repr__(self) -> str:
        """Show the index together with its tags."""
        return f"EpochIndex({int(self)}, epoch={self.epoch}, position={self.position})"


class PKSampler(Sampler[int]):
    """Yield dataset indices (as :class:`EpochIndex`) in batches of ``J = batch_size // num_instances`` identities x
    ``K = num_instances`` images.

    Takes ``pids`` (the identity of every dataset item, by index), ``num_instances`` K,
    ``batch_size`` (a multiple of K) and a ``seed``. Iterating yields a flat stream of
    indices whose length is a multiple of ``batch_size``; every consecutive ``batch_size``
    indices form one batch made of J distinct identities, each as K consecutive indices.
    Use it with ``DataLoader(sampler=..., batch_size=batch_size, drop_last=True)``.

    One epoch: each identity's indices are shuffled and cut into chunks of K. An identity
    with at least K images drops its trailing partial chunk, so no image repeats inside a
    chunk (a repeated image would be its own "easiest positive" at distance zero); the
    dropped images differ from epoch to epoch. An identity with fewer than K images gives
    one chunk holding all its images once plus random repeats (with replacement) up to K.
    Then, while at least J identities still have chunks, J of them are picked uniformly at
    random and each contributes its next chunk. The order depends only on ``(seed, epoch)``:
    call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``; without it every
    iteration repeats the same order. Each yielded index carries the current epoch and its
    position in the epoch's stream, which fix the sample's augmentation in
    :class:`~esreid.data.loader.ImageDataset`.

    With ``num_replicas`` > 1 (distributed training) ``batch_size`` stays the global batch:
    rank ``rank`` yields, from every global batch, the ``batch_size // num_replicas`` indices
    of its J / num_replicas identities (use a DataLoader ``batch_size`` of
    :attr:`local_batch_size`). Every rank draws the same global order from the seed.
    """

    def __init__(
        self,
        pids: Sequence[int],
        num_instances: int = 4,
        batch_size: int = 64,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        """Validate the arguments and group dataset indices by identity."""
        if num_instances < 1:
            raise ValueError(f"PKSampler: num_instances must be >= 1, got {num_instances}")
        if seed < 0:
            # numpy's seed sequences (here and for augmentation) reject negative entropy.
            raise ValueError(f"PKSampler: seed must be >= 0, got {seed}")
        if batch_size < 1 or batch_size % num_instances != 0:
            raise ValueError(
                f"PKSampler: batch_size ({batch_size}) must be a positive multiple of "
                f"num_instances ({num_instances})"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"PKSampler: rank must be in [0, num_replicas) with num_replicas >= 1, got "
                f"rank {rank} of {num_replicas}"
            )
        if (batch_size // num_instances) % num_replicas != 0:
            raise ValueError(
                f"PKSampler: the {batch_size // num_instances} identities of a batch "
                f"(batch_size {batch_size} / num_instances {num_instances}) must split evenly "
                f"between {num_replicas} processes"
            )
        groups: dict[int, list[int]] = {}
        for index, pid in enumerate(pids):
            groups.setdefault(int(pid), []).append(index)
        self.num_instances = num_instances
        self.batch_size = batch_size
        self.num_pids_per_batch = batch_size // num_instances
        if len(groups) < self.num_pids_per_batch:
            raise ValueError(
                f"PKSampler: batch_size {batch_size} / num_instances {num_instances} needs "
                f"{self.num_pids_per_batch} identities per batch, but the data has only "
                f"{len(groups)} identities"
            )
        self.num_replicas = num_replicas
        self.rank = rank
        self.local_batch_size = batch_size // num_replicas
        self.seed = seed
        self.epoch = 0
        self.start = 0
        # Sorted so the result does not depend on the order identities first appear in.
        self._groups = [np.asarray(groups[pid], dtype=np.int64) for pid in sorted(groups)]
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order (and augmentation tags) the next iteration and
        ``len`` will use; ``epoch`` must be >= 0.

        ``start`` (a multiple of ``batch_size``) skips that many indices of the epoch's
        global stream, so a run resumed mid-epoch continues with exactly the batches (and, since
        positions keep their place in the stream, the augmentation) it would have seen.
        """
        if epoch < 0:
            raise ValueError(f"PKSampler: epoch must be >= 0, got {epoch}")
        if start < 0 or start % self.batch_size != 0:
            raise ValueError(
                f"PKSampler: start must be a non-negative multiple of batch_size "
                f"({self.batch_size}), got {start}"
            )
        self.epoch = int(epoch)
        self.start = int(start)

    def epoch_length(self) -> int:
        """Number of indices this rank yields in the whole current epoch (``len`` without
        the skipped start)."""
        return len(self._epoch_indices()) // self.num_replicas

    def num_batches(self) -> int:
        """Number of (global) batches in the whole current epoch."""
        return len(self._epoch_indices()) // self.batch_size

    def _epoch_indices(self) -> list[int]:
        """The flat index list of the current epoch (computed once per epoch, then cached)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        k = self.num_instances
        chunks: list[list[np.ndarray]] = []
        for members in self._groups:
            shuffled = rng.permutation(members)
            if len(shuffled) < k:
                extra = rng.choice(members, size=k - len(shuffled), replace=True)
                chunks.append([np.concatenate([shuffled, extra])])
            else:
                usable = len(shuffled) - len(shuffled) % k
                chunks.append(list(shuffled[:usable].reshape(-1, k)))
        available = [i for i, c in enumerate(chunks) if c]
        indices: list[int] = []
        while len(available) >= self.num_pids_per_batch:
            picked = rng.choice(len(available), size=self.num_pids_per_batch, replace=False)
            for position in picked:
                indices.extend(chunks[available[position]].pop().tolist())
            available = [i for i in available if chunks[i]]
        self._cache = (self.epoch, indices)
        return indices

    def __iter__(self) -> Iterator[EpochIndex]:
        """Yield the current epoch's indices, batch by batch, each tagged with the epoch and
        its position in the epoch."""
        epoch, start = self.epoch, self.start
        indices = self._epoch_indices()
        offset = self.rank * self.local_batch_size
        return (EpochIndex(indices[pos], epoch, pos)
                for batch in range(start, len(indices), self.batch_size)
                for pos in range(batch + offset, batch + offset + self.local_batch_size))

    def __len__(self) -> int:
        """Number of indices the next iteration yields (a multiple of ``local_batch_size``)."""
        return max(len(self._epoch_indices()) - self.start, 0) // self.num_replicas

"""Image dataset over records and the train/test DataLoaders.

Training epochs: the train loader's ``sampler`` is the :class:`PKSampler`; call
``loader.sampler.set_epoch(epoch)`` before iterating each epoch, otherwise every epoch
repeats epoch 0's identity order.

Determinism and resumption: the identity order depends only on ``(seed, epoch)``, and the
sampler tags every index with its epoch and position in the epoch (:class:`EpochIndex`).
The dataset runs each sample's transform (flip, crop) on torch's CPU generator freshly
seeded from ``(seed, epoch, position)`` and restores the previous generator state
afterwards. So after ``set_epoch(e)`` the batches of epoch ``e`` (indices and augmentation)
are a pure function of ``(seed, e)``: independent of the epochs run before (a run resumed
from an epoch-boundary checkpoint sees exactly the batches of an uninterrupted one), of
``num_workers``, of persistent workers and of the global torch generator, which iterating
the loader leaves untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from esreid.data.records import Record
from esreid.data.samplers import EpochIndex, PKSampler
from esreid.data.transforms import build_transforms

__all__ = [
    "ImageDataset",
    "ImageReadError",
    "build_test_loader",
    "build_train_loader",
    "read_rgb",
]


class ImageReadError(OSError):
    """An image file is missing, unreadable or not a decodable image."""


def read_rgb(path: str) -> Image.Image:
    """Open and fully decode the image at ``path``; returns an RGB PIL image.

    Raises :class:`ImageReadError` naming the path and the reason when the file is missing,
    unreadable, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            # convert() forces the full decode inside the try, so truncated files fail here
            # rather than later inside a transform with no file name attached.
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise ImageReadError(f"cannot read image {path}: file not found") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ImageReadError(f"cannot read image {path}: {reason}") from exc


def _augmentation_seed(seed: int, key: int, index: int) -> int:
    """The torch seed for one sample's transform: a hash-free mix of the dataset ``seed``
    with ``(epoch, position)`` when ``key`` is an :class:`EpochIndex`, else with ``index``.

    The leading tag (1 or 0) keeps the two kinds of keys from ever sharing entropy.
    SeedSequence spreads small, adjacent inputs over the whole 64-bit seed space, so
    neighbouring positions and epochs get unrelated draws.
    """
    if isinstance(key, EpochIndex):
        entropy = [seed, 1, key.epoch, key.position]
    else:
        entropy = [seed, 0, index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class ImageDataset(Dataset):
    """Map-style dataset over :class:`Record` s.

    Takes ``records``, a ``transform`` (PIL RGB image -> tensor; None returns the PIL
    image) and an optional non-negative augmentation ``seed``. Item ``i`` is
    ``(image, pid, camid, i)``; ``i`` may be a plain ``int`` or an :class:`EpochIndex` from
    :class:`PKSampler` (the returned index is always a plain ``int``). With ``seed`` given,
    the transform's random draws come from torch's CPU generator seeded from
    ``(seed, epoch, position)`` for an :class:`EpochIndex` and from ``(seed, i)`` for a plain
    index, and the generator's previous state is restored afterwards: an item's augmentation
    depends only on its key, never on which items were loaded before or in which process,
    and the caller's random stream is not disturbed. Without ``seed`` the transform draws
    from the global generator as usual.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], Any] | None,
        seed: int | None = None,
    ) -> None:
        """Store the records, the transform and the augmentation seed."""
        if seed is not None and seed < 0:
            raise ValueError(f"ImageDataset: seed must be >= 0, got {seed}")
        self.records = records
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    def __getitem__(self, key: int) -> tuple[Any, int, int, int]:
        """Load record ``key`` (an ``int`` or :class:`EpochIndex`); returns
        (transformed image, pid, camid, index) with ``index`` a non-negative plain int."""
        # range() normalises negative indices and raises IndexError when out of range, so
        # the seed and the returned index always name the record's real position.
        index = range(len(self.records))[key]
        record = self.records[index]
        image = read_rgb(record.path)
        if self.transform is not None:
            if self.seed is None:
                image = self.transform(image)
            else:
                # torchvision's random transforms draw from the global CPU generator: fork it,
                # seed the fork for this sample, and let fork_rng put the old state back.
                # default_generator.manual_seed rather than torch.manual_seed, because the
                # latter also reseeds CUDA generators, which fork_rng(devices=[]) would not
                # restore.
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(_augmentation_seed(self.seed, key, index))
                    image = self.transform(image)
        return image, record.pid, record.camid, index


def _check_loader_args(where: str, records: Sequence[Record], num_workers: int) -> None:
    """Reject an empty record list and a negative worker count with a clear message."""
    if len(records) == 0:
        raise ValueError(f"{where}: records is empty")
    if num_workers < 0:
        raise ValueError(f"{where}: num_workers must be >= 0, got {num_workers}")


def build_train_loader(
    records: Sequence[Record],
    height: int,
    width: int,
    batch_size: int = 64,
    num_instances: int = 4,
    num_workers: int = 2,
    seed: int = 0,
    flip_prob: float = 0.5,
    pad: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Training DataLoader with PK batches and train-time augmentation.

    Takes training ``records`` (pids relabelled 0..N-1), the input size, the PK layout
    (``batch_size`` images = ``batch_size // num_instances`` identities x ``num_instances``)
    and augmentation settings. Returns a DataLoader of full batches
    ``(images [B, 3, H, W] float32, pids [B], camids [B], indices [B])`` whose ``sampler`` is
    the :class:`PKSampler`: call ``loader.sampler.set_epoch(epoch)`` before each epoch.
    ``seed`` (>= 0) fixes both the identity order and the augmentation of every epoch:
    epoch ``e``'s batches depend only on ``(seed, e)``, so a run resumed at an epoch boundary
    needs nothing from the loader beyond ``set_epoch`` (see the module docstring).
    """
    _check_loader_args("build_train_loader", records, num_workers)
    sampler = PKSampler(
        [r.pid for r in records], num_instances=num_instances, batch_size=batch_size, seed=seed
    )
    transform = build_transforms(height, width, is_train=True, flip_prob=flip_prob, pad=pad)
    dataset = ImageDataset(records, transform, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        # The sampler already yields whole batches; drop_last guards against a partial one.
        drop_last=True,
        num_workers=num_workers,
        # Each iteration draws the workers' base seed from this generator; without it the
        # draw would come from (and advance) the global torch generator. Augmentation does
        # not depend on worker seeds (see ImageDataset), only stray draws in workers would.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def build_test_loader(
    records: Sequence[Record],
    height: int,
    width: int,
    batch_size: int = 128,
    num_workers: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """Evaluation DataLoader: records in their given order, eval transform, last batch kept.

    Returns a DataLoader of ``(images [B, 3, H, W] float32, pids [B], camids [B],
    indices [B])``; ``indices`` are positions in ``records``.
    """
    _check_loader_args("build_test_loader", records, num_workers)
    if batch_size < 1:
        raise ValueError(f"build_test_loader: batch_size must be >= 1, got {batch_size}")
    transform = build_transforms(height, width, is_train=False)
    return DataLoader(
        ImageDataset(records, transform),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )

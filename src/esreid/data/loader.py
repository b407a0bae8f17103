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

Batches: both loaders yield ``(images, pids, camids, indices, bad)``. ``bad`` is a tuple of
the paths of unreadable image files met while building the batch (empty normally; only
``on_bad_image="skip"`` lets a batch through with such files). Workers only report them:
the main process counts and logs, once per file, with :class:`BadImageLog`.

Bad images (``on_bad_image``): ``"error"`` (default) raises :class:`ImageReadError`, whose
message is the same single line ``cannot read image <path>: <reason>`` whether the image
was read in the main process or in a DataLoader worker. ``"skip"`` keeps going: a training
item is replaced by the next readable image of the same identity (so PK batches keep their
shape), an evaluation item is dropped from its batch.

Signals: DataLoader workers ignore SIGINT, and SIGTERM from any process but their parent
(:func:`worker_init`), so Ctrl-C or a scheduler's SIGTERM reaches only the main process,
which can finish its step, save a checkpoint and shut the workers down itself: through
the DataLoader's own shutdown when an iterator is freed, and at interpreter exit for the
iterators still running (:func:`_shutdown_live_workers`).
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from esreid.data.images import ImageReadError, read_image
from esreid.data.records import Record
from esreid.data.samplers import EpochIndex, PKSampler
from esreid.data.transforms import build_transforms

__all__ = [
    "BAD_IMAGE_MODES",
    "BadImageLog",
    "ImageDataset",
    "ImageReadError",
    "build_test_loader",
    "build_train_loader",
    "collate_batch",
    "read_rgb",
    "worker_init",
]

#: Accepted values of ``on_bad_image``.
BAD_IMAGE_MODES = ("error", "skip")

def _check_on_bad_image(where: str, on_bad_image: str) -> None:
    """Raise ValueError naming ``where`` unless ``on_bad_image`` is "error" or "skip"."""
    if on_bad_image not in BAD_IMAGE_MODES:
        raise ValueError(
            f"{where}: on_bad_image must be 'error' or 'skip', got {on_bad_image!r}"
        )


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker never collects the garbage it inherited,
    ignores SIGINT, and ignores SIGTERM unless its parent (the main process) sends it.

    Ctrl-C goes to the whole foreground process group and schedulers often signal every
    process of a job; a worker dying mid-batch would turn a clean stop of the main process
    (finish the step, save a checkpoint) into a "DataLoader worker exited unexpectedly"
    crash. SIGTERM from the parent is still obeyed, because that is how torch stops a worker
    that missed its shutdown request and how multiprocessing stops leftover workers at
    interpreter exit; ignoring it there would hang the main process's exit. Telling the
    sender apart needs ``signal.sigwaitinfo``; where it is missing (macOS) SIGTERM keeps its
    default action. Worker seeding is left to torch (augmentation does not depend on it,
    see the module docstring).
    """
    # Objects inherited from the parent are never collected here. Their finalisers may
    # tear down another library's thread pool (an onnxruntime session left as garbage does),
    # whose threads do not exist after fork: the worker would wait for them forever.
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    # Blocked in this (the worker's main) thread, and so in every thread started from it,
    # SIGTERM stays pending until the waiter thread takes it with the sender's pid.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    waiter = threading.Thread(
        target=_exit_on_parent_sigterm,
        args=(os.getppid(),),
        name=f"esreid-sigterm-{worker_id}",
        daemon=True,
    )
    waiter.start()


def _exit_on_parent_sigterm(parent: int) -> None:
    """Wait for SIGTERMs; die of one sent by ``parent``, drop the others."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            break
    # Die of the signal itself, as an unprotected worker would: torch's child watcher reads
    # a nonzero exit status as a crash ("exited unexpectedly"), a SIGTERM death as a stop.
    # SIGTERM keeps its default action in the worker; only its mask kept it pending.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    os._exit(128 + signal.SIGTERM)  # only reached if something installed a handler


class BadImageLog:
    """The distinct unreadable image files a run has met, in the order first seen.

    The main process feeds it each batch's ``bad`` paths; :meth:`update` returns the ones
    not seen before, so each file is logged once however many epochs meet it.
    """

    def __init__(self) -> None:
        """Start with no paths."""
        self._paths: dict[str, None] = {}

    def update(self, bad_paths: Iterable[str]) -> list[str]:
        """Remember ``bad_paths``; return those not seen before, in order, without repeats."""
        new = []
        for path in bad_paths:
            if path not in self._paths:
                self._paths[path] = None
                new.append(path)
        return new

    @property
    def count(self) -> int:
        """Number of distinct unreadable files seen."""
        return len(self._paths)

    @property
    def paths(self) -> list[str]:
        """The distinct unreadable files seen, in the order first seen."""
        return list(self._paths)


def read_rgb(path: str | os.PathLike, target: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode the image at ``path``; returns an upright 8-bit RGB PIL image.

    The one image reader (:func:`esreid.data.images.read_image`): EXIF orientation, 16-bit,
    float, palette, alpha, CMYK and grayscale images converted, images under
    :data:`~esreid.data.images.MIN_IMAGE_SIDE` pixels a side refused; ``target`` (height,
    width) lets a much larger image decode smaller. Raises :class:`ImageReadError` naming
    the path and the reason when the file is missing, unreadable, truncated, not an image or
    refused.
    """
    return read_image(path, target=target)


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
    image), an optional non-negative augmentation ``seed`` and the bad-image policy. Item
    ``i`` is ``(image, pid, camid, index, bad)``; ``i`` may be a plain ``int`` or an
    :class:`EpochIndex` from :class:`PKSampler` (the returned ``index`` is always a plain
    ``int``) and ``bad`` is a tuple of the paths of unreadable files met while loading the
    item (empty normally). With ``seed`` given, the transform's random draws come from
    torch's CPU generator seeded from ``(seed, epoch, position)`` for an
    :class:`EpochIndex` and from ``(seed, i)`` for a plain index, and the generator's
    previous state is restored afterwards: an item's augmentation depends only on its key,
    never on which items were loaded before or in which process, and the caller's random
    stream is not disturbed. Without ``seed`` the transform draws from the global
    generator as usual.

    ``on_bad_image="error"`` raises :class:`ImageReadError` for an unreadable file.
    ``"skip"`` reports it in ``bad`` instead: with ``replace_bad`` (training) the item is
    the next readable record of the same pid in record order (wrapping around; its own
    ``camid`` and ``index``, augmented with the requested key's seed), and
    :class:`ImageReadError` naming the identity is raised only when none of its images can
    be read; without ``replace_bad`` (evaluation) the item is ``(None, pid, camid, index,
    (path,))``, which :func:`collate_batch` drops.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], Any] | None,
        seed: int | None = None,
        on_bad_image: str = "error",
        replace_bad: bool = False,
        decode_size: tuple[int, int] | None = None,
    ) -> None:
        """Store the records, the transform, the augmentation seed, the bad-image policy and
        the size the transform resizes to (``decode_size``, (height, width): much larger
        images are decoded smaller, as :func:`read_rgb` says)."""
        if seed is not None and seed < 0:
            raise ValueError(f"ImageDataset: seed must be >= 0, got {seed}")
        _check_on_bad_image("ImageDataset", on_bad_image)
        self.records = records
        self.transform = transform
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.replace_bad = replace_bad
        self.decode_size = decode_size
        self._same_pid: dict[int, list[int]] | None = None

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    def _indices_of_pid(self, pid: int) -> list[int]:
        """Record indices of identity ``pid`` in record order (the table is built on first
        use, so error mode and clean data never pay for it)."""
        if self._same_pid is None:
            table: dict[int, list[int]] = {}
            for i, record in enumerate(self.records):
                table.setdefault(record.pid, []).append(i)
            self._same_pid = table
        return self._same_pid[pid]

    def _read_replacing(self, index: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        """Read record ``index`` or, if unreadable, the next readable one of its pid.

        Returns (image, index actually read, paths that failed). Raises ImageReadError
        naming the identity when every image of the pid fails.
        """
        record = self.records[index]
        same = self._indices_of_pid(record.pid)
        start = same.index(index)
        failed: list[str] = []
        first_error = ""
        for candidate in same[start:] + same[:start]:
            path = self.records[candidate].path
            try:
                return read_rgb(path, self.decode_size), candidate, tuple(failed)
            except ImageReadError as err:
                failed.append(path)
                first_error = first_error or str(err)
        raise ImageReadError(
            f"cannot read any of the {len(same)} image(s) of identity {record.original_pid} "
            f"(pid {record.pid}), so no image can stand in for {record.path}; first error: "
            f"{first_error}"
        )

    def __getitem__(self, key: int) -> tuple[Any, int, int, int, tuple[str, ...]]:
        """Load record ``key`` (an ``int`` or :class:`EpochIndex`); returns
        ``(transformed image, pid, camid, index, bad)`` (see the class docstring)."""
        # range() normalises negative indices and raises IndexError when out of range, so
        # the seed and the returned index always name the record's real position.
        index = range(len(self.records))[key]
        requested = index
        record = self.records[index]
        bad: tuple[str, ...] = ()
        if self.on_bad_image == "error":
            image = read_rgb(record.path, self.decode_size)
        elif self.replace_bad:
            image, index, bad = self._read_replacing(index)
            record = self.records[index]
        else:
            try:
                image = read_rgb(record.path, self.decode_size)
            except ImageReadError:
                return None, record.pid, record.camid, index, (record.path,)
        if self.transform is not None:
            if self.seed is None:
                image = self.transform(image)
            else:
                # torchvision's random transforms draw from the global CPU generator: fork it,
                # seed the fork for this sample, and let fork_rng put the old state back.
                # default_generator.manual_seed rather than torch.manual_seed, because the
                # latter also reseeds CUDA generators, which fork_rng(devices=[]) would not
                # restore. The seed comes from the requested key even for a replacement, so
                # a batch stays a pure function of (seed, epoch).
                with torch.random.fork_rng(devices=[]):
                    sample_seed = _augmentation_seed(self.seed, key, requested)
                    torch.default_generator.manual_seed(sample_seed)
                    image = self.transform(image)
        return image, record.pid, record.camid, index, bad


def collate_batch(items: Sequence[tuple], image_shape: Sequence[int]) -> tuple[Any, ...]:
    """DataLoader ``collate_fn`` for :class:`ImageDataset` items (bind ``image_shape``, one
    image tensor's shape such as ``(3, H, W)``, with ``functools.partial``).

    Returns ``(images [B, *image_shape] float32, pids [B] int64, camids [B] int64,
    indices [B] int64, bad)``: items whose image is None (unreadable, skip mode) are left out
    of the tensors and ``bad`` is the tuple of every item's unreadable paths, in batch
    order. When every item was dropped the tensors are empty (``B = 0``) with the same
    trailing shapes, so a consumer only has to skip a batch with ``len(indices) == 0`` if
    it cannot take an empty one.
    """
    bad = tuple(path for item in items for path in item[4])
    kept = [item[:4] for item in items if item[0] is not None]
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        images = torch.empty((0, *(int(n) for n in image_shape)), dtype=torch.float32)
        return images, empty, empty.clone(), empty.clone(), bad
    # default_collate stacks straight into shared memory inside a worker, saving a copy.
    images, pids, camids, indices = default_collate(kept)
    return images, pids, camids, indices, bad


# Iterators of these loaders that run worker processes; weak, so they are freed as usual.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _shutdown_live_workers() -> None:
    """At interpreter exit, stop the workers of every loader iterator still alive the way
    torch does when an iterator is freed (ask, wait, then terminate).

    Without it multiprocessing's own exit hook would SIGTERM workers that torch still
    watches, and torch reports each such death as a crash ("DataLoader worker ... is killed
    by signal"). Registered after torch and multiprocessing are imported, so it runs before
    their exit hooks (atexit is last in, first out), while torch can still shut down.
    """
    for iterator in list(_LIVE_ITERATORS):
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


atexit.register(_shutdown_live_workers)


class _Loader(DataLoader):
    """A DataLoader whose worker processes are stopped in order at interpreter exit (see
    :func:`_shutdown_live_workers`); otherwise a plain DataLoader."""

    def __iter__(self):  # noqa: ANN204 - torch's iterator classes are private
        """Return torch's iterator, remembering it when it runs worker processes."""
        if self.num_workers > 0 and (self._iterator is None or not self.persistent_workers):
            # Workers are forked from this process: collect its unreachable objects first,
            # so no forked worker runs their finalisers (see worker_init).
            gc.collect()
        iterator = super().__iter__()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(iterator)
        return iterator


def _check_loader_args(
    where: str, records: Sequence[Record], num_workers: int, on_bad_image: str
) -> None:
    """Reject an empty record list, a negative worker count and an unknown bad-image mode
    with a clear message."""
    if len(records) == 0:
        raise ValueError(f"{where}: records is empty")
    if num_workers < 0:
        raise ValueError(f"{where}: num_workers must be >= 0, got {num_workers}")
    _check_on_bad_image(where, on_bad_image)


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
    on_bad_image: str = "error",
    num_replicas: int = 1,
    random_erasing: float = 0.0,
    rank: int = 0,
) -> DataLoader:
    """Training DataLoader with PK batches and train-time augmentation.

    Takes training ``records`` (pids relabelled 0..N-1), the input size, the PK layout
    (``batch_size`` images = ``batch_size // num_instances`` identities x ``num_instances``)
    and augmentation settings. Returns a DataLoader of full batches
    ``(images [B, 3, H, W] float32, pids [B], camids [B], indices [B], bad)`` whose
    ``sampler`` is the :class:`PKSampler`: call ``loader.sampler.set_epoch(epoch)`` before
    each epoch. ``seed`` (>= 0) fixes both the identity order and the augmentation of every
    epoch: epoch ``e``'s batches depend only on ``(seed, e)``, so a run resumed at an epoch
    boundary needs nothing from the loader beyond ``set_epoch`` (see the module docstring).
    ``on_bad_image="skip"`` replaces an unreadable image by the next readable one of the
    same identity and lists its path in ``bad``; ImageReadError when an identity has none.
    In distributed training (``num_replicas`` > 1) ``batch_size`` is the global batch and this
    rank's loader yields its ``batch_size // num_replicas`` images of each (see PKSampler).
    """
    _check_loader_args("build_train_loader", records, num_workers, on_bad_image)
    sampler = PKSampler(
        [r.pid for r in records], num_instances=num_instances, batch_size=batch_size, seed=seed,
        num_replicas=num_replicas, rank=rank,
    )
    transform = build_transforms(height, width, is_train=True, flip_prob=flip_prob, pad=pad,
                                 random_erasing=random_erasing)
    dataset = ImageDataset(
        records, transform, seed=seed, on_bad_image=on_bad_image, replace_bad=True,
        decode_size=(height, width),
    )
    return _Loader(
        dataset,
        batch_size=sampler.local_batch_size,
        sampler=sampler,
        # The sampler already yields whole batches; drop_last guards against a partial one.
        drop_last=True,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_batch, image_shape=(3, height, width)),
        worker_init_fn=worker_init,
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
    on_bad_image: str = "error",
) -> DataLoader:
    """Evaluation DataLoader: records in their given order, eval transform, last batch kept.

    Returns a DataLoader of ``(images [B, 3, H, W] float32, pids [B], camids [B],
    indices [B], bad)``; ``indices`` are positions in ``records``. ``on_bad_image="skip"``
    drops unreadable images from their batch (so ``B`` may be smaller than ``batch_size``,
    even 0, with tensors of the same trailing shapes) and lists their paths in ``bad``;
    ``indices`` tell which records the rows are.
    """
    _check_loader_args("build_test_loader", records, num_workers, on_bad_image)
    if batch_size < 1:
        raise ValueError(f"build_test_loader: batch_size must be >= 1, got {batch_size}")
    transform = build_transforms(height, width, is_train=False)
    return _Loader(
        ImageDataset(records, transform, on_bad_image=on_bad_image, decode_size=(height, width)),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_batch, image_shape=(3, height, width)),
        worker_init_fn=worker_init,
        pin_memory=pin_memory,
    )

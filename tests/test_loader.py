"""Transforms, ImageDataset and the train/test loaders on tiny generated JPEGs."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fixture_trees import break_image, write_market1501
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from esreid.data.datasets import load_market1501
from esreid.data.loader import (
    BadImageLog,
    ImageDataset,
    ImageReadError,
    build_test_loader,
    build_train_loader,
    read_rgb,
    worker_init,
)
from esreid.data.records import Record
from esreid.data.samplers import EpochIndex, PKSampler
from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

_MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
_STD = torch.tensor(IMAGENET_STD)[:, None, None]


def _gradient_image(h: int = 16, w: int = 8, seed: int = 0) -> Image.Image:
    """An asymmetric RGB image (so flips and crops are visible)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _normalised(image: Image.Image) -> torch.Tensor:
    """Reference normalisation by hand: (pixel / 255 - mean) / std, as [3, H, W]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return (arr / 255.0 - _MEAN) / _STD


@pytest.fixture()
def records(tmp_path: Path) -> list[Record]:
    """3 identities x 4 JPEGs of 16x8, colours varying by identity and image."""
    out = []
    for pid in range(3):
        for j in range(4):
            path = tmp_path / f"{pid:04d}_c{j % 2}_{j}.jpg"
            _gradient_image(seed=10 * pid + j).save(path, quality=95)
            out.append(Record(path=str(path), pid=pid, camid=j % 2))
    return out


# ---------------------------------------------------------------- transforms


def test_eval_transform_normalises_exactly() -> None:
    image = _gradient_image()
    out = build_transforms(16, 8, is_train=False)(image)
    assert out.dtype == torch.float32 and out.shape == (3, 16, 8)
    assert type(out) is torch.Tensor
    # Same size: resize is the identity, so the output is the hand-normalised pixels.
    torch.testing.assert_close(out, _normalised(image), atol=1e-6, rtol=0)


def test_eval_transform_resizes_bilinear() -> None:
    # A solid colour stays solid under any interpolation; the size must be exact.
    image = Image.new("RGB", (20, 50), (255, 0, 128))
    out = build_transforms(32, 12, is_train=False)(image)
    assert out.shape == (3, 32, 12)
    expected = (torch.tensor([255.0, 0.0, 128.0]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / (
        torch.tensor(IMAGENET_STD)
    )
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 32, 12), atol=1e-5, rtol=0)


def test_train_transform_flip_probability_extremes() -> None:
    image = _gradient_image()
    ref = _normalised(image)
    torch.testing.assert_close(build_transforms(16, 8, True, flip_prob=1.0)(image), ref.flip(-1))
    torch.testing.assert_close(build_transforms(16, 8, True, flip_prob=0.0)(image), ref)


def test_random_erasing_sets_one_rectangle_to_the_mean_pixel() -> None:
    image = _gradient_image()
    ref = build_transforms(16, 8, True, flip_prob=0.0, random_erasing=0.0)(image)
    torch.testing.assert_close(ref, _normalised(image), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    areas = []
    for _ in range(20):
        out = build_transforms(16, 8, True, flip_prob=0.0, random_erasing=1.0)(image)
        changed = (out != ref).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        # One axis-aligned rectangle, erased to 0 in normalised space (the mean pixel) in
        # every channel; everything outside it untouched.
        assert changed[box].all() and changed.sum() == changed[box].numel()
        assert (out[:, box[0], box[1]] == 0).all()
        areas.append(changed.sum().item() / changed.numel())
    assert 0.0 < min(areas) and max(areas) <= 0.45  # 2-40% of the image, rounded to pixels
    with pytest.raises(ValueError, match="random_erasing must be in \\[0, 1\\], got 1.5"):
        build_transforms(16, 8, True, random_erasing=1.5)


def test_train_transform_pad_crop_is_a_window_of_the_padded_image() -> None:
    image = _gradient_image()
    pad = 2
    black = (0.0 - _MEAN) / _STD
    padded = black.expand(3, 16 + 2 * pad, 8 + 2 * pad).clone()
    padded[:, pad:-pad, pad:-pad] = _normalised(image)
    transform = build_transforms(16, 8, True, flip_prob=0.0, pad=pad)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(30):
        out = transform(image)
        assert out.shape == (3, 16, 8)
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.allclose(out, padded[:, dy : dy + 16, dx : dx + 8], atol=1e-6)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_transform_argument_errors() -> None:
    with pytest.raises(
        ValueError, match="height and width must be positive, got height=0, width=8"
    ):
        build_transforms(0, 8, is_train=False)
    with pytest.raises(ValueError, match="flip_prob must be in \\[0, 1\\], got 1.5"):
        build_transforms(16, 8, is_train=True, flip_prob=1.5)
    with pytest.raises(ValueError, match="pad must be >= 0, got -1"):
        build_transforms(16, 8, is_train=True, pad=-1)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        build_transforms(16, 8, is_train=False, mean=(0.5,))
    with pytest.raises(ValueError, match=r"std values must be positive, got \(1.0, 0.0, 1.0\)"):
        build_transforms(16, 8, is_train=False, std=(1.0, 0.0, 1.0))


# ---------------------------------------------------------------- dataset


def test_dataset_items_and_rgb_conversion(tmp_path: Path, records: list[Record]) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 16), 100).save(gray)
    recs = [*records, Record(path=str(gray), pid=7, camid=3)]
    dataset = ImageDataset(recs, build_transforms(16, 8, is_train=False))
    assert len(dataset) == 13
    image, pid, camid, index, bad = dataset[12]
    assert (pid, camid, index, bad) == (7, 3, 12, ())
    assert image.shape == (3, 16, 8)
    expected = (100 / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 0, 0], expected, atol=1e-6, rtol=0)
    raw, *_ = ImageDataset(recs, None)[12]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB"


def test_corrupt_image_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "0001_c1_broken.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    dataset = ImageDataset([Record(path=str(bad), pid=0, camid=0)], None)
    with pytest.raises(ImageReadError, match=f"cannot read image {bad}: cannot identify image"):
        dataset[0]


def test_truncated_image_error_names_file(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    _gradient_image(64, 64).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:300])
    with pytest.raises(ImageReadError, match=f"cannot read image {cut}: (?i:.*truncated)"):
        read_rgb(str(cut))


def test_missing_image_error_names_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "0002_c1_x.jpg"
    dataset = ImageDataset([Record(path=str(missing), pid=0, camid=0)], None)
    with pytest.raises(ImageReadError, match=f"cannot read image {missing}: file not found"):
        dataset[0]
    assert issubclass(ImageReadError, OSError)


# ---------------------------------------------------------------- loaders


def _collect(loader) -> list[tuple]:
    """Every batch of one pass: (images, pids, camids, indices, bad) tuples."""
    return [tuple(batch) for batch in loader]


def test_train_loader_pk_batches(records: list[Record]) -> None:
    loader = build_train_loader(records, 16, 8, batch_size=6, num_instances=2, num_workers=0)
    assert isinstance(loader.sampler, PKSampler)
    batches = _collect(loader)
    # 3 identities x 2 chunks of 2 and J = 3: each batch takes one chunk of every identity.
    assert len(batches) == len(loader) == 2
    seen = []
    for images, pids, camids, indices, bad in batches:
        assert bad == ()
        assert images.shape == (6, 3, 16, 8) and images.dtype == torch.float32
        assert pids.dtype == torch.int64 and camids.dtype == torch.int64
        chunks = pids.view(3, 2)
        assert (chunks[:, 0] == chunks[:, 1]).all()
        assert sorted(chunks[:, 0].tolist()) == [0, 1, 2]
        for i, idx in enumerate(indices.tolist()):
            assert records[idx].pid == pids[i] and records[idx].camid == camids[i]
        seen += indices.tolist()
    assert sorted(seen) == list(range(12))


def test_train_loader_normalisation_and_augmentation(records: list[Record]) -> None:
    loader = build_train_loader(
        records, 16, 8, batch_size=4, num_instances=2, num_workers=0, flip_prob=1.0
    )
    images, _, _, indices, _ = next(iter(loader))
    for image, idx in zip(images, indices.tolist(), strict=True):
        decoded = Image.open(records[idx].path).convert("RGB")
        torch.testing.assert_close(image, _normalised(decoded).flip(-1), atol=1e-6, rtol=0)


def _run_epochs(records: list[Record], num_workers: int, seed: int) -> list[list[torch.Tensor]]:
    loader = build_train_loader(
        records, 16, 8, batch_size=4, num_instances=2, num_workers=num_workers, seed=seed, pad=2
    )
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append([torch.cat([b[0].flatten(), b[3].float()]) for b in loader])
    return epochs


def _same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(
        len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def test_train_loader_deterministic_with_seed(records: list[Record]) -> None:
    torch.manual_seed(123)
    first = _run_epochs(records, num_workers=0, seed=5)
    global_after = torch.rand(1)
    torch.manual_seed(999)  # the global generator must not matter
    second = _run_epochs(records, num_workers=0, seed=5)
    assert _same(first, second)
    assert not _same([first[0]], [first[1]])
    assert not _same(first, _run_epochs(records, num_workers=0, seed=6))
    # Augmentation ran on a forked, per-sample-seeded generator, not the global one.
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), global_after)


def _augmenting_loader(records: list[Record], num_workers: int) -> DataLoader:
    """Random flip and pad/crop both active, so any change of augmentation shows."""
    return build_train_loader(
        records,
        16,
        8,
        batch_size=4,
        num_instances=2,
        num_workers=num_workers,
        seed=3,
        flip_prob=0.5,
        pad=2,
    )


def _epoch(loader: DataLoader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images [N, 3, H, W] and indices [N] of one epoch, in batch order."""
    loader.sampler.set_epoch(epoch)
    batches = _collect(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[3] for b in batches])


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_epoch_batches_depend_only_on_seed_and_epoch(
    records: list[Record], num_workers: int
) -> None:
    # Reference: a fresh single-process loader jumping straight to epoch 1 (a resumed run).
    torch.manual_seed(0)
    ref_images, ref_indices = _epoch(_augmenting_loader(records, 0), 1)
    # The augmentation is really active: some images differ from their plain eval view.
    plain = build_transforms(16, 8, is_train=False)
    unaugmented = torch.stack([plain(read_rgb(records[i].path)) for i in ref_indices.tolist()])
    assert not torch.equal(ref_images, unaugmented)

    # An uninterrupted run: the (persistent, when num_workers > 0) workers already ran
    # epoch 0, and the global generator is in another state.
    loader = _augmenting_loader(records, num_workers)
    torch.manual_seed(1)
    _epoch(loader, 0)
    torch.manual_seed(2)
    images, indices = _epoch(loader, 1)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(images, ref_images)

    # A fresh loader with this worker count resumed at epoch 1 sees the same batches.
    torch.manual_seed(3)
    images, indices = _epoch(_augmenting_loader(records, num_workers), 1)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(images, ref_images)


def test_epochs_differ_in_augmentation_of_the_same_index(records: list[Record]) -> None:
    loader = _augmenting_loader(records, 0)
    views: dict[int, list[torch.Tensor]] = {}
    for epoch in range(2):
        images, indices = _epoch(loader, epoch)
        for image, idx in zip(images, indices.tolist(), strict=True):
            views.setdefault(idx, []).append(image)
    # Indices drawn in both epochs (each epoch drops some partial chunks).
    both = [v for v in views.values() if len(v) == 2]
    assert len(both) >= 4
    assert any(not torch.equal(a, b) for a, b in both)


def test_dataset_augmentation_is_keyed_not_stateful(records: list[Record]) -> None:
    transform = build_transforms(16, 8, is_train=True, flip_prob=0.5, pad=2)
    dataset = ImageDataset(records, transform, seed=4)
    # The same key gives the same image whatever was loaded in between.
    first = dataset[EpochIndex(5, epoch=2, position=7)][0]
    for i in range(len(records)):
        dataset[i]
    assert torch.equal(dataset[EpochIndex(5, epoch=2, position=7)][0], first)
    assert torch.equal(dataset[3][0], dataset[3][0])
    # Changing the epoch, the position (an index repeated within one epoch) or the seed
    # changes the draw: over 12 keys a flip/25-crop augmentation cannot stay constant.
    by_epoch = [dataset[EpochIndex(5, e, 7)][0] for e in range(12)]
    by_position = [dataset[EpochIndex(5, 2, p)][0] for p in range(12)]
    by_seed = [ImageDataset(records, transform, seed=s)[EpochIndex(5, 2, 7)][0] for s in range(12)]
    for views in (by_epoch, by_position, by_seed):
        assert any(not torch.equal(v, views[0]) for v in views[1:])
    # The returned index is a plain, non-negative int whatever the key.
    for key in (EpochIndex(5, 2, 7), 5, -7):
        index = dataset[key][3]
        assert type(index) is int and index == 5
    with pytest.raises(IndexError):
        dataset[12]
    with pytest.raises(ValueError, match="ImageDataset: seed must be >= 0, got -1"):
        ImageDataset(records, transform, seed=-1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_global_rng_untouched(
    records: list[Record], num_workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.manual_seed would also reseed CUDA generators, which fork_rng(devices=[]) does not
    # restore; the per-sample seeding must stay on the CPU generator.
    loader = _augmenting_loader(records, num_workers)
    torch.manual_seed(77)
    state = torch.get_rng_state()
    cuda_seeds: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    for epoch in range(2):
        _epoch(loader, epoch)
    assert torch.equal(torch.get_rng_state(), state)
    assert cuda_seeds == []


def test_test_loader_keeps_order_and_last_batch(records: list[Record]) -> None:
    loader = build_test_loader(records, 16, 8, batch_size=5, num_workers=0)
    batches = _collect(loader)
    assert [len(b[3]) for b in batches] == [5, 5, 2]
    indices = torch.cat([b[3] for b in batches])
    assert indices.tolist() == list(range(12))
    pids = torch.cat([b[1] for b in batches])
    assert pids.tolist() == [r.pid for r in records]
    first = Image.open(records[0].path).convert("RGB")
    torch.testing.assert_close(batches[0][0][0], _normalised(first), atol=1e-6, rtol=0)


def test_loader_argument_errors(records: list[Record]) -> None:
    with pytest.raises(ValueError, match="build_train_loader: records is empty"):
        build_train_loader([], 16, 8)
    with pytest.raises(ValueError, match="build_test_loader: num_workers must be >= 0, got -1"):
        build_test_loader(records, 16, 8, num_workers=-1)
    with pytest.raises(ValueError, match="needs 4 identities per batch, but the data has only 3"):
        build_train_loader(records, 16, 8, batch_size=8, num_instances=2, num_workers=0)


# ---------------------------------------------------------------- unreadable images


@pytest.fixture()
def market_with_broken_image(tmp_path: Path) -> tuple[list[Record], list[Record], Path]:
    """The fixture Market-1501 tree (train 3 ids x 2 images, gallery 5 images) with one
    training and one gallery image emptied, as an interrupted copy leaves them."""
    write_market1501(tmp_path)
    data = load_market1501(tmp_path, check_stats=False)
    bad_train = break_image(Path(data.train[2].path), "empty")
    break_image(Path(data.gallery[1].path), "truncated")
    return list(data.train), list(data.gallery), bad_train


def _first_error(loader: DataLoader) -> ImageReadError:
    """The ImageReadError raised by iterating ``loader`` (which must raise one)."""
    try:
        for _ in loader:
            pass
    except ImageReadError as err:
        # The traceback's frames hold the iterator in a reference cycle; dropping them lets
        # it stop its workers now instead of at a later garbage collection (slow in torch).
        err.__traceback__ = None
        return err
    raise AssertionError("the loader raised no ImageReadError")


@pytest.mark.parametrize("split", ["train", "gallery"])
def test_worker_error_is_the_same_one_line_message(
    market_with_broken_image: tuple[list[Record], list[Record], Path], split: str
) -> None:
    train, gallery, _ = market_with_broken_image

    def loader(num_workers: int) -> DataLoader:
        if split == "train":
            # 3 ids x 2 images per batch: the one batch of the epoch holds every image.
            return build_train_loader(train, 16, 8, batch_size=6, num_instances=2,
                                      num_workers=num_workers)
        return build_test_loader(gallery, 16, 8, batch_size=2, num_workers=num_workers)

    in_process = str(_first_error(loader(0)))
    in_worker = _first_error(loader(1))
    bad = train[2].path if split == "train" else gallery[1].path
    assert in_process.startswith(f"cannot read image {bad}: ")
    # Without the fix torch's re-raise carries the worker's whole traceback:
    # "Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback ...".
    assert str(in_worker) == in_process
    assert "\n" not in str(in_worker)
    assert in_worker.args == (in_process,)


def test_image_read_error_keeps_a_plain_message() -> None:
    err = ImageReadError("cannot read image a.jpg: file not found")
    assert str(err) == "cannot read image a.jpg: file not found"
    assert isinstance(err, OSError)


@pytest.mark.parametrize(
    "build",
    [
        lambda recs: ImageDataset(recs, None, on_bad_image="ignore"),
        lambda recs: build_train_loader(recs, 16, 8, num_workers=0, on_bad_image="ignore"),
        lambda recs: build_test_loader(recs, 16, 8, num_workers=0, on_bad_image="ignore"),
    ],
)
def test_on_bad_image_must_be_error_or_skip(records: list[Record], build) -> None:
    with pytest.raises(ValueError, match="on_bad_image must be 'error' or 'skip', got 'ignore'"):
        build(records)


def test_dataset_skip_replaces_with_next_image_of_the_same_identity(
    records: list[Record],
) -> None:
    # records: pid p holds indices 4p .. 4p+3.
    for i in (5, 6, 11):
        break_image(Path(records[i].path))
    transform = build_transforms(16, 8, is_train=False)
    dataset = ImageDataset(records, transform, on_bad_image="skip", replace_bad=True)
    image, pid, camid, index, bad = dataset[5]
    # Two bad images in a row are both skipped and both reported.
    assert (pid, camid, index, bad) == (1, records[7].camid, 7, (records[5].path, records[6].path))
    torch.testing.assert_close(image, transform(read_rgb(records[7].path)))
    # The search wraps around to the identity's first record.
    assert dataset[11][2:] == (records[8].camid, 8, (records[11].path,))
    assert dataset[4][3:] == (4, ())
    with pytest.raises(ImageReadError, match=re.escape(f"cannot read image {records[5].path}: ")):
        ImageDataset(records, transform)[5]


def test_train_loader_skip_keeps_pk_batches_and_reports_the_file(records: list[Record]) -> None:
    bad_path = break_image(Path(records[5].path)).as_posix()
    epochs = {}
    for num_workers in (0, 1):
        loader = build_train_loader(records, 16, 8, batch_size=6, num_instances=2,
                                    num_workers=num_workers, seed=1, on_bad_image="skip")
        batches = []
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)
            batches += _collect(loader)
        epochs[num_workers] = batches
    reported = 0
    for images, pids, camids, indices, bad in epochs[0]:
        assert images.shape == (6, 3, 16, 8)
        chunks = pids.view(3, 2)
        assert (chunks[:, 0] == chunks[:, 1]).all()
        assert 5 not in indices.tolist()
        for i, idx in enumerate(indices.tolist()):
            assert records[idx].pid == pids[i] and records[idx].camid == camids[i]
        assert set(bad) <= {bad_path}
        reported += len(bad)
    # Each epoch draws every image of pid 1 once (4 images, chunks of 2, no drops).
    assert reported == 3
    for a, b in zip(epochs[0], epochs[1], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4], strict=True)) and a[4] == b[4]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_loader_skip_fails_when_an_identity_has_no_readable_image(
    records: list[Record], num_workers: int
) -> None:
    for i in range(8, 12):
        break_image(Path(records[i].path))
    loader = build_train_loader(records, 16, 8, batch_size=6, num_instances=2,
                                num_workers=num_workers, on_bad_image="skip")
    message = str(_first_error(loader))
    assert "\n" not in message
    assert message.startswith("cannot read any of the 4 image(s) of identity 2 (pid 2), so no "
                              "image can stand in for ")
    assert re.search(r"first error: cannot read image \S+0002_c\d_\d\.jpg: ", message)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_test_loader_skip_drops_bad_items(records: list[Record], num_workers: int) -> None:
    for i in (1, 7):
        break_image(Path(records[i].path), "truncated")
    loader = build_test_loader(records, 16, 8, batch_size=5, num_workers=num_workers,
                               on_bad_image="skip")
    batches = _collect(loader)
    assert [len(b[3]) for b in batches] == [4, 4, 2]
    assert [b[4] for b in batches] == [(records[1].path,), (records[7].path,), ()]
    indices = torch.cat([b[3] for b in batches]).tolist()
    assert indices == [0, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    assert torch.cat([b[1] for b in batches]).tolist() == [records[i].pid for i in indices]
    assert torch.cat([b[2] for b in batches]).tolist() == [records[i].camid for i in indices]
    plain = build_transforms(16, 8, is_train=False)
    expected = torch.stack([plain(read_rgb(records[i].path)) for i in indices])
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), expected)


def test_test_loader_skip_batch_with_only_bad_images_is_empty(records: list[Record]) -> None:
    for i in (2, 3):
        break_image(Path(records[i].path))
    loader = build_test_loader(records[:5], 16, 8, batch_size=2, num_workers=0,
                               on_bad_image="skip")
    images, pids, camids, indices, bad = _collect(loader)[1]
    assert images.shape == (0, 3, 16, 8) and images.dtype == torch.float32
    for t in (pids, camids, indices):
        assert t.shape == (0,) and t.dtype == torch.int64
    assert bad == (records[2].path, records[3].path)
    assert [len(b[3]) for b in _collect(loader)] == [2, 0, 1]


def test_bad_image_log_reports_each_file_once() -> None:
    log = BadImageLog()
    assert (log.count, log.paths) == (0, [])
    assert log.update(("b.jpg", "a.jpg", "b.jpg")) == ["b.jpg", "a.jpg"]
    assert log.update(()) == []
    assert log.update(["a.jpg", "c.jpg"]) == ["c.jpg"]
    assert log.count == 3
    assert log.paths == ["b.jpg", "a.jpg", "c.jpg"]


# ---------------------------------------------------------------- worker processes


class _SignalState(Dataset):
    """In a worker: sends itself SIGINT and SIGTERM (a sender other than the parent, like a
    terminal's Ctrl-C or a scheduler), then reports whether SIGINT is ignored. A worker
    that does not survive the signals makes the DataLoader raise."""

    def __init__(self, send: bool) -> None:
        self.send = send

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> bool:
        if self.send:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
        return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


@pytest.fixture
def default_signal_handlers():
    """Python's own SIGINT / SIGTERM handling in the main process for the test, whatever the
    suite was started under (a shell's background job inherits SIGINT ignored, and so would
    the forked workers)."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])


def test_workers_ignore_sigint_and_sigterm_from_others(records: list[Record],
                                                       default_signal_handlers) -> None:
    def ignored(dataset: Dataset, **kwargs) -> bool:
        (batch,) = DataLoader(dataset, batch_size=None, num_workers=1, **kwargs)
        return bool(batch)

    assert ignored(_SignalState(send=True), worker_init_fn=worker_init)
    # torch's default: a Ctrl-C would interrupt the worker mid-batch.
    assert not ignored(_SignalState(send=False))
    # The main process keeps its handlers.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    train = build_train_loader(records, 16, 8, batch_size=4, num_instances=2)
    assert train.worker_init_fn is worker_init
    assert build_test_loader(records, 16, 8).worker_init_fn is worker_init


def _wait_for_signals(conn) -> None:
    """Child process body: a worker's init, then signals from itself (not the parent)."""
    worker_init(0)
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)
    conn.send("alive")
    time.sleep(60)


def test_worker_obeys_sigterm_from_its_parent_only() -> None:
    # torch stops a worker that missed its shutdown request with SIGTERM, and
    # multiprocessing does the same at interpreter exit: ignoring the parent's SIGTERM too
    # would hang the main process's exit.
    receiver, sender = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.Process(target=_wait_for_signals, args=(sender,), daemon=True)
    child.start()
    try:
        assert receiver.poll(30) and receiver.recv() == "alive"
        child.terminate()
        child.join(30)
        assert child.exitcode == -signal.SIGTERM
    finally:
        if child.is_alive():
            child.kill()


def test_process_with_running_loaders_exits_cleanly(tmp_path: Path) -> None:
    # Workers left running at exit (persistent ones, mid-epoch) are stopped in order, not by
    # multiprocessing's SIGTERM, which torch would report as "worker ... killed by signal".
    script = textwrap.dedent(
        f"""
        import numpy as np
        from PIL import Image
        from esreid.data.loader import build_test_loader, build_train_loader
        from esreid.data.records import Record

        recs = []
        for i in range(4):
            path = {str(tmp_path)!r} + f"/{{i}}.png"
            Image.fromarray(np.zeros((16, 8, 3), np.uint8)).save(path)
            recs.append(Record(path, i // 2, i % 2))
        train = build_train_loader(recs, 16, 8, batch_size=4, num_instances=2, num_workers=1)
        for batch in train:
            pass
        running = iter(train)
        next(running)
        evaluating = iter(build_test_loader(recs, 16, 8, batch_size=1, num_workers=1))
        next(evaluating)
        print("done")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", "")


class _GcState(Dataset):
    """Item 0: how many objects the worker process has frozen out of its collector."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        import gc

        return gc.get_freeze_count()


class _Finaliser:
    """Garbage whose finaliser records the process it ran in."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.cycle = self

    def __del__(self) -> None:
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()}\n")


def test_workers_never_run_finalisers_of_inherited_garbage(records: list[Record], tmp_path) -> None:
    """A forked worker that frees the parent's garbage can hang for good: an onnxruntime
    session's finaliser waits for thread-pool threads that do not exist after fork. The
    parent collects its garbage before forking, and workers freeze what they inherit."""
    import gc

    (frozen,) = DataLoader(_GcState(), batch_size=None, num_workers=1, worker_init_fn=worker_init)
    assert frozen > 1000  # everything inherited (modules, torch, ...) is frozen
    log = tmp_path / "finalised.txt"
    gc.disable()
    try:
        _Finaliser(log)  # unreachable at once, but only the cyclic collector can free it
        assert not log.exists()
        loader = build_test_loader(records, 16, 8, batch_size=4, num_workers=1)
        assert sum(len(batch[0]) for batch in loader) == len(records)
    finally:
        gc.enable()
    assert log.read_text().split() == [str(os.getpid())]  # freed in this process, once
